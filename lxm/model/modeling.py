"""The LXMERT encoder, its pretraining model and the finetuning task model.

Reproduces `src/lxrt/modeling.py` of airsplay/lxmert @ 0db1182 (`BertEmbeddings` L264-292, `BertAttention` L295-347,
`BertLayer` L418-429, `LXRTXLayer` L439-488, `VisualFeatEncoder` L491-517, `LXRTEncoder` L546-566, `BertPooler`
L569-581, `LXRTModel` L845-886, `LXRTPretraining` L889-989) and the task models of `src/tasks/{vqa,gqa,nlvr2}_model.py`;
paper §2 (model), §3.1 (pretraining heads) and §4 (finetuning).

Module and parameter names are those of the Hugging Face port (`lxmert.` where the original has `bert.`), so a
transformers checkpoint loads with the identity map and an original `*_LXRT.pth` with a prefix rename (see
`lxm.model.weights`). Numerics follow the original: post-LN, exact (erf) GELU, LayerNorm eps 1e-12, `padding_idx=0`
on all three text embeddings, visual input `(LN(W_f f) + LN(W_b b)) / 2`, one cross-attention module shared by both
directions, tanh pooler on [CLS] after the last cross layer.

Six things differ in *how* it is computed, not in what: attention runs through
`torch.nn.functional.scaled_dot_product_attention` (training with attention dropout: written out, see
`LxmertAttention._attend_with_dropout`), each attention's query, key and value projections run as one matrix product
over their concatenated weights (`LxmertAttention.project`), the shared cross-attention projects the language and
vision streams in one matrix product (same weights, so the same values up to float rounding), the linear layers
compute through `lxm.model.matmul.linear` (on a CPU in bf16, products that this machine runs faster as two row halves
are computed so), dropout draws its mask from 16 random bits
an element (`dropout_scaled_mask`: the drop probability p to within 7.6e-6, scaled to keep the expectation; cheaper
on CPU than `nn.Dropout`), and in training (`pack_text` with `mlm_positions`) the last cross layer's language side
runs only at the positions the heads read (`LxmertModel.forward`'s `lang_outputs`). The model computes in the dtype
of its parameters: a bf16 copy (`lxm.train.precision`) casts the float inputs (region features, boxes) to bf16
itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lxm.errors import ConfigError
from lxm.model.config import LxmertConfig
from lxm.model.matmul import Linear, linear
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


def dropout_scaled_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype, device) -> Tensor:
    """A dropout mask: 0 with probability p', else 1 / (1 - p'), where p' is p rounded to a multiple of 2**-16.

    Each element is decided by 16 random bits, four per 64-bit draw of the global generator (so seeding and resume
    work as for any torch op): 2.7x faster on CPU than `torch.rand` (one draw an element), 4.8x faster than
    `bernoulli_`. p' differs from p by at most 7.6e-6 (0.1 -> 0.100006), and scaling by 1 / (1 - p') keeps the
    expectation exactly x. The scale is rounded to `dtype`, as `nn.Dropout` does.
    """
    n = math.prod(shape)
    drops = round(p * 65536)  # of the 65536 values of 16 bits
    # `to=None` from the lowest int64: the full 64-bit range, raw draws (a bounded range takes each modulo it: 15 %
    # slower on CPU)
    bits = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-2**63, None)
    keep = bits.view(torch.int16)[:n].view(shape) >= drops - 32768
    scale = torch.tensor(1.0 / (1.0 - drops / 65536), dtype=dtype)
    same_width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[scale.element_size()]
    # 0 or the scale's bit pattern, read as `dtype`: the same values as keep.to(dtype) * scale, but bool -> int is
    # one vectorised pass on CPU where bool -> bf16 / fp32 is 2-3x the whole mask's other work
    return keep.to(same_width).mul_(scale.view(same_width).item()).view(dtype)


class _DropoutFunction(torch.autograd.Function):
    """x * mask (`dropout_scaled_mask`), keeping only the mask (in x's dtype) for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        mask = dropout_scaled_mask(x.shape, p, x.dtype, x.device)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class Dropout(nn.Dropout):
    """`nn.Dropout` (same `p` attribute, train/eval behaviour, no parameters) with `dropout_scaled_mask`'s cheaper
    draw; the drop probability is p to within 7.6e-6."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        return _DropoutFunction.apply(x, self.p)


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

    def subset(self, positions: Tensor) -> tuple["TextLayout", Tensor]:
        """The layout of the rows at `positions` ([B, T] bool, real tokens only) and their indices among this
        layout's rows."""
        flat = positions.reshape(-1).nonzero().squeeze(1)
        rows = flat if self.index is None else torch.searchsorted(self.index, flat)
        return TextLayout(self.batch, self.seq, flat), rows

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
        self.dropout = Dropout(dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, *,
                sparse_word_grad: bool = False) -> Tensor:
        """input_ids/token_type_ids [B, T] -> [B, T, H]. `sparse_word_grad`: the word table's gradient from this
        lookup comes as a sparse tensor (the looked-up rows; see `LxmertForPreTraining.forward`)."""
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"input_ids has {seq_len} tokens but the model has only "
                f"{self.position_embeddings.num_embeddings} position embeddings"
            )
        positions = torch.arange(seq_len, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        words = F.embedding(input_ids, self.word_embeddings.weight, self.word_embeddings.padding_idx,
                            sparse=sparse_word_grad)
        emb = words + self.position_embeddings(positions)[None] + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(emb))


