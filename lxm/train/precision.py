"""How a training step computes: fp32, bf16 autocast, or a bf16 copy of the model with fp32 master weights.

`precision` (PretrainConfig / FinetuneConfig):

- "fp32": everything in fp32, as airsplay/lxmert trained (apex fp16 was an option there, off by default).
- "bf16": the forward and backward run on `Bf16Replica.module`, a bf16 copy of the model; the model itself stays
  fp32 and is the master copy: after each micro-batch's backward the bf16 gradients are added into fp32 gradient
  buffers of the master parameters, clipping and the optimizer (with its fp32 moments) work on those, and the updated
  master weights are copied back into the bf16 copy. Checkpoints, resume, evaluation and `save_lxm` read the fp32
  model, exactly as in fp32 training. Losses are computed in fp32 (`lxm.model.losses` casts logits), LayerNorm
  statistics and softmax accumulate in fp32 inside their CPU/CUDA kernels. This is "bf16 weights with fp32 master
  copies" (Micikevicius et al. 2018 without loss scaling, which bf16's fp32-sized exponent does not need).
- "bf16-autocast": `torch.autocast(bf16)` around fp32 weights (every matrix product casts its inputs; LayerNorm,
  softmax and the residual stream stay fp32). The conservative mode; slower on CPU because of the casts.

Why "bf16" is faster than autocast: the activations stay bf16 from layer to layer (half the memory traffic in the
element-wise ops, no cast in front of every matrix product), and the weights are cast once per optimizer step (the
copy back) instead of once per forward. tests/test_precision.py trains both bf16 modes against fp32.

With one micro-batch and a fused BertAdam (`fused_optimizer=true`), "bf16" skips the two moves: `bf16_clip` computes
the clip coefficient from the copy's bf16 gradients (norms accumulated in fp32) and `step_from_bf16` updates each
fp32 master from its copy's gradient times that coefficient and writes the new weight into the copy, in one compiled
loop per large parameter (BertAdam's arithmetic, `lxm.train.optim.bert_adam_update`). detectron2 keeps mixed
precision in its own trainer class (`engine/train_loop.py` `AMPTrainer`) the same way: the optimizer reproduces the
original's, this module owns the master-weight machinery.

Inference (`lxm predict`, `ask`, validation during training) with either bf16 mode runs the fp32 model under
autocast.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
from torch import Tensor, nn

from lxm.train import optim

PRECISIONS = ("fp32", "bf16", "bf16-autocast")


def autocast(precision: str, device_type: str):
    """The context a forward runs in: bf16 autocast for the bf16 modes' inference and for "bf16-autocast"
    training; nothing for fp32 (and for "bf16" training, whose replica is bf16 already: see `training_autocast`)."""
    if precision in ("bf16", "bf16-autocast"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_autocast(precision: str, device_type: str):
    """The context a training forward runs in (autocast only for "bf16-autocast")."""
    return autocast(precision, device_type) if precision == "bf16-autocast" else contextlib.nullcontext()


class Bf16Replica:
    """A bf16 copy of `master` (an fp32 module) for the training forward/backward, and the moves between the two.

    `module` has the master's structure, parameter order, tied weights and `requires_grad` flags. The master's
    trainable parameters get persistent fp32 gradient buffers (allocated once: fresh multi-GB buffers every step
    would cost page faults on CPU), handed to `.grad` by `accumulate_grads` so that clipping and any
    torch.optim optimizer read them as usual.
    """

    def __init__(self, master: nn.Module):
        for name, p in master.named_parameters():
            if p.dtype != torch.float32:
                raise ValueError(f"Bf16Replica: master parameter {name} is {p.dtype}, expected float32")
        self.master = master
        self.module = copy.deepcopy(master).to(torch.bfloat16)
        self.all_pairs = list(zip(master.parameters(), self.module.parameters()))
        self.pairs = [(p32, p16) for p32, p16 in self.all_pairs if p32.requires_grad]
        self._buffers: list[Tensor] | None = None

    def master_params(self) -> list[nn.Parameter]:
        return [p32 for p32, _ in self.pairs]

    def accumulate_grads(self) -> None:
        """Add the bf16 copy's gradients (of one micro-batch) into the master's fp32 `.grad`; clear the bf16 ones.

        The first micro-batch after `optimizer.zero_grad(set_to_none=True)` (master `.grad` None) copies, later ones
        add, so k micro-batches accumulate in fp32. Parameters that received no gradient (unused heads) keep `.grad`
        None on both sides, as in fp32 training.
        """
        if self._buffers is None:
            self._buffers = [torch.zeros_like(p32) for p32, _ in self.pairs]
        with torch.no_grad():
            for (p32, p16), buf in zip(self.pairs, self._buffers):
                if p16.grad is None:
                    continue
                if p32.grad is None:
                    buf.copy_(p16.grad)  # converts to fp32
                    p32.grad = buf
                else:
                    p32.grad.add_(p16.grad)
                p16.grad = None

    def sync(self) -> None:
        """Copy the master weights into the bf16 copy (after each optimizer step, after a resume: all of them, the
        frozen ones too)."""
        with torch.no_grad():
            torch._foreach_copy_([p16 for _, p16 in self.all_pairs], [p32 for p32, _ in self.all_pairs])

    def train(self, mode: bool = True) -> "Bf16Replica":
        self.module.train(mode)
        return self


def _update_from_bf16(p: Tensor, grad16: Tensor, m: Tensor, v: Tensor, lr: Tensor, scale: Tensor, p16: Tensor,
                      b1: float, b2: float, e: float, weight_decay: float) -> None:
    """`bert_adam_update` of an fp32 master from its bf16 copy's gradient times `scale` (the clip coefficient),
    writing the new weight into the copy as well: what `Bf16Replica.accumulate_grads`, clipping and
    `Bf16Replica.sync` do in three passes of their own, inside the update's one loop when compiled (it moves as many
    bytes as the fp32 update: reads a 2-byte gradient instead of 4, writes the 2-byte copy)."""
    optim.bert_adam_update(p, grad16.float() * scale, m, v, lr, b1, b2, e, weight_decay)
    p16.copy_(p)


def _fp32_norm(grad: Tensor) -> Tensor:
    """2-norm of a (bf16) gradient accumulated in fp32; compiled, one pass over the 2-byte values (eager
    `vector_norm(dtype=float32)` first writes an fp32 copy of the whole tensor)."""
    return torch.linalg.vector_norm(grad.float(), 2.0)


@functools.cache
def _compiled(fn):
    """`fn` under torch.compile (inductor), once per process for any parameter size (dynamic shapes; learning rate
    and clip coefficient are tensors, so the schedule's new value each step compiles nothing new)."""
    return torch.compile(fn, dynamic=True)


def _large(t: Tensor) -> bool:
    # as BertAdam(fused=True): smaller tensors (biases, LayerNorm) stay eager, a compiled call costs more than them
    return t.numel() >= optim.FUSED_MIN_NUMEL and t.is_contiguous()


def bf16_clip(replica: Bf16Replica, max_norm: float) -> tuple[Tensor, Tensor]:
    """(total gradient norm, clip coefficient) of the bf16 copy's gradients, as `clip_grad_norm_` computes them on
    their fp32 copies: per-tensor norms accumulated in fp32 (compiled for the large ones, as the fused update), the
    2-norm of those, coefficient max_norm / (norm + 1e-6) capped at 1. `max_norm` <= 0 (no clipping): (0, 1)."""
    grads = [p16.grad for _, p16 in replica.pairs if p16.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    if max_norm <= 0:  # not clipping: train_step reports no norm, so none is computed
        return torch.zeros((), device=device), torch.ones((), device=device)
    norms = [_compiled(_fp32_norm)(g) if _large(g) else torch.linalg.vector_norm(g, 2.0, dtype=torch.float32)
             for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0) if norms else torch.zeros((), device=device)
    return total, torch.clamp(max_norm / (total + 1e-6), max=1.0)


@torch.no_grad()
def step_from_bf16(optimizer: optim.BertAdam, replica: Bf16Replica, grad_scale: Tensor) -> None:
    """One update of the fp32 masters of `replica` from their bf16 copies: each copy's gradient times `grad_scale`
    (a 0-d fp32 tensor: the clip coefficient of `bf16_clip`, 1 when not clipping) is the master's gradient, the
    master moves as `optimizer.step()` would move it, and the new weight is written into the copy; the copies'
    gradients are cleared. Equal, to rounding, to `accumulate_grads`, clipping, `optimizer.step()` and `sync`, in one
    compiled pass over each large parameter. Masters whose copy has no gradient are left alone, as `step` leaves those
    without one. The optimizer's state (moments, step count) is its own, so checkpoints and resume are unchanged.

    Needs `optimizer.fused` (a fused BertAdam: the compiled update is what makes one pass; the eager optimizer keeps
    the original's operations, with the moves apart)."""
    if not optimizer.fused:
        raise RuntimeError("step_from_bf16 needs BertAdam(fused=True) (the eager step keeps the moves apart)")
    copies = {id(p32): p16 for p32, p16 in replica.pairs}
    for group in optimizer.param_groups:
        lrs: dict[tuple, Tensor] = {}  # one small tensor per group and step, not per parameter
        hyper = (group["b1"], group["b2"], group["e"], group["weight_decay"])
        for p in group["params"]:
            p16 = copies.get(id(p))
            if p16 is None or p16.grad is None:
                continue
            if p16.grad.is_sparse:
                raise RuntimeError("BertAdam does not support sparse gradients")
            state = optimizer.state_for(p)
            m, v, step = state["next_m"], state["next_v"], state["step"]
            if _large(p) and p16.grad.is_contiguous() and p16.is_contiguous():
                key = (step, p.dtype, p.device)
                if key not in lrs:
                    lrs[key] = torch.tensor(optimizer.scheduled_lr(group, step), dtype=p.dtype, device=p.device)
                _compiled(_update_from_bf16)(p.detach().view(-1), p16.grad.view(-1), m.view(-1), v.view(-1),
                                             lrs[key], grad_scale, p16.detach().view(-1), *hyper)
            else:
                _update_from_bf16(p.detach(), p16.grad, m, v, optimizer.scheduled_lr(group, step), grad_scale,
                                  p16.detach(), *hyper)
            state["step"] = step + 1
    for _, p16 in replica.pairs:  # also those of parameters this optimizer does not hold, as accumulate_grads does
        p16.grad = None
