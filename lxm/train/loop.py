"""The training step shared by pretraining and finetuning, and the process-group helpers it needs.

One optimizer step = the micro-batches of one global batch: forward + backward of each (gradient synchronisation
skipped with `no_sync` on all but the last when the model is DDP-wrapped), gradient clipping, optimizer and
scheduler step. nanoGPT / open_clip style: explicit, no trainer framework (style.md §8.9).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join torchrun's process group (RANK / WORLD_SIZE / LOCAL_RANK); gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def autocast(precision: str, device_type: str):
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, micro_batches: Sequence, loss_fn: Callable[[nn.Module, object], dict[str, Tensor]],
               optimizer: torch.optim.Optimizer, scheduler=None, *, clip_grad_norm: float = 0.0,
               precision: str = "fp32", device_type: str = "cpu") -> dict[str, float]:
    """One optimizer step over `micro_batches`; returns the averaged named losses, 'loss' and 'grad_norm'.

    `loss_fn(model, batch)` returns named losses whose plain sum is the objective (each already a batch mean); the
    micro-batch objectives are averaged, so accumulation over k micro-batches equals one batch k times larger.
    """
    n = len(micro_batches)
    totals: dict[str, float] = {}
    for k, batch in enumerate(micro_batches):
        sync = k == n - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with autocast(precision, device_type):
                losses = loss_fn(model, batch)
            loss = sum(losses.values()) / n
            loss.backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach()) / n
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)) if clip_grad_norm > 0 else 0.0
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals["loss"] = sum(v for k, v in totals.items())
    totals["grad_norm"] = grad_norm
    return totals


# ---------------------------------------------------------------------------------------------------- run plumbing


def pick_device(device: str, dist: DistInfo) -> torch.device:
    """"auto" -> this rank's GPU when CUDA is available, else CPU; "cuda" without CUDA is an error."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("config device=cuda but CUDA is not available")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def start_run(cfg, out: Path, *dirs: str) -> tuple[DistInfo, torch.device]:
    """Join torchrun's group, pick the device, seed per rank and (rank 0) write OUT/config.yaml — the resolved
    config — before anything else runs. `cfg` has `device`, `seed` and `to_yaml()`."""
    dist = init_distributed("cuda" if cfg.device == "cuda" else "cpu")
    device = pick_device(cfg.device, dist)
    torch.manual_seed(cfg.seed + dist.rank)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name in dirs:
            (out / name).mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    return dist, device


def training_state(model: nn.Module, optimizer, scheduler, **extra: Any) -> dict[str, Any]:
    """What a checkpoint needs to continue exactly: weights (+ model config), optimizer, schedule, RNG states."""
    config = getattr(model, "config", None)
    return {"model": model.state_dict(), "model_config": config.to_dict() if config is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], **extra}


def restore_state(path: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Load a `training_state` file into model / optimizer / scheduler and the RNGs; returns the whole state."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def mean_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The global batch's logged values: the mean over processes of each one's share (a no-op for one process)."""
    if info.world_size == 1:
        return values
    names = sorted(values)
    vals = torch.tensor([values[k] for k in names], dtype=torch.float64)
    dist.all_reduce(vals)
    return {k: float(v) / info.world_size for k, v in zip(names, vals)}


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
