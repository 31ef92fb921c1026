"""Parity with transformers' LxmertForPreTraining (the reference port, bit-exact with the original given F.gelu).

Random transformers weights are loaded through every supported format (transformers directory, original
`module.bert.` renaming, lxm format written by `lxm convert-checkpoint`) and all outputs and losses are compared.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_inputs, randomize_, tiny_hf_kwargs
from lxm.cli import app
from lxm.model import (
    LxmertConfig,
    PretrainLabels,
    PretrainLossConfig,
    lxmert_tiny,
    load_pretrained,
    pretraining_losses,
    save_lxm,
)

transformers = pytest.importorskip("transformers")

ATOL = RTOL = 1e-5


def _hf_model(seed: int = 0, **overrides):
    cfg = transformers.LxmertConfig(**tiny_hf_kwargs(**overrides))
    torch.manual_seed(seed)
    model = transformers.LxmertForPreTraining(cfg)
    randomize_(model, seed)
    # The randomisation wrote the tied embedding through `lxmert.embeddings`; keep the tie visible to both sides.
    assert model.cls.predictions.decoder.weight.data_ptr() == model.lxmert.embeddings.word_embeddings.weight.data_ptr()
    return model.eval()


def _hf_outputs(hf, inputs):
    """Every output of the transformers model, named as lxm's LxmertOutput."""
    with torch.no_grad():
        base = hf.lxmert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         token_type_ids=inputs["token_type_ids"], visual_feats=inputs["visual_feats"],
                         visual_pos=inputs["visual_boxes"])
        lang, visn, pooled = base.language_output, base.vision_output, base.pooled_output
        mlm, match = hf.cls(lang, pooled)
        vis = hf.obj_predict_head(visn)
        return dict(language_output=lang, vision_output=visn, pooled_output=pooled, mlm_logits=mlm,
                    match_logits=match, obj_logits=vis["obj"], attr_logits=vis["attr"], feat_pred=vis["feat"],
                    answer_logits=hf.answer_head(pooled))


def _assert_outputs_match(model, hf, inputs):
    model.eval()
    expected = _hf_outputs(hf, inputs)
    with torch.no_grad():
        out = model(**inputs)
    for name, ref in expected.items():
        got = getattr(out, name)
        assert got is not None, name
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def _to_original_state_dict(hf) -> dict:
    """airsplay layout: DataParallel 'module.' prefix and 'bert.' where transformers has 'lxmert.'."""
    out = {}
    for k, v in hf.state_dict().items():
        out["module." + ("bert." + k[len("lxmert."):] if k.startswith("lxmert.") else k)] = v.clone()
    return out


@pytest.fixture(scope="module")
def hf_tiny():
    return _hf_model()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(lxmert_tiny())


def test_hf_directory_parity(tmp_path, hf_tiny, inputs):
    hf_tiny.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    assert model.config == lxmert_tiny()  # config read from config.json + shapes
    _assert_outputs_match(model, hf_tiny, inputs[0])


def test_hf_pytorch_bin_parity(tmp_path, hf_tiny, inputs):
    hf_tiny.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf_tiny.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    _assert_outputs_match(load_pretrained(tmp_path / "hf"), hf_tiny, inputs[0])


def test_original_checkpoint_parity(tmp_path, hf_tiny, inputs):
    path = tmp_path / "Epoch20_LXRT.pth"
    torch.save(_to_original_state_dict(hf_tiny), path)
    # 8-d heads cannot be inferred from shapes (64-d is assumed), so the config is given, as a user would.
    model = load_pretrained(path, config=lxmert_tiny())
    _assert_outputs_match(model, hf_tiny, inputs[0])


def test_original_checkpoint_without_module_prefix(tmp_path, hf_tiny, inputs):
    sd = {k[len("module."):]: v for k, v in _to_original_state_dict(hf_tiny).items()}
    torch.save(sd, tmp_path / "model_LXRT.pth")
    _assert_outputs_match(load_pretrained(tmp_path / "model_LXRT.pth", config=lxmert_tiny()),
                          hf_tiny, inputs[0])


