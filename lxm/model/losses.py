"""The five LXMERT pretraining objectives as plain functions.

Reproduces the loss code of airsplay/lxmert `src/lxrt/modeling.py` `LXRTPretraining.forward` (L940-989) and the
visual-loss table `VISUAL_CONFIG.visual_loss_config` (L159-161); paper §3.1. Defaults are the ORIGINAL CODE's
conventions, which differ from the paper text in two places that users tripped over (airsplay/lxmert #19, #41, #90):

- object/attribute classification is computed over ALL boxes, each weighted by the detector's confidence
  (not only over the masked boxes as the paper says);
- the "l2" feature loss is SmoothL1 (beta 1), averaged over the feature dimension, on the masked boxes.

Each visual term is `mean over all B*N boxes (per-box loss * weight) * (1 / 0.15)` (the original divides by B*N, not by
the masked count). The paper's variants are named switches of `PretrainLossConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from lxm.model.modeling import LxmertForPreTraining, LxmertOutput

LOSS_NAMES = ("mlm", "match", "obj", "attr", "feat", "qa")


IGNORE_INDEX = -1  # the label meaning "no target" in every lxm loss and batch (the original's; transformers: -100)


@dataclass
class PretrainLossConfig:
    """How the pretraining losses are computed. Defaults reproduce the original code."""

    ignore_index: int = IGNORE_INDEX  # label meaning "no target" for MLM, QA, obj, attr (must be what the data writes)
    visual_loss_normalizer: float = 1 / 0.15  # multiplies obj/attr/feat (original 1/0.15; transformers 6.67)
    obj_attr_boxes: Literal["all", "masked"] = "all"  # "all": every box (code); "masked": masked boxes only (paper)
    obj_attr_confidence: bool = True  # weight obj/attr CE by the detector confidence (code; #19: against overfitting)
    feat_loss: Literal["smoothl1", "l2"] = "smoothl1"  # feature regression: SmoothL1 (code) or squared error (paper)

    def __post_init__(self) -> None:
        if self.obj_attr_boxes not in ("all", "masked"):
            raise ValueError(
                f"PretrainLossConfig.obj_attr_boxes must be 'all' or 'masked', got {self.obj_attr_boxes!r}")
        if self.feat_loss not in ("smoothl1", "l2"):
            raise ValueError(f"PretrainLossConfig.feat_loss must be 'smoothl1' or 'l2', got {self.feat_loss!r}")


@dataclass
class PretrainLabels:
    """Targets of one pretraining batch. Any field may be None: that loss is then not computed.

    Shapes: B batch, T tokens, N boxes, F feature size.
    """

    mlm_labels: Tensor | None = None  # [B, T] long: original token id where masked, ignore_index elsewhere
    matched: Tensor | None = None  # [B] long: 1 = the sentence describes the image, 0 = a random other sentence
    obj_labels: Tensor | None = None  # [B, N] long: detector object class (0..1599), ignore_index: no target
    obj_conf: Tensor | None = None  # [B, N] float: detector confidence of that class
    attr_labels: Tensor | None = None  # [B, N] long: detector attribute class (0..399), ignore_index: no target
    attr_conf: Tensor | None = None  # [B, N] float
    feat_target: Tensor | None = None  # [B, N, F] float: the ORIGINAL (unmasked) region features
    feat_mask: Tensor | None = None  # [B, N] float 0/1: 1 where the box was selected for masking
    answers: Tensor | None = None  # [B] long: answer id, ignore_index when unlabelled or mismatched
    box_mask: Tensor | None = None  # [B, N] 0/1: 1 a real box, 0 padding (images with fewer boxes than N); the
    #   visual losses average over real boxes. None: all B*N real (LXMERT's fixed 36), averaged as the original


def _zero_like_graph(x: Tensor) -> Tensor:
    # A term with no valid target contributes 0 but stays connected to the graph (the original would give NaN).
    return x.sum() * 0.0


def masked_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy over positions whose label is not `ignore_index`, mean over those positions.

    Args:
        logits: [..., V] (dense [B, T, V] or packed [M, V]).
        labels: [...] matching `logits` without the last dim.
    """
    labels = labels.reshape(-1)
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=ignore_index,
                             reduction="sum")
    # sum / count equals the mean CE; with no valid label it is 0 (the original gives NaN) and needs no host sync.
    return summed / (labels != ignore_index).sum().clamp(min=1)


