"""Is the data loader fast enough to feed the model? Loader samples/s (0, 1, 2 workers) vs model-step samples/s.

Builds a synthetic corpus (the test fixtures' raw files cycled) with random 36 x 2048 float16 features, then times
(a) iterating `PretrainDataset` + `collate` through a DataLoader and (b) full pretraining steps (forward, backward,
BertAdam) of the tiny and small models, fp32, 2 threads. The loader should be at least 2x the step rate.

    python benchmarks/pretrain_throughput.py
"""

from __future__ import annotations

import json
import os
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
VOCAB = Path(os.environ.get("LXM_SHARED") or ROOT.parent / "shared") / "vocab" / "bert-base-uncased-vocab.txt"

from lxm.features.records import ImageFeatures  # noqa: E402
from lxm.features.store import FeatureStoreWriter  # noqa: E402
from lxm.model import LxmertForPreTraining, lxmert_small, lxmert_tiny, pretraining_step_losses  # noqa: E402
from lxm.train.data import PretrainDataset, collate  # noqa: E402
from lxm.train.optim import BertAdam  # noqa: E402

IMAGES, SENTENCES, BATCH = 2000, 20000, 32


def make_world(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    ids = [f"img{i:06d}" for i in range(IMAGES)]
    with FeatureStoreWriter(root / "feats", num_boxes=36, feature_dim=2048, dtype="float16") as w:
        for img in ids:
            xy = rng.uniform(0, 300, (36, 2)).astype(np.float32)
            w.add(ImageFeatures(img, 480, 640, rng.integers(0, 1600, 36), rng.random(36, np.float32),
                                rng.integers(0, 400, 36), rng.random(36, np.float32),
                                np.concatenate([xy, xy + 100], 1), rng.random((36, 2048), np.float32)))
    words = "a man riding a horse on the beach near two dogs with a red ball".split()
    answers = ["yes", "no", "2", "red", "dog"]
    rows = {"uid": [], "img_id": [], "source": [], "split": [], "text": [], "labels": []}
    for i in range(SENTENCES):
        rows["uid"].append(f"u{i}")
        rows["img_id"].append(ids[i % IMAGES])
        rows["source"].append("vqa" if i % 3 == 0 else "mscoco")
        rows["split"].append("train")
        rows["text"].append(" ".join(rng.choice(words, int(rng.integers(5, 16)))))
        rows["labels"].append([(answers[i % 5], 1.0)] if i % 3 == 0 else [])
    (root / "corpus").mkdir()
    pq.write_table(pa.table(rows, schema=pa.schema([("uid", pa.string()), ("img_id", pa.string()),
                                                    ("source", pa.string()), ("split", pa.string()),
                                                    ("text", pa.string()),
                                                    ("labels", pa.map_(pa.string(), pa.float32()))])),
                   root / "corpus" / "corpus.parquet")
    return answers


def loader_rate(ds, workers: int, batches: int = 40) -> float:
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, collate_fn=collate,
                        persistent_workers=False, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - t)


def step_rate(ds, cfg, steps: int = 6) -> float:
    model = LxmertForPreTraining(cfg).train()
    opt = BertAdam(model.parameters(), lr=1e-4, warmup=0.1, t_total=1000)
    batches = list(DataLoader(ds, batch_size=BATCH, collate_fn=collate))[: steps + 1]
    times = []
    for b in batches:
        t = time.perf_counter()
        losses, _ = pretraining_step_losses(model, b.labels, **b.model_inputs(), )
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return BATCH / statistics.median(times[1:])


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        answers = make_world(root)
        ds = PretrainDataset(root / "corpus", [root / "feats"], VOCAB, answers, splits=["train"])
        rates = {w: loader_rate(ds, w) for w in (0, 1, 2)}
        for w, r in rates.items():
            print(f"loader, {w} workers: {r:7.0f} samples/s (batch {BATCH}, 36 x 2048 float16 features)", flush=True)
        for name, cfg in (("tiny", lxmert_tiny(vocab_size=30522, visual_feat_dim=2048, num_qa_labels=5,
                                               num_object_labels=1600, num_attr_labels=400)),
                          ("small", lxmert_small(num_qa_labels=5))):
            r = step_rate(ds, cfg)
            print(f"model step ({name}, fp32, 2 threads): {r:7.1f} samples/s; best loader / step = "
                  f"{max(rates.values()) / r:.1f}x (target >= 2)", flush=True)
        print(json.dumps({"loader": rates}))


if __name__ == "__main__":
    main()
