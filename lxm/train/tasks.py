"""Finetuning tasks as objects: one class per task owns what differs between VQA, GQA and NLVR2.

Reproduces airsplay/lxmert `src/tasks/{vqa,gqa,nlvr2}_model.py` (the heads), `src/tasks/{vqa,gqa,nlvr2}.py` (loss,
argmax decoding, local `evaluate`, the dumped result files), `src/tasks/*_data.py` (`*Evaluator.evaluate`: the target
of a question, its score) and `src/pretrain/qa_answer_table.py` (`load_lxmert_qa`, the answer-head surgery).

The shape follows open_clip's `TrainingTask` (src/open_clip/task/): a task owns its loss and returns named losses
from `training_forward(model, batch) -> (losses, report)`, the recipe sums them. A deliberate difference: the task is
not the `nn.Module` and does not hold the model; it builds the model config (head construction) and the head's
initial weights, and gets the model in each call. DDP then wraps the model itself and checkpoints keep the model's
own keys (every checkpoint format stays as it was).

Adding a task = adding one class and its entry in `TASKS` (a dict, no registry): the abstract methods and class
attributes of `FinetuneTask` are what a task decides — its recipe (`recipe`: splits, lr, epochs), its data, head,
targets, loss, decoding, scores and submission file. Every list of task names (the CLI's, the config's) is `TASKS`'s
keys; nothing outside the task classes compares task names.

Two tasks are lxm's own, for a user's datasets as JSON lines files (`lxm.eval.formats`; no corpus): `QaTask`
("qa": VQA's answer head, targets and metric over an answer table built from the training file) and `ClassifyTask`
("classify": image-text classification, a fresh softmax head on the pooled output, accuracy and macro-F1).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lxm.corpus.answers import convert_ans, normalize_vqa_answer, soft_score, vqa_soft_labels
from lxm.corpus.layout import (answers_name, corpus_file, finetune_name, finetune_table, read_answer_table,
                               read_corpus_table)
from lxm.errors import ConfigError
from lxm.eval import (classify_metrics, nlvr2_metrics, qa_metrics, read_classify_jsonl, read_qa_jsonl,
                      write_classify_predictions, write_gqa_predictions, write_nlvr2_predictions, write_qa_predictions,
                      write_vqa_predictions)
from lxm.eval.formats import QaRecord
from lxm.model import IGNORE_INDEX, LxmertConfig, LxmertForPreTraining, LxmertOutput, pair_loss, soft_answer_loss
from lxm.train.run import BEST_DIR, MODEL_DIR

if TYPE_CHECKING:
    from lxm.train.config import FinetuneConfig
    from lxm.train.finetune_data import FinetuneBatch


_logger = logging.getLogger(__name__)

ANSWERS_FILE = "answers.json"  # a finetuning run's answer table (id = position), what `lxm predict` decodes with


@dataclass(frozen=True)
class Recipe:
    """A task's original finetuning recipe (run/<task>_finetune.bash): what `lxm.train.config.finetune_paper` sets
    beside the values all tasks share (batch 32, BertAdam, warm-up 10 %, clip 5.0)."""

    train_splits: tuple[str, ...]  # splits trained on
    valid_split: str | None  # split scored after each epoch; None: none
    lr: float  # peak learning rate
    epochs: int = 4  # passes over the training examples


class FinetuneTask(ABC):
    """What one finetuning task decides: its recipe, corpus table, head, targets, loss, decoding, scores and files.

    Args:
        answers: the task's answer table (id = position); empty for a task without one (NLVR2).
    """

    name: ClassVar[str]  # task name: corpus tables finetune/<name>_<split>.parquet, `lxm finetune <name>`
    recipe: ClassVar[Recipe]  # the original recipe (lxm.train.config.finetune_paper)
    submission_suffix: ClassVar[str]  # the submission file's extension: <split>_predict<suffix>
    id_column: ClassVar[str]  # the table's example id column
    image_columns: ClassVar[tuple[str, ...]]  # the table's image id column(s): images per example
    metric_names: ClassVar[tuple[str, ...]]  # the columns of the validation table; the first one selects best/
    info_columns: ClassVar[tuple[str, ...]] = ()  # table columns kept per example for display (`lxm gallery`)
    answer_table: ClassVar[bool] = False  # `answers` names the answer head's rows (saved as RUN/answers.json); off:
    #   fixed class names (NLVR2's False/True)
    reads_files: ClassVar[bool] = False  # splits are the user's JSON lines files (config `data`), not corpus tables
    builds_answer_table: ClassVar[bool] = False  # the answer table comes from the training file (min_answer_count)
    structural_types: ClassVar[bool] = False  # its official questions file gives structural types (GQA: `lxm
    #   predict --questions`, the gallery's accuracy per type)
    submission_format: ClassVar[str | None] = None  # the server format `lxm.eval.submission` checks (vqa, gqa,
    #   nlvr2); None: no evaluation server (the custom tasks)
    submission_splits: ClassVar[tuple[str, ...]] = ()  # splits whose predictions go to the server: `lxm predict`
    #   checks the written file against every id of the split's table

    def __init__(self, answers: Sequence[str] = ()):
        self.answers = list(answers)

    # ---- answer table
    @classmethod
    def from_corpus(cls, corpus: str | os.PathLike) -> FinetuneTask:
        """The task with the answer table of an `lxm build-corpus` directory (a task without one ignores it)."""
        return cls()

    @classmethod
    def from_config(cls, cfg: FinetuneConfig) -> FinetuneTask:
        """The task a finetuning config trains (default: the answer table of its corpus)."""
        return cls.from_corpus(cfg.corpus)

    @classmethod
    def from_run(cls, run: Path) -> FinetuneTask:
        """The task of a finetuning run directory (with its RUN/answers.json when the task has answers)."""
        return cls()

    # ---- data
    def read_split(self, corpus: str | os.PathLike, split: str) -> dict[str, list]:
        """The columns of one split: the id column, the image column(s), "sent", "label" (None = unlabelled) and
        any `info_columns`; default the corpus table `<corpus>/finetune/<name>_<split>.parquet`."""
        table = read_corpus_table(finetune_table(corpus, self.name, split))
        return {c: table.column(c).to_pylist() for c in table.column_names}

    def split_source(self, corpus: str | os.PathLike, split: str) -> str:
        """The file `read_split` reads for `split` (what an error about the split names)."""
        return str(Path(corpus) / finetune_name(self.name, split))

    # ---- model
    @abstractmethod
    def model_config(self, base: LxmertConfig) -> LxmertConfig:
        """The backbone of `base` with only this task's head (the pretraining heads off)."""

    @abstractmethod
    def init_head(self, pre: LxmertForPreTraining, init: str, cfg: FinetuneConfig, log: Callable[[str], None]
                  ) -> dict[str, Tensor]:
        """The head's entries of the task model's state dict, taken from the pretrained model `pre` (read from
        `init`); {} leaves the head at its fresh initialisation. Reports what was done to `log`."""

    @abstractmethod
    def row_target(self, row: Mapping[str, Any]) -> Any:
        """The label of one corpus-table row, kept by the dataset (compact: scored as is); None = unlabelled."""

    # what `unseen_labels` finds, as the warning says it (lxm.train.report.unseen_labels_warning)
    unseen_phrase = "a label that no training example has"

    def unseen_labels(self, targets: Sequence) -> Counter:
        """The labels among `targets` (kept labels of a split) that the head has no class for, with their counts:
        every example with one is scored wrong whatever the model does. Empty for a task whose head covers every
        label (VQA, GQA, NLVR2: fixed tables)."""
        return Counter()

    @abstractmethod
    def example_target(self, target: Any) -> np.ndarray:
        """The `FinetuneExample.target` of a kept label (never None): an array the batch stacks into `targets`
        ([A] float32 soft scores for an answer task, a 0-d int64 class for NLVR2 / classify)."""

    @abstractmethod
    def target_answers(self, target: Any) -> list[tuple[str, float]]:
        """A kept label as (prediction string, score) pairs, best first: what a person is shown as the ground
        truth (VQA its answers with their soft scores; a single-label task its label with 1.0)."""

    # ---- training
    @abstractmethod
    def loss(self, out: LxmertOutput, batch: FinetuneBatch) -> dict[str, Tensor]:
        """Named losses of a batch (each a batch mean; their sum is the objective)."""

    def training_forward(self, model: nn.Module, batch: FinetuneBatch) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(named losses, report: the task's logits, detached) of one labelled batch already on the model's device."""
        out = model(**batch.model_inputs())
        return self.loss(out, batch), {"logits": self.logits(out).detach()}

    # ---- predictions
    @abstractmethod
    def logits(self, out: LxmertOutput) -> Tensor:
        """The head's logits, one row per example."""

    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """The prediction string of each logit column (answers; "False"/"True" for NLVR2)."""

    def probabilities(self, logits: Tensor) -> Tensor:
        """Logits [B, C] -> what the head's loss makes of them as probabilities [B, C]: softmax for a cross-entropy
        head (the BCE-trained answer heads override it with a sigmoid: each answer's own probability of being
        right)."""
        return torch.softmax(logits, dim=-1)

    def top(self, logits: Tensor, k: int) -> list[list[tuple[str, float]]]:
        """The k most probable predictions per example, (prediction string, probability), best first; ties keep
        the lower index first, as argmax (so the first one is `decode`'s)."""
        probs = self.probabilities(logits.float())
        k = min(k, probs.shape[1])
        # a stable descending sort: torch.topk's order of equal values is unspecified
        order = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, :k]
        names = self.class_names
        return [[(names[j], float(p[j])) for j in row] for p, row in zip(probs.tolist(), order.tolist())]

    def decode(self, logits: Tensor) -> list[str]:
        """Logits [B, C] -> one prediction string per example (the argmax's class name), as the submission files
        hold them."""
        names = self.class_names
        return [names[p] for p in logits.argmax(-1).tolist()]

    @abstractmethod
    def score(self, ids: Sequence, targets: Sequence, predictions: Mapping) -> dict[str, float]:
        """The original's local validation scores (keys: `metric_names`) of id -> prediction against the kept
        labels (`row_target`s) of examples `ids`."""

    def prediction_file_name(self, split: str) -> str:
        """`<split>_predict.json` or `.csv`, the names the original wrote."""
        return f"{split}_predict{self.submission_suffix}"

    @abstractmethod
    def write_predictions(self, predictions: Mapping, path: str | os.PathLike) -> Path:
        """The official submission file of id -> prediction string, in file order (a writer of lxm.eval.formats),
        written atomically."""


