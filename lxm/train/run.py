"""The scaffold both recipes (`pretrain`, `finetune`) stand on: one run directory, one process group.

Start-up in two halves: `start_process` (process group, device, seed) writes nothing, so that a recipe reads and
checks every input before `open_run_folder` writes into OUT (a command that fails leaves a run as it was); the run
folder's rules (`check_run_folder`: a new run needs an empty OUT, `--resume` continues one, `--overwrite` replaces
lxm's own files; `RunLock`: one process per run folder; a resume keeps the run's recipe,
`lxm.train.config.resume_changes`), removal of lxm's temp files left by killed writes, DDP wrapping and the
per-process micro-batch size, optimizer construction, checkpoint state save (checksummed) / discovery / restore (a
damaged or mismatching checkpoint is named and the next older one used; the learning-rate schedule is the resumed
config's; every rank's RNG states, `rank_rng_states`), the step values read back together at log steps with the
non-finite-loss guard (`PendingSteps`), the stop on SIGINT / SIGTERM (`StopSignals`), and the run logger
(OUT/log.jsonl, OUT/metrics.jsonl, OUT/tensorboard, rewound to the step a resumed run continues from). The original
(airsplay/lxmert `src/pretrain/lxmert_pretrain.py`, `src/tasks/*.py`) printed to stdout, saved weights only and could
not resume; none of this has a counterpart there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lxm import atomic
from lxm.devices import resolve_device
from lxm.errors import ConfigError, LxmError
from lxm.integrity import IntegrityError, checksummed_path, sidecar, verify_checksum
from lxm.jsonl import scan_json_lines
from lxm.model import CheckpointError
from lxm.train.config import OptimConfig, RuntimeConfig
from lxm.train.optim import BertAdam, make_optimizer
from lxm.train.precision import Bf16Replica

_logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"  # pretraining: OUT/checkpoints/{step,epoch}-N.pt and best.pt
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")  # a step checkpoint's file name, N = steps done
BEST_DIR = "best"  # finetuning: lxm model directory of the best epoch (what `lxm predict` loads)
LAST = "last.pt"  # finetuning: model + optimizer + epoch + RNG, what --resume reads
MODEL_DIR = "model"  # pretraining: the final weights as an lxm model directory (what `lxm finetune --init` reads)
LOCK = ".lock"  # held (flock) by the process training into the run folder; holds its pid
# What lxm writes into a run folder: `--overwrite` removes exactly these (nothing else of the folder), and only the
# temp files of these names are lxm's (`remove_stale_temp_files`). answers.json: lxm.train.tasks.ANSWERS_FILE;
# plots: `lxm plot`'s default output.
RUN_FILES = ("config.yaml", "log.jsonl", "metrics.jsonl", "summary.json", LAST, LAST + ".sha256", LAST + ".damaged",
             "answers.json")
RUN_DIRS = (CKPT_DIR, BEST_DIR, MODEL_DIR, "predictions", "tensorboard", "plots")
# per folder of a run, the names lxm writes there (NAME of a `.NAME.tmp-PID` temp file, lxm.atomic); predictions/
# holds only the submission files lxm writes (named after the split)
_OWN_NAMES = {
    ".": re.compile(r"^(config\.yaml|log\.jsonl|metrics\.jsonl|summary\.json|answers\.json|last\.pt)(\.sha256)?$"),
    CKPT_DIR: re.compile(r"^(best\.pt|step-\d+\.pt|epoch-\d+\.pt)(\.sha256)?$"),
    BEST_DIR: re.compile(r"^(config\.json|model\.safetensors)(\.sha256)?$"),
    MODEL_DIR: re.compile(r"^(config\.json|model\.safetensors)(\.sha256)?$"),
    "predictions": re.compile(r"^[^/]+\.(json|csv)$"),
}


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join torchrun's process group (RANK / WORLD_SIZE / LOCAL_RANK); gloo on CPU, nccl on GPU (`device` is the
    device type, "cpu" or "cuda")."""
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
    """The config's `device` for this process (`lxm.devices.resolve_device`: "auto" is this rank's GPU when CUDA is
    available, else the CPU; "cuda" without CUDA and anything unknown are errors naming the value)."""
    return resolve_device(device, local_rank=dist.local_rank, what="config: 'runtime.device'")


