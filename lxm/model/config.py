"""Model configuration for LXMERT.

Reproduces the two configuration objects of airsplay/lxmert `src/lxrt/modeling.py` (`BertConfig` L172-231 loaded from
bert-base-uncased, and the module-level `VisualConfig` L141-166) as one dataclass, plus the head switches of the
Hugging Face port (`LxmertConfig`), so that one object describes every checkpoint lxm can read or write.
Paper: Tan & Bansal, "LXMERT: Learning Cross-Modality Encoder Representations from Transformers", EMNLP 2019, §2-3.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxm.errors import ConfigError


@dataclass
class LxmertConfig:
    """Every size and switch of an LXMERT encoder plus its heads.

    Field names follow the Hugging Face `LxmertConfig` where one exists, so `config.json` files convert mechanically.
    """

    # --- text side (BERT-base) ---
    vocab_size: int = 30522  # WordPiece vocabulary of bert-base-uncased
    hidden_size: int = 768  # width of every stream; attention heads are hidden_size / num_attention_heads wide
    num_attention_heads: int = 12  # 64-d heads, as BERT-base
    intermediate_size: int = 3072  # FFN inner width
    hidden_dropout_prob: float = 0.1  # dropout after embeddings, attention output, FFN output and visual encoder
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    max_position_embeddings: int = 512  # position table size (only the first 20 rows are ever used by LXMERT)
    type_vocab_size: int = 2  # token types; LXMERT always feeds type 0
    initializer_range: float = 0.02  # std of the N(0, std) init of Linear/Embedding weights (init_bert_weights)
    layer_norm_eps: float = 1e-12  # eps of every LayerNorm, as BERT
    # --- layer counts ("lxr955") ---
    l_layers: int = 9  # language-only self-attention layers
    x_layers: int = 5  # cross-modality layers (one shared cross-attention used in both directions)
    r_layers: int = 5  # object-relationship (vision-only) self-attention layers
    # --- vision side ---
    visual_feat_dim: int = 2048  # Faster R-CNN pool5 feature size
    visual_pos_dim: int = 4  # normalised (x1, y1, x2, y2)
    # --- heads (a head is absent when its switch is off; its keys then do not exist) ---
    task_mask_lm: bool = True  # MLM head `cls.predictions` (decoder tied to the word embeddings)
    task_matched: bool = True  # image-text matching head `cls.seq_relationship` (2-way; index 1 = matched)
    task_obj_predict: bool = True  # shared visual transform `obj_predict_head` with the decoders switched on below
    visual_obj_loss: bool = True  # object-label decoder (num_object_labels-way)
    visual_attr_loss: bool = True  # attribute decoder (num_attr_labels-way)
    visual_feat_loss: bool = True  # RoI-feature regression decoder (visual_feat_dim outputs)
    task_qa: bool = True  # answer head 768 -> 1536 -> GeLU -> LN -> num_qa_labels on the pooled output
    task_nlvr2: bool = False  # NLVR2 pair head: concat of two pooled outputs -> 1536 -> GeLU -> LN -> 2
    num_object_labels: int = 1600  # Visual Genome object classes (background excluded)
    num_attr_labels: int = 400  # Visual Genome attribute classes ("no attribute" excluded)
    num_qa_labels: int = 9500  # pretraining answer table (all_ans.json); VQA 3129, GQA 1842 after finetuning

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fail fast, naming the field, on values the model cannot be built with."""
        positive = [
            "vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings",
            "type_vocab_size", "visual_feat_dim", "visual_pos_dim", "num_object_labels", "num_attr_labels",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"LxmertConfig.{name} must be a positive integer, got {value!r}")
        for name in ("l_layers", "x_layers", "r_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"LxmertConfig.{name} must be a non-negative integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"LxmertConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.task_qa and (not isinstance(self.num_qa_labels, int) or self.num_qa_labels <= 0):
            raise ConfigError(
                f"LxmertConfig.num_qa_labels must be positive when task_qa is on, got {self.num_qa_labels!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"LxmertConfig.{name} must be in [0, 1), got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # --- (de)serialisation ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "LxmertConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown LxmertConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LxmertConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> "LxmertConfig":
        return dataclasses.replace(self, **changes)


def lxmert_base(**overrides: Any) -> LxmertConfig:
    """The released LXMERT: BERT-base width, 9 language / 5 cross / 5 object layers, 9500 pretraining answers."""
    return LxmertConfig(**overrides)


def lxmert_small(**overrides: Any) -> LxmertConfig:
    """A 256-wide model (4 heads, FFN 1024, l/x/r = 3/2/2) with the real vocab and heads; used by the benchmarks."""
    values: dict[str, Any] = dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, l_layers=3,
                                  x_layers=2, r_layers=2)
    values.update(overrides)
    return LxmertConfig(**values)


def lxmert_tiny(**overrides: Any) -> LxmertConfig:
    """A ~120k-parameter model for unit tests and smoke runs: every module of the base model, tiny widths.

    Its init std is 0.1, not BERT's 0.02: at hidden size 32 a 0.02 init lets a token's own embedding swamp what the
    attention brings from other tokens (two 0.02 projections scale it by ~0.02^2 * 32), so [CLS] — and with it the
    matching head — starts input-independent and image-text matching sat at chance for >1,000 steps (measured).
    """
    values: dict[str, Any] = dict(
        vocab_size=1200, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
        l_layers=2, x_layers=2, r_layers=1, visual_feat_dim=16, num_object_labels=10, num_attr_labels=6,
        num_qa_labels=7, initializer_range=0.1,
    )
    values.update(overrides)
    return LxmertConfig(**values)


PRESETS = {"base": lxmert_base, "small": lxmert_small, "tiny": lxmert_tiny}


def preset(name: str) -> LxmertConfig:
    """Look up a named preset (`base`, `small`, `tiny`)."""
    if name not in PRESETS:  # tested first: a KeyError inside a preset is a bug, not an unknown name
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


__all__ = ["LxmertConfig", "lxmert_base", "lxmert_small", "lxmert_tiny", "preset", "PRESETS"]
