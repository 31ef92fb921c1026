"""Pretraining and task heads of LXMERT.

Reproduces `BertPreTrainingHeads` / `BertLMPredictionHead` / `BertPredictionHeadTransform`, `BertVisualObjHead`
(L635-658) and `BertVisualAnswerHead` (L620-632) of airsplay/lxmert `src/lxrt/modeling.py`, and the NLVR2 classifier
of `src/tasks/nlvr2_model.py` (L26-53). Paper §3.1 (pretraining tasks) and §4 (NLVR2 pair concatenation).
Each head is its own module; which ones a model has is decided by its `LxmertConfig` switches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

class PredictionHeadTransform(nn.Module):
    """dense -> GELU -> LayerNorm, shared by the MLM head and the visual heads."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.transform_act_fn = nn.GELU()  # exact (erf) form, as the original
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class LMPredictionHead(nn.Module):
    """Masked-LM head: transform -> decoder (weight tied to the word embeddings, set by the owner) + own bias."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float):
        super().__init__()
        # Registered before the submodules so that `cls.predictions.bias` comes first in state_dict order, as HF.
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.transform = PredictionHeadTransform(hidden_size, eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [..., H] -> logits [..., V]: `F.linear` over the decoder's (tied) weight, plus the head's bias."""
        return F.linear(self.transform(hidden), self.decoder.weight, self.bias)


class PreTrainingHeads(nn.Module):
    """`cls.predictions` (MLM) and `cls.seq_relationship` (2-way matching on the pooled output); either may be off."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float, *, mlm: bool, matched: bool):
        super().__init__()
        self.predictions = LMPredictionHead(hidden_size, vocab_size, eps) if mlm else None
        self.seq_relationship = nn.Linear(hidden_size, 2) if matched else None


class VisualObjHead(nn.Module):
    """One transform shared by the object-label, attribute and feature-regression decoders (`decoder_dict`)."""

    def __init__(self, hidden_size: int, sizes: dict[str, int], eps: float):
        super().__init__()
        self.transform = PredictionHeadTransform(hidden_size, eps)
        self.decoder_dict = nn.ModuleDict({name: nn.Linear(hidden_size, n) for name, n in sizes.items()})

    def forward(self, visn: Tensor, *, feat_positions: Tensor | None = None) -> dict[str, Tensor]:
        """visn [B, N, H] -> {"obj": [B,N,1600], "attr": [B,N,400], "feat": [B,N,2048] or [K,2048]}."""
        h = self.transform(visn)
        out = {}
        for name, decoder in self.decoder_dict.items():
            out[name] = decoder(h[feat_positions] if name == "feat" and feat_positions is not None else h)
        return out


class AnswerHead(nn.Module):
    """QA classifier on the pooled output: H -> 2H -> GeLU -> LN -> answers (`logit_fc.{0,2,3}`)."""

    def __init__(self, hidden_size: int, num_answers: int, eps: float):
        super().__init__()
        self.logit_fc = nn.Sequential(
            nn.Linear(hidden_size, hidden_size * 2), nn.GELU(), nn.LayerNorm(hidden_size * 2, eps=eps),
            nn.Linear(hidden_size * 2, num_answers),
        )

    def forward(self, pooled: Tensor) -> Tensor:
        return self.logit_fc(pooled)


class Nlvr2PairHead(nn.Module):
    """NLVR2 classifier: the pooled outputs of (img0, s) and (img1, s) concatenated -> 2H -> GeLU -> LN -> 2.

    Input rows 2i and 2i+1 are the two images of pair i (the original flattens [B, 2, ...] the same way).
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.logit_fc = nn.Sequential(
            nn.Linear(hidden_size * 2, hidden_size * 2), nn.GELU(), nn.LayerNorm(hidden_size * 2, eps=eps),
            nn.Linear(hidden_size * 2, 2),
        )

    def forward(self, pooled: Tensor) -> Tensor:
        if pooled.shape[0] % 2:
            raise ValueError(f"NLVR2 pair head: a batch of {pooled.shape[0]} rows is odd; rows 2i and 2i+1 must be the "
                             f"two images of pair i")
        return self.logit_fc(pooled.reshape(pooled.shape[0] // 2, -1))
