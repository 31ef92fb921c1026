"""Run configs (lxm.train.config): presets picked by name, None for "unset" through YAML and --set, the nested
`losses` section, and the resolved config a run writes loading back unchanged."""

from __future__ import annotations

import dataclasses
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
    # the paper's runs (paper/...) are tested in tests/test_paper_presets.py
    assert {n for n in PRETRAIN_PRESETS if not n.startswith("paper/")} == {"base", "tiny"}
    assert set(FINETUNE_PRESETS) == {"paper", "tiny"}
    for name, preset in (("base", pretrain_base), ("tiny", pretrain_tiny), (None, pretrain_base)):
        loaded = load_config(name, REQUIRED)
        assert loaded.corpus == "c" and loaded.features == ["f"]
        assert {**vars(loaded), "corpus": "", "features": []} == vars(preset())
    assert (pretrain_tiny().model, pretrain_tiny().optim.batch_size, pretrain_base().optim.batch_size) == ("tiny", 8,
                                                                                                       256)
    for task in ("vqa", "gqa", "nlvr2"):
        for name, preset in (("paper", finetune_paper), ("tiny", finetune_tiny), (None, finetune_paper)):
            loaded = load_finetune_config(task, name, [*REQUIRED, "init=x"])
            assert {**vars(loaded), "corpus": "", "features": [], "init": None} == vars(preset(task))
    # tiny keeps the task's recipe splits; only the sizes change
    assert finetune_tiny("gqa").train_splits == ["train", "valid"] and finetune_tiny("gqa").optim.lr == 1e-3
    with pytest.raises(ConfigError, match=r"neither a preset \(base, tiny, paper/lxmert, .*\) nor a YAML file"):
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
    assert (cfg.dropout, cfg.valid_split, cfg.optim.micro_batch_size, cfg.max_steps, cfg.answers) == (
        None, None, 4, None, None)
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
    with pytest.raises(ConfigError, match="'optim.micro_batch_size' must be positive, got 0"):
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

    assert load_config("tiny", REQUIRED).runtime.num_workers == 0  # the tiny preset's
    assert load_config("base", REQUIRED).runtime.num_workers is None  # automatic
    assert loader_workers(None, torch.device("cpu")) == 0  # the step's threads use every core
    assert loader_workers(None, torch.device("cuda")) == max(0, min(4, (os.cpu_count() or 1) - 1))
    assert loader_workers(3, torch.device("cpu")) == 3
    with pytest.raises(ConfigError, match="'runtime.num_workers' must be >= 0"):
        load_config("base", [*REQUIRED, "num_workers=-1"]).validate()
    assert load_config("base", [*REQUIRED, "num_workers=null"]).runtime.num_workers is None


# a finetuning run's config.yaml as lxm wrote it before the optim / runtime sections (commit f0a3a3d, finetune_tiny
# of vqa with corpus, features, init and vocab set), and before `cpu_kernels` existed: it must load unchanged
FLAT_RUN_CONFIG = """\
task: vqa
corpus: corpus
data: {}
min_answer_count: 1
features:
- feats
vocab: vocab.txt
init: runs/pre
from_scratch: false
model: tiny
init_answers: null
train_splits:
- train
- nominival
valid_split: minival
max_length: 20
num_workers: 0
dropout: null
batch_size: 8
micro_batch_size: null
eval_batch_size: 16
epochs: 1
optimizer: bert
lr: 0.001
warmup: 0.1
weight_decay: 0.01
clip_grad_norm: 5.0
precision: fp32
compile: false
fused_optimizer: false
seed: 9595
log_every: 1
device: auto
keep_freed_memory: true
"""


