"""The scaffold both recipes (`pretrain`, `finetune`) stand on: one run directory, one process group.

Start-up (`start_run`: process group, device, seed, the resolved config, removal of temp files left by killed
checkpoint writes), DDP wrapping and the per-process micro-batch size, optimizer construction, checkpoint state
save / discovery / restore (a damaged checkpoint is named and the next older one used), the non-finite-loss guard,
and the run logger (OUT/log.jsonl, OUT/metrics.jsonl, OUT/tensorboard, rewound to the step a resumed run continues
from). The original (airsplay/lxmert `src/pretrain/lxmert_pretrain.py`, `src/tasks/*.py`) printed to stdout, saved
weights only and could not resume; none of this has a counterpart there.
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

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lxm import atomic
from lxm.atomic import atomic_path
from lxm.errors import ConfigError
from lxm.memory import keep_freed_memory
from lxm.model import CheckpointError
from lxm.train.optim import make_optimizer
from lxm.train.precision import Bf16Replica

_logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"  # pretraining: OUT/checkpoints/{step,epoch}-N.pt and best.pt
BEST_DIR = "best"  # finetuning: lxm model directory of the best epoch (what `lxm predict` loads)
LAST = "last.pt"  # finetuning: model + optimizer + epoch + RNG, what --resume reads
MODEL_DIR = "model"  # pretraining: the final weights as an lxm model directory (what `lxm finetune --init` reads)


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


def loader_workers(num_workers: int | None, device: torch.device) -> int:
    """DataLoader workers per process: `num_workers`, or (None) 0 when the model runs on the CPU — the step's
    threads use every core, and workers competing with them cost more than loading in process (small bf16 on 2
    cores: the trainer at 96 % of the bare step with 2 workers, 103 % with 0; fp32 87 % vs 99 %) — and
    min(4, cores - 1) with CUDA, where the loader must keep up with the GPU."""
    if num_workers is not None:
        return num_workers
    if device.type != "cuda":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def pick_device(device: str, dist: DistInfo) -> torch.device:
    """"auto" -> this rank's GPU when CUDA is available, else CPU; "cuda" without CUDA is an error."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("config: device=cuda but CUDA is not available on this machine")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def start_run(cfg, out: Path, *dirs: str) -> tuple[DistInfo, torch.device]:
    """Join torchrun's group, pick the device, keep freed memory on CPU (`keep_freed_memory`), seed per rank and
    (rank 0) write OUT/config.yaml — the resolved config — before anything else runs. `cfg` has `device`,
    `keep_freed_memory`, `seed` and `to_yaml()`."""
    dist = init_distributed("cuda" if cfg.device == "cuda" else "cpu")
    device = pick_device(cfg.device, dist)
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()
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


# ---------------------------------------------------------------------------------------------------- set-up


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel when several processes run, else `model` itself."""
    if info.world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda"
                                                     else None)


def training_modules(model: nn.Module, cfg, info: DistInfo, device: torch.device
                     ) -> tuple[Bf16Replica | None, nn.Module]:
    """(bf16 replica or None, the module the training steps call) for `model` (fp32, on `device`) under `cfg`
    (precision, compile): DDP around the module that computes (the replica under precision "bf16"), then compile.

    Under DDP with a replica, rank 0's master weights are broadcast first: DDP's own start-up broadcast then
    covers only the replica, and every rank's master must start equal too.
    """
    replica = None
    if cfg.precision == "bf16":
        if info.world_size > 1:
            with torch.no_grad():
                for tensor in model.state_dict().values():
                    dist.broadcast(tensor, 0)
        replica = Bf16Replica(model)
    return replica, compiled(wrap_ddp(replica.module if replica else model, info, device), cfg.compile)


def compiled(module: nn.Module, enabled: bool) -> nn.Module:
    """The module the training steps call: `torch.compile(module)` when `enabled` (config `compile`), else itself.

    Only the training forward and backward go through it; the parameters are the module's own (compiling wraps,
    it copies nothing), so the optimizer, clipping, checkpoints (saved from the plain model: no `_orig_mod.` key
    prefix) and evaluation are unchanged. Shapes vary from batch to batch (packed text rows, masked positions):
    after the first recompilation torch marks them dynamic instead of compiling again for every batch.
    """
    return torch.compile(module) if enabled else module


def micro_batch_size(batch_size: int, micro: int | None, info: DistInfo) -> int:
    """Per process per micro-step: `micro`, or (None) the process's whole share of the global batch."""
    if batch_size % info.world_size:
        raise ConfigError(f"batch_size {batch_size} is not divisible by {info.world_size} processes")
    return batch_size // info.world_size if micro is None else micro


