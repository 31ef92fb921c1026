"""Which boxes (and words) an answer drew on, by one of two methods, and a picture of it.

Methods (`EXPLAIN_METHODS`, `--explain-method`): "relevance" (the default) is the gradient-weighted relevance of
Chefer et al. (ICCV 2021) through every self- and co-attention layer (`lxm.infer.relevance`): each box's and each
word's share of the relevance for the chosen answer. "attention" is the raw attention described next, boxes only.
Relevance is drawn as attention is: each image's box relevance as shares of its total (so that "uniform" 1/N means
equal relevance), and in the title band each word of the question or statement shaded by its share (a word's
relevance is the sum of its word pieces'; NLVR2 adds the two images' rows).

The raw attention:

What is shown: in LXMERT every task head reads the pooled output, tanh(W h_[CLS]) of the language stream after the
last cross-modality layer (`LxmertPooler`); the only place where that [CLS] state reads the image directly in that
layer is the layer's cross-attention, language -> vision (`x_layers[-1].visual_attention`, one module shared by both
directions). Its attention probabilities from the [CLS] query over the N boxes, softmax(q_[CLS] . k_n / sqrt(d)) per
head, averaged over the heads, are the weights shown ([N], summing to 1). They say where [CLS] looked in that last
read, not a full attribution: the boxes also reach [CLS] through earlier layers and the self-attention after it.

They are an output of the model, not recomputed here: a forward with `output_attentions=True` returns each cross
layer's attention probabilities language -> vision (`LxmertOutput.cross_attentions`, [rows, heads, T, N], as
transformers' LXMERT `cross_encoder_attentions`), and `cls_to_boxes` takes the last layer's [CLS] row averaged over
the heads. `predict_explained` predicts a whole dataset that way (the gallery's boxes).

The picture (`render_attention`): the image (upscaled to a long side of at least 800 pixels, as `lxm show`),
darkened outside the boxes, each box brought back towards full brightness by its weight relative to uniform
attention 1/N (`shade_levels`: the strongest box full, a box at 1/N half, the weakest dark; the strongest drawn last,
on top), so that near-uniform attention still shows which boxes got more; the top boxes outlined and labelled
"attribute object weight" (with as many decimals as tell them apart) with the label placement of `lxm.extract.draw`
(next to the box, else at the nearest free place with a leader line; labels never overlap or leave the picture); a
title band with the question or statement, the answer with its probability, what the shading is, and per image the
weights' range and entropy (`weight_summary`: how far from uniform they are). NLVR2's two images stand side by side.
`lxm.extract.draw.label_top_boxes` draws the outlines and labels alone (the gallery's pictures, which are not shaded).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from lxm.extract.images import ImageError
from lxm.extract.draw import (FONT, LONG_SIDE, PAD, PlacedLabel, box_pixels, check_drawable, decimals,
                              label_top_boxes)
from lxm.features.records import ImageFeatures

if TYPE_CHECKING:
    from lxm.train.finetune_data import FinetuneDataset
    from lxm.train.tasks import FinetuneTask

_logger = logging.getLogger(__name__)

SHADE = 0.3  # brightness of the picture outside every box
GAP = 16  # pixels between the two images of an NLVR2 pair
ATTENTION_NOTE = ("shading: last cross layer, [CLS] -> boxes attention (mean over heads); brightest = max weight, "
                  "half = uniform 1/N, darkest = min weight")
RELEVANCE_NOTE = ("shading: each box's share of the relevance for the answer (Chefer et al. 2021: gradient x "
                  "attention, all layers); brightest = max, half = equal shares 1/N, darkest = min; words by share")
EXPLAIN_METHODS = ("relevance", "attention")  # what --explain-method takes; the first is the default
WORD_COLOUR = (0, 200, 255)  # BGR: the highlight behind a word at its largest share (amber)


# ---------------------------------------------------------------------------------------------------- weights


def cls_to_boxes(out) -> Tensor:
    """[rows, N] float32: per row of the batch (one image of an example), the [CLS] query's attention over the N
    boxes in the last cross layer, language -> vision, averaged over the heads.

    `out` is the model's output of a forward with `output_attentions=True` (`LxmertOutput.cross_attentions`, one
    [rows, heads, T, N] tensor of attention probabilities per cross layer); each row sums to 1, and a box that
    `visual_attention_mask` masks out gets 0 (it is masked in the softmax)."""
    attentions = getattr(out, "cross_attentions", None)
    if not attentions:
        raise ValueError("cls_to_boxes: the output holds no cross attentions; call the model with "
                         "output_attentions=True")
    return attentions[-1][:, :, 0, :].float().mean(dim=1)


def check_method(method: str) -> None:
    if method not in EXPLAIN_METHODS:
        raise ValueError(f"explain method must be one of {', '.join(EXPLAIN_METHODS)}, got {method!r}")


def shares(weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """[rows, S] non-negative weights -> each row as shares of its total (a row of zeros: equal shares). `mask`
    [rows, S] (1 = a real box, 0 = padding: `visual_attention_mask`): padding gets 0 and no share."""
    weights = weights.float()
    if mask is not None:
        keep = mask.to(weights.device, weights.dtype)
        weights = weights * keep
    else:
        keep = torch.ones_like(weights)
    total = weights.sum(dim=-1, keepdim=True)
    equal = keep / keep.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return torch.where(total > 0, weights / total.clamp(min=torch.finfo(weights.dtype).tiny), equal)


def row_weights(boxes: Tensor, mask: Tensor | None) -> list[np.ndarray]:
    """`explain_batch`'s [rows, N] box weights as one float32 array a row, each cut to its image's real boxes (a
    batch of images with fewer boxes than its most pads them at the end; `mask` is its `visual_attention_mask`)."""
    weights = boxes.float().cpu().numpy()
    if mask is None:
        return list(weights)
    counts = mask.sum(dim=-1).long().cpu().tolist()
    return [w[:k] for w, k in zip(weights, counts)]


def explain_batch(task: FinetuneTask, model: nn.Module, inputs: dict[str, Tensor], method: str = "relevance"
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One batch explained: (the task's logits [examples, classes], the boxes' weights [rows, N] summing to 1 per
    row, the text positions' relevance [rows, T] or None for "attention"). A row is one image of an example; a padded
    box (`visual_attention_mask` 0) gets 0 (`row_weights` cuts the rows to their real boxes).

    "attention": a forward under no_grad with `output_attentions=True`, `cls_to_boxes`. "relevance": a forward with
    autograd on (the attention maps' gradients only; `lxm.infer.relevance.answer_relevance`) for each example's most
    probable prediction, boxes as `shares` of each row's relevance."""
    check_method(method)
    model.eval()
    mask = inputs.get("visual_attention_mask")  # padded boxes (images of fewer boxes than the batch's most)
    if method == "attention":
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
            weights = cls_to_boxes(out)  # rows sum to 1; with padding, over the real boxes (masked softmax)
            return task.logits(out), (weights if mask is None else shares(weights, mask)), None
    from lxm.infer.relevance import answer_relevance

    rel = answer_relevance(model, inputs, task.logits)
    return rel.logits, shares(rel.boxes, mask), rel.words


