"""Relevance maps: how much each box and each word of the input made the model give its answer.

The rule of Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers" (ICCV 2021, arXiv 2103.15679), §3, for a bi-modal model with self- and
co-attention, read beside its LXMERT implementation (hila-chefer/Transformer-MM-Explainability @ 58eaea8,
`lxmert/lxmert/src/ExplanationGenerator.py`, `GeneratorOurs.generate_ours`); written here from the paper's equations,
no code copied.

For the chosen answer's logit y (the argmax, or a given class) and every attention map A of the model (probabilities
[heads, queries, keys]), the gradient-weighted map is Ā = mean over heads of (∂y/∂A ⊙ A)⁺ (eq. 5). Four relevance
matrices start as R_tt = I (text x text), R_ii = I (boxes x boxes), R_ti = 0 (text x boxes), R_it = 0, and each
attention layer updates them in the model's order:

- a self-attention of stream s (the other stream q): R_ss += Ā R_ss, R_sq += Ā R_sq (eqs. 6-7);
- a co-attention of queries s over keys q: R_sq += R̄_ssᵀ Ā R̄_qq, R_ss += Ā R_qs (eqs. 10-11), where R̄ is R with
  its self-connection removed, rows normalised to sum 1, and the identity added back (eqs. 8-9).

LXMERT's order (`lxm.model.modeling.LxmertEncoder`): the language layers, the object-relationship layers, then per
cross layer both co-attentions (language -> vision and vision -> language, both updates computed from the matrices
before the layer, as the layer computes both directions from its inputs), the language self-attention and the
vision self-attention. In the last cross layer only what reaches [CLS] counts: its language -> vision co-attention
and its language self-attention (the reference skips the rest too). The answer head reads the pooled [CLS] state,
so the relevance of word t is R_tt[CLS, t] (with [CLS]'s own entry set to 0, as the reference) and of box n
R_ti[CLS, n].

Differences from the reference, deliberate: batched (one set of matrices per row of the batch; a row is one image
of an example, NLVR2's two rows each get their own); a row of R̂ that sums to 0 (a padded token, which no answer
depends on) is left at 0 where the reference would divide by 0; the attention maps come from the model's own
forward (`output_attentions=True`, `LxmertOutput.attentions`), not from hooks stored on the modules. Only the
"attention x gradient" variant of the paper (its method for LXMERT), not the LRP one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Relevance:
    """The relevance of one batch's inputs for its chosen answers. Shapes: rows (one image of an example), T text
    positions, N boxes; every value >= 0."""

    logits: Tensor  # the task's logits of the forward explained ([examples, classes]), detached
    chosen: Tensor  # [examples] the class whose logit was explained
    words: Tensor  # [rows, T] relevance of each text position for the answer ([CLS] itself and padding 0)
    boxes: Tensor  # [rows, N] relevance of each box for the answer


def gradient_weighted(attention: Tensor, grad: Tensor | None) -> Tensor:
    """Ā = mean over heads of (grad ⊙ attention)⁺ (eq. 5): [B, heads, Q, K] -> [B, Q, K]; no gradient: 0."""
    if grad is None:
        return torch.zeros(attention.shape[0], *attention.shape[2:], dtype=torch.float32, device=attention.device)
    return (grad.float() * attention.float()).clamp(min=0).mean(dim=1)


def without_self(r: Tensor) -> Tensor:
    """R̄ (eqs. 8-9): R - I with each row normalised to sum 1 (a row of zeros stays 0), plus I. r [B, S, S]."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    hat = r - eye
    sums = hat.sum(dim=-1, keepdim=True)
    return torch.where(sums > 0, hat / sums.clamp(min=torch.finfo(r.dtype).tiny), torch.zeros_like(hat)) + eye


