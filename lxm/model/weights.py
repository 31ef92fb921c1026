"""Reading and writing LXMERT checkpoints in the three formats researchers have, with strict key coverage.

Formats (lxmert.md §6, §11.2 and hf_lxmert_keys.txt):

- ``original``: airsplay/lxmert pretraining snapshots (``*_LXRT.pth``, ``torch.save`` of the DataParallel-wrapped
  ``LXRTPretraining`` state_dict): ``module.bert.*``, ``module.cls.*``, ``module.obj_predict_head.*``,
  ``module.answer_head.*``.
- ``original-finetuned``: the task models of ``src/tasks/{vqa,gqa,nlvr2}_model.py``: ``lxrt_encoder.model.bert.*``
  (``lxrt_encoder.model.module.bert.*`` after multi-GPU training) and ``logit_fc.{0,2,3}.*``.
- ``hf``: a transformers LXMERT directory or Hub id (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), keys ``lxmert.*``, ``cls.*``, ``obj_predict_head.*``, ``answer_head.*``.
- ``lxm``: a directory with ``config.json`` (``{"format": "lxm", "model": {LxmertConfig}}``) and
  ``model.safetensors`` holding lxm's own parameter names (which are the transformers names).

Every load goes through an explicit prefix map into lxm names, is compared key by key and shape by shape with the
model the config describes, and returns a coverage report (`LoadReport`; logged at DEBUG, the CLI prints it); a
missing, unexpected or mis-shaped key is an error naming the keys (the original loaded with ``strict=False`` and left
NLVR2 users at 50.86 %, airsplay/lxmert #1, #84, #96).
``.pth``/``.bin`` files are read with ``torch.load(weights_only=True)``; a file that would need arbitrary unpickling
is refused.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from lxm.atomic import atomic_path
from lxm.errors import LxmError
from lxm.integrity import IntegrityError, checksummed_path, verify_checksum
from lxm.model.config import LxmertConfig
from lxm.model.modeling import LxmertForPreTraining, build_lxmert, is_task_model

_logger = logging.getLogger(__name__)

Format = Literal["original", "original-finetuned", "hf", "lxm"]
TIED_KEY = "cls.predictions.decoder.weight"  # IS lxmert.embeddings.word_embeddings.weight
EMBED_KEY = "lxmert.embeddings.word_embeddings.weight"
LXM_FORMAT_TAG = "lxm"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
DEFAULT_HEAD_DIM = 64  # every released LXMERT/BERT model; num_attention_heads = hidden_size / 64 when inferred

# source prefix -> lxm prefix, tried in order (first match wins). Everything not matched keeps its name.
# `{head}` in original-finetuned is `answer_head` (VQA/GQA) or `nlvr2_head` (NLVR2), decided by logit_fc.0's shape.
PREFIX_MAPS: dict[str, list[tuple[str, str]]] = {
    "original": [("module.bert.", "lxmert."), ("bert.", "lxmert."), ("module.", "")],
    "original-finetuned": [
        ("module.lxrt_encoder.model.module.bert.", "lxmert."),
        ("module.lxrt_encoder.model.bert.", "lxmert."),
        ("lxrt_encoder.model.module.bert.", "lxmert."),
        ("lxrt_encoder.model.bert.", "lxmert."),
        ("module.logit_fc.", "{head}.logit_fc."),
        ("logit_fc.", "{head}.logit_fc."),
    ],
    "hf": [("lxmert.", "lxmert."), ("embeddings.", "lxmert.embeddings."), ("encoder.", "lxmert.encoder."),
           ("pooler.", "lxmert.pooler.")],
    "lxm": [],
}
HEAD_PREFIXES = ("cls.", "obj_predict_head.", "answer_head.", "nlvr2_head.")


class CheckpointError(LxmError, ValueError):
    """A checkpoint could not be read or does not match the model; the message names the file and keys."""


@dataclass
class LoadReport:
    """What a load did, key by key (lxm names)."""

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint shape, model shape)
    initialised: list[str] = field(default_factory=list)  # missing head keys left at their fresh init (allowed)
    ignored: list[str] = field(default_factory=list)  # extra head keys dropped (allowed)
    tied: list[str] = field(default_factory=list)  # aliases verified equal to their tied parameter

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.mismatched) + len(self.initialised)
        lines = [f"lxm: loaded {len(self.loaded)}/{total} tensors from {self.source} (format: {self.format})"]
        if self.tied:
            lines.append(f"  tied (verified equal to the word embeddings): {', '.join(self.tied)}")
        for title, keys in (("initialised fresh (head not in checkpoint)", self.initialised),
                            ("ignored (head not in model)", self.ignored),
                            ("MISSING from checkpoint", self.missing),
                            ("UNEXPECTED in checkpoint", self.unexpected)):
            if keys:
                lines.append(f"  {title}: {len(keys)}: {_abbrev(keys)}")
        if self.mismatched:
            shown = "; ".join(f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:8])
            lines.append(f"  SHAPE MISMATCH: {len(self.mismatched)}: {shown}")
        return "\n".join(lines)


def _abbrev(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


# ----------------------------------------------------------------------------------------------------------------
# Reading raw tensors


@dataclass
class RawCheckpoint:
    state_dict: dict[str, Tensor]  # source names
    format: str
    path: str
    config: LxmertConfig | None = None  # from an lxm config.json
    hf_config: dict | None = None  # from a transformers config.json


def verified(path: str | os.PathLike) -> None:
    """Compare a file lxm wrote with its recorded checksum (`NAME.sha256`, `lxm.integrity`); a file without one is
    used as it is. Raises CheckpointError naming the file when it was damaged after it was written (neither torch's
    zip reader nor safetensors checks the content)."""
    try:
        verify_checksum(path)
    except IntegrityError as exc:
        raise CheckpointError(str(exc)) from None


def load_torch_file(path: str | os.PathLike):
    """`torch.load(path, weights_only=True)` on the CPU; a file that needs arbitrary unpickling, or is damaged, is a
    CheckpointError naming it (torch's own UnpicklingError text is many lines of advice about allow-lists)."""
    verified(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refusing to load: the file needs arbitrary unpickling, which can execute code. lxm reads "
            f"checkpoints only with torch.load(weights_only=True) (tensors, dicts, numbers, strings). If you trust "
            f"the file, re-save its state_dict with plain tensors. (torch said: {str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None


def _torch_load(path: Path) -> tuple[dict[str, Tensor], dict | None]:
    """(state_dict, the lxm model config when the file is an lxm training checkpoint, else None)."""
    obj = load_torch_file(path)
    model_config = None
    if isinstance(obj, dict):  # a training checkpoint wrapping the state_dict (lxm: with its model config)
        for inner in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(inner), dict) and obj[inner] and all(isinstance(v, Tensor)
                                                                       for v in obj[inner].values()):
                if isinstance(obj.get("model_config"), dict):
                    model_config = obj["model_config"]
                obj = obj[inner]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {_abbrev([str(k) for k in bad])}")
    return obj, model_config


def _safetensors_load(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    verified(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def detect_format(keys: list[str], path: str) -> str:
    """Tell the layout from the key names."""
    if any(k.startswith(("lxrt_encoder.", "module.lxrt_encoder.")) for k in keys):
        return "original-finetuned"
    if any(k.startswith(("module.bert.", "bert.embeddings.", "bert.encoder.")) for k in keys):
        return "original"
    if any(k.startswith(("lxmert.", "embeddings.word_embeddings")) for k in keys):
        return "hf"
    raise CheckpointError(
        f"{path}: not an LXMERT checkpoint: no key starts with 'module.bert.', 'bert.', 'lxrt_encoder.' or 'lxmert.' "
        f"(first keys: {_abbrev(sorted(keys), 5)})"
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _read_dir(path: Path) -> RawCheckpoint:
    cfg_path = path / "config.json"
    weights = [p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.exists()]
    if not cfg_path.exists() or not weights:
        if (path / "model.safetensors.index.json").exists() or (path / "pytorch_model.bin.index.json").exists():
            raise CheckpointError(f"{path}: sharded checkpoints are not supported (LXMERT fits in one file)")
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise CheckpointError(
            f"{path}: expected config.json and model.safetensors (or pytorch_model.bin) in this directory; "
            f"found {found}"
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    sd = _safetensors_load(weights[0]) if weights[0].suffix == ".safetensors" else _torch_load(weights[0])[0]
    if meta.get("format") == LXM_FORMAT_TAG:
        try:
            config = LxmertConfig.from_dict(meta["model"], source=str(cfg_path))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{cfg_path}: invalid lxm model config ({exc})") from None
        return RawCheckpoint(sd, "lxm", str(path), config=config)
    if meta.get("model_type") not in (None, "lxmert"):
        raise CheckpointError(f"{cfg_path}: model_type is {meta.get('model_type')!r}, not 'lxmert'")
    fmt = detect_format(list(sd), str(weights[0]))
    return RawCheckpoint(sd, fmt, str(path), hf_config=meta)


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=repo_id, allow_patterns=["config.json", "model.safetensors",
                                                                   "pytorch_model.bin"])
    except Exception as exc:  # offline, unknown repo, auth: all mean "cannot get it", say how to proceed
        why = " ".join(str(exc).split())  # the hub's messages span lines; ours is one
        raise CheckpointError(
            f"could not fetch '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}: {why}). Without network "
            f"access, download the model directory (config.json + model.safetensors) on another machine and pass "
            f"its local path instead."
        ) from None
    return Path(local)


def read_checkpoint(source: str | os.PathLike) -> RawCheckpoint:
    """Read a checkpoint's tensors and metadata from a file, a directory or a Hub id, without building a model."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_dir(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            sd = _safetensors_load(path)
            raw = RawCheckpoint(sd, detect_format(list(sd), str(path)), str(path))
            sibling = path.with_name("config.json")
            if sibling.exists():
                meta = json.loads(sibling.read_text())
                if meta.get("format") == LXM_FORMAT_TAG:
                    raw.config, raw.format = LxmertConfig.from_dict(meta["model"], source=str(sibling)), "lxm"
                else:
                    raw.hf_config = meta
            return raw
        if suffix in TORCH_SUFFIXES:
            sd, model_config = _torch_load(path)
            if model_config is not None:  # an lxm training checkpoint: {"model": ..., "model_config": ...}
                try:
                    config = LxmertConfig.from_dict(model_config, source=f"{path} ['model_config']")
                except (KeyError, TypeError, ValueError) as exc:
                    raise CheckpointError(f"{path}: invalid 'model_config' ({exc})") from None
                return RawCheckpoint(sd, "lxm", str(path), config=config)
            return RawCheckpoint(sd, detect_format(list(sd), str(path)), str(path))
        raise CheckpointError(
            f"{path}: unsupported checkpoint file type '{suffix}'. lxm reads {', '.join(TORCH_SUFFIXES)} "
            f"(torch.load with weights_only=True), .safetensors, or a directory; pickles are never unpickled"
        )
    text = str(source)
    # A Hub id is "name" or "owner/name"; anything with a file suffix, a leading ./ / ~ or deeper nesting is a path.
    if path.suffix.lower() in TORCH_SUFFIXES + (".safetensors",) or not _HUB_ID.match(text):
        raise CheckpointError(f"{source}: no such file or directory")
    return _read_dir(_download_hub(text))


# ----------------------------------------------------------------------------------------------------------------
# Renaming and config inference


def rename_to_lxm(state_dict: dict[str, Tensor], fmt: str, hidden_size: int | None = None) -> dict[str, Tensor]:
    """Apply the format's prefix map: source names -> lxm names (tensors untouched)."""
    if fmt not in PREFIX_MAPS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; one of {', '.join(PREFIX_MAPS)}")
    head = "answer_head"
    if fmt == "original-finetuned":
        fc0 = next((v for k, v in state_dict.items() if k.endswith("logit_fc.0.weight")), None)
        emb = next((v for k, v in state_dict.items() if k.endswith("embeddings.word_embeddings.weight")), None)
        hidden = hidden_size or (emb.shape[1] if emb is not None else None)
        if fc0 is not None and hidden is not None and fc0.shape[1] == 2 * hidden:
            head = "nlvr2_head"  # the NLVR2 classifier reads two concatenated pooled outputs
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for src, dst in PREFIX_MAPS[fmt]:
            if key.startswith(src):
                new = dst.format(head=head) + key[len(src):]
                break
        if new in out:
            raise CheckpointError(f"two checkpoint keys map to '{new}' (one of them: '{key}')")
        out[new] = value
    return out


def expected_shapes(config: LxmertConfig) -> dict[str, tuple[int, ...]]:
    """lxm key -> shape for the model `config` describes (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = LxmertForPreTraining(config, init_weights=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_config(sd: dict[str, Tensor], *, hf_config: dict | None = None, source: str = "checkpoint"
                 ) -> LxmertConfig:
    """Sizes and heads from tensor shapes (lxm names); head count = hidden / 64 unless a transformers config says."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise CheckpointError(f"{source}: cannot infer the model config: key '{key}' is missing")
        return tuple(sd[key].shape)

    vocab, hidden = shape(EMBED_KEY)
    values: dict = dict(vocab_size=vocab, hidden_size=hidden)
    values["max_position_embeddings"] = shape("lxmert.embeddings.position_embeddings.weight")[0]
    values["type_vocab_size"] = shape("lxmert.embeddings.token_type_embeddings.weight")[0]
    values["visual_feat_dim"] = shape("lxmert.encoder.visn_fc.visn_fc.weight")[1]
    values["visual_pos_dim"] = shape("lxmert.encoder.visn_fc.box_fc.weight")[1]
    values["l_layers"] = _count(sd, r"lxmert\.encoder\.layer\.(\d+)\.")
    values["x_layers"] = _count(sd, r"lxmert\.encoder\.x_layers\.(\d+)\.")
    values["r_layers"] = _count(sd, r"lxmert\.encoder\.r_layers\.(\d+)\.")
    inter = next((v.shape[0] for k, v in sd.items()
                  if k.endswith(("intermediate.dense.weight", "lang_inter.dense.weight"))), None)
    if inter is None:
        raise CheckpointError(f"{source}: cannot infer intermediate_size: no FFN weights found")
    values["intermediate_size"] = inter
    heads = (hf_config or {}).get("num_attention_heads") or max(hidden // DEFAULT_HEAD_DIM, 1)
    values["num_attention_heads"] = heads
    values["task_mask_lm"] = "cls.predictions.bias" in sd
    values["task_matched"] = "cls.seq_relationship.weight" in sd
    values["task_obj_predict"] = "obj_predict_head.transform.dense.weight" in sd
    for name, flag, size_field in (("obj", "visual_obj_loss", "num_object_labels"),
                                   ("attr", "visual_attr_loss", "num_attr_labels"),
                                   ("feat", "visual_feat_loss", None)):
        key = f"obj_predict_head.decoder_dict.{name}.weight"
        values[flag] = key in sd
        if key in sd and size_field:
            values[size_field] = sd[key].shape[0]
    values["task_qa"] = "answer_head.logit_fc.3.weight" in sd
    if values["task_qa"]:
        values["num_qa_labels"] = sd["answer_head.logit_fc.3.weight"].shape[0]
    values["task_nlvr2"] = "nlvr2_head.logit_fc.0.weight" in sd
    if hf_config:
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range"):
            if name in hf_config:
                values[name] = hf_config[name]
        if not values["task_qa"] and "num_qa_labels" in hf_config:
            values["num_qa_labels"] = hf_config["num_qa_labels"]
    try:
        return LxmertConfig(**values)
    except ValueError as exc:
        raise CheckpointError(f"{source}: inferred config is invalid: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# Loading into a model


def load_into(model: LxmertForPreTraining, sd: dict[str, Tensor], *, source: str, fmt: str,
              init_missing_heads: bool = False, ignore_extra_heads: bool = False) -> LoadReport:
    """Copy `sd` (lxm names) into `model` after a key/shape coverage check; raise CheckpointError on any gap."""
    report = LoadReport(source=source, format=fmt)
    sd = dict(sd)
    if TIED_KEY in sd:
        if EMBED_KEY in sd and not torch.equal(sd[TIED_KEY], sd[EMBED_KEY]):
            raise CheckpointError(
                f"{source}: '{TIED_KEY}' differs from '{EMBED_KEY}'; LXMERT ties the MLM decoder to the word "
                f"embeddings, so this checkpoint cannot be represented"
            )
        sd.pop(TIED_KEY)
        report.tied.append(TIED_KEY)
    target = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    for key in target:
        if key not in sd:
            if init_missing_heads and key.startswith(HEAD_PREFIXES):
                report.initialised.append(key)
            else:
                report.missing.append(key)
        elif tuple(sd[key].shape) != tuple(target[key].shape):
            report.mismatched.append((key, tuple(sd[key].shape), tuple(target[key].shape)))
        else:
            report.loaded.append(key)
    for key in sd:
        if key not in target:
            (report.ignored if ignore_extra_heads and key.startswith(HEAD_PREFIXES) else report.unexpected).append(key)
    if not report.ok:
        raise CheckpointError(f"{source}: checkpoint does not match the model\n{report.summary()}")
    with torch.no_grad():
        for key in report.loaded:
            target[key].copy_(sd[key])
    return report


def load_pretrained_with_report(
    source: str | os.PathLike,
    config: LxmertConfig | None = None,
    *,
    init_missing_heads: bool = False,
    ignore_extra_heads: bool = False,
) -> tuple[LxmertForPreTraining, LoadReport]:
    """Like `load_pretrained`, also returning the coverage report (what a caller shows; nothing is printed)."""
    raw = read_checkpoint(source)
    hidden = config.hidden_size if config is not None else (raw.config.hidden_size if raw.config else None)
    sd = rename_to_lxm(raw.state_dict, raw.format, hidden)
    if config is None:
        config = raw.config or infer_config(sd, hf_config=raw.hf_config, source=raw.path)
    model = build_lxmert(config)
    report = load_into(model, sd, source=raw.path, fmt=raw.format, init_missing_heads=init_missing_heads,
                       ignore_extra_heads=ignore_extra_heads)
    _logger.debug(report.summary())
    return model, report


def load_pretrained(
    source: str | os.PathLike,
    config: LxmertConfig | None = None,
    *,
    init_missing_heads: bool = False,
    ignore_extra_heads: bool = False,
) -> LxmertForPreTraining:
    """Build the LXMERT model of `source` and load its weights: `LxmertForFinetuning` when the config has one task head
    and no pretraining head (a finetuned VQA / GQA / NLVR2 model), else `LxmertForPreTraining`.

    Args:
        source: an original airsplay checkpoint (``*_LXRT.pth`` with ``module.bert.`` keys, or a fine-tuned
            ``BEST.pth`` with ``lxrt_encoder.model.bert.`` + ``logit_fc.``), a transformers LXMERT directory or
            Hub id (e.g. ``unc-nlp/lxmert-base-uncased``), or an lxm checkpoint directory.
        config: the model to build; by default the checkpoint's own config (lxm), or one inferred from tensor
            shapes with 64-d attention heads (original, transformers; heads the checkpoint has are built).
        init_missing_heads: allow head keys (``cls``, ``obj_predict_head``, ``answer_head``, ``nlvr2_head``) that
            `config` has but the checkpoint lacks; they keep their fresh init and are listed in the report. Backbone
            keys must always be complete.
        ignore_extra_heads: allow head keys the checkpoint has but `config` lacks; they are dropped and listed.

    Raises:
        CheckpointError: unreadable or unsafe file, unknown layout, or any missing/unexpected/mis-shaped key.
    """
    model, _ = load_pretrained_with_report(source, config, init_missing_heads=init_missing_heads,
                                           ignore_extra_heads=ignore_extra_heads)
    return model


# ----------------------------------------------------------------------------------------------------------------
# BERT initialisation


def init_from_bert(model: LxmertForPreTraining, source: str | os.PathLike,
                   extra_layers: Literal["refuse", "ignore"] = "refuse") -> LoadReport:
    """Copy a BERT checkpoint into the parts of LXMERT that BERT has (the original's `from_pretrained("bert-base-
    uncased")` before `--fromScratch`): embeddings, the language layers, pooler, MLM head and the matching head
    (BERT's next-sentence classifier). Every BERT tensor must find its place with the right shape; object-relationship
    and cross layers, the visual encoder and the visual/QA heads keep their fresh init (listed in the report).

    Args:
        source: a transformers BERT directory (config.json + model.safetensors / pytorch_model.bin), such a file, or
            a Hub id such as bert-base-uncased.
        extra_layers: BERT layers past the model's language layers (BERT-base's 9-11 for LXMERT's 9): "refuse" (a
            CheckpointError, as any tensor without a place) or "ignore" (left out and listed as ignored, as the
            original's `from_pretrained`, which loads by name and drops what finds no place).

    Returns:
        The coverage report (logged at DEBUG; the caller shows it).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files = [p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.exists()]
        if not files:
            raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
        path = files[0]
    elif not path.exists():
        path = _download_hub(str(source)) / "model.safetensors"
        if not path.exists():
            path = path.with_name("pytorch_model.bin")
    sd = _safetensors_load(path) if path.suffix == ".safetensors" else _torch_load(path)[0]
    renamed: dict[str, Tensor] = {}
    ignored = []
    for key, value in sd.items():
        if key.startswith("bert."):
            key = key[len("bert."):]
        # the 2018 bert-base-uncased weights name LayerNorm parameters gamma/beta
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key == "cls.predictions.decoder.bias":  # an alias of cls.predictions.bias in some versions
            ignored.append(key)
            continue
        layer = re.match(r"encoder\.layer\.(\d+)\.", key)
        if extra_layers == "ignore" and layer is not None and int(layer.group(1)) >= model.config.l_layers:
            ignored.append(key)
        elif key.startswith(("embeddings.", "encoder.layer.", "pooler.")):
            renamed["lxmert." + key] = value
        elif key.startswith(("cls.predictions.", "cls.seq_relationship.")):
            renamed[key] = value
        else:
            ignored.append(key)  # e.g. position_ids buffers of some transformers versions
    target = model.state_dict()
    report = LoadReport(source=str(path), format="bert")
    bad = [k for k in renamed if k not in target and k != TIED_KEY]
    shapes = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in renamed.items()
              if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if bad or shapes:
        report.unexpected, report.mismatched = bad, shapes
        raise CheckpointError(f"{path}: BERT weights do not fit this LXMERT\n{report.summary()}")
    with torch.no_grad():
        for key, value in renamed.items():
            if key != TIED_KEY:
                target[key].copy_(value)
                report.loaded.append(key)
    report.initialised = [k for k in target if k not in renamed and k != TIED_KEY]
    report.ignored = ignored
    _logger.debug(report.summary())
    return report


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _lxm_state_dict(model: LxmertForPreTraining) -> dict[str, Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != TIED_KEY}


def hf_config_dict(config: LxmertConfig, labels: Sequence[str] | None = None) -> dict:
    """The transformers `config.json` for `config` (what `LxmertConfig.to_dict()` of transformers holds).

    Args:
        labels: the name of each row of the answer head (a finetuned model's answer table or classification
            labels, id = position): written as `id2label` / `label2id`, so that transformers'
            `LxmertForQuestionAnswering.from_pretrained(DIR).config.id2label[logits.argmax(-1)]` names the answer.
    """
    if config.task_nlvr2:
        raise CheckpointError("transformers' LXMERT has no NLVR2 pair head (its classes read one pooled output; "
                              "the pair head reads the two of an image pair): write --to lxm (config.json + "
                              "model.safetensors with lxm names) or --to original (the original's BEST.pth) instead")
    if config.num_attention_heads * DEFAULT_HEAD_DIM != config.hidden_size:
        _logger.warning("attention heads are not 64-d; readers that infer the head count from shapes will differ")
    if config.layer_norm_eps != 1e-12:
        raise CheckpointError("transformers' LXMERT hard-codes LayerNorm eps 1e-12; this model uses "
                              f"{config.layer_norm_eps}")
    if config.task_mask_lm and config.task_matched:
        arch = "LxmertForPreTraining"
    elif config.task_qa and not (config.task_mask_lm or config.task_matched or config.task_obj_predict):
        arch = "LxmertForQuestionAnswering"
    else:
        raise CheckpointError(
            "transformers' LXMERT classes have either both pretraining heads (MLM + matching) or only the answer "
            "head; this model's head set cannot be written in hf format"
        )
    keys = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_dropout_prob",
            "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size", "initializer_range",
            "l_layers", "x_layers", "r_layers", "visual_feat_dim", "visual_pos_dim", "num_object_labels",
            "num_attr_labels", "num_qa_labels", "task_mask_lm", "task_matched", "task_obj_predict", "task_qa",
            "visual_obj_loss", "visual_attr_loss", "visual_feat_loss")
    out = {k: getattr(config, k) for k in keys}
    out.update(model_type="lxmert", architectures=[arch], hidden_act="gelu", visual_loss_normalizer=6.67,
               tie_word_embeddings=True)
    if labels is not None:
        out.update(_label_maps(config, list(labels)))
    return out


def _label_maps(config: LxmertConfig, labels: list[str]) -> dict:
    """transformers' `id2label` (str(row) -> name, as its JSON holds it) and `label2id` of the answer head's rows."""
    if not config.task_qa:
        raise CheckpointError(f"{len(labels)} answer names given, but the model has no answer head to name")
    if len(labels) != config.num_qa_labels:
        raise CheckpointError(f"{len(labels)} answer names for an answer head of {config.num_qa_labels} rows (the "
                              f"answer table the model was trained with is needed)")
    first: dict[str, int] = {}
    for i, name in enumerate(labels):
        if not isinstance(name, str):
            raise CheckpointError(f"answer name {i} is {name!r}, not a string")
        if name in first:
            raise CheckpointError(f"the answer {name!r} names rows {first[name]} and {i} (each row needs its own name)")
        first[name] = i
    return {"id2label": {str(i): name for i, name in enumerate(labels)}, "label2id": first}


def _atomic_dir_write(out_dir: Path, files: dict[str, bytes | dict[str, Tensor]], metadata: dict | None = None
                      ) -> None:
    """Write files into `out_dir` via temporary names + rename, so a crash never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    for name, content in files.items():
        if isinstance(content, bytes):  # config.json: text users may edit (id2label), not checksummed
            with atomic_path(out_dir / name) as tmp:
                tmp.write_bytes(content)
        else:  # the weights get NAME.sha256 beside them: damage is refused on load
            with checksummed_path(out_dir / name) as tmp:
                save_file(content, str(tmp), metadata=metadata)


def _save_dir(model: LxmertForPreTraining, out_dir: str | os.PathLike, config_json: dict) -> Path:
    """config.json + model.safetensors (lxm names = transformers names; the tied decoder stored once)."""
    out = Path(out_dir)
    _atomic_dir_write(out, {"model.safetensors": _lxm_state_dict(model),
                            "config.json": (json.dumps(config_json, indent=2, sort_keys=True) + "\n").encode()},
                      metadata={"format": "pt"})
    return out


def save_lxm(model: LxmertForPreTraining, out_dir: str | os.PathLike) -> Path:
    """Write an lxm checkpoint directory, keeping the full `LxmertConfig`."""
    from lxm import __version__

    return _save_dir(model, out_dir, {"format": LXM_FORMAT_TAG, "lxm_version": __version__,
                                      "model": model.config.to_dict()})


def save_hf(model: LxmertForPreTraining, out_dir: str | os.PathLike, labels: Sequence[str] | None = None) -> Path:
    """Write a transformers-loadable directory (`LxmertForPreTraining.from_pretrained(out_dir)` works; a model with
    only the answer head: `LxmertForQuestionAnswering`); `labels` name the answer head's rows (`hf_config_dict`)."""
    return _save_dir(model, out_dir, hf_config_dict(model.config, labels))


def save_original(model: LxmertForPreTraining, path: str | os.PathLike) -> Path:
    """Write the original code's layout: a pretraining model as `*_LXRT.pth` (`module.bert.*`, `module.<head>.*`),
    a finetuned task model as the `BEST.pth` its task scripts save (`lxrt_encoder.model.bert.*` + `logit_fc.*`, the
    VQA / GQA answer head or the NLVR2 pair head; src/tasks/{vqa,gqa,nlvr2}_model.py).

    The tied decoder is written under both names, as `torch.save` of the original's state_dict does.
    """
    task = is_task_model(model.config)
    if model.config.task_nlvr2 and not task:
        raise CheckpointError("the original pretraining checkpoint has no NLVR2 head; save in lxm format instead")
    sd = {}
    for key, value in model.state_dict().items():
        if key.startswith("lxmert."):
            name = ("lxrt_encoder.model.bert." if task else "module.bert.") + key[len("lxmert."):]
        elif task:  # the one task head: answer_head.logit_fc.* or nlvr2_head.logit_fc.*
            name = key.split(".", 1)[1]
        else:
            name = "module." + key
        sd[name] = value.detach().clone()
    with checksummed_path(path) as tmp:
        torch.save(sd, tmp)
    return Path(path)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str,
                       labels: Sequence[str] | None = None) -> LoadReport:
    """Load `src` (any supported format) strictly and write it to `dst` in format `to` (lxm, hf or original).

    Args:
        labels: with `to="hf"`, the names of the answer head's rows, written as the config's `id2label` /
            `label2id` (the other formats hold no names: an lxm run keeps them in RUN/answers.json).

    Returns the coverage report of the load.
    """
    writers = {"lxm": save_lxm, "hf": save_hf, "original": save_original}
    if to not in writers:
        raise CheckpointError(f"unknown target format {to!r}; one of {', '.join(writers)}")
    if labels is not None and to != "hf":
        raise CheckpointError(f"answer names are written into hf configs (id2label) only, not --to {to}")
    model, report = load_pretrained_with_report(src)
    if to == "hf":
        hf_config_dict(model.config, labels)  # fail before writing anything
        save_hf(model, dst, labels)
    else:
        writers[to](model, dst)
    return report