class LxmertAttention(nn.Module):
    """Multi-head attention (original `BertAttention`): the q/k/v projections, and `attend` over projected inputs.

    No `forward`: the sublayers project themselves (the cross-attention both streams at once) and call `attend`.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = Linear(hidden_size, hidden_size)
        self.key = Linear(hidden_size, hidden_size)
        self.value = Linear(hidden_size, hidden_size)
        self.dropout_p = dropout

    def project(self, x: Tensor, which: str = "qkv") -> tuple[Tensor, ...]:
        """The projections named by `which` ("qkv" or "kv") of x [..., H], as one matrix product.

        One product 3H wide instead of three H wide: wider outputs run at a higher rate (AMX bf16, 1152 rows: ~2.5
        vs ~1.1 TFLOP/s), the input gradient is one product instead of three plus two additions, and the weights'
        concatenation (3H x H, once a forward) costs less than that saves (benchmarks/README.md)."""
        mods = (self.query, self.key, self.value) if which == "qkv" else (self.key, self.value)
        weight = torch.cat([m.weight for m in mods])
        bias = torch.cat([m.bias for m in mods])
        return linear(x, weight, bias).split([m.out_features for m in mods], dim=-1)

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, q_layout: TextLayout | None = None,
               kv_layout: TextLayout | None = None) -> Tensor:
        """Attention over projected q [B,Sq,H] and k/v [B,Sk,H]; mask [B,1,1,Sk] bool -> context like q.

        A tensor given with a layout is in [rows, H] form and is laid out as [B, S, H] for the attention; the
        context comes back in q's form.
        """
        if q_layout is not None:
            q = q_layout.padded(q)
        if kv_layout is not None:
            k, v = kv_layout.padded(k), kv_layout.padded(v)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.training and self.dropout_p > 0:
            out = self._attend_with_dropout(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, s, _ = out.shape
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return out if q_layout is None else q_layout.rows(out)

    def _attend_with_dropout(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(d), masked) -> dropout -> @ v, written out (the original's order of operations).

        With dropout, SDPA on CPU falls back to its math path, which scales q and k separately, copies them and
        draws the dropout mask with bernoulli_; written out, the scale goes on the (smaller) scores and the mask
        comes from `Dropout`'s cheaper draw: ~9 % of a base bf16 training step on CPU (A/B in one process).
        A masked key gets the dtype's lowest value, which softmax turns into exactly 0, as the original's -10000.
        """
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.head_dim ** -0.5)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = _DropoutFunction.apply(torch.softmax(scores, dim=-1), self.dropout_p)
        return torch.matmul(probs, v)


class LxmertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual), post-LN.

    The original's `BertAttOutput` (in = hidden) and `BertOutput` (in = intermediate, the FFN's second half).
    """

    def __init__(self, in_features: int, hidden_size: int, dropout: float, eps: float):
        super().__init__()
        self.dense = Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class LxmertSelfAttentionLayer(nn.Module):
    """Self-attention sublayer (original `BertSelfattLayer`; keys `self.*`, `output.*`)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        self.self = LxmertAttention(hidden_size, num_heads, attn_dropout)
        self.output = LxmertResidualOutput(hidden_size, hidden_size, dropout, eps)

    def forward(self, hidden: Tensor, mask: Tensor | None, layout: TextLayout | None = None,
                queries: tuple[TextLayout, Tensor] | None = None) -> Tensor:
        """hidden [B, S, H], or [rows, H] with its layout. `queries` (a `TextLayout.subset` of `layout`): attend
        from those rows only (keys and values still from every row) and return only them."""
        att = self.self
        if queries is None:
            ctx = att.attend(*att.project(hidden), mask, q_layout=layout, kv_layout=layout)
            return self.output(ctx, hidden)
        q_layout, rows = queries
        kept = hidden.index_select(0, rows)
        ctx = att.attend(att.query(kept), *att.project(hidden, "kv"), mask, q_layout=q_layout, kv_layout=layout)
        return self.output(ctx, kept)


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
                  layout: TextLayout) -> tuple[Tensor, Tensor]:
        """lang rows [R, H] attend to visn [B,N,H] and visn to lang, from the same inputs -> (lang', visn')."""
        r, shape = lang.shape[0], visn.shape
        sizes = [r, shape[0] * shape[1]]
        both = torch.cat([lang, visn.reshape(-1, shape[-1])], dim=0)
        # split, not two slices: its backward is one concatenation, where each slice's would zero-fill a full-size
        # gradient and the two would then be added
        (q_l, q_v), (k_l, k_v), (v_l, v_v) = (x.split(sizes) for x in self.att.project(both))
        lang_ctx = self.att.attend(q_l, k_v.view(shape), v_v.view(shape), visn_mask, q_layout=layout)
        visn_ctx = self.att.attend(q_v.view(shape), k_l, v_l, lang_mask, kv_layout=layout)
        out_l, out_v = self.output(torch.cat([lang_ctx, visn_ctx.reshape(-1, shape[-1])], dim=0), both).split(sizes)
        return out_l, out_v.view(shape)


class LxmertIntermediate(nn.Module):
    """dense -> exact GELU (original `BertIntermediate`)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = Linear(hidden_size, intermediate_size)

    def forward(self, hidden: Tensor) -> Tensor:
        # F.gelu's default is the erf form the original hand-writes; bit-exact with transformers' port.
        return F.gelu(self.dense(hidden))


class LxmertLayer(nn.Module):
    """Self-attention + FFN (original `BertLayer`), used for language and object-relationship layers."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float, attn_dropout: float,
                 eps: float):
        super().__init__()
        self.attention = LxmertSelfAttentionLayer(hidden_size, num_heads, dropout, attn_dropout, eps)
        self.intermediate = LxmertIntermediate(hidden_size, intermediate_size)
        self.output = LxmertResidualOutput(intermediate_size, hidden_size, dropout, eps)

    def forward(self, hidden: Tensor, mask: Tensor | None, layout: TextLayout | None = None) -> Tensor:
        hidden = self.attention(hidden, mask, layout)
        return self.output(self.intermediate(hidden), hidden)


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
                layout: TextLayout, lang_queries: tuple[TextLayout, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """lang rows [R, H] (see TextLayout), visn [B, N, H]. `lang_queries`: the language self-attention, output
        and FFN run at those rows only (the last layer, whose other language rows nothing reads); the returned lang
        rows are then those."""
        lang, visn = self.visual_attention.both_ways(lang, lang_mask, visn, visn_mask, layout)
        lang = self.lang_self_att(lang, lang_mask, layout, queries=lang_queries)
        visn = self.visn_self_att(visn, visn_mask)
        lang = self.lang_output(self.lang_inter(lang), lang)
        visn = self.visn_output(self.visn_inter(visn), visn)
        return lang, visn


class LxmertVisualFeatureEncoder(nn.Module):
    """`(LN(W_f f) + LN(W_b b)) / 2` -> dropout (original `VisualFeatEncoder`); boxes are normalised x1,y1,x2,y2."""

    def __init__(self, feat_dim: int, pos_dim: int, hidden_size: int, dropout: float, eps: float):
        super().__init__()
        self.visn_fc = Linear(feat_dim, hidden_size)
        self.visn_layer_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.box_fc = Linear(pos_dim, hidden_size)
        self.box_layer_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, feats: Tensor, boxes: Tensor) -> Tensor:
        dtype = self.visn_fc.weight.dtype  # a bf16 model takes fp32/fp16 features as they are stored
        x = self.visn_layer_norm(self.visn_fc(feats.to(dtype)))
        y = self.box_layer_norm(self.box_fc(boxes.to(dtype)))
        return self.dropout((x + y) / 2)


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
                visn_mask: Tensor | None, layout: TextLayout, lang_outputs: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """lang [B, T, H] embeddings -> (lang [B, T, H], visn [B, N, H]). `lang_outputs` ([B, T] bool, real tokens):
        the only positions of the returned lang that are computed (0 elsewhere; see `LxmertModel.forward`)."""
        visn = self.visn_fc(feats, boxes)
        lang = layout.rows(lang)
        for layer in self.layer:
            lang = layer(lang, lang_mask, layout)
        for layer in self.r_layers:
            visn = layer(visn, visn_mask)
        last = len(self.x_layers) - 1
        queries = layout.subset(lang_outputs) if lang_outputs is not None and last >= 0 else None
        for j, layer in enumerate(self.x_layers):
            lang, visn = layer(lang, lang_mask, visn, visn_mask, layout, queries if j == last else None)
        return (layout if queries is None else queries[0]).padded(lang), visn


