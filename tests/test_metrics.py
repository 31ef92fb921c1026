"""Official metrics on hand-made cases covering the normalisation rules and the consistency grouping."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lxm.cli import app
from lxm.train.metrics import PredictionError, gqa_accuracy, nlvr2_metrics, vqa_accuracy, vqa_question_accuracy


def test_vqa_leave_one_out_table():
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        gts = ["cat"] * k + ["dog"] * (10 - k)
        assert vqa_question_accuracy("cat", gts) == pytest.approx(expected)


def test_vqa_normalises_only_when_annotators_disagree():
    assert vqa_question_accuracy("Yes", ["yes"] * 10) == 0.0  # unanimous: exact, case-sensitive
    assert vqa_question_accuracy(" yes\n", ["yes"] * 10) == 1.0  # whitespace is always cleaned
    mixed = ["two dogs"] * 5 + ["2 dogs"] * 5
    assert vqa_question_accuracy("2 Dogs.", mixed) == 1.0  # numbers, case, periods once normalised
    assert vqa_question_accuracy("the cat", ["cat"] * 4 + ["a cat"] * 6) == 1.0  # articles
    assert vqa_question_accuracy("dont know", ["don't know"] * 3 + ["no"] * 7) == pytest.approx(0.9)  # contractions
    assert vqa_question_accuracy("red white", ["red/white"] * 3 + ["red"] * 7) == pytest.approx(0.9)  # slash -> space


def test_vqa_accuracy_groups_and_rounding():
    anns = [{"question_id": 1, "answer_type": "yes/no", "question_type": "is the", "answers": [{"answer": "yes"}] * 10},
            {"question_id": 2, "answer_type": "number", "question_type": "how many",
             "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8}]
    out = vqa_accuracy(anns, {1: "yes", 2: "2"})
    assert out == {"overall": 80.0, "perAnswerType": {"yes/no": 100.0, "number": 60.0},
                   "perQuestionType": {"is the": 100.0, "how many": 60.0}}
    with pytest.raises(PredictionError, match="1 questions without a prediction"):
        vqa_accuracy(anns, {1: "yes"})
    with pytest.raises(PredictionError, match="1 predictions for unknown questions"):
        vqa_accuracy(anns, {1: "yes", 2: "2", 3: "x"})


def test_gqa_balanced_exact_match_and_types():
    qs = {"1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
          "2": {"answer": "red", "isBalanced": True, "types": {"structural": "query"}},
          "3": {"answer": "cup", "isBalanced": False, "types": {"structural": "query"}}}
    assert gqa_accuracy(qs, {"1": "yes", "2": "Red", "3": "x"}) == {"accuracy": 50.0, "binary": 100.0, "open": 0.0}
    with pytest.raises(PredictionError, match="balanced questions without a prediction"):
        gqa_accuracy(qs, {"1": "yes"})


def test_nlvr2_accuracy_and_consistency_groups():
    labels = {"dev-1203-0-0": "True", "dev-1203-2-0": "False", "dev-1203-2-1": "True", "dev-7-1-0": "False"}
    preds = {"dev-1203-0-0": "true", "dev-1203-2-0": "True", "dev-1203-2-1": "TRUE", "dev-7-1-0": "False"}
    # groups: dev-1203--0 (one wrong) / dev-1203--1 / dev-7--0 -> 2 of 3 consistent
    assert nlvr2_metrics(labels, preds) == {"accuracy": 75.0, "consistency": 66.67}


def test_evaluate_cli_contract(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 1, "answer_type": "other", "question_type": "what", "answers": [{"answer": "ball"}] * 10},
        {"question_id": 9, "answer_type": "other", "question_type": "what", "answers": [{"answer": "x"}] * 10}]}))
    (tmp_path / "r.json").write_text(json.dumps([{"question_id": 1, "answer": "ball"}]))
    out = CliRunner().invoke(app, ["evaluate", "vqa", "--questions", str(tmp_path / "q.json"), "--annotations",
                                   str(tmp_path / "a.json"), "--predictions", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["overall"] == 100.0
    (tmp_path / "dev.json").write_text(json.dumps({"identifier": "dev-1-0-0", "label": "True"}) + "\n")
    (tmp_path / "p.csv").write_text("dev-1-0-0,False\n")
    out = CliRunner().invoke(app, ["evaluate", "nlvr2", "--annotations", str(tmp_path / "dev.json"),
                                   "--predictions", str(tmp_path / "p.csv")])
    assert json.loads(out.stdout) == {"accuracy": 0.0, "consistency": 0.0}
    (tmp_path / "g.json").write_text(json.dumps({"5": {"answer": "no", "isBalanced": True}}))
    (tmp_path / "gp.json").write_text(json.dumps([{"questionId": "6", "prediction": "no"}]))
    out = CliRunner().invoke(app, ["evaluate", "gqa", "--questions", str(tmp_path / "g.json"), "--predictions",
                                   str(tmp_path / "gp.json")])
    assert out.exit_code == 1 and "without a prediction" in out.output
