"""The 36-box selection: the vectorised form equals the original per-class loop, ties and fallbacks included.

Tie order is checked against an oracle written here from numpy's sort algorithm, not against numpy itself: the
numpy on the machine running the tests may sort differently from the one that made the released features.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from conftest import SHARED
from lxm.extract.select import (
    caffe_descending,
    caffe_iou,
    caffe_nms_reference,
    nms_max_conf,
    order_matters,
    per_class_nms_max_conf,
    select_lxmert,
    select_lxmert_batch,
    select_lxmert_reference,
    select_maxnms,
)

SAMPLE_TSV = SHARED / "fixtures" / "butd-coco-sample" / "train2014_obj36.tsv"


def _introsort_argsort(values) -> list[int]:
    """numpy's default `argsort` ("quicksort") as numpy/_core/src/npysort/quicksort.cpp `aquicksort_` runs it for
    numbers: median-of-3 quicksort on spans of more than 16, insertion sort below, heapsort past 2*floor(log2 n)
    partition levels. Written from the algorithm, to predict the original extraction's order of equal values."""
    v = [float(x) for x in values]
    idx = list(range(len(v)))

    def heapsort(lo: int, n: int) -> None:  # 1-based heap over idx[lo:lo+n]
        def sift(i: int, tmp: int, n: int) -> None:
            j = 2 * i
            while j <= n:
                if j < n and v[idx[lo + j - 1]] < v[idx[lo + j]]:
                    j += 1
                if not v[tmp] < v[idx[lo + j - 1]]:
                    break
                idx[lo + i - 1] = idx[lo + j - 1]
                i, j = j, 2 * j
            idx[lo + i - 1] = tmp

        for k in range(n >> 1, 0, -1):
            sift(k, idx[lo + k - 1], n)
        while n > 1:
            tmp = idx[lo + n - 1]
            idx[lo + n - 1] = idx[lo]
            n -= 1
            sift(1, tmp, n)

    if len(v) < 2:
        return idx
    stack, pl, pr, depth = [], 0, len(v) - 1, 2 * (len(v).bit_length() - 1)
    while True:
        if depth < 0:
            heapsort(pl, pr - pl + 1)
        else:
            while pr - pl > 15:
                pm = pl + ((pr - pl) >> 1)
                for a, b in ((pm, pl), (pr, pm), (pm, pl)):
                    if v[idx[a]] < v[idx[b]]:
                        idx[a], idx[b] = idx[b], idx[a]
                pivot, pi, pj = v[idx[pm]], pl, pr - 1
                idx[pm], idx[pj] = idx[pj], idx[pm]
                while True:
                    pi += 1
                    while v[idx[pi]] < pivot:
                        pi += 1
                    pj -= 1
                    while pivot < v[idx[pj]]:
                        pj -= 1
                    if pi >= pj:
                        break
                    idx[pi], idx[pj] = idx[pj], idx[pi]
                idx[pi], idx[pr - 1] = idx[pr - 1], idx[pi]
                depth -= 1
                if pi - pl < pr - pi:  # the larger part waits on the stack
                    stack.append((pi + 1, pr, depth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, depth))
                    pl = pi + 1
            for i in range(pl + 1, pr + 1):
                item, j = idx[i], i
                while j > pl and v[item] < v[idx[j - 1]]:
                    idx[j] = idx[j - 1]
                    j -= 1
                idx[j] = item
        if not stack:
            return idx
        pl, pr, depth = stack.pop()


def _caffe_order(values) -> list[int]:
    return _introsort_argsort(values)[::-1]  # `np.argsort(x)[::-1]` in generate_tsv and cpu_nms


