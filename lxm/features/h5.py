"""HDF5 interop for feature stores (for code that reads h5py files, e.g. ports of bottom-up-attention loaders).

Layout of a file written by `lxm export h5` (and read by `lxm convert h5`), M images, N boxes, D features:

    attrs: format = "lxm-features-h5", version = 1, num_boxes = N, feature_dim = D, and backbone = the store
           manifest's "backbone" as JSON text when it has one (`lxm.features.backbone`; absent: butd with labels)
    img_id        [M]        utf-8 strings
    img_h, img_w  [M]        int32
    num_boxes     [M]        int32      K <= N real boxes of each image; rows K.. are padding (ids -1, zeros)
    objects_id    [M, N]     int64      attrs_id    [M, N] int64 (-1: no label, as label-less backends store)
    objects_conf  [M, N]     float32    attrs_conf  [M, N] float32
    boxes         [M, N, 4]  float32    x1, y1, x2, y2 in original-image pixels
    features      [M, N, D]  float16 or float32, chunked one image per chunk
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np

from lxm.atomic import atomic_path
from lxm.features.records import ImageFeatures, RecordError

H5_FORMAT = "lxm-features-h5"
ARRAY_FIELDS = ("img_h", "img_w", "num_boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes",
                "features")


def write_h5(records: Iterable[ImageFeatures], path: str | os.PathLike, *, count: int, num_boxes: int,
             feature_dim: int, dtype: str, backbone: dict | None = None) -> int:
    """Write `count` records; the file appears under its name only when complete."""
    path = Path(path)
    n, d = num_boxes, feature_dim
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"format": H5_FORMAT, "version": 1, "num_boxes": n, "feature_dim": d})
            if backbone:
                f.attrs["backbone"] = json.dumps(backbone)
            ds = {
                "img_id": f.create_dataset("img_id", (count,), dtype=h5py.string_dtype("utf-8")),
                "img_h": f.create_dataset("img_h", (count,), "int32"),
                "img_w": f.create_dataset("img_w", (count,), "int32"),
                "num_boxes": f.create_dataset("num_boxes", (count,), "int32"),
                "objects_id": f.create_dataset("objects_id", (count, n), "int64"),
                "objects_conf": f.create_dataset("objects_conf", (count, n), "float32"),
                "attrs_id": f.create_dataset("attrs_id", (count, n), "int64"),
                "attrs_conf": f.create_dataset("attrs_conf", (count, n), "float32"),
                "boxes": f.create_dataset("boxes", (count, n, 4), "float32"),
                "features": f.create_dataset("features", (count, n, d), dtype, chunks=(1, n, d)),
            }
            written = 0
            for i, rec in enumerate(records):
                if i >= count:
                    raise RecordError(f"{path}: more records than the declared {count}")
                ds["img_id"][i] = rec.img_id
                k = rec.num_boxes
                if not 1 <= k <= n:
                    raise RecordError(f"{path}: image {rec.img_id!r} has {k} boxes; the file holds 1 to {n}")
                ds["img_h"][i], ds["img_w"][i], ds["num_boxes"][i] = rec.img_h, rec.img_w, k
                for name in ("objects_id", "attrs_id"):  # padding rows: no label, as in the store
                    row = np.full(n, -1, np.int64)
                    row[:k] = getattr(rec, name)
                    ds[name][i] = row
                for name in ("objects_conf", "attrs_conf", "boxes", "features"):
                    if k == n:
                        ds[name][i] = getattr(rec, name)
                    else:  # h5py fills unwritten rows with zeros
                        ds[name][i, :k] = getattr(rec, name)
                written += 1
            if written != count:
                raise RecordError(f"{path}: {written} records written, {count} declared")
    return written


def read_h5(path: str | os.PathLike) -> Iterator[ImageFeatures]:
    """Stream records from a file in the layout above (one image read at a time)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != H5_FORMAT:
            raise RecordError(f"{path}: not an lxm feature file (attribute 'format' is {f.attrs.get('format')!r})")
        missing = [k for k in ("img_id", *ARRAY_FIELDS) if k not in f]
        if missing:
            raise RecordError(f"{path}: missing dataset(s) {', '.join(missing)}")
        n = f["boxes"].shape[1]
        for i in range(f["img_id"].shape[0]):
            img_id = f["img_id"][i]
            k = int(f["num_boxes"][i])
            if not 1 <= k <= n:
                raise RecordError(f"{path}: row {i}: field 'num_boxes' is {k}, outside 1..{n}")
            rec = ImageFeatures(
                img_id=img_id.decode() if isinstance(img_id, bytes) else str(img_id),
                img_h=int(f["img_h"][i]), img_w=int(f["img_w"][i]),
                objects_id=f["objects_id"][i, :k], objects_conf=f["objects_conf"][i, :k],
                attrs_id=f["attrs_id"][i, :k], attrs_conf=f["attrs_conf"][i, :k], boxes=f["boxes"][i, :k],
                features=f["features"][i, :k],
            )
            try:
                yield rec.validate()
            except RecordError as exc:
                raise RecordError(f"{path}: row {i}: {exc}") from None


def h5_backbone(path: str | os.PathLike) -> dict | None:
    """The backbone entry a file carries (written from a store's manifest), or None."""
    with h5py.File(path, "r") as f:
        text = f.attrs.get("backbone")
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        raise RecordError(f"{path}: attribute 'backbone' is not JSON text") from None
    if not isinstance(value, dict):
        raise RecordError(f"{path}: attribute 'backbone' must be a JSON object")
    return value


def h5_info(path: str | os.PathLike) -> tuple[int, int, int, str]:
    """(images, num_boxes, feature_dim, dtype) of a feature HDF5 file."""
    with h5py.File(path, "r") as f:
        feats = f["features"]
        return feats.shape[0], feats.shape[1], feats.shape[2], np.dtype(feats.dtype).name
