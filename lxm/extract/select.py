"""Choosing the fixed number of regions per image from the detector's proposals.

Mode "lxmert" reproduces the Caffe `generate_tsv` / `get_detections_from_im` logic that made LXMERT's released
`*_obj36.tsv` files (airsplay/lxmert `data/mscoco_imgfeat/extract_coco_image.py`; detector spec §2.1):
per-class NMS at 0.3 over the UNREGRESSED proposals for each of the 1600 object classes, a proposal's score is its
best class probability among the classes whose NMS it survives, keep scores >= 0.2, then exactly `num_boxes` by
score (padding with lower-scored proposals when fewer pass). The 1600 NMS runs of every image of a batch are done at
once: one IoU matrix per image, then one greedy sweep over score ranks for all classes of all images together (no
Python loop over classes or images; `nms_max_conf`).

NMS follows py-faster-rcnn's `cpu_nms` (`USE_GPU_NMS: False` in faster_rcnn_end2end_resnet.yml): inclusive-pixel
areas (+1), float32 arithmetic, suppress when IoU >= thr.

Equal scores are ranked as the original ranks them. It ranks with `np.argsort(x)[::-1]` twice: in `cpu_nms`
(`scores.argsort()[::-1]`, float32, once per class) and for the boxes (`np.argsort(max_conf)[::-1]`, float64).
Ties are common: ROIPool snaps proposals to the stride-16 grid, so distinct proposals that snap to the same cells
get bit-identical features and class probabilities, in every class at once. The released sample has such a pair
(COCO_train2014_000000207647, rows 29 and 33: two different boxes, equal features, "ball" at 0.22244039). When the
two overlap, which one comes first decides which one each class keeps, and so both boxes' max_conf. numpy's default
argsort is an introsort and not stable: spans of at most 16 are insertion-sorted (stable, so `[::-1]` puts the
higher index first), longer ones are partitioned around a median of three, after which equal values come out in an
order set by the data (on 300 proposals a tied pair comes out higher index first about half the time). This module
reproduces that order exactly (`caffe_descending`, checked by the tests against the algorithm written out).

Deliberate differences from `get_detections_from_im`: the 1600 NMS runs are one vectorised sweep (same result);
max_conf is float32, not float64 (it only ever holds float32 probabilities, so it ranks the same).

Mode "maxnms" reproduces airsplay/py-bottom-up-attention `demo/detectron2_mscoco_proposal_maxnms.py` (spec §2.2):
class-agnostic NMS over each proposal's regressed max-class box at 0.3, 0.4, ... 0.9 until enough survive, with
the stale-variable bug fixed and a guaranteed `num_boxes` rows (filled from the remaining proposals by score).

Probabilities use Caffe's layout: column 0 is background / "no attribute".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

LXMERT_NMS = 0.3  # cfg.TEST.NMS of faster_rcnn_end2end_resnet.yml, not overridden by the extraction script
LXMERT_CONF = 0.2  # conf_thresh in get_detections_from_im
LXMERT_BOXES = 36  # MIN_BOXES = MAX_BOXES = 36: the "36-box" features
MAXNMS_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Selection:
    """The chosen regions of one image, in output order. K = number of chosen regions."""

    indices: Tensor  # [K] long: proposal indices (rows of the detector's per-proposal outputs)
    boxes: Tensor  # [K, 4] float: x1, y1, x2, y2 (proposals for "lxmert", regressed boxes for "maxnms")
    objects_id: Tensor  # [K] long: argmax over the object classes, background excluded (0-based)
    objects_conf: Tensor  # [K] float: that class's probability in the softmax incl. background
    attrs_id: Tensor  # [K] long: argmax over attributes, "no attribute" excluded (0-based)
    attrs_conf: Tensor  # [K] float
    score: Tensor  # [K] float: the score the selection ranked by (max_conf for "lxmert")


def caffe_descending(values: np.ndarray) -> np.ndarray:
    """`np.argsort(values)[::-1]` along the last axis, equal values in the order the original extraction gave them.

    That order is numpy's introsort (`aquicksort_`), the default argsort of every numpy up to 1.24. Since 1.25 numpy
    hands float32/float64 argsorts to SIMD sorts where the CPU has them (x86-simd-sort: AVX-512, and AVX2 since 2.0),
    which order ties differently again, so `np.argsort` here may not be the original's. Long doubles still go through
    the introsort in every numpy release, and casting float32/float64 to them is exact and keeps every comparison.
    Cost: ~30 ms of CPU for [1600, 300] (only classes with ties come here).
    """
    order = np.argsort(np.asarray(values).astype(np.longdouble), axis=-1, kind="quicksort")
    return np.ascontiguousarray(order[..., ::-1])


def caffe_iou(boxes: Tensor) -> Tensor:
    """[..., R, 4] -> [..., R, R] IoU with inclusive-pixel areas, in float32 exactly as cpu_nms computes it."""
    b = boxes.float()
    x1, y1, x2, y2 = b.unbind(-1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    w = (torch.minimum(x2[..., :, None], x2[..., None, :]) - torch.maximum(x1[..., :, None], x1[..., None, :])
         + 1).clamp(min=0)
    h = (torch.minimum(y2[..., :, None], y2[..., None, :]) - torch.maximum(y1[..., :, None], y1[..., None, :])
         + 1).clamp(min=0)
    inter = w * h
    return inter / (areas[..., :, None] + areas[..., None, :] - inter)


def greedy_sweep(order: Tensor, overlap: Tensor, image: Tensor, ranks: int) -> Tensor:
    """Greedy NMS of many rankings at once: row i ranks the proposals of image `image[i]` in `order[i]`.

    Args:
        order: [rows, R] long: proposal indices, best first.
        overlap: [B, R, R] bool: proposal a suppresses b (IoU >= threshold, diagonal and padding False).
        image: [rows] long: the image of each row.
        ranks: how many ranks to visit (the later ones cannot change any score, see `nms_max_conf`).
    Returns:
        [rows, R] bool: kept[i, p] for proposal p in row i.
    """
    rows, r = order.shape
    row = torch.arange(rows, device=order.device)
    suppressed = torch.zeros(rows, r, dtype=torch.bool, device=order.device)
    kept = torch.zeros(rows, r, dtype=torch.bool, device=order.device)
    for k in range(ranks):
        idx = order[:, k]  # [rows] the proposal at rank k in each row
        alive = ~suppressed[row, idx]
        kept[row, idx] = alive
        suppressed |= alive[:, None] & overlap[image, idx]
    return kept


def order_matters(values: Tensor, order: Tensor, overlap: Tensor, image: Tensor) -> Tensor:
    """Which rankings' greedy NMS could change if equal scores came in another order: [rows] bool.

    Equal positive scores form a run of consecutive ranks (a tie group). Swapping two neighbours that do not overlap
    changes nothing (neither can suppress the other, and what is kept before and after them is the same), so a
    group none of whose members overlap another gives one result in every order. Rows with a group of two
    overlapping members (proposals that ROIPool snapped to the same cells: near-identical boxes, equal scores in every
    class) are returned True and take the original's order (`caffe_descending`); zero scores are never visited.

    Args:
        values: [rows, R] the scores in `order` (descending).
        order, overlap, image: as `greedy_sweep`.
    """
    rows, r = values.shape
    matters = torch.zeros(rows, dtype=torch.bool, device=values.device)
    if rows == 0 or r < 2:
        return matters
    equal = (values[:, 1:] == values[:, :-1]) & (values[:, 1:] > 0)  # rank k+1 ties rank k
    tied = equal.any(1).nonzero().squeeze(1)
    if tied.numel() == 0:
        return matters
    equal, order = equal[tied], order[tied]
    rank = torch.arange(r, device=values.device)
    starts = torch.ones(tied.numel(), r, dtype=torch.bool, device=values.device)
    starts[:, 1:] = ~equal
    group = torch.cummax(torch.where(starts, rank, 0), dim=1).values  # the first rank of each rank's group
    longest = int((rank - group).max()) + 1
    flat, base = overlap.reshape(-1), image[tied][:, None] * (r * r)
    found = torch.zeros(tied.numel(), dtype=torch.bool, device=values.device)
    for d in range(1, longest):  # every pair of members: ranks k and k + d of one group
        same = group[:, d:] == group[:, :-d]
        pair = flat[base + order[:, :-d] * r + order[:, d:]]  # overlap[image, order[k], order[k + d]]
        found |= (same & pair).any(1)
    matters[tied] = found
    return matters


def nms_max_conf(boxes: Tensor, scores: Tensor, counts: list[int], thresh: float = LXMERT_NMS) -> Tensor:
    """Per-class greedy NMS of several images at once; each proposal's best score among the classes that keep it.

    Args:
        boxes: [B, R, 4] proposals, image b's first `counts[b]` rows real (the rest padding, ignored).
        scores: [B, R, C] class probabilities (background column removed).
        counts: real proposals per image.
    Returns:
        [B, R] max_conf (0 where no class keeps a proposal, and for padding).
    """
    b, r, c = scores.shape
    if b == 0 or r == 0:
        return scores.new_zeros(b, r)
    device = scores.device
    valid = torch.arange(r, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]  # [B, R]
    overlap = (caffe_iou(boxes) >= thresh) & valid[:, :, None] & valid[:, None, :]  # [B, R, R]: a suppresses b
    overlap.diagonal(dim1=1, dim2=2).fill_(False)
    per_class = scores.masked_fill(~valid[:, :, None], 0).transpose(1, 2).reshape(b * c, r)  # [B*C, R]
    image = torch.arange(b, device=device).repeat_interleave(c)
    ranked = torch.sort(per_class, dim=1, descending=True, stable=True)
    order, values = ranked.indices, ranked.values
    # Any sort gives the one order of distinct scores; ties take the original's where their order can matter.
    redo = order_matters(values, order, overlap, image).nonzero().squeeze(1)
    for i in range(b):
        mine = redo[image[redo] == i]
        if mine.numel():  # the original sorted each image's own R proposals: ties depend on R, not padding
            n = counts[i]
            order[mine, :n] = torch.from_numpy(caffe_descending(per_class[mine, :n].float().cpu().numpy())).to(device)
    # Ranks whose score is 0 in every row keep nothing that could raise max_conf and (sorted last) suppress only
    # zero-score proposals: stop there. Padding scores 0 and suppresses nothing.
    ranks = int((values > 0).sum(1).max())
    kept = greedy_sweep(order, overlap, image, ranks)
    return (per_class * kept).reshape(b, c, r).max(dim=1).values


def per_class_nms_max_conf(boxes: Tensor, scores: Tensor, thresh: float = LXMERT_NMS) -> Tensor:
    """For each proposal, its best score among the classes whose greedy NMS keeps it (0 if none).

    Args:
        boxes: [R, 4] proposals.
        scores: [R, C] class probabilities (background column already removed).
    Returns:
        [R] max_conf.
    """
    return nms_max_conf(boxes[None], scores[None], [scores.shape[0]], thresh)[0]


def _labels(cls_prob: Tensor, attr_prob: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    obj_conf, obj_id = cls_prob[keep, 1:].max(dim=1)
    attr_conf, attr_id = attr_prob[keep, 1:].max(dim=1)
    return obj_id, obj_conf, attr_id, attr_conf


def _top_by_score(score: Tensor, k: int) -> Tensor:
    return torch.sort(score, descending=True, stable=True).indices[:k]


def _caffe_top(score: Tensor, k: int) -> Tensor:
    """`np.argsort(max_conf)[::-1][:k]`, ties included (R <= a few hundred values: cheap on the CPU)."""
    return torch.from_numpy(caffe_descending(score.float().cpu().numpy())[:k].copy()).to(score.device)


def select_lxmert(boxes: Tensor, cls_prob: Tensor, attr_prob: Tensor, *, num_boxes: int = LXMERT_BOXES,
                  nms_thresh: float = LXMERT_NMS, conf_thresh: float = LXMERT_CONF) -> Selection:
    """LXMERT's 36-box selection (spec §2.1) of one image, vectorised over classes.

    Args:
        boxes: [R, 4] unregressed proposals in original-image pixels.
        cls_prob: [R, 1 + num_classes] softmax, background in column 0.
        attr_prob: [R, 1 + num_attrs] softmax, "no attribute" in column 0.
    """
    return select_lxmert_batch([boxes], [cls_prob], [attr_prob], num_boxes=num_boxes, nms_thresh=nms_thresh,
                               conf_thresh=conf_thresh)[0]


def select_lxmert_batch(boxes: list[Tensor], cls_prob: list[Tensor], attr_prob: list[Tensor], *,
                        num_boxes: int = LXMERT_BOXES, nms_thresh: float = LXMERT_NMS,
                        conf_thresh: float = LXMERT_CONF) -> list[Selection]:
    """`select_lxmert` of several images at once (the NMS of every class of every image in one sweep); each
    image's selection equals its own `select_lxmert`. Lists hold one tensor per image, shaped as there."""
    if not boxes:
        return []
    counts = [b.shape[0] for b in boxes]
    r = max(counts)

    def padded(parts: list[Tensor]) -> Tensor:
        out = parts[0].new_zeros((len(parts), r, *parts[0].shape[1:]))
        for i, part in enumerate(parts):
            out[i, :part.shape[0]] = part
        return out

    max_conf = nms_max_conf(padded(boxes), padded([p[:, 1:] for p in cls_prob]), counts, nms_thresh)
    out = []
    for i, n in enumerate(counts):
        conf = max_conf[i, :n]
        keep = torch.nonzero(conf >= conf_thresh).squeeze(1)
        if keep.numel() != num_boxes:  # too few or too many: the top num_boxes by max_conf, in score order
            keep = _caffe_top(conf, num_boxes)
        obj_id, obj_conf, attr_id, attr_conf = _labels(cls_prob[i], attr_prob[i], keep)
        out.append(Selection(keep, boxes[i][keep], obj_id, obj_conf, attr_id, attr_conf, conf[keep]))
    return out


