"""Where a whole training step goes — forward + backward, the bf16 copy's moves, clipping, the optimizer — and the
optimizer eager vs fused (`--set fused_optimizer=true`), side by side in one process.

model_step.py times forward + backward only (the optimizer is the same fp32 work in every mode there); this script
times the rest of what `lxm.train.step.train_step` does in one optimizer step, in its order: forward + backward of
lxm's pretraining losses, the bf16 gradients into the fp32 master gradients (`Bf16Replica.accumulate_grads`; bf16
precision only), `clip_grad_norm_` (1.0, as pretraining), the optimizer step, the master weights back into the bf16
copy (`Bf16Replica.sync`). Steps alternate between optimizers over the same parameters, each with its own state:
BertAdam eager (the original's arithmetic, lxm's default), BertAdam fused (its update compiled,
`lxm.train.optim.compiled_update`), the same reading the bf16 copy's gradients and writing its weights inside the
update (`lxm.train.precision.step_from_bf16`, clipped by `bf16_clip`: what `train_step` does with bf16, one
micro-batch and `fused_optimizer=true`; bf16 only), and for reference torch's AdamW with its default (per-tensor)
and fused CPU kernel. Medians over `--steps` timed steps per optimizer after 2 warm-up steps each (the first
allocates the moments). glibc keeps freed memory, as `lxm pretrain` has it do on CPU (`--malloc-as-is`: not).

    python benchmarks/train_step_parts.py                     # base batch 32, bf16, 2 threads (~2 min)
    python benchmarks/train_step_parts.py --precision fp32 --config small
    python benchmarks/train_step_parts.py --device cuda            # on a GPU (benchmarks/gpu.sh runs it)

The LAST line is `optimizer_eager_ms=<a> optimizer_fused_ms=<b> fused_speedup=<x.xx> step_eager_ms=<c>
step_fused_ms=<d>` (BertAdam; a step = all the parts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import BATCH, add_step_arguments, PRESET, make_batch  # noqa: E402

from lxm.memory import keep_freed_memory  # noqa: E402
from lxm.model import LxmertForPreTraining, PretrainLabels, pretraining_step_losses  # noqa: E402
from lxm.train.optim import BertAdam  # noqa: E402
from lxm.train.precision import Bf16Replica, bf16_clip, step_from_bf16  # noqa: E402

PARTS = ("forward_backward", "grad_copy", "clip", "optimizer", "sync")
MOVES = "BertAdam fused, bf16 moves in the update"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per optimizer (after 2 warm-up steps)")
    ap.add_argument("--malloc-as-is", action="store_true", help="do not apply lxm.memory.keep_freed_memory")
    ap.add_argument("--json", help="also write every figure to this JSON file")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if not args.malloc_as_is and not cuda:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    cfg = PRESET[args.config]()
    batch = args.batch or BATCH[args.config]
    torch.manual_seed(0)
    model = LxmertForPreTraining(cfg).train().to(args.device)
    replica = Bf16Replica(model) if args.precision == "bf16" else None
    forward = replica.module if replica is not None else model
    params = replica.master_params() if replica is not None else [p for p in model.parameters() if p.requires_grad]
    inputs, labels = make_batch(cfg, batch)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    labels = PretrainLabels(**{k: None if v is None else v.to(args.device) for k, v in vars(labels).items()})

    def mark() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
    optimizers = {
        "BertAdam eager": BertAdam(params, lr=1e-4, warmup=0.05, t_total=1000),
        "BertAdam fused": BertAdam(params, lr=1e-4, warmup=0.05, t_total=1000, fused=True),
        "AdamW (torch default)": torch.optim.AdamW(params, lr=1e-4, eps=1e-6),
        "AdamW fused": torch.optim.AdamW(params, lr=1e-4, eps=1e-6, fused=True),
    }
    if replica is not None:  # what train_step does with one micro-batch, bf16 and fused_optimizer=true
        optimizers[MOVES] = BertAdam(params, lr=1e-4, warmup=0.05, t_total=1000, fused=True)
    times: dict[str, dict[str, list[float]]] = {name: {part: [] for part in PARTS} for name in optimizers}
    for i in range(2 + args.steps):
        for name, opt in optimizers.items():
            marks = [mark()]
            losses, _ = pretraining_step_losses(forward, labels, **inputs)
            sum(losses.values()).backward()
            marks.append(mark())
            if name == MOVES:
                marks.append(mark())  # no gradient move: the update reads the bf16 gradients
                _, scale = bf16_clip(replica, 1.0)
                marks.append(mark())
                step_from_bf16(opt, replica, scale)
                marks.append(mark())
                marks.append(mark())  # no weight move: the update wrote the bf16 weights
            else:
                if replica is not None:
                    replica.accumulate_grads()
                marks.append(mark())
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
                marks.append(mark())
                opt.step()
                marks.append(mark())
                if replica is not None:
                    replica.sync()
                marks.append(mark())
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                for part, t0, t1 in zip(PARTS, marks, marks[1:]):
                    times[name][part].append((t1 - t0) * 1000)
    med = {name: {part: statistics.median(ts) for part, ts in parts.items()} for name, parts in times.items()}
    where = torch.cuda.get_device_name() if cuda else f"{args.threads} threads"
    print(f"# torch {torch.__version__}, {where}, {args.config} batch {batch}, lxm {args.precision}, "
          f"{sum(p.numel() for p in params) / 1e6:.1f} M trained parameters, glibc malloc "
          f"{'as it is' if args.malloc_as_is or cuda else 'keeps freed memory'}; medians of {args.steps} steps, ms")
    print(f"{'optimizer':42s}" + "".join(f"{part:>18s}" for part in PARTS) + f"{'step':>10s}{'optimizer share':>17s}")
    for name, parts in med.items():
        total = sum(parts.values())
        print(f"{name:42s}" + "".join(f"{parts[part]:18.1f}" for part in PARTS)
              + f"{total:10.1f}{parts['optimizer'] / total:16.0%}")
    eager, fused = med["BertAdam eager"], med["BertAdam fused"]
    speedup = eager["optimizer"] / fused["optimizer"]
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "batch": batch, "precision": args.precision,
                                               "device": args.device, "threads": args.threads,
                                               "keep_freed_memory": not (args.malloc_as_is or cuda),
                                               "medians_ms": med}, indent=2) + "\n")
    print(f"optimizer_eager_ms={eager['optimizer']:.1f} optimizer_fused_ms={fused['optimizer']:.1f} "
          f"fused_speedup={speedup:.2f} step_eager_ms={sum(eager.values()):.1f} "
          f"step_fused_ms={sum(fused.values()):.1f}")


if __name__ == "__main__":
    main()
