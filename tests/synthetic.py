"""The tests' shared worlds and helpers; test modules import them from here, never from one another.

- Raw files (`write_raw`, `build_corpus`): small annotation files of every source in the original formats, with the
  cases the corpus builder must handle; their VQA records come from the library's synthetic world
  (`lxm.demo.world.vqa_annotation`), as the quickstart's do.
- A tiny corpus with random features (`make_tiny_corpus`, conftest's `data` fixture) and the `lxm pretrain`
  arguments over it (`pretrain_args`), with the run's log (`log_records`).
- Learning worlds: region features that encode the object and colour the text mentions. An image has N boxes of F
  features; the described object fills the first COPIES boxes (as overlapping detections of one object do in BUTD
  features): feature dim `object` and dim 8 + `colour` are raised by 3, everything else is N(0, 0.1) noise.
  Sentences ("a red dog", "what color is the dog?") therefore need the image to be answered.
- A static file server with HTTP Range support (`RangeHandler`, `serve_folder`), as weight servers offer.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from conftest import BERT_VOCAB
from lxm.cli import app
from lxm.corpus.build import GQA_SCHEMA, NLVR2_SCHEMA, VQA_SCHEMA
from lxm.demo.world import vqa_annotation
from lxm.features.records import ImageFeatures
from lxm.features.store import FeatureStoreWriter

# ---------------------------------------------------------------------------------------------------- raw files


def write_raw(root: Path) -> None:
    """Small raw files of every source in the original formats (records modelled on ../shared/reference/datasets.md)
    under root/{coco,vg,vqa,gqa,nlvr2} and root/minival.json, with the cases the corpus builder must handle: a
    duplicate caption id, an annotation of an unlisted image, VG images with and without a COCO id, test splits."""
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "captions_train2014.json").write_text(json.dumps({
        "info": {}, "licenses": [], "images": [{"id": 458752, "file_name": "COCO_train2014_000000458752.jpg"},
                                               {"id": 262146, "file_name": "COCO_train2014_000000262146.jpg"}],
        "annotations": [{"image_id": 458752, "id": 101, "caption": "A baseball player winds up to pitch behind a net."},
                        {"image_id": 458752, "id": 102, "caption": "A pitcher in an orange shirt throws a ball "},
                        {"image_id": 262146, "id": 103, "caption": "Two dogs lying on a couch next to a window."},
                        {"image_id": 262146, "id": 103, "caption": "duplicate caption id"}]}))
    (root / "coco" / "captions_val2014.json").write_text(json.dumps({
        "images": [{"id": 393225}, {"id": 500000}],
        "annotations": [{"image_id": 393225, "id": 201, "caption": "A bowl of soup."},
                        {"image_id": 500000, "id": 202, "caption": "A cat on a mat."},
                        {"image_id": 999, "id": 203, "caption": "An image nobody listed."}]}))
    (root / "vg").mkdir()
    (root / "vg" / "image_data.json").write_text(json.dumps([
        {"image_id": 2379215, "coco_id": 458752, "width": 640, "height": 480},
        {"image_id": 2400001, "coco_id": None, "width": 800, "height": 600},
        {"image_id": 2401002, "coco_id": 393225, "width": 500, "height": 375}]))
    (root / "vg" / "region_descriptions.json").write_text(json.dumps([
        {"id": 2379215, "regions": [{"region_id": 5001, "image_id": 2379215, "phrase": "man in orange shirt"},
                                    {"region_id": 5002, "image_id": 2379215, "phrase": "green net in front "}]},
        {"id": 2400001, "regions": [{"region_id": 5003, "image_id": 2400001, "phrase": "a red bus on the street"}]}]))
    (root / "vg" / "question_answers.json").write_text(json.dumps([
        {"id": 2379215, "qas": [{"question": "What color is the shirt?", "answer": "Orange.", "qa_id": 900001}]},
        {"id": 2400001, "qas": [{"question": "Where is the bus?", "answer": "On the street.", "qa_id": 900002},
                                {"question": "How many buses are there?", "answer": "One.", "qa_id": 900003}]}]))
    (root / "vqa").mkdir()
    qs = {"train2014": [{"image_id": 458752, "question": "What is the man throwing?", "question_id": 458752000},
                        {"image_id": 458752, "question": "Is the man wearing a hat?", "question_id": 458752001},
                        {"image_id": 262146, "question": "How many dogs are there?", "question_id": 262146000}],
          "val2014": [{"image_id": 393225, "question": "What is in the bowl?", "question_id": 393225000},
                      {"image_id": 500000, "question": "Is this a cat?", "question_id": 500000000}],
          "test2015": [{"image_id": 1, "question": "What?", "question_id": 1000}],
          "test-dev2015": [{"image_id": 1, "question": "What?", "question_id": 1000}]}
    for split, questions in qs.items():
        (root / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": questions}))
    anns = {"train2014": [
        vqa_annotation(458752000, 458752, "ball", "what is", "other",
                       ["ball", "ball", "baseball", "ball", "ball", "baseball", "ball", "a ball", "pitch", "ball"]),
        vqa_annotation(458752001, 458752, "no", "is the", "yes/no", ["no"] * 6 + ["yes"] + ["no"] * 3),
        vqa_annotation(262146000, 262146, "2", "how many", "number",
                       ["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"])],
        "val2014": [vqa_annotation(393225000, 393225, "soup", "what is", "other"),
                    vqa_annotation(500000000, 500000, "yes", "what is", "other")]}
    for split, a in anns.items():
        (root / "vqa" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": a}))
    (root / "gqa").mkdir()
    (root / "gqa" / "train_balanced_questions.json").write_text(json.dumps({
        "07333408": {"imageId": "2379215", "question": "What color is the shirt?", "answer": "orange",
                     "isBalanced": True, "types": {"structural": "query"}},
        "07333409": {"imageId": "2379215", "question": "Is the shirt orange?", "answer": "yes", "isBalanced": True,
                     "types": {"structural": "verify"}}}))
    (root / "gqa" / "val_balanced_questions.json").write_text(json.dumps({
        "1": {"imageId": "2400001", "question": "What vehicle is this?", "answer": "bus", "isBalanced": True}}))
    (root / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps({
        "201": {"imageId": "n161313", "question": "Is the sky cloudy?", "answer": "yes", "isBalanced": True},
        "202": {"imageId": "n161313", "question": "What color is the sky?", "answer": "teal", "isBalanced": True}}))
    (root / "nlvr2").mkdir()
    line = {"validation": {"54": "True"}, "sentence": "Each image contains exactly two dogs.", "left_url": "u",
            "writer": "77", "label": "True", "right_url": "v", "synset": "dog", "query": "two dogs12",
            "identifier": "dev-1203-0-0", "extra_validations": {}}
    (root / "nlvr2" / "dev.json").write_text(
        json.dumps(line) + "\n" + json.dumps({**line, "identifier": "dev-1203-2-0", "label": "False"}) + "\n")
    (root / "nlvr2" / "train.json").write_text(json.dumps({**line, "identifier": "train-10171-0-0"}) + "\n")
    (root / "nlvr2" / "test1.json").write_text(json.dumps({**line, "identifier": "test1-5-1-1"}) + "\n")
    (root / "minival.json").write_text(json.dumps([{"img_id": "COCO_val2014_000000500000", "sentf": {}}]))


def build_corpus(root: Path, *extra):
    """`lxm build-corpus` over the `write_raw` files in root, into root/out; the CliRunner result."""
    args = ["build-corpus", "--out", str(root / "out"), "--coco", str(root / "coco"), "--vg", str(root / "vg"),
            "--vqa", str(root / "vqa"), "--gqa", str(root / "gqa"), "--nlvr2", str(root / "nlvr2"),
            "--minival-ids", str(root / "minival.json"), "--vqa-min-questions", "1", *extra]
    return CliRunner().invoke(app, args)


# ---------------------------------------------------------------------------------------------------- a tiny corpus


def make_tiny_corpus(root: Path) -> Path:
    """root/corpus built by `lxm build-corpus` from the `write_raw` files (no NLVR2), and root/feats: random
    features (6 boxes of 16) for each of its images. Returns root."""
    write_raw(root)
    assert CliRunner().invoke(app, ["build-corpus", "--out", str(root / "corpus"), "--coco", str(root / "coco"),
                                    "--vg", str(root / "vg"), "--vqa", str(root / "vqa"), "--gqa", str(root / "gqa"),
                                    "--minival-ids", str(root / "minival.json"), "--vqa-min-questions", "1"]
                              ).exit_code == 0
    ids = sorted(set(pq.read_table(root / "corpus" / "corpus.parquet").column("img_id").to_pylist()))
    rng = np.random.default_rng(0)
    with FeatureStoreWriter(root / "feats", num_boxes=6, feature_dim=16, dtype="float32") as w:
        for img_id in ids:
            xy = rng.uniform(0, 50, (6, 2)).astype(np.float32)
            w.add(ImageFeatures(img_id, 100, 200, rng.integers(0, 10, 6), rng.random(6, np.float32),
                                rng.integers(0, 6, 6), rng.random(6, np.float32), np.concatenate([xy, xy + 40], 1),
                                rng.random((6, 16), np.float32)))
    return root


def pretrain_args(data: Path, out: Path, *sets: str) -> list[str]:
    """`lxm pretrain` arguments for the tiny model on the `make_tiny_corpus` world in `data`, batch 4, plus
    `--set` for each of `sets`."""
    base = ["--config", "tiny", "--corpus", str(data / "corpus"), "--features", str(data / "feats"), "--out", str(out),
            "--set", f"vocab={BERT_VOCAB}", "--set", "batch_size=4"]
    for s in sets:
        base += ["--set", s]
    return base


def log_records(out: Path) -> list[dict]:
    """Every record of run `out`'s log.jsonl, in order."""
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- learning worlds


