"""The per-image region-feature record: what one detector pass produces and what the feature store holds.

Mirrors one row of LXMERT's released `*_obj36.tsv` files (airsplay/lxmert `src/utils.py` `load_obj_tsv`, the
FIELDNAMES of `data/mscoco_imgfeat/extract_coco_image.py`; detector spec §2.1): object/attribute ids and
confidences from the Visual Genome detector, boxes in original-image pixels, and the pooled 2048-d features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lxm.errors import LxmError

# Field order of the original TSV rows (and the feature store's column names).
FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes",
          "features")
NO_LABEL = -1  # objects_id / attrs_id of a box without a label: padding, and every box of a label-less backend
#   (grid cells, ViT patches); equals lxm.model.losses.IGNORE_INDEX, so the label losses skip it as it is
PAD_ID = NO_LABEL  # the ids a shard stores in the rows past a record's num_boxes
BOX_TOLERANCE = 1e-5  # LXMERT asserts normalised boxes within [0, 1 + 1e-5] (src/tasks/vqa_data.py)


class RecordError(LxmError, ValueError):
    """A record is inconsistent; the message names the image and the field."""


@dataclass
class ImageFeatures:
    """Region features of one image. N boxes, D feature size (2048 for the VG detector).

    Label-less backends (`lxm.features.backbone`: grid cells, ViT patches) store `NO_LABEL` ids and 0.0
    confidences; a store's records may hold fewer boxes than its N (given boxes), never padding rows.
    """

    img_id: str  # file stem, e.g. "COCO_train2014_000000132417" (LXMERT's key)
    img_h: int  # original image height in pixels
    img_w: int  # original image width in pixels
    objects_id: np.ndarray  # [N] int64: argmax over the 1600 object classes (background excluded); NO_LABEL if none
    objects_conf: np.ndarray  # [N] float32: that class's probability in the 1601-way softmax (not renormalised)
    attrs_id: np.ndarray  # [N] int64: argmax over the 400 attributes ("no attribute" excluded); NO_LABEL if none
    attrs_conf: np.ndarray  # [N] float32: its probability in the 401-way softmax
    boxes: np.ndarray  # [N, 4] float32: x1, y1, x2, y2 in original-image pixels
    features: np.ndarray  # [N, D] float32 or float16: mean-pooled res5 features of each box

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    def validate(self) -> "ImageFeatures":
        """Check shapes and dtypes; raise RecordError naming the image and field."""
        who = f"image {self.img_id!r}"
        if not isinstance(self.img_id, str) or not self.img_id or any(c in self.img_id for c in "\t\r\n"):
            raise RecordError(f"{who}: field 'img_id' must be a non-empty string without tabs or newlines")
        for name in ("img_h", "img_w"):
            if int(getattr(self, name)) <= 0:
                raise RecordError(f"{who}: field '{name}' must be positive, got {getattr(self, name)}")
        n = self.boxes.shape[0] if self.boxes.ndim == 2 else -1
        if self.boxes.shape != (n, 4):
            raise RecordError(f"{who}: field 'boxes' must be [N, 4], got {list(self.boxes.shape)}")
        for name, kinds in (("objects_id", "iu"), ("attrs_id", "iu"), ("objects_conf", "f"), ("attrs_conf", "f")):
            arr = getattr(self, name)
            if arr.shape != (n,) or arr.dtype.kind not in kinds:
                raise RecordError(f"{who}: field '{name}' must be a [{n}] {'integer' if kinds == 'iu' else 'float'} "
                                  f"array, got {arr.dtype} {list(arr.shape)}")
        if self.features.ndim != 2 or self.features.shape[0] != n or self.features.dtype.kind != "f":
            raise RecordError(f"{who}: field 'features' must be a [{n}, D] float array, got "
                              f"{self.features.dtype} {list(self.features.shape)}")
        return self

    def normalized_boxes(self) -> np.ndarray:
        """Boxes as LXMERT feeds them: (x1/w, y1/h, x2/w, y2/h), float32 [N, 4]; error if outside [0, 1] by > 1e-5."""
        scale = np.array([self.img_w, self.img_h, self.img_w, self.img_h], dtype=np.float32)
        out = self.boxes.astype(np.float32) / scale
        if out.size and (out.min() < -BOX_TOLERANCE or out.max() > 1 + BOX_TOLERANCE):
            raise RecordError(f"image {self.img_id!r}: field 'boxes' lies outside the {self.img_w}x{self.img_h} image "
                              f"(normalised range {out.min():.6f}..{out.max():.6f})")
        return out
