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
  the object confidence (the demo shows names only, and drops the attribute below 0.1 confidence; we always show it);
- a label-less record (`grid` cells, `timm:` patches: every id NO_LABEL) is drawn as its cells, thin outlines in
  turning hues, without labels.
"""

from __future__ import annotations

import colorsys
import logging
from dataclasses import dataclass, field

import cv2
import numpy as np

from lxm.extract.draw import (FONT, FONT_SCALE, LONG_SIDE, PAD, box_pixels, check_drawable, fit_label, nearest_point,
                              place_label)
from lxm.features.records import NO_LABEL, ImageFeatures

_logger = logging.getLogger(__name__)



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
    boxes = box_pixels(rec, scale, width, height)
    labelled = bool((rec.objects_id != NO_LABEL).any())
    for i in order:  # cells tile the image: thin lines keep it visible
        cv2.rectangle(out, boxes[int(i)][:2], boxes[int(i)][2:], colors[int(i)], thick + 1 if labelled else 1)
    drawing = Drawing(out, scale)
    if not labelled:
        return drawing
    taken: list = []
    for i in (int(k) for k in order):
        obj = objects[rec.objects_id[i]] if objects else f"obj{rec.objects_id[i]}"
        att = attributes[rec.attrs_id[i]] if attributes else f"attr{rec.attrs_id[i]}"
        text, fs, (tw, th), base = fit_label(att, obj, f"{rec.objects_conf[i]:.2f}", font_scale, thick, width)
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
