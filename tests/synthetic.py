"""Synthetic worlds for the learning tests: region features that encode the object and colour the text mentions.

An image has N boxes of F features; the described object fills the first COPIES boxes (as overlapping detections of
one object do in BUTD features): feature dim `object` and dim 8 + `colour` are raised by 3, everything else is
N(0, 0.1) noise. Sentences ("a red dog", "what color is the dog?") therefore need the image to be answered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from conftest import BERT_VOCAB
from lxm.cli import app
from lxm.corpus.build import GQA_SCHEMA, NLVR2_SCHEMA, VQA_SCHEMA
from lxm.features.records import ImageFeatures
from lxm.features.store import FeatureStoreWriter

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
