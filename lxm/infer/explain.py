"""Which boxes an answer drew on: the last cross layer's [CLS] -> vision attention, and a picture of it.

What is shown: in LXMERT every task head reads the pooled output, tanh(W h_[CLS]) of the language stream after the
last cross-modality layer (`LxmertPooler`); the only place where that [CLS] state reads the image directly in that
layer is the layer's cross-attention, language -> vision (`x_layers[-1].visual_attention`, one module shared by both
directions). Its attention probabilities from the [CLS] query over the N boxes, softmax(q_[CLS] . k_n / sqrt(d)) per
head, averaged over the heads, are the weights shown ([N], summing to 1). They say where [CLS] looked in that last
read, not a full attribution: the boxes also reach [CLS] through earlier layers and the self-attention after it.

They are computed from the layer's inputs, kept by a forward pre-hook on the layer: the [CLS] rows of the language
stream through the query projection and the vision rows through the key projection (`att.query`, `att.key`, the
modules whose weights `LxmertCrossAttentionLayer.both_ways` applies, fused with the value projection, to the
stacked sequence [language rows; vision rows]); the hook only reads, so the logits are unchanged.

The picture (`render_attention`): the image (upscaled to a long side of at least 800 pixels, as `lxm show`),
darkened outside the boxes, each box brought back towards full brightness by its weight relative to uniform
attention 1/N (`shade_levels`: the strongest box full, a box at 1/N half, the weakest dark; the strongest drawn last,
on top), so that near-uniform attention still shows which boxes got more; the top boxes outlined and labelled
"attribute object weight" (with as many decimals as tell them apart) with the label placement of `lxm.extract.show`
(next to the box, else at the nearest free place with a leader line; labels never overlap or leave the picture); a
title band with the question or statement, the answer with its probability, what the shading is, and per image the
weights' range and entropy (`weight_summary`: how far from uniform they are). NLVR2's two images stand side by side.
"""

from __future__ import annotations

import colorsys
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from lxm.errors import ConfigError
from lxm.extract.images import ImageError
from lxm.extract.show import FONT, LONG_SIDE, PAD, _nearest, _place, check_drawable, fit_names, load_vocab
from lxm.features.records import ImageFeatures

_logger = logging.getLogger(__name__)

SHADE = 0.3  # brightness of the picture outside every box
GAP = 16  # pixels between the two images of an NLVR2 pair
ATTENTION_NOTE = ("shading: last cross layer, [CLS] -> boxes attention (mean over heads); brightest = max weight, "
                  "half = uniform 1/N, darkest = min weight")


# ---------------------------------------------------------------------------------------------------- capture


