"""The LXMERT encoder, its pretraining model and the finetuning task model.

Reproduces `src/lxrt/modeling.py` of airsplay/lxmert @ 0db1182 (`BertEmbeddings` L264-292, `BertAttention` L295-347,
`BertLayer` L418-429, `LXRTXLayer` L439-488, `VisualFeatEncoder` L491-517, `LXRTEncoder` L546-566, `BertPooler`
L569-581, `LXRTModel` L845-886, `LXRTPretraining` L889-989) and the task models of `src/tasks/{vqa,gqa,nlvr2}_model.py`;
paper §2 (model), §3.1 (pretraining heads) and §4 (finetuning). Read beside transformers' `modeling_lxmert.py`: the
same modules, parameter names and outputs (`output_attentions` included).

Module and parameter names are those of the Hugging Face port (`lxmert.` where the original has `bert.`), so a
transformers checkpoint loads with the identity map and an original `*_LXRT.pth` with a prefix rename (see
`lxm.model.weights`). Numerics follow the original: post-LN, exact (erf) GELU, LayerNorm eps 1e-12, `padding_idx=0`
on all three text embeddings, visual input `(LN(W_f f) + LN(W_b b)) / 2`, one cross-attention module shared by both
directions, tanh pooler on [CLS] after the last cross layer, the MLM decoder tied to the word embeddings.

The model is `torch.nn` modules and `F.scaled_dot_product_attention`. What differs from the original in *how* it is
computed, not in what:
- masks are boolean key-padding masks, built once per forward (`_key_padding_mask`);
- packed text (`pack_text`, training): the language stream carries only the real tokens (`TextLayout`), so padding
  costs no matrix product;
- each attention's query, key and value projections run as one product over their concatenated weights
  (`LxmertAttention.project`), and the shared cross-attention projects both streams in one product
  (`LxmertCrossAttentionLayer.both_ways`: same weights, so the same values up to float rounding);
- the heads that need only some positions get only those (`mlm_positions`, `feat_positions`).
On CPU tensors the dropout draw and attention with dropout use `lxm.model.cpu_kernels` (a setting and
`LXM_CPU_KERNELS` switch them; off, and on every other device by default, the plain modules compute). The model
computes in the dtype of its parameters: a bf16 copy (`lxm.train.precision`) casts the float inputs (region
features, boxes) to bf16 itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lxm.errors import ConfigError
from lxm.model import cpu_kernels
from lxm.model.config import LxmertConfig
from lxm.model.heads import (
    AnswerHead,
    Nlvr2PairHead,
    PreTrainingHeads,
    VisualObjHead,
)

_logger = logging.getLogger(__name__)


def _key_padding_mask(mask: Tensor | None) -> Tensor | None:
    """[B, S] 1/0 mask -> [B, 1, 1, S] boolean "may attend" mask for SDPA (None stays None).

    A boolean mask equals the original's additive -10000 in fp32 (exp underflows to 0 either way) and stays valid
    under bf16/fp16 autocast, where an additive float mask would have to match the query dtype.
    """
    if mask is None:
        return None
    return mask[:, None, None, :].to(torch.bool)


def _dropout(module: nn.Dropout, x: Tensor, kernels: bool | None) -> Tensor:
    """`module(x)`, or in training the CPU kernel's draw where `cpu_kernels.active(kernels, x)`."""
    if module.training and module.p > 0 and cpu_kernels.active(kernels, x):
        return cpu_kernels.dropout(x, module.p)
    return module(x)