class LxmertPooler(nn.Module):
    """tanh(dense(h[:, 0])): the [CLS] state after the last cross layer, LXMERT's "cross-modality output"."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = Linear(hidden_size, hidden_size)

    def forward(self, lang: Tensor) -> Tensor:
        return torch.tanh(self.dense(lang[:, 0]))


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
                *, pack_text: bool = False, lang_outputs: Tensor | None = None,
                sparse_word_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (language_output [B,T,H], vision_output [B,N,H], pooled_output [B,H]).

        `pack_text` skips padded text positions inside the encoder (see TextLayout); language_output is then 0 at
        padded positions, every other value is unchanged. `lang_outputs` ([B, T] bool; with `pack_text`): the
        positions of language_output the caller reads; the last cross layer's language self-attention queries,
        attention output and FFN run there only ([CLS] is always added, for the pooler): exact at those positions,
        0 at the others. In pretraining the losses read the masked tokens and [CLS], ~20 % of the tokens, so this
        saves ~1.3 % of a base step's matrix products. `sparse_word_grad`: see `LxmertEmbeddings.forward`.
        """
        lang = self.embeddings(input_ids, token_type_ids, sparse_word_grad=sparse_word_grad)
        layout = TextLayout.build(attention_mask, lang.shape[0], lang.shape[1], pack_text)
        lang_mask = _key_padding_mask(attention_mask)
        visn_mask = _key_padding_mask(visual_attention_mask)
        if lang_outputs is not None:
            if not pack_text:
                raise ValueError("lang_outputs needs pack_text=True")
            lang_outputs = lang_outputs.clone()
            lang_outputs[:, 0] = True
            if attention_mask is not None:
                lang_outputs &= attention_mask.bool()
        lang, visn = self.encoder(lang, lang_mask, visual_feats, visual_boxes, visn_mask, layout, lang_outputs)
        return lang, visn, self.pooler(lang)