def test_an_older_runs_flat_config_loads_as_todays_nested_one(tmp_path):
    """Run folders written before the sections (and before `cpu_kernels`) load: the bare keys land in their
    sections, the later key takes its default; a key missing from such a file is still damage."""
    from lxm.train.config import ADDED_LATER, load_run_config

    path = tmp_path / "config.yaml"
    path.write_text(FLAT_RUN_CONFIG)
    loaded = load_run_config(path)
    expected = dataclasses.replace(finetune_tiny("vqa"), corpus="corpus", features=["feats"], init="runs/pre",
                                   vocab="vocab.txt")
    assert loaded == expected and ADDED_LATER == ("runtime.cpu_kernels", "objectives", "qa_weight")
    assert (loaded.optim.lr, loaded.runtime.log_every, loaded.runtime.cpu_kernels) == (1e-3, 1, None)
    # written back in today's layout, it loads to the same config
    path.write_text(loaded.to_yaml())
    assert set(yaml.safe_load(path.read_text())) >= {"optim", "runtime"} and load_run_config(path) == loaded
    path.write_text(FLAT_RUN_CONFIG.replace("seed: 9595\n", ""))
    with pytest.raises(ConfigError, match="incomplete run config .no runtime.seed"):
        load_run_config(path)
    written = yaml.safe_load(pretrain_tiny().to_yaml()) | {"corpus": "c", "features": ["f"]}
    del written["runtime"]["cpu_kernels"]
    path.write_text(yaml.safe_dump(written))
    assert load_run_config(path).runtime.cpu_kernels is None
    del written["optim"]["lr"]
    path.write_text(yaml.safe_dump(written))
    with pytest.raises(ConfigError, match="incomplete run config .no optim.lr"):
        load_run_config(path)


def test_shared_groups_nest_with_bare_keys_literal_choices_and_one_validation(tmp_path):
    from lxm.train.config import OptimConfig, PretrainConfig, RuntimeConfig

    # the bare key is the dotted one, on the command line and in a YAML file
    assert load_config("tiny", [*REQUIRED, "lr=2e-5"]) == load_config("tiny", [*REQUIRED, "optim.lr=2e-5"])
    path = tmp_path / "run.yaml"
    path.write_text("corpus: c\nfeatures: [f]\nlr: 2e-5\nruntime:\n  precision: bf16\n")
    cfg = load_config(str(path))
    assert (cfg.optim.lr, cfg.runtime.precision, cfg.optim.batch_size) == (2e-5, "bf16", 256)
    path.write_text("corpus: c\nfeatures: [f]\nlr: 2e-5\noptim:\n  lr: 1e-5\n")
    with pytest.raises(ConfigError, match=rf"{path}: 'lr' is given twice, as 'lr' and as 'optim.lr'"):
        load_config(str(path))
    # closed choices are Literal fields: refused on --set, in YAML, and in a config built in Python
    with pytest.raises(ConfigError, match=r"--set precision=fp16: expected one of 'fp32', 'bf16', 'bf16-autocast'"):
        load_config("tiny", [*REQUIRED, "precision=fp16"])
    path.write_text("corpus: c\nfeatures: [f]\noptim: {optimizer: sgd}\n")
    with pytest.raises(ConfigError, match=rf"{path}: 'optim.optimizer': expected one of 'bert', 'adamw'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"config: 'runtime.precision' must be one of \('fp32', 'bf16', "):
        PretrainConfig(corpus="c", features=["f"], runtime=RuntimeConfig(precision="fp16")).validate()
    # one validation per group, whichever run config holds it
    for bad, message in ((OptimConfig(warmup=1.5), "'optim.warmup' must be in"),
                         (OptimConfig(batch_size=0), "'optim.batch_size' must be positive")):
        with pytest.raises(ConfigError, match=message):
            PretrainConfig(corpus="c", features=["f"], optim=bad).validate()
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(finetune_paper("vqa"), corpus="c", features=["f"], init="x", optim=bad).validate()
    with pytest.raises(ConfigError, match=r"--set optim: a section; set its keys \(optim.batch_size, "):
        load_config("tiny", [*REQUIRED, "optim=1"])


def test_every_runs_config_is_read_strictly(tmp_path):
    """The readers of another run's config.yaml (an --init run's vocabulary and size, a finetuning run's data
    files) go through the strict loader: an unknown key is named, not dropped."""
    from lxm.train.inits import init_run_config

    run = tmp_path / "pre"
    run.mkdir()
    written = yaml.safe_load(pretrain_tiny().to_yaml()) | {"corpus": "c", "features": ["f"], "vocab": "v.txt"}
    (run / "config.yaml").write_text(yaml.safe_dump(written))
    assert init_run_config(str(run)).vocab == "v.txt"
    assert load_finetune_config("vqa", "paper", [*REQUIRED, f"init={run}"]).vocab == "v.txt"
    (run / "config.yaml").write_text(yaml.safe_dump({**written, "lrr": 1e-4}))
    with pytest.raises(ConfigError, match=rf"{run / 'config.yaml'}: unknown config key\(s\): lrr"):
        load_finetune_config("vqa", "paper", [*REQUIRED, f"init={run}"])