def select_maxnms(boxes: Tensor, pred_boxes: Tensor, cls_prob: Tensor, attr_prob: Tensor, *,
                  num_boxes: int = LXMERT_BOXES, thresholds=MAXNMS_THRESHOLDS) -> Selection:
    """airsplay's "maxnms" selection (spec §2.2), always `num_boxes` rows when there are that many proposals.

    Args:
        boxes: [R, 4] proposals (unused for ranking; kept for symmetry and the fill order).
        pred_boxes: [R, num_classes, 4] class-specific regressed boxes, clipped to the image.
        cls_prob / attr_prob: as in `select_lxmert`.
    """
    from torchvision.ops import nms

    probs = cls_prob[:, 1:]
    max_scores, max_classes = probs.max(dim=1)
    max_boxes = pred_boxes[torch.arange(pred_boxes.shape[0], device=pred_boxes.device), max_classes]
    keep = torch.zeros(0, dtype=torch.long, device=boxes.device)
    for t in thresholds:
        keep = nms(max_boxes.float(), max_scores.float(), t)  # score-descending
        if keep.numel() >= num_boxes:
            break
    keep = keep[:num_boxes]
    if keep.numel() < num_boxes:  # fill from the remaining proposals by score instead of returning fewer rows
        taken = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        taken[keep] = True
        rest = _top_by_score(max_scores.masked_fill(taken, -1.0), num_boxes - keep.numel())
        keep = torch.cat([keep, rest[~taken[rest]]])
    obj_id, obj_conf, attr_id, attr_conf = _labels(cls_prob, attr_prob, keep)
    return Selection(keep, max_boxes[keep], obj_id, obj_conf, attr_id, attr_conf, max_scores[keep])


