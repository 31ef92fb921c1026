"""Pretraining data: masking, matching negatives, QA sampling, determinism, collation into a model step."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from conftest import BERT_VOCAB
from lxm.cli import app
from lxm.features.records import ImageFeatures
from lxm.features.store import FeatureStoreWriter
from lxm.model import LxmertForPreTraining, lxmert_tiny, pretraining_step_losses
from lxm.train.data import PretrainDataset, collate
from synthetic import write_raw

N, F = 6, 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_raw(root)
    result = CliRunner().invoke(app, ["build-corpus", "--out", str(root / "corpus"), "--coco", str(root / "coco"),
                                      "--vg", str(root / "vg"), "--vqa", str(root / "vqa"), "--gqa",
                                      str(root / "gqa"), "--minival-ids", str(root / "minival.json"),
                                      "--vqa-min-questions", "1"])
    assert result.exit_code == 0, result.output
    img_ids = sorted(set(pq.read_table(root / "corpus" / "corpus.parquet").column("img_id").to_pylist()))
    rng = np.random.default_rng(0)
    with FeatureStoreWriter(root / "feats", num_boxes=N, feature_dim=F, dtype="float32") as w:
        for img_id in img_ids:
            xy = rng.uniform(0, 50, (N, 2)).astype(np.float32)
            w.add(ImageFeatures(img_id, 100, 200, rng.integers(0, 10, N), rng.random(N, np.float32),
                                rng.integers(0, 6, N), rng.random(N, np.float32),
                                np.concatenate([xy, xy + 40], 1), rng.random((N, F), np.float32) + 0.5))
    answers = [r["ans"] for r in json.loads((root / "corpus" / "vocab" / "qa_answers.json").read_text())]
    return root, answers


def _dataset(world, **kw):
    root, answers = world
    return PretrainDataset(root / "corpus", [root / "feats"], BERT_VOCAB, answers,
                           splits=("train", "nominival", "minival", "vgnococo"), **kw)


def test_items_have_lxmert_shapes_and_unmasked_specials(world):
    ds = _dataset(world)
    assert len(ds) == 19
    for i in range(len(ds)):
        ex = ds[i]
        length = int(ex.attention_mask.sum())
        assert ex.input_ids[0] == 101 and ex.input_ids[length - 1] == 102 and (ex.input_ids[length:] == 0).all()
        assert ex.mlm_labels[0] == -1 and (ex.mlm_labels[length - 1:] == -1).all()
        assert ex.visual_feats.shape == (N, F) and ex.visual_boxes.max() <= 1.0
        assert ex.matched in (0, 1)
        if not ex.matched:
            assert ex.answer == -1


def test_all_masked_when_rates_are_one(world):
    ds = _dataset(world, word_mask_rate=1.0, obj_mask_rate=1.0)
    ex = ds[0]
    length = int(ex.attention_mask.sum())
    assert (ex.mlm_labels[1:length - 1] >= 0).all()  # every piece predicted, never [CLS]/[SEP]
    assert (ex.feat_mask == 1).all()
    rec = ds.stores[0].get(ds.img_ids[0])
    np.testing.assert_array_equal(ex.feat_target, rec.features)  # targets are the unmasked features
    np.testing.assert_allclose(ex.visual_boxes, rec.boxes / np.array([200, 100, 200, 100], np.float32))  # untouched


def test_masking_rates_match_the_original_recipe(world):
    ds = _dataset(world)
    words = masked = mask_token = boxes = box_masked = zeroed = 0
    for epoch in range(60):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ex = ds[i]
            length = int(ex.attention_mask.sum())
            sel = ex.mlm_labels[1:length - 1] >= 0
            words += length - 2
            masked += int(sel.sum())
            mask_token += int((ex.input_ids[1:length - 1][sel] == 103).sum())
            boxes += N
            box_masked += int(ex.feat_mask.sum())
            zeroed += int(((ex.visual_feats == 0).all(1) & (ex.feat_mask == 1)).sum())
    assert 0.12 < masked / words < 0.18 and 0.72 < mask_token / masked < 0.88
    assert 0.12 < box_masked / boxes < 0.18 and 0.72 < zeroed / box_masked < 0.88


def test_matching_negatives_come_from_other_images(world):
    ds = _dataset(world)
    flips = 0
    for epoch in range(40):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ex = ds[i]
            flips += ex.matched == 0
    assert 0.4 < flips / (40 * len(ds)) < 0.6


def test_qa_answer_sampled_in_proportion_to_scores(world):
    ds = _dataset(world, word_mask_rate=0.0, obj_mask_rate=0.0)
    i = ds.sources.index("vqa")
    ds.labels[i] = [(3, 1.0), (5, 0.5)]
    picks = []
    for epoch in range(600):
        ds.set_epoch(epoch)
        ex = ds[i]
        if ex.matched:
            picks.append(ex.answer)
    share = picks.count(3) / len(picks)
    assert set(picks) == {3, 5} and 0.58 < share < 0.75  # expected 2/3


def test_items_are_reproducible_regardless_of_workers(world):
    ds = _dataset(world)
    ds.set_epoch(3)
    a = [ds[i] for i in range(len(ds))]
    ds.set_epoch(4)
    assert any(not np.array_equal(a[i].input_ids, ds[i].input_ids) for i in range(len(ds)))
    ds.set_epoch(3)
    one = list(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate))
    two = list(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate))
    for x, y in zip(one, two):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.visual_feats, y.visual_feats)
        assert torch.equal(x.labels.answers, y.labels.answers) and x.uids == y.uids


def test_batch_feeds_a_pretraining_step(world):
    ds = _dataset(world)
    batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=collate)))
    cfg = lxmert_tiny(vocab_size=30522, visual_feat_dim=F, num_qa_labels=len(world[1]))
    model = LxmertForPreTraining(cfg)
    losses, _ = pretraining_step_losses(model, batch.labels, **batch.to("cpu").model_inputs())
    assert set(losses) == {"mlm", "match", "obj", "attr", "feat", "qa"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_float16_features_stay_float16_until_the_device_and_arrive_unchanged(world, tmp_path):
    root, answers = world
    from lxm.features.store import FeatureStore

    src = FeatureStore(root / "feats")
    for dtype in ("float16", "float32"):  # the same float16-rounded values, stored both ways
        with FeatureStoreWriter(tmp_path / dtype, num_boxes=N, feature_dim=F, dtype=dtype) as w:
            for rec in src:
                w.add(ImageFeatures(rec.img_id, rec.img_h, rec.img_w, rec.objects_id, rec.objects_conf, rec.attrs_id,
                                    rec.attrs_conf, rec.boxes, rec.features.astype(np.float16).astype(np.float32)))
    kw = dict(splits=("train", "nominival", "minival", "vgnococo"), obj_mask_rate=0.5)  # many boxes replaced
    half = PretrainDataset(root / "corpus", [tmp_path / "float16"], BERT_VOCAB, answers, **kw)
    full = PretrainDataset(root / "corpus", [tmp_path / "float32"], BERT_VOCAB, answers, **kw)
    a = next(iter(DataLoader(half, batch_size=16, collate_fn=collate)))
    b = next(iter(DataLoader(full, batch_size=16, collate_fn=collate)))
    # half the bytes through the loader (and worker pipes), float32 once on the device, bit for bit
    assert a.visual_feats.dtype == a.labels.feat_target.dtype == torch.float16
    a, b = a.to("cpu"), b.to("cpu")
    assert a.visual_feats.dtype == a.labels.feat_target.dtype == torch.float32
    assert torch.equal(a.visual_feats, b.visual_feats) and torch.equal(a.labels.feat_target, b.labels.feat_target)
    assert (a.labels.feat_mask.sum() > 0) and not torch.equal(a.visual_feats, a.labels.feat_target)
