"""Strict checkpoint loading: every gap is an error naming the keys; unsafe files are refused (LXMERT checkpoints,
and the detector's anchors stored beside its weights)."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle

import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED, randomize_
from lxm.cli import app
from lxm.extract.detector import GeneralizedRCNN, detector_tiny
from lxm.extract.weights import WeightsError, load_detector_weights
from lxm.model import (
    CheckpointError,
    LxmertForPreTraining,
    load_pretrained,
    load_pretrained_with_report,
    lxmert_tiny,
    save_lxm,
    save_original,
)


@pytest.fixture()
def original_ckpt(tmp_path):
    """An airsplay-style *_LXRT.pth of a random tiny model (written by lxm's own writer)."""
    torch.manual_seed(0)
    model = randomize_(LxmertForPreTraining(lxmert_tiny()), 11)
    path = save_original(model, tmp_path / "Epoch01_LXRT.pth")
    return path, model


def _sd(path):
    return torch.load(path, weights_only=True)


def test_loaded_tensors_equal_the_checkpoint(original_ckpt):
    path, model = original_ckpt
    loaded, report = load_pretrained_with_report(path, config=lxmert_tiny())
    assert report.ok and report.format == "original"
    assert len(report.loaded) == len(model.state_dict()) - 1  # the tied decoder is verified, not copied twice
    assert report.tied == ["cls.predictions.decoder.weight"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_loading_prints_nothing_and_logs_the_report(original_ckpt, capfd, caplog):
    """The library returns the report and logs it; only the program prints (a notebook gets no stray stderr)."""
    with caplog.at_level(logging.DEBUG, logger="lxm.model.weights"):
        model = load_pretrained(original_ckpt[0], config=lxmert_tiny())
        _, report = load_pretrained_with_report(original_ckpt[0], config=lxmert_tiny())
    assert capfd.readouterr() == ("", "")
    assert report.summary() in caplog.text and "format: original" in report.summary()
    assert model.config == lxmert_tiny()


def test_missing_backbone_key_fails_naming_it(original_ckpt, tmp_path):
    sd = _sd(original_ckpt[0])
    del sd["module.bert.encoder.x_layers.1.visn_self_att.output.dense.bias"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"MISSING.*lxmert\.encoder\.x_layers\.1\.visn_self_att\.output\.dense\.bias"):
        load_pretrained(tmp_path / "m.pth", config=lxmert_tiny())


def test_extra_key_fails_naming_it(original_ckpt, tmp_path):
    sd = _sd(original_ckpt[0])
    sd["module.bert.encoder.lang_attention.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"UNEXPECTED.*lxmert\.encoder\.lang_attention\.weight"):
        load_pretrained(tmp_path / "x.pth", config=lxmert_tiny())


def test_mis_shaped_key_fails_naming_it_and_both_shapes(original_ckpt, tmp_path):
    sd = _sd(original_ckpt[0])
    sd["module.bert.pooler.dense.weight"] = torch.zeros(32, 31)
    torch.save(sd, tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match=r"lxmert\.pooler\.dense\.weight checkpoint \(32, 31\) vs model \(32, 32\)"):
        load_pretrained(tmp_path / "s.pth", config=lxmert_tiny())


def test_wrong_config_fails_instead_of_partial_load(original_ckpt):
    with pytest.raises(CheckpointError, match="MISSING"):
        load_pretrained(original_ckpt[0], config=lxmert_tiny(l_layers=3))


def test_untied_decoder_is_refused(original_ckpt, tmp_path):
    sd = _sd(original_ckpt[0])
    sd["module.cls.predictions.decoder.weight"] = sd["module.cls.predictions.decoder.weight"] + 1
    torch.save(sd, tmp_path / "u.pth")
    with pytest.raises(CheckpointError, match="ties the MLM decoder"):
        load_pretrained(tmp_path / "u.pth", config=lxmert_tiny())


def test_new_heads_only_on_request(original_ckpt):
    cfg = lxmert_tiny(task_nlvr2=True)
    with pytest.raises(CheckpointError, match=r"MISSING.*nlvr2_head"):
        load_pretrained(original_ckpt[0], config=cfg)
    model, report = load_pretrained_with_report(original_ckpt[0], config=cfg, init_missing_heads=True)
    assert report.initialised and all(k.startswith("nlvr2_head.") for k in report.initialised)
    assert "initialised fresh" in report.summary()


def test_extra_heads_dropped_only_on_request(original_ckpt):
    cfg = lxmert_tiny(task_qa=False)
    with pytest.raises(CheckpointError, match=r"UNEXPECTED.*answer_head"):
        load_pretrained(original_ckpt[0], config=cfg)
    _, report = load_pretrained_with_report(original_ckpt[0], config=cfg, ignore_extra_heads=True)
    assert sorted(report.ignored)[0].startswith("answer_head.")


def test_missing_backbone_key_fails_even_with_head_leniency(original_ckpt, tmp_path):
    sd = _sd(original_ckpt[0])
    del sd["module.bert.embeddings.LayerNorm.weight"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"lxmert\.embeddings\.LayerNorm\.weight"):
        load_pretrained(tmp_path / "m.pth", config=lxmert_tiny(), init_missing_heads=True, ignore_extra_heads=True)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_execute_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"module.bert.embeddings.word_embeddings.weight": torch.zeros(2, 2), "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_pretrained(path)


def test_plain_pickle_files_are_refused(tmp_path):
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"model": {}}))
    with pytest.raises(CheckpointError, match="unsupported checkpoint file type '.pkl'"):
        load_pretrained(path)