@dataclass
class LxmertOutput:
    """What `LxmertForPreTraining.forward` returns. A head that the model lacks gives None.

    Shapes: B batch, T tokens, N boxes, H hidden, V vocab. When `mlm_positions` / `feat_positions` are passed to
    forward, `mlm_logits` is packed to [M, V] (M = number of True positions, row-major) and `feat_pred` to [K, F].
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


class LxmertForPreTraining(nn.Module):
    """Backbone plus the heads its config switches on (original `LXRTPretraining`; HF `LxmertForPreTraining`).

    `cls.predictions.decoder.weight` IS `lxmert.embeddings.word_embeddings.weight` (tied, as the original).
    """

    def __init__(self, cfg: LxmertConfig, *, init_weights: bool = True):
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
                positions of language_output and dense mlm_logits are then meaningless). Training uses it. With
                `mlm_positions` (or no MLM head) the last cross layer's language side then also runs only where the
                heads read (those positions and [CLS]): language_output is 0 at every other position.
        """
        if visual_feats is None or visual_boxes is None:
            raise ValueError("LxmertForPreTraining.forward needs visual_feats [B, N, F] and visual_boxes [B, N, 4]")
        # with pack_text, the language positions read are known: the MLM head's (all, unless mlm_positions) and
        # the pooler's [CLS] (LxmertModel adds it)
        reads_all = self.cls.predictions is not None and mlm_positions is None
        lang_outputs = None
        if pack_text and not reads_all:
            lang_outputs = mlm_positions if mlm_positions is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        words = self.lxmert.embeddings.word_embeddings.weight
        # Tied and the decoder runs: the lookup's gradient comes sparse (its B x T rows) and is added into the
        # decoder's dense [V, H] one in place, where a dense lookup gradient would be a zero-filled [V, H] tensor
        # plus a [V, H] addition. autograd adds dense + sparse in place only into the dense tensor when the sparse
        # one arrived first (torch/csrc/autograd/input_buffer.cpp), and backward reaches the decoder long before
        # the lookup: the decoder therefore reads the table through `_LateGradient`, made here before the lookup,
        # so that autograd, which runs later-made nodes first, hands the decoder's gradient on only after the
        # lookup's. (Sparse vs dense lookup gradient: ~1 % of a base bf16 step on CPU; in place vs out of place:
        # one [V, H] temporary less, time within noise.) The hook keeps `.grad` dense should the decoder's output
        # not be in the loss.
        sparse = (self.cls.predictions is not None and self.cls.predictions.decoder.weight is words
                  and words.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling())
        decoder_weight = None
        if sparse:
            if not getattr(words, "_lxm_keeps_grad_dense", False):
                words.register_post_accumulate_grad_hook(_dense_grad)
                words._lxm_keeps_grad_dense = True
            decoder_weight = _LateGradient.apply(words)
        lang, visn, pooled = self.lxmert(input_ids, attention_mask, token_type_ids, visual_feats, visual_boxes,
                                         visual_attention_mask, pack_text=pack_text, lang_outputs=lang_outputs,
                                         sparse_word_grad=sparse)
        out = LxmertOutput(language_output=lang, vision_output=visn, pooled_output=pooled)
        if self.cls.predictions is not None:
            out.mlm_logits = self.cls.predictions(lang if mlm_positions is None else lang[mlm_positions],
                                                  decoder_weight=decoder_weight)
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


class _LateGradient(torch.autograd.Function):
    """The identity (a view of the same tensor), as a node of its own in the autograd graph: its gradient is
    passed on when autograd reaches the point of the forward where it was made (see `LxmertForPreTraining`)."""

    @staticmethod
    def forward(ctx, weight: Tensor) -> Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _dense_grad(param: Tensor) -> None:
    """Post-accumulate hook: a sparse `.grad` (only the lookup contributed) becomes dense, as optimizers expect."""
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


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

    def __init__(self, cfg: LxmertConfig, *, init_weights: bool = True):
        if not is_task_model(cfg):
            raise ConfigError("a finetuning model has exactly one of task_qa / task_nlvr2 and none of task_mask_lm, "
                              f"task_matched, task_obj_predict; got task_qa={cfg.task_qa}, "
                              f"task_nlvr2={cfg.task_nlvr2}, task_mask_lm={cfg.task_mask_lm}, "
                              f"task_matched={cfg.task_matched}, task_obj_predict={cfg.task_obj_predict}")
        super().__init__(cfg, init_weights=init_weights)


def build_lxmert(cfg: LxmertConfig, *, init_weights: bool = True) -> LxmertForPreTraining:
    """The model `cfg` describes: `LxmertForFinetuning` for a task head set (`is_task_model`), else
    `LxmertForPreTraining`."""
    cls = LxmertForFinetuning if is_task_model(cfg) else LxmertForPreTraining
    return cls(cfg, init_weights=init_weights)
