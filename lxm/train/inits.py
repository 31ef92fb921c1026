"""What a finetuning run takes from its `--init` when that is lxm's own: the WordPiece vocabulary and the model size.

A pretraining run trained its word embeddings on one vocabulary (its config.yaml's `vocab`: the quickstart's is a
small WordPiece vocabulary trained on the synthetic world's text, not bert-base-uncased); a model initialised from
it must read text with the same one, as `lxm.train.tasks.pretraining_answers` takes the run's answer table for the
QA head. The original (airsplay/lxmert) always used bert-base-uncased and had no other vocabulary to find.

`settle_from_init` fills what the user left unset when the config is resolved, so the run's config.yaml records
what is used (the vocabulary `lxm predict` and `lxm ask` read back, the model size), with no Hub lookup for a
vocabulary the init run has.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lxm.train.config import FinetuneConfig, PretrainConfig, load_run_config

# the run layout of lxm.train.run (not imported: lxm.train.config imports this module, and run imports torch)
_MODEL_DIRS = ("model", "best")  # pretraining's RUN/model, finetuning's RUN/best
_ARCHITECTURE = ("hidden_size", "num_attention_heads", "intermediate_size", "l_layers", "x_layers", "r_layers")


def init_run(init: str) -> Path | None:
    """The lxm run directory `init` is or lies in (the run, its model/ or best/, a checkpoint in its checkpoints/ or
    its last.pt); None when `init` is no lxm run's (an original *_LXRT.pth, a transformers directory, a Hub id)."""
    path = Path(init).expanduser()
    for run, inside in ((path, path.is_dir()), (path.parent, path.name in (*_MODEL_DIRS, "last.pt")),
                        (path.parent.parent, path.parent.name == "checkpoints")):
        if inside and (run / "config.yaml").is_file():
            return run
    return None


def init_run_config(init: str) -> PretrainConfig | FinetuneConfig | None:
    """The init run's config (its config.yaml through the strict loader `load_run_config`), or None when `init` is
    no lxm run's; a damaged file is a ConfigError naming it."""
    run = init_run(init)
    return None if run is None else load_run_config(run / "config.yaml")


def preset_of(model_config: dict[str, Any]) -> str | None:
    """The name of the preset (lxm.model.PRESETS) whose architecture (widths, heads, layer counts) a model config
    has, else None."""
    from lxm.model.config import PRESETS

    for name, make in PRESETS.items():
        ref = dataclasses.asdict(make())
        if all(model_config.get(k) == ref[k] for k in _ARCHITECTURE):
            return name
    return None


def init_model_size(init: str) -> str | None:
    """The preset size of an lxm model directory (its config.json), or of an lxm run's model (its model/ or best/,
    else the run config's `model` when that names a preset); None when unknown without reading the weights."""
    path = Path(init).expanduser()
    run = init_run(init)
    dirs = [path] + ([run / d for d in _MODEL_DIRS] if run is not None and run == path else [])
    for d in dirs:
        meta_path = d / "config.json"
        if d.is_dir() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None  # loading the init names the damaged file
            if isinstance(meta, dict) and isinstance(meta.get("model"), dict):
                return preset_of(meta["model"]) or "custom"
            return None
    found = init_run_config(init)
    if found is not None:
        from lxm.model.config import PRESETS

        if found.model in PRESETS:
            return found.model
    return None


def settle_from_init(cfg: FinetuneConfig, changes: dict[str, Any]) -> FinetuneConfig:
    """`cfg` with what an lxm `--init` defines and the user did not set (`changes`: the keys set by the config
    file or --set): `vocab` the init run's vocabulary, `model` the init model's preset size ("custom" for another
    architecture)."""
    if cfg.init is None:
        return cfg
    updates: dict[str, Any] = {}
    if "vocab" not in changes:
        found = init_run_config(cfg.init)
        if found is not None and found.vocab:
            updates["vocab"] = found.vocab
    if "model" not in changes:
        size = init_model_size(cfg.init)
        if size is not None:
            updates["model"] = size
    return dataclasses.replace(cfg, **updates) if updates else cfg