class CrossAttentionCapture:
    """Forward hooks on the last cross layer of `model` that keep what `cls_to_vision` needs; a context manager
    (the hooks are removed on exit)."""

    def __init__(self, model: nn.Module):
        self.layer = model.lxmert.encoder.x_layers[-1]
        self.att = self.layer.visual_attention.att
        self.inputs: tuple | None = None
        self._handles: list = []

    def __enter__(self) -> CrossAttentionCapture:
        def keep_inputs(_module, args):
            lang, _lang_mask, visn, visn_mask, layout = args[:5]  # then lang_queries (last layer)
            self.inputs = (lang.detach(), visn.detach(), visn_mask, layout)

        self._handles = [self.layer.register_forward_pre_hook(keep_inputs)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def cls_to_vision(self) -> Tensor:
        """[rows, N] float32: per batch row (an example's image), the [CLS] query's attention over the boxes,
        averaged over heads (each row sums to 1)."""
        if self.inputs is None:
            raise RuntimeError("CrossAttentionCapture: no forward pass ran inside the context")
        lang, visn, visn_mask, layout = self.inputs
        (b, n, _), heads, dim = visn.shape, self.att.num_heads, self.att.head_dim
        with torch.no_grad():
            q_cls = self.att.query(layout.padded(lang)[:, 0]).float().view(b, heads, dim)  # [B, heads, d]
            k = self.att.key(visn).float().view(b, n, heads, dim)  # [B, N, heads, d]
        return cls_attention(q_cls, k, visn_mask)


def cls_attention(q_cls: Tensor, k: Tensor, visn_mask: Tensor | None = None) -> Tensor:
    """q_cls [B, heads, d], k [B, N, heads, d] (projected), optional bool "may attend" mask [B, 1, 1, N] ->
    softmax(q . k / sqrt(d)) per head, averaged over heads: [B, N]."""
    scores = torch.einsum("bhd,bnhd->bhn", q_cls, k) / math.sqrt(q_cls.shape[-1])
    if visn_mask is not None:
        scores = scores.masked_fill(~visn_mask[:, :, 0, :].to(torch.bool), float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)


# ---------------------------------------------------------------------------------------------------- picture


@dataclass
class PlacedLabel:
    image: int  # which image of the request (NLVR2: 0 left, 1 right)
    box: int  # index of the box in that image's record
    text: str
    weight: float
    rect: tuple[int, int, int, int]  # x1, y1, x2, y2 in picture pixels, end exclusive
    leader: bool  # placed away from its box, with a line to it


@dataclass
class AttentionPicture:
    image: np.ndarray  # [H, W, 3] BGR
    labels: list[PlacedLabel] = field(default_factory=list)
    title: list[str] = field(default_factory=list)  # the lines of the title band
    title_height: int = 0  # pixels of the band above the image(s)
    panels: list[tuple[int, int, int, int]] = field(default_factory=list)  # each image's rect in the picture
    unlabelled: list[tuple[int, int]] = field(default_factory=list)  # (image, box) of top boxes left without label


def read_names(vocab_dir: str | os.PathLike | None, classes: tuple[int, int] | None = None
               ) -> tuple[list[str] | None, list[str] | None]:
    """(object names, attribute names) from a folder with BUTD's objects_vocab.txt / attributes_vocab.txt; (None,
    None), so ids, with a logged warning when they are not the vocabulary of the detector with `classes` = (object
    classes, attributes) (`lxm.extract.show.fit_names`)."""
    if vocab_dir is None:
        return None, None
    folder = Path(vocab_dir)
    names = []
    for file in ("objects_vocab.txt", "attributes_vocab.txt"):
        if not (folder / file).is_file():
            raise ConfigError(f"{folder}: no {file} (the detector's class names, as in BUTD's data/genome/1600-400-20)")
        names.append(load_vocab(folder / file))
    return fit_names(names[0], names[1], classes, option=f"--vocab-dir {folder}", strict=False)


def _wrap(text: str, width: int, scale: float, thick: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than a line is cut)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if cv2.getTextSize(trial, FONT, scale, thick)[0][0] <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
        while cv2.getTextSize(line, FONT, scale, thick)[0][0] > width and len(line) > 1:
            cut = len(line) - 1
            while cut > 1 and cv2.getTextSize(line[:cut], FONT, scale, thick)[0][0] > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    if line:
        lines.append(line)
    return lines


def shade_levels(weights: np.ndarray) -> np.ndarray:
    """How much of each box is brought back to full brightness (0..1), relative to uniform attention 1/N: the
    strongest box 1, a box at exactly 1/N one half, the weakest 0, linear in between on each side of 1/N.

    Alpha = weight / max weight (the first drawing) made every box of near-uniform attention (all about 1/36) equally
    bright; measured from 1/N, a difference of 1e-3 between two boxes is as visible as a large one, and the title's
    range and entropy say how far from uniform the weights are."""
    w = np.asarray(weights, dtype=np.float64)
    if not w.size:
        return w
    uniform, hi, lo = 1.0 / w.size, float(w.max()), float(w.min())
    above = 0.5 + 0.5 * (w - uniform) / (hi - uniform) if hi > uniform else np.full_like(w, 0.5)
    below = 0.5 - 0.5 * (uniform - w) / (uniform - lo) if lo < uniform else np.full_like(w, 0.5)
    return np.clip(np.where(w >= uniform, above, below), 0.0, 1.0)


def decimals(values, least: int = 3, most: int = 8) -> int:
    """The fewest decimals (at least `least`) that print distinct values distinctly (at most `most`)."""
    values = [float(v) for v in values]
    for d in range(least, most):
        if len({f"{v:.{d}f}" for v in values}) == len(set(values)):
            return d
    return most


def weight_summary(weights: np.ndarray, digits: int | None = None) -> str:
    """The title line of one image's weights: their range, uniform 1/N and the entropy (also as a fraction of
    ln N, the entropy of uniform attention: 1.000 = uniform, near 0 = one box)."""
    w = np.asarray(weights, dtype=np.float64)
    n = w.size
    digits = digits or decimals([w.min(), w.max(), 1.0 / n])
    p = w[w > 0]
    entropy = max(0.0, float(-(p * np.log(p)).sum()))  # never "-0.000" for one box holding all
    norm = entropy / math.log(n) if n > 1 else 1.0
    return (f"weights min {w.min():.{digits}f} max {w.max():.{digits}f} (uniform 1/{n} = {1.0 / n:.{digits}f}); "
            f"entropy {entropy:.3f} nats = {norm:.3f} of uniform")


def _shade(image: np.ndarray, boxes: list[tuple[int, int, int, int]], weights: np.ndarray) -> np.ndarray:
    """Darken the image, then bring each box back by its `shade_levels` alpha, weakest first."""
    out = image.astype(np.float32) * SHADE
    levels = shade_levels(weights)
    for i in np.argsort(weights, kind="stable"):
        x1, y1, x2, y2 = boxes[i]
        alpha = float(levels[i])
        region = out[y1:y2 + 1, x1:x2 + 1]
        region[:] = alpha * image[y1:y2 + 1, x1:x2 + 1] + (1 - alpha) * region
    return np.clip(out, 0, 255).astype(np.uint8)


def _colour(rank: int) -> tuple[int, int, int]:
    # bright hues a golden-ratio step apart, as lxm show: neighbouring labels differ, black text reads on each
    r, g, b = colorsys.hsv_to_rgb((rank * 0.618034) % 1.0, 0.55, 1.0)
    return int(255 * b), int(255 * g), int(255 * r)


def render_attention(images_bgr: list[np.ndarray], records: list[ImageFeatures], weights: list[np.ndarray],
                     text: str, answer: str, *, kind: str = "Q", objects: list[str] | None = None,
                     attributes: list[str] | None = None, top: int = 5, long_side: int = LONG_SIDE
                     ) -> AttentionPicture:
    """The attention picture of one request (see the module docstring).

    Args:
        images_bgr: the request's images (one, or NLVR2's two), as decoded from their files.
        records: their features (boxes in image pixels, object / attribute ids).
        weights: per image the [N] box weights (`CrossAttentionCapture.cls_to_vision`).
        text: the question or statement; `kind` its title prefix ("Q" / "S").
        answer: the answer line, e.g. "frisbee (0.87)".
        objects, attributes: class names (`read_names`); ids ("obj12", "attr3") without them.
        top: boxes outlined and labelled per image, by weight.
    """
    for img, rec in zip(images_bgr, records):
        check_drawable(img, rec, objects, attributes, option="--vocab-dir")
    # one height for all images: the largest any of them gets from the long-side rule of lxm show
    height = max(round(r.img_h * max(1.0, long_side / max(r.img_h, r.img_w))) for r in records)
    scales = [height / r.img_h for r in records]
    size = max(sum(round(r.img_w * s) for r, s in zip(records, scales)), height) / LONG_SIDE
    font, thick = 0.6 * max(1.0, size), max(1, round(size))
    panels, placed, unlabelled, summaries = [], [], [], []
    for k, (img, rec, w, scale) in enumerate(zip(images_bgr, records, weights, scales)):
        width = round(rec.img_w * scale)
        pic = cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
        boxes = []
        for b in rec.boxes:
            x1, y1, x2, y2 = (round(float(v) * scale) for v in b)
            boxes.append((min(max(x1, 0), width - 1), min(max(y1, 0), height - 1),
                          min(max(x2, 0), width - 1), min(max(y2, 0), height - 1)))
        w = np.asarray(w, dtype=np.float64)
        pic = _shade(pic, boxes, w)
        order = [int(i) for i in np.argsort(-w, kind="stable")[:top]]
        digits = decimals([w[i] for i in order] + [w.min(), w.max(), 1.0 / w.size])  # the labels tell boxes apart
        summaries.append(weight_summary(w, digits))
        for rank, i in enumerate(order):  # outlines first: no outline is drawn over a label
            cv2.rectangle(pic, boxes[i][:2], boxes[i][2:], _colour(rank), thick + 1)
        taken: list = []
        for rank, i in enumerate(order):
            obj = objects[rec.objects_id[i]] if objects else f"obj{rec.objects_id[i]}"
            att = attributes[rec.attrs_id[i]] if attributes else f"attr{rec.attrs_id[i]}"
            label, fs = f"{att} {obj} {w[i]:.{digits}f}", font
            (tw, th), base = cv2.getTextSize(label, FONT, fs, thick)
            while tw + 2 * PAD > width and fs > 0.3:  # narrower first, then shortened: never cut by the border
                fs *= 0.9
                (tw, th), base = cv2.getTextSize(label, FONT, fs, thick)
            while tw + 2 * PAD > width and len(obj) > 1:
                obj = obj[:-1]
                label = f"{att} {obj}... {w[i]:.{digits}f}"
                (tw, th), base = cv2.getTextSize(label, FONT, fs, thick)
            rect, away = _place(tw + 2 * PAD, th + base + 2 * PAD, boxes[i], taken, width, height)
            if rect is None:
                unlabelled.append((k, i))
                continue
            taken.append(rect)
            if away:
                bx1, by1, bx2, by2 = boxes[i]
                to = _nearest((bx1, by1, bx2 + 1, by2 + 1), (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2)
                cv2.line(pic, _nearest(rect, *to), to, _colour(rank), thick, cv2.LINE_AA)
            cv2.rectangle(pic, rect[:2], (rect[2] - 1, rect[3] - 1), _colour(rank), -1)
            cv2.putText(pic, label, (rect[0] + PAD, rect[3] - PAD - base), FONT, fs, (0, 0, 0), thick, cv2.LINE_AA)
            placed.append(PlacedLabel(k, i, label, float(w[i]), rect, away))
        panels.append(pic)
    total_w = sum(p.shape[1] for p in panels) + GAP * (len(panels) - 1)
    # the title band: the text and the answer in a larger font, the note on the shading in a smaller grey one
    title_font, title_thick = 0.85 * max(1.0, size), max(2, round(1.5 * size))
    note_font = 0.55 * max(1.0, size)
    lines = [(line, title_font, title_thick, (0, 0, 0)) for line in
             _wrap(f"{kind}: {text}", total_w - 4 * PAD, title_font, title_thick)]
    lines += [(line, title_font, title_thick, (0, 0, 140)) for line in
              _wrap(f"A: {answer}", total_w - 4 * PAD, title_font, title_thick)]
    lines += [(line, note_font, thick, (90, 90, 90)) for line in
              _wrap(ATTENTION_NOTE, total_w - 4 * PAD, note_font, thick)]
    sides = ["left: ", "right: "] if len(summaries) == 2 else [""] * len(summaries)
    for side, summary in zip(sides, summaries):
        lines += [(line, note_font, thick, (90, 90, 90)) for line in
                  _wrap(side + summary, total_w - 4 * PAD, note_font, thick)]
    heights = [cv2.getTextSize(t, FONT, f, th)[0][1] + cv2.getTextSize(t, FONT, f, th)[1] + 3 * PAD
               for t, f, th, _ in lines]
    band = sum(heights) + 4 * PAD
    canvas = np.full((band + height, total_w, 3), 255, np.uint8)
    y = 2 * PAD
    for (t, f, th, colour), lh in zip(lines, heights):
        base = cv2.getTextSize(t, FONT, f, th)[1]
        cv2.putText(canvas, t, (2 * PAD, y + lh - base - PAD), FONT, f, colour, th, cv2.LINE_AA)
        y += lh
    x, rects = 0, []
    for k, pic in enumerate(panels):
        canvas[band:band + height, x:x + pic.shape[1]] = pic
        rects.append((x, band, x + pic.shape[1], band + height))
        for label in placed:
            if label.image == k:
                r = label.rect
                label.rect = (r[0] + x, r[1] + band, r[2] + x, r[3] + band)
        x += pic.shape[1] + GAP
    if unlabelled:
        _logger.warning("no room for the labels of %d top boxes (drawn without)", len(unlabelled))
    return AttentionPicture(canvas, placed, [t for t, *_ in lines], band, rects, unlabelled)


def write_png(picture: AttentionPicture, path: str | os.PathLike) -> Path:
    """Write the picture as PNG (its folder is created)."""
    from lxm.atomic import atomic_path

    path = Path(path)
    ok, data = cv2.imencode(".png", picture.image)
    if not ok:
        raise ImageError(f"{path}: the picture could not be encoded as PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
    return path