OBJECTS = ["dog", "cat", "car", "tree", "ball", "hat", "cup", "bus"]
COLORS = ["red", "blue", "green", "yellow"]
N, F = 6, 16
COPIES = 3  # boxes showing the described object


def image(img_id: str, obj: int, col: int, rng: np.random.Generator) -> ImageFeatures:
    feats = rng.normal(0, 0.1, (N, F)).astype(np.float32)
    feats[:COPIES, obj] += 3.0
    feats[:COPIES, 8 + col] += 3.0
    xy = rng.uniform(0, 60, (N, 2)).astype(np.float32)
    # background boxes: arbitrary labels with zero detector confidence (weighted out of obj/attr losses)
    conf = np.array([1] * COPIES + [0] * (N - COPIES), np.float32)
    objs = np.concatenate([[obj] * COPIES, rng.integers(0, 8, N - COPIES)]).astype(np.int64)
    cols = np.concatenate([[col] * COPIES, rng.integers(0, 4, N - COPIES)]).astype(np.int64)
    return ImageFeatures(img_id, 100, 100, objs, conf, cols, conf, np.concatenate([xy, xy + 30], 1), feats)


def make_pretraining_world(root: Path, images: int = 240, seed: int = 0) -> None:
    """root/feats (store) and root/corpus (corpus.parquet + vocab/qa_answers.json = the colours); the last 40
    images are minival."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("uid", "img_id", "source", "split", "text", "labels")}
    with FeatureStoreWriter(root / "feats", num_boxes=N, feature_dim=F, dtype="float32") as w:
        for i in range(images):
            img, obj, col = f"img{i:04d}", int(rng.integers(len(OBJECTS))), int(rng.integers(len(COLORS)))
            w.add(image(img, obj, col, rng))
            split = "minival" if i >= images - 40 else "train"
            sents = [("mscoco", f"a {COLORS[col]} {OBJECTS[obj]}", []),
                     ("vqa", f"what color is the {OBJECTS[obj]}?", [(COLORS[col], 1.0)])]
            for k, (src, text, labels) in enumerate(sents):
                for key, value in zip(rows, (f"{img}_{src}_{k:03d}", img, src, split, text, labels)):
                    rows[key].append(value)
    (root / "corpus" / "vocab").mkdir(parents=True)
    schema = pa.schema([("uid", pa.string()), ("img_id", pa.string()), ("source", pa.string()),
                        ("split", pa.string()), ("text", pa.string()), ("labels", pa.map_(pa.string(), pa.float32()))])
    pq.write_table(pa.table(rows, schema=schema), root / "corpus" / "corpus.parquet")
    (root / "corpus" / "vocab" / "qa_answers.json").write_text(json.dumps([{"ans": c, "dsets": ["vqa"]}
                                                                           for c in COLORS]))


def pretrain(root: Path, epochs: int = 120) -> Path:
    """Pretrain the tiny model on the world in `root` through the CLI (~1,400 steps, ~90 s on 2 cores)."""
    run = root / "run"
    result = CliRunner().invoke(app, [
        "pretrain", "--config", "tiny", "--corpus", str(root / "corpus"), "--features", str(root / "feats"),
        "--out", str(run), "--set", f"vocab={BERT_VOCAB}", "--set", "batch_size=32", "--set", f"epochs={epochs}",
        "--set", "lr=1e-3", "--set", "warmup=0.05", "--set", "dropout=0", "--set", "log_every=20",
        "--set", "checkpoint_every=1000", "--set", "keep_last=1"])
    assert result.exit_code == 0, result.output
    return run


VQA_ANSWERS = [*COLORS, *OBJECTS]


def make_finetune_world(root: Path, train: int = 160, valid: int = 100, seed: int = 1) -> None:
    """New images (root/ft_feats) and a corpus (root/ft_corpus) with small VQA-like and NLVR2-like tables.

    VQA: per image "what color is the <obj>?" (answers in the pretraining QA table: their rows are copied) and
    "what is the <colour> thing?" (object answers, not in that table: rows start at zero); 12 answers.
    NLVR2: caption-like statements "a <colour> <obj>" over image pairs, true when both images show it (half).
    `train` images / pairs for training, `valid` for validation (vqa minival, nlvr2 dev).
    """
    rng = np.random.default_rng(seed)
    vqa = {"train": [], "minival": []}
    nlvr2 = {"train": [], "dev": []}
    qid = 0
    with FeatureStoreWriter(root / "ft_feats", num_boxes=N, feature_dim=F, dtype="float32") as w:
        for i in range(train + valid):
            img, obj, col = f"ft{i:04d}", int(rng.integers(len(OBJECTS))), int(rng.integers(len(COLORS)))
            w.add(image(img, obj, col, rng))
            split = "minival" if i >= train else "train"
            for text, answer in ((f"what color is the {OBJECTS[obj]}?", COLORS[col]),
                                 (f"what is the {COLORS[col]} thing?", OBJECTS[obj])):
                qid += 1
                vqa[split].append(dict(question_id=qid, img_id=img, sent=text, label=[(answer, 1.0)],
                                       answer_type="other", question_type="what"))
        for p in range(train + valid):
            obj, col = int(rng.integers(len(OBJECTS))), int(rng.integers(len(COLORS)))
            true = bool(rng.random() < 0.5)
            shown = [(obj, col), (obj, col)]
            if not true:  # one of the two images shows another object
                other = int((obj + rng.integers(1, len(OBJECTS))) % len(OBJECTS))
                shown[int(rng.integers(2))] = (other, int(rng.integers(len(COLORS))))
            split = "dev" if p >= train else "train"
            stem = f"{split}-{p}-0"
            for k in range(2):
                w.add(image(f"{stem}-img{k}", *shown[k], rng))
            nlvr2[split].append(dict(identifier=f"{stem}-0", img0=f"{stem}-img0", img1=f"{stem}-img1",
                                     label=int(true), sent=f"a {COLORS[col]} {OBJECTS[obj]}", uid=f"nlvr2_{split}_{p}"))
    corpus = root / "ft_corpus"
    (corpus / "finetune").mkdir(parents=True)
    (corpus / "vocab").mkdir()
    for split, recs in vqa.items():
        pq.write_table(pa.Table.from_pylist(recs, schema=VQA_SCHEMA), corpus / "finetune" / f"vqa_{split}.parquet")
    pq.write_table(pa.Table.from_pylist([{**r, "label": None} for r in vqa["minival"]], schema=VQA_SCHEMA),
                   corpus / "finetune" / "vqa_test.parquet")
    for split, recs in nlvr2.items():
        pq.write_table(pa.Table.from_pylist(recs, schema=NLVR2_SCHEMA), corpus / "finetune" / f"nlvr2_{split}.parquet")
    for split, recs in (("train", vqa["train"]), ("testdev", vqa["minival"])):  # GQA-like: the same questions
        gqa = [dict(question_id=f"g{r['question_id']}", img_id=r["img_id"], sent=r["sent"], label=r["label"])
               for r in recs]
        pq.write_table(pa.Table.from_pylist(gqa, schema=GQA_SCHEMA), corpus / "finetune" / f"gqa_{split}.parquet")
    (corpus / "vocab" / "vqa_answers.json").write_text(json.dumps(VQA_ANSWERS))
    (corpus / "vocab" / "gqa_answers.json").write_text(json.dumps(VQA_ANSWERS))
    (corpus / "vocab" / "qa_answers.json").write_text(json.dumps([{"ans": c} for c in COLORS]))


def make_custom_world(root: Path, train: int = 160, valid: int = 100, seed: int = 1) -> dict[str, Path]:
    """`make_finetune_world` plus custom-dataset JSON lines files over its images (root/custom/*.jsonl).

    qa: per image "what color is the <obj>?" and "what is the <colour> thing?", ten annotator answers each: 7-9
    give the right one, the others another answer of the kind (annotators disagree; soft scores < 1 for them).
    classify: per image two statements "a <colour> <obj>" labelled "true" (as shown), "colour" (another colour)
    or "object" (another object), a third each. train / valid from the world's train / minival images; test = valid
    without labels. Returns name -> path: qa_train, qa_valid, qa_test, classify_train, classify_valid, classify_test.
    """
    make_finetune_world(root, train=train, valid=valid, seed=seed)
    rng = np.random.default_rng(seed + 100)
    out = root / "custom"
    out.mkdir()
    paths = {}
    for split, table in (("train", "train"), ("valid", "minival")):
        rows = pq.read_table(root / "ft_corpus" / "finetune" / f"vqa_{table}.parquet").to_pylist()
        shown = {}  # img_id -> (object, colour), read back from the world's two questions per image
        for r in rows:
            answer = r["label"][0][0]
            kind = 1 if answer in COLORS else 0
            shown.setdefault(r["img_id"], [None, None])[kind] = answer
        qa, cls = [], []
        for img, (obj, col) in shown.items():
            for text, right, pool in ((f"what color is the {obj}?", col, COLORS),
                                      (f"what is the {col} thing?", obj, OBJECTS)):
                wrong = int(rng.integers(1, 4))
                others = [a for a in pool if a != right]
                answers = [right] * (10 - wrong) + [others[int(rng.integers(len(others)))] for _ in range(wrong)]
                qa.append({"question_id": len(qa) + 1 + (0 if split == "train" else 100000), "img_id": img,
                           "question": text, "answers": answers, "answer_type": "other"})
            for k in range(2):
                label = ("true", "colour", "object")[int(rng.integers(3))]
                c = col if label != "colour" else [x for x in COLORS if x != col][int(rng.integers(len(COLORS) - 1))]
                o = obj if label != "object" else [x for x in OBJECTS if x != obj][int(rng.integers(len(OBJECTS) - 1))]
                cls.append({"id": f"{split}-{img}-{k}", "img_id": img, "text": f"a {c} {o}", "label": label})
        for task, recs in (("qa", qa), ("classify", cls)):
            paths[f"{task}_{split}"] = out / f"{task}_{split}.jsonl"
            paths[f"{task}_{split}"].write_text("".join(json.dumps(r) + "\n" for r in recs))
            if split == "valid":
                drop = "answers" if task == "qa" else "label"
                paths[f"{task}_test"] = out / f"{task}_test.jsonl"
                paths[f"{task}_test"].write_text("".join(json.dumps({k: v for k, v in r.items() if k != drop}) + "\n"
                                                         for r in recs))
    return paths


def one_and_two_process_losses(args, tmp_path: Path, port: int) -> tuple[dict[int, float], dict[int, float]]:
    """Per-step losses of one `lxm` command (args(out) -> its arguments) run as one process and under torchrun with
    two (gloo on CPU), each into its own run directory below tmp_path."""
    import subprocess
    import sys

    one = subprocess.run([sys.executable, "-m", "lxm.cli", *args(tmp_path / "one")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "lxm.cli", *args(tmp_path / "two")], capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if "loss" in r}

    return losses(tmp_path / "one"), losses(tmp_path / "two")


# ---------------------------------------------------------------------------------------------------- a file server


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (what weight servers offer), for the download and resume tests."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        data = open(path, "rb").read()
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


def serve_folder(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve `folder` with `RangeHandler` on a free local port, in a daemon thread: (server, its base URL). Call
    `server.shutdown()` when done."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a, **k: RangeHandler(*a, directory=str(folder), **k))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
