"""Corpus-builder time and memory at scale, extrapolated to LXMERT's full 9.18M sentences.

Generates raw files in the real COCO / VG / VQA / GQA formats (random words, real field names and id conventions) at
a chosen scale, runs `lxm build-corpus` on them in a child process, and reports wall time, peak RSS and the linear
extrapolation to full scale (targets: < 10 min and < 8 GB on this 2-core machine).

    python benchmarks/corpus.py                                    # 1M questions + 1M region descriptions
    python benchmarks/corpus.py --questions 200000 --regions 200000  # quicker
    python benchmarks/corpus.py --parse-only --rounds 5              # only the streaming readers, side by side

At the larger scale it also times the streaming reader of the huge VG / GQA files, `lxm.corpus.jsonstream`, against
ijson (when installed; its backend is printed: yajl2_c is its C parser) over the same generated files,
region_descriptions.json (a list) and train_balanced_questions.json (an object, also rewritten with every field of a
real GQA record), `--rounds` rounds, the order alternating each round, and prints medians and the ratio
ijson / jsonstream (> 1: jsonstream is faster).

The generated mix follows Table 1's proportions (questions: 21 % VQA, 34 % GQA, 45 % VG-QA; captions 11 % of the
region descriptions), so the extrapolation scales each source by the same factor.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_SCALE_SENTENCES = 9_180_000  # paper Table 1
WORDS = ("man woman dog cat red blue green table chair street car bus tree sky white black small large wooden "
         "holding sitting standing on in near under next to the a of with").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def generate(root: Path, questions: int, regions: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    # source mix of the paper's Table 1: VQA 658K, GQA 1.07M, VG-QA 1.44M questions; 5.39M regions, 617K captions
    n_vqa, n_gqa = questions * 658 // 3168, questions * 1070 // 3168
    n_vgqa = questions - n_vqa - n_gqa
    coco_images = max(regions * 617 // 5390 // 5, 10)  # 5 captions per COCO image
    vg_images = max(regions // 50, 10)  # ~50 region descriptions per VG image
    linked = vg_images * 51 // 108  # 51K of VG's 108K images are COCO images
    (root / "coco").mkdir(parents=True)
    (root / "vg").mkdir()
    (root / "vqa").mkdir()
    (root / "gqa").mkdir()
    coco_ids = {"train2014": list(range(1, coco_images * 2 // 3 + 1)),
                "val2014": list(range(coco_images * 2 // 3 + 1, coco_images + 1))}
    cap_id = 0
    for split, ids in coco_ids.items():
        anns = []
        for i in ids:
            for _ in range(5):
                cap_id += 1
                anns.append({"image_id": i, "id": cap_id, "caption": sentence(rng, 10)})
        (root / "coco" / f"captions_{split}.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in ids],
             "annotations": anns}))
    vg_ids = list(range(2_000_000, 2_000_000 + vg_images))
    (root / "vg" / "image_data.json").write_text(json.dumps(
        [{"image_id": v, "coco_id": (k + 1 if k < linked and k < coco_images else None), "width": 640, "height": 480}
         for k, v in enumerate(vg_ids)]))
    per = max(regions // vg_images, 1)
    (root / "vg" / "region_descriptions.json").write_text(json.dumps(
        [{"id": v, "regions": [{"region_id": v * 100 + j, "image_id": v, "phrase": sentence(rng, 5), "x": 1, "y": 2,
                                "width": 3, "height": 4} for j in range(per)]} for v in vg_ids]))
    per_qa = max(n_vgqa // vg_images, 1)
    (root / "vg" / "question_answers.json").write_text(json.dumps(
        [{"id": v, "qas": [{"question": sentence(rng, 6) + "?", "answer": rng.choice(WORDS).capitalize() + ".",
                            "qa_id": v * 100 + j, "image_id": v, "q_objects": [], "a_objects": []}
                           for j in range(per_qa)]} for v in vg_ids]))
    qid = 0
    for split, ids in coco_ids.items():
        qs, anns = [], []
        for _ in range(n_vqa * len(ids) // coco_images):
            qid += 1
            img = rng.choice(ids)
            qs.append({"image_id": img, "question": sentence(rng, 6) + "?", "question_id": qid})
            answers = [rng.choice(WORDS[:8]) for _ in range(10)]
            anns.append({"question_id": qid, "image_id": img, "question_type": "what", "answer_type": "other",
                         "multiple_choice_answer": answers[0],
                         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                     for k, a in enumerate(answers)]})
        (root / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": qs}))
        (root / "vqa" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": anns}))
    for name, count in (("train", n_gqa * 9 // 10), ("val", n_gqa // 10), ("testdev", 1000)):
        data = {f"{name}{k:08d}": {"imageId": str(rng.choice(vg_ids)) if name != "testdev" else f"n{k}",
                                   "question": sentence(rng, 7) + "?", "answer": rng.choice(WORDS),
                                   "isBalanced": True, "types": {"structural": "query"}} for k in range(count)}
        (root / "gqa" / f"{name}_balanced_questions.json").write_text(json.dumps(data))


def _ijson_readers():
    """(list reader, object reader) of ijson with its fastest backend, and its backend's name; None without ijson."""
    try:
        import ijson
    except ImportError:
        return None
    def items(path: Path):
        with path.open("rb") as f:  # use_float: floats as json.loads gives them (ijson's default is Decimal)
            yield from ijson.items(f, "item", use_float=True)

    def kvitems(path: Path):
        with path.open("rb") as f:
            yield from ijson.kvitems(f, "", use_float=True)

    return items, kvitems, ijson.backend