def predict_explained(task: FinetuneTask, model: nn.Module, dataset: FinetuneDataset, k: int = 5, *,
                      batch_size: int = 256, device: torch.device | str = "cpu", precision: str = "fp32",
                      method: str = "relevance"
                      ) -> dict[Any, tuple[list[tuple[str, float]], list[np.ndarray], list[tuple[str, float]] | None]]:
    """id -> (the k most probable predictions [(prediction string, probability)], best first, as
    `lxm.infer.runs.predict_top`; per image of the example, in the task's image column order, its [N] float32 box
    weights by `method` (`explain_batch`); "relevance": the words of its text with their shares (`word_shares`),
    else None), for every example of a `FinetuneDataset`.

    The batches, the eval mode and autocast are those of `lxm.infer.runs.batch_logits`, so the first prediction is
    `lxm predict`'s. The model is asked for its attentions (`output_attentions=True`), which it writes out rather
    than calling SDPA: probabilities may differ from `predict_top`'s in the last digits."""
    from torch.utils.data import DataLoader

    from lxm.train.finetune_data import collate_finetune
    from lxm.train.precision import autocast

    check_method(method)
    model.eval()
    device = torch.device(device)
    per = len(task.image_columns)
    found: dict = {}
    texts = dict(zip(dataset.ids, dataset.texts))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_finetune)
    for batch in loader:
        batch = batch.to(device)
        with autocast(precision, device.type):
            inputs = batch.model_inputs()
            logits, boxes, positions = explain_batch(task, model, inputs, method)
        with torch.no_grad():
            tops = task.top(logits, k)
        weights = row_weights(boxes, inputs.get("visual_attention_mask"))  # row = (example, image), as collated
        for n, (i, top) in enumerate(zip(batch.ids, tops)):
            words = None
            if positions is not None:  # an example's rows (NLVR2: one per image) add up
                words = word_shares(dataset.tokenizer, texts[i],
                                    positions[n * per:(n + 1) * per].float().sum(0).cpu().numpy())
            found[i] = (top, [weights[n * per + j] for j in range(per)], words)
    return found


