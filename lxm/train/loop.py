"""The training step shared by pretraining and finetuning, and the process-group helpers it needs.

One optimizer step = the micro-batches of one global batch: forward + backward of each (gradient synchronisation
skipped with `no_sync` on all but the last when the model is DDP-wrapped), gradient clipping, optimizer and
scheduler step. nanoGPT / open_clip style: explicit, no trainer framework (style.md §8.9).

Also the run plumbing both recipes share: start-up (process group, device, seed, resolved config, removal of temp
files left by killed checkpoint writes), checkpoint state save / restore (a damaged checkpoint is named and the next
older one used), and rewinding the jsonl logs to the step a resumed run continues from. The original
(airsplay/lxmert) could not resume; these have no counterpart there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lxm import atomic
from lxm.errors import ConfigError
from lxm.model import CheckpointError

_logger = logging.getLogger(__name__)


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
            raise ConfigError("config: device=cuda but CUDA is not available on this machine")
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
        remove_stale_temp_files(out)
        (out / "config.yaml").write_text(cfg.to_yaml())
    return dist, device


_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)$")  # lxm.atomic's `.NAME.tmp-PID`


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():  # this process has written nothing yet: the file is from an earlier process of this pid
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, OverflowError):
        return False
    return True


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete the temporary files of atomic writes (`.step-N.pt.tmp-PID`, ...) in `out` and its direct
    subdirectories whose writer process is gone; a killed checkpoint write leaves one of full checkpoint size.
    A file whose PID is alive is kept: another process may still be writing into this run directory."""
    removed = []
    for folder in [out, *(d for d in out.iterdir() if d.is_dir())]:
        for path in folder.iterdir():
            m = _TEMP_NAME.match(path.name)
            if m is None or not path.is_file() or _pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
                _logger.info("removed %s, left by a killed write (process %s is gone)", path, m.group(1))
    return removed


def training_state(model: nn.Module, optimizer, scheduler, **extra: Any) -> dict[str, Any]:
    """What a checkpoint needs to continue exactly: weights (+ model config), optimizer, schedule, RNG states."""
    config = getattr(model, "config", None)
    return {"model": model.state_dict(), "model_config": config.to_dict() if config is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], **extra}


def read_state(path: Path) -> dict[str, Any]:
    """torch.load of a `training_state` file; a file that cannot be read (truncated, not a checkpoint) raises a
    CheckpointError naming it (torch's own messages name no file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        # torch's first sentence is the reason; the rest is generic advice
        reason = str(exc).splitlines()[0].split(". ")[0] if str(exc) else "file ends early"
        raise CheckpointError(f"{path}: damaged checkpoint, cannot be read ({type(exc).__name__}: {reason})"
                              ) from None


def restore_newest(paths: Sequence[Path], model: nn.Module, optimizer, scheduler, *, set_aside: bool = False
                   ) -> tuple[Path, dict[str, Any]]:
    """Restore the first readable file of `paths` (newest first) with `restore_state`; returns (path, state).

    Each damaged file is logged as a warning and skipped; with `set_aside` it is renamed to NAME.damaged so that it
    is neither resumed from nor counted among the kept checkpoints again (rank 0 only: the others just skip it).
    Raises CheckpointError when none is readable.
    """
    if not paths:
        raise CheckpointError("no checkpoint to resume from")
    for k, path in enumerate(paths):
        try:
            state = read_state(path)
        except CheckpointError as exc:
            note = ""
            if set_aside:
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".damaged"))
                    note = f" (renamed to {path.name}.damaged)"
            if k == len(paths) - 1:
                older = f"; the older ones ({', '.join(p.name for p in paths[:-1])}) too" if k else ""
                raise CheckpointError(f"{exc}{note}{older}: no intact checkpoint to resume from") from None
            _logger.warning("%s%s; resuming from an older checkpoint", exc, note)
            continue
        _apply_state(state, model, optimizer, scheduler)
        return path, state
    raise AssertionError("unreachable")


def restore_state(path: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Load a `training_state` file into model / optimizer / scheduler and the RNGs; returns the whole state."""
    state = read_state(path)
    _apply_state(state, model, optimizer, scheduler)
    return state


def _apply_state(state: dict[str, Any], model: nn.Module, optimizer, scheduler) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


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


def rewind_logs(out: Path, step: int, epoch: int) -> None:
    """Cut OUT/log.jsonl and OUT/metrics.jsonl back to a checkpoint taken after `step` steps and `epoch` finished
    epochs, so that the steps a resumed run redoes are logged once. Each file is rewritten atomically.

    Kept: step records up to `step`, validation / metrics records of epochs before `epoch` (the validation of the
    checkpoint's own epoch is redone when the checkpoint predates it), error records of steps before `step`.
    A last line cut by a crash is dropped; any other unreadable line is kept as it was.
    """
    for name, keep in (("log.jsonl", lambda r: _log_record_kept(r, step, epoch)),
                       ("metrics.jsonl", lambda r: r.get("epoch", -1) < epoch)):
        path = out / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        kept = []
        for n, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if n < len(lines):
                    kept.append(line)
                continue
            if not isinstance(record, dict) or keep(record):
                kept.append(line)
        if len(kept) != len(lines):
            atomic.write_text(path, "".join(line + "\n" for line in kept))
            _logger.info("%s: %d record(s) after step %d dropped (the resumed run redoes them)", path,
                         len(lines) - len(kept), step)


def _log_record_kept(record: dict[str, Any], step: int, epoch: int) -> bool:
    if "valid" in record:
        return record.get("epoch", -1) < epoch
    if "error" in record:  # logged with the step count before the failed step
        return record.get("step", 0) < step
    return record.get("step", 0) <= step
