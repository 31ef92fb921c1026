"""Official metrics on hand-made hard cases: VQA normalisation, GQA eval.py's every number (consistency with self and
absent entailed ids, validity / plausibility, distribution, breakdowns), NLVR2 metrics.py's CSV and subset rules;
the expected values are derived by hand in the comments."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import BERT_VOCAB
from lxm.cli import app
from lxm.eval import (MetricsInputError, PredictionError, evaluate_nlvr2, evaluate_vqa, gqa_metrics, gqa_predictions,
                      nlvr2_labels, nlvr2_metrics, nlvr2_predictions, vqa_accuracy, vqa_question_accuracy)
from synthetic import make_finetune_world


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


# ---------------------------------------------------------------------------------------------------- GQA


def _q(question, answer, structural, semantic, detailed, ops, global_group, entailed, balanced=True):
    return {"question": question, "answer": answer, "isBalanced": balanced, "entailed": entailed,
            "types": {"structural": structural, "semantic": semantic, "detailed": detailed},
            "groups": {"global": global_group, "local": "x"},
            "semantic": [{"operation": o, "dependencies": [], "argument": a} for o, a in ops]}


def gqa_case():
    """(questions, predictions, choices). Steps: operations whose "op: arg" holds none of "exist", "query: name",
    "choose name". qX / qY are entailed but not in the file."""
    qs = {
        # 5 words, 2 steps (select, query: color); correct; entails itself (excluded), q2 and absent qX
        "q1": _q("What color is the shirt?", "orange", "query", "attr", "queryAttr",
                 [("select", "shirt (1)"), ("query", "color")], "color", ["q1", "q2", "qX"]),
        # 4 words, 2 steps; wrong and invalid ("blue" not in its choices)
        "q2": _q("Is the shirt orange?", "yes", "verify", "attr", "verifyAttr",
                 [("select", "shirt (1)"), ("verify color", "orange")], None, ["q1", "qX"]),
        # 5 words, 3 steps ("query: name" is no step); correct; entails q4 (right) and unbalanced q5 (wrong)
        "q3": _q("What is the man holding?", "phone", "query", "rel", "relO",
                 [("select", "man (2)"), ("relate", "holding,o (3)"), ("filter color", "red"), ("query", "name")],
                 "object", ["q4", "q5"]),
        # 7 words, 3 steps (the two "exist" are none); correct; entails nothing
        "q4": _q("Is there a man and a phone?", "yes", "logical", "obj", "existAndC",
                 [("select", "man (2)"), ("exist", "?"), ("select", "phone (3)"), ("exist", "?"), ("and", "")],
                 None, []),
        # unbalanced: scored only as q3's entailed question
        "q5": _q("What is he holding?", "phone", "query", "rel", "relO", [("select", "man (2)")], "object", [],
                 balanced=False),
        # 10 words, 3 steps; wrong, but valid and plausible: a "Common" question may answer color/material/shape
        "q6": _q("What do the shirt and the hat have in common?", "color", "compare", "attr", "twoCommon",
                 [("select", "shirt (1)"), ("select", "hat (4)"), ("common", "")], "common", []),
        # 7 words, 1 step ("choose name: ..." is none); correct; entails only itself (not counted); implausible
        "q7": _q("Is that a cup or a mug?", "cup", "choose", "cat", "categoryThisChoose",
                 [("select", "this (5)"), ("choose name", "cup|mug")], "object", ["q7"]),
        # 5 words, 2 steps; wrong; entails absent qY
        "q8": _q("What is on the table?", "cup", "query", "obj", "relS",
                 [("select", "table (6)"), ("relate", "on,s (5)"), ("query", "name")], "object", ["q8", "qY"]),
    }
    preds = {"q1": "orange", "q2": "blue", "q3": "phone", "q4": "yes", "q5": "cup", "q6": "material", "q7": "cup",
             "q8": "phone", "q99": "yes"}  # q99: not in the file
    choices = {"q1": {"valid": ["orange", "red"], "plausible": ["orange"]},
               "q2": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},
               "q3": {"valid": ["phone", "cup"], "plausible": ["phone"]},
               "q4": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},
               "q6": {"valid": ["color"], "plausible": ["color"]},
               "q7": {"valid": ["cup", "mug"], "plausible": ["mug"]},
               "q8": {"valid": ["cup", "phone"], "plausible": ["cup"]}}
    return qs, preds, choices


def pct(right: int, total: int) -> float:
    return right / total * 100  # eval.py: avg(list of 1.0 / 0.0) * 100, so the floats match exactly


def test_gqa_every_eval_py_number():
    qs, preds, choices = gqa_case()
    out = gqa_metrics(qs, preds, choices)
    # balanced q1 q2 q3 q4 q6 q7 q8; right q1 q3 q4 q7
    assert out["accuracy"] == pct(4, 7)
    assert out["open"] == pct(2, 3)  # query: q1 q3 right, q8 wrong
    assert out["binary"] == 50.0  # q2 wrong, q4 right, q6 wrong, q7 right
    # correct with entailed others: q1 -> [q2] wrong = 0 (qX skipped); q3 -> [q4 right, q5 wrong] = 0.5;
    # q4 entails nothing, q7 only itself
    assert out["consistency"] == 25.0
    assert out["validity"] == pct(6, 7)  # only q2 "blue" is invalid; q6 "material" is valid as a Common answer
    assert out["plausibility"] == pct(4, 7)  # q2, q7 ("mug" only) and q8 ("cup" only) implausible
    # global groups: color {orange: gold 1 / pred 1} -> 0 (size 1); object gold {phone 1, cup 2} vs pred
    # {phone 2, cup 1} -> 1 + 1/2 (size 3); common gold {color 1} vs pred {material 1} -> 1 (size 1; "material"
    # itself costs nothing). (0 * 1 + 1.5 * 3 + 1 * 1) / 5 / 100
    assert out["distribution"] == pytest.approx(5.5 / 5 / 100, rel=1e-12)
    assert out["accuracyPerStructuralType"] == {"choose": (100.0, 1), "compare": (0.0, 1), "logical": (100.0, 1),
                                                "query": (pct(2, 3), 3), "verify": (0.0, 1)}
    assert out["accuracyPerSemanticType"] == {"attr": (pct(1, 3), 3), "cat": (100.0, 1), "obj": (50.0, 2),
                                              "rel": (100.0, 1)}
    assert out["accuracyPerSteps"] == {1: (100.0, 1), 2: (pct(1, 3), 3), 3: (pct(2, 3), 3)}
    assert out["accuracyPerLength"] == {4: (0.0, 1), 5: (pct(2, 3), 3), 7: (100.0, 2), 10: (0.0, 1)}
    assert list(out["accuracyPerLength"]) == [4, 5, 7, 10]  # numeric order
    assert out["ignored_predictions"] == 1 and out["entailed_absent"] == 2  # q99; qX, qY
    # skipping an absent entailed id is the same as not listing it
    for q in qs.values():
        q["entailed"] = [e for e in q["entailed"] if e in qs]
    assert {**gqa_metrics(qs, preds, choices), "entailed_absent": 2} == out


def test_gqa_without_choices_and_input_errors():
    qs, preds, choices = gqa_case()
    out = gqa_metrics(qs, preds)
    assert "validity" not in out and "plausibility" not in out and out["accuracy"] == pct(4, 7)
    with pytest.raises(PredictionError, match=r"1 balanced questions without a prediction \(e.g. q6\)"):
        gqa_metrics(qs, {k: v for k, v in preds.items() if k != "q6"})
    # q5 is unbalanced but entailed by q3: consistency needs it (eval.py asks for every question)
    with pytest.raises(PredictionError, match=r"1 entailed questions without a prediction \(e.g. q5"):
        gqa_metrics(qs, {k: v for k, v in preds.items() if k != "q5"})
    del qs["q3"]  # now nothing entails q5: it needs no prediction
    assert gqa_metrics(qs, {k: v for k, v in preds.items() if k != "q5"})["accuracy"] == pct(3, 6)
    with pytest.raises(MetricsInputError, match="1 balanced questions have no entry") as err:
        gqa_metrics(qs, preds, {k: v for k, v in choices.items() if k != "q8"})
    assert err.value.source == "choices"
    del qs["q7"]["types"]["semantic"]
    with pytest.raises(MetricsInputError, match="question q7: no field 'types.semantic'") as err:
        gqa_metrics(qs, preds)
    assert err.value.source == "questions"
    with pytest.raises(MetricsInputError, match="none of the 1 questions is balanced"):
        gqa_metrics({"q5": qs["q5"]}, preds)
    # distribution is undefined without any global group (eval.py divides by zero)
    assert gqa_metrics({"q4": qs["q4"]}, preds)["distribution"] is None


def test_gqa_predictions_file_records():
    assert gqa_predictions([{"questionId": 7, "prediction": "no"}]) == {"7": "no"}  # ids compared as strings
    with pytest.raises(PredictionError, match="record 2: no field 'prediction'"):
        gqa_predictions([{"questionId": "1", "prediction": "a"}, {"questionId": "2"}])
    with pytest.raises(PredictionError, match="record 2: questionId 1 again"):
        gqa_predictions([{"questionId": "1", "prediction": "a"}, {"questionId": 1, "prediction": "b"}])


# ---------------------------------------------------------------------------------------------------- NLVR2


def test_nlvr2_accuracy_and_consistency_groups():
    labels = {"dev-1203-0-0": "True", "dev-1203-2-0": "False", "dev-1203-2-1": "True", "dev-7-1-0": "False"}
    preds = {"dev-1203-0-0": "true", "dev-1203-2-0": "True", "dev-1203-2-1": "TRUE", "dev-7-1-0": "False"}
    # groups: dev-1203--0 (one wrong) / dev-1203--1 / dev-7--0 -> 2 of 3 consistent
    assert nlvr2_metrics(labels, preds) == {"accuracy": 75.0, "consistency": 66.67, "ignored_predictions": 0}


def test_nlvr2_predictions_csv_rules():
    text = ("identifier,prediction\n"  # header: skipped
            "dev-1-0-0,True,0.93\n"  # a third column does not count
            "\n"
            " dev-1-1-0 , false ,x,y\n"
            "test1-5-0-1,True\r\n")
    assert nlvr2_predictions(text) == {"dev-1-0-0": "True", "dev-1-1-0": "false", "test1-5-0-1": "True"}
    with pytest.raises(PredictionError, match="line 2: expected identifier,prediction"):
        nlvr2_predictions("dev-1-0-0,True\ndev-1-1-0\n")
    with pytest.raises(PredictionError, match="line 3: identifier dev-1-0-0 again \\(first on line 1\\)"):
        nlvr2_predictions("dev-1-0-0,True\ndev-1-1-0,True\ndev-1-0-0,False\n")
    with pytest.raises(MetricsInputError, match="line 2: no string field 'label'"):
        nlvr2_labels('{"identifier": "dev-1-0-0", "label": "True"}\n{"identifier": "dev-1-1-0"}\n')


def test_nlvr2_scores_the_annotated_subset():
    full = {f"dev-{s}-{p}-0": "True" for s in (1, 2) for p in range(4)}  # two sentences over 4 pairs each
    preds = {**full, "dev-2-3-0": "False"}
    subset = {"dev-2-2-0": "True", "dev-2-3-0": "True"}  # e.g. balanced_dev.json: only set 2, pairs 2-3
    # 1 of 2 right; the one group dev-2--0 is inconsistent; the 6 other predictions are ignored
    assert nlvr2_metrics(subset, preds) == {"accuracy": 50.0, "consistency": 0.0, "ignored_predictions": 6}
    with pytest.raises(PredictionError, match=r"2 annotated examples without a prediction \(e.g. dev-9-0-0, "
                                              r"dev-9-1-0\)"):
        nlvr2_metrics({**subset, "dev-9-0-0": "True", "dev-9-1-0": "True"}, preds)


# ---------------------------------------------------------------------------------------------------- CLI


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


@pytest.mark.parametrize("name, content, message", [
    ("a.json", {"annotations": [{"question_id": 1, "answer_type": "other", "answers": []}]},
     "record 0: no str field 'question_type'"),
    ("r.json", [{"question_id": 1}], "record 0: no str field 'answer'"),
    ("r.json", [{"question_id": "1", "answer": "x"}], "record 0: no int field 'question_id'"),
    ("r.json", {"question_id": 1, "answer": "x"}, "expected a JSON array"),
    ("q.json", [], "expected an object with a list 'questions'"),
])
def test_evaluate_vqa_names_the_bad_file_and_record(tmp_path, name, content, message):
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 1, "answer_type": "other", "question_type": "what", "answers": [{"answer": "ball"}] * 10}]}))
    (tmp_path / "r.json").write_text(json.dumps([{"question_id": 1, "answer": "ball"}]))
    (tmp_path / name).write_text(json.dumps(content))
    out = CliRunner().invoke(app, ["evaluate", "vqa", "--questions", str(tmp_path / "q.json"), "--annotations",
                                   str(tmp_path / "a.json"), "--predictions", str(tmp_path / "r.json")])
    assert out.exit_code == 1, out.output
    assert f"{tmp_path / name}: {message}" in " ".join(out.output.split())
    assert "Traceback" not in out.output


def test_evaluate_from_python_without_the_cli(tmp_path):
    """A notebook scores files with lxm.eval directly: the same numbers as `lxm evaluate`, errors naming the file."""
    q, a, r = tmp_path / "q.json", tmp_path / "a.json", tmp_path / "r.json"
    q.write_text(json.dumps({"questions": [{"question_id": 1}, {"question_id": 2}]}))
    a.write_text(json.dumps({"annotations": [
        {"question_id": i, "answer_type": "other", "question_type": "what", "answers": [{"answer": "ball"}] * 10}
        for i in (1, 2)]}))
    r.write_text(json.dumps([{"question_id": 1, "answer": "ball"}, {"question_id": 2, "answer": "Ball."}]))
    scores = evaluate_vqa(q, a, r)
    cli = CliRunner().invoke(app, ["evaluate", "vqa", "--questions", str(q), "--annotations", str(a),
                                   "--predictions", str(r)])
    assert scores == json.loads(cli.stdout) and scores["overall"] == 50.0  # identical answers: no normalisation
    r.write_text(json.dumps([{"question_id": 1, "answer": "ball"}]))
    with pytest.raises(PredictionError, match=f"^{re.escape(str(r))}: 1 questions without a prediction"):
        evaluate_vqa(q, a, r)
    a.write_text("{")
    with pytest.raises(MetricsInputError, match=f"^{re.escape(str(a))}: not valid JSON"):
        evaluate_vqa(q, a, r)
    ann, csv = tmp_path / "dev.json", tmp_path / "p.csv"
    ann.write_text(json.dumps({"identifier": "dev-1-0-0", "label": "True"}) + "\n")
    csv.write_text("dev-1-0-0,true\n")
    assert evaluate_nlvr2(ann, csv) == {"accuracy": 100.0, "consistency": 100.0, "ignored_predictions": 0}
    ann.write_text(json.dumps({"identifier": "dev-1-0-0"}) + "\n")
    with pytest.raises(MetricsInputError, match=f"^{re.escape(str(ann))}: line 1: no string field 'label'"):
        evaluate_nlvr2(ann, csv)


def test_evaluate_nlvr2_cli(tmp_path):
    ann, csv = tmp_path / "balanced_dev.json", tmp_path / "p.csv"
    ann.write_text("".join(json.dumps({"identifier": i, "label": "True"}) + "\n" for i in ("dev-1-0-0", "dev-1-1-0")))
    csv.write_text("identifier,prediction\ndev-1-0-0,True,0.9\ndev-1-1-0,TRUE,0.6\ndev-2-0-0,False,0.1\n")
    out = CliRunner().invoke(app, ["evaluate", "nlvr2", "--annotations", str(ann), "--predictions", str(csv)])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == {"accuracy": 100.0, "consistency": 100.0, "ignored_predictions": 1}
    csv.write_text("dev-1-0-0,True\n")
    out = CliRunner().invoke(app, ["evaluate", "nlvr2", "--annotations", str(ann), "--predictions", str(csv)])
    assert out.exit_code == 1
    assert f"{csv}: 1 annotated examples without a prediction (e.g. dev-1-1-0)" in " ".join(out.output.split())


def test_evaluate_gqa_cli(tmp_path):
    qs, preds, choices = gqa_case()
    files = {"questions": qs, "predictions": [{"questionId": k, "prediction": v} for k, v in preds.items()],
             "choices": choices}
    for name, data in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    args = ["evaluate", "gqa", *(x for name in files for x in (f"--{name}", str(tmp_path / f"{name}.json")))]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == json.loads(json.dumps(gqa_metrics(qs, preds, choices)))
    del qs["q8"]["answer"]
    (tmp_path / "questions.json").write_text(json.dumps(qs))
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 1 and f"{tmp_path / 'questions.json'}: question q8: no field 'answer'" in " ".join(
        out.output.split())


def test_predict_gqa_prints_the_evaluate_table(tmp_path):
    make_finetune_world(tmp_path, train=4, valid=3)
    run = tmp_path / "run"
    corpus = tmp_path / "ft_corpus"
    result = CliRunner().invoke(app, ["finetune", "gqa", "--config", "tiny", "--set", "from_scratch=true",
                                      "--corpus", str(corpus), "--features", str(tmp_path / "ft_feats"), "--out",
                                      str(run), "--set", f"vocab={BERT_VOCAB}", "--set", "train_splits=train",
                                      "--set", "epochs=1"])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(corpus / "finetune" / "gqa_testdev.parquet").to_pylist()
    qs = {r["question_id"]: _q(r["sent"], r["label"][0][0], "query", "attr", "queryAttr", [("select", "x")],
                               "color", []) for r in rows}
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(qs))
    out = tmp_path / "testdev_predict.json"
    result = CliRunner().invoke(app, ["predict", "gqa", "--checkpoint", str(run), "--split", "testdev", "--out",
                                      str(out), "--questions", str(tmp_path / "testdev_balanced_questions.json")])
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    evaluated = CliRunner().invoke(app, ["evaluate", "gqa", "--questions",
                                         str(tmp_path / "testdev_balanced_questions.json"), "--predictions", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    assert table == json.loads(evaluated.stdout)
    assert table["accuracyPerLength"] and table["ignored_predictions"] == 0
    assert f"accuracy {round(table['accuracy'], 2)}" in result.stderr  # the local exact-match score agrees
    result = CliRunner().invoke(app, ["predict", "vqa", "--checkpoint", str(run), "--split", "testdev", "--out",
                                      str(out), "--questions", str(tmp_path / "testdev_balanced_questions.json")])
    assert result.exit_code == 1 and "score GQA predictions" in result.output