def word_shares(tokenizer, text: str, positions: np.ndarray) -> list[tuple[str, float]]:
    """The words of `text` (split at white space, as shown) with their shares of the relevance: a word's relevance
    is the sum of its word pieces' (`positions` [T]: per text position of the model's input, [CLS] first); words
    past the model's max_length get 0, as do all when nothing is relevant.

    BERT's tokenizer splits at white space before anything else, so the pieces of the words one by one are the
    pieces of the text in order."""
    words = text.split()
    counts = [len(tokenizer.tokenize(w)) for w in words]
    keep = tokenizer.max_length - 2  # the pieces between [CLS] and [SEP]
    values, start = [], 1
    for c in counts:
        end = min(start + c, 1 + keep)
        values.append(float(np.asarray(positions[start:end], dtype=np.float64).sum()) if start < end else 0.0)
        start += c
    total = sum(values)
    return [(w, v / total if total > 0 else 0.0) for w, v in zip(words, values)]


# ---------------------------------------------------------------------------------------------------- picture


@dataclass
class AttentionPicture:
    image: np.ndarray  # [H, W, 3] BGR
    labels: list[PlacedLabel] = field(default_factory=list)
    title: list[str] = field(default_factory=list)  # the lines of the title band
    title_height: int = 0  # pixels of the band above the image(s)
    panels: list[tuple[int, int, int, int]] = field(default_factory=list)  # each image's rect in the picture
    unlabelled: list[tuple[int, int]] = field(default_factory=list)  # (image, box) of top boxes left without label


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


def _shaded_lines(prefix: str, words: list[tuple[str, float]], width: int, scale: float, thick: int
                  ) -> list[list[tuple[str, float | None]]]:
    """`prefix` then the words, greedily wrapped to `width` pixels: lines of (text, share; None for the prefix)."""
    space = cv2.getTextSize(" ", FONT, scale, thick)[0][0]
    lines: list[list[tuple[str, float | None]]] = [[(prefix, None)]]
    used = cv2.getTextSize(prefix, FONT, scale, thick)[0][0]
    for word, share in words:
        w = cv2.getTextSize(word, FONT, scale, thick)[0][0]
        if used + space + w > width and used > 0:
            lines.append([])
            used = 0
        lines[-1].append((word, share))
        used += (space if used else 0) + w
    return lines


def _draw_shaded(canvas: np.ndarray, segments: list[tuple[str, float | None]], x: int, baseline: int, scale: float,
                 thick: int, colour: tuple[int, int, int], top_share: float) -> None:
    """One title line: each word on a highlight from white to WORD_COLOUR by its share relative to the largest."""
    space = cv2.getTextSize(" ", FONT, scale, thick)[0][0]
    for k, (text, share) in enumerate(segments):
        (w, h), base = cv2.getTextSize(text, FONT, scale, thick)
        if k:
            x += space
        if share is not None and top_share > 0:
            level = share / top_share
            fill = tuple(int(round(255 + level * (c - 255))) for c in WORD_COLOUR)
            cv2.rectangle(canvas, (x - 2, baseline - h - 3), (x + w + 2, baseline + base), fill, -1)
        cv2.putText(canvas, text, (x, baseline), FONT, scale, colour, thick, cv2.LINE_AA)
        x += w