class TextLayout:
    """Where the language stream's rows live inside the encoder.

    The language stream is carried as a [rows, H] matrix: either all B*T positions (dense, `index` None: the
    conversions are free views) or only the real tokens (packed). Packing is exact: a real token never attends to
    padding (its keys are masked out), so the padded rows of the original only cost matrix products whose results
    no loss reads. LXMERT pads every sentence to 20 tokens while captions and questions average ~14, so skipping
    the padding removes about a third of the language-side work in training. Attention unpacks to [B, T, H].
    """

    def __init__(self, batch: int, seq: int, index: Tensor | None = None):
        self.batch, self.seq, self.index = batch, seq, index

    @classmethod
    def build(cls, attention_mask: Tensor | None, batch: int, seq: int, pack: bool) -> "TextLayout":
        if not pack or attention_mask is None:
            return cls(batch, seq)
        return cls(batch, seq, attention_mask.reshape(-1).nonzero().squeeze(1))

    def rows(self, x: Tensor) -> Tensor:
        """[B, T, H] -> [rows, H]."""
        flat = x.reshape(self.batch * self.seq, x.shape[-1])
        return flat if self.index is None else flat.index_select(0, self.index)

    def padded(self, rows: Tensor) -> Tensor:
        """[rows, H] -> [B, T, H]; packed layouts put zeros at padded positions."""
        if self.index is not None:
            rows = rows.new_zeros(self.batch * self.seq, rows.shape[-1]).index_copy(0, self.index, rows)
        return rows.view(self.batch, self.seq, rows.shape[-1])


