"""`lxm evaluate vqa|gqa|nlvr2|qa|classify`: the metrics of a predictions file, as JSON on stdout; `lxm
check-submission vqa|gqa|nlvr2`: a submission file checked before upload.

Thin wrappers over `lxm.eval.evaluate_vqa` / `evaluate_gqa` / `evaluate_nlvr2` / `evaluate_qa` /
`evaluate_classify` and `lxm.eval.check_submission`, which a notebook calls directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import typer

from lxm.cli.common import USER_ERRORS, fail, report_submission
from lxm.errors import ConfigError

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


class SubmissionTask(str, Enum):
    vqa = "vqa"
    gqa = "gqa"
    nlvr2 = "nlvr2"


def check_submission_cmd(
    task: SubmissionTask = typer.Argument(..., help="vqa, gqa or nlvr2: whose server the file is for."),
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The submission file: VQA / GQA JSON, NLVR2 "
                                                                       "CSV (what lxm predict writes)."),
    questions: Path = typer.Option(..., "--questions", exists=True, dir_okay=False,
                                   help="The questions the server scores: VQA v2_OpenEnded_mscoco_test2015_questions"
                                        ".json (all 447,793, for test-dev as for test-standard), GQA "
                                        "submission_all_questions.json, NLVR2 test1.json / test2.json."),
    answers: Path = typer.Option(None, "--answers", exists=True, dir_okay=False,
                                 help="VQA / GQA: the model's answer table (a JSON list, or {answer: id}); every "
                                      "answer must be in it."),
    run: Path = typer.Option(None, "--run", help="VQA / GQA: the finetuning run whose answer table (RUN/answers.json) "
                                                 "the answers must be in."),
) -> None:
    """Check a submission file before upload: every question of --questions answered exactly once, no other ids,
    the types the server parses (VQA question_id int and answer str; GQA questionId and prediction str; NLVR2 lines
    identifier,True|False), the file's size, and with --answers or --run whether every answer is in the model's
    answer table.

    Prints one line and exits 0 when the file is ready; otherwise exits 1 with the count of each problem and its
    first offending ids. The servers score a missing question as wrong without saying so.

    Example: lxm check-submission vqa test_predict.json --questions v2_OpenEnded_mscoco_test2015_questions.json --run runs/vqa
    """
    from lxm.corpus.layout import read_answer_table
    from lxm.eval.submission import check_submission

    try:
        if answers is not None and run is not None:
            raise ConfigError("--answers and --run both name an answer table; give one")
        table = None
        if answers is not None:
            table = read_answer_table(answers)
        elif run is not None:
            from lxm.infer.runs import open_run

            _, task_obj, _ = open_run(run)
            if not task_obj.answer_table:
                raise ConfigError(f"--run {run}: a {task_obj.name} run has no answer table")
            table = task_obj.answers
        report = check_submission(task.value, file, questions, table)
    except USER_ERRORS as exc:
        fail(exc)
    report_submission(report, summary_to_stdout=True)