def full_gqa_records(src: Path, dst: Path) -> None:
    """`src`'s GQA questions with every field of a real record (semantic program, entailed ids, annotations, ...;
    the GQA download's layout, ~0.75 KB a question, as in the 1.3 GB train file), for timing the parser on
    real-sized elements; the builder's files carry only the fields it reads (~0.16 KB)."""
    from lxm.corpus.jsonstream import iter_json_object

    def full(qid: str, q: dict) -> dict:
        return {"semantic": [{"operation": "select", "dependencies": [], "argument": "sky (2486325)"},
                             {"operation": "verify color", "dependencies": [0], "argument": "dark"}],
                "entailed": [f"{int(qid[-8:]) + k:08d}" for k in range(1, 8)], "equivalent": [qid],
                "question": q["question"], "imageId": q["imageId"], "isBalanced": True,
                "groups": {"global": None, "local": "06-sky_dark"}, "answer": q["answer"],
                "semanticStr": "select: sky (2486325)->verify color: dark [0]",
                "annotations": {"answer": {}, "question": {"2": "2486325"}, "fullAnswer": {"2": "2486325"}},
                "types": {"detailed": "verifyAttr", "semantic": "attr", "structural": "verify"},
                "fullAnswer": f"Yes, the {q['answer']} is dark."}

    dst.write_text(json.dumps({qid: full(qid, q) for qid, q in iter_json_object(src)}))


def compare_parsers(raw: Path, rounds: int) -> None:
    """Seconds to stream every element of the VG list and the GQA object, jsonstream vs ijson, medians of `rounds`."""
    from lxm.corpus.jsonstream import iter_json_list, iter_json_object

    full_gqa_records(raw / "gqa" / "train_balanced_questions.json", raw / "gqa_full_records.json")
    files = {"vg region_descriptions.json (list)": (raw / "vg" / "region_descriptions.json", 0),
             "gqa train_balanced_questions.json (object)": (raw / "gqa" / "train_balanced_questions.json", 1),
             "gqa, every field of a real record (object)": (raw / "gqa_full_records.json", 1)}
    ours = (iter_json_list, iter_json_object)
    other = _ijson_readers()
    if other is None:
        print("parsers: ijson is not installed (pip install ijson): jsonstream alone is not a comparison; skipped")
        return
    print(f"parsers: jsonstream vs ijson {other[2]} backend, {rounds} rounds, order alternating", flush=True)
    for name, (path, kind) in files.items():
        readers = {"jsonstream": ours[kind], "ijson": other[kind]}
        assert list(readers["jsonstream"](path)) == list(readers["ijson"](path)), f"{name}: the records differ"
        times: dict[str, list[float]] = {k: [] for k in readers}
        for r in range(rounds):
            for label in (list(readers) if r % 2 == 0 else list(readers)[::-1]):
                t0 = time.perf_counter()
                count = sum(1 for _ in readers[label](path))
                times[label].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        mib = path.stat().st_size / 2**20
        print(f"  {name}: {mib:.0f} MiB, {count:,} elements: jsonstream {med['jsonstream']:.2f} s "
              f"({mib / med['jsonstream']:.0f} MiB/s), ijson {med['ijson']:.2f} s ({mib / med['ijson']:.0f} MiB/s); "
              f"ijson / jsonstream = {med['ijson'] / med['jsonstream']:.2f} "
              f"(rounds: {' '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(times['jsonstream'], times['ijson']))})",
              flush=True)


