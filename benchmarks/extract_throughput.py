"""Feature extraction throughput of the torch engine: the 10 fixture images, batch 1 vs 4, on this machine; and the
visual backends side by side (`--backbones`, issue 31).

Runs `lxm.extract.pipeline.extract` (real BUTD ResNet-101 architecture, seeded random weights: the cost is the
same as with the released weights) in a fresh child process per setting; reports images/s in steady state (from the
end of the first batch to the end of the last: building the detector, setting its weights and the first call's kernel
set-up excluded, which a 100K-image run never notices), images/s over the whole call, and peak RSS.

    python benchmarks/extract_throughput.py                     # CPU, 2 threads, batch 1 and 4
    python benchmarks/extract_throughput.py --device cuda --batch-sizes 1,4,8 [--bf16]
    python benchmarks/extract_throughput.py --compare-bf16 --batch-sizes 4   # bf16 autocast vs fp32, side by side
    python benchmarks/extract_throughput.py --backbones butd,grid,timm:vit_base_patch16_224 --batch-sizes 1,8 \
        --images 16                                            # backends side by side, ratios to butd

`--backbones` runs each backend (full-size, seeded random weights: `butd` the VG R101 detector's 36 regions, `grid`
its res5 over the whole res4 map pooled to 8 x 8, `timm:MODEL` a timm model) at each batch size, in a fresh child
process each, in turn; it prints images/s and each backend's ratio to butd at the same batch size. The last line is
`<backbone>_vs_butd=<x.xx> ...` at the largest batch size (names shortened: `timm:vit_base_patch16_224` ->
`vit_base_patch16_224`). A steady rate needs at least two batches: pass `--images` >= 2 x the largest batch.

`--compare-bf16` runs fp32 and bf16 children alternately (`--rounds`), then compares the two stores: for each fp32
box the bf16 box of highest IoU (mean IoU over the 36), whether its object and attribute labels are equal, and the
cosine of their 2048-d features. With seeded random weights (all this machine has) the class scores are nearly flat,
so which boxes win is far more fragile than with the released weights: the agreement figures are a lower bound.
It also profiles one image in each precision (`--conv-profile` children: torch.profiler with FLOP counting) and
prints the convolutions' share of the image time and their GFLOP/s -- against the machine's matrix-product peak
(`model_step.py` prints it) that says how much faster any precision could go.
The last line is `bf16_speedup=<x.xx> mean_cosine=<c.cccc> mean_iou=<i.iii> equal_objects=<o.ooo>`.
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
import inputs  # noqa: E402  (benchmarks/inputs.py)
IMAGES_ENV = "LXM_BENCH_IMAGES"  # the folder the children extract, set by main (benchmarks/inputs.py: the fixtures
#   or their stand-ins)


def images_dir() -> Path:
    return Path(os.environ[IMAGES_ENV])


def child(batch: int, device: str, bf16: bool, threads: int, keep: str | None = None, detector: str = "vg-r101",
          backbone: str = "butd") -> None:
    import torch

    from lxm.extract.pipeline import ExtractConfig, extract

    torch.set_num_threads(threads)
    marks: list[tuple[float, int]] = []  # (time, images handled) after each batch

    def progress(done: int, total: int, rate: float) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), done))

    with tempfile.TemporaryDirectory() as tmp:
        out = keep or tmp
        t0 = time.perf_counter()
        timm = backbone.startswith("timm:")
        summary = extract(ExtractConfig(images=str(images_dir()), out=out, weights="random", batch_size=batch,
                                        device=device, bf16=bf16, engine="torch", dtype="float32",
                                        detector=detector, backbone=backbone,
                                        backbone_weights="random" if timm else None), on_progress=progress)
        dt = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    # steady state: from the end of the first batch (detector built, weights set, kernels warm) to the last; a
    # backend that runs a batch at once reports its images together at the batch's end
    batches = [m for m in marks if m[1] >= min(batch, summary["extracted"])]
    steady = (batches[-1][1] - batches[0][1], batches[-1][0] - batches[0][0]) if len(batches) > 1 else (0, 0.0)
    print(json.dumps({"images": summary["extracted"], "seconds": dt, "steady_images": steady[0],
                      "steady_seconds": steady[1], "peak_rss_mb": peak, "gpu_mb": gpu}))


def conv_profile(device: str, bf16: bool, threads: int, detector: str) -> None:
    """One warm image under torch.profiler: wall time, convolution FLOPs, time, GFLOP/s and share of the op time."""
    import torch
    from torch.profiler import profile

    from lxm.extract.images import caffe_blob, load_bgr
    from lxm.devices import resolve_device
    from lxm.extract.pipeline import ExtractConfig, build_detector, detect
    from lxm.memory import keep_freed_memory

    torch.set_num_threads(threads)
    cfg = ExtractConfig(images=str(images_dir()), out="-", weights="random", device=device, bf16=bf16, engine="torch",
                        detector=detector)
    if device == "cpu":
        keep_freed_memory()  # as `lxm extract` does on CPU
    model, _ = build_detector(cfg, on_weights=lambda line: None)
    det, dev = cfg.detector_config(), resolve_device(device)
    img = load_bgr(min(images_dir().glob("*.jpg")))
    blob, scale = caffe_blob(img, det.pixel_mean_bgr, det.min_size, det.max_size)
    blobs = [(blob, scale, img.shape[:2])]
    detect(model, blobs, dev, bf16)  # warm
    t0 = time.perf_counter()
    with profile(with_flops=True) as prof:
        detect(model, blobs, dev, bf16)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    conv = [e for e in events if e.key == "aten::conv2d"]
    flops = sum(e.flops for e in conv)
    # aten::conv2d's inclusive time: whichever kernel the build picks below it (oneDNN, the slow path, cuDNN, ...)
    # is counted; naming kernels found none on a CPU where oneDNN does not take the convolutions
    conv_s = sum(e.cpu_time_total for e in conv) / 1e6
    total_s = sum(e.self_cpu_time_total for e in events) / 1e6
    print(json.dumps({"wall_s": wall, "conv_tflop": flops / 1e12, "conv_s": conv_s,
                      "conv_gflops": flops / conv_s / 1e9 if conv_s else 0.0,
                      "conv_share": conv_s / total_s if total_s else 0.0}))


def rate(res: dict) -> float:
    """Images/s in steady state (after the first batch), or over the whole call when there is one batch."""
    if res["steady_images"]:
        return res["steady_images"] / res["steady_seconds"]
    return res["images"] / res["seconds"]


def _iou(a, b):
    import numpy as np

    x1, y1 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x2, y2 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    same = (a[:, None, :] == b[None, :, :]).all(-1).astype(np.float64)  # degenerate (zero-area) boxes: 1 if equal
    return np.divide(inter, union, out=same, where=union > 0)


def agreement(ref_store: str, test_store: str) -> dict:
    """Per fp32 box: its best-IoU bf16 box; mean IoU, equal object / attribute labels, feature cosine."""
    import numpy as np

    from lxm.features.store import FeatureStore

    ref, test = FeatureStore(ref_store), FeatureStore(test_store)
    ious, objs, attrs, cos = [], [], [], []
    for img in ref.ids():
        a, b = ref.get(img), test.get(img)
        iou = _iou(a.boxes.astype(np.float64), b.boxes.astype(np.float64))
        j = iou.argmax(1)
        ious += iou[np.arange(len(j)), j].tolist()
        objs += (a.objects_id == b.objects_id[j]).tolist()
        attrs += (a.attrs_id == b.attrs_id[j]).tolist()
        fa, fb = a.features.astype(np.float64), b.features[j].astype(np.float64)
        cos += ((fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-12)).tolist()
    return {"mean_iou": float(np.mean(ious)), "equal_objects": float(np.mean(objs)),
            "equal_attributes": float(np.mean(attrs)), "mean_cosine": float(np.mean(cos)),
            "min_cosine": float(np.min(cos)), "boxes": len(ious)}


def compare_bf16(args) -> None:
    import statistics

    bs = int(args.batch_sizes.split(",")[0])
    with tempfile.TemporaryDirectory() as tmp:
        rates: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            for bf16 in (False, True):
                keep = str(Path(tmp) / f"{'bf16' if bf16 else 'fp32'}-{r}")
                cmd = [sys.executable, __file__, "--child", str(bs), "--device", args.device, "--threads",
                       str(args.threads), "--keep", keep, "--detector", args.detector] + (["--bf16"] if bf16 else [])
                res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                                 .stdout.strip().splitlines()[-1])
                rates[bf16].append(rate(res))
        fp32, bf16 = statistics.median(rates[False]), statistics.median(rates[True])
        agree = agreement(str(Path(tmp) / "fp32-0"), str(Path(tmp) / "bf16-0"))
    profiles = {}
    for bf16_child in (False, True):
        cmd = [sys.executable, __file__, "--conv-profile", "--device", args.device, "--threads", str(args.threads),
               "--detector", args.detector] + (["--bf16"] if bf16_child else [])
        prof = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
                          .splitlines()[-1])
        profiles["bf16" if bf16_child else "fp32"] = prof
        print(f"one warm image, {'bf16' if bf16_child else 'fp32'}: {prof['wall_s']:.2f} s (profiled); convolutions "
              f"{prof['conv_tflop']:.3f} TFLOP in {prof['conv_s']:.2f} s = {prof['conv_gflops']:.0f} GFLOP/s, "
              f"{prof['conv_share'] * 100:.1f} % of the op time", flush=True)
    print(f"batch {bs}, {args.device}, {args.threads} threads, {args.rounds} rounds: fp32 {fp32:.3f} img/s, bf16 "
          f"autocast {bf16:.3f} img/s ({bf16 / fp32:.2f}x); over {agree['boxes']} boxes: mean IoU "
          f"{agree['mean_iou']:.3f}, equal objects {agree['equal_objects']:.3f}, equal attributes "
          f"{agree['equal_attributes']:.3f}, feature cosine mean {agree['mean_cosine']:.4f} min "
          f"{agree['min_cosine']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": bs, "device": args.device, "fp32_img_s": fp32,
                                               "bf16_img_s": bf16, "profiles": profiles, **agree}, indent=2) + "\n")
    print(f"bf16_speedup={bf16 / fp32:.2f} mean_cosine={agree['mean_cosine']:.4f} mean_iou={agree['mean_iou']:.3f} "
          f"equal_objects={agree['equal_objects']:.3f}")


def compare_backbones(args) -> None:
    names = args.backbones.split(",")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rates: dict[tuple[str, int], float] = {}
    rows = []
    for bs in sizes:
        for name in names:
            cmd = [sys.executable, __file__, "--child", str(bs), "--device", args.device, "--threads",
                   str(args.threads), "--detector", args.detector, "--backbone", name] + (["--bf16"] if args.bf16 else [])
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
                             .splitlines()[-1])
            rates[name, bs] = rate(res)
            rows.append({"backbone": name, "batch": bs, "img_s": rate(res), **res})
            ratio = f" = {rate(res) / rates['butd', bs]:.1f}x butd" if ("butd", bs) in rates and name != "butd" else ""
            print(f"{name:>28} batch {bs}: {rate(res):8.3f} img/s after the first batch{ratio} ({res['images']} "
                  f"images in {res['seconds']:.1f} s with start-up; peak RSS {res['peak_rss_mb']:.0f} MB)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "detector": args.detector, "threads":
                                               args.threads, "rows": rows}, indent=2) + "\n")
    last = sizes[-1]
    if ("butd", last) in rates:
        print(" ".join(f"{n.removeprefix('timm:')}_vs_butd={rates[n, last] / rates['butd', last]:.2f}"
                       for n in names if n != "butd"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compare-bf16", action="store_true", help="fp32 vs bf16 autocast: speed and agreement")
    ap.add_argument("--rounds", type=int, default=2, help="alternating fp32/bf16 runs with --compare-bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--detector", default="vg-r101", help="network preset (tiny: a seconds-long smoke run)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--images", type=int, help="extract this many images (the fixtures in turn, or generated ones "
                                               "where ../shared is missing); default: the 10 fixtures")
    ap.add_argument("--backbones", help="comma-separated backends to run side by side (butd, grid, timm:MODEL); "
                                        "ratios to butd at each batch size")
    ap.add_argument("--backbone", default="butd", help=argparse.SUPPRESS)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--keep", help=argparse.SUPPRESS)
    ap.add_argument("--conv-profile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if IMAGES_ENV not in os.environ:  # main: choose the images once, for every child
        with tempfile.TemporaryDirectory() as tmp:
            os.environ[IMAGES_ENV] = str(inputs.images(Path(tmp), args.images))
            try:
                return run(args)
            finally:
                del os.environ[IMAGES_ENV]
    run(args)


def run(args) -> None:
    if args.conv_profile:
        conv_profile(args.device, args.bf16, args.threads, args.detector)
        return
    if args.child:
        child(args.child, args.device, args.bf16, args.threads, args.keep, args.detector, args.backbone)
        return
    if args.backbones:
        compare_backbones(args)
        return
    if args.compare_bf16:
        compare_bf16(args)
        return
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        cmd = [sys.executable, __file__, "--child", str(bs), "--device", args.device, "--threads", str(args.threads),
               "--detector", args.detector]
        res = json.loads(subprocess.run(cmd + (["--bf16"] if args.bf16 else []), capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
        rows.append({"batch": bs, "bf16": args.bf16, "img_s": rate(res), **res})
        print(f"batch {bs}: {rate(res):.3f} img/s after the first batch ({res['images']} images in "
              f"{res['seconds']:.1f} s with start-up = {res['images'] / res['seconds']:.3f} img/s; "
              f"{args.device}{', bf16' if args.bf16 else ''}, {args.threads} threads); peak RSS "
              f"{res['peak_rss_mb']:.0f} MB" + (f", GPU {res['gpu_mb']:.0f} MB" if res["gpu_mb"] else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "detector": args.detector, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