def start_process(runtime: RuntimeConfig) -> tuple[DistInfo, torch.device]:
    """Join torchrun's group, pick the device, seed per rank (`runtime`'s device and seed); writes nothing
    (`open_run_folder` does, once every input is checked). Process-wide settings are the program's: `lxm pretrain` /
    `lxm finetune` apply the config's `keep_freed_memory` (`lxm.memory`) before they build the trainer."""
    # the device first: a bad `device` fails before joining a group, and "auto" on a GPU machine needs nccl
    device_type = resolve_device(runtime.device, what="config: 'runtime.device'").type
    dist = init_distributed(device_type)
    device = pick_device(runtime.device, dist)
    torch.manual_seed(runtime.seed + dist.rank)
    return dist, device


class RunFolderError(LxmError):
    """The run folder cannot be used as asked (busy, holds another run, not a run); the message names it."""


def _folder_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """The run folder rules, checked before any input is read (nothing written):

    - a new run (neither flag) needs OUT absent or empty: a finished or running run there is never mixed into;
    - `resume` continues the run in OUT (config.yaml); an OUT that is neither empty nor a run is refused;
    - `overwrite` starts afresh in OUT: lxm's own run files (`RUN_FILES`, `RUN_DIRS`) are removed, once the new run's
      inputs are checked, and any other file is left where it is.
    """
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out}: not a directory (--out names the run folder)")
    entries = _folder_entries(out)
    if not entries or overwrite:
        return
    if resume:
        if not set(entries) & {*RUN_FILES, *RUN_DIRS}:
            raise RunFolderError(f"{out}: not an lxm run (no config.yaml, log or checkpoint) and not empty: nothing "
                                 f"to resume; choose another --out")
        return
    what = "already holds a run (config.yaml)" if "config.yaml" in entries else (
        f"is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
    raise RunFolderError(f"{out}: {what}; continue it with --resume, replace lxm's run files with --overwrite, or "
                         f"choose another --out")


class RunLock:
    """An exclusive `flock` on OUT/.lock for the life of a run, so that two processes never train into one folder.

    The file holds the holder's pid (for the message); the lock itself dies with the process, so a killed run leaves
    no stale lock (the file stays, harmless). Under torchrun only rank 0 takes it (the other ranks write nothing).
    """

    def __init__(self, out: Path):
        self.path, self._fd = Path(out) / LOCK, None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"{self.path.parent}: another lxm process (pid {holder}) is training into this run "
                                 f"folder; wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def claim_run_folder(cfg, out: Path, dist: DistInfo, *, resume: bool, overwrite: bool, dry_run: bool
                     ) -> tuple[RunLock | None, dict[str, tuple[Any, Any]]]:
    """What a trainer does first, writing nothing: (rank 0, not a dry run) take the folder's lock, so a second
    process into the same OUT fails at once; check the folder rules (`check_run_folder`); on resume, compare `cfg`
    with the run's recipe (`lxm.train.config.resume_changes`: only `RESUMABLE_KEYS` may change).
    Returns (the lock or None, the changed keys: key -> (run's value, new value)); the lock is released on failure."""
    from lxm.train.config import load_run_config, resume_changes

    lock = RunLock(out).acquire() if dist.is_main and not dry_run else None
    try:
        if dist.is_main:  # the other ranks write nothing; rank 0 may be writing config.yaml while they look
            check_run_folder(out, resume=resume, overwrite=overwrite)
        path = out / "config.yaml"
        changes = resume_changes(load_run_config(path), cfg, path) if resume and path.exists() else {}
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock, changes


