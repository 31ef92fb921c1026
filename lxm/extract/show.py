"""Drawing a store's boxes and labels on the image, to see what the detector found (`lxm show`).

What the BUTD demo draws (peteanderson80/bottom-up-attention `tools/demo.ipynb`: each box with an "attribute object"
label at its top-left corner), made readable whatever the image and the number of boxes:

- small images are upscaled (the long side becomes at least `LONG_SIDE` pixels) and the font grows with larger
  pictures, so a 128-pixel quickstart image gets legible labels;
- a label goes to the first free place next to its box (above, inside the top, below, inside the bottom; left then
  right aligned), else to the nearest free place in the picture with a thin leader line to its box; labels never
  overlap each other and are never cut by the picture's border; a box whose label finds no room at all is still
  drawn and the count of such boxes is logged;
- labels name the class and attribute when a vocabulary is given, ids ("attr4 obj18") otherwise, and always carry
  the object confidence (the demo shows names only, and drops the attribute below 0.1 confidence; we always show it).
"""

from __future__ import annotations

import colorsys
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lxm.errors import ConfigError
from lxm.extract.images import ImageError
from lxm.features.records import ImageFeatures

_logger = logging.getLogger(__name__)

LONG_SIDE = 800  # pixels: smaller images are upscaled to this long side, larger ones are kept as they are
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.6  # at LONG_SIDE; scaled with the picture (cap height about 13 px on an 800-px picture)
PAD = 3  # pixels of label background around the text


@dataclass
class Label:
    box: int  # index of the box in the record
    text: str
    rect: tuple[int, int, int, int]  # x1, y1, x2, y2 in picture pixels, end exclusive
    leader: bool  # placed away from its box, with a line to it


@dataclass
class Drawing:
    image: np.ndarray  # [H, W, 3] BGR picture (the image upscaled by `scale`)
    scale: float  # picture pixels per image pixel
    labels: list[Label] = field(default_factory=list)
    unlabelled: list[int] = field(default_factory=list)  # boxes drawn without a label: no room was left


def load_vocab(path: str | os.PathLike) -> list[str]:
    """BUTD vocabulary file: line i names class i; synonyms after a comma are dropped (spec §3)."""
    return [line.split(",")[0].strip() for line in Path(path).read_text().splitlines()]


def detector_classes(manifest: Mapping[str, Any] | Any | None) -> tuple[int, int] | None:
    """(object classes, attributes) of the detector that made a store's features, as its manifest records them
    (`lxm extract` writes the detector's config under "extractor"), or of a `DetectorConfig` (features made in
    memory, `lxm ask`); None where the manifest does not say (features imported from a TSV or HDF5 file)."""
    if manifest is not None and not isinstance(manifest, Mapping):
        return int(manifest.num_classes), int(manifest.num_attrs)
    det = ((manifest or {}).get("extractor") or {}).get("detector")
    if isinstance(det, dict):
        n_obj, n_att = det.get("num_classes"), det.get("num_attrs")
        if isinstance(n_obj, int) and isinstance(n_att, int):
            return n_obj, n_att
    return None