def test_original_finetuned_vqa_checkpoint(tmp_path, hf_tiny, inputs):
    sd = {}
    for k, v in hf_tiny.state_dict().items():
        if k.startswith("lxmert."):
            sd["lxrt_encoder.model.bert." + k[len("lxmert."):]] = v
        elif k.startswith("answer_head."):
            sd[k[len("answer_head."):]] = v
    torch.save(sd, tmp_path / "BEST.pth")
    cfg = lxmert_tiny(task_mask_lm=False, task_matched=False, task_obj_predict=False)
    model = load_pretrained(tmp_path / "BEST.pth", config=cfg).eval()
    expected = _hf_outputs(hf_tiny, inputs[0])
    with torch.no_grad():
        out = model(**inputs[0])
    assert out.mlm_logits is None and out.obj_logits is None
    torch.testing.assert_close(out.answer_logits, expected["answer_logits"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.pooled_output, expected["pooled_output"], atol=ATOL, rtol=RTOL)


def test_lxm_format_via_cli_parity(tmp_path, hf_tiny, inputs):
    hf_tiny.save_pretrained(tmp_path / "hf")
    result = CliRunner().invoke(app, ["convert-checkpoint", str(tmp_path / "hf"), str(tmp_path / "lxm"),
                                      "--to", "lxm"])
    assert result.exit_code == 0, result.output
    assert "loaded" in result.output
    model = load_pretrained(tmp_path / "lxm")
    assert model.config == lxmert_tiny()
    _assert_outputs_match(model, hf_tiny, inputs[0])


def test_round_trip_lxm_hf_lxm_is_lossless(tmp_path, hf_tiny):
    model = load_pretrained(_save(hf_tiny, tmp_path / "hf"))
    save_lxm(model, tmp_path / "a")
    runner = CliRunner()
    assert runner.invoke(app, ["convert-checkpoint", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "hf"]).exit_code == 0
    assert runner.invoke(app, ["convert-checkpoint", str(tmp_path / "b"), str(tmp_path / "c"), "--to", "lxm"]).exit_code == 0
    a = load_pretrained(tmp_path / "a").state_dict()
    c = load_pretrained(tmp_path / "c").state_dict()
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k
    # transformers itself reads what lxm wrote
    back = transformers.LxmertForPreTraining.from_pretrained(tmp_path / "b").eval()
    for k, v in back.state_dict().items():
        assert torch.equal(v, a[k]), k


def test_convert_to_original_loads_back(tmp_path, hf_tiny, inputs):
    src = _save(hf_tiny, tmp_path / "hf")
    result = CliRunner().invoke(app, ["convert-checkpoint", str(src), str(tmp_path / "x_LXRT.pth"), "--to", "original"])
    assert result.exit_code == 0, result.output
    sd = torch.load(tmp_path / "x_LXRT.pth", weights_only=True)
    assert all(k.startswith("module.") for k in sd)
    assert "module.bert.embeddings.word_embeddings.weight" in sd
    assert "module.cls.predictions.decoder.weight" in sd  # written twice, as torch.save of the original does
    _assert_outputs_match(load_pretrained(tmp_path / "x_LXRT.pth", config=lxmert_tiny()),
                          hf_tiny, inputs[0])


def _save(hf, path):
    hf.save_pretrained(path)
    return path


def test_losses_equal_under_matched_conventions(tmp_path, hf_tiny, inputs):
    """transformers' total loss = sum of lxm's named losses when fed the same labels in the same convention."""
    x, lab = inputs
    model = load_pretrained(_save(hf_tiny, tmp_path / "hf")).eval()
    hf_mlm = lab["mlm_labels"].masked_fill(lab["mlm_labels"] == -1, -100)
    hf_ans = lab["answers"].masked_fill(lab["answers"] == -1, -100)
    obj = {"obj": (lab["obj_labels"], lab["obj_conf"]), "attr": (lab["attr_labels"], lab["attr_conf"]),
           "feat": (lab["feat_target"], lab["feat_mask"])}
    with torch.no_grad():
        ref = hf_tiny(input_ids=x["input_ids"], attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"],
                      visual_feats=x["visual_feats"], visual_pos=x["visual_boxes"], labels=hf_mlm, obj_labels=obj,
                      matched_label=lab["matched"], ans=hf_ans).loss
        cfg = PretrainLossConfig(ignore_index=-100, visual_loss_normalizer=6.67)
        ours = pretraining_losses(model(**x), PretrainLabels(**{**lab, "mlm_labels": hf_mlm, "answers": hf_ans}), cfg)
    assert set(ours) == {"mlm", "match", "obj", "attr", "feat", "qa"}
    torch.testing.assert_close(sum(ours.values()), ref, atol=1e-5, rtol=1e-5)
    # original conventions (-1 ignore, 1/0.15) differ from transformers' only by the visual normaliser
    with torch.no_grad():
        orig = pretraining_losses(model(**x), PretrainLabels(**lab))
    for name in ("mlm", "match", "qa"):
        torch.testing.assert_close(orig[name], ours[name])
    for name in ("obj", "attr", "feat"):
        torch.testing.assert_close(orig[name] * (6.67 * 0.15), ours[name])


@pytest.mark.slow
def test_base_config_parity(tmp_path):
    """Default-size parity (0.9 GB of weights): run with `pytest -m slow`."""
    cfg = transformers.LxmertConfig()
    torch.manual_seed(0)
    hf = transformers.LxmertForPreTraining(cfg).eval()
    randomize_(hf, 0, scale=0.02)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    assert model.config == LxmertConfig()
    assert model.num_parameters() == 228_051_752
    inputs, _ = make_inputs(model.config, batch=2, seq=20, boxes=36)
    _assert_outputs_match(model, hf, inputs)


def test_attentions_are_transformers_attentions(tmp_path, hf_tiny, inputs):
    """`output_attentions=True`: every layer's probabilities equal transformers' (`language_attentions`,
    `vision_attentions`, `cross_encoder_attentions`), and asking for them changes no other output."""
    hf_tiny.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf").eval()
    x = dict(inputs[0])
    visual_mask = torch.ones(x["visual_feats"].shape[:2], dtype=torch.long)
    visual_mask[1, 3:] = 0  # padded boxes: they get exactly 0
    with torch.no_grad():
        ref = hf_tiny.lxmert(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                             token_type_ids=x["token_type_ids"], visual_feats=x["visual_feats"],
                             visual_pos=x["visual_boxes"], visual_attention_mask=visual_mask, output_attentions=True)
        out = model(**x, visual_attention_mask=visual_mask, output_attentions=True)
        plain = model(**x, visual_attention_mask=visual_mask)
    for ours, theirs, n in ((out.language_attentions, ref.language_attentions, model.config.l_layers),
                            (out.vision_attentions, ref.vision_attentions, model.config.r_layers),
                            (out.cross_attentions, ref.cross_encoder_attentions, model.config.x_layers)):
        assert len(ours) == len(theirs) == n
        for got, want in zip(ours, theirs):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    b, t = x["input_ids"].shape
    n_boxes = x["visual_feats"].shape[1]
    assert out.cross_attentions[-1].shape == (b, model.config.num_attention_heads, t, n_boxes)
    assert torch.count_nonzero(out.cross_attentions[-1][1, :, :, 3:]) == 0
    torch.testing.assert_close(out.cross_attentions[-1].sum(-1), torch.ones(b, model.config.num_attention_heads, t))
    for name in ("pooled_output", "mlm_logits", "answer_logits", "vision_output"):
        torch.testing.assert_close(getattr(out, name), getattr(plain, name), atol=ATOL, rtol=RTOL)  # SDPA vs written out
    assert plain.cross_attentions is None and plain.language_attentions is None
