"""Learning test: on a synthetic world whose region features encode the objects and colours its sentences mention,
a tiny LXMERT pretrained for ~1,000 CPU steps gets held-out QA and MLM accuracy far above chance.

Image-text matching does not rise above chance within this budget yet (measured 0.5); see the notes of issue 5.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from conftest import BERT_VOCAB
from lxm.cli import app
from lxm.extract.records import ImageFeatures
from lxm.extract.store import FeatureStoreWriter
from lxm.train.data import PretrainDataset, collate

OBJECTS = ["dog", "cat", "car", "tree", "ball", "hat", "cup", "bus"]
COLORS = ["red", "blue", "green", "yellow"]
N, F = 6, 16


def make_world(root, images: int = 240, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("uid", "img_id", "source", "split", "text", "labels")}
    with FeatureStoreWriter(root / "feats", num_boxes=N, feature_dim=F, dtype="float32") as w:
        for i in range(images):
            img = f"img{i:04d}"
            objs = rng.choice(len(OBJECTS), 2, replace=False)
            cols = rng.integers(0, len(COLORS), 2)
            feats = rng.normal(0, 0.1, (N, F)).astype(np.float32)
            for b in range(2):  # the two described boxes carry their object and colour
                feats[b, objs[b]] += 3.0
                feats[b, 8 + cols[b]] += 3.0
            xy = rng.uniform(0, 60, (N, 2)).astype(np.float32)
            # background boxes: arbitrary labels with zero detector confidence (weighted out of obj/attr losses)
            conf = np.array([1, 1] + [0] * (N - 2), np.float32)
            w.add(ImageFeatures(img, 100, 100, np.concatenate([objs, rng.integers(0, 8, N - 2)]).astype(np.int64),
                                conf, np.concatenate([cols, rng.integers(0, 4, N - 2)]).astype(np.int64), conf,
                                np.concatenate([xy, xy + 30], 1), feats))
            split = "minival" if i >= images - 40 else "train"
            sents = [("mscoco", f"a {COLORS[cols[0]]} {OBJECTS[objs[0]]} and a {COLORS[cols[1]]} {OBJECTS[objs[1]]}",
                      [])]
            sents += [("vqa", f"what color is the {OBJECTS[objs[b]]}?", [(COLORS[cols[b]], 1.0)]) for b in range(2)]
            for k, (src, text, labels) in enumerate(sents):
                rows["uid"].append(f"{img}_{src}_{k:03d}")
                rows["img_id"].append(img)
                rows["source"].append(src)
                rows["split"].append(split)
                rows["text"].append(text)
                rows["labels"].append(labels)
    (root / "corpus" / "vocab").mkdir(parents=True)
    schema = pa.schema([("uid", pa.string()), ("img_id", pa.string()), ("source", pa.string()),
                        ("split", pa.string()), ("text", pa.string()), ("labels", pa.map_(pa.string(), pa.float32()))])
    pq.write_table(pa.table(rows, schema=schema), root / "corpus" / "corpus.parquet")
    (root / "corpus" / "vocab" / "qa_answers.json").write_text(json.dumps([{"ans": c, "dsets": ["vqa"]}
                                                                           for c in COLORS]))


def test_pretraining_learns_mlm_matching_and_qa(tmp_path):
    make_world(tmp_path)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "pretrain", "--config", "tiny", "--corpus", str(tmp_path / "corpus"), "--features", str(tmp_path / "feats"),
        "--out", str(run), "--set", f"vocab={BERT_VOCAB}", "--set", "batch_size=32", "--set", "epochs=60",
        "--set", "lr=1e-3", "--set", "warmup=0.05", "--set", "dropout=0", "--set", "log_every=20",
        "--set", "checkpoint_every=1000", "--set", "keep_last=1"])
    assert result.exit_code == 0, result.output
    state = torch.load(run / "checkpoints" / sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))[-1],
                       map_location="cpu", weights_only=True)
    from lxm.model import LxmertForPreTraining, lxmert_tiny

    model = LxmertForPreTraining(lxmert_tiny(vocab_size=30522, visual_feat_dim=F, num_qa_labels=len(COLORS)))
    model.load_state_dict(state["model"])
    model.eval()
    valid = PretrainDataset(tmp_path / "corpus", [tmp_path / "feats"], BERT_VOCAB, COLORS, splits=["minival"],
                            seed=123)
    match_ok = match_n = qa_ok = qa_n = mlm_ok = mlm_n = 0
    with torch.no_grad():
        for epoch in range(5):
            valid.set_epoch(epoch)
            for batch in DataLoader(valid, batch_size=64, collate_fn=collate):
                out = model(**batch.model_inputs())
                match_ok += int((out.match_logits.argmax(-1) == batch.labels.matched).sum())
                match_n += len(batch.uids)
                has = batch.labels.answers >= 0
                qa_ok += int((out.answer_logits.argmax(-1)[has] == batch.labels.answers[has]).sum())
                qa_n += int(has.sum())
                masked = batch.labels.mlm_labels >= 0
                mlm_ok += int((out.mlm_logits.argmax(-1)[masked] == batch.labels.mlm_labels[masked]).sum())
                mlm_n += int(masked.sum())
    match_acc, qa_acc, mlm_acc = match_ok / match_n, qa_ok / qa_n, mlm_ok / mlm_n
    print(f"held-out images: matching {match_acc:.2f} (chance 0.5), QA {qa_acc:.2f} (chance 0.25), "
          f"MLM {mlm_acc:.2f} (chance ~0)")
    assert qa_acc > 0.45  # chance 0.25: the answer (a colour) is only in the image (measured 0.58)
    assert mlm_acc > 0.5  # chance 1/30522 (measured 0.76)
