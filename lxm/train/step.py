"""The optimizer step shared by pretraining and finetuning, and the micro-batches it is fed with.

One optimizer step = the micro-batches of one global batch: forward + backward of each (gradient synchronisation
skipped with `no_sync` on all but the last when the model is DDP-wrapped), gradient clipping, optimizer and
scheduler step; with a bf16 replica (`lxm.train.precision`) the gradients move into the fp32 master after each
micro-batch and the updated weights back after the step. nanoGPT / open_clip style: explicit, no trainer framework
(style.md §8.9). Gradient accumulation and the per-process shares of a global batch are additions: airsplay/lxmert
(`src/pretrain/lxmert_pretrain.py`, `src/tasks/*.py`) ran one batch per step on one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from lxm.train import optim
from lxm.train.precision import Bf16Replica, bf16_clip, step_from_bf16, training_autocast
from lxm.train.run import DistInfo


class MicroBatches(Sampler):
    """Index lists of this process's micro-batches, epoch-seeded, from global batch `start` on.

    Global batch k of an epoch is positions [k*B, (k+1)*B) of a permutation seeded by (seed, epoch) (drop_last, as
    the original); process r takes every world-th index of it, cut into micro-batches.
    """

    def __init__(self, n: int, batch: int, micro: int, epoch: int, seed: int, dist: DistInfo, start: int = 0):
        self.perm = np.random.default_rng([seed, epoch]).permutation(n)
        self.batch, self.micro, self.dist, self.start = batch, micro, dist, start
        self.steps = n // batch

    def __iter__(self):
        for k in range(self.start, self.steps):
            share = self.batch // self.dist.world_size  # contiguous shares: same micro-batches as one process
            mine = self.perm[k * self.batch:(k + 1) * self.batch][self.dist.rank * share:(self.dist.rank + 1) * share]
            for s in range(0, len(mine), self.micro):
                yield mine[s:s + self.micro].tolist()

    def __len__(self) -> int:
        return (self.steps - self.start) * self.per_step

    @property
    def per_step(self) -> int:
        return -(-(self.batch // self.dist.world_size) // self.micro)


def step_groups(micro_batches: Iterable, per_step: int) -> Iterator[list]:
    """The micro-batches of a loader over `MicroBatches`, grouped into the lists of one optimizer step each."""
    group: list = []
    for micro in micro_batches:
        group.append(micro)
        if len(group) == per_step:
            yield group
            group = []


def train_step(model: nn.Module, micro_batches: Sequence, loss_fn: Callable[[nn.Module, object], dict[str, Tensor]],
               optimizer: torch.optim.Optimizer, scheduler=None, *, clip_grad_norm: float = 0.0,
               precision: str = "fp32", device_type: str = "cpu", replica: Bf16Replica | None = None
               ) -> dict[str, Tensor]:
    """One optimizer step over `micro_batches`; returns the averaged named losses, 'loss' and 'grad_norm' as 0-d
    float64 tensors on the model's device, not read back: a host read is a device synchronisation, which on a GPU
    costs more than a small step (`lxm.train.run.PendingSteps` reads them at log steps). float64, summed in the
    order of the float arithmetic this replaced, so the values read are those it gave.

    `loss_fn(model, batch)` returns named losses whose plain sum is the objective (each already a batch mean); the
    micro-batch objectives are averaged, so accumulation over k micro-batches equals one batch k times larger.
    With `replica` (precision "bf16"), `model` is (a wrapper of) `replica.module` and `optimizer` holds the master's
    parameters: each micro-batch's gradients are synchronised (DDP) and added into the fp32 master gradients, since
    accumulating them in bf16 would lose the small ones. With one micro-batch and a fused BertAdam
    (`fused_optimizer=true`) the optimizer itself reads the bf16 gradients and writes the bf16 weights
    (`lxm.train.precision.step_from_bf16`, clipping by `bf16_clip`): the same update to rounding, without the two
    moves.
    """
    n = len(micro_batches)
    # one micro-batch, bf16 copy, fused BertAdam: the optimizer reads the copy's gradients and writes its weights
    direct = replica is not None and n == 1 and isinstance(optimizer, optim.BertAdam) and optimizer.fused
    totals: dict[str, Tensor] = {}
    for k, batch in enumerate(micro_batches):
        sync = k == n - 1 or not hasattr(model, "no_sync") or replica is not None
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with training_autocast(precision, device_type):
                losses = loss_fn(model, batch)
            loss = sum(losses.values()) / n
            loss.backward()
        if replica is not None and not direct:
            replica.accumulate_grads()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value.detach().double() / n
    if direct:
        norm, scale = bf16_clip(replica, clip_grad_norm)
        grad_norm = norm.detach().double() if clip_grad_norm > 0 else None
        step_from_bf16(optimizer, replica, scale)
    else:
        params = [p for p in (replica.master_params() if replica is not None else model.parameters())
                  if p.grad is not None]
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, clip_grad_norm).detach().double() if clip_grad_norm > 0
                     else None)
        optimizer.step()
        if replica is not None:
            replica.sync()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for value in totals.values():
        loss = loss + value
    totals["loss"] = loss
    some = next(iter(totals.values()))
    totals["grad_norm"] = grad_norm if grad_norm is not None else torch.zeros((), dtype=torch.float64,
                                                                                device=some.device)
    return totals
