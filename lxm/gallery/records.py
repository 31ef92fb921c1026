"""The gallery's data: one typed record per example of a split, and the split's summary table.

Everything here goes through the task interface (`lxm.train.tasks.FinetuneTask`): the ground truth is
`task.target_answers(target)`, an example is scored by the task's own `score` on that example alone (its first
metric: VQA the soft accuracy 0/30/60/90/100, GQA and NLVR2 0 or 100), and the summary is `task.score` over the whole
split and over each type value. A task added later is shown without a change here. Plain Python (no torch): the
predictions come in as `predict_top`'s id -> top-k lists.

Every score is a percent. An example is *right* with score 100 (full credit), *partly right* with 0 < score < 100
(a VQA answer only some annotators gave), *wrong* with score 0; the accuracy is the mean score over the split, so
the three counts and the accuracy agree (all right = 100, all wrong = 0; NLVR2, GQA and classify have no partial
credit and their accuracy is right / examples). Where every example has one label (classify, NLVR2, a small answer
set), the summary also holds each label's precision and recall. A record also holds what the model looked at: per
image its boxes' attention weights (the boxes the page draws).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lxm.errors import ConfigError, LxmError

NO_VALUE = "(none)"  # a type field without a value (a table cell that is null)

# what the page calls a type field; another field is named after its column
FIELD_LABELS = {"answer_type": "answer type", "question_type": "question type", "structural": "structural type"}


class GalleryError(LxmError, ValueError):
    """The gallery cannot be made from these inputs; the message names the file, split or option."""


@dataclass
class GalleryRecord:
    """One example as the page shows it."""

    id: int | str  # the task's example id (VQA question_id, GQA questionId, NLVR2 identifier)
    text: str  # the question or statement
    images: tuple[str, ...]  # img_ids, in the task's image column order (NLVR2: img0, img1)
    truth: list[tuple[str, float]]  # ground truth (prediction string, score), best first: task.target_answers
    top: list[tuple[str, float]]  # the k most probable predictions (string, probability), best first
    score: float  # the task's first metric on this example alone, percent (VQA soft accuracy x 100)
    types: dict[str, str] = field(default_factory=dict)  # type field -> value (answer_type, structural, ...)
    # per image (the order of `images`) the [N] float32 weights of its N boxes, summing to 1: relevance shares or the
    # last cross layer's [CLS] -> boxes attention (lxm.infer.explain.explain_batch); the boxes the page draws
    attention: list[np.ndarray] = field(default_factory=list)
    # relevance: the words of `text` with their shares of the relevance for the prediction (the page highlights them;
    # lxm.infer.explain.word_shares); empty: plain text
    words: list[tuple[str, float]] = field(default_factory=list)

    @property
    def prediction(self) -> str:
        return self.top[0][0]

    @property
    def confidence(self) -> float:
        """The model's probability of its prediction (softmax, or sigmoid for the VQA-style answer heads)."""
        return self.top[0][1]

    @property
    def bucket(self) -> str:
        """The verdict: "right" (score 100), "partial" (0 < score < 100) or "wrong" (score 0)."""
        return bucket(self.score)

    @property
    def wrong(self) -> bool:
        return self.score <= 0


@dataclass
class TypeRow:
    value: str
    count: int  # examples of the split with this value
    score: float  # the task's first metric over them


@dataclass
class LabelRow:
    """One label of a single-label task: how often it is the truth and the prediction, and how often both."""

    label: str
    support: int  # examples whose truth is this label
    predicted: int  # examples predicted as this label
    correct: int  # both

    @property
    def precision(self) -> float | None:  # percent; None when never predicted
        return 100 * self.correct / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:  # percent; None when never the truth
        return 100 * self.correct / self.support if self.support else None


@dataclass
class Summary:
    """The split's scores, over all its examples (not only those shown)."""

    task: str
    split: str
    examples: int
    right: int  # examples with score 100
    partial: int  # examples with 0 < score < 100
    wrong: int  # examples with score 0
    partial_credit: bool  # whether the labels give partial credit (a truth scored between 0 and 1: VQA)
    metric: str  # the task's first metric: what `score` and the type rows hold
    metrics: dict[str, float]  # task.score over the split (keys: the task's metric_names), percent
    by_type: dict[str, list[TypeRow]] = field(default_factory=dict)  # field -> rows, most frequent value first
    by_label: list[LabelRow] = field(default_factory=list)  # single-label tasks: per label, most frequent first
    notes: list[str] = field(default_factory=list)  # said on the page (e.g. why a per-type table is missing)


BUCKETS = {"right": "right", "partial": "partly right", "wrong": "wrong"}  # bucket -> what the page calls it
LABEL_TABLE_MAX = 50  # per-label precision / recall only for tasks with at most this many labels in play


def bucket(score: float) -> str:
    """A per-example score (percent) -> "right" (100), "partial" (between) or "wrong" (0)."""
    return "right" if score >= 100 else "partial" if score > 0 else "wrong"


def field_label(name: str) -> str:
    return FIELD_LABELS.get(name, name.replace("_", " "))