def run(questions: int, regions: int, parse_rounds: int = 0, build: bool = True) -> tuple[int, float, float]:
    """Generate, build in a child process; returns (sentences, seconds, peak RSS MB). With `parse_rounds`, first
    time the streaming readers on the generated files (`compare_parsers`)."""
    work = Path(tempfile.mkdtemp(prefix="lxm-corpus-bench-"))
    try:
        t0 = time.perf_counter()
        generate(work / "raw", questions, regions)
        size = sum(p.stat().st_size for p in (work / "raw").rglob("*.json"))
        print(f"generated {size / 2**20:.0f} MiB of raw JSON in {time.perf_counter() - t0:.1f} s", flush=True)
        raw = work / "raw"
        if parse_rounds:
            compare_parsers(raw, parse_rounds)
        if not build:
            return 0, 0.0, 0.0
        cmd = [sys.executable, "-c",
               "import resource, sys, time; from lxm.cli import main; t = time.perf_counter(); sys.argv = sys.argv[1:];"
               "\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
               "print('BENCH', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
               "file=sys.stderr)",
               "lxm", "build-corpus", "--out", str(work / "out"), "--coco", str(raw / "coco"), "--vg", str(raw / "vg"),
               "--vqa", str(raw / "vqa"), "--gqa", str(raw / "gqa")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stderr.splitlines() if x.startswith("BENCH")), None)
        if proc.returncode or line is None:
            raise SystemExit(f"build failed:\n{proc.stderr[-3000:]}")
        seconds, rss_mb = float(line.split()[1]), float(line.split()[2])
        stats = json.loads((work / "out" / "stats.json").read_text())
        sentences = stats["image_splits"]["all"]["sentences"]["all"]
        print(f"built {sentences:,} sentences in {seconds:.1f} s, peak RSS {rss_mb:.0f} MB", flush=True)
        return sentences, seconds, rss_mb
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=1_000_000)
    ap.add_argument("--regions", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the parser comparison (0: none)")
    ap.add_argument("--parse-only", action="store_true", help="only the parser comparison, at the larger scale")
    args = ap.parse_args()
    if args.parse_only:
        run(args.questions, args.regions, parse_rounds=args.rounds, build=False)
        return
    # Two scales: the fit separates the fixed cost (interpreter, imports) from the per-sentence cost.
    small = run(args.questions // 4, args.regions // 4)
    large = run(args.questions, args.regions, parse_rounds=args.rounds)
    for name, i, target, unit in (("time", 1, 10, "min"), ("peak RSS", 2, 8, "GB")):
        slope = (large[i] - small[i]) / (large[0] - small[0])
        full = large[i] + slope * (FULL_SCALE_SENTENCES - large[0])
        full = full / 60 if unit == "min" else full / 1024
        print(f"{name}: {slope * 1e6:.1f} {'s' if i == 1 else 'MB'} per million sentences; extrapolated to "
              f"{FULL_SCALE_SENTENCES:,} sentences: {full:.1f} {unit} (target < {target} {unit})")


if __name__ == "__main__":
    main()
