"""The model's linear layers: `F.linear`, except where this CPU's bf16 matrix products run faster as two row halves.

Why: oneDNN's AMX bf16 matmul (torch 2.14's `brg_matmul:avx10_1_512_amx`, 2 threads) runs `x[M, K] @ W^T` with an
output width of 768 at about half its rate when M is 768-1408 rows (the second thread idles: 1 and 2 threads give the
same ~1.1 TFLOP/s), and at full rate as two products of M/2 rows (~1.9-2.3 TFLOP/s; benchmarks/README.md,
`gemm_bound.py --scan`). LXMERT-base at batch 32 has 32 x 36 = 1152 box rows: the object-relationship and cross
layers' attention output, FFN output and the input gradients of their projections sit in that band. Outside it,
halves are slower. Which products gain depends on the CPU, the oneDNN version and the thread count, so it is
measured, not assumed: the first product of each shape and layout that could gain (CPU, bf16, >= `MIN_ROWS` rows, an
output at most `MAX_WIDTH` wide) is timed whole and as halves, and halves are used for that shape from then on only
if they are at least `MARGIN` times faster (in the band they are ~1.7-2x; elsewhere 0.9-1.1x, so the choice does not
flip between runs). The decisions are kept per process (`decisions()`).

Exactness: each output row is computed from the same inputs by the same kernel family; with K = 768 the halves are
bit-identical to the whole product here, with K = 2304 or 3072 they differ by at most one bf16 rounding step
(oneDNN blocks the reduction differently for different M). The weight gradient (`g^T x`, the rows summed over) is
always one product: halving it measured slower. Under `torch.compile` or autocast, on GPUs, in fp32 and with
small inputs every product is `F.linear`'s own.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_logger = logging.getLogger(__name__)

MIN_ROWS = 512  # products with fewer rows are never split (each half would be below oneDNN's efficient sizes)
MAX_WIDTH = 2048  # nor products with a wider output (oneDNN runs those at full rate at every row count seen)
MARGIN = 1.2  # halves must be this much faster to be used
_decided: dict[tuple, bool] = {}


def decisions() -> dict[tuple, bool]:
    """{(M, K, N, strides of a, strides of b, dtype, threads): halves?} for the products measured so far."""
    return dict(_decided)


def _product(a: Tensor, b: Tensor, bias: Tensor | None, halves: bool) -> Tensor:
    """a [M, K] @ b [K, N] (+ bias [N]), whole or as two row halves written into one output."""
    if not halves:
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    m, h = a.shape[0], a.shape[0] // 2
    out = a.new_empty(m, b.shape[1])
    for rows in (slice(0, h), slice(h, m)):
        if bias is None:
            torch.mm(a[rows], b, out=out[rows])
        else:
            torch.addmm(bias, a[rows], b, out=out[rows])
    return out


def _key(m: int, k: int, n: int, a_stride: tuple, b: Tensor) -> tuple | None:
    """The decision key of a [M, K] (strides `a_stride`) @ b [K, N], or None when the product cannot gain (too few
    rows, too wide an output; callers have checked CPU and bf16)."""
    if m < MIN_ROWS or n > MAX_WIDTH:
        return None
    return (m, k, n, a_stride, b.stride(), b.dtype, torch.get_num_threads())


def halves_pay(a: Tensor, b: Tensor) -> bool:
    """Whether a [M, K] @ b [K, N] runs faster as two row halves on this machine: measured once per shape, layout,
    dtype and thread count; False for every product that cannot gain (not CPU bf16, too few rows, too wide)."""
    if a.device.type != "cpu" or a.dtype != torch.bfloat16:
        return False
    key = _key(*a.shape, b.shape[1], a.stride(), b)
    return False if key is None else _decide(key, a, b)


def _decide(key: tuple, a: Tensor, b: Tensor) -> bool:
    choice = _decided.get(key)
    if choice is None:
        choice = _decided[key] = _measure(a, b)
        _logger.debug("matmul %dx%dx%d (strides %s, %s): %s", a.shape[0], a.shape[1], b.shape[1], a.stride(),
                      b.stride(), "two row halves" if choice else "whole")
    return choice


def _measure(a: Tensor, b: Tensor, reps: int = 3) -> bool:
    best = {False: float("inf"), True: float("inf")}
    with torch.no_grad():
        for rep in range(reps + 1):
            for halves in (False, True) if rep % 2 else (True, False):
                t0 = time.perf_counter()
                _product(a, b, None, halves)
                if rep:  # the first round warms both up
                    best[halves] = min(best[halves], time.perf_counter() - t0)
    return best[False] > MARGIN * best[True]


class _RowSplitLinear(torch.autograd.Function):
    """x @ W^T + b with the forward and input-gradient products as row halves where `halves_pay` says so."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, halves: bool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        rows = x.reshape(-1, x.shape[-1])
        return _product(rows, weight.t(), bias, halves).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _product(g, weight, None, halves_pay(g, weight)).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = g.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, with row-halved products where they measured faster (see the module doc)."""
    if (x.dim() < 2 or x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16
            or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
        return F.linear(x, weight, bias)  # autocast casts inside F.linear, which a custom Function would bypass
    rows = x.reshape(-1, x.shape[-1])
    forward = halves_pay(rows, weight.t())
    backward = False
    if x.requires_grad and torch.is_grad_enabled():
        # the input gradient g [M, out] @ W [out, in], g as autograd hands it (contiguous): decided on zeros of
        # that shape the first time, from the cache after
        m, out = rows.shape[0], weight.shape[0]
        key = _key(m, out, weight.shape[1], (out, 1), weight)
        if key is not None:
            backward = _decided[key] if key in _decided else _decide(key, rows.new_zeros(m, out), weight)
    if not (forward or backward):
        return F.linear(x, weight, bias)
    return _RowSplitLinear.apply(x, weight, bias, forward)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, names and init) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
