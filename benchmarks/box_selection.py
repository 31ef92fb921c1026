"""LXMERT's 36-box selection on 300 proposals x 1600 classes: vectorised (lxm) vs the original per-class loop.

The loop is the extraction script's algorithm written plainly (1600 calls of py-faster-rcnn's numpy NMS);
both must return identical indices, labels and confidences. Inputs: 300 random proposals on a 640x480 image, class
logits N(0, 3) with one boosted class per proposal (peaked softmaxes, as a trained detector gives), and four
"twins": proposals a few pixels off another that ROIPool snaps to the same cells, so they have bit-identical
probabilities and every class has tied scores (a real detector's output has such pairs; their order is the
original's, see lxm.extract.select).

Then all the inputs once more as one batch (`select_lxmert_batch`: one sweep over every class of every image, what
`lxm extract` runs per batch), per image, checked equal to the images alone.

    python benchmarks/box_selection.py            # median of 5 runs each, 2 threads
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lxm.extract.select import select_lxmert, select_lxmert_batch, select_lxmert_reference  # noqa: E402


def make_inputs(seed: int, proposals: int = 300, classes: int = 1600, attrs: int = 400):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [560, 400], (proposals, 2))
    wh = rng.uniform(16, 320, (proposals, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [639, 479])], 1).astype(np.float32)
    logits = rng.normal(0, 3, (proposals, classes + 1)).astype(np.float32)
    logits[np.arange(proposals), rng.integers(1, classes + 1, proposals)] += rng.uniform(5, 14, proposals)
    cls_prob = torch.softmax(torch.from_numpy(logits), 1).numpy()
    attr_prob = torch.softmax(torch.from_numpy(rng.normal(0, 3, (proposals, attrs + 1)).astype(np.float32)), 1).numpy()
    for twin, of in rng.choice(proposals, (4, 2), replace=False):
        boxes[twin] = np.clip(boxes[of] + rng.uniform(-4, 4, 4), 0, [639, 479, 639, 479]).astype(np.float32)
        cls_prob[twin], attr_prob[twin] = cls_prob[of], attr_prob[of]
    return boxes, cls_prob, attr_prob


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_loop, t_vec = [], []
    for seed in range(args.runs):
        boxes, cls_prob, attr_prob = make_inputs(seed)
        tb, tc, ta = torch.from_numpy(boxes), torch.from_numpy(cls_prob), torch.from_numpy(attr_prob)
        t0 = time.perf_counter()
        ref = select_lxmert_reference(boxes, cls_prob, attr_prob)
        t1 = time.perf_counter()
        got = select_lxmert(tb, tc, ta)
        t2 = time.perf_counter()
        t_loop.append((t1 - t0) * 1000)
        t_vec.append((t2 - t1) * 1000)
        same = (np.array_equal(got.indices.numpy(), ref["indices"])
                and np.array_equal(got.objects_id.numpy(), ref["objects_id"])
                and np.array_equal(got.attrs_conf.numpy(), ref["attrs_conf"]))
        if not same:
            raise SystemExit(f"seed {seed}: vectorised selection differs from the per-class loop")
        above = int((ref["max_conf"] >= 0.2).sum())
        print(f"seed {seed}: {above} proposals >= 0.2; loop {t_loop[-1]:.1f} ms, vectorised {t_vec[-1]:.1f} ms, "
              f"identical output", flush=True)
    lo, ve = statistics.median(t_loop), statistics.median(t_vec)
    print(f"median: per-class loop {lo:.1f} ms, vectorised {ve:.1f} ms, speedup {lo / ve:.1f}x "
          f"({args.threads} threads, CPU)")
    cases = [[torch.from_numpy(a) for a in make_inputs(seed)] for seed in range(args.runs)]
    t0 = time.perf_counter()
    batch = select_lxmert_batch(*[[c[i] for c in cases] for i in range(3)])
    per_image = (time.perf_counter() - t0) * 1000 / len(cases)
    if any(not torch.equal(b.indices, select_lxmert(*c).indices) for b, c in zip(batch, cases)):
        raise SystemExit("a batch's selection differs from its images' own")
    print(f"batch of {len(cases)}: {per_image:.1f} ms an image (same selections as alone)")


if __name__ == "__main__":
    main()
