"""The end-of-finetuning report: what a researcher reads before trusting a validation score.

The original (airsplay/lxmert `src/tasks/*.py`) printed one number per epoch. A single accuracy hides the failure
that small or hard datasets produce most often, a model that predicts one or a few answers for everything (the
quickstart's models predict 1-3), so next to the score the report gives: the majority-class baseline (the most
frequent training answer / label predicted for every validation example, scored by the task's own metric), the
histogram of predicted answers with a warning when the model predicts only a few distinct ones, scores per answer
type (VQA, qa: the `answer_type` column), per-label precision / recall / F1 and the confusion matrix of the
single-label tasks (classify, NLVR2), and the wall time of each epoch.

Plain functions over predictions and kept labels (no model, no torch): `validation_report` assembles them for
`Finetuner.run` (summary.json's "report"), `report_lines` renders the few lines `lxm finetune` prints.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxm.jsonl import read_json_lines

if TYPE_CHECKING:
    from lxm.train.tasks import FinetuneTask

FEW_DISTINCT = 3  # a model predicting at most this many distinct answers (fewer than the labels) is warned about
TOP_ANSWERS = 10  # predicted answers listed in the report
MAX_MATRIX_LABELS = 30  # a confusion matrix over more labels is not stored (per-label scores still are)


def gold_labels(task: FinetuneTask, targets: Sequence) -> list[str] | None:
    """The label string of each kept label of a single-label task (classify, NLVR2: "True"/"False"); None for an
    answer task, whose targets are soft scores over several answers."""
    from lxm.train.tasks import AnswerTask

    if isinstance(task, AnswerTask):
        return None
    return [task.target_answers(t)[0][0] for t in targets]


def histogram(predictions: Sequence[str]) -> list[tuple[str, int]]:
    """(prediction, count), most frequent first (ties in order of first appearance)."""
    return Counter(predictions).most_common()


def few_answers_warning(hist: Sequence[tuple[str, int]], gold_distinct: int, limit: int = FEW_DISTINCT
                        ) -> str | None:
    """A warning when the model predicts at most `limit` distinct answers although the gold labels have more
    (`gold_distinct`); else None."""
    distinct = len(hist)
    if distinct > limit or distinct >= gold_distinct:
        return None
    total = sum(n for _, n in hist)
    shown = ", ".join(f"{a!r} {100 * n / total:.0f} %" for a, n in hist)
    return (f"the model predicts only {distinct} distinct answer{'s' if distinct > 1 else ''} over the {total} "
            f"validation examples ({shown}) although their labels have {gold_distinct}: compare its score with "
            f"the majority baseline")


def majority_prediction(task: FinetuneTask, train_targets: Sequence) -> str | None:
    """The most frequent best answer / label of the training targets that the head can predict (ties: first
    seen); None when none can be."""
    names = set(task.class_names)
    counts: Counter = Counter()
    for target in train_targets:
        answers = task.target_answers(target) if target is not None else []
        if answers and answers[0][0] in names:
            counts[answers[0][0]] += 1
    return counts.most_common(1)[0][0] if counts else None


def per_label_scores(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, dict[str, float]]:
    """label -> precision, recall, F1 (percent, 2 decimals; 0 where undefined), support (gold count) and
    predicted (count), over the labels in the gold or predicted set, sorted by label (as `macro_f1` averages)."""
    tp: dict[str, int] = defaultdict(int)
    gold_n, pred_n = Counter(gold), Counter(predicted)
    for g, p in zip(gold, predicted, strict=True):
        if g == p:
            tp[g] += 1
    out = {}
    for label in sorted(set(gold_n) | set(pred_n)):
        precision = tp[label] / pred_n[label] if pred_n[label] else 0.0
        recall = tp[label] / gold_n[label] if gold_n[label] else 0.0
        f1 = 2 * tp[label] / (gold_n[label] + pred_n[label])  # > 0: the label is in one of the sets
        out[label] = {"precision": round(100 * precision, 2), "recall": round(100 * recall, 2),
                      "f1": round(100 * f1, 2), "support": gold_n[label], "predicted": pred_n[label]}
    return out


def confusion_matrix(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """Counts [gold label row][predicted label column] in the order of `labels`; pairs outside `labels` are not
    counted."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        if g in index and p in index:
            matrix[index[g]][index[p]] += 1
    return matrix


def per_group_scores(task: FinetuneTask, ids: Sequence, targets: Sequence, predictions: Mapping,
                     groups: Sequence) -> dict[str, dict[str, Any]]:
    """group -> the task's scores on the examples of that group, and their count; examples without a group
    (None) are left out; {} when no example has one."""
    members: dict[str, list[int]] = defaultdict(list)
    for k, g in enumerate(groups):
        if g is not None:
            members[str(g)].append(k)
    return {g: {**task.score([ids[k] for k in ks], [targets[k] for k in ks], predictions), "count": len(ks)}
            for g, ks in sorted(members.items())}