def build_optimizer(model: nn.Module, cfg, steps_per_epoch: int):
    """(optimizer, scheduler) of `cfg` (optimizer, lr, warmup, weight_decay, fused_optimizer), the schedule over all
    epochs."""
    return make_optimizer(model, cfg.optimizer, cfg.lr, steps_per_epoch * cfg.epochs, cfg.warmup, cfg.weight_decay,
                          fused=cfg.fused_optimizer)


def current_lr(optimizer, scheduler) -> float:
    return optimizer.param_groups[0]["lr"] if scheduler else optimizer.current_lr()[0]


# ---------------------------------------------------------------------------------------------------- checkpoints


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save, atomically and synced to disk before the rename: a checkpoint is either complete or absent, also
    after a power loss (without the fsync the renamed file can come back truncated)."""
    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)


def step_checkpoints(out: Path) -> list[Path]:
    """OUT/checkpoints/step-N.pt, newest (largest N) first."""
    return sorted((out / CKPT_DIR).glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]), reverse=True)


def latest_checkpoint(out: Path) -> Path | None:
    steps = step_checkpoints(out)
    return steps[0] if steps else None


# ---------------------------------------------------------------------------------------------------- logs


class RunLogger:
    """The records of a run: OUT/log.jsonl (every step record, validation, errors), OUT/metrics.jsonl (one record
    per validated epoch) and, when the tensorboard package is installed, OUT/tensorboard (the numbers of each step
    record as train/NAME, of a validation as valid/NAME). Only the main process writes; `on_record` sees every
    log record after it is written (e.g. for a progress bar)."""

    def __init__(self, out: Path, is_main: bool, on_record: Callable[[dict], None] | None = None):
        self.out, self.is_main, self.on_record = out, is_main, on_record
        self.path = out / "log.jsonl"
        self._purge_step: int | None = None  # first tensorboard step to drop from earlier event files (resume)
        self._tb: Any = False  # False: not opened yet

    def resume_at(self, step: int, epoch: int) -> None:
        """A resumed run continues after `step` steps / `epoch` epochs: what was logged later is dropped (the jsonl
        files rewound, tensorboard told to purge), so that the steps it redoes appear once."""
        if self.is_main:
            rewind_logs(self.out, step, epoch)
            self._purge_step = step + 1

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        append_jsonl(self.path, record)
        writer = self._tensorboard()
        if writer is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    writer.add_scalar(f"train/{key}", value, record["step"])
            for key, value in (record.get("valid") or {}).items():
                writer.add_scalar(f"valid/{key}", value, record["step"])
            writer.flush()
        if self.on_record is not None:
            self.on_record(record)

    def metrics(self, record: dict[str, Any]) -> None:
        if self.is_main:
            append_jsonl(self.out / "metrics.jsonl", record)

    def check_finite(self, values: dict[str, float], step: int, **batch: list) -> None:
        """The non-finite-loss guard: log the step's values and the batch (e.g. uids=[...]) and stop the run."""
        if np.isfinite(values["loss"]):
            return
        self.log({"step": step, "error": "non-finite loss", "losses": values, **batch})
        raise FloatingPointError(f"non-finite loss at step {step}; batch {' '.join(batch)} logged in {self.path}")

    def _tensorboard(self):
        if self._tb is False:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # after a resume, events of the steps about to be redone are dropped from the event files
                self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self._purge_step)
            except ImportError:
                self._tb = None
        return self._tb