def _generate_tsv(boxes, cls_prob, num_boxes, order=_caffe_order):
    """get_detections_from_im with cpu_nms at 0.3 (float32, +1 areas, suppress at IoU >= 0.3), plainly."""
    b = boxes.astype(np.float32)
    areas = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    max_conf = np.zeros(len(b))  # float64, as in the script
    for c in range(1, cls_prob.shape[1]):
        scores = cls_prob[:, c].astype(np.float32)
        suppressed, keep = np.zeros(len(b), bool), []
        for i in order(scores):
            if suppressed[i]:
                continue
            keep.append(i)
            w = np.maximum(np.float32(0), np.minimum(b[i, 2], b[:, 2]) - np.maximum(b[i, 0], b[:, 0]) + 1)
            h = np.maximum(np.float32(0), np.minimum(b[i, 3], b[:, 3]) - np.maximum(b[i, 1], b[:, 1]) + 1)
            suppressed |= w * h / (areas[i] + areas - w * h) >= np.float32(0.3)
        max_conf[keep] = np.where(scores[keep] > max_conf[keep], scores[keep], max_conf[keep])
    keep_boxes = np.where(max_conf >= 0.2)[0]
    if len(keep_boxes) != num_boxes:
        keep_boxes = np.array(order(max_conf)[:num_boxes])
    return max_conf, keep_boxes


