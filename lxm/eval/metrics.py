"""The official VQA, GQA and NLVR2 metrics as pure functions over parsed inputs (no model, no torch).

The official files are read by `lxm.eval.formats`; `lxm.eval.evaluate_vqa` / `evaluate_gqa` / `evaluate_nlvr2` do
both from file paths.

- VQA: GT-Vision-Lab/VQA `vqaEval.py` after commit a013f00 (datasets.md §4): answers and prediction have "\\n"/"\\t"
  replaced and are stripped; ONLY if the 10 ground-truth answers are not all identical are they and the prediction
  normalised (punctuation, digits/articles, contractions); per question the mean over the 10 leave-one-out subsets
  of min(#matches / 3, 1); overall, per answer type and per question type, x100 rounded to 2 decimals. Every
  evaluated question needs a prediction and every prediction an evaluated question.
- GQA: the GQA authors' `eval.py` (vendored in junayednaushad/Relation-Network-VQA `gqa/eval.py`, commit 613d4a2;
  datasets.md §6), every number of its `scores` with its definitions and units: percent, unrounded. Over the
  `isBalanced` questions, in file order: accuracy (exact string match, no normalisation), binary / open
  (`types.structural` "query" is open), accuracy per structural type, semantic type, number of steps (operations of
  `semantic` whose "operation: argument" contains none of "exist", "query: name", "choose name") and question length
  (`len(question.split())`), each as (accuracy, number of questions); consistency: for each correctly answered
  balanced question, the accuracy over its `entailed` questions other than itself, averaged over such questions;
  validity / plausibility: prediction in `choices[qid]["valid"]` / `["plausible"]` (or in color/material/shape when
  `types.detailed` contains "Common"); distribution: per `groups.global` group the chi-square sum over the group's gold
  answers of (predicted count - gold count)^2 / gold count, averaged with the group sizes as weights, divided by 100.
- Custom QA (`lxm finetune qa`, not an official benchmark): per question, with a list of annotator answers the
  official VQA accuracy above; with a dict {answer: score} the given score of the predicted answer (exact string, 0
  when absent); the mean x100 rounded to 2 decimals, also per answer_type when the annotations have one.
- Custom classification (`lxm finetune classify`): accuracy (exact label match) and macro-F1 (per label
  2TP / (2TP + FP + FN) averaged over the union of gold and predicted labels, so a label never predicted right has
  F1 0: sklearn's `f1_score(average="macro")`), x100 rounded to 2 decimals.
- NLVR2: lil-lab/nlvr `nlvr2/eval/metrics.py` (commit 70d13f6; datasets.md §7): the examples scored are those of the
  annotation file (so full dev predictions score a `balanced_dev.json` subset); accuracy (case-insensitive label
  match) and consistency (a group = identifier with the pair id blanked, `split-set--sentence`; consistent iff all
  its examples are right), in percent rounded to 2 decimals.

Deliberate differences from the official scripts, all where those crash, stop or silently guess (the differences in
reading the files are listed in `lxm.eval.formats`):
- Custom QA / classification, as NLVR2: missing predictions are an error naming how many and a few ids; predictions
  for ids outside the annotations are counted in `ignored_predictions`. Ids are compared as strings (a CSV has no
  types).
- NLVR2: missing predictions are an error naming how many and a few ids (metrics.py lists them and exits with status
  0, or, when extra predictions make up the count, crashes with KeyError); predictions for identifiers outside the
  annotation file are counted in `ignored_predictions`; values are percent rounded to 2 decimals (metrics.py prints
  fractions).
- GQA: entailed ids absent from the questions file are skipped and counted in `entailed_absent` (eval.py raises
  KeyError; with `testdev_balanced_questions.json` many entailed questions are unbalanced ones not in the file);
  entailed questions that are in the file need a prediction, as eval.py asks of every question with `--consistency`;
  an unbalanced question that no balanced one entails needs none (eval.py's main loop crashes without it);
  predictions for ids outside the file are counted in `ignored_predictions`; validity and plausibility are left out
  without a choices file (eval.py requires one); distribution is None when no balanced question has a global group
  (eval.py divides by zero); no balanced question at all is an error (eval.py reports zeros); grounding (attention
  maps) and chunked question directories are not supported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from lxm.corpus.answers import process_digit_article, process_punctuation
from lxm.errors import LxmError


class MetricsInputError(LxmError, ValueError):
    """An evaluation input cannot be used. `source` names the input ("predictions", "questions", "choices",
    "annotations") so that a caller can put its file name in front of the one-line message; `path` is that file
    once the message names it (set by `lxm.eval.formats.read_json` and the `evaluate_*` functions)."""

    def __init__(self, source: str, message: str, path: str | None = None):
        super().__init__(message)
        self.source = source
        self.path = path


class PredictionError(MetricsInputError):
    """Predictions do not cover the evaluated questions (or cover unknown ones), or are malformed."""

    def __init__(self, message: str):
        super().__init__("predictions", message)


def _examples(ids: Iterable) -> str:
    return ", ".join(map(str, sorted(ids, key=str)[:3]))


def _check_ids(expected: Iterable, got: Iterable, what: str) -> None:
    expected, got = set(expected), set(got)
    missing, unknown = sorted(expected - got, key=str), sorted(got - expected, key=str)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {what} without a prediction (e.g. {_examples(missing)})")
        if unknown:
            parts.append(f"{len(unknown)} predictions for unknown {what} (e.g. {_examples(unknown)})")
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


# ---------------------------------------------------------------------------------------------------- GQA

# eval.py getStepsNum: these substrings mark the final "querying" operation, which adds no reasoning step
_NO_STEP = ("exist", "query: name", "choose name")
_COMMON_GROUP = ("color", "material", "shape")  # eval.py belongs(): what "what is common" questions may answer


def _field(record: object, qid: str, source: str, *path: str):
    value = record
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            raise MetricsInputError(source, f"question {qid}: no field {'.'.join(path)!r}")
        value = value[key]
    return value


def _avg(xs: list[float]) -> float:
    return float(sum(xs)) / len(xs) if xs else 0.0  # eval.py's avg(): 0 for an empty list


def _chi_square(gold: Mapping[str, Mapping[str, int]], predicted: Mapping[str, Mapping[str, int]]) -> float | None:
    # eval.py chiSquare(): only the gold answers of a group enter its sum; a predicted answer that is never gold in
    # that group costs nothing. Same loop order as eval.py, so the float comes out bit for bit equal.
    sum_score, sum_overall = 0.0, 0
    for group, answers in gold.items():
        score, overall = 0.0, 0
        for ans, e in answers.items():
            o = predicted[group].get(ans, 0)
            score += float(o - e) ** 2 / e
            overall += e
        sum_score += score * overall
        sum_overall += overall
    return float(sum_score) / sum_overall if sum_overall else None


def _by_key(groups: Mapping) -> dict:
    # (accuracy %, number of questions) as eval.py's detailed metrics; numeric keys (steps, words) sorted as numbers
    return {k: (_avg(v) * 100, len(v)) for k, v in sorted(groups.items(), key=lambda kv: (type(kv[0]).__name__, kv[0]))}


def gqa_metrics(questions: Mapping[str, Mapping], predictions: Mapping[str, str],
                choices: Mapping[str, Mapping] | None = None) -> dict:
    """Every number of GQA's `eval.py` (see the module docstring for definitions and differences).

    Args:
        questions: questionId -> GQA question record (a `*_questions.json` file): balanced questions need `answer`,
            `types.structural`, `types.semantic`, `groups.global`, `semantic`, `question`, `entailed` (and
            `types.detailed` with choices); entailed questions need `answer`.
        predictions: questionId -> predicted answer (see `gqa_predictions`).
        choices: questionId -> {"valid": [...], "plausible": [...]} (a `*_choices.json` file), or None.

    Returns:
        {"accuracy", "binary", "open", "consistency", ["validity", "plausibility",] "distribution",
        "accuracyPerStructuralType", "accuracyPerSemanticType", "accuracyPerSteps", "accuracyPerLength",
        "ignored_predictions", "entailed_absent"}: percentages unrounded, distribution = chi-square / 100 (lower is
        better), per-type values (accuracy %, number of questions), and the counts of predictions for ids outside
        `questions` and of distinct entailed ids absent from `questions`.
    """
    if not isinstance(questions, Mapping):
        raise MetricsInputError("questions", "expected a JSON object questionId -> question")
    if choices is not None and not isinstance(choices, Mapping):
        raise MetricsInputError("choices", "expected a JSON object questionId -> {valid, plausible}")
    balanced = [(qid, q) for qid, q in questions.items() if _field(q, qid, "questions", "isBalanced")]
    if not balanced:
        raise MetricsInputError("questions", f"none of the {len(questions)} questions is balanced (isBalanced)")
    missing = [qid for qid, _ in balanced if qid not in predictions]
    absent, unpredicted = set(), set()
    for qid, q in balanced:
        for eid in _field(q, qid, "questions", "entailed"):
            if eid == qid:
                continue
            if eid not in questions:
                absent.add(eid)
            elif eid not in predictions:
                unpredicted.add(eid)
    if missing or unpredicted:
        parts = []
        if missing:
            parts.append(f"{len(missing)} balanced questions without a prediction (e.g. {_examples(missing)})")
        if unpredicted:
            parts.append(f"{len(unpredicted)} entailed questions without a prediction (e.g. {_examples(unpredicted)}"
                         "; consistency needs them)")
        raise PredictionError("; ".join(parts))
    if choices is not None:
        no_choice = [qid for qid, _ in balanced if qid not in choices]
        if no_choice:
            raise MetricsInputError("choices", f"{len(no_choice)} balanced questions have no entry "
                                               f"(e.g. {_examples(no_choice)})")

    scores: dict[str, list[float]] = {k: [] for k in ("accuracy", "binary", "open", "consistency", "validity",
                                                       "plausibility")}
    per: dict[str, dict] = {k: defaultdict(list) for k in ("accuracyPerStructuralType", "accuracyPerSemanticType",
                                                            "accuracyPerSteps", "accuracyPerLength")}
    gold_dist: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    pred_dist: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for qid, q in balanced:
        gold, predicted = _field(q, qid, "questions", "answer"), predictions[qid]
        correct = predicted == gold
        score = float(correct)
        structural = _field(q, qid, "questions", "types", "structural")
        steps = 0
        for op in _field(q, qid, "questions", "semantic"):
            text = f"{_field(op, qid, 'questions', 'operation')}: {_field(op, qid, 'questions', 'argument')}"
            steps += not any(marker in text for marker in _NO_STEP)
        scores["accuracy"].append(score)
        per["accuracyPerLength"][len(_field(q, qid, "questions", "question").split())].append(score)
        per["accuracyPerSteps"][steps].append(score)
        per["accuracyPerStructuralType"][structural].append(score)
        per["accuracyPerSemanticType"][_field(q, qid, "questions", "types", "semantic")].append(score)
        scores["open" if structural == "query" else "binary"].append(score)
        if choices is not None:
            common = "Common" in _field(q, qid, "questions", "types", "detailed")
            for key, name in (("valid", "validity"), ("plausible", "plausibility")):
                group = _COMMON_GROUP if common else _field(choices[qid], qid, "choices", key)
                scores[name].append(float(predicted in group))
        global_group = _field(q, qid, "questions", "groups", "global")
        if global_group is not None:
            gold_dist[global_group][gold] += 1
            pred_dist[global_group][predicted] += 1
        inferred = [eid for eid in q["entailed"] if eid != qid and eid in questions]
        if correct and inferred:
            scores["consistency"].append(_avg([float(predictions[eid] == _field(questions[eid], eid, "questions",
                                                                                 "answer")) for eid in inferred]))

    chi = _chi_square(gold_dist, pred_dist)
    result: dict = {k: _avg(scores[k]) * 100 for k in ("accuracy", "binary", "open", "consistency")}
    if choices is not None:
        result.update({k: _avg(scores[k]) * 100 for k in ("validity", "plausibility")})
    result["distribution"] = chi / 100 if chi is not None else None
    result.update({k: _by_key(v) for k, v in per.items()})
    result["ignored_predictions"] = sum(1 for qid in predictions if qid not in questions)
    result["entailed_absent"] = len(absent)
    return result


# ---------------------------------------------------------------------------------------------------- NLVR2


def nlvr2_metrics(labels: Mapping[str, str], predictions: Mapping[str, str]) -> dict:
    """labels / predictions: identifier -> "True"/"False" (case-insensitive, spaces around ignored).

    Scores the examples of `labels`; predictions for other identifiers are counted in `ignored_predictions`.
    Returns {"accuracy", "consistency" (both % rounded to 2 decimals), "ignored_predictions"}."""
    if not labels:
        raise MetricsInputError("annotations", "no examples")
    missing = [ident for ident in labels if ident not in predictions]
    if missing:
        raise PredictionError(f"{len(missing)} annotated examples without a prediction (e.g. {_examples(missing)})")
    groups: dict[str, list[bool]] = defaultdict(list)
    correct = 0
    for ident, label in labels.items():
        ok = predictions[ident].strip().lower() == label.strip().lower()
        correct += ok
        parts = ident.split("-")
        if len(parts) < 3:
            raise MetricsInputError("annotations", f"identifier {ident!r}: expected split-set-pair-sentence")
        parts[2] = ""  # same image set and sentence, any image pair
        groups["-".join(parts)].append(ok)
    return {"accuracy": round(100 * correct / len(labels), 2),
            "consistency": round(100 * sum(all(g) for g in groups.values()) / len(groups), 2),
            "ignored_predictions": sum(1 for ident in predictions if ident not in labels)}


# ---------------------------------------------------------------------------------------------------- custom tasks


def qa_question_score(prediction: str, answers: list[str] | Mapping[str, float]) -> float:
    """One question of a custom QA file: annotator answers (a list) -> the official VQA accuracy; {answer: score}
    -> the given score of `prediction` (0 when it is not a key). In [0, 1]."""
    if isinstance(answers, Mapping):
        return float(answers.get(prediction, 0.0))
    return vqa_question_accuracy(prediction, list(answers))


def _require_predictions(expected: Iterable[str], predictions: Mapping[str, str], what: str) -> None:
    missing = [i for i in expected if i not in predictions]
    if missing:
        raise PredictionError(f"{len(missing)} annotated {what} without a prediction (e.g. {_examples(missing)})")


def qa_metrics(annotations: Mapping[str, list[str] | Mapping[str, float]], predictions: Mapping[str, str],
               answer_types: Mapping[str, str] | None = None) -> dict:
    """annotations: question id (str) -> annotator answers or {answer: score}; predictions: question id (str) ->
    answer; answer_types: question id -> answer type (those given get a per-type accuracy).

    Returns {"accuracy", ["perAnswerType",] "ignored_predictions"}: percent, 2 decimals."""
    if not annotations:
        raise MetricsInputError("annotations", "no questions")
    _require_predictions(annotations, predictions, "questions")
    scores = {qid: qa_question_score(predictions[qid], answers) for qid, answers in annotations.items()}
    out: dict = {"accuracy": round(100 * sum(scores.values()) / len(scores), 2)}
    by_type: dict[str, list[float]] = defaultdict(list)
    for qid, kind in (answer_types or {}).items():
        if qid in scores and kind is not None:
            by_type[kind].append(scores[qid])
    if by_type:
        out["perAnswerType"] = {k: round(100 * sum(v) / len(v), 2) for k, v in by_type.items()}
    out["ignored_predictions"] = sum(1 for qid in predictions if qid not in annotations)
    return out


def macro_f1(gold: list[str], predicted: list[str]) -> float:
    """Macro-averaged F1 in [0, 1] over the union of the gold and predicted labels; a label with no true positive
    has F1 0 (sklearn's f1_score(average="macro"), whose zero_division case cannot occur over that union)."""
    tp: dict[str, int] = defaultdict(int)
    fp: dict[str, int] = defaultdict(int)
    fn: dict[str, int] = defaultdict(int)
    for g, p in zip(gold, predicted, strict=True):
        if g == p:
            tp[g] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    labels = set(gold) | set(predicted)
    return sum(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in labels) / len(labels)


def classify_metrics(labels: Mapping[str, str], predictions: Mapping[str, str]) -> dict:
    """labels / predictions: example id (str) -> label (exact strings).

    Scores the examples of `labels`; predictions for other ids are counted in `ignored_predictions`.
    Returns {"accuracy", "macro_f1" (percent, 2 decimals), "ignored_predictions"}."""
    if not labels:
        raise MetricsInputError("annotations", "no examples")
    _require_predictions(labels, predictions, "examples")
    gold = list(labels.values())
    predicted = [predictions[i] for i in labels]
    correct = sum(g == p for g, p in zip(gold, predicted))
    return {"accuracy": round(100 * correct / len(gold), 2), "macro_f1": round(100 * macro_f1(gold, predicted), 2),
            "ignored_predictions": sum(1 for i in predictions if i not in labels)}
