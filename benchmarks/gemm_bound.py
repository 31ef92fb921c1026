"""How far a training step's MFU can go on this machine when only its matrix products took time: lxm's own products,
recorded in one step, each timed where it runs and replayed alone, against the peak GEMM rate (model_step.py's).

One lxm pretraining step (`--precision bf16`: the bf16 copy with fp32 masters, model_step.py's "lxm bf16" row; or
fp32) runs under a dispatch mode that times every matrix product (aten mm / addmm / bmm) and notes its operands'
shapes and strides. Each distinct product is then replayed alone on fresh tensors of the same shapes and strides
(2 warm-up calls, median of 5): the rate the GEMM library gives that shape and layout with warm caches and nothing
in between. The step itself is timed without the dispatch mode (median of `--steps`).

`mfu_bound` = the step's model FLOPs (`lxm.model.flops`, as model_step.py counts them) / the products' summed
alone time / the peak: the MFU of a step whose every other op took no time and whose products each ran at their
own alone rate. Where it is below a target, no fusion of the element-wise work reaches that target with this GEMM
library. `--scan` adds the hidden x hidden projection's forward rate over row counts, whole and as two row halves
(on the AMX machine oneDNN's rate depends on the row count in steps, not smoothly; see benchmarks/README.md).

    python benchmarks/gemm_bound.py                                  # base batch 32, bf16, 2 threads
    python benchmarks/gemm_bound.py --keep-freed-memory --scan       # what `lxm pretrain` does on CPU; + the scan

The LAST line is `mfu_step=<x.xx> mfu_bound=<y.yy> gemm_in_place_s=<a.aaa> gemm_alone_s=<b.bbb> step_s=<c.ccc>`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import BATCH, add_step_arguments, PRESET, build, peak_rates, step_flops  # noqa: E402

from lxm.memory import keep_freed_memory  # noqa: E402

PRODUCTS = ("mm", "addmm", "bmm")


def product_flops(op: str, shapes: list[tuple[int, ...]]) -> int:
    """2·M·K·N of one call from its operands' shapes (addmm: the bias first)."""
    if op == "mm":
        (m, k), (_, n) = shapes
        return 2 * m * k * n
    if op == "addmm":
        (m, k), (_, n) = shapes[1], shapes[2]
        return 2 * m * k * n
    (b, m, k), (_, _, n) = shapes
    return 2 * b * m * k * n


