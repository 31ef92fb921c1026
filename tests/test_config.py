"""Run configs (lxm.train.config): presets picked by name, None for "unset" through YAML and --set, the nested
`losses` section, and the resolved config a run writes loading back unchanged."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import BERT_VOCAB
from lxm.cli import app
from lxm.errors import ConfigError
from lxm.model import PretrainLossConfig
from lxm.train.config import (
    FINETUNE_PRESETS,
    PRETRAIN_PRESETS,
    FinetuneConfig,
    finetune_paper,
    finetune_tiny,
    load_config,
    load_finetune_config,
    pretrain_base,
    pretrain_tiny,
)

REQUIRED = ["corpus=c", "features=[f]"]


def test_presets_are_picked_by_name():
    assert set(PRETRAIN_PRESETS) == {"base", "tiny"} and set(FINETUNE_PRESETS) == {"paper", "tiny"}
    for name, preset in (("base", pretrain_base), ("tiny", pretrain_tiny), (None, pretrain_base)):
        loaded = load_config(name, REQUIRED)
        assert loaded.corpus == "c" and loaded.features == ["f"]
        assert {**vars(loaded), "corpus": "", "features": []} == vars(preset())
    assert (pretrain_tiny().model, pretrain_tiny().batch_size, pretrain_base().batch_size) == ("tiny", 8, 256)
    for task in ("vqa", "gqa", "nlvr2"):
        for name, preset in (("paper", finetune_paper), ("tiny", finetune_tiny), (None, finetune_paper)):
            loaded = load_finetune_config(task, name, [*REQUIRED, "init=x"])
            assert {**vars(loaded), "corpus": "", "features": [], "init": None} == vars(preset(task))
    # tiny keeps the task's recipe splits; only the sizes change
    assert finetune_tiny("gqa").train_splits == ["train", "valid"] and finetune_tiny("gqa").lr == 1e-3
    with pytest.raises(ConfigError, match="neither a preset .base, tiny. nor a YAML file"):
        load_config("huge", REQUIRED)
    with pytest.raises(ConfigError, match="neither a preset .paper, tiny. nor a YAML file"):
        load_finetune_config("vqa", "base", REQUIRED)
    with pytest.raises(ConfigError, match="'task' must be one of"):
        load_finetune_config("vqa2", "paper", REQUIRED)
    with pytest.raises(TypeError):  # no default recipe: it would be another task's
        FinetuneConfig(task="gqa")


def test_none_round_trips_through_yaml_and_set(tmp_path):
    cfg = load_config("tiny", [*REQUIRED, "dropout=0.2", "dropout=none", "valid_split=null", "micro_batch_size=4",
                               "max_steps=NULL"])
    assert (cfg.dropout, cfg.valid_split, cfg.micro_batch_size, cfg.max_steps, cfg.answers) == (None, None, 4, None,
                                                                                                 None)
    text = cfg.to_yaml()
    assert "dropout: null" in text and "valid_split: null" in text and "init_bert: null" in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(str(path)) == cfg  # a run's resolved config loads back unchanged
    path.write_text("corpus: c\nfeatures: [f]\ndropout: 0.3\nvalid_split: ~\n")
    assert (load_config(str(path)).dropout, load_config(str(path)).valid_split) == (0.3, None)
    assert load_config(str(path), ["dropout=None"]).dropout is None
    ft = load_finetune_config("nlvr2", "paper", [*REQUIRED, "init=x", "valid_split=none", "lr=2e-5"])
    path.write_text(ft.to_yaml())
    assert ft.valid_split is None and "valid_split: null" in ft.to_yaml()
    assert load_finetune_config("nlvr2", str(path)) == ft
    # None only where a field can be unset; the empty string is no longer an "unset" spelling
    with pytest.raises(ConfigError, match=r"--set epochs=null: expected int, got 'null'"):
        load_config("tiny", [*REQUIRED, "epochs=null"])
    with pytest.raises(ConfigError, match=r"--set valid_split=: empty; write null"):
        load_config("tiny", [*REQUIRED, "valid_split="])
    path.write_text("corpus: c\nfeatures: [f]\nvalid_split: ''\n")
    with pytest.raises(ConfigError, match=rf"{path}: 'valid_split': empty"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="'micro_batch_size' must be positive, got 0"):
        load_config("tiny", [*REQUIRED, "micro_batch_size=0"])


def test_nested_losses_override(tmp_path):
    cfg = load_config("tiny", [*REQUIRED, "losses.feat_loss=l2", "losses.visual_loss_normalizer=2"])
    assert cfg.losses == PretrainLossConfig(feat_loss="l2", visual_loss_normalizer=2.0)
    path = tmp_path / "run.yaml"
    path.write_text("corpus: c\nfeatures: [f]\nlosses:\n  obj_attr_boxes: masked\n  obj_attr_confidence: no\n")
    cfg = load_config(str(path), ["losses.feat_loss=l2"])
    assert cfg.losses == PretrainLossConfig(obj_attr_boxes="masked", obj_attr_confidence=False, feat_loss="l2")
    assert yaml.safe_load(cfg.to_yaml())["losses"]["obj_attr_boxes"] == "masked"
    bad = {"losses.weight=1": r"--set losses.weight: unknown config key \(known: losses.feat_loss, losses.ign",
           "losses.feat_loss=l1": r"--set losses.feat_loss=l1: expected one of 'smoothl1', 'l2', got 'l1'",
           "losses=l2": r"--set losses: a section; set its keys \(losses.feat_loss, ",
           "lr.x=1": r"--set lr.x: unknown config key",
           "losses.ignore_index=-100": r"'losses.ignore_index' must be -1"}
    for item, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", [*REQUIRED, item])
    for text, message in (("losses: l2\n", r"'losses': expected a mapping of ignore_index, "),
                          ("losses: {weight: 1}\n", r"unknown config key\(s\): losses.weight"),
                          ("losses: {feat_loss: 3}\n", r"'losses.feat_loss': expected one of 'smoothl1', 'l2'")):
        path.write_text("corpus: c\nfeatures: [f]\n" + text)
        with pytest.raises(ConfigError, match=f"{path}: {message}"):
            load_config(str(path))


def test_a_run_writes_and_uses_the_nested_losses(data, tmp_path):
    """The losses section reaches the trainer: the same first batch gives a different feature loss with l2, and
    nothing else changes; the run's config.yaml holds the section and null for the unset fields."""
    feat = {}
    for kind in ("smoothl1", "l2"):
        run = tmp_path / kind
        result = CliRunner().invoke(app, [
            "pretrain", "--config", "tiny", "--corpus", str(data / "corpus"), "--features", str(data / "feats"),
            "--out", str(run), "--set", f"vocab={BERT_VOCAB}", "--set", "batch_size=4", "--set", "max_steps=1",
            "--set", "valid_split=none", "--set", f"losses.feat_loss={kind}"])
        assert result.exit_code == 0, result.output
        written = yaml.safe_load((run / "config.yaml").read_text())
        assert written["losses"]["feat_loss"] == kind and written["dropout"] is None
        assert load_config(str(run / "config.yaml")).losses.feat_loss == kind
        first = next(json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"feat"' in line)
        feat[kind] = first
    assert feat["smoothl1"]["mlm"] == feat["l2"]["mlm"] and feat["smoothl1"]["feat"] != feat["l2"]["feat"]


def test_loader_workers_default_to_in_process_on_cpu_and_a_few_with_cuda():
    import os

    import torch

    from lxm.train.run import loader_workers

    assert load_config("tiny", REQUIRED).num_workers == 0  # the tiny preset's
    assert load_config("base", REQUIRED).num_workers is None  # automatic
    assert loader_workers(None, torch.device("cpu")) == 0  # the step's threads use every core
    assert loader_workers(None, torch.device("cuda")) == max(0, min(4, (os.cpu_count() or 1) - 1))
    assert loader_workers(3, torch.device("cpu")) == 3
    with pytest.raises(ConfigError, match="'num_workers' must be >= 0"):
        load_config("base", [*REQUIRED, "num_workers=-1"]).validate()
    assert load_config("base", [*REQUIRED, "num_workers=null"]).num_workers is None


def test_an_older_runs_config_without_the_later_keys_loads_with_their_defaults(tmp_path):
    """A run written before `cpu_kernels` existed resumes (the key takes its default); any other missing key is
    still a damaged file."""
    from lxm.train.config import ADDED_LATER, load_run_config

    path = tmp_path / "config.yaml"
    written = yaml.safe_load(pretrain_tiny().to_yaml()) | {"corpus": "c", "features": ["f"]}
    older = {k: v for k, v in written.items() if k not in ADDED_LATER}
    assert older != written
    path.write_text(yaml.safe_dump(older))
    assert load_run_config(path).cpu_kernels is None
    del older["seed"]
    path.write_text(yaml.safe_dump(older))
    with pytest.raises(ConfigError, match="incomplete run config .no seed"):
        load_run_config(path)
