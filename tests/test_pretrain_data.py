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


def _example(uid: str, boxes: int, rng: np.random.Generator, cfg):
    from lxm.train.data import PretrainExample

    t, f = 12, cfg.visual_feat_dim
    ids = rng.integers(5, cfg.vocab_size, t)
    mlm = np.full(t, -1)
    mlm[[2, 5]] = ids[[2, 5]]
    xy = rng.random((boxes, 2), np.float32) * 0.5
    feats = rng.standard_normal((boxes, f)).astype(np.float32)
    feat_mask = (rng.random(boxes) < 0.4).astype(np.float32)
    return PretrainExample(uid, "mscoco", ids, np.ones(t, np.int64), mlm, feats * (1 - feat_mask[:, None]),
                           np.concatenate([xy, xy + 0.3], 1), feats, feat_mask,
                           rng.integers(0, cfg.num_object_labels, boxes), rng.random(boxes, np.float32),
                           rng.integers(0, cfg.num_attr_labels, boxes), rng.random(boxes, np.float32), 1, 2)


def test_images_with_fewer_boxes_are_padded_masked_and_change_no_loss():
    """A batch of images with 7 and 4 boxes (given boxes vary per image): the 4-box image is padded to 7 and masked
    out of attention and of every visual loss (they average over the 11 real boxes), so the batch's losses follow
    from each example's own batch of one (no padding, no mask), and a batch whose images all have N boxes carries no
    mask (LXMERT's fixed 36: the unmasked path, averaged as the original)."""
    cfg = lxmert_tiny(num_qa_labels=5)
    rng = np.random.default_rng(0)
    a, b = _example("a", 7, rng, cfg), _example("b", 4, rng, cfg)
    both = collate([a, b])
    assert both.visual_feats.shape[1] == 7 and both.visual_attention_mask.tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    assert both.labels.obj_labels[1, 4:].tolist() == [-1] * 3 and both.labels.feat_mask[1, 4:].sum() == 0
    assert collate([a]).visual_attention_mask is None and collate([b, b]).visual_attention_mask is None
    torch.manual_seed(0)
    model = LxmertForPreTraining(cfg).eval()
    with torch.no_grad():
        pair, _ = pretraining_step_losses(model, both.labels, **both.model_inputs())
        alone = [pretraining_step_losses(model, x.labels, **x.model_inputs())[0] for x in (collate([a]), collate([b]))]
    assert set(pair) >= {"mlm", "match", "obj", "attr", "feat", "qa"}
    for name in ("obj", "attr", "feat"):  # averages over the batch's real boxes: 7 + 4, never the 3 pads
        torch.testing.assert_close(pair[name], (7 * alone[0][name] + 4 * alone[1][name]) / 11, rtol=1e-5, atol=1e-6)
    for name in ("mlm", "match", "qa"):
        torch.testing.assert_close(pair[name], (alone[0][name] + alone[1][name]) / 2, rtol=1e-5, atol=1e-6)
    # and the model's outputs at real positions are the unpadded ones
    with torch.no_grad():
        out_pair = model(**both.model_inputs())
        out_b = model(**collate([b]).model_inputs())
    torch.testing.assert_close(out_pair.match_logits[1], out_b.match_logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_pair.obj_logits[1, :4], out_b.obj_logits[0], rtol=1e-5, atol=1e-5)


def test_a_finetuning_pair_of_images_with_different_box_counts_is_padded_and_masked():
    """An NLVR2-style example whose two images have 5 and 3 boxes, batched with a 6-box one: every image row is
    padded to 6 and masked; the model's answer for each row equals that image alone, unpadded."""
    from lxm.model import LxmertForFinetuning
    from lxm.model.tokenizer import LxmertTokenizer
    from lxm.train.finetune_data import collate_finetune, encode_example

    cfg = lxmert_tiny(num_qa_labels=4, vocab_size=30522, task_mask_lm=False, task_matched=False,
                      task_obj_predict=False)
    rng = np.random.default_rng(1)

    def image(img_id: str, k: int):
        xy = rng.random((k, 2), np.float32) * 50
        rec = ImageFeatures(img_id, 100, 100, rng.integers(0, 10, k), rng.random(k, np.float32),
                            rng.integers(0, 6, k), rng.random(k, np.float32), np.concatenate([xy, xy + 40], 1),
                            rng.standard_normal((k, cfg.visual_feat_dim)).astype(np.float32))
        return rec, rec.normalized_boxes()

    tok = LxmertTokenizer(str(BERT_VOCAB), max_length=12)
    five, three, six = image("x", 5), image("y", 3), image("z", 6)
    pair = encode_example("p", "two dogs", [five, three], tok)
    assert pair.visual_feats.shape[:2] == (2, 5) and pair.box_counts == [5, 3]
    batch = collate_finetune([pair, encode_example("q", "a cat", [six], tok)])
    assert batch.visual_attention_mask.tolist() == [[1] * 5 + [0], [1] * 3 + [0] * 3, [1] * 6]
    torch.manual_seed(0)
    model = LxmertForFinetuning(cfg).eval()
    with torch.no_grad():
        together = model(**batch.model_inputs()).pooled_output
        for row, (text, img) in enumerate((("two dogs", five), ("two dogs", three), ("a cat", six))):
            alone = collate_finetune([encode_example("s", text, [img], tok)])
            assert alone.visual_attention_mask is None
            torch.testing.assert_close(together[row], model(**alone.model_inputs()).pooled_output[0], rtol=1e-5,
                                       atol=1e-5)
