"""`lxm ask` on one raw image, warm, per visual backend (issue 31): seconds from the image file to the answer.

For each backend (`butd`: the VG R101 detector's 36 regions; `grid`: its res5 over the whole res4 map, 8 x 8;
`timm:MODEL`: a timm model's patches) a fresh child process builds what `lxm ask` builds -- the feature source
(`lxm.infer.detect.Detector`, full size, seeded random weights: the cost of real ones) and a base-size LXMERT VQA
model (9/5/5 layers, 3,129 answers, random init) whose `visual_feat_dim` is the backend's D -- answers one question
about one fixture photo to warm up, then answers `--repeats` more, each about another photo, through the same
library call as `lxm ask` (`lxm.infer.answer_requests`). It reports the median seconds of an answer (features +
model), and its two parts measured apart (the feature source alone, the model alone on the records).

    python benchmarks/ask_latency.py                                   # butd, grid, timm:vit_base_patch16_224
    python benchmarks/ask_latency.py --backbones grid,timm:vit_base_patch16_224 --repeats 5 --device cuda

The last line is `<backbone>_ask_s=<s.sss> ...` (median seconds per answer; names shortened as in
extract_throughput.py: `timm:vit_base_patch16_224` -> `vit_base_patch16_224`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import inputs  # noqa: E402  (benchmarks/inputs.py)

QUESTION = "what color is the bus?"


def child(backbone: str, device: str, threads: int, repeats: int, images: Path, vocab: Path) -> None:
    import torch

    from lxm.extract.pipeline import ExtractConfig
    from lxm.infer import Answerer, ImageRef, Request, answer_requests
    from lxm.infer.detect import Detector
    from lxm.model import LxmertForFinetuning, LxmertTokenizer, lxmert_base
    from lxm.train.tasks import VqaTask

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    timm = backbone.startswith("timm:")
    t0 = time.perf_counter()
    source = Detector(ExtractConfig(images=str(images), out="-", weights="random", device=device, engine="torch",
                                    detector="vg-r101", backbone=backbone,
                                    backbone_weights="random" if timm else None), on_weights=lambda line: None)
    task = VqaTask([f"answer{i}" for i in range(3129)])
    model = LxmertForFinetuning(task.model_config(lxmert_base(visual_feat_dim=source.info.feature_dim))).eval()
    answerer = Answerer(task, model, LxmertTokenizer(vocab, max_length=20), "benchmark", "random").to(device)
    built = time.perf_counter() - t0
    photos = sorted(images.glob("*.jpg"))

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def ask(photo: Path) -> float:
        t = time.perf_counter()
        request = Request(QUESTION, "question", (ImageRef(path=str(photo)),), "benchmark")
        list(answer_requests(answerer, [request], source))
        sync()
        return time.perf_counter() - t

    ask(photos[0])  # warm-up: first-call kernel set-up, allocator growth
    total = [ask(photos[1 + i % (len(photos) - 1)]) for i in range(repeats)]
    feats, answer = [], []
    for i in range(repeats):
        photo = photos[1 + i % (len(photos) - 1)]
        t = time.perf_counter()
        records = source.records([str(photo)])
        sync()
        feats.append(time.perf_counter() - t)
        t = time.perf_counter()
        answerer.predict([QUESTION], [records], 5)
        sync()
        answer.append(time.perf_counter() - t)
    print(json.dumps({"built_s": built, "ask_s": statistics.median(total), "features_s": statistics.median(feats),
                      "model_s": statistics.median(answer), "boxes": int(source.info.num_boxes),
                      "dim": int(source.info.feature_dim)}))


def short(backbone: str) -> str:
    return backbone.removeprefix("timm:")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default="butd,grid,timm:vit_base_patch16_224")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="answers timed after the warm-up (median reported)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--images", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.device, args.threads, args.repeats, Path(args.images), Path(args.vocab))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = inputs.images(Path(tmp) / "images", count=max(4, args.repeats + 1))
        vocab = inputs.vocab(Path(tmp), QUESTION.replace("?", "").split())
        for backbone in args.backbones.split(","):
            cmd = [sys.executable, __file__, "--child", backbone, "--device", args.device, "--threads",
                   str(args.threads), "--repeats", str(args.repeats), "--images", str(images), "--vocab", str(vocab)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[backbone] = json.loads(out.strip().splitlines()[-1])
            r = results[backbone]
            print(f"{backbone:32s} {r['boxes']:4d} x {r['dim']:4d}  ask {r['ask_s']:8.3f} s  (features "
                  f"{r['features_s']:.3f} s + model {r['model_s']:.3f} s; built in {r['built_s']:.1f} s)", flush=True)
    print(" ".join(f"{short(b)}_ask_s={r['ask_s']:.3f}" for b, r in results.items()))


if __name__ == "__main__":
    main()