def match_loss(logits: Tensor, matched: Tensor) -> Tensor:
    """Image-text matching: 2-way CE on the pooled output, mean over the batch. logits [B, 2], matched [B]."""
    return F.cross_entropy(logits.float(), matched.reshape(-1))


def weighted_box_ce(logits: Tensor, labels: Tensor, weights: Tensor, normalizer: float,
                    ignore_index: int = IGNORE_INDEX, box_mask: Tensor | None = None) -> Tensor:
    """Per-box CE times a per-box weight, averaged over ALL boxes, times `normalizer` (obj and attr losses).

    A box labelled `ignore_index` contributes 0 but still counts in the mean, as the original's
    `CrossEntropyLoss(ignore_index=-1, reduction='none')` followed by `.mean()`. logits [B, N, C], labels [B, N],
    weights [B, N]; `box_mask` [B, N] (padding 0): the mean is over the real boxes only.
    """
    per_box = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                              ignore_index=ignore_index, reduction="none")
    weighted = per_box * weights.reshape(-1).to(per_box.dtype)
    if box_mask is None:
        return weighted.mean() * normalizer
    real = box_mask.reshape(-1).to(per_box.dtype)
    return (weighted * real).sum() / real.sum().clamp(min=1) * normalizer


def feat_regression_loss(pred: Tensor, target: Tensor, mask: Tensor, normalizer: float,
                         kind: Literal["smoothl1", "l2"] = "smoothl1", box_mask: Tensor | None = None) -> Tensor:
    """Per-box feature regression loss (averaged over features) times the box mask, averaged over ALL boxes.

    Args:
        pred: [B, N, F] predictions, or packed [K, F] for exactly the boxes where `mask` is non-zero.
        target: [B, N, F] original features.
        mask: [B, N] 0/1 (or weights).
        box_mask: [B, N] 1 a real box, 0 padding (never in `mask`): the mean is over real boxes; None: all real.
    """
    mask = mask.to(pred.dtype if pred.is_floating_point() else torch.float32)
    # the original divides by B*N, not by the number of masked boxes; with padding, by the real boxes
    total = mask.numel() if box_mask is None else box_mask.sum().clamp(min=1)
    if pred.dim() == 2:  # packed: rows are the non-zero mask positions, row-major
        where = mask != 0
        target, mask = target[where], mask[where]
    else:
        pred, target, mask = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1]), mask.reshape(-1)
    if pred.shape[0] == 0:
        return _zero_like_graph(pred)
    pred, target = pred.float(), target.float()
    if kind == "smoothl1":
        per_box = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).mean(-1)
    elif kind == "l2":
        per_box = F.mse_loss(pred, target, reduction="none").mean(-1)
    else:
        raise ValueError(f"feature loss must be 'smoothl1' or 'l2', got {kind!r}")
    return (per_box * mask.float()).sum() / total * normalizer


def qa_loss(logits: Tensor, answers: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pretraining QA: CE over the answer table for labelled, matched pairs (mean over those). logits [B, A]."""
    return masked_lm_loss(logits, answers, ignore_index)


def soft_answer_loss(logits: Tensor, target: Tensor) -> Tensor:
    """VQA / GQA finetuning (airsplay src/tasks/vqa.py L106-108): `BCEWithLogitsLoss()` (mean over B x A) times
    the number of answers A. logits [B, A]; target [B, A] soft scores in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float()) * logits.shape[-1]