class LxmertEmbeddings(nn.Module):
    """word + position + token-type embeddings -> LayerNorm -> dropout (original `BertEmbeddings`).

    All three tables use `padding_idx=0`, as the original: row 0 of the position and token-type tables (the [CLS]
    position and the only type LXMERT feeds) therefore never receive a gradient. Kept for parity.
    """

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int, type_vocab_size: int,
                 dropout: float, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size, padding_idx=0)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.cpu_kernels = cpu_kernels.configured(None)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids/token_type_ids [B, T] -> [B, T, H]."""
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"input_ids has {seq_len} tokens but the model has only "
                f"{self.position_embeddings.num_embeddings} position embeddings"
            )
        positions = torch.arange(seq_len, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        emb = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
               + self.token_type_embeddings(token_type_ids))
        return _dropout(self.dropout, self.LayerNorm(emb), self.cpu_kernels)


class LxmertAttention(nn.Module):
    """Multi-head attention (original `BertAttention`): the q/k/v projections, and `attend` over projected inputs.

    No `forward`: the sublayers project themselves (the cross-attention both streams at once) and call `attend`.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout_p = dropout
        self.cpu_kernels = cpu_kernels.configured(None)

    def project(self, x: Tensor, which: str = "qkv") -> tuple[Tensor, ...]:
        """The projections named by `which` ("qkv" or "kv") of x [..., H], as one matrix product over the
        concatenated weights (one wide product and, in backward, one input-gradient product instead of three plus
        two additions; the weights' concatenation is 3H x H a forward)."""
        mods = (self.query, self.key, self.value) if which == "qkv" else (self.key, self.value)
        weight = torch.cat([m.weight for m in mods])
        bias = torch.cat([m.bias for m in mods])
        return F.linear(x, weight, bias).split([m.out_features for m in mods], dim=-1)

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, q_layout: TextLayout | None = None,
               kv_layout: TextLayout | None = None, output_attentions: bool = False
               ) -> tuple[Tensor, Tensor | None]:
        """Attention over projected q [B,Sq,H] and k/v [B,Sk,H]; mask [B,1,1,Sk] bool -> (context like q, the
        attention probabilities [B, heads, Sq, Sk] when `output_attentions`, else None).

        A tensor given with a layout is in [rows, H] form and is laid out as [B, S, H] for the attention; the
        context comes back in q's form. The probabilities are those the values are weighted with: after dropout in
        training, as transformers' LXMERT returns them.
        """
        if q_layout is not None:
            q = q_layout.padded(q)
        if kv_layout is not None:
            k, v = kv_layout.padded(k), kv_layout.padded(v)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        p = self.dropout_p if self.training else 0.0
        probs = None
        if output_attentions:  # SDPA does not return the probabilities: written out
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)
            if p > 0:
                probs = (cpu_kernels.dropout(probs, p) if cpu_kernels.active(self.cpu_kernels, probs)
                         else F.dropout(probs, p))
            out = torch.matmul(probs, v)
        elif p > 0 and cpu_kernels.active(self.cpu_kernels, q):
            out = cpu_kernels.attention_with_dropout(q, k, v, mask, p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, _, s, _ = out.shape
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return (out if q_layout is None else q_layout.rows(out)), probs


class LxmertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual), post-LN.

    The original's `BertAttOutput` (in = hidden) and `BertOutput` (in = intermediate, the FFN's second half).
    """

    def __init__(self, in_features: int, hidden_size: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.cpu_kernels = cpu_kernels.configured(None)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(_dropout(self.dropout, self.dense(hidden), self.cpu_kernels) + residual)


class LxmertSelfAttentionLayer(nn.Module):
    """Self-attention sublayer (original `BertSelfattLayer`; keys `self.*`, `output.*`)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        self.self = LxmertAttention(hidden_size, num_heads, attn_dropout)
        self.output = LxmertResidualOutput(hidden_size, hidden_size, dropout, eps)

    def forward(self, hidden: Tensor, mask: Tensor | None, layout: TextLayout | None = None,
                output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        """hidden [B, S, H], or [rows, H] with its layout -> (the same form, probabilities [B, heads, S, S] or
        None)."""
        ctx, probs = self.self.attend(*self.self.project(hidden), mask, q_layout=layout, kv_layout=layout,
                                      output_attentions=output_attentions)
        return self.output(ctx, hidden), probs


class LxmertCrossAttentionLayer(nn.Module):
    """The cross-attention sublayer (original `BertCrossattLayer`; keys `att.*`, `output.*`).

    LXMERT has ONE of these per cross layer and uses it in both directions (README: `lang_attention` was deleted and
    the misnamed `visual_attention` serves both). `both_ways` exploits the sharing: the two streams go through the
    query/key/value and output projections as one stacked sequence, halving the number of matrix products. It is the
    only entry point (no one-direction `forward`: LXMERT never attends one way only).
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        self.att = LxmertAttention(hidden_size, num_heads, attn_dropout)
        self.output = LxmertResidualOutput(hidden_size, hidden_size, dropout, eps)

    def both_ways(self, lang: Tensor, lang_mask: Tensor | None, visn: Tensor, visn_mask: Tensor | None,
                  layout: TextLayout, output_attentions: bool = False
                  ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """lang rows [R, H] attend to visn [B,N,H] and visn to lang, from the same inputs -> (lang', visn', when
        `output_attentions` the probabilities language -> vision [B, heads, T, N] (what transformers returns) and
        vision -> language [B, heads, N, T], else None)."""
        r, shape = lang.shape[0], visn.shape
        sizes = [r, shape[0] * shape[1]]
        both = torch.cat([lang, visn.reshape(-1, shape[-1])], dim=0)
        # split, not two slices: its backward is one concatenation, where each slice's would zero-fill a full-size
        # gradient and the two would then be added
        (q_l, q_v), (k_l, k_v), (v_l, v_v) = (x.split(sizes) for x in self.att.project(both))
        lang_ctx, l2v = self.att.attend(q_l, k_v.view(shape), v_v.view(shape), visn_mask, q_layout=layout,
                                        output_attentions=output_attentions)
        visn_ctx, v2l = self.att.attend(q_v.view(shape), k_l, v_l, lang_mask, kv_layout=layout,
                                        output_attentions=output_attentions)
        out_l, out_v = self.output(torch.cat([lang_ctx, visn_ctx.reshape(-1, shape[-1])], dim=0), both).split(sizes)
        return out_l, out_v.view(shape), ((l2v, v2l) if output_attentions else None)


class LxmertIntermediate(nn.Module):
    """dense -> exact GELU (original `BertIntermediate`)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.intermediate_act_fn = nn.GELU()  # erf form, as the original hand-writes; no parameters, no key

    def forward(self, hidden: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(hidden))


class LxmertLayer(nn.Module):
    """Self-attention + FFN (original `BertLayer`), used for language and object-relationship layers."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float, attn_dropout: float,
                 eps: float):
        super().__init__()
        self.attention = LxmertSelfAttentionLayer(hidden_size, num_heads, dropout, attn_dropout, eps)
        self.intermediate = LxmertIntermediate(hidden_size, intermediate_size)
        self.output = LxmertResidualOutput(intermediate_size, hidden_size, dropout, eps)

    def forward(self, hidden: Tensor, mask: Tensor | None, layout: TextLayout | None = None,
                output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        hidden, probs = self.attention(hidden, mask, layout, output_attentions)
        return self.output(self.intermediate(hidden), hidden), probs


class LxmertXLayer(nn.Module):
    """Cross-modality layer (original `LXRTXLayer`): shared cross-attention, then per-stream self-attention and FFN."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float, attn_dropout: float,
                 eps: float):
        super().__init__()
        self.visual_attention = LxmertCrossAttentionLayer(hidden_size, num_heads, dropout, attn_dropout, eps)
        self.lang_self_att = LxmertSelfAttentionLayer(hidden_size, num_heads, dropout, attn_dropout, eps)
        self.visn_self_att = LxmertSelfAttentionLayer(hidden_size, num_heads, dropout, attn_dropout, eps)
        self.lang_inter = LxmertIntermediate(hidden_size, intermediate_size)
        self.lang_output = LxmertResidualOutput(intermediate_size, hidden_size, dropout, eps)
        self.visn_inter = LxmertIntermediate(hidden_size, intermediate_size)
        self.visn_output = LxmertResidualOutput(intermediate_size, hidden_size, dropout, eps)

    def forward(self, lang: Tensor, lang_mask: Tensor | None, visn: Tensor, visn_mask: Tensor | None,
                layout: TextLayout, output_attentions: bool = False
                ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor] | None]:
        """lang rows [R, H] (see TextLayout), visn [B, N, H] -> (lang rows, visn, with `output_attentions` the
        layer's four attention probabilities in order of use: cross language -> vision [B, heads, T, N], cross
        vision -> language [B, heads, N, T], language self [B, heads, T, T], vision self [B, heads, N, N]; else
        None)."""
        lang, visn, cross = self.visual_attention.both_ways(lang, lang_mask, visn, visn_mask, layout,
                                                            output_attentions)
        lang, lang_probs = self.lang_self_att(lang, lang_mask, layout, output_attentions)
        visn, visn_probs = self.visn_self_att(visn, visn_mask, None, output_attentions)
        lang = self.lang_output(self.lang_inter(lang), lang)
        visn = self.visn_output(self.visn_inter(visn), visn)
        return lang, visn, ((*cross, lang_probs, visn_probs) if output_attentions else None)


