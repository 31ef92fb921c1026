"""Optimisers and learning-rate schedules of LXMERT training.

`BertAdam` reproduces `src/lxrt/optimization.py` of airsplay/lxmert (from pytorch-pretrained-bert; lxmert.md §2.5):
Adam moments with beta (0.9, 0.999) and eps 1e-6 added to sqrt(v), NO bias correction, decoupled weight decay 0.01
added to the update for ALL parameters (biases and LayerNorm included), and the schedule applied inside the step:
`warmup_linear(step / t_total)` with the step read BEFORE its increment (the first update uses lr 0). The original's
internal gradient clipping is commented out there; clipping happens outside (1.0 pretraining, 5.0 finetuning).
`BertAdam(fused=True)` is the same arithmetic compiled into one loop per large parameter on the CPU, and multi-tensor
`torch._foreach_*` operations over all parameters on a GPU (`fused_update`; an addition). The update
of fp32 master weights from a bf16 copy's gradients is precision machinery: `lxm.train.precision.step_from_bf16`.

`warmup_linear_lambda` gives the same schedule for a standard optimizer (AdamW) through `LambdaLR`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.optim import Optimizer


def warmup_linear(progress: float, warmup: float) -> float:
    """lr multiplier at `progress` = step / t_total: linear warm-up to 1 over `warmup`, then linear decay to 0."""
    if progress < warmup:
        return progress / warmup
    return max((progress - 1.0) / (warmup - 1.0), 0.0) + 0.0  # + 0.0: no "-0.0" at the end


def bert_adam_update(p: Tensor, grad: Tensor, m: Tensor, v: Tensor, lr: Tensor | float, b1: float, b2: float,
                     e: float, weight_decay: float) -> None:
    """One parameter's BertAdam update in place: `BertAdam.step`'s arithmetic in the form torch.compile turns into
    one loop over the parameter (read p, grad, m, v once, write p, m, v once) where the eager step makes nine passes;
    the compiler may contract multiply-adds, so results agree to rounding, not bits. `lr` is a 0-d tensor when
    compiled (the schedule's new value each step then compiles nothing new)."""
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    update = m / (v.sqrt() + e)
    if weight_decay > 0.0:
        update = update + weight_decay * p
    p.sub_(update * lr)


def bert_adam_foreach(params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], lr: float,
                      b1: float, b2: float, e: float, weight_decay: float) -> None:
    """Many parameters' BertAdam updates in place as multi-tensor operations (`torch._foreach_*`: on a GPU a few
    kernel launches for all of them instead of nine per parameter): the eager step's operations in its order, so
    the same values (bit for bit where the kernels round alike; tested on CPU)."""
    torch._foreach_mul_(ms, b1)
    torch._foreach_add_(ms, grads, alpha=1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_add_(denom, e)
    update = torch._foreach_div(ms, denom)
    if weight_decay > 0.0:
        torch._foreach_add_(update, params, alpha=weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)


def fused_update(device_type: str) -> str:
    """How `BertAdam(fused=True)` updates parameters on `device_type`: "foreach" on a GPU (multi-tensor kernels over
    every parameter of a group), "compiled" elsewhere (one compiled loop per large parameter: on a CPU the
    multi-tensor operations are per-tensor loops, nine passes over memory)."""
    return "compiled" if device_type == "cpu" else "foreach"


# smaller parameters (biases, LayerNorm) stay eager: a compiled call's fixed cost exceeds their update
FUSED_MIN_NUMEL = 1 << 16


@functools.cache
def compiled_update():
    """`bert_adam_update` under torch.compile (inductor), compiled once per process for any parameter size (dynamic
    shapes; the learning rate is a tensor, so the schedule's new value each step compiles nothing new)."""
    return torch.compile(bert_adam_update, dynamic=True)


class BertAdam(Optimizer):
    """Adam as LXMERT trained with it (no bias correction, weight decay on every parameter, built-in schedule).

    Args:
        params: parameters or groups.
        lr: peak learning rate (pretraining 1e-4; VQA/NLVR2 5e-5, GQA 1e-5).
        warmup: fraction of `t_total` spent warming up (pretraining 0.05, finetuning 0.1).
        t_total: total number of optimizer steps; -1 disables the schedule (constant lr).
        b1, b2, e: Adam constants (0.9, 0.999, 1e-6).
        weight_decay: 0.01, applied to all parameters.
        fused: on the CPU each parameter's update (of those with >= FUSED_MIN_NUMEL elements) as one compiled loop
            (`compiled_update`; needs what torch.compile needs, a C++ compiler); on a GPU all of a group's updates
            as multi-tensor operations (`bert_adam_foreach`; `fused_update` decides by device); the same arithmetic
            up to rounding, the same state (a checkpoint of either resumes in the other). Off: the eager step,
            operation for operation the original's.
    """

    def __init__(self, params, lr: float, warmup: float = -1, t_total: int = -1, b1: float = 0.9,
                 b2: float = 0.999, e: float = 1e-6, weight_decay: float = 0.01, fused: bool = False):
        if lr < 0:
            raise ValueError(f"BertAdam: lr must be >= 0, got {lr}")
        if t_total != -1 and not 0.0 < warmup < 1.0:
            raise ValueError(f"BertAdam: warmup must be in (0, 1) when t_total is set, got {warmup}")
        for name, v in (("b1", b1), ("b2", b2)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"BertAdam: {name} must be in [0, 1), got {v}")
        super().__init__(params, dict(lr=lr, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e,
                                      weight_decay=weight_decay))
        self.fused = fused

    def current_lr(self) -> list[float]:
        """The learning rate each group's next update will use (for logging)."""
        out = []
        for group in self.param_groups:
            step = next((self.state[p]["step"] for p in group["params"] if p in self.state), 0)
            out.append(self.scheduled_lr(group, step))
        return out

    @staticmethod
    def scheduled_lr(group: dict, step: int) -> float:
        """The learning rate of a parameter's update number `step` in `group` (counted from 0: the step is read
        before its increment, as the original)."""
        if group["t_total"] == -1:
            return group["lr"]
        return group["lr"] * warmup_linear(step / group["t_total"], group["warmup"])

    def state_for(self, p: Tensor) -> dict:
        """`p`'s state, created at its first update: "step" (updates done), "next_m", "next_v" (the original's
        names); what a checkpoint holds, and what an update from elsewhere (`lxm.train.precision.step_from_bf16`)
        reads and advances."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["next_m"] = torch.zeros_like(p)
            state["next_v"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lrs: dict[tuple, Tensor] = {}
            todo = [p for p in group["params"] if p.grad is not None]
            if self.fused:
                todo = self._update_foreach(group, todo)
            for p in todo:
                self._update_one(group, lrs, p, p.grad)
        return loss

    def _update_foreach(self, group: dict, params: list[Tensor]) -> list[Tensor]:
        """The multi-tensor update of `params` on devices where it is the fused path (`fused_update`), in lists of
        one device, dtype and step count; returns the parameters left to the per-parameter update."""
        lists: dict[tuple, list[Tensor]] = {}
        rest = []
        for p in params:
            if fused_update(p.device.type) == "foreach" and not p.grad.is_sparse and p.grad.dtype == p.dtype:
                lists.setdefault((p.device, p.dtype, self.state_for(p)["step"]), []).append(p)
            else:
                rest.append(p)
        for (_, _, step), ps in lists.items():
            states = [self.state[p] for p in ps]
            bert_adam_foreach(ps, [p.grad for p in ps], [s["next_m"] for s in states], [s["next_v"] for s in states],
                              self.scheduled_lr(group, step), group["b1"], group["b2"], group["e"],
                              group["weight_decay"])
            for state in states:
                state["step"] += 1
        return rest

    def _update_one(self, group: dict, lrs: dict[tuple, Tensor], p: Tensor, grad: Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError("BertAdam does not support sparse gradients")
        state = self.state_for(p)
        m, v = state["next_m"], state["next_v"]
        if (self.fused and p.numel() >= FUSED_MIN_NUMEL and p.is_contiguous() and grad.is_contiguous()
                and grad.dtype == p.dtype):
            key = (state["step"], p.dtype, p.device)
            if key not in lrs:  # one small tensor per group and step, not per parameter
                lrs[key] = torch.tensor(self.scheduled_lr(group, state["step"]), dtype=p.dtype, device=p.device)
            compiled_update()(p.detach().view(-1), grad.view(-1), m.view(-1), v.view(-1), lrs[key], group["b1"],
                              group["b2"], group["e"], group["weight_decay"])
        else:
            m.mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
            v.mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])
            update = m / (v.sqrt() + group["e"])
            if group["weight_decay"] > 0.0:
                update.add_(p, alpha=group["weight_decay"])
            p.add_(update, alpha=-self.scheduled_lr(group, state["step"]))
        state["step"] += 1


def warmup_linear_lambda(t_total: int, warmup: float):
    """LambdaLR multiplier for the same schedule (step counted from 0 before the update, as BertAdam)."""
    if t_total <= 0:
        raise ValueError(f"t_total must be positive, got {t_total}")

    def factor(step: int) -> float:
        return warmup_linear(step / t_total, warmup)

    return factor


def make_optimizer(model: torch.nn.Module, kind: str, lr: float, t_total: int, warmup: float,
                   weight_decay: float = 0.01, fused: bool = False):
    """("bert", BertAdam with its built-in schedule) or ("adamw", AdamW + LambdaLR; no decay on biases/LayerNorm).
    `fused`: BertAdam's compiled update (`BertAdam(fused=True)`), or torch's fused AdamW kernel.

    Returns (optimizer, scheduler-or-None).
    """
    if kind == "bert":
        return BertAdam(model.parameters(), lr=lr, warmup=warmup, t_total=t_total, weight_decay=weight_decay,
                        fused=fused), None
    if kind == "adamw":
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-6,
                                fused=fused or None)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_lambda(t_total, warmup))
    raise ValueError(f"unknown optimizer {kind!r}; 'bert' or 'adamw'")


__all__ = ["BertAdam", "bert_adam_update", "bert_adam_foreach", "fused_update", "warmup_linear", "warmup_linear_lambda",
           "make_optimizer"]
