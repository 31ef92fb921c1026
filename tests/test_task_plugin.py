"""A task is one class and its `TASKS` entry (issue 29 item 4): a toy task defined in this file alone is finetuned,
predicted and evaluated through the `lxm` CLI, with no other change to lxm.

The toy task ("match": does the statement describe the picture, yes / no) reads the classify files of the custom
world from its own "corpus" directory, trains a fresh two-way head with cross-entropy, and writes classification's
CSV submission, so `lxm evaluate classify` scores its predictions.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import BERT_VOCAB
from lxm.cli import app
from lxm.eval import read_classify_jsonl, write_classify_predictions
from lxm.train.tasks import TASKS, FinetuneTask, Recipe
from synthetic import make_custom_world

pytestmark = pytest.mark.e2e


class MatchTask(FinetuneTask):
    """Yes if the statement names the picture's colour and object (the classify world's "true"), else no."""

    name = "match"
    recipe = Recipe(("train",), "valid", 1e-3, epochs=2)
    submission_suffix = ".csv"
    id_column = "id"
    image_columns = ("img_id",)
    metric_names = ("accuracy",)

    def read_split(self, corpus, split):
        recs = read_classify_jsonl(self.split_source(corpus, split), require_labels=True)
        return {"id": [r.id for r in recs], "img_id": [r.img_id for r in recs], "sent": [r.text for r in recs],
                "label": [r.label == "true" for r in recs]}

    def split_source(self, corpus, split):
        return f"{corpus}/classify_{split}.jsonl"

    def model_config(self, base):
        return base.replace(task_mask_lm=False, task_matched=False, task_obj_predict=False, task_qa=True,
                            num_qa_labels=2, task_nlvr2=False)

    def init_head(self, pre, init, cfg, log):
        return {}

    def row_target(self, row):
        return int(row["label"])

    def example_target(self, target):
        return np.array(target, dtype=np.int64)

    def target_answers(self, target):
        return [(self.class_names[target], 1.0)]

    def loss(self, out, batch):
        return {self.name: F.cross_entropy(out.answer_logits.float(), batch.targets)}

    def logits(self, out):
        return out.answer_logits

    @property
    def class_names(self):
        return ["no", "yes"]

    def score(self, ids, targets, predictions):
        right = sum(predictions[i] == self.class_names[t] for i, t in zip(ids, targets))
        return {"accuracy": round(100 * right / len(ids), 2)}

    def write_predictions(self, predictions, path):
        return write_classify_predictions(predictions, path)


def test_a_task_defined_in_one_class_finetunes_predicts_and_evaluates(tmp_path, monkeypatch):
    root = tmp_path / "world"
    paths = make_custom_world(root, train=40, valid=20)
    monkeypatch.setitem(TASKS, "match", MatchTask)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "finetune", "match", "--set", "from_scratch=true", "--config", "tiny", "--corpus", str(root / "custom"),
        "--features", str(root / "ft_feats"), "--out", str(run), "--set", f"vocab={BERT_VOCAB}",
        "--set", "batch_size=16", "--set", "epochs=2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "match" and summary["epochs"] == 2 and summary["valid_split"] == "valid"
    # the recipe is the task's: its splits, and its lr under the tiny preset's (which raises every task's lr)
    config = (run / "config.yaml").read_text()
    assert "task: match" in config and "valid_split: valid" in config

    out = tmp_path / "valid_predict.csv"
    result = CliRunner().invoke(app, ["predict", "match", "--checkpoint", str(run), "--split", "valid",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", "label"] and {r[1] for r in rows[1:]} <= {"no", "yes"} and len(rows) == 41

    gold = tmp_path / "match_valid.jsonl"  # the toy labels as a classify file: lxm evaluate classify scores them
    gold.write_text("".join(json.dumps({**rec, "label": "yes" if rec["label"] == "true" else "no"}) + "\n"
                            for rec in map(json.loads, paths["classify_valid"].read_text().splitlines())))
    result = CliRunner().invoke(app, ["evaluate", "classify", "--annotations", str(gold), "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accuracy"] == summary["best"]


def test_every_list_of_task_names_is_tasks_keys(monkeypatch):
    from lxm.train.config import finetune_paper, load_finetune_config

    monkeypatch.setitem(TASKS, "match", MatchTask)
    cfg = finetune_paper("match")
    assert (cfg.train_splits, cfg.valid_split, cfg.optim.lr, cfg.optim.epochs) == (["train"], "valid", 1e-3, 2)
    with pytest.raises(Exception, match=r"'task' must be one of \('vqa', 'gqa', 'nlvr2', 'qa', 'classify', "
                                        r"'match'\), got 'nope'"):
        load_finetune_config("nope", "paper")
    result = CliRunner().invoke(app, ["predict", "nope", "--checkpoint", "x", "--split", "valid", "--out", "y"])
    assert result.exit_code != 0 and "classify, match" in result.output