def fit_names(objects: list[str] | None, attributes: list[str] | None, classes: tuple[int, int] | None, *,
              option: str = "--vocab", source: str = "the features", strict: bool = True
              ) -> tuple[list[str] | None, list[str] | None]:
    """The class names to label boxes with: `objects` / `attributes` when they are the vocabulary of the detector
    with `classes` = (object classes, attributes) (`detector_classes`; None: not known, the names are taken and
    `check_drawable` checks the ids against them).

    Names of another detector would label every box wrongly (the tiny detector's 20 classes named from BUTD's 1600:
    "red microwave"): `strict` raises a ConfigError naming both sizes; otherwise a warning is logged and (None, None)
    returned, so the boxes are labelled with their ids.
    """
    if objects is None or attributes is None or classes is None:
        return objects, attributes
    if (len(objects), len(attributes)) == tuple(classes):
        return objects, attributes
    problem = (f"{option} has {len(objects)} object and {len(attributes)} attribute names, but {source} come from "
               f"a detector with {classes[0]} object classes and {classes[1]} attributes (another detector's names)")
    if strict:
        raise ConfigError(f"{problem}; leave out {option} to label the boxes with ids")
    _logger.warning("%s; the boxes are labelled with ids", problem)
    return None, None


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_label(w: int, h: int, box: tuple[int, int, int, int], taken: list, width: int, height: int):
    """The first free (x1, y1, x2, y2) for a w x h label of `box`, and whether it sits away from the box; None if the
    picture has no room left."""
    bx1, by1, bx2, by2 = box

    def fit(x, y):
        x, y = min(max(x, 0), width - w), min(max(y, 0), height - h)
        rect = (x, y, x + w, y + h)
        return None if any(_overlaps(rect, t) for t in taken) else rect

    for x in (bx1, bx2 - w):
        for y in (by1 - h, by1, by2, by2 - h):
            rect = fit(x, y)
            if rect:
                return rect, False
    # Nothing next to the box is free: the free place nearest to its top-left corner, on a grid of half a label.
    step_x, step_y = max(1, w // 4), max(1, h // 2)
    spots = [(x, y) for y in range(0, height - h + 1, step_y) for x in range(0, width - w + 1, step_x)]
    spots.sort(key=lambda p: (p[0] - bx1) ** 2 + (p[1] - by1) ** 2)
    for x, y in spots:
        rect = fit(x, y)
        if rect:
            return rect, True
    return None, True


def nearest_point(rect, x: float, y: float) -> tuple[int, int]:
    return int(min(max(x, rect[0]), rect[2] - 1)), int(min(max(y, rect[1]), rect[3] - 1))


def check_drawable(image_bgr: np.ndarray, rec: ImageFeatures, objects: list[str] | None,
                   attributes: list[str] | None, option: str = "--vocab") -> None:
    """The image is the one the features were extracted from, and the class names (from `option`) cover its ids."""
    if image_bgr.shape[:2] != (rec.img_h, rec.img_w):
        raise ImageError(f"image is {image_bgr.shape[1]}x{image_bgr.shape[0]} but the features of {rec.img_id!r} "
                         f"were extracted from a {rec.img_w}x{rec.img_h} image")
    for kind, names, ids in (("object", objects, rec.objects_id), ("attribute", attributes, rec.attrs_id)):
        if names and int(ids.max(initial=0)) >= len(names):
            raise ConfigError(f"{option}: {len(names)} {kind} names, but image {rec.img_id!r} has {kind} id "
                              f"{int(ids.max())} (a vocabulary of another detector?)")


def render(image_bgr: np.ndarray, rec: ImageFeatures, objects: list[str] | None = None,
           attributes: list[str] | None = None, max_boxes: int | None = None, long_side: int = LONG_SIDE) -> Drawing:
    """Boxes with "attribute object conf" labels, strongest first, on a copy of the image upscaled to `long_side`."""
    check_drawable(image_bgr, rec, objects, attributes)
    scale = max(1.0, long_side / max(rec.img_h, rec.img_w))
    height, width = round(rec.img_h * scale), round(rec.img_w * scale)
    out = cv2.resize(image_bgr, (width, height), interpolation=cv2.INTER_CUBIC) if scale > 1 else image_bgr.copy()
    size = max(width, height) / LONG_SIDE
    font_scale, thick = FONT_SCALE * max(1.0, size), max(1, round(size))
    order = np.argsort(-rec.objects_conf, kind="stable")[: max_boxes or rec.num_boxes]
    # Bright, well-spread hues (golden-ratio steps): neighbouring boxes differ and black text reads on every one.
    colors = {int(i): tuple(int(255 * c) for c in reversed(colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.5, 1.0)))
              for k, i in enumerate(order)}
    boxes = {}
    for i in order:
        x1, y1, x2, y2 = (round(float(v) * scale) for v in rec.boxes[i])
        boxes[int(i)] = (min(max(x1, 0), width - 1), min(max(y1, 0), height - 1),
                         min(max(x2, 0), width - 1), min(max(y2, 0), height - 1))
        cv2.rectangle(out, boxes[int(i)][:2], boxes[int(i)][2:], colors[int(i)], thick + 1)
    drawing = Drawing(out, scale)
    taken: list = []
    for i in (int(k) for k in order):
        obj = objects[rec.objects_id[i]] if objects else f"obj{rec.objects_id[i]}"
        att = attributes[rec.attrs_id[i]] if attributes else f"attr{rec.attrs_id[i]}"
        text, fs = f"{att} {obj} {rec.objects_conf[i]:.2f}", font_scale
        (tw, th), base = cv2.getTextSize(text, FONT, fs, thick)
        while tw + 2 * PAD > width and fs > 0.3:  # a name wider than a narrow picture: smaller first,
            fs *= 0.9
            (tw, th), base = cv2.getTextSize(text, FONT, fs, thick)
        while tw + 2 * PAD > width and len(obj) > 1:  # then shortened, never cut by the border
            obj = obj[:-1]
            text = f"{att} {obj}... {rec.objects_conf[i]:.2f}"
            (tw, th), base = cv2.getTextSize(text, FONT, fs, thick)
        rect, away = place_label(tw + 2 * PAD, th + base + 2 * PAD, boxes[i], taken, width, height)
        if rect is None:
            drawing.unlabelled.append(i)
            continue
        taken.append(rect)
        if away:
            bx1, by1, bx2, by2 = boxes[i]
            cx, cy = (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2
            to = nearest_point((bx1, by1, bx2 + 1, by2 + 1), cx, cy)
            cv2.line(out, nearest_point(rect, *to), to, colors[i], thick, cv2.LINE_AA)
        cv2.rectangle(out, rect[:2], (rect[2] - 1, rect[3] - 1), colors[i], -1)
        cv2.putText(out, text, (rect[0] + PAD, rect[3] - PAD - base), FONT, fs, (0, 0, 0), thick, cv2.LINE_AA)
        drawing.labels.append(Label(i, text, rect, away))
    if drawing.unlabelled:
        _logger.warning("%s: no room for the labels of %d of %d boxes (drawn without)", rec.img_id,
                        len(drawing.unlabelled), len(order))
    return drawing


def draw(image_bgr: np.ndarray, rec: ImageFeatures, objects: list[str] | None = None,
         attributes: list[str] | None = None, max_boxes: int | None = None) -> np.ndarray:
    """The picture of `render`: a new BGR image, upscaled when the image is small."""
    return render(image_bgr, rec, objects, attributes, max_boxes).image
