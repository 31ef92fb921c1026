"""One full LXMERT pretraining step (forward + backward, all five losses), lxm vs transformers, side by side, and
how close each comes to the machine's own matrix-product limit (MFU).

Both models get the identical config, weights and inputs (15 % word masking, 15 % box masking, matched/QA labels,
train mode so dropout runs). Each measurement runs in a fresh child process (so one implementation's allocator
history cannot slow the other), and the children alternate transformers, lxm, transformers, lxm, ... (every other
round in reverse order, so that a drift within a round hits both alike); the figures are medians over all timed
steps. The "paired" speedup is the median over rounds of each round's own ratio (best transformers mode / best lxm
mode, both measured minutes apart), which cancels this VM's slow speed drifts between rounds.
`--keep-freed-memory` tells glibc in every child, both implementations', to keep freed memory for reuse
(`lxm.memory.keep_freed_memory`: what the `lxm` commands do on CPU); by default malloc is left as it is. Peak memory:
peak RSS during the steps minus RSS before them, per child.

Every lxm mode runs twice: with lxm's CPU kernels ("cpu kernels on": `lxm.model.cpu_kernels`, the cheaper dropout
draw and the written-out attention with dropout) and without them ("plain": torch.nn modules and
`F.scaled_dot_product_attention`), each selected the way users select it, by `LXM_CPU_KERNELS=1` / `=0` in the
child's environment (the child checks that its model resolved the setting asked for). With the variable unset (and
config `cpu_kernels` null), lxm runs the CPU kernels on CPU tensors and the plain path elsewhere.

Modes: each implementation in fp32 and in bf16 autocast (lxm: `--set precision=bf16-autocast`), and lxm's
`--set precision=bf16`: a bf16 copy of the model computes, the fp32 master weights are what the optimizer updates
(`lxm.train.precision.Bf16Replica`). Its timed step includes what that mode adds to a step: the bf16 gradients
copied into the fp32 master gradients and the master weights copied back into the bf16 copy (the optimizer update
itself, the same fp32 work in every mode, is in no row). lxm's "bf16+fused-optimizer" is that mode as `train_step`
runs it with one micro-batch and `--set fused_optimizer=true`: the fused BertAdam itself reads the bf16 gradients and
writes the bf16 weights (`lxm.train.precision.step_from_bf16`), so the step is forward + backward, plus what the
update then costs beyond the same fused update on fp32 gradients (measured in the same child after the timed steps,
added to each; never below 0). The bf16 modes run only where the machine computes bf16 products fast (`--bf16
auto`, the default, decides by capability, never by timing: on CUDA always; on a CPU only when /proc/cpuinfo lists
avx512_bf16 or amx_bf16: an AVX2-only CPU runs bf16 products at about half its fp32 rate, so fp32 is its best mode);
`--bf16 on|off` forces. The header names the CPU and the choice. `--compile` adds lxm under torch.compile (`--set
compile=true`) in fp32 and bf16, on the device's default path (CPU kernels on CPU, plain on CUDA). Batches: small 64
and base 32 (`--quick`: the old 8 and 4).

MFU = the step's model FLOPs (`lxm.model.flops.pretraining_step_flops`: the matrix products the five losses need,
from the config and this batch's real token / box / masked counts; printed) / step time / the machine's peak matrix
product rate in the mode's precision, measured in this run (a child process, same threads) at the model's own GEMM
shapes — the best rate over them, in the three layouts a training step uses (forward, and the two gradients).

    python benchmarks/model_step.py                 # small 64 and base 32, fp32 (+ bf16 where fast), 2 threads
    python benchmarks/model_step.py --quick --configs small --rounds 1 --bf16 off

The LAST line is `best_speedup_base=<x.xx> mfu_base=<y.yy> speedup_small=<a.aa> speedup_base=<b.bb>
plain_fp32_speedup_base=<c.cc>`: the best lxm mode vs the best transformers mode at base, lxm's best mode's MFU at
base, transformers time / lxm time in fp32 on the device's default path (CPU kernels on CPU, plain on CUDA), and
transformers fp32 time / lxm plain fp32 time at base.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lxm.model import (LxmertConfig, LxmertForPreTraining, PretrainLabels, lxmert_base, lxmert_small,  # noqa: E402
                       lxmert_tiny)
from lxm.model.cpu_kernels import ENV  # noqa: E402  # LXM_CPU_KERNELS: "1" / "0" force lxm's CPU kernels on / off
from lxm.model.losses import pretraining_step_losses  # noqa: E402
from lxm.model.flops import pretraining_step_flops  # noqa: E402
from lxm.model.weights import load_into  # noqa: E402
from lxm.train.precision import Bf16Replica  # noqa: E402
from lxm.memory import keep_freed_memory  # noqa: E402

FUSED = "bf16+fused-optimizer"  # lxm bf16 with fused_optimizer=true: the bf16 moves inside the update
BATCH = {"small": 64, "base": 32, "tiny": 8}  # realistic batches (the paper: 256 over 4 GPUs, 64 a GPU); tiny: smoke
QUICK_BATCH = {"small": 8, "base": 4, "tiny": 8}
PRESET = {"small": lxmert_small, "base": lxmert_base, "tiny": lxmert_tiny}
SEQ, BOXES = 20, 36


def hf_config(cfg: LxmertConfig):
    import transformers

    return transformers.LxmertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, l_layers=cfg.l_layers, x_layers=cfg.x_layers, r_layers=cfg.r_layers,
        visual_feat_dim=cfg.visual_feat_dim, num_object_labels=cfg.num_object_labels,
        max_position_embeddings=cfg.max_position_embeddings,
        num_attr_labels=cfg.num_attr_labels, num_qa_labels=cfg.num_qa_labels,
        visual_loss_normalizer=1 / 0.15,  # the original constant, so both compute the same loss
    )


def build(name: str, which: str, batch: int, compiled: bool = False, device: str = "cpu", replica: bool = False,
          moves_in_optimizer: bool = False):
    """Return (model, step_fn, extra_fn) for `which` in {"lxm", "hf"}; both share seed-0 transformers weights.
    `replica`: lxm's precision "bf16" (a bf16 copy computes; its gradients go to the fp32 model, whose weights come
    back). `moves_in_optimizer`: with it, the step is forward + backward only, as `train_step` runs it with one
    micro-batch and `fused_optimizer=true` (the fused BertAdam reads the bf16 gradients and writes the bf16
    weights); `extra_fn()` then measures what that costs the update beyond the same fused update reading fp32
    gradients (ms, to be added to each step), else it is None."""
    import dataclasses

    import transformers

    cfg = PRESET[name]()
    torch.manual_seed(0)
    hf = transformers.LxmertForPreTraining(hf_config(cfg)).train()
    inputs, labels = make_batch(cfg, batch)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    labels = PretrainLabels(**{f.name: None if getattr(labels, f.name) is None else getattr(labels, f.name).to(device)
                               for f in dataclasses.fields(labels)})
    if which == "hf":
        hf_labels = {
            "labels": labels.mlm_labels.masked_fill(labels.mlm_labels == -1, -100),
            "obj_labels": {"obj": (labels.obj_labels, labels.obj_conf), "attr": (labels.attr_labels, labels.attr_conf),
                           "feat": (labels.feat_target, labels.feat_mask)},
            "matched_label": labels.matched,
            "ans": labels.answers.masked_fill(labels.answers == -1, -100),
        }

        def hf_step():
            out = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     token_type_ids=inputs["token_type_ids"], visual_feats=inputs["visual_feats"],
                     visual_pos=inputs["visual_boxes"], **hf_labels)
            out.loss.backward()
            return out.loss.detach()

        return hf.to(device), hf_step, None
    model = LxmertForPreTraining(cfg).train()
    load_into(model, hf.state_dict(), source="transformers (in memory)", fmt="hf")
    model.to(device)
    bf16_copy = Bf16Replica(model) if replica else None
    forward = bf16_copy.module if bf16_copy else model
    forward = torch.compile(forward) if compiled else forward

    def lxm_step():
        if moves_in_optimizer:  # the update cleared them in training (it is not in the timed step)
            for p in bf16_copy.module.parameters():
                p.grad = None
        losses, _ = pretraining_step_losses(forward, labels, **inputs)
        loss = sum(losses.values())
        loss.backward()
        if bf16_copy is not None and not moves_in_optimizer:
            bf16_copy.accumulate_grads()
            bf16_copy.sync()  # in training: after the optimizer update of the masters
        return loss.detach()

    def extra_ms(reps: int = 3) -> float:
        """median(bf16_clip + step_from_bf16) - median(clip_grad_norm_ + fused step on the fp32 gradients), each
        after a fresh forward + backward, at least 0; the first call of each compiles and is not counted."""
        from lxm.train.optim import BertAdam
        from lxm.train.precision import bf16_clip, step_from_bf16

        masters = bf16_copy.master_params()
        direct, fp32 = (BertAdam(masters, lr=1e-4, warmup=0.05, t_total=1000, fused=True) for _ in range(2))
        times: dict[str, list[float]] = {"direct": [], "fp32": []}
        for k in range(reps + 1):
            for kind in times:
                model.zero_grad(set_to_none=True)
                lxm_step()
                if kind == "fp32":
                    bf16_copy.accumulate_grads()
                _sync(device)
                t0 = time.perf_counter()
                if kind == "direct":
                    step_from_bf16(direct, bf16_copy, bf16_clip(bf16_copy, 1.0)[1])
                else:
                    torch.nn.utils.clip_grad_norm_([p for p in masters if p.grad is not None], 1.0)
                    fp32.step()
                _sync(device)
                if k:
                    times[kind].append((time.perf_counter() - t0) * 1000)
        # never below 0: a cheaper update (lxm's clip of the bf16 gradients is) is the optimizer's gain, not the step's
        return max(0.0, statistics.median(times["direct"]) - statistics.median(times["fp32"]))

    return model, lxm_step, (extra_ms if moves_in_optimizer else None)


def add_step_arguments(ap: argparse.ArgumentParser) -> None:
    """--config / --batch / --precision / --threads of the scripts that time one lxm step (gemm_bound.py,
    train_step_parts.py)."""
    ap.add_argument("--config", default="base", choices=sorted(BATCH))
    ap.add_argument("--batch", type=int, help="default: model_step.py's batch for the config")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--threads", type=int, default=2)


def make_batch(cfg: LxmertConfig, batch: int, seed: int = 0):
    """Sentence lengths 8..20 padded to 20, 36 boxes, masking and labels as LXMERT pretraining draws them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, cfg.vocab_size, (batch, SEQ), generator=g)
    mask = torch.zeros(batch, SEQ, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(8, SEQ + 1, (1,), generator=g))
        ids[i, 0], ids[i, n - 1], ids[i, n:] = 101, 102, 0
        mask[i, :n] = 1
    inner = mask.bool().clone()
    inner[:, 0] = False
    inner &= ids != 102
    pick = (torch.rand(batch, SEQ, generator=g) < 0.15) & inner
    pick[0, 1] = True
    mlm = torch.where(pick, ids, torch.full_like(ids, -1))
    feats = torch.rand(batch, BOXES, cfg.visual_feat_dim, generator=g) * 2
    xy = torch.rand(batch, BOXES, 2, generator=g) * 0.7
    boxes = torch.cat([xy, xy + torch.rand(batch, BOXES, 2, generator=g) * 0.3], -1)
    feat_mask = (torch.rand(batch, BOXES, generator=g) < 0.15).float()
    matched = torch.randint(0, 2, (batch,), generator=g)
    answers = torch.randint(0, cfg.num_qa_labels, (batch,), generator=g).masked_fill(matched == 0, -1)
    labels = PretrainLabels(
        mlm_labels=mlm, matched=matched,
        obj_labels=torch.randint(0, cfg.num_object_labels, (batch, BOXES), generator=g),
        obj_conf=torch.rand(batch, BOXES, generator=g),
        attr_labels=torch.randint(0, cfg.num_attr_labels, (batch, BOXES), generator=g),
        attr_conf=torch.rand(batch, BOXES, generator=g),
        feat_target=feats.clone(), feat_mask=feat_mask, answers=answers,
    )
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), visual_feats=feats,
                  visual_boxes=boxes)
    return inputs, labels


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(model, step, autocast: bool, device: str = "cpu") -> float:
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    _sync(device)
    t0 = time.perf_counter()
    with ctx:
        loss = step()
    _sync(device)
    dt = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss")
    return dt * 1000


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(name: str, which: str, batch: int, threads: int, iters: int, warmup: int, precision: str, malloc: bool,
           compiled: bool, device: str) -> None:
    """Child process: step times, peak memory during the steps (CPU: peak RSS minus RSS before them; CUDA: peak
    allocated device memory minus the memory held before them), and whether lxm's model runs its CPU kernels (as
    this process's LXM_CPU_KERNELS and the device resolve them; None for transformers)."""
    if malloc:
        keep_freed_memory()
    torch.set_num_threads(threads)
    model, step, extra = build(name, which, batch, compiled, device, replica=precision in ("bf16", FUSED),
                               moves_in_optimizer=precision == FUSED)
    autocast = precision == "bf16-autocast"
    kernels = None
    if which == "lxm":
        from lxm.model import cpu_kernels

        kernels = cpu_kernels.active(model.cpu_kernels, torch.empty(0, device=device))
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak-RSS counter (VmHWM) so that building the models does not count
        base = proc_status_mb("VmRSS")
    for _ in range(warmup):
        timed(model, step, autocast, device)
    times = [timed(model, step, autocast, device) for _ in range(iters)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else proc_status_mb("VmHWM")
    added = extra() if extra is not None else 0.0
    print(json.dumps({"times_ms": [t + added for t in times], "resident_mb": base, "step_peak_mb": peak - base,
                      "optimizer_extra_ms": added, "cpu_kernels": kernels}))


def gemm_shapes(cfg: LxmertConfig, batch: int) -> list[tuple[int, int, int]]:
    """(rows, fan_in, fan_out) of the step's matrix products: text rows, box rows, both (the cross layers' shared
    projections), the MLM decoder at the masked tokens, the object head."""
    inputs, labels = make_batch(cfg, batch)
    tokens, boxes = int(inputs["attention_mask"].sum()), batch * BOXES
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = [(rows, a, b) for rows in (tokens, boxes, tokens + boxes) for a, b in ((h, h), (h, 3 * h), (h, i), (i, h))]
    return shapes + [(int((labels.mlm_labels != -1).sum()), h, cfg.vocab_size), (boxes, h, cfg.num_object_labels)]


def peak_worker(name: str, batch: int, threads: int, dtype_name: str, device: str) -> None:
    """Child process: `peak_rates` as JSON."""
    torch.set_num_threads(threads)
    print(json.dumps(peak_rates(name, batch, dtype_name, device)))


def peak_rates(name: str, batch: int, dtype_name: str, device: str) -> dict:
    """The best GFLOP/s over the model's GEMM shapes, each in the forward layout (x @ W^T) and the two gradient
    layouts (g @ W, g^T @ x), in one precision: {"peak_gflops": best, "per_shape": {shape: its best}}."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in the steps (torch's default)
    best, per_shape = 0.0, {}
    for rows, fan_in, fan_out in gemm_shapes(PRESET[name](), batch):
        x, w, g = (torch.randn(*shape, dtype=dtype, device=device)
                   for shape in ((rows, fan_in), (fan_out, fan_in), (rows, fan_out)))
        rates = []
        for fn in (lambda: x @ w.t(), lambda: g @ w, lambda: g.t() @ x):
            for _ in range(2):
                fn()
            ts = []
            for _ in range(7):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                ts.append(time.perf_counter() - t0)
            rates.append(2 * rows * fan_in * fan_out / statistics.median(ts) / 1e9)
        per_shape[f"{rows}x{fan_in}x{fan_out}"] = round(max(rates), 1)
        best = max(best, *rates)
    return {"peak_gflops": best, "per_shape": per_shape}


def run_child(args, *extra: str, kernels: bool | None = None) -> dict:
    """Run this script as a child with `extra` arguments; `kernels` True / False: LXM_CPU_KERNELS=1 / 0 in its
    environment, None: unset (transformers, the peak rates)."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if kernels is not None:
        env[ENV] = "1" if kernels else "0"
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--iters", str(args.iters), "--warmup",
           str(args.warmup), "--device", args.device, *(["--quick"] if args.quick else []),
           *(["--keep-freed-memory"] if args.keep_freed_memory else []), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{ENV}={env.get(ENV, '(unset)')} {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_flops(name: str, batch: int) -> int:
    cfg = PRESET[name]()
    inputs, labels = make_batch(cfg, batch)
    return pretraining_step_flops(cfg, inputs["attention_mask"].sum(1).tolist(), BOXES,
                                  int((labels.mlm_labels != -1).sum()), int((labels.feat_mask != 0).sum())).training


def best_mode(times: dict[tuple, float], which: str) -> tuple:
    """The fastest (implementation, precision, compiled, cpu kernels) mode of `which` ("hf" or "lxm") in `times`."""
    return min((m for m in times if m[0] == which), key=times.__getitem__)


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) of this machine's first CPU in /proc/cpuinfo; (platform.processor(), no flags) where
    there is none."""
    import platform

    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # the CPU features that run bf16 products faster than fp32 ones


def bf16_choice(flag: str, device: str) -> tuple[bool, str]:
    """Whether to run the bf16 modes (`--bf16 auto|on|off`), and why: auto decides by capability, never by timing —
    always on CUDA; on a CPU only with avx512_bf16 or amx_bf16 (without them, e.g. AVX2 only, bf16 products run at
    about half the fp32 rate and fp32 is the machine's best mode)."""
    if flag != "auto":
        return flag == "on", f"--bf16 {flag}"
    if device.startswith("cuda"):
        return True, "auto: CUDA"
    have = [f for f in BF16_FLAGS if f in cpu_info()[1]]
    if have:
        return True, f"auto: the CPU has {' and '.join(have)}"
    return False, ("auto: the CPU has neither avx512_bf16 nor amx_bf16, so bf16 products run at about half the fp32 "
                   "rate and fp32 is its best mode")


def mode_tag(mode: tuple) -> str:
    which, prec, compiled, kernels = mode
    tag = f"{'transformers' if which == 'hf' else 'lxm'} {prec}{' compiled' if compiled else ''}"
    return tag if kernels is None else tag + (" (cpu kernels on)" if kernels else " (plain)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="small,base")
    ap.add_argument("--quick", action="store_true", help="the old toy batches (small 8, base 4)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating (transformers, lxm) child-process pairs")
    ap.add_argument("--iters", type=int, default=8, help="timed steps per child")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", help="also write every figure to this JSON file")
    ap.add_argument("--bf16", default="auto", choices=("auto", "on", "off"),
                    help="the bf16 modes: auto = where the machine runs bf16 products fast (CUDA; a CPU with "
                         "avx512_bf16 or amx_bf16), on / off = always / never")
    ap.add_argument("--compile", action="store_true", help="add lxm under torch.compile (inductor; slow to compile)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="tune glibc malloc in BOTH implementations' processes (lxm.memory.keep_freed_memory, "
                         "what the lxm commands do on CPU)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--peak", help=argparse.SUPPRESS)
    ap.add_argument("--precision-child", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--compiled-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = QUICK_BATCH if args.quick else BATCH
    if args.worker:
        name, which = args.worker.split(":")
        worker(name, which, batches[name], args.threads, args.iters, args.warmup, args.precision_child,
               args.keep_freed_memory, args.compiled_child, args.device)
        return
    if args.peak:
        name, dtype = args.peak.split(":")
        peak_worker(name, batches[name], args.threads, dtype, args.device)
        return
    import platform

    import transformers

    cuda = args.device.startswith("cuda")
    cpu_name, cpu_flags = cpu_info()
    bf16, why = bf16_choice(args.bf16, args.device)
    default_kernels = not cuda  # what lxm runs with LXM_CPU_KERNELS unset and config cpu_kernels null
    where = torch.cuda.get_device_name() if cuda else f"{args.threads} threads"
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, {args.device} ({where}), "
          f"{platform.machine()}, {os.cpu_count()} cpus; {args.rounds} rounds of one child process per "
          f"implementation and mode ({args.warmup} warm-up + {args.iters} timed steps each); medians over all timed "
          f"steps; glibc malloc " + ("keeps freed memory (both)" if args.keep_freed_memory else "as it is"))
    has = ", ".join(f"{f}: {'yes' if f in cpu_flags else 'no'}" for f in BF16_FLAGS)
    print(f"# CPU: {cpu_name} ({has}); "
          f"bf16 modes {'on' if bf16 else 'off'} ({why}); lxm runs each mode with {ENV}=1 (cpu kernels on) and "
          f"=0 (plain), its default here: {'cpu kernels on' if default_kernels else 'plain'}", flush=True)
    dtypes = ("fp32", "bf16") if bf16 else ("fp32",)  # of the peak GEMM rates
    both = (True, False)  # lxm's CPU kernels on, off
    modes = [("hf", "fp32", False, None)] + [("lxm", "fp32", False, k) for k in both]
    if bf16:
        modes += [("hf", "bf16-autocast", False, None)]
        modes += [("lxm", prec, False, k) for prec in ("bf16-autocast", "bf16", FUSED) for k in both]
    if args.compile:
        modes += [("lxm", prec, True, default_kernels) for prec in ("fp32",) + (("bf16",) if bf16 else ())]
    speedups, plain_speedups, best_speedup, best_mfu, paired = {}, {}, {}, {}, {}
    rows: list[dict] = []
    for name in args.configs.split(","):
        batch = batches[name]
        flops = step_flops(name, batch)
        peaks = {dt: run_child(args, "--peak", f"{name}:{dt}") for dt in dtypes}
        peaks["bf16-autocast"] = peaks[FUSED] = peaks.get("bf16")
        print(f"{name} batch {batch}: {flops / 1e12:.3f} TFLOP per step (model FLOPs, forward + backward); peak GEMM "
              + ", ".join(f"{dt} {peaks[dt]['peak_gflops']:.0f} GFLOP/s" for dt in dtypes)
              + f" (best of {json.dumps(peaks[dtypes[-1]]['per_shape'])})", flush=True)
        times: dict[tuple, list[float]] = {m: [] for m in modes}
        peak_mem: dict[tuple, list[float]] = {m: [] for m in modes}
        added: dict[tuple, list[float]] = {m: [] for m in modes}
        round_ratios = []
        for r in range(args.rounds):
            this_round = {}
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                which, prec, compiled, kernels = mode
                res = run_child(args, "--worker", f"{name}:{which}", "--precision-child", prec,
                                *(["--compiled-child"] if compiled else []), kernels=kernels)
                if res["cpu_kernels"] != kernels:  # the switch did not reach the model: the rows would be mislabelled
                    raise RuntimeError(f"{mode_tag(mode)}: the child's model resolved cpu kernels "
                                       f"{res['cpu_kernels']} under {ENV}={'1' if kernels else '0'}")
                times[mode] += res["times_ms"]
                peak_mem[mode].append(res["step_peak_mb"])
                added[mode].append(res["optimizer_extra_ms"])
                this_round[mode] = statistics.median(res["times_ms"])
            round_ratios.append(this_round[best_mode(this_round, "hf")] / this_round[best_mode(this_round, "lxm")])
        med = {m: statistics.median(t) for m, t in times.items()}
        for mode in modes:
            which, prec, compiled, kernels = mode
            mfu = flops / (med[mode] / 1000) / (peaks[prec]["peak_gflops"] * 1e9)
            print(f"{name:5s} batch {batch} {mode_tag(mode):50s}: {med[mode]:8.1f} ms  "
                  f"{batch / med[mode] * 1000:7.1f} samples/s  MFU {mfu:.2f}  "
                  f"peak step memory {statistics.median(peak_mem[mode]):6.0f} MB"
                  + (f"  (incl. {statistics.median(added[mode]):+.1f} ms: the update's extra for the moves)"
                     if prec == FUSED else ""), flush=True)
            rows.append({"config": name, "batch": batch, "implementation": "transformers" if which == "hf" else "lxm",
                         "precision": prec, "compiled": compiled, "cpu_kernels": kernels, "label": mode_tag(mode),
                         "ms": med[mode], "samples_per_s": batch / med[mode] * 1000,
                         "mfu": mfu, "tflop_per_step": flops / 1e12, "peak_gflops": peaks[prec]["peak_gflops"],
                         "peak_step_memory_mb": statistics.median(peak_mem[mode]),
                         "optimizer_extra_ms": statistics.median(added[mode])})
        hf_fp32 = med["hf", "fp32", False, None]
        speedups[name] = hf_fp32 / med["lxm", "fp32", False, default_kernels]
        plain_speedups[name] = hf_fp32 / med["lxm", "fp32", False, False]
        best_lxm_mode = best_mode(med, "lxm")
        best_speedup[name] = med[best_mode(med, "hf")] / med[best_lxm_mode]
        best_mfu[name] = flops / (med[best_lxm_mode] / 1000) / (peaks[best_lxm_mode[1]]["peak_gflops"] * 1e9)
        paired[name] = statistics.median(round_ratios)
        print(f"{name}: best lxm mode {mode_tag(best_lxm_mode)} vs best transformers mode "
              f"{mode_tag(best_mode(med, 'hf'))}: {best_speedup[name]:.2f}x, MFU {best_mfu[name]:.2f}; paired (each "
              f"round's best vs best): {', '.join(f'{x:.2f}' for x in round_ratios)} -> median {paired[name]:.2f}x; "
              f"fp32: transformers / lxm plain {plain_speedups[name]:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "device_name": where, "rows": rows,
                                               "best_speedup": best_speedup,
                                               "best_mfu": best_mfu, "speedup_fp32": speedups,
                                               "plain_speedup_fp32": plain_speedups,
                                               "paired_best_speedup": paired, "cpu": cpu_name,
                                               "cpu_bf16_flags": [f for f in BF16_FLAGS if f in cpu_flags],
                                               "bf16": bf16, "bf16_reason": why,
                                               "keep_freed_memory": args.keep_freed_memory}, indent=2) + "\n")
    # the format stays fixed when base was not run (--configs small): its values are then nan
    print(f"best_speedup_base={best_speedup.get('base', math.nan):.2f} mfu_base={best_mfu.get('base', math.nan):.2f} "
          f"speedup_small={speedups.get('small', math.nan):.2f} speedup_base={speedups.get('base', math.nan):.2f} "
          f"plain_fp32_speedup_base={plain_speedups.get('base', math.nan):.2f}")


if __name__ == "__main__":
    main()
