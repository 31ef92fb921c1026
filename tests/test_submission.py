"""Submission files checked before upload (issue 32 part 2): `lxm check-submission vqa|gqa|nlvr2`, the library's
`check_submission`, the same check at the end of `lxm predict` on a server's split, and NLVR2's public Test-U
(test2) scored by `lxm evaluate nlvr2`.

Each crafted bad file has a known number of missing, repeated, extra and mistyped records; the report must give
exactly those counts and the first offending ids in file (or questions-file) order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BERT_VOCAB
from synthetic import make_finetune_world
from typer.testing import CliRunner

from lxm.cli import app
from lxm.corpus.build import VQA_SCHEMA
from lxm.eval import SubmissionError, check_submission, check_submission_ids

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _vqa_questions(path: Path, ids) -> Path:
    path.write_text(json.dumps({"questions": [{"question_id": q, "image_id": 7, "question": f"q{q}?"} for q in ids]}))
    return path


def _json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _counts(report) -> dict[str, int]:
    return {p.kind: p.count for p in report.problems}


def _first(report, kind) -> tuple[str, ...]:
    return next(p.first for p in report.problems if p.kind == kind)


# ---------------------------------------------------------------------------------------------------- VQA


def test_a_complete_vqa_file_is_ready(tmp_path):
    q = _vqa_questions(tmp_path / "q.json", [10, 11, 12])
    sub = _json(tmp_path / "s.json", [{"question_id": i, "answer": a} for i, a in ((12, "no"), (10, "2"), (11, "yes"))])
    report = check_submission("vqa", sub, q, answers=["yes", "no", "2"])
    assert report.ok and report.problems == ()
    assert (report.records, report.required, report.answer_table) == (3, 3, 3)
    assert report.size_bytes == sub.stat().st_size
    assert "ready" in report.summary() and "\n" not in report.summary()


def test_vqa_missing_repeated_extra_and_mistyped_records_are_counted(tmp_path):
    q = _vqa_questions(tmp_path / "q.json", range(1, 11))  # ten required questions
    records = [{"question_id": 1, "answer": "yes"},
               {"question_id": 2, "answer": "no"},
               {"question_id": 2, "answer": "no"},            # repeated
               {"question_id": 1, "answer": "yes"},           # repeated
               {"question_id": "3", "answer": "yes"},         # string id: matches nothing on the server
               {"question_id": 4.0, "answer": "yes"},         # float id
               {"question_id": 5, "answer": 5},               # answer not a string
               {"question_id": 99, "answer": "yes"},          # not a test question
               {"question_id": 6, "answer": "maybe so"},      # outside the answer table
               {"answer": "yes"},                             # no id at all
               {"question_id": 7, "answer": "yes"}]
    report = check_submission("vqa", _json(tmp_path / "s.json", records), q, answers=["yes", "no"])
    assert not report.ok
    assert _counts(report) == {"unreadable": 1, "id_type": 2, "answer_type": 1, "duplicate": 2, "extra": 1,
                               "missing": 5, "outside_table": 1}
    assert _first(report, "id_type") == ('"3"', "4.0")
    assert _first(report, "duplicate") == ("2", "1")
    assert _first(report, "extra") == ("99",)
    assert _first(report, "missing") == ("3", "4", "8", "9", "10")  # in the questions file's order
    assert _first(report, "outside_table") == ('6 ("maybe so")',)
    assert _first(report, "unreadable") == ("record 10",)
    assert report.records == 11 and report.required == 10


def test_only_the_first_five_offending_ids_are_listed(tmp_path):
    q = _vqa_questions(tmp_path / "q.json", range(100))
    report = check_submission("vqa", _json(tmp_path / "s.json", [{"question_id": 0, "answer": "a"}]), q)
    assert report.count("missing") == 99
    assert _first(report, "missing") == ("1", "2", "3", "4", "5")
    assert "(first: 1, 2, 3, 4, 5, ...)" in report.details()[0]


def test_a_file_that_is_no_submission_is_one_error_naming_it(tmp_path):
    q = _vqa_questions(tmp_path / "q.json", [1])
    with pytest.raises(SubmissionError, match="s.json: expected a JSON array"):
        check_submission("vqa", _json(tmp_path / "s.json", {"question_id": 1, "answer": "a"}), q)
    with pytest.raises(SubmissionError, match="q2.json: expected VQA questions"):
        check_submission("vqa", _json(tmp_path / "s2.json", []), _json(tmp_path / "q2.json", [1, 2]))
    # the server wants all of test2015 for test-dev too: a check against the test-dev questions would pass wrongly
    dev = _json(tmp_path / "dev.json", {"data_subtype": "test-dev2015", "questions": [{"question_id": 1}]})
    with pytest.raises(SubmissionError, match="dev.json: the test-dev2015 questions.*test2015_questions.json"):
        check_submission("vqa", _json(tmp_path / "s3.json", [{"question_id": 1, "answer": "a"}]), dev)


# ---------------------------------------------------------------------------------------------------- GQA


def _gqa_questions(path: Path, ids) -> Path:
    return _json(path, {q: {"imageId": "n1", "question": "what?", "isBalanced": True} for q in ids})


def test_gqa_int_ids_match_no_question_and_a_complete_file_is_ready(tmp_path):
    q = _gqa_questions(tmp_path / "submission_all_questions.json", ["07333408", "201307251", "5"])
    good = [{"questionId": "201307251", "prediction": "yes"}, {"questionId": "07333408", "prediction": "orange"},
            {"questionId": "5", "prediction": "no"}]
    assert check_submission("gqa", _json(tmp_path / "good.json", good), q).ok
    bad = [{"questionId": 201307251, "prediction": "yes"},   # int id: the server's ids are strings
           {"questionId": 5, "prediction": "no"},
           {"questionId": "07333408", "prediction": None},    # prediction not a string
           {"questionId": "07333408", "prediction": "red"}]   # repeated
    report = check_submission("gqa", _json(tmp_path / "bad.json", bad), q)
    assert _counts(report) == {"id_type": 2, "answer_type": 1, "duplicate": 1, "missing": 2}
    assert _first(report, "id_type") == ("201307251", "5")
    assert _first(report, "missing") == ('"201307251"', '"5"')


def test_gqa_answers_outside_the_table_and_extra_ids(tmp_path):
    q = _gqa_questions(tmp_path / "q.json", ["1", "2"])
    sub = [{"questionId": "1", "prediction": "yes"}, {"questionId": "2", "prediction": "purple"},
           {"questionId": "3", "prediction": "no"}]
    report = check_submission("gqa", _json(tmp_path / "s.json", sub), q, answers=["yes", "no"])
    assert _counts(report) == {"extra": 1, "outside_table": 1}
    assert _first(report, "extra") == ('"3"',)


# ---------------------------------------------------------------------------------------------------- NLVR2


def _nlvr2_questions(path: Path, ids, labels=True) -> Path:
    path.write_text("".join(json.dumps({"identifier": i, "sentence": "s", **({"label": "True"} if labels else {})})
                            + "\n" for i in ids))
    return path


def test_nlvr2_lowercase_labels_blank_lines_and_headers_are_refused(tmp_path):
    ids = [f"test1-{k}-0-0" for k in range(6)]
    q = _nlvr2_questions(tmp_path / "test1.json", ids)
    good = tmp_path / "good.csv"
    good.write_text("".join(f"{i},{'True' if k % 2 else 'False'}\n" for k, i in enumerate(ids)))
    assert check_submission("nlvr2", good, q).ok
    bad = tmp_path / "bad.csv"
    bad.write_text("identifier,prediction\n"          # a header: metrics.py reads it as a prediction
                   f"{ids[0]},true\n"                  # lowercase
                   f"{ids[1]},False\n"
                   "\n"                                # blank: metrics.py crashes
                   f"{ids[1]},True\n"                  # repeated
                   f"{ids[2]},True,0.93\n"             # a third field is ignored, as metrics.py does
                   f"{ids[3]}\n"                       # no prediction
                   f"dev-1-0-0,True\n")                # not a test1 identifier
    report = check_submission("nlvr2", bad, q)
    assert _counts(report) == {"unreadable": 2, "answer_type": 2, "duplicate": 1, "extra": 2, "missing": 3}
    assert _first(report, "answer_type") == ('"identifier" ("prediction")', f'"{ids[0]}" ("true")')
    assert _first(report, "unreadable") == ("line 4", "line 7")
    assert _first(report, "extra") == ('"identifier"', '"dev-1-0-0"')
    assert _first(report, "missing") == tuple(f'"{i}"' for i in ids[3:])
    with pytest.raises(SubmissionError, match="no answer table"):
        check_submission_ids("nlvr2", good, ids, answers=["True", "False"])


# ---------------------------------------------------------------------------------------------------- the command


def test_check_submission_command_exit_codes_and_output(tmp_path):
    q = _vqa_questions(tmp_path / "q.json", [1, 2, 3])
    table = _json(tmp_path / "answers.json", ["yes", "no"])
    good = _json(tmp_path / "good.json", [{"question_id": i, "answer": "yes"} for i in (1, 2, 3)])
    result = _invoke("check-submission", "vqa", good, "--questions", q, "--answers", table)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "ready" in lines[0] and "2-answer table" in lines[0] and "B" in lines[0]

    bad = _json(tmp_path / "bad.json", [{"question_id": "1", "answer": "yes"}, {"question_id": 2, "answer": "nope"}])
    result = _invoke("check-submission", "vqa", bad, "--questions", q, "--answers", table)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "NOT ready (1 id type, 2 missing, 1 outside table;" in result.output
    assert 'question_id not a JSON integer: 1 (first: "1")' in result.output
    assert "required questions without a prediction: 2 (first: 1, 3)" in result.output

    result = _invoke("check-submission", "vqa", bad, "--questions", q, "--answers", table, "--run", tmp_path)
    assert result.exit_code == 1 and "give one" in result.output
    result = _invoke("check-submission", "gqa", bad, "--questions", q)  # a VQA questions file for GQA
    assert result.exit_code == 1 and "q.json: expected GQA questions" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------------- lxm predict


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory):
    """A tiny VQA model finetuned from scratch on the synthetic world (a few seconds), and the world."""
    root = tmp_path_factory.mktemp("submission")
    make_finetune_world(root, train=8, valid=4)
    out = root / "run"
    result = _invoke("finetune", "vqa", "--config", "tiny", "--set", "from_scratch=true", "--set", f"vocab={BERT_VOCAB}",
                     "--corpus", root / "ft_corpus", "--features", root / "ft_feats", "--out", out,
                     "--set", "train_splits=train", "--set", "valid_split=minival", "--set", "batch_size=4",
                     "--set", "epochs=1")
    assert result.exit_code == 0, result.output
    return root, out


@pytest.mark.e2e  # a tiny finetuning run through the lxm CLI
def test_predict_on_the_test_split_checks_the_file_it_wrote(vqa_run, tmp_path):
    root, run = vqa_run
    out = tmp_path / "test_predict.json"
    result = _invoke("predict", "vqa", "--checkpoint", run, "--split", "test", "--out", out)
    assert result.exit_code == 0, result.output
    assert "vqa submission ready: 8 records, each of the 8 required ids once" in result.output
    assert "answer table" in result.output

    # a test question whose image has no features is dropped by the dataset: the server would score it wrong
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "ft_corpus", corpus)
    table = corpus / "finetune" / "vqa_test.parquet"
    rows = pq.read_table(table).to_pylist()
    rows.append({**rows[0], "question_id": 424242, "img_id": "no-such-image"})
    pq.write_table(pa.Table.from_pylist(rows, schema=VQA_SCHEMA), table)
    out2 = tmp_path / "test_predict2.json"
    result = _invoke("predict", "vqa", "--checkpoint", run, "--split", "test", "--out", out2, "--corpus", corpus)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "NOT ready (1 missing; 8 records for 9 required ids" in result.output
    assert "required questions without a prediction: 1 (first: 424242)" in result.output
    assert len(json.loads(out2.read_text())) == 8  # the predictions stay written

    # a split no server takes is not checked
    result = _invoke("predict", "vqa", "--checkpoint", run, "--split", "minival", "--out", tmp_path / "m.json")
    assert result.exit_code == 0 and "submission" not in result.output


@pytest.mark.e2e  # a tiny finetuning run through the lxm CLI
def test_check_submission_reads_the_answer_table_of_a_run(vqa_run, tmp_path):
    root, run = vqa_run
    out = tmp_path / "p.json"
    assert _invoke("predict", "vqa", "--checkpoint", run, "--split", "test", "--out", out).exit_code == 0
    ids = [r["question_id"] for r in pq.read_table(root / "ft_corpus" / "finetune" / "vqa_test.parquet").to_pylist()]
    q = _vqa_questions(tmp_path / "q.json", ids)
    answers = json.loads((run / "answers.json").read_text())
    result = _invoke("check-submission", "vqa", out, "--questions", q, "--run", run)
    assert result.exit_code == 0, result.output
    assert f"{len(answers)}-answer table" in result.stdout
    records = json.loads(out.read_text())
    records[0]["answer"] = "not an answer of this model"
    _json(out, records)
    result = _invoke("check-submission", "vqa", out, "--questions", q, "--run", run)
    assert result.exit_code == 1 and "1 outside table" in result.output


# ---------------------------------------------------------------------------------------------------- NLVR2 Test-U


def test_evaluate_nlvr2_scores_the_public_test_u_file(tmp_path):
    """test2.json (Test-U, labels public since 2022) is scored as dev / test1 are, by the official metrics."""
    lines = [{"identifier": f"test2-{s}-{p}-0", "label": label, "sentence": "s"}
             for s, p, label in ((1, 0, "True"), (1, 1, "False"), (2, 0, "True"), (3, 0, "False"))]
    test2 = tmp_path / "test2.json"
    test2.write_text("".join(json.dumps(r) + "\n" for r in lines))
    preds = tmp_path / "test2_predict.csv"
    preds.write_text("test2-1-0-0,True\ntest2-1-1-0,True\ntest2-2-0-0,True\ntest2-3-0-0,False\n")
    assert _invoke("check-submission", "nlvr2", preds, "--questions", test2).exit_code == 0
    result = _invoke("evaluate", "nlvr2", "--annotations", test2, "--predictions", preds)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["accuracy"] == 75.0
    assert scores["consistency"] == pytest.approx(100 * 2 / 3, abs=0.01)  # set 1's sentence 0 has one miss
