"""Feature store vs LXMERT's TSV loader: time to the first batch, random reads, peak memory.

LXMERT's `load_obj_tsv` (airsplay/lxmert src/utils.py) decodes every row of a TSV into a Python list before
training starts, so its first batch waits for the whole file and its memory grows with the file. lxm opens a
memory-mapped Arrow store and reads rows on demand. Each measurement runs in a fresh child process (peak RSS =
VmHWM of that child). Inputs: the 10 real sample rows cycled under new img_ids to the requested size.

    python benchmarks/feature_store.py                    # 1,000- and 5,000-image stores (about 3.3 GB of TSV)
    python benchmarks/feature_store.py --sizes 500 --keep  # smaller; keep the files in benchmarks/.data
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("LXM_SHARED") or ROOT.parent / "shared")
SAMPLE = SHARED / "fixtures" / "butd-coco-sample" / "train2014_obj36.tsv"
FIELDS = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes",
          "features"]
BATCH = 256


def make_tsv(path: Path, n: int) -> None:
    rows = SAMPLE.read_bytes().split(b"\r\n")
    rows = [r for r in rows if r]
    with path.open("wb") as f:
        for i in range(n):
            fields = rows[i % len(rows)].split(b"\t", 1)
            f.write(b"img%07d\t" % i + fields[1] + b"\r\n")


def original_loader(path: Path) -> list[dict]:
    """The algorithm of LXMERT's load_obj_tsv: csv rows -> dicts of decoded numpy arrays, all kept in a list."""
    csv.field_size_limit(sys.maxsize)
    data = []
    with path.open() as f:
        for item in csv.DictReader(f, FIELDS, delimiter="\t"):
            for key in ("img_h", "img_w", "num_boxes"):
                item[key] = int(item[key])
            n = item["num_boxes"]
            for key, shape, dtype in (("objects_id", (n,), np.int64), ("objects_conf", (n,), np.float32),
                                      ("attrs_id", (n,), np.int64), ("attrs_conf", (n,), np.float32),
                                      ("boxes", (n, 4), np.float32), ("features", (n, -1), np.float32)):
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
            data.append(item)
    return data


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, path: str, n: int) -> None:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if kind == "tsv":
        data = original_loader(Path(path))
        first = np.stack([data[i]["features"] for i in range(BATCH)])
        t_first = time.perf_counter() - t0
        ids = rng.integers(0, len(data), 2000)
        t1 = time.perf_counter()
        for i in ids:
            float(data[i]["features"][0, 0])
        reads = len(ids) / (time.perf_counter() - t1)
    else:
        from lxm.features.store import FeatureStore

        store = FeatureStore(path)
        first = np.stack([store.at(i).features for i in range(BATCH)]).astype(np.float32)
        t_first = time.perf_counter() - t0
        ids = rng.integers(0, len(store), 2000)
        t1 = time.perf_counter()
        for i in ids:
            float(store.at(int(i)).features.astype(np.float32).sum())  # touch the whole row
        reads = len(ids) / (time.perf_counter() - t1)
    assert first.shape == (BATCH, 36, 2048)
    # Private (anonymous) memory is what a process really costs; mapped store pages are page cache the kernel can
    # drop and that DataLoader workers share.
    print(json.dumps({"first_batch_s": t_first, "reads_per_s": reads, "peak_rss_mb": status_mb("VmHWM"),
                      "anon_mb": status_mb("RssAnon"), "file_mb": status_mb("RssFile")}))


def run_child(kind: str, path: Path, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path), str(n)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    from lxm.features.store import FeatureStoreWriter
    from lxm.features.tsv import read_tsv

    work = ROOT / "benchmarks" / ".data" if args.keep else Path(tempfile.mkdtemp(prefix="lxm-store-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            tsv, store = work / f"rows{n}.tsv", work / f"store{n}"
            if not tsv.exists():
                make_tsv(tsv, n)
            if not store.exists():
                t0 = time.perf_counter()
                with FeatureStoreWriter(store, num_boxes=36, feature_dim=2048, dtype="float16") as w:
                    for rec in read_tsv(tsv):
                        w.add(rec)
                print(f"{n} images: converted {tsv.stat().st_size / 2**30:.2f} GiB TSV to a float16 store in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
            a, b = run_child("tsv", tsv, n), run_child("store", store, n)
            print(f"{n} images: first batch of {BATCH}: TSV loader {a['first_batch_s']:.2f} s vs store "
                  f"{b['first_batch_s']:.3f} s ({a['first_batch_s'] / b['first_batch_s']:.0f}x); random reads/s: "
                  f"TSV (in RAM) {a['reads_per_s']:.0f} vs store {b['reads_per_s']:.0f}; peak RSS: TSV "
                  f"{a['peak_rss_mb']:.0f} MB vs store {b['peak_rss_mb']:.0f} MB; private memory at the end: TSV "
                  f"{a['anon_mb']:.0f} MB vs store {b['anon_mb']:.0f} MB (+{b['file_mb']:.0f} MB of mapped, "
                  f"shared, reclaimable store pages)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