def pair_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """NLVR2 finetuning (src/tasks/nlvr2.py): 2-way CE on the pair head, mean over pairs. logits [P, 2], labels [P]."""
    return F.cross_entropy(logits.float(), labels.reshape(-1))


def pretraining_losses(out: "LxmertOutput", labels: PretrainLabels, cfg: PretrainLossConfig | None = None
                       ) -> dict[str, Tensor]:
    """Named losses of one pretraining batch, from a model output and its labels.

    Works with dense or packed `mlm_logits` / `feat_pred` (see `LxmertForPreTraining.forward`); packed outputs must
    have been computed at `labels.mlm_labels != ignore_index` and `labels.feat_mask != 0`, which is what
    `pretraining_step_losses` asks for. Returns a subset of {"mlm", "match", "obj", "attr", "feat", "qa"}; the
    training objective is their plain sum (paper: equal weights).
    """
    cfg = cfg or PretrainLossConfig()
    losses: dict[str, Tensor] = {}
    if labels.mlm_labels is not None and out.mlm_logits is not None:
        mlm_labels = labels.mlm_labels
        if out.mlm_logits.dim() == 2 and mlm_labels.dim() == 2:
            mlm_labels = mlm_labels[mlm_labels != cfg.ignore_index]
        losses["mlm"] = masked_lm_loss(out.mlm_logits, mlm_labels, cfg.ignore_index)
    if labels.matched is not None and out.match_logits is not None:
        losses["match"] = match_loss(out.match_logits, labels.matched)
    for name, logits, ids, conf in (("obj", out.obj_logits, labels.obj_labels, labels.obj_conf),
                                    ("attr", out.attr_logits, labels.attr_labels, labels.attr_conf)):
        if logits is None or ids is None:
            continue
        weights = torch.ones(ids.shape, device=logits.device)
        if cfg.obj_attr_confidence:
            if conf is None:
                raise ValueError(f"PretrainLabels.{name}_conf is required when obj_attr_confidence is on")
            weights = weights * conf
        if cfg.obj_attr_boxes == "masked":
            if labels.feat_mask is None:
                raise ValueError(f"PretrainLabels.feat_mask is required for {name} loss on masked boxes only")
            weights = weights * labels.feat_mask
        losses[name] = weighted_box_ce(logits, ids, weights, cfg.visual_loss_normalizer, cfg.ignore_index,
                                       labels.box_mask)
    if out.feat_pred is not None and labels.feat_target is not None:
        if labels.feat_mask is None:
            raise ValueError("PretrainLabels.feat_mask is required for the feature regression loss")
        losses["feat"] = feat_regression_loss(out.feat_pred, labels.feat_target, labels.feat_mask,
                                              cfg.visual_loss_normalizer, cfg.feat_loss, labels.box_mask)
    if labels.answers is not None and out.answer_logits is not None:
        losses["qa"] = qa_loss(out.answer_logits, labels.answers, cfg.ignore_index)
    return losses


def pretraining_step_losses(model: "LxmertForPreTraining", labels: PretrainLabels,
                            cfg: PretrainLossConfig | None = None, **inputs: Tensor
                            ) -> tuple[dict[str, Tensor], "LxmertOutput"]:
    """Forward a batch and return (named losses, output), computing only what the losses read.

    MLM logits only at masked tokens, feature predictions only at masked boxes, and no work on padded text positions
    (`pack_text`). `inputs` are the keyword arguments of `LxmertForPreTraining.forward` (input_ids, attention_mask,
    token_type_ids, visual_feats, visual_boxes, ...). The losses equal those of a dense forward.
    """
    cfg = cfg or PretrainLossConfig()
    mlm_positions = labels.mlm_labels != cfg.ignore_index if labels.mlm_labels is not None else None
    feat_positions = labels.feat_mask != 0 if labels.feat_mask is not None and labels.feat_target is not None else None
    out = model(**inputs, mlm_positions=mlm_positions, feat_positions=feat_positions, pack_text=True)
    return pretraining_losses(out, labels, cfg), out
