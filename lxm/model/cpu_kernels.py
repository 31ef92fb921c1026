"""The model's CPU kernels: a cheaper dropout draw and attention with dropout written out, behind one switch.

Nothing here changes what the model computes, only how two steps of a training forward are computed on CPU:

- `dropout`: the mask comes from 16 random bits an element, four per 64-bit draw of the global generator
  (`dropout_scaled_mask`), where `nn.Dropout` draws one `bernoulli_` value an element; the drop probability is p
  rounded to a multiple of 2**-16 (at most 7.6e-6 off: 0.1 -> 0.100006) and kept values are scaled by 1 / (1 - p'),
  so the expectation is exact. Only the mask, in the activation's dtype, is kept for backward.
- `attention_with_dropout`: softmax(q k^T / sqrt(d), masked) -> `dropout` -> @ v, in the original's order of
  operations. With dropout, `F.scaled_dot_product_attention` on CPU takes its math path, which scales q and k
  separately, copies them and draws the mask with `bernoulli_`; written out, the scale goes on the (smaller) scores
  and the mask comes from the cheaper draw. Without dropout (evaluation) SDPA's fused CPU kernel runs either way.

Which path runs is decided by device and setting, never by timing (as timm's `use_fused_attn()` /
`TIMM_FUSED_ATTN`): a model's `cpu_kernels` setting (training configs' key `cpu_kernels`) is None (on for CPU
tensors, off for every other device), True or False (forced), and the environment variable `LXM_CPU_KERNELS=0|1`,
read when the setting is made (`configured`), overrides it. Off, the model is plain `torch.nn` modules and
`F.scaled_dot_product_attention(..., dropout_p=p)`: what a GPU user runs. tests/test_cpu_kernels.py checks each
kernel against the plain path; benchmarks/README.md has what they measured, on which CPUs.

The dropout draw is reproducible as any torch op: same seed, same machine, same bits (the global generator).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from lxm.errors import ConfigError

ENV = "LXM_CPU_KERNELS"


def configured(setting: bool | None) -> bool | None:
    """The setting in force: `LXM_CPU_KERNELS` ("1"/"0", also "true"/"false") when set, else `setting` (None = by
    device, see `active`). A value of the variable that is neither is an error naming it."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw:
        return setting
    if raw in ("1", "true", "on"):
        return True
    if raw in ("0", "false", "off"):
        return False
    raise ConfigError(f"environment variable {ENV}={os.environ[ENV]!r}: use 1 (CPU kernels on) or 0 (plain PyTorch)")


def active(setting: bool | None, x: Tensor) -> bool:
    """Whether the kernels compute on `x`: the setting when forced, else whether `x` is on the CPU."""
    return x.device.type == "cpu" if setting is None else setting


def dropout_scaled_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype, device) -> Tensor:
    """A dropout mask: 0 with probability p', else 1 / (1 - p'), where p' is p rounded to a multiple of 2**-16.

    Each element is decided by 16 random bits, four per 64-bit draw of the global generator (so seeding and resume
    work as for any torch op). The scale is rounded to `dtype`, as `nn.Dropout` does.
    """
    n = math.prod(shape)
    drops = round(p * 65536)  # of the 65536 values of 16 bits
    # `to=None` from the lowest int64: the full 64-bit range as raw draws (a bounded range reduces each modulo it)
    bits = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-2**63, None)
    keep = bits.view(torch.int16)[:n].view(shape) >= drops - 32768
    scale = torch.tensor(1.0 / (1.0 - drops / 65536), dtype=dtype)
    same_width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[scale.element_size()]
    # 0 or the scale's bit pattern, read as `dtype`: the values of keep.to(dtype) * scale without a bool -> float
    # conversion (an integer multiply of the same width is one vectorised pass)
    return keep.to(same_width).mul_(scale.view(same_width).item()).view(dtype)


class _MaskedDropout(torch.autograd.Function):
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


def dropout(x: Tensor, p: float) -> Tensor:
    """Training-mode dropout of x with probability p (0 <= p <= 1) by `dropout_scaled_mask`."""
    if p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    return _MaskedDropout.apply(x, p)


def attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float) -> Tensor:
    """softmax(q k^T / sqrt(d), masked) -> `dropout` -> @ v for q [B, h, Sq, d], k/v [B, h, Sk, d], mask bool
    [B, 1, 1, Sk] ("may attend") -> [B, h, Sq, d]. A masked key gets the dtype's lowest score, which softmax turns
    into exactly 0, as the original's additive -10000 does in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(dropout(torch.softmax(scores, dim=-1), p), v)


__all__ = ["ENV", "configured", "active", "dropout_scaled_mask", "dropout", "attention_with_dropout"]
