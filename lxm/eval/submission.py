"""Submission files checked before upload: what `lxm check-submission vqa|gqa|nlvr2` and the end of `lxm predict`
on a test split run.

The evaluation servers score a question without a prediction as wrong and say little about why (a VQA test-std file
at 0.02, GQA files at 0 %: airsplay/lxmert #52, LLaVA #604, mdetr #63). This module checks a file against the
questions it must answer, as each server parses it:

- VQA: visualqa.org/evaluation.html ("Results Format": `results = [result]`, `result{"question_id": int, "answer":
  str}`); GT-Vision-Lab/VQA commit a013f00 `PythonHelperTools/vqaTools/vqa.py` `loadRes` asserts that the set of
  result ids EQUALS the set of the questions' ids ("Either the results do not have predictions for all question ids
  ... or there is atleast one question id that does not belong to ..."). The EvalAI server wants every test2015
  question (447,793) for test-dev as for test-standard (visualqa.org/challenge.html: the test-dev procedure "is
  identical to the full test set submission procedure"; airsplay/lxmert README: "VQA submission system requires
  submitting whole test data ... 448K instances"), so `--questions` is `v2_OpenEnded_mscoco_test2015_questions.json`
  (`{"questions": [{"question_id": int, ...}]}`); the test-dev2015 questions file (`data_subtype` "test-dev2015")
  is refused as `--questions`, since a file that passes against it is refused by the server.
- GQA: the GQA authors' `eval.py` header ("predictions file format: JSON array: [{"questionId": str, "prediction":
  str}]"); GQA 1.2 `questions/readme.txt`: `submission_all_questions.json` is "the union of the questions from val,
  test-dev, test and challenge ... please upload your answers on all questions in that file" (an object keyed by
  questionId; read streaming, it holds ~4.2M questions). airsplay/lxmert #52: an accuracy of 0 from ids of the
  wrong type or a file that does not cover every question.
- NLVR2: lil-lab/nlvr `nlvr2/README.md` ("Evaluation scripts": a CSV, "the first value as the example's unique
  identifier and the second as the prediction (in the same format as labels in the JSON files)", i.e. `True` /
  `False`; "It will give an error if predictions are missing or received more predictions than it expected") and
  `nlvr2/eval/metrics.py` (commit e6a286a: `line.strip().split(",")`, fields 0 and 1; missing predictions listed).
  `--questions` is the split's JSON lines file (`test1.json`, `test2.json`: `identifier` on every line).

A file is ready when every required id has exactly one record, no record has another id, every id and answer has
the type the server parses, and (given the model's answer table) every answer is one of the table's. Problems are
counted, not raised: the report (`SubmissionReport`) has the count and the first few offending ids of each kind. A
file that is not a submission at all (not JSON, not an array; a questions file without its ids) is an LxmError
naming the file.

Deliberate differences from the official readers, all stricter, where they would score or crash silently:
- An id of the wrong type matches no question: it counts as an id of the wrong type and its question as missing
  (the server compares `123` and `"123"` as different ids). VQA ids must be JSON integers: `loadRes`'s set
  comparison would also match a float `1.0`; the format page says int.
- NLVR2 predictions must be exactly `True` or `False` (the README's label format); metrics.py would accept any case
  (`prediction.lower() == label.lower()`). A blank line, which crashes metrics.py, and a header line, which it reads
  as a prediction for the identifier `identifier`, are problems too.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lxm.corpus.jsonstream import iter_json_list, iter_json_object
from lxm.errors import LxmError
from lxm.jsonl import read_json_lines

_logger = logging.getLogger(__name__)

SubmissionTask = Literal["vqa", "gqa", "nlvr2"]
SUBMISSION_TASKS: tuple[str, ...] = ("vqa", "gqa", "nlvr2")
FIRST = 5  # offending ids shown per kind of problem
NLVR2_LABELS = ("True", "False")


class SubmissionError(LxmError, ValueError):
    """A submission or questions file that cannot be read as one at all; the message names the file."""


# the kinds of problem, in the order a report lists them (`_problem_texts` says each one per task)
_KINDS = ("unreadable", "id_type", "answer_type", "duplicate", "extra", "missing", "outside_table")


@dataclass(frozen=True)
class Problem:
    """One kind of problem of a submission file: how many records (ids) have it and the first few of them."""

    kind: str  # one of unreadable, id_type, answer_type, duplicate, extra, missing, outside_table
    what: str  # what is wrong, as the report says it ("question_id not a JSON integer")
    count: int  # records (for missing: required ids) with the problem
    first: tuple[str, ...]  # the first `FIRST` offending ids as the file spells them (JSON: "123" vs 123), or
    #   "record N" / "line N" where there is no id to show

    def line(self) -> str:
        more = ", ..." if self.count > len(self.first) else ""
        return f"{self.what}: {self.count:,} (first: {', '.join(self.first)}{more})"


@dataclass(frozen=True)
class SubmissionReport:
    """What `check_submission` found in one file."""

    task: SubmissionTask  # whose server the file is for
    path: str  # the file checked
    size_bytes: int  # its size on disk
    records: int  # records (NLVR2: lines) read
    required: int  # distinct ids the questions require
    answer_table: int | None  # answers in the table the answers were checked against; None = not checked
    problems: tuple[Problem, ...]  # empty: the file is ready

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, kind: str) -> int:
        """How many records (ids) have the problem `kind` (0 when none)."""
        return next((p.count for p in self.problems if p.kind == kind), 0)

    def summary(self) -> str:
        """One line: ready, with what was checked, or not, with the count of each problem."""
        size = human_size(self.size_bytes)
        if self.ok:
            table = (f", every answer in the model's {self.answer_table}-answer table"
                     if self.answer_table is not None else "")
            return (f"{self.path}: {self.task} submission ready: {self.records:,} records, each of the "
                    f"{self.required:,} required ids once, ids and answers of the types the server parses{table}; "
                    f"{size}")
        counts = ", ".join(f"{p.count:,} {p.kind.replace('_', ' ')}" for p in self.problems)
        return (f"{self.path}: {self.task} submission NOT ready ({counts}; {self.records:,} records for "
                f"{self.required:,} required ids; {size})")

    def details(self) -> list[str]:
        """One line per problem: its count and first offending ids."""
        return [p.line() for p in self.problems]


def human_size(n: int) -> str:
    """Bytes as a person reads them (1000-based, as upload pages state their limits)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


