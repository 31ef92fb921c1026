"""Boxes and their labels drawn on a picture: what `lxm show`, `lxm ask --explain`'s picture and `lxm gallery`'s
images share — the fonts and sizes, the detector's class names (`read_names`, `fit_names`: only the vocabulary of
the detector that made the features), the label placement and the top-weighted boxes outlined and labelled.

Label placement (after the BUTD demo, peteanderson80/bottom-up-attention `tools/demo.ipynb`, made readable whatever
the image and the number of boxes): a label goes to the first free place next to its box (above, inside the top,
below, inside the bottom; left then right aligned), else to the nearest free place in the picture with a thin
leader line to its box; labels never overlap each other and are never cut by the picture's border.
"""

from __future__ import annotations

import colorsys
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
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
class PlacedLabel:
    image: int  # which image of the request (NLVR2: 0 left, 1 right)
    box: int  # index of the box in that image's record
    text: str
    weight: float
    rect: tuple[int, int, int, int]  # x1, y1, x2, y2 in picture pixels, end exclusive
    leader: bool  # placed away from its box, with a line to it


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


def read_names(vocab_dir: str | os.PathLike | None, classes: tuple[int, int] | None = None
               ) -> tuple[list[str] | None, list[str] | None]:
    """(object names, attribute names) from a folder with BUTD's objects_vocab.txt / attributes_vocab.txt; (None,
    None), so ids, with a logged warning when they are not the vocabulary of the detector with `classes` = (object
    classes, attributes) (`fit_names`)."""
    if vocab_dir is None:
        return None, None
    folder = Path(vocab_dir)
    names = []
    for file in ("objects_vocab.txt", "attributes_vocab.txt"):
        if not (folder / file).is_file():
            raise ConfigError(f"{folder}: no {file} (the detector's class names, as in BUTD's data/genome/1600-400-20)")
        names.append(load_vocab(folder / file))
    return fit_names(names[0], names[1], classes, option=f"--vocab-dir {folder}", strict=False)


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


def fit_label(att: str, obj: str, value: str, font: float, thick: int, width: int):
    """The label "att obj value" for a picture `width` pixels wide: (text, font scale, (w, h), baseline). A label
    wider than the picture gets a smaller font first, then a shortened object name ("att ob... value"), so that it
    is never cut by the border."""
    label, fs = f"{att} {obj} {value}".lstrip(), font
    (tw, th), base = cv2.getTextSize(label, FONT, fs, thick)
    while tw + 2 * PAD > width and fs > 0.3:
        fs *= 0.9
        (tw, th), base = cv2.getTextSize(label, FONT, fs, thick)
    while tw + 2 * PAD > width and len(obj) > 1:
        obj = obj[:-1]
        label = f"{att} {obj}... {value}".lstrip()
        (tw, th), base = cv2.getTextSize(label, FONT, fs, thick)
    return label, fs, (tw, th), base


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


def decimals(values, least: int = 3, most: int = 8) -> int:
    """The fewest decimals (at least `least`) that print distinct values distinctly (at most `most`)."""
    values = [float(v) for v in values]
    for d in range(least, most):
        if len({f"{v:.{d}f}" for v in values}) == len(set(values)):
            return d
    return most


def label_colour(rank: int) -> tuple[int, int, int]:
    # bright hues a golden-ratio step apart, as lxm show: neighbouring labels differ, black text reads on each
    r, g, b = colorsys.hsv_to_rgb((rank * 0.618034) % 1.0, 0.55, 1.0)
    return int(255 * b), int(255 * g), int(255 * r)


def box_pixels(rec: ImageFeatures, scale: float, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """`rec`'s boxes (image pixels) on a picture of the image resized by `scale` to width x height: rounded,
    inside the picture, (x1, y1, x2, y2) inclusive."""
    out = []
    for b in rec.boxes:
        x1, y1, x2, y2 = (round(float(v) * scale) for v in b)
        out.append((min(max(x1, 0), width - 1), min(max(y1, 0), height - 1),
                    min(max(x2, 0), width - 1), min(max(y2, 0), height - 1)))
    return out


def label_top_boxes(pic: np.ndarray, rec: ImageFeatures, boxes: list[tuple[int, int, int, int]], weights,
                    *, top: int = 5, objects: list[str] | None = None, attributes: list[str] | None = None,
                    font: float = 0.6, thick: int = 1, image: int = 0
                    ) -> tuple[list[PlacedLabel], list[int], int]:
    """Outline the `top` boxes of `rec` with the largest `weights` on `pic` (in place; `boxes` are their pixel
    rectangles on it) and label them "attribute object weight", strongest first, with `place_label`
    (labels never overlap or leave the picture).

    Returns (the placed labels, `image` naming the picture, the boxes left without a label for want of room, the
    decimals of the labels: as many as tell the labelled weights, the range and 1/N apart)."""
    w = np.asarray(weights, dtype=np.float64)
    height, width = pic.shape[:2]
    order = [int(i) for i in np.argsort(-w, kind="stable")[:top]]
    digits = decimals([w[i] for i in order] + [w.min(), w.max(), 1.0 / w.size])  # the labels tell boxes apart
    for rank, i in enumerate(order):  # outlines first: no outline is drawn over a label
        cv2.rectangle(pic, boxes[i][:2], boxes[i][2:], label_colour(rank), thick + 1)
    taken: list = []
    placed: list[PlacedLabel] = []
    unlabelled: list[int] = []
    for rank, i in enumerate(order):
        if rec.objects_id[i] < 0:  # a backbone without labels (grid cells, patches): the cell's number
            att, obj = "", f"#{i}"
        else:
            obj = objects[rec.objects_id[i]] if objects else f"obj{rec.objects_id[i]}"
            att = attributes[rec.attrs_id[i]] if attributes else f"attr{rec.attrs_id[i]}"
        label, fs, (tw, th), base = fit_label(att, obj, f"{w[i]:.{digits}f}", font, thick, width)
        rect, away = place_label(tw + 2 * PAD, th + base + 2 * PAD, boxes[i], taken, width, height)
        if rect is None:
            unlabelled.append(i)
            continue
        taken.append(rect)
        if away:
            bx1, by1, bx2, by2 = boxes[i]
            to = nearest_point((bx1, by1, bx2 + 1, by2 + 1), (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2)
            cv2.line(pic, nearest_point(rect, *to), to, label_colour(rank), thick, cv2.LINE_AA)
        cv2.rectangle(pic, rect[:2], (rect[2] - 1, rect[3] - 1), label_colour(rank), -1)
        cv2.putText(pic, label, (rect[0] + PAD, rect[3] - PAD - base), FONT, fs, (0, 0, 0), thick, cv2.LINE_AA)
        placed.append(PlacedLabel(image, i, label, float(w[i]), rect, away))
    return placed, unlabelled, digits