def propagate(att, grads: dict[str, list[Tensor | None]], shape: tuple[int, int, int], device: torch.device
              ) -> tuple[Tensor, Tensor]:
    """(R_tt [B, T, T], R_ti [B, T, N]) of a forward's attentions (`lxm.model.modeling.Attentions`) and the answer
    logit's gradients with respect to them (`grads`: the same keys, a list per kind, None where no gradient);
    `shape` = (B, T, N). A model without cross layers gives no box any relevance (its answer cannot see them)."""
    b, t, n = shape
    dev = device
    r_tt = torch.eye(t, device=dev).repeat(b, 1, 1)
    r_ii = torch.eye(n, device=dev).repeat(b, 1, 1)
    r_ti = torch.zeros(b, t, n, device=dev)
    r_it = torch.zeros(b, n, t, device=dev)
    for a, g in zip(att.language, grads["language"]):  # eqs. 6-7, text stream
        a = gradient_weighted(a, g)
        r_tt, r_ti = r_tt + a @ r_tt, r_ti + a @ r_ti
    for a, g in zip(att.vision, grads["vision"]):  # eqs. 6-7, vision stream
        a = gradient_weighted(a, g)
        r_ii, r_it = r_ii + a @ r_ii, r_it + a @ r_it
    last = len(att.cross) - 1
    for k in range(len(att.cross)):
        a_ti = gradient_weighted(att.cross[k], grads["cross"][k])
        # eqs. 10-11 for both directions from the matrices before the layer
        add_ti, add_tt = without_self(r_tt).transpose(1, 2) @ a_ti @ without_self(r_ii), a_ti @ r_it
        if k < last:
            a_it = gradient_weighted(att.cross_vision[k], grads["cross_vision"][k])
            add_it, add_ii = without_self(r_ii).transpose(1, 2) @ a_it @ without_self(r_tt), a_it @ r_ti
            r_it, r_ii = r_it + add_it, r_ii + add_ii
        r_ti, r_tt = r_ti + add_ti, r_tt + add_tt
        a = gradient_weighted(att.cross_language_self[k], grads["cross_language_self"][k])
        r_tt, r_ti = r_tt + a @ r_tt, r_ti + a @ r_ti
        if k < last:  # the last layer's vision stream reaches no answer
            a = gradient_weighted(att.cross_vision_self[k], grads["cross_vision_self"][k])
            r_ii, r_it = r_ii + a @ r_ii, r_it + a @ r_it
    return r_tt, r_ti


KINDS = ("language", "vision", "cross", "cross_vision", "cross_language_self", "cross_vision_self")


def answer_relevance(model: nn.Module, inputs: dict[str, Tensor], logits_of: Callable, chosen: Tensor | None = None
                     ) -> Relevance:
    """Explain one batch: a forward with every attention map kept in the graph, the gradient of the chosen answers'
    logits (their sum: examples do not interact) with respect to the maps, and the relevance rule.

    Args:
        model: an lxm LXMERT (`LxmertForPreTraining` or a task model); put in eval mode (no dropout).
        inputs: the keyword arguments of its forward (input_ids, attention_mask, visual_feats, ...).
        logits_of: output -> the task's logits [examples, classes] (`FinetuneTask.logits`).
        chosen: [examples] class per example to explain; None: each example's argmax.

    Runs with autograd on whatever the caller's mode (torch.no_grad around it is fine; not torch.inference_mode) and
    in the model's dtype (a caller's autocast applies); the rule itself computes in fp32. No parameter's `.grad` is
    touched (only the maps' gradients are taken) and frozen parameters stay frozen.
    """
    model.eval()
    # every map must be a node of the graph: frozen parameters (requires_grad False) are asked for gradients for the
    # length of the forward, and put back as they were
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = model(**inputs, output_attentions=True)
            logits = logits_of(out)
            if chosen is None:
                chosen = logits.detach().argmax(dim=-1)
            target = logits.gather(1, chosen.reshape(-1, 1).to(logits.device)).sum()
            att = out.attentions
            maps = [(kind, i, m) for kind in KINDS for i, m in enumerate(getattr(att, kind)) if m.requires_grad]
            found = torch.autograd.grad(target, [m for *_, m in maps], allow_unused=True)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    grads: dict[str, list[Tensor | None]] = {kind: [None] * len(getattr(att, kind)) for kind in KINDS}
    for (kind, i, _), g in zip(maps, found):
        grads[kind][i] = g
    with torch.no_grad():
        detached = type(att)(**{kind: tuple(m.detach() for m in getattr(att, kind)) for kind in KINDS})
        shape = (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1], inputs["visual_feats"].shape[1])
        r_tt, r_ti = propagate(detached, grads, shape, logits.device)
        words = r_tt[:, 0, :].clone()
        words[:, 0] = 0.0  # [CLS] itself, as the reference
        mask = inputs.get("attention_mask")
        if mask is not None:
            words = words * mask.to(words.dtype)
    return Relevance(logits.detach(), chosen.detach(), words, r_ti[:, 0, :])