class LxmertVisualFeatureEncoder(nn.Module):
    """`(LN(W_f f) + LN(W_b b)) / 2` -> dropout (original `VisualFeatEncoder`); boxes are normalised x1,y1,x2,y2."""

    def __init__(self, feat_dim: int, pos_dim: int, hidden_size: int, dropout: float, eps: float):
        super().__init__()
        self.visn_fc = nn.Linear(feat_dim, hidden_size)
        self.visn_layer_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.box_fc = nn.Linear(pos_dim, hidden_size)
        self.box_layer_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.cpu_kernels = cpu_kernels.configured(None)

    def forward(self, feats: Tensor, boxes: Tensor) -> Tensor:
        dtype = self.visn_fc.weight.dtype  # a bf16 model takes fp32/fp16 features as they are stored
        x = self.visn_layer_norm(self.visn_fc(feats.to(dtype)))
        y = self.box_layer_norm(self.box_fc(boxes.to(dtype)))
        return _dropout(self.dropout, (x + y) / 2, self.cpu_kernels)


# the modules whose forward consults a `cpu_kernels` setting (`LxmertForPreTraining.set_cpu_kernels`)
_KERNEL_USERS = (LxmertEmbeddings, LxmertAttention, LxmertResidualOutput, LxmertVisualFeatureEncoder)


