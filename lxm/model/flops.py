"""Model FLOPs of an LXMERT pretraining step, counted analytically (for MFU figures, `benchmarks/model_step.py`).

Counts the matrix products a step needs — 2 FLOPs per multiply-add, as MFU figures conventionally do (PaLM, appendix
B) — from the config and the batch's real sizes: each sentence's real tokens (padding needs no work), N boxes per
image, the masked tokens the MLM decoder is needed at and the masked boxes the feature regression is needed at (what
the five losses read; `pretraining_step_losses` computes exactly that). Attention is counted as computed: over
each sentence's real tokens. Elementwise work (LayerNorm, GeLU, softmax, dropout) is not counted.

Training = forward + backward; the backward of a matrix product costs twice its forward (the gradients of both
operands), except where one operand needs no gradient: the visual feature and box projections (their inputs are
data), whose backward computes the weight gradient only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lxm.model.config import LxmertConfig


@dataclass
class StepFlops:
    """Forward FLOPs by part of the model, and the training step's total (forward + backward)."""

    visual_encoder: int  # visn_fc + box_fc
    language_layers: int
    object_layers: int
    cross_layers: int
    heads: int  # pooler, MLM (masked tokens), matching, object/attribute/feature, QA
    attention: int  # the part of the three encoders' FLOPs spent in attention scores and weighted sums

    @property
    def forward(self) -> int:
        return self.visual_encoder + self.language_layers + self.object_layers + self.cross_layers + self.heads

    @property
    def training(self) -> int:
        """Forward + backward: 3x the forward, but 2x for the visual encoder (no gradient for its data inputs)."""
        return 3 * self.forward - self.visual_encoder


def pretraining_step_flops(cfg: LxmertConfig, lengths: Sequence[int], num_boxes: int, masked_tokens: int,
                           masked_boxes: int) -> StepFlops:
    """FLOPs of one pretraining step of `cfg` on a batch of len(lengths) (sentence, image) rows.

    Args:
        lengths: real tokens of each sentence ([CLS] and [SEP] included, padding excluded).
        num_boxes: boxes per image (36).
        masked_tokens: tokens with an MLM label in the batch (the decoder runs there only).
        masked_boxes: boxes with a feature-regression target (the feature decoder runs there only).
    """
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    b, n = len(lengths), num_boxes
    tokens, boxes = sum(lengths), b * n
    sq = sum(t * t for t in lengths)  # sum of t^2: language self-attention
    tn = tokens * n  # sum of t * N: each cross-attention direction

    def linear(rows: int, fan_in: int, fan_out: int) -> int:
        return 2 * rows * fan_in * fan_out

    def attention(pairs: int) -> int:  # q.k scores and the weighted sum of values, over all heads
        return 2 * 2 * pairs * h

    def transformer_block(rows: int, pairs: int) -> tuple[int, int]:  # self-attention + FFN
        att = attention(pairs)
        return linear(rows, h, 3 * h) + linear(rows, h, h) + att + linear(rows, h, i) + linear(rows, i, h), att

    lang, lang_att = transformer_block(tokens, sq)
    obj, obj_att = transformer_block(boxes, b * n * n)
    cross_att = attention(tn) * 2  # lang -> vision and vision -> lang, one shared projection
    cross = (linear(tokens + boxes, h, 3 * h) + linear(tokens + boxes, h, h) + cross_att
             + lang + obj)  # then each stream's self-attention and FFN, as the single-modality layers
    visual = linear(boxes, cfg.visual_feat_dim, h) + linear(boxes, cfg.visual_pos_dim, h)
    heads = linear(b, h, h)  # pooler
    if cfg.task_mask_lm:
        heads += linear(masked_tokens, h, h) + linear(masked_tokens, h, v)
    if cfg.task_matched:
        heads += linear(b, h, 2)
    if cfg.task_obj_predict:
        heads += linear(boxes, h, h)
        if cfg.visual_obj_loss:
            heads += linear(boxes, h, cfg.num_object_labels)
        if cfg.visual_attr_loss:
            heads += linear(boxes, h, cfg.num_attr_labels)
        if cfg.visual_feat_loss:
            heads += linear(masked_boxes, h, cfg.visual_feat_dim)
    if cfg.task_qa:
        heads += linear(b, h, 2 * h) + linear(b, 2 * h, cfg.num_qa_labels)
    attention_total = cfg.l_layers * lang_att + cfg.r_layers * obj_att + cfg.x_layers * (cross_att + lang_att
                                                                                         + obj_att)
    return StepFlops(visual_encoder=visual, language_layers=cfg.l_layers * lang, object_layers=cfg.r_layers * obj,
                     cross_layers=cfg.x_layers * cross, heads=heads, attention=attention_total)