# ---------------------------------------------------------------------------------------------------- answer tasks


class AnswerTask(FinetuneTask):
    """A question answered from an answer table: the answer head (768 -> 1536 -> GeLU -> LN -> A) on the pooled
    output, BCE on the soft scores x A, argmax decoding, mean label score of the prediction x 100."""

    id_column = "question_id"
    image_columns = ("img_id",)
    metric_names = ("accuracy",)
    answer_table = True

    def __init__(self, answers: Sequence[str] = ()):
        super().__init__(answers)
        self.ans2id = {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def from_corpus(cls, corpus: str | os.PathLike) -> FinetuneTask:
        return cls(read_answer_table(corpus_file(corpus, answers_name(cls.name))))

    @classmethod
    def from_run(cls, run: Path) -> FinetuneTask:
        return cls(read_answer_table(run / ANSWERS_FILE))

    def model_config(self, base: LxmertConfig) -> LxmertConfig:
        return base.replace(task_mask_lm=False, task_matched=False, task_obj_predict=False, task_qa=True,
                            num_qa_labels=len(self.answers), task_nlvr2=False)

    def init_head(self, pre, init, cfg, log):
        if pre.answer_head is None:
            log(f"answer head: fresh init ({init} has no QA head)")
            return {}
        return answer_head_surgery(pre, init, cfg, self.name, self.answers, log)

    def row_target(self, row):
        # answers outside the table are skipped, as the original's label2ans lookup
        pairs = row["label"]
        return None if pairs is None else [(self.ans2id[a], float(s)) for a, s in pairs if a in self.ans2id]

    def example_target(self, target):
        dense = np.zeros(len(self.answers), dtype=np.float32)
        for k, score in target:
            dense[k] = score
        return dense

    def target_answers(self, target):
        return sorted(((self.answers[k], float(score)) for k, score in target), key=lambda kv: -kv[1])

    def loss(self, out, batch):
        return {self.name: soft_answer_loss(out.answer_logits, batch.targets)}

    def logits(self, out):
        return out.answer_logits

    @property
    def class_names(self):
        return self.answers

    def probabilities(self, logits):
        return torch.sigmoid(logits)

    def score(self, ids, targets, predictions):
        # VQA: the soft accuracy of the prediction; GQA: its labels hold one answer scored 1 (exact match)
        total = sum(dict(target).get(self.ans2id[predictions[qid]], 0.0) for qid, target in zip(ids, targets))
        return {"accuracy": round(100 * total / len(ids), 2)}


class VqaTask(AnswerTask):
    """VQA v2 (src/tasks/vqa.py): 3129 answers, soft scores from the ten annotators."""

    name = "vqa"
    recipe = Recipe(("train", "nominival"), "minival", 5e-5)
    submission_suffix = ".json"
    submission_format = "vqa"
    submission_splits = ("test",)  # all of test2015: the server wants it for test-dev as for test-standard
    info_columns = ("answer_type", "question_type")

    def write_predictions(self, predictions, path):
        return write_vqa_predictions(predictions, path)


class GqaTask(AnswerTask):
    """GQA (src/tasks/gqa.py): 1842 answers, one per question."""

    name = "gqa"
    recipe = Recipe(("train", "valid"), "testdev", 1e-5)
    submission_suffix = ".json"
    submission_format = "gqa"
    submission_splits = ("submit",)  # submission_all_questions.json
    structural_types = True

    def write_predictions(self, predictions, path):
        return write_gqa_predictions(predictions, path)


# ---------------------------------------------------------------------------------------------------- NLVR2


class Nlvr2Task(FinetuneTask):
    """NLVR2 (src/tasks/nlvr2.py): a statement and an image pair, the pair head on the two pooled outputs of
    (img0, sentence), (img1, sentence) (batch rows 2i, 2i+1), 2-way CE; "True"/"False"; accuracy and consistency."""

    name = "nlvr2"
    recipe = Recipe(("train",), "dev", 5e-5)
    submission_suffix = ".csv"
    submission_format = "nlvr2"
    submission_splits = ("test1", "test2")  # Test-P, and Test-U (labels public since 2022: lxm evaluate scores it)
    id_column = "identifier"
    image_columns = ("img0", "img1")
    metric_names = ("accuracy", "consistency")

    def model_config(self, base):
        return base.replace(task_mask_lm=False, task_matched=False, task_obj_predict=False, task_qa=False,
                            task_nlvr2=True)

    def init_head(self, pre, init, cfg, log):
        if pre.nlvr2_head is None:
            log("pair head: fresh init (the original --loadLXMERT loads the encoder only)")
            return {}
        log("pair head: copied from the checkpoint")
        return {k: v for k, v in pre.state_dict().items() if k.startswith("nlvr2_head.")}

    def row_target(self, row):
        label = row["label"]
        return None if label is None or label < 0 else int(label)

    def example_target(self, target):
        return np.array(target, dtype=np.int64)

    def target_answers(self, target):
        return [(self.class_names[target], 1.0)]

    def loss(self, out, batch):
        return {self.name: pair_loss(out.pair_logits, batch.targets)}

    def logits(self, out):
        return out.pair_logits

    @property
    def class_names(self):
        return ["False", "True"]

    def score(self, ids, targets, predictions):
        labels = {i: "True" if t == 1 else "False" for i, t in zip(ids, targets)}
        scores = nlvr2_metrics(labels, predictions)  # predictions cover exactly the split: nothing ignored
        return {name: scores[name] for name in self.metric_names}

    def write_predictions(self, predictions, path):
        return write_nlvr2_predictions(predictions, path)


# ---------------------------------------------------------------------------------------------------- custom datasets


def _run_data(run: Path) -> dict[str, str]:
    """The `data` files of a finetuning run's config.yaml (what `--split valid|test` names)."""
    from lxm.train.config import FinetuneConfig, load_run_config

    cfg = load_run_config(run / "config.yaml") if (run / "config.yaml").exists() else None
    return dict(cfg.data) if isinstance(cfg, FinetuneConfig) else {}


def split_file(task: str, files: Mapping[str, str], split: str) -> Path:
    """The JSON lines file of a custom task's split: a name in its data, else an existing .jsonl path."""
    if split in files:
        return Path(files[split])
    if split.endswith(".jsonl") and Path(split).is_file():
        return Path(split)
    raise ConfigError(f"{task}: split {split!r} is neither one of the run's data files ("
                      f"{', '.join(files) or 'none'}) nor an existing .jsonl file")


def _file_stem(split: str) -> str:
    return Path(split).stem if split.endswith(".jsonl") else split


class QaLabel(NamedTuple):
    """The kept label of a custom QA question: its targets over the answer table and what the metric scores."""

    targets: list[tuple[int, float]]  # (answer id, soft score) of the answers in the table
    answers: list[str] | dict[str, float]  # the annotators' answers (VQA accuracy) or {answer: given score}


def qa_answer_table(records: Sequence[QaRecord], min_count: int = 1) -> list[str]:
    """The answers given by >= `min_count` training questions, in order of first appearance (as
    `lxm.corpus.answers.vqa_vocabulary`): annotator answers normalised as VQA's vocabulary is
    (`normalize_vqa_answer`), the keys of {answer: score} (score > 0) as written."""
    questions: Counter = Counter()
    for rec in records:
        if isinstance(rec.answers, list):
            given = dict.fromkeys(normalize_vqa_answer(a) for a in rec.answers)
        else:
            given = dict.fromkeys(a for a, score in rec.answers.items() if score > 0)
        questions.update(a for a in given if a)
    return [a for a, n in questions.items() if n >= min_count]


class JsonlTask:
    """What the custom tasks share (mixed in before their base task): their splits are JSON lines files (the
    config's `data`, split name -> file; `split_file`), not corpus tables, and their label table is RUN/answers.json.

    Args:
        answers: the answer or label table (id = position).
        files: split name -> JSON lines file.
    """

    name: ClassVar[str]
    reads_files = True

    def __init__(self, answers: Sequence[str] = (), files: Mapping[str, str] | None = None):
        super().__init__(answers)
        self.files = dict(files or {})

    @classmethod
    def from_corpus(cls, corpus):
        raise ConfigError(f"{cls.name} reads JSON lines files (--train/--valid/--test), not a corpus")

    @classmethod
    def from_run(cls, run):
        return cls(read_answer_table(run / ANSWERS_FILE), _run_data(run))

    def prediction_file_name(self, split):
        return super().prediction_file_name(_file_stem(split))

    def split_source(self, corpus, split):
        return str(split_file(self.name, self.files, split))


class QaTask(JsonlTask, AnswerTask):
    """Visual QA on a user's JSON lines files (`lxm finetune qa`): VQA's answer head, loss and decoding over an
    answer table built from the training file; the head starts from the pretraining QA head for shared answers.

    Targets as `lxm build-corpus --vqa` makes VQA's (`vqa_soft_labels`: annotator answers counted as written, soft
    scores 0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / >= 4 of them, only answers in the table), or the given scores of
    {answer: score}; answers outside the table are skipped. Metric: per question the official VQA accuracy
    (annotator lists) or the given score of the predicted answer (dicts), mean x 100.

    Args:
        answers: the answer table (id = position).
        files: split name -> JSON lines file (the config's `data`).
    """

    name = "qa"
    recipe = Recipe(("train",), "valid", 5e-5)  # VQA's lr; "valid" becomes None when `data` has no valid file
    submission_suffix = ".json"
    builds_answer_table = True
    info_columns = ("answer_type", "question_type")

    @classmethod
    def from_config(cls, cfg):
        path = cfg.data["train"]
        records = read_qa_jsonl(path, require_labels=True)
        answers = qa_answer_table(records, cfg.min_answer_count)
        if not answers:
            raise ConfigError(f"{path}: no answer is given for >= {cfg.min_answer_count} questions "
                              f"(min_answer_count)")
        task = cls(answers, cfg.data)
        untargeted = sum(not task.row_target({"label": r.answers}).targets for r in records)
        if untargeted:  # annotator answers are matched as written, as VQA's: "Yes" is not the table's "yes"
            _logger.warning("%s: %d of %d training questions have no answer in the %d-answer table (answers given "
                            "by fewer than %d questions, or not written normalised)", path, untargeted, len(records),
                            len(answers), cfg.min_answer_count)
        return task

    def read_split(self, corpus, split):
        recs = read_qa_jsonl(split_file(self.name, self.files, split), require_labels=split == "train")
        return {"question_id": [r.question_id for r in recs], "img_id": [r.img_id for r in recs],
                "sent": [r.question for r in recs], "label": [r.answers for r in recs],
                "answer_type": [r.answer_type for r in recs], "question_type": [r.question_type for r in recs]}

    def row_target(self, row):
        answers = row["label"]
        if answers is None:
            return None
        if isinstance(answers, Mapping):
            pairs = [(self.ans2id[a], float(s)) for a, s in answers.items() if a in self.ans2id]
        else:
            pairs = [(self.ans2id[a], s) for a, s in vqa_soft_labels(answers, self.ans2id).items()]
        return QaLabel(pairs, answers)

    unseen_phrase = "no answer in the answer table"

    def unseen_labels(self, targets):
        """The most given answer of each question none of whose answers is in the table (its best score is 0), with
        counts: answers of the validation file that no training question gave often enough."""
        return Counter(Counter(t.answers).most_common(1)[0][0] if not isinstance(t.answers, Mapping)
                       else max(t.answers, key=t.answers.get)
                       for t in targets if t is not None and not t.targets and t.answers)

    def example_target(self, target):
        return super().example_target(target.targets)

    def target_answers(self, target):
        # every given answer, in the table or not (a person reads the ground truth, not the training target)
        answers = target.answers
        scored = (answers.items() if isinstance(answers, Mapping)
                  else ((a, soft_score(n)) for a, n in Counter(answers).items()))
        return sorted(((a, float(s)) for a, s in scored), key=lambda kv: -kv[1])

    def score(self, ids, targets, predictions):
        scores = qa_metrics({str(i): t.answers for i, t in zip(ids, targets)},
                            {str(i): predictions[i] for i in ids})
        return {"accuracy": scores["accuracy"]}

    def write_predictions(self, predictions, path):
        return write_qa_predictions(predictions, path)


class ClassifyTask(JsonlTask, FinetuneTask):
    """Image-text classification on a user's JSON lines files (`lxm finetune classify`; e.g. visual entailment,
    meme classification): a fresh head of the answer head's shape (768 -> 1536 -> GeLU -> LN -> L labels) on the
    pooled output — the checkpoint formats stay those of the answer tasks — trained with cross-entropy; softmax,
    argmax decoding; accuracy and macro-F1. The labels (strings, sorted: a JSON number or boolean as JSON spells it,
    `lxm.eval.formats`) come from the training file; a validation label outside them counts, as a wrong prediction
    (`unseen_labels`: warned before training and in the report).

    Args:
        answers: the labels (id = position; RUN/answers.json).
        files: split name -> JSON lines file (the config's `data`).
    """

    name = "classify"
    recipe = Recipe(("train",), "valid", 5e-5)  # NLVR2's lr; "valid" becomes None when `data` has no valid file
    submission_suffix = ".csv"
    id_column = "id"
    image_columns = ("img_id",)
    metric_names = ("accuracy", "macro_f1")
    answer_table = True

    def __init__(self, answers: Sequence[str] = (), files: Mapping[str, str] | None = None):
        super().__init__(answers, files)
        self.label2id = {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def from_config(cls, cfg):
        path = cfg.data["train"]
        labels = sorted({r.label for r in read_classify_jsonl(path, require_labels=True)})
        if len(labels) < 2:
            raise ConfigError(f"{path}: every example has the label {labels[0]!r}; classification needs two or more")
        return cls(labels, cfg.data)

    def read_split(self, corpus, split):
        recs = read_classify_jsonl(split_file(self.name, self.files, split), require_labels=split == "train")
        return {"id": [r.id for r in recs], "img_id": [r.img_id for r in recs], "sent": [r.text for r in recs],
                "label": [r.label for r in recs]}

    def model_config(self, base):
        return base.replace(task_mask_lm=False, task_matched=False, task_obj_predict=False, task_qa=True,
                            num_qa_labels=len(self.answers), task_nlvr2=False)

    def init_head(self, pre, init, cfg, log):
        # the pretraining QA head scores answers, not these labels: nothing in it maps to them
        log(f"classification head: fresh init ({len(self.answers)} labels)")
        return {}

    def row_target(self, row):
        return row["label"]

    def unseen_labels(self, targets):
        return Counter(t for t in targets if t is not None and t not in self.label2id)

    def example_target(self, target):
        return np.array(self.label2id.get(target, IGNORE_INDEX), dtype=np.int64)  # unseen in training: no target

    def target_answers(self, target):
        return [(target, 1.0)]

    def loss(self, out, batch):
        return {self.name: F.cross_entropy(out.answer_logits.float(), batch.targets, ignore_index=IGNORE_INDEX)}

    def logits(self, out):
        return out.answer_logits

    @property
    def class_names(self):
        return self.answers

    def score(self, ids, targets, predictions):
        scores = classify_metrics({str(i): t for i, t in zip(ids, targets)}, {str(i): predictions[i] for i in ids})
        return {name: scores[name] for name in self.metric_names}

    def write_predictions(self, predictions, path):
        return write_classify_predictions(predictions, path)


TASKS: dict[str, type[FinetuneTask]] = {"vqa": VqaTask, "gqa": GqaTask, "nlvr2": Nlvr2Task, "qa": QaTask,
                                        "classify": ClassifyTask}


def task_class(name: str, where: str = "config: 'task'") -> type[FinetuneTask]:
    """The class of task `name`; an unknown name is a ConfigError saying `where` it came from and listing `TASKS`."""
    if name not in TASKS:
        raise ConfigError(f"{where} must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------------- head surgery


def pretraining_answers(cfg: FinetuneConfig, init_path: str, rows: int) -> tuple[list[str], str] | None:
    """(answer strings of the init's QA head rows, their file): init_answers (must fit), else the first table of
    `rows` answers among the init run's own and the corpus's; None when none fits."""
    if cfg.init_answers:
        table = read_answer_table(cfg.init_answers)
        if len(table) != rows:
            raise ConfigError(f"init_answers {cfg.init_answers}: {len(table)} answers, but the QA head of {init_path} "
                              f"has {rows} rows")
        return table, cfg.init_answers
    candidates = []
    run = Path(init_path).parent if Path(init_path).name in (MODEL_DIR, BEST_DIR) else Path(init_path).parent.parent
    if (run / "config.yaml").exists():
        from lxm.train.config import PretrainConfig, load_run_config

        run_cfg = load_run_config(run / "config.yaml")
        if isinstance(run_cfg, PretrainConfig) and run_cfg.answers:
            candidates.append(Path(run_cfg.answers))
        elif run_cfg.corpus:
            candidates.append(Path(run_cfg.corpus) / answers_name("qa"))
    if cfg.corpus:  # the custom tasks have none
        candidates.append(Path(cfg.corpus) / answers_name("qa"))
    for path in candidates:
        if path.exists():
            table = read_answer_table(path)
            if len(table) == rows:
                return table, str(path)
    return None


def answer_head_surgery(pre: LxmertForPreTraining, init: str, cfg: FinetuneConfig, task: str, answers: list[str],
                        log: Callable[[str], None]) -> dict[str, Tensor]:
    """qa_answer_table.py `load_lxmert_qa`: the answer head of `pre` with its last layer's rows re-indexed to
    `answers` by answer string after `convert_ans`; rows not found are zero. A head of exactly `len(answers)` rows
    with no pretraining table of its size is a head finetuned on this task: copied as is."""
    head = {k: v for k, v in pre.state_dict().items() if k.startswith("answer_head.")}
    rows = pre.config.num_qa_labels
    w, b = head.pop("answer_head.logit_fc.3.weight"), head.pop("answer_head.logit_fc.3.bias")
    found = pretraining_answers(cfg, init, rows)
    if found is None and rows == len(answers):
        log(f"answer head: copied as is ({rows} answers: a finetuned {task} head)")
        return {**head, "answer_head.logit_fc.3.weight": w, "answer_head.logit_fc.3.bias": b}
    if found is None:
        corpus = f", {Path(cfg.corpus) / answers_name('qa')}" if cfg.corpus else ""
        raise ConfigError(f"{init}: its QA head has {rows} rows but no answer table of that size was found (the "
                          f"init run's{corpus}); pass --set init_answers=PATH (LXMERT's all_ans.json)")
    table, where = found
    index = {a: i for i, a in enumerate(table)}
    new_w, new_b = torch.zeros(len(answers), w.shape[1], dtype=w.dtype), torch.zeros(len(answers), dtype=b.dtype)
    missing = []
    for i, ans in enumerate(answers):
        j = index.get(convert_ans(ans))
        if j is None:
            missing.append(ans)
        else:
            new_w[i], new_b[i] = w[j], b[j]
    n_found = len(answers) - len(missing)
    log(f"answer head: {n_found}/{len(answers)} rows from the {rows}-way pretraining QA head ({where}); "
        f"{len(missing)} set to zero" + (f", e.g. {', '.join(repr(a) for a in missing[:5])}" if missing else ""))
    return {**head, "answer_head.logit_fc.3.weight": new_w, "answer_head.logit_fc.3.bias": new_b}
