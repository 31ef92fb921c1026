"""Drawing a store's boxes and labels on the image, to see what the detector found (`lxm show`)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from lxm.extract.records import ImageFeatures


def load_vocab(path: str | os.PathLike) -> list[str]:
    """BUTD vocabulary file: line i names class i; synonyms after a comma are dropped (spec §3)."""
    return [line.split(",")[0].strip() for line in Path(path).read_text().splitlines()]


def draw(image_bgr: np.ndarray, rec: ImageFeatures, objects: list[str] | None = None,
         attributes: list[str] | None = None, max_boxes: int | None = None) -> np.ndarray:
    """Boxes with "attribute object conf" labels, strongest first; returns a new BGR image."""
    if image_bgr.shape[:2] != (rec.img_h, rec.img_w):
        raise ValueError(f"image is {image_bgr.shape[1]}x{image_bgr.shape[0]} but the features of {rec.img_id!r} "
                         f"were extracted from a {rec.img_w}x{rec.img_h} image")
    out = image_bgr.copy()
    order = np.argsort(-rec.objects_conf, kind="stable")[: max_boxes or rec.num_boxes]
    rng = np.random.default_rng(0)
    for i in order:
        color = tuple(int(c) for c in rng.integers(64, 256, 3))
        x1, y1, x2, y2 = (int(round(v)) for v in rec.boxes[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
        obj = objects[rec.objects_id[i]] if objects else f"obj{rec.objects_id[i]}"
        att = attributes[rec.attrs_id[i]] if attributes else f"attr{rec.attrs_id[i]}"
        label = f"{att} {obj} {rec.objects_conf[i]:.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        ty = max(y1, th + 4)
        cv2.rectangle(out, (x1, ty - th - 4), (x1 + tw + 2, ty), color, -1)
        cv2.putText(out, label, (x1 + 1, ty - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return out
