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

Inference (`lxm predict`, `ask`, validation during training) with either bf16 mode runs the fp32 model under
autocast.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

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