class _Tally:
    """Offending records per kind: a count and the first few ids."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.first: dict[str, list[str]] = {}

    def add(self, kind: str, shown: str) -> None:
        self.counts[kind] += 1
        first = self.first.setdefault(kind, [])
        if len(first) < FIRST:
            first.append(shown)


def _shown(value: object) -> str:
    """An id as the file spells it (JSON), so that "123" and 123 read differently."""
    try:
        return json.dumps(value)[:60]
    except (TypeError, ValueError):
        return repr(value)[:60]


# ---------------------------------------------------------------------------------------------------- questions


def required_ids(task: SubmissionTask, questions: str | os.PathLike) -> list:
    """The ids a submission for `task` must answer, from the official questions file, in its order (each once),
    typed as the server compares them (VQA int, GQA and NLVR2 str).

    Raises:
        SubmissionError: the file is not the task's questions file (the message names it and what was expected).
    """
    _check_task(task)
    path = Path(questions)
    if task == "vqa":
        obj = _read_json(path, "questions")
        records = obj.get("questions") if isinstance(obj, Mapping) else None
        if not isinstance(records, list):
            raise SubmissionError(f"{path}: expected VQA questions {{\"questions\": [{{\"question_id\": int, ...}}]}} "
                                  f"(v2_OpenEnded_mscoco_test2015_questions.json)")
        if obj.get("data_subtype") == "test-dev2015":  # what a test-dev check would wrongly pass
            raise SubmissionError(f"{path}: the test-dev2015 questions; the VQA server wants a prediction for every "
                                  f"test2015 question for test-dev as for test-standard: give "
                                  f"v2_OpenEnded_mscoco_test2015_questions.json")
        ids = {}
        for n, rec in enumerate(records):
            qid = rec.get("question_id") if isinstance(rec, Mapping) else None
            if not isinstance(qid, int) or isinstance(qid, bool):
                raise SubmissionError(f"{path}: questions[{n}]: no integer 'question_id'")
            ids[qid] = None
        return list(ids)
    if task == "gqa":
        shape = "expected GQA questions {questionId: {\"imageId\", \"question\", ...}} (submission_all_questions.json)"
        ids = {}
        try:
            for qid, rec in _stream(iter_json_object(path), path):
                if not isinstance(rec, Mapping):  # e.g. VQA's {"questions": [...]}
                    raise SubmissionError(f"{path}: {shape}; question {qid!r} is a {type(rec).__name__}")
                ids[qid] = None
        except SubmissionError:
            raise
        except LxmError as exc:
            raise SubmissionError(f"{path}: {shape} ({exc})") from None
        return list(ids)
    ids = {}
    for n, rec in read_json_lines(path, objects=True, error=SubmissionError):
        ident = rec.get("identifier")
        if not isinstance(ident, str) or not ident:
            raise SubmissionError(f"{path}:{n}: no string field 'identifier' (NLVR2 test1.json / test2.json lines)")
        ids[ident] = None
    return list(ids)


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{path}: the {what} file is not valid JSON ({exc})") from None


def _stream(items: Iterator, path: Path) -> Iterator:
    """`items` of a streamed JSON container; a decoding error is one line naming the file."""
    try:
        yield from items
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _check_task(task: str) -> None:
    if task not in SUBMISSION_TASKS:
        raise SubmissionError(f"unknown submission task {task!r} (one of {', '.join(SUBMISSION_TASKS)})")


# ---------------------------------------------------------------------------------------------------- submissions

# (id field, answer field, id type, the id problem, the answer problem) of the JSON submissions
_JSON_FIELDS = {
    "vqa": ("question_id", "answer", int, "question_id not a JSON integer", "answer not a string"),
    "gqa": ("questionId", "prediction", str, "questionId not a string", "prediction not a string"),
}


def check_submission(task: SubmissionTask, path: str | os.PathLike, questions: str | os.PathLike,
                     answers: Collection[str] | None = None) -> SubmissionReport:
    """Check the submission file `path` of `task` (vqa, gqa, nlvr2) against the official questions file.

    Args:
        questions: VQA `v2_OpenEnded_mscoco_test2015_questions.json`, GQA `submission_all_questions.json`, NLVR2
            `test1.json` / `test2.json` (any file of the split's questions in that format).
        answers: the model's answer table (VQA / GQA): every answer must be one of them; None checks nothing.

    Raises:
        SubmissionError: a file cannot be read as what it should be (the message names it).
        OSError: a file cannot be read (names it).
    """
    return check_submission_ids(task, path, required_ids(task, questions), answers)


def check_submission_ids(task: SubmissionTask, path: str | os.PathLike, required: Iterable,
                         answers: Collection[str] | None = None) -> SubmissionReport:
    """`check_submission` against the ids `required` (typed as the server compares them: VQA int, else str; the
    first missing ones are reported in this order), e.g. the ids of a corpus table built from the questions file
    (what `lxm predict` checks against)."""
    _check_task(task)
    if answers is not None and task == "nlvr2":
        raise SubmissionError("NLVR2 predictions are True / False: there is no answer table to check them against")
    path = Path(path)
    size = path.stat().st_size
    table = None if answers is None else (answers if isinstance(answers, (set, frozenset)) else set(answers))
    order = list(required)
    required = set(order)
    tally = _Tally()
    seen: set = set()
    if task == "nlvr2":
        records = _nlvr2_records(path, tally, seen, required)
    else:
        records = _json_records(task, path, tally, seen, required, table)
    missing = [q for q in dict.fromkeys(order) if q not in seen]
    for q in missing[:FIRST]:
        tally.first.setdefault("missing", []).append(_shown(q))
    tally.counts["missing"] = len(missing)
    whats = _problem_texts(task)
    problems = tuple(Problem(kind, whats[kind], tally.counts[kind], tuple(tally.first.get(kind, ())))
                     for kind in _KINDS if tally.counts[kind])
    report = SubmissionReport(task, str(path), size, records, len(required),
                              None if table is None else len(table), problems)
    _logger.info(report.summary())
    return report


def _problem_texts(task: str) -> dict[str, str]:
    id_field = {"vqa": "question_id", "gqa": "questionId", "nlvr2": "identifier"}[task]
    texts = {
        "unreadable": "records the server cannot read (not an object, or no id)" if task != "nlvr2"
        else "lines metrics.py cannot read (blank, or no identifier,prediction)",
        "duplicate": f"records repeating a {id_field} given before",
        "extra": f"records whose {id_field} is not a required question",
        "missing": f"required {'identifiers' if task == 'nlvr2' else 'questions'} without a prediction",
        "outside_table": "answers not in the model's answer table",
    }
    if task == "nlvr2":
        texts["answer_type"] = "predictions other than True / False"
    else:
        texts["id_type"], texts["answer_type"] = _JSON_FIELDS[task][3:]
    return texts


def _json_records(task: str, path: Path, tally: _Tally, seen: set, required: Collection,
                  table: Collection[str] | None) -> int:
    id_field, answer_field, id_type, _, _ = _JSON_FIELDS[task]
    n = 0
    try:
        for n, rec in enumerate(_stream(iter_json_list(path), path), start=1):
            if not isinstance(rec, Mapping) or id_field not in rec:
                tally.add("unreadable", f"record {n}")
                continue
            qid, answer = rec[id_field], rec.get(answer_field)
            typed = isinstance(qid, id_type) and not isinstance(qid, bool)
            if not typed:
                tally.add("id_type", _shown(qid))
            if not isinstance(answer, str):
                tally.add("answer_type", _shown(qid))
            elif table is not None and answer not in table:
                tally.add("outside_table", f"{_shown(qid)} ({_shown(answer)})")
            if typed:
                _count_id(qid, tally, seen, required)
    except SubmissionError:
        raise
    except LxmError as exc:  # not a JSON array, or broken JSON: not a submission at all
        raise SubmissionError(f"{path}: expected a JSON array of {{\"{id_field}\", \"{answer_field}\"}} records "
                              f"({exc})") from None
    return n


def _count_id(qid, tally: _Tally, seen: set, required: Collection) -> None:
    if qid in seen:
        tally.add("duplicate", _shown(qid))
    elif qid not in required:
        tally.add("extra", _shown(qid))
        seen.add(qid)  # a second record of it is a duplicate too
    else:
        seen.add(qid)


def _nlvr2_records(path: Path, tally: _Tally, seen: set, required: Collection) -> int:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"{path}: not UTF-8 text ({exc.reason})") from None
    lines = text.splitlines()  # as metrics.py's readlines(): no empty last line after the final newline
    for n, line in enumerate(lines, start=1):
        fields = line.strip().split(",")  # exactly metrics.py's split: spaces around a field stay in it
        if len(fields) < 2 or not fields[0]:
            tally.add("unreadable", f"line {n}")
            continue
        ident, prediction = fields[0], fields[1]
        if prediction not in NLVR2_LABELS:
            tally.add("answer_type", f"{_shown(ident)} ({_shown(prediction)})")
        _count_id(ident, tally, seen, required)
    return len(lines)
