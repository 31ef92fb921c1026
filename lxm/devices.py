"""One rule for `--device` / config `device` in every command (extract, pretrain, finetune, predict, ask, gallery).

- "auto": this process's GPU (`cuda:LOCAL_RANK`) when CUDA is available, else the CPU;
- "cpu";
- "cuda" / "cuda:N": that GPU; an error when CUDA is not available or N is not a GPU of this machine;
- anything else: an error naming the value and the accepted forms.

Nothing falls back to the CPU silently: a user who asked for a GPU and got hours of CPU work learns it only at the end.
"""

from __future__ import annotations

import os
import re

import torch

from lxm.errors import ConfigError

DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(spec: str | None, *, local_rank: int | None = None, what: str = "--device") -> torch.device:
    """The torch device `spec` names (see the module docstring); `local_rank` (default: $LOCAL_RANK, else 0) is the
    GPU that "auto" and a bare "cuda" take in a torchrun process. `what` names the option in the error."""
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return device_for(spec, gpus=gpus, local_rank=rank, what=what)


def device_for(spec: str | None, *, gpus: int, local_rank: int, what: str = "--device") -> torch.device:
    """`resolve_device`'s decision from its inputs: the device `spec` names on a machine with `gpus` visible GPUs for
    the process of torchrun's `local_rank` (one GPU per process: "auto" and "cuda" are `cuda:LOCAL_RANK`, never
    every process on GPU 0)."""
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        return torch.device("cuda", local_rank) if gpus else torch.device("cpu")
    m = _CUDA.match(text)
    if m is None:
        raise ConfigError(f"{what} {spec!r}: not a device ({DEVICE_FORMS})")
    if not gpus:
        raise ConfigError(f"{what} {spec}: CUDA is not available on this machine (use --device cpu or auto)")
    index = int(m.group(1)) if m.group(1) is not None else local_rank
    if index >= gpus:
        raise ConfigError(f"{what} {spec}: this machine has {gpus} GPU(s) (cuda:0..cuda:{gpus - 1})")
    return torch.device("cuda", index)
