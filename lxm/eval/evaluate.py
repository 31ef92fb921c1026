"""Official evaluation from file paths: what `lxm evaluate vqa|gqa|nlvr2|qa|classify` prints, callable from Python.

Each function reads the official files (`lxm.eval.formats`) and scores them (`lxm.eval.metrics`); a file that cannot
be used raises an `LxmError` whose one-line message starts with that file's path (an unreadable file raises the
`OSError`, which names it too).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from lxm.eval.formats import (classify_predictions, gqa_predictions, nlvr2_labels, nlvr2_predictions, qa_predictions,
                              read_classify_jsonl, read_json, read_qa_jsonl, vqa_inputs)
from lxm.eval.metrics import MetricsInputError, classify_metrics, gqa_metrics, nlvr2_metrics, qa_metrics, vqa_accuracy

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


def evaluate_qa(annotations: PathLike, predictions: PathLike) -> dict:
    """Accuracy of custom QA predictions (`lxm finetune qa`) over the questions of a labelled JSON lines file.

    Args:
        annotations: the QA file (`{"question_id", "img_id", "question", "answers"}` lines): annotator answers
            score with the official VQA accuracy, {answer: score} dicts with the given score.
        predictions: `[{"question_id", "answer"}, ...]`; predictions for other ids are counted in
            `ignored_predictions`.

    Returns:
        {"accuracy", ["perAnswerType",] "ignored_predictions"}: percent, 2 decimals.
    """
    with naming_files(annotations=annotations, predictions=predictions):
        records = read_qa_jsonl(annotations, require_labels=True)
        return qa_metrics({str(r.question_id): r.answers for r in records},
                          qa_predictions(read_json(predictions, "predictions")),
                          {str(r.question_id): r.answer_type for r in records if r.answer_type is not None})


def evaluate_classify(annotations: PathLike, predictions: PathLike) -> dict:
    """Accuracy and macro-F1 of classification predictions (`lxm finetune classify`).

    Args:
        annotations: the labelled JSON lines file (`{"id", "img_id", "text", "label"}` lines).
        predictions: CSV `id,label` (header line optional); predictions for other ids are counted in
            `ignored_predictions`.
    """
    with naming_files(annotations=annotations, predictions=predictions):
        labels = {str(r.id): r.label for r in read_classify_jsonl(annotations, require_labels=True)}
        return classify_metrics(labels, classify_predictions(Path(predictions).read_text()))
