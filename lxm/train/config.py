"""Run configurations of `lxm pretrain` and `lxm finetune`: a dataclass each, named presets as functions beside
it, YAML files plus `key=value` overrides, unknown keys rejected.

What both share is one dataclass each, nested as a section (as open_clip's `CLIPVisionCfg` / torchtune's grouped
YAML): `optim` (`OptimConfig`: batch, epochs, optimizer, lr, warm-up, decay, clip) and `runtime` (`RuntimeConfig`:
device, precision, compile, CPU kernels, seed, workers, logging); one `validate()` each, which both run configs
call. Their keys may be written bare as well (`--set lr=1e-5` is `--set optim.lr=1e-5`, `lr:` at the top of a YAML
file is `optim: {lr: ...}`): each name is unique among a config's keys, and runs written before the sections list
them so. Closed choices are `Literal` fields, checked on every read and by `validate()`.

`--config NAME` picks a preset function by name (`PRETRAIN_PRESETS`, among them the paper's runs and ablations as
`paper/...`, Tables 3-5 of arXiv 1908.07490; `FINETUNE_PRESETS`); `--config FILE` starts from
the default preset (`base`, resp. the task's `paper` recipe) and sets the file's keys; `--set key=value` items come
last. The loss settings are the nested `losses` section (`lxm.model.losses.PretrainLossConfig`): `losses:` as a
mapping in YAML, `--set losses.feat_loss=l2` on the command line.

The loader is hand-written rather than OmegaConf's (a dependency of the detectron2 extra only): OmegaConf 2.3
refuses `Literal` fields ("Unexpected type annotation") and its errors name the key but not the YAML file and line;
this one reports `file:line:column` for syntax errors and the file and dotted key for every bad value.

A field that may be unset is `X | None` and its comment says what None means (no validation, the model's dropout,
...); None is `null` in YAML and `none` or `null` in `--set` (an empty string is refused, not read as None). A YAML
value is checked against the field's type as a `--set` value is (a string is converted the same way, so `lr: 1e-4`,
which PyYAML reads as a string, is the float); a syntax error names the file and line. Every bad value is a
ConfigError naming the file or `--set` item and the key. A run writes the resolved config (None as `null`) to
OUT/config.yaml; that file loads back through `--config` unchanged.

Pretraining defaults reproduce `run/lxmert_pretrain.bash` of airsplay/lxmert (lxmert.md §2.1, §2.5): batch 256, lr
1e-4, BertAdam, warmup 5 %, 20 epochs, clip 1.0, seed 9595, masks 0.15 / 0.15, train on train + nominival +
vgnococo, validate on minival, all five objectives with QA from the first epoch. Finetuning recipes reproduce
`run/{vqa,gqa,nlvr2}_finetune.bash` and `src/tasks/{vqa,gqa,nlvr2}.py` (lxmert.md §5); the custom-dataset tasks
(qa, classify: JSON lines files in `data`, no corpus) use VQA's / NLVR2's recipe (lr 5e-5) on data["train"],
validated on data["valid"] when there is one.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lxm.errors import ConfigError
from lxm.model.losses import IGNORE_INDEX, LOSS_NAMES, PretrainLossConfig
from lxm.train.precision import PRECISIONS



Precision = Literal[PRECISIONS]  # "fp32", "bf16", "bf16-autocast" (lxm.train.precision)
Optimizer = Literal["bert", "adamw"]


@dataclass
class OptimConfig:
    """How the weights are updated, shared by pretraining and finetuning (`lxm.train.run.build_optimizer`); the
    defaults are the original pretraining recipe, a finetuning recipe sets its own (`finetune_paper`)."""

    batch_size: int = 256  # global batch (all processes, all accumulation micro-steps)
    micro_batch_size: int | None = None  # per process per micro-step; None: batch_size / world size (no accumulation)
    epochs: int = 20  # passes over the training data
    optimizer: Optimizer = "bert"  # "bert" (BertAdam as the original) or "adamw"
    lr: float = 1e-4  # peak learning rate
    warmup: float = 0.05  # share of the steps with a linear warm-up
    weight_decay: float = 0.01  # decoupled weight decay: "bert" on every parameter, as the original's BertAdam;
    #   "adamw" not on biases and LayerNorm
    clip_grad_norm: float = 1.0  # max global gradient norm
    fused_optimizer: bool = False  # the update as one compiled loop per parameter (BertAdam(fused=True), AdamW's
    #   fused kernel): same state, compiled at the first step (needs a C++ compiler); off: the original's eager
    #   arithmetic

    def validate(self) -> None:
        for name in ("batch_size", "micro_batch_size", "epochs"):
            _positive(self, name, "optim.")
        if self.lr < 0:  # BertAdam would reject it later, with a traceback instead of the key's name
            raise ConfigError(f"config: 'optim.lr' must be >= 0, got {self.lr}")
        if self.optimizer == "bert" and not 0.0 < self.warmup < 1.0:
            raise ConfigError(f"config: 'optim.warmup' must be in (0, 1) with optimizer=bert, got {self.warmup}")


@dataclass
class RuntimeConfig:
    """Where and how a run computes, shared by pretraining and finetuning: none of it changes what is learnt
    beyond rounding (precision) and the seed."""

    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N" (lxm.devices.resolve_device)
    precision: Precision = "fp32"  # "fp32", "bf16" (bf16 copy, fp32 masters), "bf16-autocast"; lxm.train.precision
    compile: bool = False  # train through torch.compile of the model (inductor); checkpoints stay the plain model's
    cpu_kernels: bool | None = None  # None: the CPU kernels of lxm.model.cpu_kernels on for CPU tensors, off
    #   elsewhere; true/false force them; the environment variable LXM_CPU_KERNELS=0|1 overrides this key
    seed: int = 9595  # seeds model init (a new head's), masking and data order (the original's)
    num_workers: int | None = None  # DataLoader workers per process; None: 0 on CPU, min(4, cores - 1) with CUDA
    log_every: int = 10  # steps between log lines
    keep_freed_memory: bool = True  # CPU: glibc keeps freed memory for reuse (lxm.memory; faster steps, RSS stays
    #   at its peak); process-wide, so `lxm pretrain` / `lxm finetune` apply it, not the trainer

    def validate(self) -> None:
        # lxm.devices.resolve_device's forms; whether CUDA is there is checked when the run starts
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is None:
            raise ConfigError(f"config: 'runtime.device' must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"config: 'runtime.num_workers' must be >= 0 (or null: automatic), got "
                              f"{self.num_workers}")
        _positive(self, "log_every", "runtime.")


# the groups whose keys may also be written bare (`--set lr=1e-5`, `lr:` in a YAML file or an older run's flat
# config.yaml): each of their field names is unique among a config's keys
SHARED_GROUPS = ("optim", "runtime")


@dataclass
class PretrainConfig:
    """One `lxm pretrain` run; the defaults are the original recipe (`pretrain_base`)."""

    # --- data
    corpus: str = ""  # required: directory written by `lxm build-corpus`
    features: list[str] = field(default_factory=list)  # required: feature store directories
    vocab: str = "bert-base-uncased"  # WordPiece vocabulary (file, directory or Hub id)
    answers: str | None = None  # answer table JSON; None: <corpus>/vocab/qa_answers.json
    train_splits: list[str] = field(default_factory=lambda: ["train", "nominival", "vgnococo"])  # corpus splits
    valid_split: str | None = "minival"  # split of the validation loss after each epoch; None: no validation
    sources: list[str] = field(default_factory=lambda: ["mscoco", "vg", "vqa", "gqa", "vgqa"])  # sentence sources
    max_length: int = 20  # tokens incl. [CLS]/[SEP]
    word_mask_rate: float = 0.15  # share of words masked for MLM (BERT's rate)
    obj_mask_rate: float = 0.15  # share of boxes masked for the visual objectives (same rate as the words)
    # --- model
    model: str = "base"  # preset (base, small, tiny) or a checkpoint for load_pretrained
    dropout: float | None = None  # hidden and attention dropout; None keeps the model's (0.1)
    init_bert: str | None = None  # BERT checkpoint (HF bert-base-uncased dir/file) for BERT-style init; None: scratch
    # --- objectives
    # the losses trained (the original's --taskMaskLM, --taskMatched, --taskObjPredict with --visualLosses
    #   obj,attr,feat, --taskQA): any of mlm, match, obj, attr, feat, qa; the model gets only their heads, and without
    #   "match" no sentence is swapped for a negative (as the original's data without --taskMatched)
    objectives: list[str] | None = None  # None: every one the features allow (all six; no obj/attr from a backbone
    #   without labels: grid, timm:), resolved at the start and written to the run's config.yaml
    qa_start_epoch: int = 0  # code: QA from the first epoch; paper: 10 (QA only in the last 10 of 20 epochs)
    qa_weight: float = 1.0  # QA loss multiplier from qa_start_epoch on: code 1; the paper's two-stage run 2
    #   (src/lxrt/modeling.py L981-986: "(loss *0) for 6 epochs, (loss *2) for 6 epochs. (Used 10 ... in EMNLP paper)")
    losses: PretrainLossConfig = field(default_factory=PretrainLossConfig)  # how each loss is computed (code's way)
    # --- optimisation and runtime (shared with finetuning)
    optim: OptimConfig = field(default_factory=OptimConfig)  # batch 256, BertAdam, lr 1e-4, warm-up 5 %, 20 epochs
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # device, precision, seed 9595, workers, logging
    max_steps: int | None = None  # stop after this many optimizer steps (for smoke runs); None: all epochs
    # --- checkpoints
    checkpoint_every: int = 1000  # steps between checkpoints (and one at each epoch end)
    keep_last: int = 3  # step checkpoints kept, and epoch checkpoints kept (plus best.pt, a copy of the best epoch)

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("config: 'corpus' is required (a directory written by lxm build-corpus)")
        if not self.features:
            raise ConfigError("config: 'features' needs at least one feature store directory")
        for name in ("checkpoint_every", "keep_last", "max_length", "max_steps"):
            _positive(self, name)
        unknown = [o for o in self.objectives or [] if o not in LOSS_NAMES]
        if self.objectives is not None and (unknown or not self.objectives
                                            or len(set(self.objectives)) != len(self.objectives)):
            raise ConfigError(f"config: 'objectives' must name each of {', '.join(LOSS_NAMES)} at most once (at least "
                              f"one), got {self.objectives}")
        if self.qa_start_epoch < 0 or self.qa_weight < 0:
            raise ConfigError(f"config: 'qa_start_epoch' and 'qa_weight' must be >= 0, got {self.qa_start_epoch} and "
                              f"{self.qa_weight}")
        if self.losses.ignore_index != IGNORE_INDEX:  # the label lxm.train.data writes for "no target"
            raise ConfigError(f"config: 'losses.ignore_index' must be {IGNORE_INDEX} (the label lxm's data "
                              f"writes for no target), got {self.losses.ignore_index}")
        _validate_shared(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def pretrain_base() -> PretrainConfig:
    """The original code's recipe (`run/lxmert_pretrain.bash`: all five tasks, QA from the first epoch): the dataclass
    defaults."""
    return PretrainConfig()


def pretrain_tiny() -> PretrainConfig:
    """Smoke runs and tests: the tiny model, one epoch of small batches, a log line per step, no worker processes;
    a larger lr and warm-up share because a few dozen steps must move the tiny model."""
    return PretrainConfig(model="tiny", optim=OptimConfig(batch_size=8, epochs=1, lr=1e-3, warmup=0.1),
                          runtime=RuntimeConfig(log_every=1, num_workers=0), checkpoint_every=20)


# ----------------------------------------------------------------------------------------------------------------
# The paper's pretraining runs (Tan & Bansal 2019, arXiv 1908.07490 v3): §3.3 and the ablations of §5, Tables 3-5.
# Dev numbers as the paper reports them: VQA minival, GQA testdev, NLVR2 dev (lxmert.md §7). What a row changes is
# given as the original's flags (src/param.py, run/lxmert_pretrain.bash). Rows that are not a pretraining run, or
# that lxm cannot express, are listed in README.md "Reproduce the paper" with the reason.


def paper_lxmert() -> PretrainConfig:
    """The paper's recipe: 20 epochs from scratch, all five tasks, image QA only in the last 10 epochs.

    Paper §3.3: batch 256, Adam (BertAdam) at lr 1e-4 with linear decay, 20 epochs, parameters initialised at random,
    "We only pre-train with image QA task for the last 10 epochs". The QA loss counts twice in those epochs, as
    the original's comment on its EMNLP run says (src/lxrt/modeling.py L981-986: "(loss *0) for 6 epochs, (loss *2)
    for 6 epochs. (Used 10 instead of 6 in EMNLP paper)"); `--set qa_weight=1` gives the paper text's equal weights.
    The GitHub code's recipe (QA from the first epoch, weight 1) is the `base` preset.
    Paper, dev: VQA 69.9, GQA 60.0, NLVR2 74.9 (Table 3 last row = Table 4 row 4 = Table 5 row 4).
    """
    return PretrainConfig(objectives=list(LOSS_NAMES), qa_start_epoch=10, qa_weight=2.0)  # labels: the VG detector's


def paper_table3_pretrain_scratch() -> PretrainConfig:
    """Table 3 "Pre-train + scratch": LXMERT pretraining from random weights (= paper/lxmert).

    Paper, dev: VQA 69.9, GQA 60.0, NLVR2 74.9.
    """
    return paper_lxmert()


def paper_table3_pretrain_bert() -> PretrainConfig:
    """Table 3 "Pre-train + BERT": the paper's recipe with BERT-base weights loaded first (no --fromScratch).

    What BERT has is copied in (embeddings, the language layers 0-8, pooler, MLM and next-sentence heads; BERT's
    layers 9-11 find no place and are left out, as the original's `from_pretrained("bert-base-uncased")` leaves them;
    the paper's footnote 10 says "top 9", the code loads layers 0-8 by name). `init_bert` is the Hub id
    bert-base-uncased: `--set init_bert=DIR` for a local copy (config.json + model.safetensors).
    Paper, dev: VQA 68.8, GQA 58.3, NLVR2 70.1.
    """
    return dataclasses.replace(paper_lxmert(), init_bert="bert-base-uncased")


def paper_table4_p20() -> PretrainConfig:
    """Table 4 "P20": 20 epochs without the image-QA task (no --taskQA, no answer head).

    Paper, dev, finetuned on the task alone (row 2, "P20 + FT"): VQA 68.9, GQA 58.2, NLVR2 72.4; with data
    augmentation (row 1, "P20 + DA": other QA datasets' questions added to the finetuning data): VQA 68.0, GQA 58.1,
    which lxm's finetuning cannot express (README "Reproduce the paper").
    """
    return dataclasses.replace(paper_lxmert(), objectives=["mlm", "match", "obj", "attr", "feat"], qa_start_epoch=0,
                               qa_weight=1.0)


def paper_table4_p10_qa10() -> PretrainConfig:
    """Table 4 "P10+QA10": 10 epochs without image QA, then 10 with it (= paper/lxmert).

    Paper, dev, finetuned on the task alone (row 4, "P10+QA10 + FT"): VQA 69.9, GQA 60.0, NLVR2 74.9; with data
    augmentation (row 3, "+ DA"): VQA 69.1, GQA 59.2, which lxm's finetuning cannot express.
    """
    return paper_lxmert()


def paper_table5_no_vision() -> PretrainConfig:
    """Table 5 row 1 "No Vision Tasks": MLM, matching and QA only (no --taskObjPredict).

    Boxes are still masked at the 15 % rate, as the original's data masks them whatever the tasks
    (lxmert_pretrain.py `random_feat` runs for every example); `--set obj_mask_rate=0` shows them all.
    Paper, dev: VQA 66.3, GQA 57.1, NLVR2 50.9.
    """
    return dataclasses.replace(paper_lxmert(), objectives=["mlm", "match", "qa"])


def paper_table5_feat() -> PretrainConfig:
    """Table 5 row 2 "Feat": RoI-feature regression as the only vision task (--visualLosses feat).

    Paper, dev: VQA 69.2, GQA 59.5, NLVR2 72.9.
    """
    return dataclasses.replace(paper_lxmert(), objectives=["mlm", "match", "feat", "qa"])


def paper_table5_label() -> PretrainConfig:
    """Table 5 row 3 "Label": detected-label classification as the only vision task (--visualLosses obj,attr).

    The detector's labels are its object classes and its attributes; the original computes both as "label" losses
    (VISUAL_CONFIG.visual_loss_config: obj and attr are 'ce', feat is 'l2'), so both are on here.
    Paper, dev: VQA 69.5, GQA 59.3, NLVR2 73.5.
    """
    return dataclasses.replace(paper_lxmert(), objectives=["mlm", "match", "obj", "attr", "qa"])


def paper_table5_feat_label() -> PretrainConfig:
    """Table 5 row 4 "Feat + Label": both vision tasks (= paper/lxmert).

    Paper, dev: VQA 69.9, GQA 60.0, NLVR2 74.9.
    """
    return paper_lxmert()


PRETRAIN_PRESETS: dict[str, Callable[[], PretrainConfig]] = {
    "base": pretrain_base,
    "tiny": pretrain_tiny,
    "paper/lxmert": paper_lxmert,
    "paper/table3-pretrain-scratch": paper_table3_pretrain_scratch,
    "paper/table3-pretrain-bert": paper_table3_pretrain_bert,
    "paper/table4-p20": paper_table4_p20,
    "paper/table4-p10-qa10": paper_table4_p10_qa10,
    "paper/table5-no-vision": paper_table5_no_vision,
    "paper/table5-feat": paper_table5_feat,
    "paper/table5-label": paper_table5_label,
    "paper/table5-feat-label": paper_table5_feat_label,
}


def preset_summaries(presets: dict[str, Callable[[], Any]]) -> list[tuple[str, str]]:
    """(name, the first paragraph of its docstring on one line) of each preset: what `lxm pretrain --help` lists."""
    return [(name, " ".join(line.strip() for line in (fn.__doc__ or "").strip().split("\n\n")[0].splitlines()))
            for name, fn in presets.items()]


def _positive(cfg: Any, name: str, prefix: str = "") -> None:
    value = getattr(cfg, name)
    if value is not None and value <= 0:
        raise ConfigError(f"config: '{prefix}{name}' must be positive, got {value}")


def _validate_shared(cfg: PretrainConfig | FinetuneConfig) -> None:
    """The checks both run configs share: their groups', the closed choices, the dropout the model would reject
    later with a traceback instead of the key's name."""
    cfg.optim.validate()
    cfg.runtime.validate()
    _check_choices(cfg)
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"config: 'dropout' must be in [0, 1) (or null: the model's), got {cfg.dropout}")


def _check_choices(cfg: Any, prefix: str = "") -> None:
    """Every `Literal` field of `cfg` and its sections holds one of its values: also a config built in Python,
    which no loader read."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            raise ConfigError(f"config: '{prefix}{f.name}' must be one of {typing.get_args(hint)}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Finetuning


def _task(name: str, where: str = "config: 'task'"):
    # the task classes own their recipes and kinds; imported here, not at module level: tasks -> run -> config
    from lxm.train.tasks import task_class

    return task_class(name, where)


@dataclass(kw_only=True)
class FinetuneConfig:
    """One `lxm finetune` run (lxmert.md §5; airsplay src/tasks/{vqa,gqa,nlvr2}.py and run/*_finetune.bash).

    The task's recipe values (splits, lr) have no default: they differ per task, so they come from `finetune_paper`
    (or `finetune_tiny`), never from a default that would be another task's.
    """

    task: str  # a key of lxm.train.tasks.TASKS: vqa, gqa, nlvr2, qa or classify
    corpus: str = ""  # vqa/gqa/nlvr2, required: directory of `lxm build-corpus` (finetune/*.parquet, vocab/)
    # qa/classify only, "train" required: split name -> JSON lines file ("train", "valid", "test": what
    # --train/--valid/--test set); splits below name its keys (or a .jsonl path); empty for vqa/gqa/nlvr2
    data: dict[str, str] = field(default_factory=dict)
    min_answer_count: int = 1  # qa: an answer enters the answer table when >= this many training questions give it
    features: list[str] = field(default_factory=list)  # required: feature store directories (all splits' images)
    vocab: str = "bert-base-uncased"  # WordPiece vocabulary (file, directory or Hub id); unset with an lxm run as
    #   init: that run's (lxm.train.inits)
    init: str | None = None  # pretrained weights (lxm run, *_LXRT.pth, transformers dir, Hub id); None: from_scratch
    from_scratch: bool = False  # no pretrained weights (the paper's Table 3 baseline); needs init=null
    model: str = "base"  # preset used only with from_scratch; unset with an lxm init: the init's size, recorded
    init_answers: str | None = None  # answer table of the init's 9500-way QA head; None: found next to the init
    train_splits: list[str]  # splits trained on (recipe: vqa train,nominival; gqa train,valid; nlvr2, qa, classify
    #   train)
    valid_split: str | None  # split scored after each epoch (recipe: vqa minival, gqa testdev, nlvr2 dev; qa and
    #   classify valid, None when data has no "valid"); None: none
    max_length: int = 20  # tokens incl. [CLS]/[SEP]
    dropout: float | None = None  # hidden and attention dropout; None keeps the checkpoint's (0.1)
    # --- optimisation and runtime (shared with pretraining)
    optim: OptimConfig  # the recipe's (finetune_paper): batch 32, BertAdam, warm-up 10 %, clip 5.0, 4 epochs, lr
    #   vqa 5e-5, gqa 1e-5, nlvr2 5e-5, qa and classify 5e-5
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # device, precision, seed 9595, workers, logging
    eval_batch_size: int = 256  # batch of the validation and prediction passes

    def validate(self) -> None:
        if _task(self.task).reads_files:
            if "train" not in self.data:
                raise ConfigError(f"config: 'data' needs a 'train' file for {self.task} (lxm finetune {self.task} "
                                  f"--train FILE.jsonl)")
            for name in [*self.train_splits, *([self.valid_split] if self.valid_split is not None else [])]:
                if name not in self.data and not name.endswith(".jsonl"):
                    raise ConfigError(f"config: split {name!r} is not in 'data' (it has {', '.join(self.data)}) "
                                      f"nor a .jsonl file")
        else:
            if self.data:
                from lxm.train.tasks import TASKS

                custom = tuple(name for name, cls in TASKS.items() if cls.reads_files)
                raise ConfigError(f"config: 'data' is for the custom-dataset tasks {custom}; {self.task} reads "
                                  f"the corpus")
            if not self.corpus:
                raise ConfigError("config: 'corpus' is required (a directory written by lxm build-corpus)")
        if not self.features:
            raise ConfigError("config: 'features' needs at least one feature store directory")
        if not self.train_splits:
            raise ConfigError("config: 'train_splits' needs at least one split")
        if self.init is None and not self.from_scratch:
            raise ConfigError("config: 'init' is required (pretrained weights); set from_scratch=true to train "
                              "without them")
        if self.init is not None and self.from_scratch:
            raise ConfigError("config: 'init' and from_scratch=true exclude each other")
        for name in ("eval_batch_size", "max_length", "min_answer_count"):
            _positive(self, name)
        _validate_shared(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def finetune_paper(task: str) -> FinetuneConfig:
    """The original recipe of `task` (run/{task}_finetune.bash): batch 32, BertAdam, warm-up 10 %, clip 5.0, and
    the task's own splits, lr and epochs (its `recipe`, lxm.train.tasks)."""
    recipe = _task(task).recipe
    return FinetuneConfig(task=task, train_splits=list(recipe.train_splits), valid_split=recipe.valid_split,
                          optim=OptimConfig(batch_size=32, epochs=recipe.epochs, lr=recipe.lr, warmup=0.1,
                                            clip_grad_norm=5.0))


def finetune_tiny(task: str) -> FinetuneConfig:
    """Smoke runs and tests: `finetune_paper(task)` with the tiny model (from_scratch), one epoch of small batches,
    a log line per step, no worker processes and a larger lr."""
    paper = finetune_paper(task)
    return dataclasses.replace(paper, model="tiny", eval_batch_size=16,
                               optim=dataclasses.replace(paper.optim, batch_size=8, epochs=1, lr=1e-3),
                               runtime=dataclasses.replace(paper.runtime, log_every=1, num_workers=0))


FINETUNE_PRESETS: dict[str, Callable[[str], FinetuneConfig]] = {"paper": finetune_paper, "tiny": finetune_tiny}


# ----------------------------------------------------------------------------------------------------------------
# Reading values


def _optional(hint: Any) -> tuple[Any, bool]:
    """(`hint` without `| None`, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))  # the fields hold one type or None, never a union
        return inner, True
    return hint, False


def _type_name(hint: Any) -> str:
    inner, optional = _optional(hint)
    if typing.get_origin(inner) is list:
        name = "list of strings"
    elif typing.get_origin(inner) is dict:
        name = "mapping of strings to strings"
    elif typing.get_origin(inner) is Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(inner))
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def _coerce(name: str, hint: Any, text: str, where: str | None = None) -> Any:
    """`text` as the field's type; `where` (a YAML file) replaces `--set key=text` in the message."""
    inner, optional = _optional(hint)
    origin = typing.get_origin(inner)
    at = f"{where}: '{name}'" if where else f"--set {name}={text}"
    if optional and text.lower() in ("none", "null"):
        return None
    if optional and text == "":  # "" is not None: a typo must not silently switch something off
        raise ConfigError(f"{at}: empty; write null (in YAML) or --set {name}=none for None")
    try:
        if origin is Literal:
            if text not in typing.get_args(inner):
                raise ValueError(text)
            return text
        if inner is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if origin is dict:
            value = yaml.safe_load(text)
            if not _string_dict(value):
                raise ValueError(text)
            return dict(value)
        if origin is list:
            value = yaml.safe_load(text)
            if not isinstance(value, list):
                return [x for x in text.split(",") if x]
            if not all(isinstance(x, str) for x in value):
                raise ValueError(text)
            return value
        return text
    except (ValueError, yaml.YAMLError):
        raise ConfigError(f"{at}: expected {_type_name(hint)}, got {text!r}") from None


def _string_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _typed(name: str, hint: Any, value: Any, where: str) -> Any:
    """A value read from YAML, checked against the field's type: strings are converted as `--set` converts them
    (PyYAML reads `1e-4` as a string), ints widen to floats, anything else of the wrong type is a ConfigError."""
    inner, optional = _optional(hint)
    origin = typing.get_origin(inner)
    if value is None and optional:
        return None
    if isinstance(value, str) and inner is not str:
        return _coerce(name, hint, value, where)
    if isinstance(value, str) and value == "" and optional:
        return _coerce(name, hint, value, where)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list and isinstance(value, list) and all(isinstance(x, str) for x in value):
        return list(value)
    if origin is dict and _string_dict(value):
        return dict(value)
    if origin is None and isinstance(value, inner) and not (inner is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: '{name}': expected {_type_name(hint)}, got {value!r}")


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of `cls`, nested sections as dotted names (`losses.feat_loss`)."""
    hints = typing.get_type_hints(cls)
    return [key for f in dataclasses.fields(cls)
            for key in (_keys(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name])
                        else [prefix + f.name])]


def _bare_keys(cls: type) -> dict[str, str]:
    """bare name -> section of the `SHARED_GROUPS` fields of a run config `cls` (`lr` -> `optim`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: group for group in SHARED_GROUPS if group in hints
            for f in dataclasses.fields(hints[group])}


def _nested(cls: type, values: dict[Any, Any], where: str) -> dict[Any, Any]:
    """A YAML mapping with the bare keys of the shared groups (`lr:`, as older runs wrote them) moved into their
    sections (`optim: {lr: ...}`); a key given both ways is a ConfigError."""
    bare = _bare_keys(cls)
    out = {k: (dict(v) if k in SHARED_GROUPS and isinstance(v, dict) else v) for k, v in values.items()
           if k not in bare}
    for key, value in values.items():
        if key in bare:
            section = out.setdefault(bare[key], {})
            if not isinstance(section, dict):
                continue  # `optim: 3`: _checked names it
            if key in section:
                raise ConfigError(f"{where}: '{key}' is given twice, as '{key}' and as '{bare[key]}.{key}'")
            section[key] = value
    return out


def _checked(cls: type, values: dict[Any, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """The keys of a YAML mapping, each checked against its field; nested sections as nested dicts."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(prefix + str(k) for k in set(values) - names)  # YAML keys may be numbers
    if unknown:
        raise ConfigError(f"{where}: unknown config key(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{prefix}{key}': expected a mapping of {', '.join(_keys(hints[key]))}, "
                                  f"got {value!r}")
            out[key] = _checked(hints[key], value, where, f"{prefix}{key}.")
        else:
            out[key] = _typed(prefix + key, hints[key], value, where)
    return out


def _override(cls: type, changes: dict[str, Any], item: str) -> None:
    """Apply one `--set key=value` (key possibly dotted: `losses.feat_loss`) to the nested `changes`."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value")
    key, text = item.split("=", 1)
    given = key  # what a message about the value repeats
    bare = _bare_keys(cls)
    if "." not in key and key in bare:  # `--set lr=1e-5` is `--set optim.lr=1e-5`
        key = f"{bare[key]}.{key}"
    *sections, last = key.split(".")
    prefix = ""
    for section in sections:
        hints = typing.get_type_hints(cls)
        if section not in hints or not dataclasses.is_dataclass(hints[section]):
            raise ConfigError(f"--set {key}: unknown config key (known: {', '.join(sorted(_keys(cls, prefix)))})")
        cls, changes, prefix = hints[section], changes.setdefault(section, {}), f"{prefix}{section}."
    hints = typing.get_type_hints(cls)
    if last not in hints:
        raise ConfigError(f"--set {key}: unknown config key (known: {', '.join(sorted(_keys(cls, prefix)))})")
    if dataclasses.is_dataclass(hints[last]):
        raise ConfigError(f"--set {key}: a section; set its keys ({', '.join(sorted(_keys(hints[last], key + '.')))})")
    changes[last] = _coerce(given, hints[last], text)


def _replace(base: Any, changes: dict[str, Any]) -> Any:
    # a dict of changes is a nested section's (a dict-valued field such as `data` is replaced whole)
    return dataclasses.replace(base, **{key: _replace(getattr(base, key), value)
                                        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(base, key))
                                        else value for key, value in changes.items()})


def _resolve(base: Any, values: dict[Any, Any], overrides: list[str], where: str,
             settle: Callable[[Any, dict[str, Any]], Any] | None = None) -> Any:
    """`base` (a preset) with the YAML `values`, then the `--set` items, set; `settle(cfg, changes)` may then fill
    what the preset left to the data; validated."""
    changes = _checked(type(base), _nested(type(base), values, where), where)
    for item in overrides:
        _override(type(base), changes, item)
    cfg = _replace(base, changes)
    if settle is not None:
        cfg = settle(cfg, changes)
    cfg.validate()
    return cfg


def _settle_custom_valid(cfg: FinetuneConfig, changes: dict[str, Any]) -> FinetuneConfig:
    from lxm.train.inits import settle_from_init  # the init run's vocabulary and model size, when not set

    cfg = settle_from_init(cfg, changes)
    # the qa/classify recipe validates on data["valid"]; without a valid file (and no valid_split set): nothing
    if (_task(cfg.task).reads_files and "valid_split" not in changes and cfg.valid_split == "valid"
            and "valid" not in cfg.data):
        return dataclasses.replace(cfg, valid_split=None)
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
    """A preset name (`PRETRAIN_PRESETS`; None: base) or a YAML file over the base preset, then `key=value`
    overrides (dotted for the losses: `losses.feat_loss=l2`); unknown keys are errors."""
    name = preset_or_path or "base"
    if name in PRETRAIN_PRESETS:
        base, values = PRETRAIN_PRESETS[name](), {}
    else:
        base, values = pretrain_base(), _read_yaml(name, ", ".join(PRETRAIN_PRESETS))
    return _resolve(base, values, list(overrides), name)


def load_finetune_config(task: str, preset_or_path: str | None, overrides: list[str] = ()) -> FinetuneConfig:
    """A preset of the task (`FINETUNE_PRESETS`; None: paper, its original recipe) or a YAML file over the paper
    recipe, then `key=value` overrides."""
    name = preset_or_path or "paper"
    if name in FINETUNE_PRESETS:
        base, values = FINETUNE_PRESETS[name](task), {}
    else:
        base, values = finetune_paper(task), _read_yaml(name, ", ".join(FINETUNE_PRESETS))
    if values.get("task", task) != task:
        raise ConfigError(f"--config {preset_or_path}: task {values['task']!r} but finetuning {task!r}")
    return _resolve(base, values, list(overrides), name, _settle_custom_valid)


# ----------------------------------------------------------------------------------------------------------------
# Run folders: the recipe a run was started with, and what a resume may change


# Keys a resumed run may give new values: how long it goes on (the learning-rate schedule is rebuilt over the new
# total, lxm.train.run._apply_state) and how it runs, not what it computes. Any other difference is refused:
# a resumed run trains on the recipe its checkpoints were made with.
RESUMABLE_KEYS = ("optim.epochs", "max_steps", "runtime.num_workers", "runtime.device", "runtime.keep_freed_memory",
                  "runtime.log_every", "checkpoint_every", "keep_last", "eval_batch_size", "optim.micro_batch_size",
                  "runtime.compile", "optim.fused_optimizer", "runtime.cpu_kernels")


# keys added after runs were first written whose absence from an older run's config.yaml is not damage: such a run
# takes the key's default, which computes what the run computed (all objectives, QA weight 1; cpu_kernels changes
# how, not what)
ADDED_LATER = ("runtime.cpu_kernels", "objectives", "qa_weight")


def load_run_config(path: str | Path, overrides: list[str] = ()) -> PretrainConfig | FinetuneConfig:
    """The resolved config a run wrote (OUT/config.yaml; a finetuning run's has `task`), then `key=value` overrides.

    The file must be whole: a run's config.yaml lists every key, so a missing key means a damaged file (truncated),
    not a default (except the `ADDED_LATER` keys, which older runs lack). Runs written before the `optim` /
    `runtime` sections list those keys bare, and load the same. Every problem (not UTF-8, not YAML, a missing key,
    `max_length: twenty`) is a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (not an lxm run folder?)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text: the run's config is damaged") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}{_yaml_position(exc)}: not valid YAML ({_yaml_problem(exc)}): the run's config is "
                          f"damaged") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: not a run's config (expected a mapping of config keys): damaged?")
    task = loaded.get("task")
    if "task" in loaded:
        _task(task, f"{path}: 'task'")
        base: Any = finetune_paper(task)
    else:
        base = pretrain_base()
    # today's layout (optim:, runtime: sections) or the flat one of runs written before them: both whole
    loaded = _nested(type(base), loaded, str(path))
    present = set()
    for key, value in loaded.items():
        if key in SHARED_GROUPS and isinstance(value, dict):
            present.update(f"{key}.{sub}" for sub in value)
        else:
            present.add(key)
    missing = [key for key in _whole_keys(type(base)) if key not in present and key not in ADDED_LATER]
    if missing:
        raise ConfigError(f"{path}: incomplete run config (no {', '.join(missing[:5])}"
                          f"{', ...' if len(missing) > 5 else ''}): the file is damaged (truncated?)")
    return _resolve(base, loaded, list(overrides), str(path))


def _whole_keys(cls: type) -> list[str]:
    """The keys a run's config.yaml lists: every field, the shared groups' as dotted keys (`losses` is one key:
    runs written before some of its fields were added lack them)."""
    hints = typing.get_type_hints(cls)
    return [f"{f.name}.{sub.name}" if f.name in SHARED_GROUPS else f.name for f in dataclasses.fields(cls)
            for sub in (dataclasses.fields(hints[f.name]) if f.name in SHARED_GROUPS else [None])]


def flat_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """key -> value of a config, nested sections as dotted keys (`losses.feat_loss`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_config(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


RESOLVED_AT_START = ("objectives",)  # None in a command: what the run's data allow (config.yaml: the resolved value)


def resume_changes(run_cfg: Any, cfg: Any, where: str | Path) -> dict[str, tuple[Any, Any]]:
    """key -> (run's value, new value) of what `cfg` changes in the run's recipe `run_cfg` (read from `where`).

    Only `RESUMABLE_KEYS` may change; any other difference is a ConfigError naming the keys and both values."""
    if type(run_cfg) is not type(cfg):
        how = (f"a {run_cfg.task} finetuning run; resume it with lxm finetune {run_cfg.task}"
               if isinstance(run_cfg, FinetuneConfig) else "a pretraining run; resume it with lxm pretrain")
        raise ConfigError(f"{where}: {how} --out RUN --resume")
    if isinstance(run_cfg, FinetuneConfig) and run_cfg.task != cfg.task:
        raise ConfigError(f"{where}: a {run_cfg.task} run, not {cfg.task}; resume it with lxm finetune {run_cfg.task}"
                          f" --out RUN --resume")
    old, new = flat_config(run_cfg), flat_config(cfg)
    # a key left unset is resolved at the start as the run resolved it (config.yaml holds the resolved value)
    changes = {k: (old[k], new[k]) for k in old
               if old[k] != new[k] and not (k in RESOLVED_AT_START and new[k] is None)}
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
    if refused:
        shown = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(f"{where}: --resume keeps the run's recipe, but this command changes {shown}; resume with "
                          f"--out RUN --resume alone (only {', '.join(k for k in RESUMABLE_KEYS if k in old)} may "
                          f"change), or start a new run in another --out")
    return changes