def clear_run_files(out: Path) -> list[str]:
    """Remove lxm's own run files and folders from OUT (`--overwrite`); returns the names removed."""
    removed = []
    for name in (*RUN_FILES, *RUN_DIRS):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def open_run_folder(cfg, out: Path, *dirs: str, overwrite: bool = False) -> None:
    """Rank 0, after every input was read and checked: (with `overwrite`) remove lxm's files of the run that was in
    OUT, create OUT and `dirs`, remove temp files of killed writes, and write OUT/config.yaml — the resolved config,
    atomically (on resume the run's recipe, with the new values of `RESUMABLE_KEYS` it was given)."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        removed = clear_run_files(out)
        if removed:
            _logger.warning("%s: --overwrite removed the earlier run's %s", out, ", ".join(removed))
    for name in dirs:
        (out / name).mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    atomic.write_text(out / "config.yaml", cfg.to_yaml())


_TEMP_NAME = re.compile(r"^\.(.+)\.tmp-(\d+)$")  # lxm.atomic's `.NAME.tmp-PID`


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
    """Delete the temporary files that lxm's own atomic writes in a run folder leave when killed (`.NAME.tmp-PID`,
    NAME one of the files lxm writes there: config.yaml, the logs, last.pt, checkpoints/step-N.pt, epoch-N.pt,
    best.pt, the model files of best/ and model/ and their .sha256, the files of predictions/), whose writer process
    is gone; a killed checkpoint write leaves one of full checkpoint size. Anything else is not lxm's and is left
    alone (another program's `.notes.txt.tmp-123`), and so is a file whose PID is alive: another process may still be
    writing it."""
    removed = []
    for sub, own in _OWN_NAMES.items():
        folder = out / sub
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in folder.iterdir():
            m = _TEMP_NAME.match(path.name)
            if (m is None or own.match(m.group(1)) is None or not path.is_file() or path.is_symlink()
                    or _pid_alive(int(m.group(2)))):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
                _logger.info("removed %s, left by a killed write (process %s is gone)", path, m.group(2))
    return removed


def rank_rng_states(info: DistInfo) -> list[dict[str, Any]] | None:
    """Every process's RNG states in rank order (its CPU generator and, with CUDA, its own GPU's), gathered to all
    ranks so that rank 0 saves them with the checkpoint; None for one process. Each rank draws its own dropout
    masks (seeded by seed + rank): a resume restores each rank's stream, not rank 0's on every rank. A collective:
    every rank calls it at each checkpoint (the trainers save at the same steps on every rank)."""
    if info.world_size == 1:
        return None
    mine = {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def training_state(model: nn.Module, optimizer, scheduler, rank_rngs: list[dict[str, Any]] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """What a checkpoint needs to continue exactly: weights (+ model config), optimizer, schedule, RNG states (this
    process's as `torch_rng` / `cuda_rng`, and under DDP every rank's, `rank_rng_states`)."""
    config = getattr(model, "config", None)
    return {"model": model.state_dict(), "model_config": config.to_dict() if config is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            **({"rank_rng": rank_rngs} if rank_rngs is not None else {}), **extra}


def read_state(path: Path) -> dict[str, Any]:
    """torch.load of a `training_state` file; a file that cannot be read (truncated, not a checkpoint) or that differs
    from the checksum recorded when it was written (`save_state`; torch's zip reader checks no CRC, so flipped bytes
    would load) raises a CheckpointError naming it (torch's own messages name no file)."""
    try:
        verify_checksum(path)
    except IntegrityError as exc:  # its message starts with the path
        raise CheckpointError(str(exc).replace(f"{path}: ", f"{path}: damaged checkpoint, ", 1)) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: damaged checkpoint, cannot be read ({exc.strerror or exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        # torch's first sentence is the reason; the rest is generic advice
        reason = str(exc).splitlines()[0].split(". ")[0] if str(exc) else "file ends early"
        raise CheckpointError(f"{path}: damaged checkpoint, cannot be read ({type(exc).__name__}: {reason})"
                              ) from None


def restore_newest(paths: Sequence[Path], model: nn.Module, optimizer, scheduler, *, set_aside: bool = False,
                   info: DistInfo | None = None) -> tuple[Path, dict[str, Any]]:
    """Restore the first readable file of `paths` (newest first) with `restore_state`; returns (path, state).

    Each damaged file is logged as a warning and skipped; with `set_aside` it is renamed to NAME.damaged so that it
    is neither resumed from nor counted among the kept checkpoints again (rank 0 only: the others just skip it).
    `info`: this process's rank, whose own RNG states are restored (`restore_rngs`).
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
                with contextlib.suppress(OSError):
                    sidecar(path).rename(sidecar(path.with_name(path.name + ".damaged")))
            if k == len(paths) - 1:
                older = f"; the older ones ({', '.join(p.name for p in paths[:-1])}) too" if k else ""
                raise CheckpointError(f"{exc}{note}{older}: no intact checkpoint to resume from") from None
            _logger.warning("%s%s; resuming from an older checkpoint", exc, note)
            continue
        _apply_state(state, model, optimizer, scheduler, info or DistInfo())
        return path, state
    raise AssertionError("unreachable")


def restore_state(path: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Load a `training_state` file into model / optimizer / scheduler and the RNGs; returns the whole state."""
    state = read_state(path)
    _apply_state(state, model, optimizer, scheduler, DistInfo())
    return state


def _apply_state(state: dict[str, Any], model: nn.Module, optimizer, scheduler, info: DistInfo) -> None:
    """Model, optimizer moments and step counts, schedule position and RNGs from `state`; the schedule's shape (peak
    lr, warm-up, total steps) stays the one `optimizer` / `scheduler` were built with from the resumed config:
    `load_state_dict` would bring back the checkpoint's `t_total`, and a run resumed to more epochs would train at
    lr 0 after the old end (a changed lr or warm-up is refused before this, `resume_config`)."""
    model.load_state_dict(state["model"])
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    if isinstance(optimizer, BertAdam):  # its schedule lives in the param groups
        for group, built in zip(optimizer.param_groups, fresh):
            group.update({k: built[k] for k in ("lr", "warmup", "t_total")})
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])  # the position; the lr lambdas stay the fresh ones
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # the next update's lr, on the fresh schedule
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
    restore_rngs(state, info)


def restore_rngs(state: dict[str, Any], info: DistInfo) -> None:
    """This process's RNG states from a checkpoint: its rank's own (`rank_rng`) when the checkpoint was written by
    as many processes, else the saving process's (a one-process checkpoint, or one of an older lxm; then every rank
    starts from rank 0's stream, as before, and the dropout masks differ from an uninterrupted run's)."""
    ranks = state.get("rank_rng")
    if ranks is not None and len(ranks) == info.world_size:
        mine = ranks[info.rank]
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
        return
    if info.world_size > 1:
        _logger.warning("the checkpoint holds the RNG states of %s, not of these %d: every rank continues from rank "
                        "0's (dropout masks differ from an uninterrupted run's)",
                        f"{len(ranks)} processes" if ranks else "one process", info.world_size)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


class PendingSteps:
    """The values of the optimizer steps since they were last read (`train_step`'s 0-d device tensors), read back
    together at a log step, before a checkpoint, at a stop and at an epoch's end: one host synchronisation and, under
    DDP, one all-reduce for all of them (on the training device: nccl takes device tensors only), instead of one of
    each per step, which on a GPU cost more than a small step. Every read step is checked by the non-finite guard
    (`RunLogger.check_finite`), in order, so the first bad step is the one named, with its batch; a run with a bad
    step stops at the next read, before anything of it is checkpointed. The values read are the global batch's:
    the mean over processes of each one's share.

    Every rank must call `settle` at the same steps (the trainers read at step counts and at the all-reduced stop).
    """

    def __init__(self, logger: RunLogger, info: DistInfo):
        self.logger, self.info = logger, info
        self.pending: list[tuple[int, dict[str, torch.Tensor], dict[str, list]]] = []

    def add(self, step: int, values: dict[str, torch.Tensor], **batch: list) -> None:
        """Step `step`'s values (counted from 0, before its increment) and its batch's ids (e.g. uids=[...])."""
        self.pending.append((step, values, batch))

    def settle(self) -> dict[str, float] | None:
        """Read, reduce and check the pending steps; the last one's values (None when nothing was pending)."""
        if not self.pending:
            return None
        names = sorted(self.pending[0][1])
        table = torch.stack([torch.stack([values[k] for k in names]) for _, values, _ in self.pending])
        if self.info.world_size > 1:
            dist.all_reduce(table)
        rows = table.tolist()  # the one host read
        last = None
        for (step, _, batch), row in zip(self.pending, rows):
            last = {k: v / self.info.world_size for k, v in zip(names, row)}  # / 1 is exact
            self.logger.check_finite(last, step, **batch)
        self.pending.clear()
        return last


def report_resume_changes(changes: dict[str, tuple[Any, Any]], total_steps: int, step: int, epoch: int,
                          log: Callable[[str], None], logger: RunLogger) -> None:
    """Say which keys a resume changed (`lxm.train.config.RESUMABLE_KEYS`: key -> (run's value, new value)) and
    record them in log.jsonl, so the run's history shows where its schedule was stretched."""
    if not changes:
        return
    shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
    log(f"resumed with {shown}: the learning-rate schedule now spans {total_steps} steps (recorded in config.yaml)")
    logger.log({"step": step, "epoch": epoch, "resume_changes": {k: list(v) for k, v in changes.items()}})


def _strict(value: Any) -> Any:
    """`value` with every non-finite float as a string ("nan", "inf", "-inf"): log lines stay strict JSON (json.dumps
    would write bare NaN, which jq and JSON.parse refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(_strict(record), allow_nan=False) + "\n")


def rewind_logs(out: Path, step: int, epoch: int) -> None:
    """Cut OUT/log.jsonl and OUT/metrics.jsonl back to a checkpoint taken after `step` steps and `epoch` finished
    epochs, so that the steps a resumed run redoes are logged once. Each file is rewritten atomically.

    Kept: step records up to `step`, validation / metrics records of epochs before `epoch` (the validation of the
    checkpoint's own epoch is redone when the checkpoint predates it), error records of steps before `step`.
    A last line cut by a crash is dropped; any other unreadable line (not JSON, not UTF-8) is kept as it was, with a
    warning: a damaged log never stops a resume.
    """
    for name, keep in (("log.jsonl", lambda r: _log_record_kept(r, step, epoch)),
                       ("metrics.jsonl", lambda r: r.get("epoch", -1) < epoch)):
        path = out / name
        if not path.exists():
            continue
        lines = list(scan_json_lines(path, skip_blank=False))  # kept byte for byte, blank lines included
        kept = []
        bad = []
        for n, line, record, problem in lines:
            if problem is not None:
                if n < len(lines):
                    kept.append(line)
                    bad.append(n)
                continue
            if not isinstance(record, dict) or keep(record):
                kept.append(line)
        if bad:
            _logger.warning("%s: line(s) %s are not JSON records (damaged?); kept as they are and skipped", path,
                            ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""))
        if len(kept) != len(lines):
            atomic.write_bytes(path, b"".join(line + b"\n" for line in kept))
            _logger.info("%s: %d record(s) after step %d dropped (the resumed run redoes them)", path,
                         len(lines) - len(kept), step)


def _log_record_kept(record: dict[str, Any], step: int, epoch: int) -> bool:
    if "valid" in record:
        return record.get("epoch", -1) < epoch
    return record.get("step", 0) <= step  # an error record carries the number of the step that failed


# ---------------------------------------------------------------------------------------------------- set-up


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel when several processes run, else `model` itself."""
    if info.world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda"
                                                     else None)


def training_modules(model: nn.Module, runtime: RuntimeConfig, info: DistInfo, device: torch.device
                     ) -> tuple[Bf16Replica | None, nn.Module]:
    """(bf16 replica or None, the module the training steps call) for `model` (fp32, on `device`) under `runtime`
    (cpu_kernels, precision, compile): the CPU-kernel setting on the model (`model.set_cpu_kernels`; the replica,
    a copy, inherits it), DDP around the module that computes (the replica under precision "bf16"), then compile.

    Under DDP with a replica, rank 0's master weights are broadcast first: DDP's own start-up broadcast then
    covers only the replica, and every rank's master must start equal too.
    """
    model.set_cpu_kernels(runtime.cpu_kernels)
    replica = None
    if runtime.precision == "bf16":
        if info.world_size > 1:
            with torch.no_grad():
                for tensor in model.state_dict().values():
                    dist.broadcast(tensor, 0)
        replica = Bf16Replica(model)
    return replica, compiled(wrap_ddp(replica.module if replica else model, info, device), runtime.compile)


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


def build_optimizer(model: nn.Module, optim: OptimConfig, steps_per_epoch: int):
    """(optimizer, scheduler) of `optim` (optimizer, lr, warmup, weight_decay, fused_optimizer), the schedule over
    all epochs."""
    return make_optimizer(model, optim.optimizer, optim.lr, steps_per_epoch * optim.epochs, optim.warmup,
                          optim.weight_decay, fused=optim.fused_optimizer)


def current_lr(optimizer, scheduler) -> float:
    return optimizer.param_groups[0]["lr"] if scheduler else optimizer.current_lr()[0]


# ---------------------------------------------------------------------------------------------------- checkpoints


class DiskFullError(LxmError, OSError):
    """A checkpoint could not be written for want of space; the message names the file."""


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save, atomically and synced to disk before the rename: a checkpoint is either complete or absent, also
    after a power loss (without the fsync the renamed file can come back truncated). Its sha256 goes to the sidecar
    NAME.sha256 (`lxm.integrity`), checked on resume. The old sidecar of a replaced file (last.pt, best.pt) is
    removed before the rename, so that a crash between rename and new sidecar leaves an unchecked file, never a
    false mismatch. A full disk is a DiskFullError naming the file (torch's own error names no file)."""
    try:
        with checksummed_path(path, fsync=True) as tmp:
            with open(tmp, "wb") as f:  # a Python file: a failed write raises OSError(ENOSPC), not torch's "pos" error
                torch.save(state, f)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path}: disk full while writing the checkpoint; free space on its file system, "
                                f"then continue with --resume") from None
        raise


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint and its checksum sidecar (pruning old checkpoints)."""
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint (e.g. epoch-N.pt -> best.pt) atomically, with its checksum sidecar."""
    with checksummed_path(dst) as tmp:  # a killed copy leaves no half file
        shutil.copyfile(src, tmp)