@dataclass
class Attentions:
    """Attention probabilities of every layer, as transformers' LXMERT returns them with `output_attentions=True`
    (its `language_attentions`, `vision_attentions`, `cross_encoder_attentions`). heads = num_attention_heads; rows
    at padded text positions are meaningless."""

    language: tuple[Tensor, ...]  # per language layer [B, heads, T, T]
    vision: tuple[Tensor, ...]  # per object-relationship layer [B, heads, N, N]
    cross: tuple[Tensor, ...]  # per cross layer, language -> vision [B, heads, T, N] (queries: text positions)
    # the cross layers' other attentions, which transformers does not return (relevance maps need every one):
    cross_vision: tuple[Tensor, ...] = ()  # per cross layer, vision -> language [B, heads, N, T]
    cross_language_self: tuple[Tensor, ...] = ()  # per cross layer, the language self-attention after it [B,h,T,T]
    cross_vision_self: tuple[Tensor, ...] = ()  # per cross layer, the vision self-attention after it [B, h, N, N]


class LxmertEncoder(nn.Module):
    """Visual encoder, then l language layers, r object layers, x cross layers (original `LXRTEncoder`).

    Attribute order fixes the state_dict order: visn_fc, layer, x_layers, r_layers (as the original and HF).
    """

    def __init__(self, cfg: LxmertConfig):
        super().__init__()
        args = (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_dropout_prob,
                cfg.attention_probs_dropout_prob, cfg.layer_norm_eps)
        self.visn_fc = LxmertVisualFeatureEncoder(cfg.visual_feat_dim, cfg.visual_pos_dim, cfg.hidden_size,
                                                  cfg.hidden_dropout_prob, cfg.layer_norm_eps)
        # `layer` (not `l_layers`) so that BERT-base weights load by name, as in the original.
        self.layer = nn.ModuleList([LxmertLayer(*args) for _ in range(cfg.l_layers)])
        self.x_layers = nn.ModuleList([LxmertXLayer(*args) for _ in range(cfg.x_layers)])
        self.r_layers = nn.ModuleList([LxmertLayer(*args) for _ in range(cfg.r_layers)])

    def forward(self, lang: Tensor, lang_mask: Tensor | None, feats: Tensor, boxes: Tensor,
                visn_mask: Tensor | None, layout: TextLayout, output_attentions: bool = False
                ) -> tuple[Tensor, Tensor, Attentions | None]:
        """lang [B, T, H] embeddings -> (lang [B, T, H], visn [B, N, H], attentions when asked)."""
        visn = self.visn_fc(feats, boxes)
        lang = layout.rows(lang)
        seen: dict[str, list[Tensor]] = {k: [] for k in ("language", "vision", "cross", "cross_vision",
                                                         "cross_language_self", "cross_vision_self")}
        for layer in self.layer:
            lang, probs = layer(lang, lang_mask, layout, output_attentions)
            seen["language"].append(probs)
        for layer in self.r_layers:
            visn, probs = layer(visn, visn_mask, None, output_attentions)
            seen["vision"].append(probs)
        for layer in self.x_layers:
            lang, visn, probs = layer(lang, lang_mask, visn, visn_mask, layout, output_attentions)
            if probs is not None:
                for key, p in zip(("cross", "cross_vision", "cross_language_self", "cross_vision_self"), probs):
                    seen[key].append(p)
        attentions = Attentions(**{k: tuple(v) for k, v in seen.items()}) if output_attentions else None
        return layout.padded(lang), visn, attentions


