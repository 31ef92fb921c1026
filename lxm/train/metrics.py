"""The official VQA, GQA and NLVR2 metrics as pure functions (no model needed).

- VQA: GT-Vision-Lab/VQA `vqaEval.py` after commit a013f00 (datasets.md §4): answers and prediction have "\\n"/"\\t"
  replaced and are stripped; ONLY if the 10 ground-truth answers are not all identical are they and the prediction
  normalised (punctuation, digits/articles, contractions); per question the mean over the 10 leave-one-out subsets
  of min(#matches / 3, 1); overall, per answer type and per question type, x100 rounded to 2 decimals.
- GQA: the GQA authors' `eval.py` accuracy: exact string match over `isBalanced` questions; open = structural type
  "query", binary = the rest.
- NLVR2: lil-lab/nlvr `nlvr2/eval/metrics.py`: accuracy (case-insensitive label match) and consistency (a group =
  identifier with the pair id blanked, `split-set--sentence`; consistent iff all its examples are right).
Every evaluator requires predictions for exactly the evaluated ids; gaps are errors with counts and examples.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from lxm.corpus.answers import process_digit_article, process_punctuation


class PredictionError(ValueError):
    """Predictions do not cover the evaluated questions (or cover unknown ones)."""


def _check_ids(expected: Iterable, got: Iterable, what: str) -> None:
    expected, got = set(expected), set(got)
    missing, unknown = sorted(expected - got, key=str), sorted(got - expected, key=str)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {what} without a prediction (e.g. {', '.join(map(str, missing[:3]))})")
        if unknown:
            parts.append(f"{len(unknown)} predictions for unknown {what} (e.g. {', '.join(map(str, unknown[:3]))})")
        raise PredictionError("; ".join(parts))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_question_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """One question: mean over the 10 leave-one-out subsets of min(matches / 3, 1)."""
    pred = _clean(prediction)
    gts = [_clean(a) for a in gt_answers]
    if len(set(gts)) > 1:  # the official evaluator normalises only when the annotators disagree
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(annotations: list[Mapping], predictions: Mapping[int, str]) -> dict:
    """annotations: VQA v2 annotation records; predictions: question_id -> answer. Percentages, 2 decimals."""
    _check_ids((a["question_id"] for a in annotations), predictions, "questions")
    overall: list[float] = []
    by_answer: dict[str, list[float]] = defaultdict(list)
    by_question: dict[str, list[float]] = defaultdict(list)
    for ann in annotations:
        acc = vqa_question_accuracy(predictions[ann["question_id"]], [a["answer"] for a in ann["answers"]])
        overall.append(acc)
        by_answer[ann["answer_type"]].append(acc)
        by_question[ann["question_type"]].append(acc)

    def pct(xs: list[float]) -> float:
        return round(100 * sum(xs) / len(xs), 2)

    return {"overall": pct(overall), "perAnswerType": {k: pct(v) for k, v in by_answer.items()},
            "perQuestionType": {k: pct(v) for k, v in by_question.items()}}


def gqa_accuracy(questions: Mapping[str, Mapping], predictions: Mapping[str, str]) -> dict:
    """questions: qid -> GQA record; predictions: qid -> answer. Balanced questions only, exact match."""
    balanced = {qid: q for qid, q in questions.items() if q.get("isBalanced")}
    _check_ids(balanced, [qid for qid in predictions if qid in balanced], "balanced questions")
    unknown = [qid for qid in predictions if qid not in questions]
    if unknown:
        raise PredictionError(f"{len(unknown)} predictions for unknown questions (e.g. {', '.join(unknown[:3])})")
    scores: dict[str, list[float]] = {"all": [], "binary": [], "open": []}
    for qid, q in balanced.items():
        ok = float(predictions[qid] == q["answer"])
        scores["all"].append(ok)
        scores["open" if q.get("types", {}).get("structural") == "query" else "binary"].append(ok)

    def pct(xs: list[float]) -> float:
        return round(100 * sum(xs) / len(xs), 2) if xs else 0.0

    return {"accuracy": pct(scores["all"]), "binary": pct(scores["binary"]), "open": pct(scores["open"])}


def nlvr2_metrics(labels: Mapping[str, str], predictions: Mapping[str, str]) -> dict:
    """labels / predictions: identifier -> "True"/"False" (case-insensitive). Accuracy and consistency in %."""
    _check_ids(labels, predictions, "examples")
    groups: dict[str, list[bool]] = defaultdict(list)
    correct = 0
    for ident, label in labels.items():
        ok = predictions[ident].strip().lower() == label.strip().lower()
        correct += ok
        parts = ident.split("-")
        parts[2] = ""  # same image set and sentence, any image pair
        groups["-".join(parts)].append(ok)
    return {"accuracy": round(100 * correct / len(labels), 2),
            "consistency": round(100 * sum(all(g) for g in groups.values()) / len(groups), 2)}