def step_checkpoints(out: Path) -> list[Path]:
    """OUT/checkpoints/step-N.pt, newest (largest N) first (other files there, `step-old.pt`, are not checkpoints)."""
    steps = [(int(m.group(1)), p) for p in (out / CKPT_DIR).glob("step-*.pt") if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(steps, reverse=True)]


def latest_checkpoint(out: Path) -> Path | None:
    steps = step_checkpoints(out)
    return steps[0] if steps else None


# ---------------------------------------------------------------------------------------------------- logs


class RunStopped(LxmError):
    """Training stopped on SIGINT / SIGTERM after a checkpoint; the message says where and how to resume.
    `exit_code` is the shell's convention for the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While active (a context manager), SIGINT and SIGTERM ask the training loop to stop after the step in
    progress (`requested`) instead of killing it mid-step: the loop then writes a checkpoint and raises RunStopped.
    A second SIGINT interrupts at once (KeyboardInterrupt). Under torchrun every process stops at the same step:
    the request is combined across processes (a scheduler's SIGTERM may reach them at different times) every
    `every` steps (`stop_check_due`; the loops pass their log interval, where values are read and the device waits
    anyway), not at each step, where the all-reduce and its read would stall a GPU step of a few ms.
    Signal handlers can be set only in the main thread; elsewhere the signals keep their handlers."""

    def __init__(self, info: DistInfo, device: torch.device, every: int = 1):
        self.info, self.device, self.every = info, device, every
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, step: int | None = None) -> int | None:
        """The signal number that asks to stop (any process's, under torchrun), or None. `step`: the step just
        done; None combines the processes' requests now (every process must make the same calls)."""
        if self.info.world_size == 1:
            return self.signum
        if not stop_check_due(step, self.every, self.info.world_size):
            return None
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def stop_check_due(step: int | None, every: int, world_size: int) -> bool:
    """Whether a stop request is looked at after `step` (None: at a point every process reaches, e.g. an epoch's
    end): always in one process (a flag, no cost), every `every` steps under torchrun (a collective and a sync)."""
    return world_size == 1 or step is None or step % every == 0


