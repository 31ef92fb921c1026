"""The trainer, not just the step: `lxm pretrain` end to end vs the bare model step, and the loader with 0-4 workers.

Builds a synthetic corpus (random sentences over 2,000 images) with random 36 x 2048 float16 features, then in one
run measures

- the loader: `PretrainDataset` + `collate` through a DataLoader with 0, 1, 2, 4 workers (batch 32; features stay
  float16 until the device, pinned memory on CUDA, as the trainer loads them), samples/s and per worker;
- the bare step: forward + backward + clipping + BertAdam + scheduler (`lxm.train.step.train_step`, what the
  trainer calls) on batches already on the device;
- the trainer: `Pretrainer.run` (the code `lxm pretrain` runs: its loader, logging every 10 steps, one step
  checkpoint at the last step, after the timed window: issue 30, a base model's multi-GB write would dominate a GPU's
  window; figures before it had a write at `--steps / 2` inside) over `--steps` steps, timed from its first log
  record to its last;

and prints the trainer's rate as a share of the bare step's (target >= 90 %), and where the rest goes (the
checkpoint writes, timed on their own; the remainder is loader waits, logging and the loss read-backs at log steps).

    python benchmarks/pretrain_throughput.py                      # small model, CPU, 2 threads, 200 steps
    python benchmarks/pretrain_throughput.py --device cuda --model base --precision bf16 --steps 300
    python benchmarks/pretrain_throughput.py --smoke              # seconds: tiny model, few steps (tests)

The last line is `trainer_vs_step=<x.xx> loader_best=<samples/s> step=<samples/s>`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import inputs  # noqa: E402  (benchmarks/inputs.py: the shared files or their stand-ins)
from lxm.features.records import ImageFeatures  # noqa: E402
from lxm.features.store import FeatureStoreWriter  # noqa: E402
from lxm.model import LxmertForPreTraining, preset, pretraining_step_losses  # noqa: E402
from lxm.train.config import load_config  # noqa: E402
from lxm.train.data import PretrainDataset, collate  # noqa: E402
from lxm.train.pretrain import Pretrainer  # noqa: E402
from lxm.memory import keep_freed_memory  # noqa: E402
from lxm.train.run import DistInfo, build_optimizer, save_state, training_modules, training_state  # noqa: E402
from lxm.train.step import train_step  # noqa: E402

BATCH = 32
ANSWERS = ["yes", "no", "2", "red", "dog"]
WORDS = "a man riding a horse on the beach near two dogs with a red ball".split()  # the synthetic sentences' words


def make_world(root: Path, images: int, sentences: int, feature_dim: int, labels: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    ids = [f"img{i:06d}" for i in range(images)]
    with FeatureStoreWriter(root / "feats", num_boxes=36, feature_dim=feature_dim, dtype="float16") as w:
        for img in ids:
            xy = rng.uniform(0, 300, (36, 2)).astype(np.float32)
            w.add(ImageFeatures(img, 480, 640, rng.integers(0, labels[0], 36), rng.random(36, np.float32),
                                rng.integers(0, labels[1], 36), rng.random(36, np.float32),
                                np.concatenate([xy, xy + 100], 1), rng.random((36, feature_dim), np.float32)))
    words = WORDS
    rows: dict[str, list] = {"uid": [], "img_id": [], "source": [], "split": [], "text": [], "labels": []}
    for i in range(sentences):
        rows["uid"].append(f"u{i}")
        rows["img_id"].append(ids[i % images])
        rows["source"].append("vqa" if i % 3 == 0 else "mscoco")
        rows["split"].append("train")
        rows["text"].append(" ".join(rng.choice(words, int(rng.integers(5, 16)))))
        rows["labels"].append([(ANSWERS[i % 5], 1.0)] if i % 3 == 0 else [])
    (root / "corpus" / "vocab").mkdir(parents=True)
    schema = pa.schema([("uid", pa.string()), ("img_id", pa.string()), ("source", pa.string()),
                        ("split", pa.string()), ("text", pa.string()), ("labels", pa.map_(pa.string(), pa.float32()))])
    pq.write_table(pa.table(rows, schema=schema), root / "corpus" / "corpus.parquet")
    (root / "corpus" / "vocab" / "qa_answers.json").write_text(json.dumps([{"ans": a} for a in ANSWERS]))


def loader_rate(ds, workers: int, device: torch.device, batches: int) -> float:
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0), pin_memory=device.type == "cuda")
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    for _ in range(batches):
        next(it).to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * BATCH / (time.perf_counter() - t)


def model_config(name: str, feature_dim: int):
    """The model the trainer builds for this world (BERT's vocabulary, the world's feature size and answers)."""
    return preset(name).replace(num_qa_labels=len(ANSWERS), visual_feat_dim=feature_dim, vocab_size=30522)


def bare_step_rate(ds, cfg, train_cfg, device: torch.device, steps: int) -> tuple[float, float]:
    """(samples/s of the bare step, seconds to write one checkpoint of model + optimizer)."""
    torch.manual_seed(0)
    model = LxmertForPreTraining(cfg).to(device).train()
    optimizer, scheduler = build_optimizer(model, train_cfg.optim, 1000)
    # the trainer's bf16 copy, if any
    replica, step_model = training_modules(model, train_cfg.runtime, DistInfo(), device)
    batches = [b.to(device) for b in itertools.islice(DataLoader(ds, batch_size=BATCH, collate_fn=collate), steps + 2)]

    def loss_fn(m, batch):
        return pretraining_step_losses(m, batch.labels, **batch.model_inputs())[0]

    times = []
    for b in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        train_step(step_model, [b], loss_fn, optimizer, scheduler, clip_grad_norm=train_cfg.optim.clip_grad_norm,
                   precision=train_cfg.runtime.precision, device_type=device.type, replica=replica)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_state(Path(tmp) / "c.pt", training_state(model, optimizer, scheduler, step=0, epoch=0))
        ckpt = time.perf_counter() - t
    return BATCH / statistics.median(times[2:]), ckpt


def trainer_rate(root: Path, model: str, device: str, precision: str, steps: int, workers: int | None
                 ) -> tuple[float, int]:
    """(samples/s of Pretrainer.run between its first and last log record, checkpoints written in that span)."""
    stamps: list[tuple[float, int]] = []
    # one step checkpoint, at the last step: written after the last log record, so a base model's multi-GB write is
    # not in the timed window (the rate is the training's; `checkpoint_s` of the step timing prices a write)
    every = steps
    cfg = load_config("base", [f"corpus={root / 'corpus'}", f"features=[{root / 'feats'}]",
                               f"vocab={inputs.vocab(root, WORDS)}",
                               f"model={model}", f"batch_size={BATCH}", f"max_steps={steps}", "log_every=10",
                               f"checkpoint_every={every}", "keep_last=1", "valid_split=null",
                               "train_splits=[train]", f"num_workers={'null' if workers is None else workers}",
                               f"precision={precision}",
                               f"device={device}", "epochs=1"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Pretrainer(cfg, out, log=lambda _m: None,
                             on_record=lambda r: stamps.append((time.perf_counter(), r["step"])) if "loss" in r
                             else None)
        trainer.run()
    (t0, s0), (t1, s1) = stamps[0], stamps[-1]
    checkpoints = sum(1 for k in range(s0, s1) if k % every == 0)  # a write after step k's record is in the window
    return (s1 - s0) * BATCH / (t1 - t0), checkpoints


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="small", help="model preset (small, base, tiny)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=200, help="trainer steps (its rate is timed between log records)")
    ap.add_argument("--workers", default="0,1,2,4", help="loader worker counts to time")
    ap.add_argument("--trainer-workers", type=int, default=None,
                    help="num_workers of the trainer run (default: the trainer's own, 0 on CPU, a few with CUDA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model, small world, few steps: checks it runs")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu":  # as `lxm pretrain` does on CPU (keep_freed_memory=true): the bare step too
        keep_freed_memory()
    device = torch.device(args.device)
    if args.smoke:
        args.model, args.steps, args.workers, args.trainer_workers = "tiny", 20, "0,1", 0
    images, sentences, feature_dim = (200, 1200, 16) if args.smoke else (2000, 20000, 2048)
    loader_batches = 5 if args.smoke else 40
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = model_config(args.model, feature_dim)
        make_world(root, images, sentences, feature_dim, (cfg.num_object_labels, cfg.num_attr_labels))
        ds = PretrainDataset(root / "corpus", [root / "feats"], inputs.vocab(root, WORDS), ANSWERS, splits=["train"])
        loader = {w: loader_rate(ds, w, device, loader_batches) for w in (int(x) for x in args.workers.split(","))}
        for w, r in loader.items():
            print(f"loader, {w} workers: {r:7.0f} samples/s" + (f" ({r / w:.0f} per worker)" if w else " (in process)")
                  + f"; batch {BATCH}, 36 x {feature_dim} float16 features, {device}", flush=True)
        train_cfg = load_config("base", ["corpus=x", "features=[x]", f"precision={args.precision}"])
        # 30 steps: on AMX CPUs oneDNN compiles a kernel for each new batch shape (token counts vary), so a
        # handful of steps times mostly that compilation, which the trainer's 200 steps amortise
        step, ckpt_s = bare_step_rate(ds, cfg, train_cfg, device, 6 if args.smoke else 30)
        print(f"bare step ({args.model}, {args.precision}, {device}): {step:7.1f} samples/s; one checkpoint "
              f"{ckpt_s * 1000:.0f} ms", flush=True)
        trainer, checkpoints = trainer_rate(root, args.model, args.device, args.precision, args.steps,
                                            args.trainer_workers)
    share = trainer / step
    gap_s = args.steps * BATCH / trainer - args.steps * BATCH / step
    shown = "default" if args.trainer_workers is None else args.trainer_workers
    print(f"trainer ({args.steps} steps, {shown} loader workers): {trainer:7.1f} samples/s = "
          f"{100 * share:.0f} % of the bare step (target >= 90 %); " + (
              f"of the {gap_s:.1f} s it spends beyond the bare steps, {checkpoints} checkpoint write(s) take "
              f"~{checkpoints * ckpt_s:.1f} s, the rest is loader waits, logging and the loss read-backs at log steps"
              if gap_s > 0 else "faster than the bare step: the two differ by more than the trainer's overhead "
              "from run to run"), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "model": args.model,
                                               "precision": args.precision, "loader": loader, "step": step,
                                               "trainer": trainer, "trainer_vs_step": share,
                                               "checkpoint_s": ckpt_s}, indent=2) + "\n")
    print(f"trainer_vs_step={share:.2f} loader_best={max(loader.values()):.0f} step={step:.1f}")


if __name__ == "__main__":
    main()