def validation_report(task: FinetuneTask, ids: Sequence, targets: Sequence, predictions: Mapping,
                      train_targets: Sequence, info: Mapping[str, Sequence] | None = None) -> dict[str, Any]:
    """The report of one model's predictions (id -> prediction string) on a labelled split (`ids`, kept labels
    `targets`, display columns `info`), with the majority baseline from the training labels `train_targets`.

    Keys: examples, scores, predicted ({distinct, top: [[answer, count], ...]}), majority_baseline ({prediction,
    scores}), warnings (list of lines); answer tasks with an answer_type column: per_answer_type; single-label
    tasks: per_label, confusion ({labels, matrix}: rows gold, columns predicted; up to MAX_MATRIX_LABELS labels).
    """
    preds = [predictions[i] for i in ids]
    hist = histogram(preds)
    gold = gold_labels(task, targets)
    gold_distinct = len(set(gold)) if gold is not None else len({task.target_answers(t)[0][0] for t in targets
                                                                   if task.target_answers(t)})
    out: dict[str, Any] = {"examples": len(ids), "scores": task.score(ids, targets, predictions),
                           "predicted": {"distinct": len(hist), "top": [[a, n] for a, n in hist[:TOP_ANSWERS]]},
                           "warnings": []}
    majority = majority_prediction(task, train_targets)
    if majority is not None:
        out["majority_baseline"] = {"prediction": majority,
                                    "scores": task.score(ids, targets, {i: majority for i in ids})}
    warning = few_answers_warning(hist, gold_distinct)
    if warning:
        out["warnings"].append(warning)
    unseen = task.unseen_labels(targets)
    if unseen:
        out["warnings"].append(unseen_labels_warning(unseen, len(ids), phrase=task.unseen_phrase))
    types = (info or {}).get("answer_type")
    if gold is None and types is not None and any(t is not None for t in types):
        out["per_answer_type"] = per_group_scores(task, ids, targets, predictions, types)
    if gold is not None:
        out["per_label"] = per_label_scores(gold, preds)
        labels = list(out["per_label"])
        if len(labels) <= MAX_MATRIX_LABELS:
            out["confusion"] = {"labels": labels, "matrix": confusion_matrix(gold, preds, labels)}
    return out


def unseen_labels_warning(unseen: Mapping[str, int], total: int, split: str = "validation",
                          phrase: str = "a label that no training example has") -> str:
    """The line saying which labels of a split the head has no class for (its examples are always scored wrong);
    `phrase` is the task's `unseen_phrase`."""
    n = sum(unseen.values())
    shown = ", ".join(f"{label!r} ({count})" for label, count in Counter(unseen).most_common(5))
    return (f"{n} of {total} {split} examples have {phrase} ({shown}"
            f"{', ...' if len(unseen) > 5 else ''}): they count as wrong whatever the model predicts")


def epoch_seconds(log_path: str | Path) -> dict[int, float]:
    """epoch -> wall seconds of its training and validation, from the validation records of a run's log.jsonl (a
    resumed run keeps the records of its earlier epochs); unreadable lines are skipped."""
    out: dict[int, float] = {}
    path = Path(log_path)
    if not path.exists():
        return out
    for _, rec in read_json_lines(path, objects=True, on_bad=lambda bad: None):
        if "valid" in rec and isinstance(rec.get("epoch_seconds"), (int, float)):
            out[int(rec["epoch"])] = float(rec["epoch_seconds"])
    return out


def report_lines(report: Mapping[str, Any], metric: str) -> list[str]:
    """A few readable lines of a `validation_report` (`metric`: the score compared with the baseline)."""
    lines = []
    score = report["scores"].get(metric)
    base = report.get("majority_baseline")
    line = f"{metric} {score} on {report['examples']} validation examples"
    if base:
        line += f"; majority baseline {base['scores'].get(metric)} (always {base['prediction']!r})"
    lines.append(line)
    top = report["predicted"]["top"]
    lines.append(f"predicted answers: {report['predicted']['distinct']} distinct; most often "
                 + ", ".join(f"{a!r} {n}" for a, n in top[:5]))
    if "per_answer_type" in report:
        lines.append("per answer type: " + ", ".join(f"{t} {s.get(metric)} ({s['count']})"
                                                      for t, s in report["per_answer_type"].items()))
    if "per_label" in report:
        lines.append("per label (precision / recall / F1, support): " + "; ".join(
            f"{label!r} {s['precision']} / {s['recall']} / {s['f1']}, {s['support']}"
            for label, s in list(report["per_label"].items())[:10])
            + ("; ..." if len(report["per_label"]) > 10 else ""))
    confusion = report.get("confusion")
    if confusion and len(confusion["labels"]) <= 6:
        width = max(len(str(v)) for row in confusion["matrix"] for v in row)
        lines.append("confusion (rows gold, columns predicted): " + " | ".join(
            f"{g}: " + " ".join(str(v).rjust(width) for v in row)
            for g, row in zip(confusion["labels"], confusion["matrix"])))
    lines.extend(f"warning: {w}" for w in report["warnings"])
    return lines