def render_attention(images_bgr: list[np.ndarray], records: list[ImageFeatures], weights: list[np.ndarray],
                     text: str, answer: str, *, kind: str = "Q", objects: list[str] | None = None,
                     attributes: list[str] | None = None, top: int = 5, long_side: int = LONG_SIDE,
                     method: str = "attention", words: list[tuple[str, float]] | None = None) -> AttentionPicture:
    """The attention picture of one request (see the module docstring).

    Args:
        images_bgr: the request's images (one, or NLVR2's two), as decoded from their files.
        records: their features (boxes in image pixels, object / attribute ids).
        weights: per image the [N] box weights summing to 1 (`explain_batch`).
        text: the question or statement; `kind` its title prefix ("Q" / "S").
        method: what the weights are ("relevance" / "attention"), said in the title band's note.
        words: the text's words with their relevance shares (`word_shares`): the question line is drawn word by
            word, each on a highlight by its share; None: plain text.
        answer: the answer line, e.g. "frisbee (0.87)".
        objects, attributes: class names (`lxm.extract.draw.read_names`); ids ("obj12", "attr3") without them.
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
        boxes = box_pixels(rec, scale, width, height)
        w = np.asarray(w, dtype=np.float64)
        pic = _shade(pic, boxes, w)
        labels, missed, digits = label_top_boxes(pic, rec, boxes, w, top=top, objects=objects,
                                                 attributes=attributes, font=font, thick=thick, image=k)
        summaries.append(weight_summary(w, digits))
        placed += labels
        unlabelled += [(k, i) for i in missed]
        panels.append(pic)
    total_w = sum(p.shape[1] for p in panels) + GAP * (len(panels) - 1)
    # the title band: the text and the answer in a larger font, the note on the shading in a smaller grey one
    title_font, title_thick = 0.85 * max(1.0, size), max(2, round(1.5 * size))
    note_font = 0.55 * max(1.0, size)
    check_method(method)
    # (text, font, thickness, colour, the words with their shares when the line is shaded word by word)
    lines: list[tuple[str, float, int, tuple[int, int, int], list | None]]
    if words is not None:
        lines = [(" ".join(t for t, _ in seg), title_font, title_thick, (0, 0, 0), seg) for seg in
                 _shaded_lines(f"{kind}:", words, total_w - 4 * PAD, title_font, title_thick)]
    else:
        lines = [(line, title_font, title_thick, (0, 0, 0), None) for line in
                 _wrap(f"{kind}: {text}", total_w - 4 * PAD, title_font, title_thick)]
    lines += [(line, title_font, title_thick, (0, 0, 140), None) for line in
              _wrap(f"A: {answer}", total_w - 4 * PAD, title_font, title_thick)]
    note = RELEVANCE_NOTE if method == "relevance" else ATTENTION_NOTE
    lines += [(line, note_font, thick, (90, 90, 90), None) for line in
              _wrap(note, total_w - 4 * PAD, note_font, thick)]
    sides = ["left: ", "right: "] if len(summaries) == 2 else [""] * len(summaries)
    for side, summary in zip(sides, summaries):
        lines += [(line, note_font, thick, (90, 90, 90), None) for line in
                  _wrap(side + summary, total_w - 4 * PAD, note_font, thick)]
    heights = [cv2.getTextSize(t, FONT, f, th)[0][1] + cv2.getTextSize(t, FONT, f, th)[1] + 3 * PAD
               for t, f, th, *_ in lines]
    band = sum(heights) + 4 * PAD
    canvas = np.full((band + height, total_w, 3), 255, np.uint8)
    top_share = max((share for _, share in words or []), default=0.0)
    y = 2 * PAD
    for (t, f, th, colour, segments), lh in zip(lines, heights):
        base = cv2.getTextSize(t, FONT, f, th)[1]
        if segments is not None:
            _draw_shaded(canvas, segments, 2 * PAD, y + lh - base - PAD, f, th, colour, top_share)
        else:
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
