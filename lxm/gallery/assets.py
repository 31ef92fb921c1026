"""The gallery's pictures: each shown example's image(s) with the boxes the model attended to most drawn on them,
downscaled and written as JPEGs beside the page.

Which boxes: the example's `GalleryRecord.attention`, the box weights `lxm ask --explain` shades by
(`lxm.infer.explain.explain_batch`): by default each box's share of the relevance for the predicted answer
(Chefer et al. 2021, `lxm.infer.relevance`), or the last cross layer's [CLS] -> boxes attention averaged over the
heads (`--explain-method attention`); the `boxes` largest are
outlined and labelled "attribute object weight" (`lxm.extract.draw.label_top_boxes`, the label placement of
`lxm show`), without the shading of `--explain`'s picture, so the image stays readable. The weights differ per
example, so each example gets its own picture of each of its images (`asset_name`).

Images are found as `lxm extract` finds them (`lxm.extract.images.list_images`: every subfolder, img_id = file
stem), so the folders given to extraction can be given here unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from lxm.extract.images import ImageError, list_images, load_bgr
from lxm.extract.draw import FONT_SCALE, PlacedLabel, box_pixels, check_drawable, label_top_boxes
from lxm.extract.draw import LONG_SIDE as SHOW_LONG_SIDE
from lxm.features.records import ImageFeatures

LONG_SIDE = 480  # pixels of an asset's long side (smaller images are enlarged to it, as lxm show does)
JPEG_QUALITY = 85
BOXES_NOTE = ("Boxes: on each example's picture, the boxes its [CLS] attended to most in the model's last cross "
              "layer (attention over the image's boxes, mean over heads; an image's weights sum to 1), labelled "
              "\"attribute object weight\".")
RELEVANCE_BOXES_NOTE = ("Boxes: on each example's picture, the boxes most relevant to its predicted answer (Chefer et "
                        "al. 2021: the answer's gradient weighting every attention map, combined through the layers; "
                        "shares of the image's total, summing to 1), labelled \"attribute object weight\" with the "
                        "share as the weight.")
NOTES = {"relevance": RELEVANCE_BOXES_NOTE, "attention": BOXES_NOTE}  # by --explain-method
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")


def index_images(folders: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """img_id -> image file over all `folders`; one img_id in two folders is an error naming both files."""
    where: dict[str, Path] = {}
    for folder in folders:
        for path in list_images(folder):
            other = where.setdefault(path.stem, path)
            if other != path:
                raise ImageError(f"--images: two images have the img_id {path.stem!r}: {other} and {path}; "
                                 f"pass one of the folders")
    return where


def asset_name(example_id: int | str, position: int = 0, images: int = 1) -> str:
    """The file name of example `example_id`'s picture of its image at `position` (of `images`: NLVR2's left 0 and
    right 1 get "-0" / "-1"): the id when it is a plain file name, else a digest of it (an id may hold characters a
    URL or a file system would mangle)."""
    stem = str(example_id)
    if not _SAFE.fullmatch(stem):
        stem = f"ex-{hashlib.sha1(stem.encode()).hexdigest()[:16]}"
    return f"{stem}-{position}.jpg" if images > 1 else f"{stem}.jpg"


def load_asset(image: Path, rec: ImageFeatures, long_side: int = LONG_SIDE) -> tuple[np.ndarray, ImageFeatures]:
    """`image` decoded and resized to a long side of `long_side` pixels (shrunk, or enlarged as `lxm show` enlarges
    small images), with `rec` scaled to it (its boxes in the picture's pixels), once for all its examples' pictures.

    Raises ImageError (an undecodable image, or not the image the features came from)."""
    try:
        bgr = load_bgr(image)
        if bgr.shape[:2] != (rec.img_h, rec.img_w):
            raise ImageError(f"image is {bgr.shape[1]}x{bgr.shape[0]} but the features of {rec.img_id!r} were "
                             f"extracted from a {rec.img_w}x{rec.img_h} image")
    except ImageError as exc:
        raise ImageError(f"{image}: {exc}") from None
    scale = long_side / max(rec.img_h, rec.img_w)
    w, h = max(1, round(rec.img_w * scale)), max(1, round(rec.img_h * scale))
    # INTER_AREA: no aliasing when shrinking; INTER_CUBIC when enlarging, as lxm show
    bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    sx, sy = w / rec.img_w, h / rec.img_h
    return bgr, dataclasses.replace(rec, img_h=h, img_w=w, boxes=rec.boxes * np.array([sx, sy, sx, sy], np.float32))


def draw_asset(bgr: np.ndarray, rec: ImageFeatures, weights: np.ndarray, out: Path, *,
               objects: list[str] | None = None, attributes: list[str] | None = None, boxes: int = 5
               ) -> list[PlacedLabel]:
    """Outline and label the `boxes` boxes of `rec` with the largest attention `weights` ([N], one per box) on a
    copy of `bgr` (`load_asset`'s picture and record), written as the JPEG `out`; the labels drawn, strongest
    first."""
    check_drawable(bgr, rec, objects, attributes, option="--vocab-dir")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (rec.num_boxes,):
        raise ValueError(f"{rec.img_id}: {weights.shape[0] if weights.ndim == 1 else weights.shape} attention "
                         f"weights for {rec.num_boxes} boxes")
    picture = bgr.copy()
    height, width = picture.shape[:2]
    size = max(width, height) / SHOW_LONG_SIDE  # fonts as lxm show's at this size
    labels, _, _ = label_top_boxes(picture, rec, box_pixels(rec, 1.0, width, height), weights, top=boxes,
                                   objects=objects, attributes=attributes, font=FONT_SCALE * max(1.0, size),
                                   thick=max(1, round(size)))
    ok, data = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"{out}: could not encode the image")
    out.write_bytes(data.tobytes())
    return labels
