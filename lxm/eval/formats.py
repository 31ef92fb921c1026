"""The official VQA / GQA / NLVR2 file formats: readers of the evaluation inputs, writers of the submission files.

Readers turn the parsed content of the official files into what `lxm.eval.metrics` scores, checking every record
they use (a bad record raises `MetricsInputError` naming the input, the record or line and the field):

- VQA (GT-Vision-Lab/VQA `vqaTools/vqa.py` `loadRes`, datasets.md §4): questions `v2_OpenEnded_mscoco_*_questions.json`
  (`{"questions": [{"question_id": int, ...}]}`), annotations `v2_mscoco_*_annotations.json` (`{"annotations":
  [{"question_id", "answers": [{"answer"}], "answer_type", "question_type"}]}`), results `[{"question_id": int,
  "answer": str}]`.
- GQA (the GQA authors' `eval.py`, datasets.md §6): questions `*_questions.json` (questionId -> record), choices
  `*_choices.json`, submissions `[{"questionId": str, "prediction": str}]`.
- NLVR2 (lil-lab/nlvr `nlvr2/eval/metrics.py`, commit 70d13f6, datasets.md §7): annotations as JSON lines with
  `identifier` and `label`; predictions as CSV lines `identifier,prediction[,anything]`, of which only the first two
  fields count.

- Custom datasets of `lxm finetune qa|classify` (lxm's own, no official reader): JSON lines, QA
  `{"question_id": int|str, "img_id": str, "question": str, "answers": [str, ...] | {str: score in [0, 1]},
  ["answer_type": str, "question_type": str]}`, classification `{"id": int|str, "img_id": str, "text": str,
  "label": str|number|bool}` (a label is compared as its text: a string as written, a number or boolean as its JSON
  spelling, true -> "true", 1 -> "1", 1.0 -> "1.0"; a file that writes one label both ways, "1" and 1, is refused).
  The labels are optional (a test
  file), but a file has them on every line or on none. Each bad line raises `FILE:LINE: field 'x': what is wrong`.
  Predictions: QA `[{"question_id", "answer"}]` (the VQA results format, ids as in the data), classification CSV
  `id,label` with that header line.

Writers produce the submission formats the evaluation servers take (VQA and GQA JSON, NLVR2 CSV), atomically.

Deliberate differences from the official readers, all where those crash, stop or silently guess:
- VQA: a record without a needed field, or of the wrong type, is an error naming it (`loadRes` raises KeyError or
  asserts); a question_id given twice in the results is an error (`loadRes` keeps the last).
- GQA: a repeated questionId is an error (eval.py keeps the last); questionIds are compared as strings (the
  server's format; eval.py misses int ids).
- NLVR2: fields are stripped of surrounding spaces; blank lines are skipped and a first line `identifier,prediction`
  is taken as a header (metrics.py crashes on blank lines and would read the header as a prediction); a line with
  fewer than two fields or a repeated identifier is an error (metrics.py crashes / keeps the last).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from lxm import atomic
from lxm.eval.metrics import MetricsInputError, PredictionError
from lxm.jsonl import BadLine, read_json_lines

def read_json(path: str | os.PathLike, source: str) -> object:
    """The parsed JSON of the `source` input ("questions", "annotations", "predictions", "choices") at `path`.

    Raises:
        MetricsInputError: not valid JSON; the message names the file.
        OSError: the file cannot be read (it names the file too).
    """
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise MetricsInputError(source, f"{path}: not valid JSON ({exc})", path=str(path)) from None


# ---------------------------------------------------------------------------------------------------- VQA


def _records(obj: object, key: str | None, source: str, fields: dict[str, type]) -> list[Mapping]:
    """The records of a VQA file (under `key`, or the top-level array), each checked to hold `fields`."""
    records = obj if key is None else obj.get(key) if isinstance(obj, Mapping) else None
    if not isinstance(records, list):
        where = f"an object with a list {key!r}" if key is not None else "a JSON array"
        raise MetricsInputError(source, f"expected {where}")
    for n, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise MetricsInputError(source, f"record {n}: not a JSON object")
        for field, kind in fields.items():
            if not isinstance(rec.get(field), kind) or isinstance(rec.get(field), bool):
                raise MetricsInputError(source, f"record {n}: no {kind.__name__} field {field!r}")
    return records


def vqa_inputs(questions: object, annotations: object, predictions: object) -> tuple[list[Mapping], dict[int, str]]:
    """The parsed JSON of the official files -> (annotations of the evaluated questions, question_id -> answer).

    questions: `v2_OpenEnded_mscoco_*_questions.json`; annotations: `v2_mscoco_*_annotations.json` (may cover more
    questions, as the full val annotations do for minival); predictions: `[{"question_id": int, "answer": str}]`.
    """
    qids = {q["question_id"] for q in _records(questions, "questions", "questions", {"question_id": int})}
    anns = [a for a in _records(annotations, "annotations", "annotations",
                                {"question_id": int, "answers": list, "answer_type": str, "question_type": str})
            if a["question_id"] in qids]
    for a in anns:
        if not all(isinstance(x, Mapping) and isinstance(x.get("answer"), str) for x in a["answers"]):
            raise MetricsInputError("annotations", f"question {a['question_id']}: answers without a string 'answer'")
    preds: dict[int, str] = {}
    for n, rec in enumerate(_records(predictions, None, "predictions", {"question_id": int, "answer": str})):
        if rec["question_id"] in preds:
            raise PredictionError(f"record {n}: question_id {rec['question_id']} again")
        preds[rec["question_id"]] = rec["answer"]
    return anns, preds


# ---------------------------------------------------------------------------------------------------- GQA


def _keyed_predictions(records: object, id_key: str, value_key: str, shape: str, *, string_values: bool
                       ) -> dict[str, str]:
    """A JSON array of {id_key, value_key} records -> id (as str) -> value; a repeated id is an error naming both
    records. `string_values`: the value must be a string (else only present)."""
    if not isinstance(records, list):
        raise PredictionError(f"expected a JSON array of {shape}")
    preds: dict[str, str] = {}
    first: dict[str, int] = {}
    for n, rec in enumerate(records, start=1):
        if not isinstance(rec, Mapping) or id_key not in rec:
            raise PredictionError(f"record {n}: no field {id_key!r}")
        if string_values and not isinstance(rec.get(value_key), str):
            raise PredictionError(f"record {n}: no string field {value_key!r}")
        if value_key not in rec:
            raise PredictionError(f"record {n}: no field {value_key!r}")
        qid = str(rec[id_key])
        if qid in first:
            raise PredictionError(f"record {n}: {id_key} {qid} again (first in record {first[qid]})")
        first[qid] = n
        preds[qid] = rec[value_key]
    return preds


def gqa_predictions(records: object) -> dict[str, str]:
    """The submission array `[{"questionId": str, "prediction": str}, ...]` -> questionId (as str) -> prediction."""
    return _keyed_predictions(records, "questionId", "prediction", '{"questionId": str, "prediction": str}',
                              string_values=False)


# ---------------------------------------------------------------------------------------------------- NLVR2

_HEADER = ["identifier", "prediction"]


def nlvr2_predictions(text: str) -> dict[str, str]:
    """Parse a predictions CSV: `identifier,prediction[,anything]` per line; only the first two fields count.

    Blank lines are skipped, and so is a first line `identifier,prediction` (a header)."""
    preds: dict[str, str] = {}
    first: dict[str, int] = {}
    seen_line = False
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if not seen_line:
            seen_line = True
            if [f.lower() for f in fields[:2]] == _HEADER:
                continue
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise PredictionError(f"line {n}: expected identifier,prediction, got {line.strip()[:80]!r}")
        ident = fields[0]
        if ident in first:
            raise PredictionError(f"line {n}: identifier {ident} again (first on line {first[ident]})")
        first[ident] = n
        preds[ident] = fields[1]
    return preds


def _bad_annotation(bad: BadLine) -> None:
    # no path here: evaluate_nlvr2 puts the file in front of the message (naming_files)
    raise MetricsInputError("annotations", f"line {bad.number}: {bad.reason}")


def nlvr2_labels(text: str) -> dict[str, str]:
    """Parse an NLVR2 annotation file (JSON lines with `identifier` and `label`) -> identifier -> label."""
    labels: dict[str, str] = {}
    for n, rec in read_json_lines("annotations", lines=io.StringIO(text), on_bad=_bad_annotation):
        for key in ("identifier", "label"):
            if not isinstance(rec, Mapping) or not isinstance(rec.get(key), str):
                raise MetricsInputError("annotations", f"line {n}: no string field {key!r}")
        if rec["identifier"] in labels:
            raise MetricsInputError("annotations", f"line {n}: identifier {rec['identifier']} again")
        labels[rec["identifier"]] = rec["label"]
    return labels


# ---------------------------------------------------------------------------------------------------- custom tasks


@dataclass(frozen=True)
class QaRecord:
    """One line of a custom QA file; `answers` None = unlabelled (a test file)."""

    line: int
    question_id: int | str
    img_id: str
    question: str
    answers: list[str] | dict[str, float] | None
    answer_type: str | None = None
    question_type: str | None = None


@dataclass(frozen=True)
class ClassifyRecord:
    """One line of a custom classification file; `label` (as str) None = unlabelled (a test file)."""

    line: int
    id: int | str
    img_id: str
    text: str
    label: str | None


def _line_error(path: str | os.PathLike, n: int, message: str) -> MetricsInputError:
    return MetricsInputError("annotations", f"{path}:{n}: {message}", path=str(path))


def _jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, Mapping]]:
    """(line number, JSON object) of every non-blank line."""
    return read_json_lines(path, objects=True,
                           error=lambda message: MetricsInputError("annotations", message, path=str(path)))


class _Checker:
    """Field checks of one JSON lines file: ids unique, labels on every line or on none."""

    def __init__(self, path: str | os.PathLike, id_field: str, label_field: str, require_labels: bool):
        self.path, self.id_field, self.label_field, self.require_labels = path, id_field, label_field, require_labels
        self.first_id: dict[str, int] = {}
        self.labelled_at: tuple[bool, int] | None = None  # (first line labelled?, its number)

    def bad(self, n: int, field: str, what: str) -> MetricsInputError:
        return _line_error(self.path, n, f"field {field!r}: {what}")

    def value(self, n: int, rec: Mapping, field: str, kinds: tuple[type, ...], *, optional: bool = False):
        if field not in rec or (optional and rec[field] is None):
            if optional:
                return None
            raise self.bad(n, field, "missing")
        v = rec[field]
        if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
            names = " or ".join({"str": "string", "int": "integer", "bool": "boolean", "list": "list",
                                 "dict": "object"}[k.__name__] for k in kinds)
            raise self.bad(n, field, f"expected {names}, got {json.dumps(v)[:60]}")
        if isinstance(v, str) and not v.strip() and field not in ("question", "text"):
            raise self.bad(n, field, "empty")
        return v

    def example_id(self, n: int, rec: Mapping) -> int | str:
        v = self.value(n, rec, self.id_field, (int, str))
        key = str(v)
        if key in self.first_id:
            raise self.bad(n, self.id_field, f"{key} again (first on line {self.first_id[key]})")
        self.first_id[key] = n
        return v

    def labelled(self, n: int, rec: Mapping) -> bool:
        has = rec.get(self.label_field) is not None
        if not has and self.require_labels:
            raise self.bad(n, self.label_field, "missing (this file must be labelled)")
        if self.labelled_at is None:
            self.labelled_at = (has, n)
        elif self.labelled_at[0] != has:
            first, at = self.labelled_at
            raise self.bad(n, self.label_field, f"{'missing' if first else 'given'}, but line {at} "
                                                f"{'has one' if first else 'has none'} (a file is labelled on every "
                                                f"line or on none)")
        return has

    def done(self, count: int) -> None:
        if count == 0:
            raise MetricsInputError("annotations", f"{self.path}: no examples (empty file)", path=str(self.path))


def _qa_answers(check: _Checker, n: int, rec: Mapping) -> list[str] | dict[str, float]:
    answers = check.value(n, rec, "answers", (list, dict))
    if not answers:
        raise check.bad(n, "answers", "empty")
    if isinstance(answers, list):
        for a in answers:
            if not isinstance(a, str):
                raise check.bad(n, "answers", f"expected strings, got {json.dumps(a)[:60]}")
        return list(answers)
    out = {}
    for a, score in answers.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise check.bad(n, "answers", f"the score of {a!r} must be a number in [0, 1], got "
                                          f"{json.dumps(score)[:60]}")
        out[a] = float(score)
    return out


def read_qa_jsonl(path: str | os.PathLike, *, require_labels: bool = False) -> list[QaRecord]:
    """The checked lines of a custom QA file (see the module docstring); raises MetricsInputError naming
    `FILE:LINE: field`."""
    check = _Checker(path, "question_id", "answers", require_labels)
    out = []
    for n, rec in _jsonl_objects(path):
        qid = check.example_id(n, rec)
        img = check.value(n, rec, "img_id", (str,))
        question = check.value(n, rec, "question", (str,))
        answers = _qa_answers(check, n, rec) if check.labelled(n, rec) else None
        out.append(QaRecord(n, qid, img, question, answers,
                            check.value(n, rec, "answer_type", (str,), optional=True),
                            check.value(n, rec, "question_type", (str,), optional=True)))
    check.done(len(out))
    return out


def _label_text(check: _Checker, n: int, rec: Mapping, spelled: dict[str, tuple[bool, int]]) -> str:
    """A classification label as its text: a string as written, a number or boolean as JSON spells it (true ->
    "true", not Python's "True"). One text written as a string on one line and as a number or boolean on another
    ("1" and 1) is refused: the two would silently be one label."""
    v = rec["label"]  # present: `check.labelled` said so
    if not isinstance(v, (str, int, float)):  # bool is an int
        raise check.bad(n, "label", f"expected string, number or boolean, got {json.dumps(v)[:60]}")
    if isinstance(v, str) and not v.strip():
        raise check.bad(n, "label", "empty")
    if isinstance(v, float) and not math.isfinite(v):
        raise check.bad(n, "label", f"expected a finite number, got {json.dumps(v)}")
    text = v if isinstance(v, str) else json.dumps(v)
    is_string, first = spelled.setdefault(text, (isinstance(v, str), n))
    if is_string != isinstance(v, str):
        raise check.bad(n, "label", f"{json.dumps(v)}, but line {first} writes the label {text!r} as "
                                    f"{'a string' if is_string else 'a number or boolean'}; write each label one way "
                                    f"(labels are compared as text)")
    return text


def read_classify_jsonl(path: str | os.PathLike, *, require_labels: bool = False) -> list[ClassifyRecord]:
    """The checked lines of a custom classification file (see the module docstring); raises MetricsInputError
    naming `FILE:LINE: field`."""
    check = _Checker(path, "id", "label", require_labels)
    out = []
    spelled: dict[str, tuple[bool, int]] = {}  # label text -> (written as a JSON string?, first line)
    for n, rec in _jsonl_objects(path):
        ident = check.example_id(n, rec)
        img = check.value(n, rec, "img_id", (str,))
        text = check.value(n, rec, "text", (str,))
        label = _label_text(check, n, rec, spelled) if check.labelled(n, rec) else None
        out.append(ClassifyRecord(n, ident, img, text, label))
    check.done(len(out))
    return out


def qa_predictions(records: object) -> dict[str, str]:
    """The results array `[{"question_id": int|str, "answer": str}, ...]` -> question id (as str) -> answer."""
    return _keyed_predictions(records, "question_id", "answer", '{"question_id": ..., "answer": str}',
                              string_values=True)


_CLASSIFY_HEADER = ["id", "label"]


def classify_predictions(text: str) -> dict[str, str]:
    """Parse a predictions CSV `id,label` (a first line `id,label` is the header; blank lines skipped; labels are
    compared exactly, so the CSV quoting of `write_classify_predictions` round-trips any label)."""
    preds: dict[str, str] = {}
    first: dict[str, int] = {}
    rows = csv.reader(io.StringIO(text))
    seen_row = False
    for row in rows:
        n = rows.line_num
        if not any(f.strip() for f in row):
            continue
        if not seen_row:
            seen_row = True
            if [f.strip().lower() for f in row[:2]] == _CLASSIFY_HEADER:
                continue
        if len(row) < 2 or not row[0].strip():
            raise PredictionError(f"line {n}: expected id,label, got {','.join(row)[:80]!r}")
        ident = row[0].strip()
        if ident in first:
            raise PredictionError(f"line {n}: id {ident} again (first on line {first[ident]})")
        first[ident] = n
        preds[ident] = row[1]
    return preds


# ---------------------------------------------------------------------------------------------------- writers


def write_vqa_predictions(predictions: Mapping, path: str | os.PathLike) -> Path:
    """VQA's results file [{"question_id": int, "answer": str}] (src/tasks/vqa.py `dump_result`), atomically.

    Args:
        predictions: question id -> predicted answer, in file order.
    """
    return _write(path, json.dumps([{"question_id": int(q), "answer": a} for q, a in predictions.items()]))


def write_gqa_predictions(predictions: Mapping, path: str | os.PathLike) -> Path:
    """GQA's submission [{"questionId": str, "prediction": str}] (src/tasks/gqa.py `dump_result`), atomically."""
    return _write(path, json.dumps([{"questionId": str(q), "prediction": a} for q, a in predictions.items()]))


def write_qa_predictions(predictions: Mapping, path: str | os.PathLike) -> Path:
    """Custom QA: VQA's [{"question_id", "answer"}] with the ids as given (a string stays a string), atomically."""
    return _write(path, json.dumps([{"question_id": q, "answer": a} for q, a in predictions.items()]))


def write_nlvr2_predictions(predictions: Mapping, path: str | os.PathLike) -> Path:
    """NLVR2's CSV lines `identifier,True|False` without a header (src/tasks/nlvr2.py `dump_result`), atomically."""
    return _write(path, _csv_text(predictions))


def write_classify_predictions(predictions: Mapping, path: str | os.PathLike) -> Path:
    """Classification CSV `id,label` after that header line, atomically."""
    return _write(path, _csv_text(predictions, _CLASSIFY_HEADER))


def _csv_text(predictions: Mapping, header: list[str] | None = None) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    writer.writerows(predictions.items())
    return buf.getvalue()


def _write(path: str | os.PathLike, text: str) -> Path:
    atomic.write_text(path, text)
    return Path(path)
