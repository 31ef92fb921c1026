"""Model invariants: sizes and key names of the released model, gradients, padding, heads, packed losses."""

from __future__ import annotations

import pytest
import torch

from conftest import HF_KEYS, make_inputs, randomize_
from lxm.model import (
    LOSS_NAMES,
    LxmertConfig,
    LxmertForPreTraining,
    PretrainLabels,
    PretrainLossConfig,
    lxmert_base,
    lxmert_tiny,
    pretraining_losses,
    pretraining_step_losses,
)
from lxm.model.weights import expected_shapes


def _reference_keys(section: str) -> list[tuple[str, tuple[int, ...]]]:
    text = HF_KEYS.read_text().split(f"## {section}:")[1].split("\n## ")[0]
    rows = [line.split("\t") for line in text.strip().splitlines()[1:] if line.strip()]
    return [(key, tuple(int(x) for x in shape.strip("()").split(",") if x.strip())) for key, shape, _ in rows]


def test_base_model_has_the_original_parameter_count():
    with torch.device("meta"):
        model = LxmertForPreTraining(lxmert_base(), init_weights=False)
    assert model.num_parameters() == 228_051_752  # lxmert.md §1.4 / §11.2: model_LXRT.pth, 869.9 MiB fp32


def test_base_state_dict_matches_transformers_key_list_in_order():
    ours = list(expected_shapes(lxmert_base()).items())
    assert ours == _reference_keys("LxmertForPreTraining")  # 473 entries incl. the tied decoder


def test_qa_only_model_matches_transformers_question_answering_keys():
    cfg = lxmert_base(task_mask_lm=False, task_matched=False, task_obj_predict=False)
    assert list(expected_shapes(cfg).items()) == _reference_keys("LxmertForQuestionAnswering")


def test_decoder_is_tied_to_word_embeddings():
    model = LxmertForPreTraining(lxmert_tiny())
    assert model.cls.predictions.decoder.weight is model.lxmert.embeddings.word_embeddings.weight


def test_init_follows_init_bert_weights():
    torch.manual_seed(0)
    model = LxmertForPreTraining(lxmert_base(l_layers=1, x_layers=1, r_layers=1))
    w = model.lxmert.encoder.layer[0].intermediate.dense.weight
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert torch.count_nonzero(model.lxmert.encoder.layer[0].intermediate.dense.bias) == 0
    ln = model.lxmert.embeddings.LayerNorm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert torch.count_nonzero(model.cls.predictions.bias) == 0


def test_every_parameter_gets_a_gradient_from_the_summed_pretraining_loss():
    torch.manual_seed(0)
    cfg = lxmert_tiny(task_nlvr2=True)
    model = randomize_(LxmertForPreTraining(cfg), 3).train()
    inputs, labels = make_inputs(cfg)
    losses, out = pretraining_step_losses(model, PretrainLabels(**labels), **inputs)
    assert set(losses) == set(LOSS_NAMES)
    total = sum(losses.values()) + out.pair_logits.logsumexp(-1).sum()
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not torch.any(p.grad != 0)]
    assert no_grad == []
    # The original's padding_idx=0 quirk: LXMERT feeds only token type 0, whose row never gets a gradient.
    assert zero == ["lxmert.embeddings.token_type_embeddings.weight"]
    assert torch.count_nonzero(model.lxmert.embeddings.position_embeddings.weight.grad[0]) == 0
    assert torch.count_nonzero(model.lxmert.embeddings.position_embeddings.weight.grad[1]) > 0


def test_padded_text_gives_finite_outputs_and_padding_does_not_leak():
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    model = randomize_(LxmertForPreTraining(cfg), 4).eval()
    inputs, _ = make_inputs(cfg, pad=(0, 2, 4, 9))
    with torch.no_grad():
        out = model(**inputs)
        for name in ("language_output", "vision_output", "pooled_output", "mlm_logits", "obj_logits", "answer_logits"):
            assert torch.isfinite(getattr(out, name)).all(), name
        # changing padded token ids must not change any real position, the vision stream or the pooled output
        changed = dict(inputs)
        ids = inputs["input_ids"].clone()
        ids[inputs["attention_mask"] == 0] = 7
        changed["input_ids"] = ids
        out2 = model(**changed)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out2.language_output[real], out.language_output[real])
    torch.testing.assert_close(out2.vision_output, out.vision_output)
    torch.testing.assert_close(out2.pooled_output, out.pooled_output)


