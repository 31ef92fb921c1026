"""One full LXMERT pretraining step (forward + backward, all five losses), lxm vs transformers, side by side.

Both models get the identical config, weights and inputs (15 % word masking, 15 % box masking, matched/QA labels,
train mode so dropout runs). Each measurement runs in a fresh child process (so one implementation's allocator
history cannot slow the other), and the children alternate transformers, lxm, transformers, lxm, ... so that machine
drift hits both alike; the figures are medians over all timed steps. Peak memory: peak RSS during the steps minus
RSS before them, per child.

    python benchmarks/model_step.py                 # small and base, fp32 and bf16 autocast, 2 threads
    python benchmarks/model_step.py --configs small --rounds 1 --no-bf16

The LAST line is `speedup_small=<x.xx> speedup_base=<y.yy>` (transformers time / lxm time, fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lxm.model import LxmertConfig, LxmertForPreTraining, PretrainLabels, lxmert_base, lxmert_small  # noqa: E402
from lxm.model.losses import pretraining_step_losses  # noqa: E402
from lxm.model.weights import load_into  # noqa: E402

BATCH = {"small": 8, "base": 4}
PRESET = {"small": lxmert_small, "base": lxmert_base}
SEQ, BOXES = 20, 36


def hf_config(cfg: LxmertConfig):
    import transformers

    return transformers.LxmertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, l_layers=cfg.l_layers, x_layers=cfg.x_layers, r_layers=cfg.r_layers,
        visual_feat_dim=cfg.visual_feat_dim, num_object_labels=cfg.num_object_labels,
        num_attr_labels=cfg.num_attr_labels, num_qa_labels=cfg.num_qa_labels,
        visual_loss_normalizer=1 / 0.15,  # the original constant, so both compute the same loss
    )


def build(name: str, which: str):
    """Return (model, step_fn) for `which` in {"lxm", "hf"}; both share seed-0 transformers weights."""
    import transformers

    cfg = PRESET[name]()
    torch.manual_seed(0)
    hf = transformers.LxmertForPreTraining(hf_config(cfg)).train()
    inputs, labels = make_batch(cfg, BATCH[name])
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

        return hf, hf_step
    model = LxmertForPreTraining(cfg).train()
    load_into(model, hf.state_dict(), source="transformers (in memory)", fmt="hf")

    def lxm_step():
        losses, _ = pretraining_step_losses(model, labels, **inputs)
        loss = sum(losses.values())
        loss.backward()
        return loss.detach()

    return model, lxm_step


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


def timed(model, step, autocast: bool) -> float:
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        loss = step()
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


def keep_freed_memory() -> None:
    """glibc: serve every allocation from the heap and never hand freed memory back to the kernel.

    By default each step's gradients (0.9 GB at base size) are fresh mmap'd pages that the kernel must fault in and
    zero; with this setting the next step reuses them. A process-level setting that helps any PyTorch CPU training.
    """
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_top_pad, 256 << 20)


def worker(name: str, which: str, threads: int, iters: int, warmup: int, autocast: bool, malloc: bool) -> None:
    """Child process: step times, and peak RSS during the steps minus RSS before them."""
    if malloc:
        keep_freed_memory()
    torch.set_num_threads(threads)
    model, step = build(name, which)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak-RSS counter (VmHWM) so that building the models does not count
    base = proc_status_mb("VmRSS")
    for _ in range(warmup):
        timed(model, step, autocast)
    times = [timed(model, step, autocast) for _ in range(iters)]
    print(json.dumps({"times_ms": times, "resident_mb": base, "step_peak_mb": proc_status_mb("VmHWM") - base}))


def run_child(name: str, which: str, args, autocast: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{name}:{which}", "--threads", str(args.threads),
           "--iters", str(args.iters), "--warmup", str(args.warmup)] + (["--bf16-child"] if autocast else []) + \
        (["--keep-freed-memory"] if args.keep_freed_memory else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="small,base")
    ap.add_argument("--rounds", type=int, default=3, help="alternating (transformers, lxm) child-process pairs")
    ap.add_argument("--iters", type=int, default=8, help="timed steps per child")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="tune glibc malloc in BOTH implementations' processes (see keep_freed_memory)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--bf16-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        name, which = args.worker.split(":")
        worker(name, which, args.threads, args.iters, args.warmup, args.bf16_child, args.keep_freed_memory)
        return
    import platform

    import transformers

    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"{platform.machine()}, {os.cpu_count()} cpus; {args.rounds} rounds of one child process per "
          f"implementation ({args.warmup} warm-up + {args.iters} timed steps each); medians over all timed steps"
          + ("; glibc malloc keeps freed memory (both)" if args.keep_freed_memory else ""))
    speedups = {}
    for name in args.configs.split(","):
        for autocast in (False, True) if not args.no_bf16 else (False,):
            times: dict[str, list[float]] = {"hf": [], "lxm": []}
            peak: dict[str, list[float]] = {"hf": [], "lxm": []}
            for _ in range(args.rounds):
                for which in ("hf", "lxm"):
                    res = run_child(name, which, args, autocast)
                    times[which] += res["times_ms"]
                    peak[which].append(res["step_peak_mb"])
            t_hf, t_lx = statistics.median(times["hf"]), statistics.median(times["lxm"])
            tag = "bf16-autocast" if autocast else "fp32"
            print(f"{name:5s} batch {BATCH[name]} {tag:13s}: transformers {t_hf:8.1f} ms  lxm {t_lx:8.1f} ms  "
                  f"speedup {t_hf / t_lx:.2f}x   peak step memory transformers {statistics.median(peak['hf']):6.0f} MB"
                  f"  lxm {statistics.median(peak['lxm']):6.0f} MB", flush=True)
            if not autocast:
                speedups[name] = t_hf / t_lx
    print(" ".join(f"speedup_{k}={v:.2f}" for k, v in speedups.items()))


if __name__ == "__main__":
    main()