class LxmertPooler(nn.Module):
    """tanh(dense(h[:, 0])): the [CLS] state after the last cross layer, LXMERT's "cross-modality output"."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, lang: Tensor) -> Tensor:
        return self.activation(self.dense(lang[:, 0]))


class LxmertModel(nn.Module):
    """The backbone (original `LXRTModel`): embeddings, encoder, pooler. Keys live under `lxmert.` in checkpoints."""

    def __init__(self, cfg: LxmertConfig):
        super().__init__()
        self.embeddings = LxmertEmbeddings(cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings,
                                           cfg.type_vocab_size, cfg.hidden_dropout_prob, cfg.layer_norm_eps)
        self.encoder = LxmertEncoder(cfg)
        self.pooler = LxmertPooler(cfg.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None,
                visual_feats: Tensor, visual_boxes: Tensor, visual_attention_mask: Tensor | None = None,
                *, pack_text: bool = False, output_attentions: bool = False
                ) -> tuple[Tensor, Tensor, Tensor, Attentions | None]:
        """Returns (language_output [B,T,H], vision_output [B,N,H], pooled_output [B,H], attentions or None).

        `pack_text` skips padded text positions inside the encoder (see TextLayout); language_output is then 0 at
        padded positions, every other value is unchanged.
        """
        lang = self.embeddings(input_ids, token_type_ids)
        layout = TextLayout.build(attention_mask, lang.shape[0], lang.shape[1], pack_text)
        lang, visn, attentions = self.encoder(lang, _key_padding_mask(attention_mask), visual_feats, visual_boxes,
                                              _key_padding_mask(visual_attention_mask), layout, output_attentions)
        return lang, visn, self.pooler(lang), attentions


@dataclass
class LxmertOutput:
    """What `LxmertForPreTraining.forward` returns. A head that the model lacks gives None.

    Shapes: B batch, T tokens, N boxes, H hidden, V vocab, h heads. When `mlm_positions` / `feat_positions` are
    passed to forward, `mlm_logits` is packed to [M, V] (M = number of True positions, row-major) and `feat_pred` to
    [K, F]. The attentions are set only with `output_attentions=True` (transformers' names in brackets).
    """

    language_output: Tensor  # [B, T, H]
    vision_output: Tensor  # [B, N, H]
    pooled_output: Tensor  # [B, H]
    mlm_logits: Tensor | None = None  # [B, T, V] or packed [M, V]
    match_logits: Tensor | None = None  # [B, 2]; index 1 = image and text match
    obj_logits: Tensor | None = None  # [B, N, num_object_labels]
    attr_logits: Tensor | None = None  # [B, N, num_attr_labels]
    feat_pred: Tensor | None = None  # [B, N, visual_feat_dim] or packed [K, visual_feat_dim]
    answer_logits: Tensor | None = None  # [B, num_qa_labels]
    pair_logits: Tensor | None = None  # [B/2, 2] NLVR2 logits when the pair head exists (rows 2i, 2i+1 = one pair)
    language_attentions: tuple[Tensor, ...] | None = None  # per language layer [B, h, T, T] (language_attentions)
    vision_attentions: tuple[Tensor, ...] | None = None  # per object layer [B, h, N, N] (vision_attentions)
    # per cross layer, the shared cross-attention language -> vision [B, h, T, N] (cross_encoder_attentions)
    cross_attentions: tuple[Tensor, ...] | None = None
    # every attention of every layer (the above and the cross layers' other three, `Attentions`); computed in the
    # graph, so gradients reach them when the forward runs with autograd on (`lxm.infer.relevance`)
    attentions: Attentions | None = None


class LxmertForPreTraining(nn.Module):
    """Backbone plus the heads its config switches on (original `LXRTPretraining`; HF `LxmertForPreTraining`).

    `cls.predictions.decoder.weight` IS `lxmert.embeddings.word_embeddings.weight` (tied, as the original).
    `cpu_kernels`: see `set_cpu_kernels`.
    """

    def __init__(self, cfg: LxmertConfig, *, init_weights: bool = True, cpu_kernels: bool | None = None):
        super().__init__()
        self.config = cfg
        self.lxmert = LxmertModel(cfg)
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.cls = PreTrainingHeads(h, cfg.vocab_size, eps, mlm=cfg.task_mask_lm, matched=cfg.task_matched)
        if cfg.task_mask_lm:
            self.cls.predictions.decoder.weight = self.lxmert.embeddings.word_embeddings.weight
        self.obj_predict_head = None
        if cfg.task_obj_predict:
            sizes = {}
            if cfg.visual_obj_loss:
                sizes["obj"] = cfg.num_object_labels
            if cfg.visual_attr_loss:
                sizes["attr"] = cfg.num_attr_labels
            if cfg.visual_feat_loss:
                sizes["feat"] = cfg.visual_feat_dim
            self.obj_predict_head = VisualObjHead(h, sizes, eps)
        self.answer_head = AnswerHead(h, cfg.num_qa_labels, eps) if cfg.task_qa else None
        self.nlvr2_head = Nlvr2PairHead(h, eps) if cfg.task_nlvr2 else None
        if init_weights:
            self.apply(self._init_module)
        self.set_cpu_kernels(cpu_kernels)

    def set_cpu_kernels(self, setting: bool | None) -> None:
        """Whether training forwards use `lxm.model.cpu_kernels`: None = on for CPU tensors, off on every other
        device; True / False force it. `LXM_CPU_KERNELS=0|1` in the environment overrides `setting`
        (`cpu_kernels.configured`). Changes how dropout and attention with dropout are computed, not what."""
        resolved = cpu_kernels.configured(setting)
        for module in self.modules():
            if isinstance(module, _KERNEL_USERS):
                module.cpu_kernels = resolved

    @property
    def cpu_kernels(self) -> bool | None:
        """The setting in force (None = by device)."""
        return self.lxmert.embeddings.cpu_kernels

    def _init_module(self, module: nn.Module) -> None:
        """init_bert_weights (original L688-699): N(0, 0.02) weights, zero biases, LayerNorm (1, 0).

        Padding rows are not re-zeroed, as the original. The bare MLM output bias starts at 0.
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def tie_weights(self) -> None:
        """Re-point the MLM decoder at the word embeddings (needed after assigning new parameters)."""
        if self.cls.predictions is not None:
            self.cls.predictions.decoder.weight = self.lxmert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_boxes: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        *,
        mlm_positions: Tensor | None = None,
        feat_positions: Tensor | None = None,
        pack_text: bool = False,
        output_attentions: bool = False,
    ) -> LxmertOutput:
        """Encode a batch of (sentence, image) pairs and apply every head.

        Args:
            input_ids: [B, T] WordPiece ids, `[CLS] ... [SEP]` then 0-padding.
            attention_mask: [B, T] 1 for real tokens, 0 for padding (None = all real).
            token_type_ids: [B, T] (None = all 0, what LXMERT always feeds).
            visual_feats: [B, N, visual_feat_dim] region features.
            visual_boxes: [B, N, 4] boxes as (x1/w, y1/h, x2/w, y2/h).
            visual_attention_mask: [B, N] 1/0 (None = all boxes valid, as LXMERT's fixed 36 boxes).
            mlm_positions: [B, T] bool; if given, MLM logits are computed only there (packed [M, V]).
                The MLM decoder (30522-way) is the largest matrix product of the step, so a training loss that
                only needs the ~15 % masked tokens asks for just those; the loss value is unchanged.
            feat_positions: [B, N] bool; if given, the feature regression is computed only there (packed [K, F]).
            pack_text: skip padded text positions inside the encoder (exact for every real position; the padded
                positions of language_output and dense mlm_logits are then meaningless). Training uses it.
            output_attentions: also return every layer's attention probabilities (`LxmertOutput.*_attentions`,
                as transformers' LXMERT, and with the cross layers' other three in `LxmertOutput.attentions`);
                attention is then computed written out instead of by SDPA. Without it the forward is unchanged.
        """
        if visual_feats is None or visual_boxes is None:
            raise ValueError("LxmertForPreTraining.forward needs visual_feats [B, N, F] and visual_boxes [B, N, 4]")
        lang, visn, pooled, attentions = self.lxmert(input_ids, attention_mask, token_type_ids, visual_feats,
                                                     visual_boxes, visual_attention_mask, pack_text=pack_text,
                                                     output_attentions=output_attentions)
        out = LxmertOutput(language_output=lang, vision_output=visn, pooled_output=pooled)
        if attentions is not None:
            out.language_attentions, out.vision_attentions = attentions.language, attentions.vision
            out.cross_attentions, out.attentions = attentions.cross, attentions
        if self.cls.predictions is not None:
            out.mlm_logits = self.cls.predictions(lang if mlm_positions is None else lang[mlm_positions])
        if self.cls.seq_relationship is not None:
            out.match_logits = self.cls.seq_relationship(pooled)
        if self.obj_predict_head is not None:
            preds = self.obj_predict_head(visn, feat_positions=feat_positions)
            out.obj_logits, out.attr_logits, out.feat_pred = preds.get("obj"), preds.get("attr"), preds.get("feat")
        if self.answer_head is not None:
            out.answer_logits = self.answer_head(pooled)
        if self.nlvr2_head is not None:  # an odd batch is an error (Nlvr2PairHead), never silently no logits
            out.pair_logits = self.nlvr2_head(pooled)
        return out

    def num_parameters(self) -> int:
        """Unique parameters (the tied decoder counted once)."""
        return sum(p.numel() for p in self.parameters())


