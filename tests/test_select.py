"""The 36-box selection: the vectorised form equals the original per-class loop, ties and fallbacks included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lxm.extract.select import (
    caffe_iou,
    caffe_nms_reference,
    select_lxmert,
    select_lxmert_reference,
    select_maxnms,
)


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