def example_types(task: Any, info: Mapping[str, Sequence], n: int,
                  structural: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Type field -> value per example: the task's `info_columns` (VQA answer_type, question_type) from the
    dataset's `info`, then GQA's structural type when given."""
    out = {c: [NO_VALUE if v is None else str(v) for v in info.get(c, [None] * n)] for c in task.info_columns}
    if structural is not None:
        out["structural"] = list(structural)
    return out


def read_structural_types(path: str | os.PathLike, ids: Sequence) -> list[str]:
    """`types.structural` of each question `ids` from a GQA questions JSON ({questionId: {..., "types":
    {"structural": "query", ...}}}, e.g. testdev_balanced_questions.json)."""
    from lxm.eval.formats import read_json

    data = read_json(path, "questions")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a GQA questions object {{questionId: question}}")
    missing = [i for i in ids if str(i) not in data]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} of the split's {len(ids)} questions are not in this file (first: "
                          f"{missing[0]!r}); pass the questions file of the same split")
    out = []
    for i in ids:
        q = data[str(i)]
        kind = q.get("types", {}).get("structural") if isinstance(q, Mapping) else None
        if not isinstance(kind, str):
            raise ConfigError(f"{path}: question {i!r}: no string field 'types.structural'")
        out.append(kind)
    return out


def build_records(task: Any, ids: Sequence, texts: Sequence[str], images: Sequence[tuple[str, ...]],
                  targets: Sequence, top: Mapping, types: Mapping[str, Sequence[str]],
                  attention: Mapping | None = None, words: Mapping | None = None) -> list[GalleryRecord]:
    """One record per example, in the given (dataset) order; `top` is id -> [(prediction, probability)] of
    `lxm.infer.runs.predict_top`, `types` field -> value per example, `attention` id -> per image [N] weights
    (`lxm.infer.explain.predict_explained`; None: the records hold none), `words` id -> [(word, share)] (missing:
    none)."""
    if any(t is None for t in targets):
        raise GalleryError(f"{task.name}: {sum(t is None for t in targets)} of {len(targets)} examples have no label "
                           f"(a test split?); the gallery shows right and wrong, it needs a labelled split")
    metric = task.metric_names[0]
    out = []
    for n, (i, text, imgs, target) in enumerate(zip(ids, texts, images, targets)):
        best = top[i]
        score = float(task.score([i], [target], {i: best[0][0]})[metric])
        out.append(GalleryRecord(id=i, text=text, images=tuple(imgs), truth=list(task.target_answers(target)),
                                 top=[(str(p), float(q)) for p, q in best], score=score,
                                 types={f: values[n] for f, values in types.items()},
                                 attention=list(attention[i]) if attention is not None else [],
                                 words=list((words or {}).get(i, []))))
    return out


def summarize(task: Any, split: str, records: Sequence[GalleryRecord], targets: Sequence,
              notes: Sequence[str] = ()) -> Summary:
    """The task's scores over all `records` (with their `targets`, the dataset's labels) and per type value."""
    ids = [r.id for r in records]
    predictions = {r.id: r.prediction for r in records}
    metric = task.metric_names[0]
    by_type: dict[str, list[TypeRow]] = {}
    fields = list(records[0].types) if records else []
    for name in fields:
        counts = Counter(r.types[name] for r in records)
        rows = []
        for value, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            sub = [(r.id, t) for r, t in zip(records, targets) if r.types[name] == value]
            score = task.score([i for i, _ in sub], [t for _, t in sub], predictions)[metric]
            rows.append(TypeRow(value, count, float(score)))
        by_type[name] = rows
    metrics = task.score(ids, list(targets), predictions)
    counts = Counter(r.bucket for r in records)
    return Summary(task=task.name, split=split, examples=len(records), right=counts["right"],
                   partial=counts["partial"], wrong=counts["wrong"],
                   partial_credit=any(0 < s < 1 for r in records for _, s in r.truth), metric=metric,
                   metrics={k: float(metrics[k]) for k in task.metric_names}, by_type=by_type,
                   by_label=label_rows(records), notes=list(notes))


def label_rows(records: Sequence[GalleryRecord]) -> list[LabelRow]:
    """Precision and recall per label where every example has exactly one true label (classify, NLVR2, GQA) and
    at most LABEL_TABLE_MAX labels occur as truth or prediction; else [] (VQA's soft labels have no single truth)."""
    if not records or any(len(r.truth) != 1 or r.truth[0][1] != 1.0 for r in records):
        return []
    truth = Counter(r.truth[0][0] for r in records)
    predicted = Counter(r.prediction for r in records)
    correct = Counter(r.prediction for r in records if r.prediction == r.truth[0][0])
    labels = set(truth) | set(predicted)
    if len(labels) > LABEL_TABLE_MAX:
        return []
    order = sorted(labels, key=lambda a: (-truth[a], -predicted[a], a))
    return [LabelRow(a, truth[a], predicted[a], correct[a]) for a in order]


def select(records: Sequence[GalleryRecord], *, only_wrong: bool = False, limit: int | None = None
           ) -> list[GalleryRecord]:
    """The records the page shows: the first `limit` (None: all) in dataset order, after keeping only the wrong
    ones (score 0) if asked."""
    kept = [r for r in records if not (only_wrong and not r.wrong)]
    return kept if limit is None else kept[:limit]