def is_task_model(cfg: LxmertConfig) -> bool:
    """Exactly one finetuning head (answer or NLVR2 pair) and no pretraining head: what finetuning trains."""
    return not (cfg.task_mask_lm or cfg.task_matched or cfg.task_obj_predict) and cfg.task_qa != cfg.task_nlvr2


class LxmertForFinetuning(LxmertForPreTraining):
    """A finetuning task model: the backbone with one task head, the VQA / GQA answer head or the NLVR2 pair head, and
    no pretraining head (original `src/tasks/{vqa,gqa,nlvr2}_model.py`; HF `LxmertForQuestionAnswering` for the
    answer head).

    It is `LxmertForPreTraining` with that head set (same modules, parameter names and outputs), so checkpoints are
    the same in every format; `load_pretrained` builds this class for such a config.
    """

    def __init__(self, cfg: LxmertConfig, *, init_weights: bool = True, cpu_kernels: bool | None = None):
        if not is_task_model(cfg):
            raise ConfigError("a finetuning model has exactly one of task_qa / task_nlvr2 and none of task_mask_lm, "
                              f"task_matched, task_obj_predict; got task_qa={cfg.task_qa}, "
                              f"task_nlvr2={cfg.task_nlvr2}, task_mask_lm={cfg.task_mask_lm}, "
                              f"task_matched={cfg.task_matched}, task_obj_predict={cfg.task_obj_predict}")
        super().__init__(cfg, init_weights=init_weights, cpu_kernels=cpu_kernels)


def build_lxmert(cfg: LxmertConfig, *, init_weights: bool = True, cpu_kernels: bool | None = None
                 ) -> LxmertForPreTraining:
    """The model `cfg` describes: `LxmertForFinetuning` for a task head set (`is_task_model`), else
    `LxmertForPreTraining`. `cpu_kernels`: see `LxmertForPreTraining.set_cpu_kernels`."""
    cls = LxmertForFinetuning if is_task_model(cfg) else LxmertForPreTraining
    return cls(cfg, init_weights=init_weights, cpu_kernels=cpu_kernels)