def test_packed_text_equals_padded_text_at_every_real_position():
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    model = randomize_(LxmertForPreTraining(cfg), 12).eval()
    inputs, _ = make_inputs(cfg, pad=(0, 3, 7, 10))
    with torch.no_grad():
        dense = model(**inputs)
        packed = model(**inputs, pack_text=True)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(packed.language_output[real], dense.language_output[real], atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(packed.language_output[~real]) == 0
    for name in ("vision_output", "pooled_output", "match_logits", "obj_logits", "attr_logits", "feat_pred",
                 "answer_logits"):
        torch.testing.assert_close(getattr(packed, name), getattr(dense, name), atol=1e-6, rtol=1e-6)


def test_visual_attention_mask_hides_masked_boxes():
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    model = randomize_(LxmertForPreTraining(cfg), 5).eval()
    inputs, _ = make_inputs(cfg)
    vmask = torch.ones(4, 5, dtype=torch.long)
    vmask[:, -2:] = 0
    with torch.no_grad():
        a = model(**inputs, visual_attention_mask=vmask)
        feats = inputs["visual_feats"].clone()
        feats[:, -2:] = 100.0
        b = model(**{**inputs, "visual_feats": feats}, visual_attention_mask=vmask)
    torch.testing.assert_close(a.pooled_output, b.pooled_output)
    torch.testing.assert_close(a.vision_output[:, :3], b.vision_output[:, :3])


def test_packed_losses_equal_dense_losses():
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    model = randomize_(LxmertForPreTraining(cfg), 6).eval()
    inputs, raw = make_inputs(cfg)
    labels = PretrainLabels(**raw)
    with torch.no_grad():
        dense_out = model(**inputs)
        dense = pretraining_losses(dense_out, labels)
        packed, packed_out = pretraining_step_losses(model, labels, **inputs)
    assert packed_out.mlm_logits.shape == (int((raw["mlm_labels"] != -1).sum()), cfg.vocab_size)
    assert packed_out.feat_pred.shape == (int((raw["feat_mask"] != 0).sum()), cfg.visual_feat_dim)
    assert dense_out.mlm_logits.shape == (4, 12, cfg.vocab_size)
    for name in LOSS_NAMES:
        torch.testing.assert_close(packed[name], dense[name], atol=1e-6, rtol=1e-6)


def _manual_visual_losses(out, lab, normalizer):
    """The original's loop (modeling.py L954-975), written out per box."""
    b, n = lab["obj_labels"].shape
    obj = attr = feat = 0.0
    for i in range(b):
        for j in range(n):
            lo = -torch.log_softmax(out.obj_logits[i, j], -1)[lab["obj_labels"][i, j]]
            la = -torch.log_softmax(out.attr_logits[i, j], -1)[lab["attr_labels"][i, j]]
            d = out.feat_pred[i, j] - lab["feat_target"][i, j]
            sl1 = torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5).mean()
            obj += lo * lab["obj_conf"][i, j]
            attr += la * lab["attr_conf"][i, j]
            feat += sl1 * lab["feat_mask"][i, j]
    return obj / (b * n) * normalizer, attr / (b * n) * normalizer, feat / (b * n) * normalizer


def test_visual_losses_follow_the_original_code_by_default():
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    model = randomize_(LxmertForPreTraining(cfg), 7).eval()
    inputs, lab = make_inputs(cfg)
    with torch.no_grad():
        out = model(**inputs)
        losses = pretraining_losses(out, PretrainLabels(**lab))
        obj, attr, feat = _manual_visual_losses(out, lab, 1 / 0.15)
    torch.testing.assert_close(losses["obj"], obj)
    torch.testing.assert_close(losses["attr"], attr)
    torch.testing.assert_close(losses["feat"], feat)


def test_paper_variants_change_the_visual_losses_as_named():
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    model = randomize_(LxmertForPreTraining(cfg), 8).eval()
    inputs, lab = make_inputs(cfg)
    labels = PretrainLabels(**lab)
    with torch.no_grad():
        out = model(**inputs)
        masked = pretraining_losses(out, labels, PretrainLossConfig(obj_attr_boxes="masked", obj_attr_confidence=False))
        l2 = pretraining_losses(out, labels, PretrainLossConfig(feat_loss="l2"))
    ce = torch.nn.functional.cross_entropy(out.obj_logits.reshape(-1, cfg.num_object_labels),
                                           lab["obj_labels"].reshape(-1), reduction="none")
    expected_masked = (ce * lab["feat_mask"].reshape(-1)).mean() / 0.15
    torch.testing.assert_close(masked["obj"], expected_masked)
    se = ((out.feat_pred - lab["feat_target"]) ** 2).mean(-1)
    torch.testing.assert_close(l2["feat"], (se * lab["feat_mask"]).mean() / 0.15)


