"""Pipeline test: a shortened `lxm quickstart` runs every stage through the real commands and writes its report."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from lxm.cli import app


def test_quickstart_runs_the_whole_chain(tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--pretrain-epochs", "2",
                                      "--finetune-epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output  # said plainly
    report = (out / "report.md").read_text()
    for stage in ("extract train2014", "build-corpus", "pretrain", "finetune vqa", "finetune nlvr2", "predict vqa",
                  "evaluate vqa", "evaluate nlvr2", "show", "plot nlvr2"):
        assert f"| {stage} |" in report, stage
    assert "seeded random weights" in report and "![boxes](pictures/boxes.png)" in report
    # the raw files are in the official formats: the corpus builder read them, the evaluators scored against them
    vqa = json.loads((out / "predictions" / "vqa_minival_predict.json").read_text())
    minival_q = json.loads((out / "raw" / "vqa" / "minival_questions.json").read_text())["questions"]
    assert sorted(r["question_id"] for r in vqa) == sorted(q["question_id"] for q in minival_q)
    rows = list(csv.reader((out / "predictions" / "nlvr2_dev_predict.csv").open()))
    assert rows and all(label in ("True", "False") for _, label in rows)
    assert "| VQA minival, official accuracy (overall) | " in report
    for png in ("boxes.png", "pretrain/losses.png", "vqa/validation.png", "nlvr2/losses.png"):
        assert (out / "pictures" / png).stat().st_size > 2_000, png
    again = CliRunner().invoke(app, ["quickstart", "--out", str(out)])
    assert again.exit_code != 0 and "not empty" in again.output
