"""`lxm evaluate vqa|gqa|nlvr2|qa|classify`: the metrics of a predictions file, as JSON on stdout.

Thin wrappers over `lxm.eval.evaluate_vqa` / `evaluate_gqa` / `evaluate_nlvr2` / `evaluate_qa` /
`evaluate_classify`, which a notebook calls directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer

from lxm.cli.common import USER_ERRORS, fail

evaluate_app = typer.Typer(help="Score predictions with the official VQA / GQA / NLVR2 metrics, or those of your own "
                                "qa / classify data (JSON to stdout).",
                           no_args_is_help=True)


def _print_scores(evaluate: Callable[..., dict], *args: Path | None) -> None:
    try:
        scores = evaluate(*args)
    except USER_ERRORS as exc:
        fail(exc)
    typer.echo(json.dumps(scores, indent=2))


@evaluate_app.command("vqa")
def evaluate_vqa_cmd(
    questions: Path = typer.Option(..., "--questions", exists=True, dir_okay=False,
                                   help="v2_OpenEnded_mscoco_*_questions.json (the evaluated questions)."),
    annotations: Path = typer.Option(..., "--annotations", exists=True, dir_okay=False,
                                     help="v2_mscoco_*_annotations.json."),
    predictions: Path = typer.Option(..., "--predictions", exists=True, dir_okay=False,
                                     help='Results: [{"question_id": int, "answer": str}, ...].'),
) -> None:
    """Official VQA accuracy (overall, per answer type, per question type; 0-100).

    Example: lxm evaluate vqa --questions v2_OpenEnded_mscoco_val2014_questions.json --annotations v2_mscoco_val2014_annotations.json --predictions minival_predict.json
    """
    from lxm.eval import evaluate_vqa

    _print_scores(evaluate_vqa, questions, annotations, predictions)


@evaluate_app.command("gqa")
def evaluate_gqa_cmd(
    questions: Path = typer.Option(..., "--questions", exists=True, dir_okay=False,
                                   help="GQA questions with answers, e.g. testdev_balanced_questions.json."),
    predictions: Path = typer.Option(..., "--predictions", exists=True, dir_okay=False,
                                     help='[{"questionId": str, "prediction": str}, ...].'),
    choices: Path = typer.Option(None, "--choices", exists=True, dir_okay=False,
                                 help="GQA choices file (valid / plausible answers per question, e.g. "
                                      "val_choices.json): adds validity and plausibility."),
) -> None:
    """Every number of GQA's eval.py, unrounded, in percent: accuracy, binary, open, consistency, validity and
    plausibility (with --choices), distribution (chi-square / 100, lower is better) and (accuracy, questions) per
    structural type, semantic type, steps and words.

    Balanced questions are scored; entailed ids absent from --questions are skipped (counted in entailed_absent),
    predictions for other ids are ignored (counted in ignored_predictions).

    Example: lxm evaluate gqa --questions testdev_balanced_questions.json --predictions testdev_predict.json
    """
    from lxm.eval import evaluate_gqa

    _print_scores(evaluate_gqa, questions, predictions, choices)


@evaluate_app.command("nlvr2")
def evaluate_nlvr2_cmd(
    annotations: Path = typer.Option(..., "--annotations", exists=True, dir_okay=False,
                                     help="NLVR2 dev.json / test1.json / balanced_dev.json ... (JSON lines): the "
                                          "examples scored."),
    predictions: Path = typer.Option(..., "--predictions", exists=True, dir_okay=False,
                                     help="CSV lines identifier,True|False[,...] (an identifier,prediction header "
                                          "is skipped)."),
) -> None:
    """NLVR2 accuracy and consistency (0-100), as the official metrics.py, over the examples of --annotations.

    Predictions for other identifiers are ignored and counted (ignored_predictions), so full dev predictions score
    the balanced / unbalanced subsets.

    Example: lxm evaluate nlvr2 --annotations dev.json --predictions dev_predict.csv
    """
    from lxm.eval import evaluate_nlvr2

    _print_scores(evaluate_nlvr2, annotations, predictions)


@evaluate_app.command("qa")
def evaluate_qa_cmd(
    annotations: Path = typer.Option(..., "--annotations", exists=True, dir_okay=False,
                                     help='Labelled JSON lines {"question_id", "img_id", "question", "answers"} '
                                          '(the questions scored).'),
    predictions: Path = typer.Option(..., "--predictions", exists=True, dir_okay=False,
                                     help='[{"question_id", "answer"}, ...] (lxm predict qa).'),
) -> None:
    """Accuracy (0-100) of qa predictions: per question the official VQA accuracy for a list of annotator answers,
    the given score of the predicted answer for {answer: score}; per answer_type too when the lines have one.

    Predictions for other ids are ignored and counted (ignored_predictions); a scored question without one is an
    error.

    Example: lxm evaluate qa --annotations valid.jsonl --predictions valid_predict.json
    """
    from lxm.eval import evaluate_qa

    _print_scores(evaluate_qa, annotations, predictions)


@evaluate_app.command("classify")
def evaluate_classify_cmd(
    annotations: Path = typer.Option(..., "--annotations", exists=True, dir_okay=False,
                                     help='Labelled JSON lines {"id", "img_id", "text", "label"} (the examples '
                                          'scored).'),
    predictions: Path = typer.Option(..., "--predictions", exists=True, dir_okay=False,
                                     help="CSV id,label (lxm predict classify; the header line is optional)."),
) -> None:
    """Accuracy and macro-F1 (0-100; F1 per label averaged over the gold and predicted labels, as sklearn's
    f1_score(average="macro")) of classification predictions.

    Predictions for other ids are ignored and counted (ignored_predictions); a scored example without one is an
    error.

    Example: lxm evaluate classify --annotations valid.jsonl --predictions valid_predict.csv
    """
    from lxm.eval import evaluate_classify

    _print_scores(evaluate_classify, annotations, predictions)
