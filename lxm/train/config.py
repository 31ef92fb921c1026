"""Run configuration for `lxm pretrain`: one dataclass, YAML files plus `key=value` overrides, unknown keys rejected.

A YAML value is checked against the field's type as a `--set` value is (a string is converted the same way, so
`lr: 1e-4`, which PyYAML reads as a string, is the float); a syntax error names the file and line. Every bad value
is a ConfigError naming the file or `--set` item and the key.

Defaults reproduce `run/lxmert_pretrain.bash` of airsplay/lxmert (lxmert.md §2.1, §2.5): batch 256, lr 1e-4, BertAdam,
warmup 5 %, 20 epochs, clip 1.0, seed 9595, masks 0.15 / 0.15, train on train + nominival + vgnococo, validate on
minival, all five objectives with QA from the first epoch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lxm.errors import ConfigError


@dataclass
class PretrainConfig:
    # --- data
    corpus: str = ""  # directory written by `lxm build-corpus`
    features: list[str] = field(default_factory=list)  # feature store directories
    vocab: str = "bert-base-uncased"  # WordPiece vocabulary (file, directory or Hub id)
    answers: str = ""  # answer table JSON (default: <corpus>/vocab/qa_answers.json)
    train_splits: list[str] = field(default_factory=lambda: ["train", "nominival", "vgnococo"])
    valid_split: str = "minival"  # "" disables validation
    sources: list[str] = field(default_factory=lambda: ["mscoco", "vg", "vqa", "gqa", "vgqa"])
    max_length: int = 20  # tokens incl. [CLS]/[SEP]
    word_mask_rate: float = 0.15
    obj_mask_rate: float = 0.15
    num_workers: int = 2  # DataLoader workers per process
    # --- model
    model: str = "base"  # preset (base, small, tiny) or a checkpoint for load_pretrained
    dropout: float = -1.0  # hidden and attention dropout; -1 keeps the model's (0.1)
    init_bert: str = ""  # BERT checkpoint (HF bert-base-uncased dir/file) for BERT-style init; "" = from scratch
    # --- objectives (lxm.model.losses.PretrainLossConfig)
    qa_start_epoch: int = 0  # code: QA from the first epoch; paper: 10 (QA only in the last 10 of 20 epochs)
    obj_attr_boxes: str = "all"  # "all" (code) or "masked" (paper)
    obj_attr_confidence: bool = True  # weight obj/attr CE by detector confidence (code)
    feat_loss: str = "smoothl1"  # "smoothl1" (code) or "l2" (paper)
    # --- optimisation
    batch_size: int = 256  # global batch (all processes, all accumulation micro-steps)
    micro_batch_size: int = 0  # per process per micro-step; 0 = batch_size / world size (no accumulation)
    epochs: int = 20
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for smoke runs
    optimizer: str = "bert"  # "bert" (BertAdam as the original) or "adamw"
    lr: float = 1e-4
    warmup: float = 0.05
    weight_decay: float = 0.01
    clip_grad_norm: float = 1.0
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    seed: int = 9595
    # --- bookkeeping
    log_every: int = 10  # steps between log lines
    checkpoint_every: int = 1000  # steps between checkpoints (and one at each epoch end)
    keep_last: int = 3  # step checkpoints kept, and epoch checkpoints kept (plus best.pt, a copy of the best epoch)
    device: str = "auto"  # "auto", "cpu", "cuda"

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("config: 'corpus' is required (a directory written by lxm build-corpus)")
        if not self.features:
            raise ConfigError("config: 'features' needs at least one feature store directory")
        choices = {"obj_attr_boxes": ("all", "masked"), "feat_loss": ("smoothl1", "l2"),
                   "optimizer": ("bert", "adamw"), "precision": ("fp32", "bf16"), "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config: '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "epochs", "log_every", "checkpoint_every", "keep_last", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config: '{name}' must be positive, got {getattr(self, name)}")
        _check_optimisation(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def _check_optimisation(cfg) -> None:
    """Ranges that BertAdam and the model would reject later, with a traceback instead of the key's name."""
    if cfg.lr < 0:
        raise ConfigError(f"config: 'lr' must be >= 0, got {cfg.lr}")
    if cfg.optimizer == "bert" and not 0.0 < cfg.warmup < 1.0:
        raise ConfigError(f"config: 'warmup' must be in (0, 1) with optimizer=bert, got {cfg.warmup}")
    if cfg.dropout != -1.0 and not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"config: 'dropout' must be in [0, 1) (or -1: the model's), got {cfg.dropout}")