def test_non_lxmert_checkpoint_is_named(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not an LXMERT checkpoint"):
        load_pretrained(tmp_path / "resnet.pth")


def test_missing_path_and_bad_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_pretrained(tmp_path / "nope_LXRT.pth")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="expected config.json and model.safetensors.*notes.txt"):
        load_pretrained(tmp_path / "d")


def test_hub_id_offline_says_how_to_proceed(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time, unlike the env var
    with pytest.raises(CheckpointError, match="pass its local path"):
        load_pretrained("unc-nlp/lxmert-base-uncased")


def test_lxm_format_keeps_its_config(tmp_path):
    cfg = lxmert_tiny(num_qa_labels=3, task_nlvr2=True)
    model = LxmertForPreTraining(cfg)
    save_lxm(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["format"] == "lxm" and meta["model"]["num_qa_labels"] == 3
    assert not any(p.name.startswith(".") for p in (tmp_path / "ck").iterdir())  # no temp files left behind
    assert load_pretrained(tmp_path / "ck").config == cfg


def test_cli_reports_errors_without_traceback(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    result = CliRunner().invoke(app, ["convert-checkpoint", str(tmp_path / "resnet.pth"), str(tmp_path / "o"),
                                      "--to", "lxm"])
    assert result.exit_code == 1
    assert "not an LXMERT checkpoint" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_refuses_hf_export_of_nlvr2_head_before_writing(tmp_path):
    save_lxm(LxmertForPreTraining(lxmert_tiny(task_nlvr2=True)), tmp_path / "n")
    result = CliRunner().invoke(app, ["convert-checkpoint", str(tmp_path / "n"), str(tmp_path / "h"), "--to", "hf"])
    assert result.exit_code == 1 and "NLVR2" in result.output
    assert not (tmp_path / "h").exists()


def test_bert_initialisation_fills_the_bert_parts(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=1200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = transformers.BertForPreTraining(cfg)
    randomize_(bert, 5)
    bert.save_pretrained(tmp_path / "bert")
    from lxm.model.weights import init_from_bert

    model = LxmertForPreTraining(lxmert_tiny())
    visn_before = model.lxmert.encoder.visn_fc.visn_fc.weight.clone()
    report = init_from_bert(model, tmp_path / "bert")
    sd = bert.state_dict()
    assert torch.equal(model.lxmert.encoder.layer[1].output.dense.weight, sd["bert.encoder.layer.1.output.dense.weight"])
    assert torch.equal(model.lxmert.embeddings.word_embeddings.weight, sd["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.cls.seq_relationship.weight, sd["cls.seq_relationship.weight"])
    assert torch.equal(model.lxmert.encoder.visn_fc.visn_fc.weight, visn_before)  # not a BERT part: untouched
    assert any(k.startswith("lxmert.encoder.x_layers.") for k in report.initialised)
    small = LxmertForPreTraining(lxmert_tiny(l_layers=1))
    with pytest.raises(CheckpointError, match="lxmert.encoder.layer.1"):
        init_from_bert(small, tmp_path / "bert")


# --- detector weights: the anchors a file carries (transformers' FRCNN keeps them in its state dict) ---------------

ANCHORS = "proposal_generator.anchor_generator.cell_anchors.0"


def _d2_cell_anchors(sizes, ratios) -> torch.Tensor:
    """detectron2's DefaultAnchorGenerator.generate_cell_anchors, written out: size-major, centred at 0."""
    cell = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size**2.0 / ratio)
            cell.append([-w / 2.0, -ratio * w / 2.0, w / 2.0, ratio * w / 2.0])
    return torch.tensor(cell)


def _detector_file(tmp_path, anchors: torch.Tensor):
    src = GeneralizedRCNN(detector_tiny())
    src.init_random(6)
    sd = dict(src.state_dict())
    sd[ANCHORS] = anchors
    torch.save(sd, tmp_path / "pytorch_model.bin")
    return tmp_path / "pytorch_model.bin"


def test_stored_anchors_equal_to_the_generated_ones_load(tmp_path):
    cfg = detector_tiny()
    path = _detector_file(tmp_path, _d2_cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios))
    report = load_detector_weights(GeneralizedRCNN(cfg), str(path))
    assert ANCHORS in report.summary()


def test_stored_anchors_that_differ_are_an_error_naming_the_key(tmp_path):
    cfg = detector_tiny()
    # Caffe's centring (py-faster-rcnn generate_anchors puts the cell centre at (7.5, 7.5)): same shapes, other boxes
    path = _detector_file(tmp_path, _d2_cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios) + 7.5)
    with pytest.raises(WeightsError, match=rf"{path}: .*anchors differ.*{ANCHORS.replace('.', '[.]')}.*7[.]5 px"):
        load_detector_weights(GeneralizedRCNN(cfg), str(path))
    images = SHARED / "fixtures" / "butd-coco-sample" / "images"
    result = CliRunner().invoke(app, ["extract", "--images", str(images), "--out", str(tmp_path / "s"),
                                      "--weights", str(path), "--detector", "tiny"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and ANCHORS in errors[0] and "Traceback" not in result.output


def test_stored_anchors_of_another_shape_are_an_error(tmp_path):
    path = _detector_file(tmp_path, _d2_cell_anchors((32, 64, 128, 256, 512), (0.5, 1.0, 2.0)))
    with pytest.raises(WeightsError, match=r"anchors differ.*cell_anchors[.]0 file \(15, 4\) vs generated \(12, 4\)"):
        load_detector_weights(GeneralizedRCNN(detector_tiny()), str(path))


def test_anchors_of_other_feature_levels_are_unexpected(tmp_path):
    cfg = detector_tiny()
    path = _detector_file(tmp_path, _d2_cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios))
    sd = torch.load(path, weights_only=True)
    sd["proposal_generator.anchor_generator.cell_anchors.1"] = sd[ANCHORS] * 2
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"unexpected \(1\): proposal_generator[.]anchor_generator[.]cell_anchors[.]1"):
        load_detector_weights(GeneralizedRCNN(cfg), str(path))