# ---------------------------------------------------------------------------------------------------------------
# Reference: the original per-class loop, written out plainly (used by tests and the benchmark).


def caffe_nms_reference(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> list[int]:
    """py-faster-rcnn `cpu_nms` semantics (+1 areas, suppress IoU >= thresh, ties in the original's order)."""
    boxes = boxes.astype(np.float32)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + np.float32(1)) * (y2 - y1 + np.float32(1))
    order = caffe_descending(scores.astype(np.float32))
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + np.float32(1))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + np.float32(1))
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        order = rest[ovr < thresh]
    return keep


def select_lxmert_reference(boxes: np.ndarray, cls_prob: np.ndarray, attr_prob: np.ndarray, *,
                            num_boxes: int = LXMERT_BOXES, nms_thresh: float = LXMERT_NMS,
                            conf_thresh: float = LXMERT_CONF) -> dict[str, np.ndarray]:
    """`get_detections_from_im` as written in the extraction script: one NMS call per class."""
    max_conf = np.zeros(boxes.shape[0], dtype=np.float32)
    for c in range(1, cls_prob.shape[1]):
        scores = cls_prob[:, c]
        keep = np.array(caffe_nms_reference(boxes, scores, nms_thresh), dtype=np.int64)
        max_conf[keep] = np.where(scores[keep] > max_conf[keep], scores[keep], max_conf[keep])
    keep_boxes = np.where(max_conf >= conf_thresh)[0]
    if len(keep_boxes) != num_boxes:
        keep_boxes = caffe_descending(max_conf)[:num_boxes]
    return {
        "indices": keep_boxes,
        "objects_id": np.argmax(cls_prob[keep_boxes][:, 1:], axis=1),
        "objects_conf": np.max(cls_prob[keep_boxes][:, 1:], axis=1),
        "attrs_id": np.argmax(attr_prob[keep_boxes][:, 1:], axis=1),
        "attrs_conf": np.max(attr_prob[keep_boxes][:, 1:], axis=1),
        "max_conf": max_conf,
    }