def _type_name(hint: Any) -> str:
    return "list of strings" if typing.get_origin(hint) is list else getattr(hint, "__name__", str(hint))


def _coerce(name: str, hint: Any, text: str, where: str | None = None) -> Any:
    """`text` as the field's type; `where` (a YAML file) replaces `--set key=text` in the message."""
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if origin is list:
            value = yaml.safe_load(text)
            if not isinstance(value, list):
                return [x for x in text.split(",") if x]
            if not all(isinstance(x, str) for x in value):
                raise ValueError(text)
            return value
        return text
    except (ValueError, yaml.YAMLError):
        at = f"{where}: '{name}'" if where else f"--set {name}={text}"
        raise ConfigError(f"{at}: expected {_type_name(hint)}, got {text!r}") from None


def _typed(name: str, hint: Any, value: Any, where: str) -> Any:
    """A value read from YAML, checked against the field's type: strings are converted as `--set` converts them
    (PyYAML reads `1e-4` as a string), ints widen to floats, anything else of the wrong type is a ConfigError."""
    origin = typing.get_origin(hint)
    if isinstance(value, str) and hint is not str:
        return _coerce(name, hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list and isinstance(value, list) and all(isinstance(x, str) for x in value):
        return list(value)
    if origin is None and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: '{name}': expected {_type_name(hint)}, got {value!r}")


def _apply(cls, values: dict[str, Any], overrides: list[str], where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - known)  # YAML keys may be numbers
    if unknown:
        raise ConfigError(f"{where}: unknown config key(s): {', '.join(unknown)}")
    values = {key: _typed(key, hints[key], value, where) for key, value in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, text = item.split("=", 1)
        if key not in known:
            raise ConfigError(f"--set {key}: unknown config key (known: {', '.join(sorted(known))})")
        values[key] = _coerce(key, hints[key], text)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def _yaml_position(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""  # PyYAML counts from 0


def _yaml_problem(exc: yaml.YAMLError) -> str:
    context, problem = getattr(exc, "context", None), getattr(exc, "problem", None)
    start, end = getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)
    if context and start is not None and end is not None and start.line != end.line:
        context += f" started on line {start.line + 1}"  # e.g. the '[' whose ']' is missing
    return ", ".join(p for p in (context, problem) if p) or str(exc).splitlines()[0]


def _read_yaml(path_text: str, presets: str) -> dict[str, Any]:
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"--config {path_text}: neither a preset ({presets}) nor a YAML file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}{_yaml_position(exc)}: not valid YAML ({_yaml_problem(exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (a YAML file of config keys?)") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return loaded


def load_config(preset_or_path: str | None, overrides: list[str] = ()) -> PretrainConfig:
    """A preset name ("base", "tiny") or a YAML file, then `key=value` overrides; unknown keys are errors."""
    values: dict[str, Any] = {}
    if preset_or_path == "tiny":
        values = dict(model="tiny", batch_size=8, epochs=1, log_every=1, checkpoint_every=20, num_workers=0,
                      lr=1e-3, warmup=0.1)
    elif preset_or_path not in (None, "", "base"):
        values = _read_yaml(preset_or_path, "base, tiny")
    return _apply(PretrainConfig, values, list(overrides), str(preset_or_path or "base"))


# ----------------------------------------------------------------------------------------------------------------
# Finetuning


FINETUNE_TASKS = ("vqa", "gqa", "nlvr2")


@dataclass
class FinetuneConfig:
    """One `lxm finetune` run (lxmert.md §5; airsplay src/tasks/{vqa,gqa,nlvr2}.py and run/*_finetune.bash)."""

    task: str = "vqa"  # vqa, gqa or nlvr2
    corpus: str = ""  # directory written by `lxm build-corpus` (finetune/*.parquet, vocab/*_answers.json)
    features: list[str] = field(default_factory=list)  # feature store directories (all splits' images)
    vocab: str = "bert-base-uncased"  # WordPiece vocabulary (file, directory or Hub id)
    init: str = ""  # pretrained weights: an lxm pretraining run, *_LXRT.pth, a transformers dir or Hub id
    from_scratch: bool = False  # no pretrained weights (the paper's Table 3 baseline); needs model=<preset>
    model: str = "base"  # preset used only with from_scratch
    init_answers: str = ""  # answer table of the init's 9500-way QA head (default: <corpus>/vocab/qa_answers.json)
    train_splits: list[str] = field(default_factory=list)  # default per task: vqa train,nominival; gqa train,valid;
    valid_split: str = ""  # nlvr2 train. Validation: vqa minival, gqa testdev, nlvr2 dev ("none" disables)
    max_length: int = 20  # tokens incl. [CLS]/[SEP]
    num_workers: int = 2  # DataLoader workers
    dropout: float = -1.0  # hidden and attention dropout; -1 keeps the checkpoint's (0.1)
    batch_size: int = 32
    eval_batch_size: int = 256
    epochs: int = 4
    optimizer: str = "bert"  # "bert" (BertAdam as the original) or "adamw"
    lr: float = 0.0  # 0 = the task's recipe: vqa 5e-5, gqa 1e-5, nlvr2 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    clip_grad_norm: float = 5.0
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    seed: int = 9595
    log_every: int = 10  # steps between log lines
    device: str = "auto"  # "auto", "cpu", "cuda"

    def __post_init__(self) -> None:
        defaults = {"vqa": (["train", "nominival"], "minival", 5e-5), "gqa": (["train", "valid"], "testdev", 1e-5),
                    "nlvr2": (["train"], "dev", 5e-5)}
        if self.task not in defaults:
            raise ConfigError(f"config: 'task' must be one of {FINETUNE_TASKS}, got {self.task!r}")
        splits, valid, lr = defaults[self.task]
        self.train_splits = list(self.train_splits) or splits
        self.valid_split = self.valid_split or valid
        self.lr = self.lr or lr

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("config: 'corpus' is required (a directory written by lxm build-corpus)")
        if not self.features:
            raise ConfigError("config: 'features' needs at least one feature store directory")
        if not self.init and not self.from_scratch:
            raise ConfigError("config: 'init' is required (pretrained weights); set from_scratch=true to train "
                              "without them")
        if self.init and self.from_scratch:
            raise ConfigError("config: 'init' and from_scratch=true exclude each other")
        choices = {"optimizer": ("bert", "adamw"), "precision": ("fp32", "bf16"), "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config: '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "eval_batch_size", "epochs", "log_every", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config: '{name}' must be positive, got {getattr(self, name)}")
        _check_optimisation(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def load_finetune_config(task: str, preset_or_path: str | None, overrides: list[str] = ()) -> FinetuneConfig:
    """The task's recipe ("paper", the default), "tiny" (smoke runs) or a YAML file, then `key=value` overrides."""
    values: dict[str, Any] = {}
    if preset_or_path == "tiny":
        values = dict(model="tiny", batch_size=8, eval_batch_size=16, epochs=1, log_every=1, num_workers=0, lr=1e-3)
    elif preset_or_path not in (None, "", "paper"):
        values = _read_yaml(preset_or_path, "paper, tiny")
    if values.get("task", task) != task:
        raise ConfigError(f"--config {preset_or_path}: task {values['task']!r} but finetuning {task!r}")
    values["task"] = task
    return _apply(FinetuneConfig, values, list(overrides), str(preset_or_path or "paper"))