def stop_message(signum: int, where: str, checkpoint: Path, resume: str) -> str:
    return (f"stopped by {signal.Signals(signum).name} {where}; state saved in {checkpoint}; continue with: "
            f"{resume}")


class NonFiniteLossError(LxmError, FloatingPointError):
    """The loss of a training step is NaN or infinite; the message names the step and where its batch is logged."""


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
        """The non-finite-loss guard: log the step's values and the batch (e.g. uids=[...]) and stop the run with a
        NonFiniteLossError naming the step (counted from 1, as the step records) and where the batch is logged."""
        if np.isfinite(values["loss"]):
            return
        self.log({"step": step + 1, "error": "non-finite loss", "losses": values, **batch})
        bad = ", ".join(f"{k} {v}" for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
        ids = [str(i) for ids in batch.values() for i in ids]
        shown = " ".join(ids[:5]) + (f" ... ({len(ids)} in all)" if len(ids) > 5 else "")
        raise NonFiniteLossError(f"non-finite loss at step {step + 1} ({bad}); its batch ({shown}) is logged in "
                                 f"{self.path}; resume from the last checkpoint with a lower lr, or check those "
                                 f"examples")

    def _tensorboard(self):
        if self._tb is False:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # after a resume, events of the steps about to be redone are dropped from the event files
                self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self._purge_step)
            except ImportError:
                self._tb = None
        return self._tb
