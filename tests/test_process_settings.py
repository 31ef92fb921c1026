"""Process-wide settings belong to the program (style.md §11): glibc's malloc setting (`keep_freed_memory`,
lxm.memory) is applied by the `lxm pretrain` / `lxm finetune` / `lxm extract` commands, never by building and running
a trainer or calling `extract()`; the glibc effect itself: tests/test_precision.py, in a subprocess. Also the
`cpu_kernels` config key, which reaches the model the trainer builds."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import BERT_VOCAB, FIXTURE
from lxm.cli import app
from synthetic import make_finetune_world, make_pretraining_world


@pytest.fixture
def malloc_calls(monkeypatch):
    """Every call of `lxm.memory.keep_freed_memory` from here on, whatever name an lxm module imported it under."""
    # the modules that might hold the function, imported before looking
    import lxm.cli.common
    import lxm.extract.pipeline
    import lxm.memory
    import lxm.train.finetune
    import lxm.train.pretrain

    original, calls = lxm.memory.keep_freed_memory, []

    def record() -> bool:
        calls.append(1)
        return True

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "lxm" and getattr(module, "keep_freed_memory", None) is original:
            monkeypatch.setattr(module, "keep_freed_memory", record)
    return calls


def test_extract_leaves_malloc_alone_and_lxm_extract_applies_it(tmp_path, malloc_calls):
    from lxm.extract.pipeline import ExtractConfig, extract

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(min((FIXTURE / "images").glob("*.jpg")), folder)
    summary = extract(ExtractConfig(images=str(folder), out=str(tmp_path / "lib"), weights="random", detector="tiny",
                                    num_boxes=10, engine="torch", device="cpu", keep_freed_memory=True))
    assert summary["extracted"] == 1 and malloc_calls == []
    result = CliRunner().invoke(app, ["extract", "--images", str(folder), "--out", str(tmp_path / "cli"), "--weights",
                                      "random", "--detector", "tiny", "--boxes", "10", "--engine", "torch",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert malloc_calls == [1]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    make_pretraining_world(root, images=48)  # 8 training images (the last 40 are minival), 16 sentences
    make_finetune_world(root, train=4, valid=2)  # 8 GQA-like training questions: one step of 8
    return root


def _pretrain(world, out, *sets):
    return ["pretrain", "--config", "tiny", "--corpus", str(world / "corpus"), "--features", str(world / "feats"),
            "--out", str(out), *[a for s in (f"vocab={BERT_VOCAB}", "valid_split=null", "max_steps=1", *sets)
                                 for a in ("--set", s)]]


def _finetune(world, out, *sets):
    return ["finetune", "gqa", "--config", "tiny", "--corpus", str(world / "ft_corpus"), "--features",
            str(world / "ft_feats"), "--out", str(out),
            *[a for s in (f"vocab={BERT_VOCAB}", "from_scratch=true", "train_splits=train", "valid_split=none",
                          "batch_size=8", "epochs=1", *sets) for a in ("--set", s)]]


def _library_run(command: list[str], out):
    """The trainer of `command` built and run through the library, on the command's own config."""
    from lxm.train.config import load_config, load_finetune_config
    from lxm.train.finetune import Finetuner
    from lxm.train.pretrain import Pretrainer

    sets = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
    opts = {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i] in ("--corpus", "--features")}
    sets += [f"corpus={opts['--corpus']}", f"features=[{opts['--features']}]"]
    if command[0] == "pretrain":
        trainer = Pretrainer(load_config("tiny", sets), out, log=lambda m: None)
    else:
        trainer = Finetuner(load_finetune_config(command[1], "tiny", sets), out, log=lambda m: None)
    trainer.run()
    return trainer


@pytest.mark.parametrize("make", [_pretrain, _finetune], ids=["pretrain", "finetune"])
def test_a_trainer_leaves_malloc_alone_and_the_command_applies_it_once(worlds, tmp_path, malloc_calls, make):
    trainer = _library_run(make(worlds, tmp_path / "lib", "device=cpu"), tmp_path / "lib")
    assert trainer.step >= 1 and malloc_calls == []
    result = CliRunner().invoke(app, make(worlds, tmp_path / "cli", "device=cpu"))
    assert result.exit_code == 0, result.output
    assert malloc_calls == [1]


def test_the_commands_apply_it_only_on_the_cpu_and_when_the_config_says_so(malloc_calls):
    from lxm.cli.common import keep_freed_memory_on_cpu
    from lxm.errors import ConfigError

    keep_freed_memory_on_cpu(False, "cpu", "--device")
    assert malloc_calls == []
    keep_freed_memory_on_cpu(True, "cpu", "--device")
    assert malloc_calls == [1]
    if not torch.cuda.is_available():  # "auto" is the CPU here; "cuda" is the device's own one-line error
        keep_freed_memory_on_cpu(True, "auto", "--device")
        assert malloc_calls == [1, 1]
        with pytest.raises(ConfigError, match="config: 'device' cuda: CUDA is not available"):
            keep_freed_memory_on_cpu(True, "cuda", "config: 'device'")
    else:
        keep_freed_memory_on_cpu(True, "cuda", "--device")
        assert malloc_calls == [1]


def test_the_cpu_kernels_key_reaches_the_model_and_its_bf16_copy(monkeypatch):
    from lxm.model import LxmertForPreTraining, lxmert_tiny
    from lxm.model.cpu_kernels import ENV
    from lxm.train.config import load_config
    from lxm.train.run import DistInfo, training_modules

    monkeypatch.delenv(ENV, raising=False)
    for setting, expected, built_with in (("null", None, True), ("false", False, None), ("true", True, False)):
        cfg = load_config("tiny", ["corpus=c", "features=[f]", f"cpu_kernels={setting}", "precision=bf16"])
        assert cfg.runtime.cpu_kernels is expected and f"cpu_kernels: {setting}" in cfg.to_yaml()  # OUT/config.yaml
        model = LxmertForPreTraining(lxmert_tiny(), cpu_kernels=built_with)
        replica, _ = training_modules(model, cfg.runtime, DistInfo(), torch.device("cpu"))
        assert model.cpu_kernels is expected and replica.module.cpu_kernels is expected, setting


def test_cpu_kernels_may_change_on_resume():  # it changes how dropout and attention are computed, not what
    from lxm.train.config import load_config, resume_changes

    run_cfg = load_config("tiny", ["corpus=c", "features=[f]"])
    changed = load_config("tiny", ["corpus=c", "features=[f]", "cpu_kernels=false"])
    assert run_cfg.runtime.cpu_kernels is None
    assert resume_changes(run_cfg, changed, "RUN/config.yaml") == {"runtime.cpu_kernels": (None, False)}
