"""Feature extraction throughput of the torch engine: the 10 fixture images, batch 1 vs 4, on this machine.

Runs `lxm.extract.pipeline.extract` (real BUTD ResNet-101 architecture, seeded random weights: the cost is the
same as with the released weights) in a fresh child process per setting; reports images/s and peak RSS.

    python benchmarks/extract_throughput.py                     # CPU, 2 threads, batch 1 and 4
    python benchmarks/extract_throughput.py --device cuda --batch-sizes 1,4,8 [--bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGES = Path(os.environ.get("LXM_SHARED") or ROOT.parent / "shared") / "fixtures" / "butd-coco-sample" / "images"


def child(batch: int, device: str, bf16: bool, threads: int) -> None:
    import torch

    from lxm.extract.pipeline import ExtractConfig, extract

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = extract(ExtractConfig(images=str(IMAGES), out=out, weights="random", batch_size=batch,
                                        device=device, bf16=bf16, engine="torch"))
        dt = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    print(json.dumps({"images": summary["extracted"], "seconds": dt, "peak_rss_mb": peak, "gpu_mb": gpu}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.device, args.bf16, args.threads)
        return
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        cmd = [sys.executable, __file__, "--child", str(bs), "--device", args.device, "--threads", str(args.threads)]
        res = json.loads(subprocess.run(cmd + (["--bf16"] if args.bf16 else []), capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
        print(f"batch {bs}: {res['images']} images in {res['seconds']:.1f} s = {res['images'] / res['seconds']:.3f} "
              f"img/s ({args.device}{', bf16' if args.bf16 else ''}, {args.threads} threads); peak RSS "
              f"{res['peak_rss_mb']:.0f} MB" + (f", GPU {res['gpu_mb']:.0f} MB" if res["gpu_mb"] else ""), flush=True)


if __name__ == "__main__":
    main()
