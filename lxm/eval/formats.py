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
import os
from collections.abc import Mapping
from pathlib import Path

from lxm import atomic
from lxm.eval.metrics import MetricsInputError, PredictionError

TASKS = ("vqa", "gqa", "nlvr2")


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


def gqa_predictions(records: object) -> dict[str, str]:
    """The submission array `[{"questionId": str, "prediction": str}, ...]` -> questionId (as str) -> prediction."""
    if not isinstance(records, list):
        raise PredictionError('expected a JSON array of {"questionId": str, "prediction": str}')
    preds: dict[str, str] = {}
    first: dict[str, int] = {}
    for n, rec in enumerate(records, start=1):
        for key in ("questionId", "prediction"):
            if not isinstance(rec, Mapping) or key not in rec:
                raise PredictionError(f"record {n}: no field {key!r}")
        qid = str(rec["questionId"])
        if qid in first:
            raise PredictionError(f"record {n}: questionId {qid} again (first in record {first[qid]})")
        first[qid] = n
        preds[qid] = rec["prediction"]
    return preds


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


def nlvr2_labels(text: str) -> dict[str, str]:
    """Parse an NLVR2 annotation file (JSON lines with `identifier` and `label`) -> identifier -> label."""
    labels: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MetricsInputError("annotations", f"line {n}: not a JSON object ({exc.msg})") from None
        for key in ("identifier", "label"):
            if not isinstance(rec, Mapping) or not isinstance(rec.get(key), str):
                raise MetricsInputError("annotations", f"line {n}: no string field {key!r}")
        if rec["identifier"] in labels:
            raise MetricsInputError("annotations", f"line {n}: identifier {rec['identifier']} again")
        labels[rec["identifier"]] = rec["label"]
    return labels


# ---------------------------------------------------------------------------------------------------- writers


def prediction_file_name(task: str, split: str) -> str:
    """`<split>_predict.json` (VQA, GQA) or `<split>_predict.csv` (NLVR2), the names the original wrote."""
    return f"{split}_predict.csv" if task == "nlvr2" else f"{split}_predict.json"


def write_predictions(task: str, predictions: Mapping, path: str | os.PathLike) -> Path:
    """The official submission formats: VQA [{"question_id", "answer"}], GQA [{"questionId", "prediction"}],
    NLVR2 CSV lines `identifier,True|False`. Written atomically.

    Args:
        task: "vqa", "gqa" or "nlvr2".
        predictions: question id / identifier -> predicted answer ("True"/"False" for NLVR2), in file order.
    """
    if task == "vqa":
        text = json.dumps([{"question_id": int(q), "answer": a} for q, a in predictions.items()])
    elif task == "gqa":
        text = json.dumps([{"questionId": str(q), "prediction": a} for q, a in predictions.items()])
    elif task == "nlvr2":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(predictions.items())
        text = buf.getvalue()
    else:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    atomic.write_text(path, text)
    return Path(path)