def test_all_ignored_labels_give_zero_not_nan():
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    model = LxmertForPreTraining(cfg).eval()
    inputs, lab = make_inputs(cfg)
    lab["mlm_labels"] = torch.full_like(lab["mlm_labels"], -1)
    lab["answers"] = torch.full_like(lab["answers"], -1)
    lab["feat_mask"] = torch.zeros_like(lab["feat_mask"])
    losses, _ = pretraining_step_losses(model, PretrainLabels(**lab), **inputs)
    for name in ("mlm", "qa", "feat"):
        assert losses[name].item() == 0.0, name
    assert all(torch.isfinite(v) for v in losses.values())


def test_object_and_attribute_labels_of_minus_one_are_ignored_as_in_the_original():
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    model = randomize_(LxmertForPreTraining(cfg), 9).eval()
    inputs, lab = make_inputs(cfg)
    lab["obj_labels"][0, :3] = -1
    lab["attr_labels"][1, 1:] = -1
    out = model(**inputs)
    losses = pretraining_losses(out, PretrainLabels(**lab))
    # the original (CrossEntropyLoss(ignore_index=-1, reduction="none")): an ignored box contributes 0 and still
    # counts in the mean over all B*N boxes
    b, n = lab["obj_labels"].shape
    for name, logits, ids, conf in (("obj", out.obj_logits, lab["obj_labels"], lab["obj_conf"]),
                                    ("attr", out.attr_logits, lab["attr_labels"], lab["attr_conf"])):
        keep = ids != -1
        ce = -torch.log_softmax(logits[keep], -1).gather(1, ids[keep][:, None])[:, 0]
        torch.testing.assert_close(losses[name], (ce * conf[keep]).sum() / (b * n) / 0.15)
    losses["obj"].backward()
    assert torch.count_nonzero(model.obj_predict_head.decoder_dict["obj"].weight.grad) > 0
    lab["obj_labels"][:] = -1
    assert pretraining_losses(out, PretrainLabels(**lab))["obj"].item() == 0.0


def test_heads_follow_config_switches():
    cfg = lxmert_tiny(task_mask_lm=False, task_obj_predict=True, visual_feat_loss=False, task_qa=False,
                      task_nlvr2=True)
    model = LxmertForPreTraining(cfg).eval()
    inputs, _ = make_inputs(cfg)
    out = model(**inputs)
    assert out.mlm_logits is None and out.feat_pred is None and out.answer_logits is None
    assert out.obj_logits.shape == (4, 5, cfg.num_object_labels)
    assert out.match_logits.shape == (4, 2)
    assert out.pair_logits.shape == (2, 2)
    keys = set(model.state_dict())
    assert not any(k.startswith(("cls.predictions", "answer_head")) for k in keys)
    assert "obj_predict_head.decoder_dict.feat.weight" not in keys


def test_nlvr2_head_refuses_an_odd_batch():
    cfg = lxmert_tiny(task_nlvr2=True)
    inputs, _ = make_inputs(cfg, batch=3, pad=(0,))
    with pytest.raises(ValueError, match="batch of 3 rows is odd"):  # no silent pair_logits=None
        LxmertForPreTraining(cfg).eval()(**inputs)


def test_nlvr2_head_concatenates_pairs_in_order():
    torch.manual_seed(0)
    cfg = lxmert_tiny(task_nlvr2=True)
    model = randomize_(LxmertForPreTraining(cfg), 9).eval()
    pooled = torch.randn(4, cfg.hidden_size)
    logits = model.nlvr2_head(pooled)
    manual = model.nlvr2_head.logit_fc(torch.cat([pooled[0::2], pooled[1::2]], dim=-1))
    torch.testing.assert_close(logits, manual)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_attention_heads"):
        LxmertConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="l_layers"):
        LxmertConfig(l_layers=-1)
    with pytest.raises(ValueError, match="unknown LxmertConfig field"):
        LxmertConfig.from_dict({"hidden": 3})


def test_config_json_round_trip(tmp_path):
    cfg = lxmert_tiny(task_nlvr2=True, num_qa_labels=3129)
    cfg.save(tmp_path / "c.json")
    assert LxmertConfig.load(tmp_path / "c.json") == cfg


def test_bf16_autocast_forward_backward_is_finite():
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    model = randomize_(LxmertForPreTraining(cfg), 10).train()
    inputs, lab = make_inputs(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = pretraining_step_losses(model, PretrainLabels(**lab), **inputs)
        total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