class RecordProducts(TorchDispatchMode):
    """Times each matrix product where it runs; keys: (op, ((shape, stride, dtype), ...))."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, list[float]] = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        if op not in PRODUCTS:
            return func(*args, **(kwargs or {}))
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t0
        key = (op, tuple((tuple(a.shape), tuple(a.stride()), a.dtype) for a in args if isinstance(a, torch.Tensor)))
        self.calls[key].append(dt)
        return out


def strided_random(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A random tensor with exactly this shape and stride (over a storage just large enough)."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    return torch.randn(size, dtype=torch.float32).to(dtype).as_strided(shape, stride)


def median_time(fn, reps: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row_scan(hidden: int, rows: list[int], dtype: torch.dtype) -> list[dict]:
    """GFLOP/s of x[rows, H] @ W[H, H]^T, whole and as two row halves (rounded up to 32) written into one output."""
    w = torch.randn(hidden, hidden, dtype=dtype)
    out = []
    for m in rows:
        x, y = torch.randn(m, hidden, dtype=dtype), torch.empty(m, hidden, dtype=dtype)
        half = min(m, math.ceil(m / 2 / 32) * 32)
        flops = 2 * m * hidden * hidden

        def halves():
            for s in range(0, m, half):
                torch.mm(x[s:s + half], w.t(), out=y[s:s + half])

        out.append({"rows": m, "whole_gflops": flops / median_time(lambda: torch.mm(x, w.t(), out=y)) / 1e9,
                    "halves_gflops": flops / median_time(halves) / 1e9})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap)
    ap.add_argument("--steps", type=int, default=5, help="timed steps without the dispatch mode (after 3 warm-up)")
    ap.add_argument("--keep-freed-memory", action="store_true", help="lxm.memory.keep_freed_memory first")
    ap.add_argument("--scan", action="store_true", help="also the projection's rate over row counts")
    ap.add_argument("--scan-rows", default="256:2432:128", help="start:stop:step of the scan's row counts")
    ap.add_argument("--top", type=int, default=10, help="products listed, by in-place time")
    ap.add_argument("--json", help="also write every figure to this JSON file")
    args = ap.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    batch = args.batch or BATCH[args.config]
    model, step, _ = build(args.config, "lxm", batch, replica=args.precision == "bf16")
    flops = step_flops(args.config, batch)
    peak = peak_rates(args.config, batch, args.precision, "cpu")["peak_gflops"] * 1e9

    def one_step():
        model.zero_grad(set_to_none=True)
        step()

    for _ in range(3):
        one_step()
    step_s = median_time(one_step, reps=args.steps, warmup=0)
    recorder = RecordProducts()
    for _ in range(2):  # two recorded steps; each product's in-place time is its median over both
        with recorder:
            one_step()
    products = []
    for (op, operands), times in recorder.calls.items():
        calls = len(times) // 2
        shapes = [shape for shape, _, _ in operands]
        fl = product_flops(op, shapes)
        tensors = [strided_random(*operand) for operand in operands]
        fn = getattr(torch, op)
        alone = median_time(lambda: fn(*tensors))
        in_place = statistics.median(times)
        products.append({"op": op, "operands": [[list(s), list(st)] for s, st, _ in operands], "calls": calls,
                         "gflop": fl * calls / 1e9, "in_place_s": in_place * calls, "alone_s": alone * calls,
                         "in_place_gflops": fl / in_place / 1e9, "alone_gflops": fl / alone / 1e9})
    products.sort(key=lambda p: -p["in_place_s"])
    gemm_flops = sum(p["gflop"] for p in products) * 1e9
    in_place_s = sum(p["in_place_s"] for p in products)
    alone_s = sum(p["alone_s"] for p in products)
    mfu_step, mfu_bound = flops / step_s / peak, flops / alone_s / peak
    print(f"# torch {torch.__version__}, {args.threads} threads, {args.config} batch {batch}, lxm {args.precision}, "
          f"glibc malloc {'keeps freed memory' if args.keep_freed_memory else 'as it is'}")
    print(f"step {step_s * 1000:.1f} ms (median of {args.steps}); model FLOPs {flops / 1e12:.3f} TFLOP; peak GEMM "
          f"{peak / 1e9:.0f} GFLOP/s -> MFU {mfu_step:.2f}")
    print(f"matrix products: {len(products)} distinct, {gemm_flops / 1e12:.3f} TFLOP; in place {in_place_s:.3f} s "
          f"({gemm_flops / in_place_s / 1e9:.0f} GFLOP/s, {in_place_s / step_s:.0%} of the step); each alone "
          f"{alone_s:.3f} s ({gemm_flops / alone_s / 1e9:.0f} GFLOP/s); at the peak {gemm_flops / peak:.3f} s")
    print(f"MFU bound (every other op free, each product at its alone rate): {mfu_bound:.2f}; "
          f"MFU 0.5 needs a {flops / peak / 0.5 * 1000:.0f} ms step")
    for p in products[:args.top]:
        operands = " x ".join(f"{tuple(s)}/{tuple(st)}" for s, st in p["operands"])
        print(f"  {p['in_place_s'] * 1000:7.1f} ms  {p['calls']:3d} calls  in place {p['in_place_gflops']:5.0f}  "
              f"alone {p['alone_gflops']:5.0f} GFLOP/s  {p['op']} {operands}")
    scan = []
    if args.scan:
        start, stop, stride = (int(x) for x in args.scan_rows.split(":"))
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        scan = row_scan(PRESET[args.config]().hidden_size, list(range(start, stop, stride)), dtype)
        print(f"x[rows, {PRESET[args.config]().hidden_size}] @ W^T, GFLOP/s whole / as two row halves:")
        print("  " + "  ".join(f"{r['rows']}: {r['whole_gflops']:.0f}/{r['halves_gflops']:.0f}" for r in scan))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": args.config, "batch": batch, "precision": args.precision, "threads": args.threads,
            "keep_freed_memory": args.keep_freed_memory, "step_s": step_s, "model_tflop": flops / 1e12,
            "peak_gflops": peak / 1e9, "mfu_step": mfu_step, "mfu_bound": mfu_bound, "gemm_tflop": gemm_flops / 1e12,
            "gemm_in_place_s": in_place_s, "gemm_alone_s": alone_s, "products": products, "row_scan": scan},
            indent=2) + "\n")
    print(f"mfu_step={mfu_step:.2f} mfu_bound={mfu_bound:.2f} gemm_in_place_s={in_place_s:.3f} "
          f"gemm_alone_s={alone_s:.3f} step_s={step_s:.3f}")


if __name__ == "__main__":
    main()
