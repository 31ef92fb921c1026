"""Pretraining over stores of other visual backends (issue 31): a store without object/attribute labels (grid
cells, timm patches) trains without the label losses, asking for them is one error line, and stores of different
backbones in one run are refused, naming both."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from lxm.cli import app
from lxm.features import NO_LABEL, BackboneInfo, FeatureStore, FeatureStoreWriter
from synthetic import log_records, pretrain_args


def _without_labels(src, dst, name: str = "timm", model: str = "vit_tiny_patch16_224"):
    """A copy of store `src` as a label-less backbone would write it (ids NO_LABEL, confidences 0)."""
    store = FeatureStore(src)
    info = BackboneInfo(name=name, num_boxes=store.num_boxes, feature_dim=store.feature_dim, labels=False,
                        weights="random", model=model)
    with FeatureStoreWriter(dst, num_boxes=store.num_boxes, feature_dim=store.feature_dim, dtype=store.dtype,
                            backbone=info.manifest()) as writer:
        for rec in store:
            n = rec.num_boxes
            rec.objects_id = rec.attrs_id = np.full(n, NO_LABEL, np.int64)
            rec.objects_conf = rec.attrs_conf = np.zeros(n, np.float32)
            writer.add(rec)
    return dst


def _pretrain(args):
    return CliRunner().invoke(app, ["pretrain", *args])


def test_a_store_without_labels_pretrains_without_the_label_losses(data, tmp_path):
    feats = _without_labels(data / "feats", tmp_path / "patches")
    args = pretrain_args(data, tmp_path / "run", "max_steps=2", "log_every=1", "valid_split=null")
    args[args.index("--features") + 1] = str(feats)
    result = _pretrain(args)
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["objectives"] == ["mlm", "match", "feat", "qa"]  # the resolved config says what was trained
    steps = [r for r in log_records(tmp_path / "run") if "loss" in r]
    assert len(steps) == 2 and all("obj" not in r and "attr" not in r and "feat" in r for r in steps)
    # the same run over the labelled store trains all six
    result = _pretrain(pretrain_args(data, tmp_path / "labelled", "max_steps=1", "valid_split=null"))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "labelled" / "config.yaml").read_text())["objectives"] == [
        "mlm", "match", "obj", "attr", "feat", "qa"]


def test_label_losses_on_a_store_without_labels_and_mixed_backbones_are_one_line_errors(data, tmp_path):
    feats = _without_labels(data / "feats", tmp_path / "patches")
    args = pretrain_args(data, tmp_path / "run", "max_steps=1", 'objectives=["mlm", "obj", "feat"]')
    args[args.index("--features") + 1] = str(feats)
    result = _pretrain(args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert "asks for obj" in line and str(feats) in line and "no labels" in line, line
    assert not (tmp_path / "run" / "config.yaml").exists()
    args = pretrain_args(data, tmp_path / "mixed", "max_steps=1") + ["--features", str(feats)]
    result = _pretrain(args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert "different backbones" in line and str(data / "feats") in line and str(feats) in line, line
    assert json.loads((feats / "manifest.json").read_text())["backbone"]["labels"] is False


def test_finetuning_refuses_stores_of_different_backbones_naming_both(data, tmp_path):
    from lxm.train.finetune_data import FinetuneDataError, FinetuneDataset
    from lxm.train.tasks import TASKS

    feats = _without_labels(data / "feats", tmp_path / "grid", name="grid", model=None)
    with pytest.raises(FinetuneDataError, match="different backbones") as err:
        FinetuneDataset(TASKS["vqa"](), data / "corpus", ["train"], [data / "feats", feats], "unused")
    assert str(feats) in str(err.value) and str(data / "feats") in str(err.value)


@pytest.mark.e2e  # a tiny finetuning run through the lxm CLI, then lxm ask on a raw image
def test_ask_runs_the_runs_recorded_timm_backbone_on_a_raw_image_and_shades_its_patches(tmp_path):
    """A VQA model finetuned on a store of (tiny, random) ViT patches: `lxm ask` on a photo runs that ViT, as the
    store's manifest records it (no detector weights asked for), answers, and --explain shades the 16 patches."""
    import cv2

    from conftest import BERT_VOCAB, SHARED
    from synthetic import make_finetune_world

    make_finetune_world(tmp_path, train=8, valid=4)
    src = FeatureStore(tmp_path / "ft_feats")
    info = BackboneInfo(name="timm", num_boxes=16, feature_dim=32, labels=False, weights="random(seed=0)",
                        model="vit_tiny_patch16_224",
                        model_args={"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64})
    rng = np.random.default_rng(0)
    cells = np.array([[x, y, x + 1, y + 1] for y in range(4) for x in range(4)], np.float32)
    with FeatureStoreWriter(tmp_path / "vit", num_boxes=16, feature_dim=32, dtype="float32",
                            backbone=info.manifest()) as writer:
        for rec in src:
            scale = np.array([rec.img_w / 4, rec.img_h / 4] * 2, np.float32)
            writer.add(type(rec)(rec.img_id, rec.img_h, rec.img_w, np.full(16, NO_LABEL, np.int64),
                                 np.zeros(16, np.float32), np.full(16, NO_LABEL, np.int64), np.zeros(16, np.float32),
                                 cells * scale, rng.standard_normal((16, 32)).astype(np.float32)))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", "vqa", "--config", "tiny", "--set", "from_scratch=true",
                                      "--set", f"vocab={BERT_VOCAB}", "--corpus", str(tmp_path / "ft_corpus"),
                                      "--features", str(tmp_path / "vit"), "--out", str(run),
                                      "--set", "train_splits=train", "--set", "valid_split=minival",
                                      "--set", "batch_size=4", "--set", "epochs=1"])
    assert result.exit_code == 0, result.output
    image = sorted((SHARED / "fixtures" / "butd-coco-sample" / "images").glob("*.jpg"))[0]
    picture = tmp_path / "why.png"
    result = CliRunner().invoke(app, ["ask", "--model", str(run), "--image", str(image), "--question",
                                      "what is it?", "--device", "cpu", "--explain", str(picture)])
    assert result.exit_code == 0, result.output
    assert "backbone: timm:vit_tiny_patch16_224 (the run's)" in result.output and "RANDOM" in result.output
    answers = result.output.split("Q: what is it?\n")[1].splitlines()[:5]
    assert len(answers) == 5 and all(len(a.split()) == 2 for a in answers), result.output
    drawn = cv2.imread(str(picture))
    assert drawn is not None and drawn.shape[1] >= 200  # the photo, its 16 patches shaded, the question on top