def _case(seed: int, r: int = 80, classes: int = 40, attrs: int = 12, peaked: float = 4.0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 400, (r, 2))
    wh = rng.uniform(4, 200, (r, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    logits = rng.normal(0, peaked, (r, classes + 1)).astype(np.float32)
    cls_prob = torch.softmax(torch.from_numpy(logits), 1).numpy()
    attr_prob = torch.softmax(torch.from_numpy(rng.normal(0, 2, (r, attrs + 1)).astype(np.float32)), 1).numpy()
    return boxes, cls_prob, attr_prob


def _assert_same(boxes, cls_prob, attr_prob, **kw):
    ref = select_lxmert_reference(boxes, cls_prob, attr_prob, **kw)
    got = select_lxmert(torch.from_numpy(boxes), torch.from_numpy(cls_prob), torch.from_numpy(attr_prob), **kw)
    np.testing.assert_array_equal(got.indices.numpy(), ref["indices"])
    np.testing.assert_array_equal(got.objects_id.numpy(), ref["objects_id"])
    np.testing.assert_array_equal(got.objects_conf.numpy(), ref["objects_conf"])
    np.testing.assert_array_equal(got.attrs_id.numpy(), ref["attrs_id"])
    np.testing.assert_array_equal(got.attrs_conf.numpy(), ref["attrs_conf"])
    np.testing.assert_array_equal(got.boxes.numpy(), boxes[ref["indices"]])
    return ref, got


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_equals_per_class_loop_on_random_inputs(seed):
    _assert_same(*_case(seed))


def test_ties_duplicate_boxes_and_equal_scores():
    boxes, cls_prob, attr_prob = _case(11, r=60)
    boxes[10:20] = boxes[0]  # duplicate proposals: identical IoU 1 and identical class scores
    cls_prob[10:20] = cls_prob[0]
    cls_prob[30:40, 5] = cls_prob[30, 5]  # equal scores on distinct boxes in one class
    cls_prob[:, 7] = 0.25  # a whole class tied
    _assert_same(boxes, cls_prob, attr_prob, num_boxes=12)


def test_fewer_than_36_above_threshold_pads_with_the_best_remaining():
    boxes, cls_prob, attr_prob = _case(3, r=120, peaked=0.3)  # flat softmaxes: almost nothing reaches 0.2
    ref, got = _assert_same(boxes, cls_prob, attr_prob)
    assert (ref["max_conf"] >= 0.2).sum() < 36 and got.indices.numel() == 36
    assert len(set(got.indices.tolist())) == 36  # distinct proposals


def test_more_than_36_above_threshold_keeps_the_top_36_by_score():
    boxes, cls_prob, attr_prob = _case(5, r=150, peaked=8.0)
    ref, got = _assert_same(boxes, cls_prob, attr_prob)
    assert (ref["max_conf"] >= 0.2).sum() > 36
    assert torch.all(got.score[:-1] >= got.score[1:])


def test_exactly_num_boxes_above_threshold_keep_proposal_order():
    boxes, cls_prob, attr_prob = _case(8, r=50, peaked=6.0)
    max_conf = select_lxmert_reference(boxes, cls_prob, attr_prob)["max_conf"]
    n = int((max_conf >= 0.2).sum())
    ref, got = _assert_same(boxes, cls_prob, attr_prob, num_boxes=n)
    assert got.indices.tolist() == sorted(got.indices.tolist())


def test_iou_uses_inclusive_pixels_and_nms_suppresses_at_equality():
    boxes = np.array([[0, 0, 9, 9], [0, 0, 9, 4], [20, 20, 29, 29]], np.float32)
    iou = caffe_iou(torch.from_numpy(boxes))
    assert iou[0, 1].item() == pytest.approx(0.5)  # (10*5) / (100 + 50 - 50) with +1 widths
    assert caffe_nms_reference(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.5) == [0, 2]  # IoU 0.5 >= 0.5
    assert caffe_nms_reference(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.51) == [0, 1, 2]


def test_maxnms_always_returns_num_boxes_distinct_rows():
    boxes, cls_prob, attr_prob = _case(2, r=50, classes=10)
    b = torch.from_numpy(boxes)
    pred = b[:, None, :].repeat(1, 10, 1)
    pred[:5] = pred[0]  # overlapping regressed boxes get suppressed even at 0.9
    sel = select_maxnms(b, pred, torch.from_numpy(cls_prob), torch.from_numpy(attr_prob), num_boxes=48)
    assert sel.indices.numel() == 48 and len(set(sel.indices.tolist())) == 48
    sel36 = select_maxnms(b, pred, torch.from_numpy(cls_prob), torch.from_numpy(attr_prob))
    assert torch.all(sel36.score[:-1] >= sel36.score[1:])


# --- ties ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_caffe_order_is_numpy_introsort_reversed(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 2, 5, 16, 17, 18, 40, 299, 300, 301):
        x = (rng.integers(0, max(2, n // 3), n) * 0.125).astype(np.float32 if seed % 2 else np.float64)
        assert caffe_descending(x).tolist() == _caffe_order(x), n
    rows = torch.softmax(torch.randn(6, 300, generator=torch.Generator().manual_seed(seed)), 1).numpy()
    rows[:, 10], rows[:, 20:23] = rows[:, 200], rows[:, 5:6]  # ties inside every row
    assert caffe_descending(rows).tolist() == [_caffe_order(r) for r in rows]


def _sample_case():
    """One released image whose 36 rows hold two equal confidences, as proposals (in file order) with class
    probabilities made from the row's (objects_id, objects_conf); equal rows stay bit-identical."""
    for line in SAMPLE_TSV.read_text().splitlines():
        f = line.split("\t")
        ids, conf = np.frombuffer(base64.b64decode(f[3]), np.int64), np.frombuffer(base64.b64decode(f[4]), np.float32)
        if len(np.unique(conf)) < len(conf):
            break
    else:
        pytest.fail(f"{SAMPLE_TSV}: no row with tied objects_conf")
    boxes = np.frombuffer(base64.b64decode(f[8]), np.float32).reshape(-1, 4).copy()
    classes = {c: k + 1 for k, c in enumerate(np.unique(ids))}  # the row's classes, compacted; column 0: background
    cls_prob = np.zeros((len(ids), len(classes) + 1), np.float32)
    for i, (c, p) in enumerate(zip(ids, conf)):
        rest = ((np.arange(len(classes) + 1) * 7 + int(c) * 13) % 17 + 1).astype(np.float32)
        rest[classes[c]] = 0
        cls_prob[i] = (np.float32(1) - p) * rest / rest.sum()
        cls_prob[i, classes[c]] = p
    attr_prob = np.full((len(ids), 3), 1 / 3, np.float32)
    tied = [i for i in range(len(conf)) if (conf == conf[i]).sum() > 1]
    return boxes, cls_prob, attr_prob, tied


def test_tied_confidences_of_the_released_sample_are_ranked_as_caffe_ranks_them():
    boxes, cls_prob, attr_prob, tied = _sample_case()
    assert len(tied) == 2 and np.array_equal(cls_prob[tied[0]], cls_prob[tied[1]])
    assert caffe_iou(torch.from_numpy(boxes[tied]))[0, 1] >= 0.3  # so each class's NMS keeps only one of the two
    max_conf, _ = _generate_tsv(boxes, cls_prob, 36)
    stable_max_conf, _ = _generate_tsv(boxes, cls_prob, 36, order=lambda x: list(np.argsort(-x, kind="stable")))
    assert not np.array_equal(max_conf, stable_max_conf)  # the order of the two decides their max_conf
    got = per_class_nms_max_conf(torch.from_numpy(boxes), torch.from_numpy(cls_prob[:, 1:]))
    np.testing.assert_array_equal(got.numpy(), max_conf.astype(np.float32))
    assert 20 < (max_conf >= 0.2).sum() < 36
    for k in (36, 20):  # fewer than 36 pass 0.2 (all rows, ranked) / more than 20 pass (the top 20)
        _, keep = _generate_tsv(boxes, cls_prob, k)
        sel = select_lxmert(torch.from_numpy(boxes), torch.from_numpy(cls_prob), torch.from_numpy(attr_prob),
                            num_boxes=k)
        assert sel.indices.tolist() == keep.tolist()
        assert select_lxmert_reference(boxes, cls_prob, attr_prob, num_boxes=k)["indices"].tolist() == keep.tolist()


def _two_equal_boxes(n: int, first: int, second: int):
    """n proposals apart from each other, except `first` and `second` (IoU 0.8), which share the top class score."""
    boxes = np.array([[40.0 * i, 0, 40.0 * i + 20, 20] for i in range(n)], np.float32)
    boxes[second] = boxes[first] + np.array([0, 0, 0, -4], np.float32)
    p = np.linspace(0.21, 0.6, n, dtype=np.float32)
    p[second] = p[first] = 0.9
    cls_prob = np.stack([1 - p, p], 1).astype(np.float32)
    return boxes, cls_prob


def test_equal_scores_up_to_16_proposals_keep_the_higher_index():
    boxes, cls_prob = _two_equal_boxes(12, 3, 8)  # insertion sort: stable, so argsort()[::-1] puts 8 before 3
    got = per_class_nms_max_conf(torch.from_numpy(boxes), torch.from_numpy(cls_prob[:, 1:]))
    assert got[8] == np.float32(0.9) and got[3] == 0
    np.testing.assert_array_equal(got.numpy(), _generate_tsv(boxes, cls_prob, 4)[0].astype(np.float32))


def test_equal_scores_beyond_16_proposals_follow_the_introsort_not_the_index():
    # 17 proposals: the median-of-three step (positions 0, 8, 16) moves proposal 0 to the far end, past 1, so
    # argsort()[::-1] puts the LOWER index first
    boxes, cls_prob = _two_equal_boxes(17, 0, 1)
    assert _caffe_order(cls_prob[:, 1]).index(0) < _caffe_order(cls_prob[:, 1]).index(1)
    got = per_class_nms_max_conf(torch.from_numpy(boxes), torch.from_numpy(cls_prob[:, 1:]))
    assert got[0] == np.float32(0.9) and got[1] == 0
    np.testing.assert_array_equal(got.numpy(), _generate_tsv(boxes, cls_prob, 4)[0].astype(np.float32))


def test_equal_max_conf_across_the_cut_is_ranked_as_caffe_ranks_it():
    boxes, cls_prob, attr_prob = _case(21, r=60, classes=8)
    boxes[30:40] = boxes[0:10] + 300  # far apart, same probabilities: ten pairs of equal max_conf
    cls_prob[30:40] = cls_prob[0:10]
    max_conf, keep = _generate_tsv(boxes, cls_prob, 15)
    assert len(np.unique(max_conf[keep])) < len(keep)
    sel = select_lxmert(torch.from_numpy(boxes), torch.from_numpy(cls_prob), torch.from_numpy(attr_prob),
                        num_boxes=15)
    assert sel.indices.tolist() == keep.tolist()


def _twins(seed: int, r: int, pairs: int):
    """A `_case` with `pairs` twins: proposals a few pixels off another, with its probabilities (ROIPool snapped both
    to the same cells), so every class has tied scores on overlapping boxes."""
    boxes, cls_prob, attr_prob = _case(seed, r=r)
    rng = np.random.default_rng(seed + 100)
    for twin, of in rng.choice(r, (pairs, 2), replace=False):
        boxes[twin] = boxes[of] + rng.uniform(-3, 3, 4).astype(np.float32)
        cls_prob[twin], attr_prob[twin] = cls_prob[of], attr_prob[of]
    return boxes, cls_prob, attr_prob


def test_a_batch_selects_as_each_image_alone():
    # different proposal counts (padding must neither suppress nor change the original's tie order, which
    # depends on each image's own length), twins in every class, one image with fewer than 16 proposals
    cases = [_twins(1, 80, 3), _twins(2, 45, 2), _case(3, r=120), _twins(4, 14, 1)]
    got = select_lxmert_batch(*[[torch.from_numpy(c[i]) for c in cases] for i in range(3)], num_boxes=12)
    for case, sel in zip(cases, got):
        ref, alone = _assert_same(*case, num_boxes=12)
        for name in ("indices", "boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "score"):
            assert torch.equal(getattr(sel, name), getattr(alone, name)), name


@pytest.mark.parametrize("seed", range(4))
def test_coarse_scores_tie_everywhere_and_still_select_as_the_original(seed):
    # probabilities on a 1/16 grid: long tie groups in every class, some on overlapping boxes (whose order is the
    # original's) and many on boxes apart (whose order `order_matters` proves irrelevant and leaves to any sort)
    boxes, cls_prob, attr_prob = _case(seed, r=70, classes=12, peaked=1.0)
    cls_prob = (np.round(cls_prob * 16) / 16).astype(np.float32)
    _assert_same(boxes, cls_prob, attr_prob, num_boxes=20)


def _ranked(boxes, cls_prob):
    scores = torch.from_numpy(cls_prob[:, 1:]).t().contiguous()
    ranked = torch.sort(scores, dim=1, descending=True, stable=True)
    overlap = (caffe_iou(torch.from_numpy(boxes)) >= 0.3)[None]
    overlap[0].fill_diagonal_(False)
    return ranked.values, ranked.indices, overlap, torch.zeros(scores.shape[0], dtype=torch.long)


def test_only_ties_between_overlapping_boxes_need_the_original_order():
    boxes, cls_prob = _two_equal_boxes(20, 3, 8)  # class 0: 3 and 8 overlap (IoU 0.8) and tie at 0.9
    cls_prob = np.concatenate([cls_prob, cls_prob[:, 1:]], 1)  # class 1: the same scores ...
    cls_prob[8, 2] = 0.95  # ... but no tie
    cls_prob = np.concatenate([cls_prob, cls_prob[:, 1:2]], 1)  # class 2: ties between boxes apart
    cls_prob[[3, 8], 3] = [0.1, 0.5]
    cls_prob[[4, 12], 3] = 0.8
    cls_prob = np.concatenate([cls_prob, np.zeros((20, 1), np.float32)], 1)  # class 3: all zero (never visited)
    assert order_matters(*_ranked(boxes, cls_prob)).tolist() == [True, False, False, False]
    # and the answer is the original's either way
    max_conf, _ = _generate_tsv(boxes, cls_prob, 4)
    got = nms_max_conf(torch.from_numpy(boxes)[None], torch.from_numpy(cls_prob[:, 1:])[None], [20])[0]
    np.testing.assert_array_equal(got.numpy(), max_conf.astype(np.float32))
