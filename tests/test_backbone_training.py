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
