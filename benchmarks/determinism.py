"""Is one pretraining step bit-reproducible? Same seed, same machine, same thread count: two fresh processes must
compute bit-identical losses and gradients (issue 28, item 4).

Each child process builds `LxmertForPreTraining` from a seed (`--config`, default base), draws model_step.py's
synthetic pretraining batch from the same seed (sentence lengths 8-20 padded to 20, 36 boxes, 15 % word masking,
15 % box masking, matched/QA labels), and runs one training step's forward + backward in train mode (dropout on)
through `lxm.model.losses.pretraining_step_losses`, in one precision:

- fp32: the model itself;
- bf16: as `--set precision=bf16` trains: the forward and backward run on `lxm.train.precision.Bf16Replica`'s bf16
  copy and its gradients are added into the fp32 master gradients (`accumulate_grads`).

It prints the sha256 of every loss and every (master) gradient, and one digest over all of them. The parent runs
each precision in TWO such children, one after the other, with the same `torch.set_num_threads` (given explicitly)
and the same environment, and compares the digests. A product whose method depended on a timing, a thread race or
the allocator's history would show as a difference here, at a size where every former special case engages (the
default base batch 32 has 32 x 36 = 1152 box rows).

`--cpu-kernels on|off` sets `LXM_CPU_KERNELS=1|0` in the children's environment (the switch between lxm's CPU
kernels and the plain PyTorch path, `lxm.model.cpu_kernels`); `default` leaves the environment as it is.

    python benchmarks/determinism.py                                  # base, batch 32, fp32 and bf16
    python benchmarks/determinism.py --cpu-kernels off --threads 2
    python benchmarks/determinism.py --config tiny --batch 8          # seconds

Per precision a line `<precision> identical=true|false ...`; the LAST line is `identical=true|false` (all of them).
The exit status is 0 either way (1 only when a child fails).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import PRESET, make_batch  # noqa: E402

from lxm.model import LxmertForPreTraining, cpu_kernels, pretraining_step_losses  # noqa: E402
from lxm.train.precision import Bf16Replica  # noqa: E402

ENV = cpu_kernels.ENV  # LXM_CPU_KERNELS
PRECISIONS = ("fp32", "bf16")


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def step_digests(config: str, batch: int, seed: int, precision: str, layers: str | None) -> dict:
    """One seeded forward + backward; {"digest": over everything, "tensors": {name: sha256}, "losses": {name:
    value}, "cpu_kernels": whether the model ran lxm's CPU kernels}. Gradients are the fp32 model's (bf16: after the
    copy's gradients were added into them)."""
    overrides = {}
    if layers:
        overrides = dict(zip(("l_layers", "x_layers", "r_layers"), map(int, layers.split(","))))
    cfg = PRESET[config](**overrides)
    torch.manual_seed(seed)
    model = LxmertForPreTraining(cfg).train()
    inputs, labels = make_batch(cfg, batch, seed=seed)
    replica = Bf16Replica(model) if precision == "bf16" else None
    forward = replica.module.train() if replica else model
    torch.manual_seed(seed + 1)  # the dropout draws
    losses, _ = pretraining_step_losses(forward, labels, **inputs)
    sum(losses.values()).backward()
    if replica is not None:
        replica.accumulate_grads()
    named = [(f"loss.{k}", v) for k, v in sorted(losses.items())]
    named += [(f"grad.{n}", p.grad) for n, p in model.named_parameters() if p.grad is not None]
    total = hashlib.sha256()
    tensors = {}
    for name, t in named:
        data = tensor_bytes(t)
        tensors[name] = hashlib.sha256(data).hexdigest()
        total.update(name.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode() + data)
    return {"digest": total.hexdigest(), "tensors": tensors,
            "cpu_kernels": cpu_kernels.active(model.cpu_kernels, inputs["visual_feats"]),
            "losses": {k: float(v.detach()) for k, v in sorted(losses.items())}}


def run_child(args, precision: str) -> dict:
    env = dict(os.environ)
    if args.cpu_kernels != "default":
        env[ENV] = {"on": "1", "off": "0"}[args.cpu_kernels]
    cmd = [sys.executable, __file__, "--child", precision, "--config", args.config, "--batch", str(args.batch),
           "--seed", str(args.seed), "--threads", str(args.threads), *(["--layers", args.layers] if args.layers else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        sys.exit(f"determinism.py: {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="base", choices=sorted(PRESET))
    ap.add_argument("--batch", type=int, default=32, help="default: 32, the base batch")
    ap.add_argument("--layers", help="L,X,R: override the config's language / cross / vision layer counts")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, of fp32 and bf16")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch.set_num_threads in every child (default: this process's count)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-kernels", default="default", choices=("default", "on", "off"),
                    help=f"{ENV}=1 (on) or 0 (off) in the children's environment; default: as it is")
    ap.add_argument("--child", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        res = step_digests(args.config, args.batch, args.seed, args.child, args.layers)
        print(json.dumps({**res, "threads": torch.get_num_threads(), ENV: os.environ.get(ENV)}))
        return
    precisions = args.precisions.split(",")
    if unknown := set(precisions) - set(PRECISIONS):
        ap.error(f"--precisions: unknown {sorted(unknown)} (choose from {', '.join(PRECISIONS)})")
    kernels = {"on": "1", "off": "0"}.get(args.cpu_kernels, os.environ.get(ENV))
    print(f"# torch {torch.__version__}; config {args.config}{' layers ' + args.layers if args.layers else ''}, "
          f"batch {args.batch}, seed {args.seed}, {args.threads} threads in each child; {ENV}="
          f"{kernels if kernels is not None else '(unset: CPU kernels on CPU tensors)'}; two fresh processes per precision",
          flush=True)
    verdicts = []
    for precision in precisions:
        t0 = time.perf_counter()
        first, second = run_child(args, precision), run_child(args, precision)
        same = first["digest"] == second["digest"]
        verdicts.append(same)
        differ = [n for n in first["tensors"] if first["tensors"][n] != second["tensors"].get(n)]
        print(f"{precision} identical={str(same).lower()} digest {first['digest'][:16]} / {second['digest'][:16]}, "
              f"cpu kernels {'on' if first['cpu_kernels'] else 'off'}, "
              f"{len(first['tensors'])} tensors, loss {sum(first['losses'].values()):.6f}, "
              f"{time.perf_counter() - t0:.0f} s" + (f"; differing: {', '.join(differ[:8])}"
                                                   + (f" (+{len(differ) - 8} more)" if len(differ) > 8 else "")
                                                   if not same else ""), flush=True)
    print(f"identical={str(all(verdicts)).lower()}")


if __name__ == "__main__":
    main()
