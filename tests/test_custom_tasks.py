"""Your own datasets (`lxm finetune qa|classify`, issue 14): JSON lines files -> task objects like VQA / NLVR2.

VQA-equivalent targets for QA, the metrics' hard cases, `FILE:LINE: field` errors, a run with --resume and --test,
`lxm predict` + `lxm evaluate` reproducing the run's own validation score, DDP, and the learning test: from the
pretrained tiny model beats from scratch on synthetic QA and classification data."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from conftest import BERT_VOCAB
from lxm.cli import app
from lxm.errors import ConfigError
from lxm.eval import (MetricsInputError, PredictionError, classify_metrics, macro_f1, qa_metrics, read_classify_jsonl,
                      read_qa_jsonl, vqa_question_accuracy)
from lxm.model import IGNORE_INDEX
from lxm.train.config import load_finetune_config
from lxm.train.finetune_data import FinetuneDataset, collate_finetune
from lxm.train.tasks import ClassifyTask, QaTask, VqaTask, qa_answer_table
from synthetic import COLORS, OBJECTS, build_corpus, make_custom_world, one_and_two_process_losses, write_raw

pytestmark = pytest.mark.e2e  # whole recipes through the lxm CLI (README: Tests)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    return root, make_custom_world(root)


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _run(task, files, out, *extra, init=("--set", "from_scratch=true")):
    root, paths = files
    args = ["finetune", task, *init, "--config", "tiny", "--train", str(paths[f"{task}_train"]),
            "--features", str(root / "ft_feats"), "--out", str(out), "--set", f"vocab={BERT_VOCAB}",
            "--set", "batch_size=32", "--set", "dropout=0", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text()), result.output


# ---------------------------------------------------------------------------------------------------- targets


def test_qa_targets_equal_those_of_the_vqa_corpus(tmp_path):
    """The same VQA questions as corpus table (lxm build-corpus --vqa) and as JSON lines: the same soft targets."""
    import pyarrow.parquet as pq

    write_raw(tmp_path)
    assert build_corpus(tmp_path).exit_code == 0
    corpus = tmp_path / "out"
    answers = json.loads((corpus / "vocab" / "vqa_answers.json").read_text())
    raw = {}
    for split in ("train2014", "val2014"):
        for ann in json.loads((tmp_path / "vqa" / f"v2_mscoco_{split}_annotations.json").read_text())["annotations"]:
            raw[ann["question_id"]] = [a["answer"] for a in ann["answers"]]
    vqa = VqaTask(answers)
    rows = [r for s in ("train", "nominival", "minival")
            for r in pq.read_table(corpus / "finetune" / f"vqa_{s}.parquet").to_pylist()]
    lines = _jsonl(tmp_path / "q.jsonl", [{"question_id": r["question_id"], "img_id": r["img_id"],
                                           "question": r["sent"], "answers": raw[r["question_id"]]} for r in rows])
    qa = QaTask(answers, {"train": str(lines)})
    cols = qa.read_split(None, "train")
    assert cols["question_id"] == [r["question_id"] for r in rows] and cols["sent"] == [r["sent"] for r in rows]
    for i, row in enumerate(rows):
        mine = qa.row_target({"label": cols["label"][i]})
        # the corpus stores float32 scores: the same ids, scores equal as float32 (the dense targets below)
        theirs = sorted(vqa.row_target(row))
        assert [k for k, _ in sorted(mine.targets)] == [k for k, _ in theirs], row["question_id"]
        assert [s for _, s in sorted(mine.targets)] == pytest.approx([s for _, s in theirs]), row["question_id"]
        assert (qa.example_target(mine) == vqa.example_target(vqa.row_target(row))).all()
    # e.g. "ball" x7, "baseball" x2, "a ball" x1, "pitch": ball 1.0, and "a ball" is not the table's "ball"
    ball = qa.row_target({"label": raw[458752000]})
    assert dict(ball.targets) == {answers.index("ball"): 1.0}


def test_the_answer_table_comes_from_train_by_question_count_in_order_of_first_appearance():
    from lxm.eval import QaRecord

    recs = [QaRecord(1, 1, "i", "q", ["Two", "2", "red"]), QaRecord(2, 2, "i", "q", ["two", "blue", "the red"]),
            QaRecord(3, 3, "i", "q", {"blue": 1.0, "green": 0.0, "Cyan": 0.5})]
    # normalised as VQA's vocabulary: "Two"/"2"/"two" -> "2", "the red" -> "red"; a question counts once
    assert qa_answer_table(recs) == ["2", "red", "blue", "Cyan"]
    assert qa_answer_table(recs, min_count=2) == ["2", "red", "blue"]
    task = QaTask(["2", "red", "blue", "Cyan"])
    # annotator answers are scored as written (as VQA's targets): "Two" and "two" are not "2"
    assert task.row_target({"label": ["2", "2", "Two", "blue"]}).targets == [(0, 0.6), (2, 0.3)]
    assert task.row_target({"label": {"blue": 0.8, "magenta": 1.0}}).targets == [(2, 0.8)]
    assert task.target_answers(task.row_target({"label": ["blue"] * 9 + ["pink"]})) == [("blue", 1.0), ("pink", 0.3)]
    assert task.row_target({"label": None}) is None


# ---------------------------------------------------------------------------------------------------- metrics


def test_qa_metric_hard_cases():
    nine_one = ["two"] * 9 + ["2"]
    # annotators disagree -> the evaluator normalises both sides: "2" matches all ten
    assert qa_metrics({"a": nine_one}, {"a": "2"})["accuracy"] == 100.0
    # all agree -> no normalisation: "2" matches none of ten "two"
    assert qa_metrics({"a": ["two"] * 10}, {"a": "2"})["accuracy"] == 0.0
    # two of ten give "red": each leave-one-out subset has 1 or 2 matches -> (8 * 2/3 + 2 * 1/3) / 10
    two_red = ["red", "red"] + ["blue"] * 8
    expected = (8 * min(1, 2 / 3) + 2 * min(1, 1 / 3)) / 10
    assert vqa_question_accuracy("red", two_red) == pytest.approx(expected)
    scores = qa_metrics({"a": two_red, "b": {"cat": 0.6, "dog": 1.0}, "c": {"cat": 0.6}},
                        {"a": "red", "b": "cat", "c": "dog", "extra": "x"}, {"a": "other", "b": "other", "c": "x"})
    assert scores["accuracy"] == round(100 * (expected + 0.6 + 0.0) / 3, 2)
    assert scores["perAnswerType"] == {"other": round(100 * (expected + 0.6) / 2, 2), "x": 0.0}
    assert scores["ignored_predictions"] == 1
    with pytest.raises(PredictionError, match="2 annotated questions without a prediction"):
        qa_metrics({"a": ["x"], "b": ["y"], "c": ["z"]}, {"c": "z"})


def test_macro_f1_against_a_hand_computation():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "d"]
    # a: TP 2 FP 0 FN 1 -> 4/5; b: TP 1 FP 1 FN 1 -> 2/4; c: TP 0 -> 0; d (only predicted): 0
    assert macro_f1(gold, pred) == pytest.approx((4 / 5 + 2 / 4 + 0 + 0) / 4)
    scores = classify_metrics(dict(zip("123456", gold)), dict(zip("123456", pred)))
    assert scores == {"accuracy": round(100 * 3 / 6, 2), "macro_f1": round(100 * (0.8 + 0.5) / 4, 2),
                      "ignored_predictions": 0}
    assert macro_f1(["x", "y"], ["x", "y"]) == 1.0
    with pytest.raises(PredictionError, match="1 annotated examples without a prediction"):
        classify_metrics({"1": "a", "2": "b"}, {"1": "a"})


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("reader, line, message", [
    ("qa", {"question_id": 2, "img_id": "i", "question": "q", "answers": []}, "field 'answers': empty"),
    ("qa", {"question_id": 2, "img_id": "i", "answers": ["a"]}, "field 'question': missing"),
    ("qa", {"question_id": 1, "img_id": "i", "question": "q", "answers": ["a"]}, "field 'question_id': 1 again "
                                                                                  "(first on line 1)"),
    ("qa", {"question_id": True, "img_id": "i", "question": "q", "answers": ["a"]}, "field 'question_id': expected"),
    ("qa", {"question_id": 2, "img_id": 7, "question": "q", "answers": ["a"]}, "field 'img_id': expected string"),
    ("qa", {"question_id": 2, "img_id": "i", "question": "q", "answers": {"a": 2}}, "field 'answers': the score of "
                                                                                     "'a' must be a number in [0, 1]"),
    ("qa", {"question_id": 2, "img_id": "i", "question": "q", "answers": [1]}, "field 'answers': expected strings"),
    ("qa", {"question_id": 2, "img_id": "i", "question": "q"}, "field 'answers': missing, but line 1 has one"),
    ("qa", '{"question_id": 2,', "not JSON"),
    ("classify", {"id": "b", "img_id": "i", "text": "t", "label": [1.5]}, "field 'label': expected string, number "
                                                                          "or boolean, got [1.5]"),
    ("classify", {"id": "b", "img_id": "i", "text": "t", "label": "true"}, "field 'label': \"true\", but line 1 "
                                                                           "writes the label 'true' as a number or "
                                                                           "boolean"),
    ("classify", {"id": "b", "img_id": "", "text": "t", "label": "x"}, "field 'img_id': empty"),
    ("classify", {"id": "a", "img_id": "i", "text": "t", "label": "x"}, "field 'id': a again"),
])
def test_bad_lines_are_named_by_file_line_and_field(tmp_path, reader, line, message):
    first = ({"question_id": 1, "img_id": "i", "question": "q", "answers": ["a"]} if reader == "qa"
             else {"id": "a", "img_id": "i", "text": "t", "label": True})
    path = _jsonl(tmp_path / "bad.jsonl", [first, line])
    read = read_qa_jsonl if reader == "qa" else read_classify_jsonl
    with pytest.raises(MetricsInputError) as exc:
        read(path)
    assert str(exc.value).startswith(f"{path}:2: ") and message in str(exc.value), str(exc.value)


def test_labels_are_kept_as_strings_and_unlabelled_files_read(tmp_path):
    recs = read_classify_jsonl(_jsonl(tmp_path / "c.jsonl", [{"id": 1, "img_id": "i", "text": "t", "label": True},
                                                             {"id": 2, "img_id": "i", "text": "t", "label": 3}]))
    assert [r.label for r in recs] == ["true", "3"]  # JSON's spelling, not Python's "True"
    test = read_qa_jsonl(_jsonl(tmp_path / "t.jsonl", [{"question_id": "x", "img_id": "i", "question": "q"}]))
    assert test[0].answers is None
    with pytest.raises(MetricsInputError, match=r"t.jsonl:1: field 'answers': missing \(this file must be labelled"):
        read_qa_jsonl(tmp_path / "t.jsonl", require_labels=True)


def test_cli_and_config_rules(world, tmp_path):
    root, paths = world
    base = ["--config", "tiny", "--set", "from_scratch=true", "--features", str(root / "ft_feats"), "--out",
            str(tmp_path / "r")]
    for args, message in (
            (["finetune", "vqa", "--train", str(paths["qa_train"]), "--corpus", str(root / "ft_corpus")],
             "--train/--valid/--test/--min-answer-count are for lxm finetune qa|classify"),
            (["finetune", "qa"], "'data' needs a 'train' file for qa"),
            (["finetune", "classify", "--train", str(paths["classify_train"]), "--min-answer-count", "2"],
             "--min-answer-count is for lxm finetune qa")):
        result = CliRunner().invoke(app, [*args, *base])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": "a", "img_id": "ft0000", "text": "t"}])
    result = CliRunner().invoke(app, ["finetune", "classify", "--train", str(bad), *base])
    assert result.exit_code == 1 and f"{bad}:1: field 'label': missing" in result.output.replace("\n", "")
    cfg = load_finetune_config("qa", "paper", ["features=[f]", "init=x", f"data={{train: {paths['qa_train']}}}"])
    assert (cfg.optim.lr, cfg.train_splits, cfg.valid_split, cfg.corpus) == (5e-5, ["train"], None, "")
    with pytest.raises(ConfigError, match="'data' is for the custom-dataset tasks"):
        load_finetune_config("nlvr2", "paper", ["corpus=c", "features=[f]", "init=x", "data={train: t.jsonl}"])


# ---------------------------------------------------------------------------------------------------- runs


def test_qa_run_resume_test_predictions_and_evaluate_round_trip(world, tmp_path):
    root, paths = world
    run = tmp_path / "qa"
    extra = ["--valid", str(paths["qa_valid"]), "--test", str(paths["qa_test"]), "--min-answer-count", "2"]
    first, output = _run("qa", world, run, *extra)
    assert "320 training examples" in output and first["epochs"] == 1
    answers = json.loads((run / "answers.json").read_text())
    assert sorted(answers) == sorted(COLORS + OBJECTS)  # every answer is given by >= 2 training questions
    second, output = _run("qa", world, run, *extra, "--resume", "--set", "epochs=2")
    assert "resumed from" in output and second["epochs"] == 2
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    test = json.loads((run / "predictions" / "test_predict.json").read_text())
    assert len(test) == 200 and set(test[0]) == {"question_id", "answer"} and isinstance(test[0]["question_id"], int)

    out = tmp_path / "valid_predict.json"
    result = CliRunner().invoke(app, ["predict", "qa", "--checkpoint", str(run), "--split", "valid",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["evaluate", "qa", "--annotations", str(paths["qa_valid"]),
                                      "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["accuracy"] == second["best"] and scores["perAnswerType"] == {"other": second["best"]}
    # a .jsonl path as the split; the unlabelled test file predicts what the run wrote
    out2 = tmp_path / "again.json"
    result = CliRunner().invoke(app, ["predict", "qa", "--checkpoint", str(run), "--split", str(paths["qa_test"]),
                                      "--out", str(out2)])
    assert result.exit_code == 0, result.output
    assert json.loads(out2.read_text()) == test
    json.dump(test[:-3], (tmp_path / "short.json").open("w"))
    result = CliRunner().invoke(app, ["evaluate", "qa", "--annotations", str(paths["qa_valid"]),
                                      "--predictions", str(tmp_path / "short.json")])
    assert result.exit_code == 1 and "3 annotated questions without a prediction" in result.output


def test_classify_run_predict_and_evaluate_round_trip(world, tmp_path):
    root, paths = world
    run = tmp_path / "cls"
    summary, output = _run("classify", world, run, "--valid", str(paths["classify_valid"]), "--test",
                           str(paths["classify_test"]), "--set", "epochs=2", "--set", "lr=1e-3")
    assert "classification head" not in output  # from scratch: no init to take a head from
    assert json.loads((run / "answers.json").read_text()) == ["colour", "object", "true"]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[0]) >= {"accuracy", "macro_f1"}
    rows = list(csv.reader((run / "predictions" / "test_predict.csv").open()))
    assert rows[0] == ["id", "label"] and len(rows) == 201 and {r[1] for r in rows[1:]} <= {"colour", "object", "true"}
    out = tmp_path / "valid.csv"
    result = CliRunner().invoke(app, ["predict", "classify", "--checkpoint", str(run), "--split", "valid",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["evaluate", "classify", "--annotations", str(paths["classify_valid"]),
                                      "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    best = next(m for m in metrics if m["epoch"] == summary["best_epoch"])
    assert (scores["accuracy"], scores["macro_f1"]) == (best["accuracy"], best["macro_f1"]) == (
        summary["best"], best["macro_f1"])

    # the inference interface the other commands use
    from lxm.infer.runs import load_run, predict_top

    _, task, model = load_run(run, "classify")
    data = FinetuneDataset(task, None, ["valid"], [root / "ft_feats"], BERT_VOCAB)
    assert task.class_names == ["colour", "object", "true"] and task.target_answers(data.targets[0])[0][1] == 1.0
    top = predict_top(task, model, data, k=5)
    assert all(len(v) == 3 and sum(p for _, p in v) == pytest.approx(1.0) for v in top.values())
    assert collate_finetune([data[0], data[1]]).targets.tolist() == [task.answers.index(t)
                                                                      for t in data.targets[:2]]


def test_a_validation_label_outside_the_training_labels_counts_as_wrong(world, tmp_path):
    root, paths = world
    task = ClassifyTask(["colour", "object", "true"], {"valid": str(_jsonl(tmp_path / "v.jsonl", [
        {"id": 1, "img_id": "ft0000", "text": "a", "label": "true"},
        {"id": 2, "img_id": "ft0001", "text": "b", "label": "maybe"}]))})
    data = FinetuneDataset(task, None, ["valid"], [root / "ft_feats"], BERT_VOCAB)
    assert collate_finetune([data[0], data[1]]).targets.tolist() == [2, IGNORE_INDEX]
    assert task.score(data.ids, data.targets, {1: "true", 2: "true"}) == {
        "accuracy": 50.0, "macro_f1": round(100 * (2 / 3 + 0) / 2, 2)}


def test_two_process_ddp_classify_matches_one_process(world, tmp_path):
    root, paths = world

    def args(out):
        return ["finetune", "classify", "--set", "from_scratch=true", "--config", "tiny", "--train",
                str(paths["classify_train"]), "--features", str(root / "ft_feats"), "--out", str(out),
                "--set", f"vocab={BERT_VOCAB}", "--set", "batch_size=64", "--set", "dropout=0", "--set", "epochs=1",
                "--set", "log_every=1"]

    a, b = one_and_two_process_losses(args, tmp_path, 29547)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]  # 320 statements // 64
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step


def test_finetuning_from_pretrained_beats_from_scratch_on_custom_data(pretrained_world, world, tmp_path):
    _, run = pretrained_world
    _, paths = world
    best = {}
    for task in ("qa", "classify"):
        for name, init in (("pretrained", ("--init", str(run))), ("scratch", ("--set", "from_scratch=true"))):
            summary, output = _run(task, world, tmp_path / f"{task}-{name}", "--valid", str(paths[f"{task}_valid"]),
                                   "--set", "epochs=8", "--set", "lr=1e-4", init=init)
            best[task, name] = summary["best"]
            if (task, name) == ("qa", "pretrained"):  # colours are in the pretraining QA table, objects are not
                assert "4/12 rows from the 4-way pretraining QA head" in output
            if (task, name) == ("classify", "pretrained"):
                assert "classification head: fresh init (3 labels)" in output
    print("best validation scores:", best)
    # measured (8 epochs, lr 1e-4): qa 66.45 vs 42.7, classify 92.5 vs 36.5 (chance 33). The lr matters for qa:
    # with the noisy ten-annotator targets a from-scratch model gains from a larger lr (at 3e-4 it reached 58.0
    # against the pretrained model's 50.0), while the pretrained one is best near the paper's 5e-5 - 1e-4.
    assert best["qa", "pretrained"] > best["qa", "scratch"] + 12
    assert best["classify", "pretrained"] > best["classify", "scratch"] + 30 and best["classify", "pretrained"] > 80
