"""`lxm pretrain` under torchrun: the DDP step of the real trainer (issue 30 item 6), run by `benchmarks/gpu.sh`
when more than one GPU is visible (nccl) and in its `--smoke` run on CPU (2 gloo processes).

Each process builds the same synthetic world as `pretrain_throughput.py` (same seed, its own temporary folder),
then runs `Pretrainer.run` (what `lxm pretrain` runs: the process group of `lxm.train.run`, nccl on CUDA with
`cuda:LOCAL_RANK`, gradients all-reduced by DDP, logged values reduced on the device at log steps). Rank 0 times
the run from its first log record to its last and writes the global rate (samples/s over all processes, the
per-process batch being `--batch / WORLD_SIZE`), the backend the group used and each rank's device.

    torchrun --nproc_per_node 2 benchmarks/ddp_step.py --device cuda --model base --precision bf16 --steps 60
    torchrun --nproc_per_node 2 benchmarks/ddp_step.py --smoke    # CPU, gloo, tiny model: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inputs  # noqa: E402  (benchmarks/inputs.py: the shared files or their stand-ins)
from pretrain_throughput import WORDS, make_world, model_config  # noqa: E402
from lxm.train.config import load_config  # noqa: E402
from lxm.train.pretrain import Pretrainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (each process takes cuda:LOCAL_RANK)")
    ap.add_argument("--model", default="base", help="model preset (base, small, tiny)")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--batch", type=int, default=64, help="global batch (split across the processes)")
    ap.add_argument("--steps", type=int, default=60, help="trainer steps (timed between log records)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, small world, few steps, fp32")
    ap.add_argument("--json", help="rank 0 writes the figures to this JSON file")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.smoke:
        args.model, args.steps, args.precision, args.batch = "tiny", 20, "fp32", 8
    images, sentences, feature_dim = (100, 600, 16) if args.smoke else (2000, 20000, 2048)
    stamps: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = model_config(args.model, feature_dim)
        make_world(root, images, sentences, feature_dim, (cfg.num_object_labels, cfg.num_attr_labels))
        run_cfg = load_config("base", [f"corpus={root / 'corpus'}", f"features=[{root / 'feats'}]",
                                       f"vocab={inputs.vocab(root, WORDS)}", f"model={args.model}",
                                       f"batch_size={args.batch}", f"max_steps={args.steps}", "log_every=10",
                                       f"checkpoint_every={args.steps}", "keep_last=1", "valid_split=null",
                                       "train_splits=[train]", f"precision={args.precision}",
                                       f"device={args.device}", "epochs=1"])
        trainer = Pretrainer(run_cfg, root / "run", log=lambda _m: None,
                             on_record=lambda r: stamps.append((time.perf_counter(), r["step"])) if "loss" in r
                             else None)
        # the process group exists once the trainer is built (`lxm.train.run.start_process`)
        backend = dist.get_backend() if dist.is_initialized() else None
        devices = [str(trainer.device)] * world
        if dist.is_initialized():
            dist.all_gather_object(devices, str(trainer.device))
        trainer.run()
    if int(os.environ.get("RANK", 0)) != 0:
        return
    (t0, s0), (t1, s1) = stamps[0], stamps[-1]
    rate = (s1 - s0) * args.batch / (t1 - t0)
    print(f"DDP {world} process(es), {backend}, devices {devices}: {args.model} {args.precision}, global batch "
          f"{args.batch}: {rate:.1f} samples/s ({rate / world:.1f} per process)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"world_size": world, "backend": backend, "devices": devices,
                                               "model": args.model, "precision": args.precision,
                                               "batch": args.batch, "samples_per_s": rate,
                                               "device_name": torch.cuda.get_device_name(0)
                                               if torch.cuda.is_available() else None}, indent=2) + "\n")


if __name__ == "__main__":
    main()
