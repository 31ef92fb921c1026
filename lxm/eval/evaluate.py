"""Official evaluation from file paths: what `lxm evaluate vqa|gqa|nlvr2` prints, callable from Python.

Each function reads the official files (`lxm.eval.formats`) and scores them (`lxm.eval.metrics`); a file that cannot
be used raises an `LxmError` whose one-line message starts with that file's path (an unreadable file raises the
`OSError`, which names it too).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from lxm.eval.formats import gqa_predictions, nlvr2_labels, nlvr2_predictions, read_json, vqa_inputs
from lxm.eval.metrics import MetricsInputError, gqa_metrics, nlvr2_metrics, vqa_accuracy

PathLike = str | os.PathLike


@contextlib.contextmanager
def naming_files(**paths: PathLike | None) -> Iterator[None]:
    """Put the file of the input an error is about (`MetricsInputError.source`) in front of its message."""
    try:
        yield
    except MetricsInputError as exc:
        path = paths.get(exc.source)
        if exc.path is None and path is not None:
            exc.args = (f"{path}: {exc}",)
            exc.path = str(path)
        raise


def evaluate_vqa(questions: PathLike, annotations: PathLike, predictions: PathLike) -> dict:
    """Official VQA accuracy of a results file.

    Args:
        questions: `v2_OpenEnded_mscoco_*_questions.json`: the questions evaluated.
        annotations: `v2_mscoco_*_annotations.json` (may cover more questions, as the full val file does for minival).
        predictions: results `[{"question_id": int, "answer": str}, ...]`, one per evaluated question.

    Returns:
        {"overall", "perAnswerType", "perQuestionType"}: percent, 2 decimals.
    """
    with naming_files(questions=questions, annotations=annotations, predictions=predictions):
        anns, preds = vqa_inputs(read_json(questions, "questions"), read_json(annotations, "annotations"),
                                 read_json(predictions, "predictions"))
        return vqa_accuracy(anns, preds)


def evaluate_gqa(questions: PathLike, predictions: PathLike, choices: PathLike | None = None) -> dict:
    """Every number of GQA's `eval.py` for a submission file (see `lxm.eval.metrics.gqa_metrics`).

    Args:
        questions: GQA questions with answers, e.g. `testdev_balanced_questions.json`.
        predictions: `[{"questionId": str, "prediction": str}, ...]`.
        choices: a `*_choices.json` file: adds validity and plausibility.
    """
    with naming_files(questions=questions, predictions=predictions, choices=choices):
        return gqa_metrics(read_json(questions, "questions"), gqa_predictions(read_json(predictions, "predictions")),
                           read_json(choices, "choices") if choices is not None else None)


def evaluate_nlvr2(annotations: PathLike, predictions: PathLike) -> dict:
    """NLVR2 accuracy and consistency of a predictions CSV over the examples of an annotation file.

    Args:
        annotations: NLVR2 `dev.json` / `test1.json` / `balanced_dev.json` ... (JSON lines): the examples scored.
        predictions: CSV lines `identifier,True|False[,...]`; predictions for other identifiers are counted in
            `ignored_predictions`.
    """
    with naming_files(annotations=annotations, predictions=predictions):
        return nlvr2_metrics(nlvr2_labels(Path(annotations).read_text()),
                             nlvr2_predictions(Path(predictions).read_text()))