def test_a_given_boxes_store_goes_through_finetune_predict_gallery_show_inspect_and_ask(tmp_path):
    """`lxm extract --boxes-file` (2 to 6 boxes an image: every batch pads) then the later commands on that store:
    finetune, predict (one answer per minival question), gallery (pictures), show, inspect; `lxm ask` on a raw image
    of such a run runs the detector's own regions (given boxes exist only for the file's images; the same detector's
    regions mean the same features)."""
    from lxm.demo.world import make_world, train_vocab

    make_world(tmp_path, train_images=12, val_images=8, nlvr2_pairs=4, image_size=96, seed=0)
    vocab = train_vocab(tmp_path)
    rng = np.random.default_rng(0)
    lines, counts = [], {}
    for split in ("train2014", "val2014"):
        for path in sorted((tmp_path / "images" / split).glob("*.jpg")):
            k = int(rng.integers(2, 7))
            xy = rng.uniform(0, 56, (k, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(8, 40, (k, 2))], 1).round(1)
            lines.append(json.dumps({"img_id": path.stem, "boxes": boxes.tolist()}))
            counts[path.stem] = k
    (tmp_path / "boxes.jsonl").write_text("\n".join(lines) + "\n")

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    feats = []
    for split in ("train2014", "val2014"):
        invoke("extract", "--images", tmp_path / "images" / split, "--out", tmp_path / "feats" / split,
               "--boxes-file", tmp_path / "boxes.jsonl", "--weights", "random", "--detector", "tiny")
        feats += ["--features", tmp_path / "feats" / split]
    store = FeatureStore(tmp_path / "feats" / "val2014")
    assert store.num_boxes == max(counts[i] for i in store.ids())
    assert all(store.get(i).num_boxes == counts[i] for i in store.ids())
    invoke("build-corpus", "--out", tmp_path / "corpus", "--coco", tmp_path / "raw" / "coco", "--vqa",
           tmp_path / "raw" / "vqa", "--minival-ids", tmp_path / "raw" / "minival.json", "--vqa-min-questions", "1",
           *feats)
    run = tmp_path / "run"
    invoke("finetune", "vqa", "--config", "tiny", "--set", "from_scratch=true", "--set", f"vocab={vocab}",
           "--corpus", tmp_path / "corpus", *feats, "--out", run, "--set", "train_splits=train",
           "--set", "batch_size=4", "--set", "epochs=1")
    invoke("predict", "vqa", "--checkpoint", run, "--split", "minival", "--out", tmp_path / "minival.json")
    questions = json.loads((tmp_path / "raw" / "vqa" / "minival_questions.json").read_text())["questions"]
    predicted = json.loads((tmp_path / "minival.json").read_text())
    assert sorted(p["question_id"] for p in predicted) == sorted(q["question_id"] for q in questions)
    invoke("gallery", run, "--split", "minival", "--images", tmp_path / "images" / "val2014", "--out",
           tmp_path / "gallery", "--limit", 4)
    assert len(list((tmp_path / "gallery").rglob("*.jpg"))) >= 4
    shown = store.ids()[0]
    invoke("show", tmp_path / "feats" / "val2014", shown, "--image", tmp_path / "images" / "val2014" / f"{shown}.jpg",
           "--out", tmp_path / "boxes.png")
    assert (tmp_path / "boxes.png").stat().st_size > 1_000
    assert "at given boxes" in invoke("inspect", tmp_path / "feats" / "val2014")
    output = invoke("ask", "--model", run, "--image", tmp_path / "images" / "val2014" / f"{shown}.jpg",
                    "--question", "What color is the square?", "--detector-weights", "random", "--detector", "tiny")
    assert "What color is the square?" in output and "tiny detector" in output, output
