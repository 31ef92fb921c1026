"""The three kinds of model `lxm ask` answers with, loaded into one `Answerer` (task + model + tokenizer).

Sources (tried in this order):

1. an lxm finetuning run directory (`lxm finetune --out`): `lxm.infer.runs.load_run` gives its task (with the
   run's answer table), its best model, and the vocabulary and max_length of its config;
2. an original fine-tuned `BEST.pth` of airsplay/lxmert `src/tasks/{vqa,gqa,nlvr2}.py` ("original-finetuned"
   format: `lxrt_encoder.model.bert.*` + `logit_fc.*`), read by `lxm.model.load_pretrained`; its answer head needs
   the answer table it was trained with (`--answers data/vqa/trainval_label2ans.json`), a pair head is NLVR2;
3. a transformers `LxmertForQuestionAnswering` directory or Hub id (`unc-nlp/lxmert-vqa-uncased`), with `--answers`
   or, where its config.json has one name per answer row, the config's `id2label` (any lxm checkpoint directory
   with one task head loads the same way).

A checkpoint without a task head (a pretraining run, `*_LXRT.pth`, `unc-nlp/lxmert-base-uncased`) cannot answer:
that is a one-line error pointing to `lxm finetune`. What the model is asked is decided by its task, never by the
source: an answer task (`AnswerTask`) takes a question, any other task (NLVR2, classification) a statement, over as
many images as the task has image columns.

What the model was trained with is checked against what it is given, as `lxm predict` checks it
(`lxm.infer.runs.check_*`): the answer table against the answer head's rows (and for answers named twice), the
vocabulary against the word-embedding rows, the region features' size against the visual encoder's input
(`Answerer.check_features`, before a detector runs). Any of them wrong gives wrong answers with no error otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from lxm.errors import ConfigError, LxmError
from lxm.features.records import ImageFeatures
from lxm.model import LxmertForFinetuning, LxmertTokenizer, load_pretrained_with_report
from lxm.corpus.layout import read_answer_table
from lxm.infer.runs import check_answer_table, check_feature_dim, check_vocabulary, load_run
from lxm.train.finetune_data import collate_finetune, encode_example
from lxm.train.tasks import AnswerTask, FinetuneTask, Nlvr2Task, task_class

_logger = logging.getLogger(__name__)

DEFAULT_VOCAB = "bert-base-uncased"  # the WordPiece vocabulary every released LXMERT model was trained with
DEFAULT_MAX_LENGTH = 20  # tokens incl. [CLS]/[SEP], as the original's finetuning (`max_seq_length=20`)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class AskError(LxmError, ValueError):
    """A model, an image or a request `lxm ask` cannot use; the message names it."""


@dataclass
class Prediction:
    """What the model says about one request: its k best predictions, and (when asked for) what it looked at."""

    top: list[tuple[str, float]]  # (prediction string, probability), best first (`FinetuneTask.top`)
    # per image [N] weights over its boxes, summing to 1, by `method` (lxm.infer.explain.explain_batch)
    attention: list[np.ndarray] | None = None
    method: str | None = None  # how `attention` was found: "relevance" or "attention"; None: not asked
    words: list[tuple[str, float]] | None = None  # relevance: the text's words with their shares (word_shares)


@dataclass
class Answerer:
    """A task model ready to answer: the task (what is asked, how logits become answers), the model, the tokenizer.

    `source` and `kind` say where it came from, for the output ("lxm run", "original-finetuned checkpoint",
    "hf checkpoint", "lxm checkpoint").
    """

    task: FinetuneTask
    model: LxmertForFinetuning
    tokenizer: LxmertTokenizer
    source: str
    kind: str
    device: torch.device = torch.device("cpu")
    features: tuple[str, ...] = ()  # an lxm run's feature stores (their manifests record the visual backbone)

    def backbone(self):
        """The `BackboneInfo` of the run's features (the first of its stores still there), or None (not a run, or
        its stores are gone): what `lxm ask` runs on a raw image unless told otherwise."""
        from lxm.features import FeatureStore, StoreError, store_backbone

        for root in self.features:
            try:
                return store_backbone(FeatureStore(root).manifest)
            except (StoreError, OSError, ValueError, KeyError):
                continue
        return None

    @property
    def text_field(self) -> str:
        """"question" for an answer task, "statement" for every other (NLVR2, classification)."""
        return "question" if isinstance(self.task, AnswerTask) else "statement"

    @property
    def num_images(self) -> int:
        return len(self.task.image_columns)

    @property
    def output(self) -> str:
        """The JSON shape of a prediction: "answers" (a ranked answer list), "boolean" (NLVR2's True/False) or
        "label" (one of the task's class names)."""
        if isinstance(self.task, AnswerTask):
            return "answers"
        return "boolean" if isinstance(self.task, Nlvr2Task) else "label"

    def describe(self) -> str:
        return f"{self.task.name} model, {self.kind} {self.source}"

    def check_request(self, field: str, images: int, where: str) -> None:
        """A request must ask what the task answers (question / statement) over the task's number of images."""
        if field != self.text_field:
            raise AskError(f"{where}: {self.source} is a {self.task.name} model; it takes a {self.text_field} "
                           f"(--{self.text_field}), not a {field}")
        if images != self.num_images:
            how = "--image LEFT --image RIGHT" if self.num_images == 2 else "--image IMG"
            raise AskError(f"{where}: a {self.task.name} model reads {self.num_images} image(s) ({how}), got {images}")

    def check_features(self, dim: int, what: str, fix: str = "") -> None:
        """The features `what` gives (`dim` per box) must be the size the model reads; checked before a detector
        runs (minutes with the full one) rather than failing in the model's first matrix product."""
        check_feature_dim(self.model, dim, what, self.source, fix)

    @property
    def feature_dim(self) -> int:
        return self.model.config.visual_feat_dim

    def text_warnings(self, text: str) -> list[str]:
        """What the model will not see of `text`: the word pieces cut at max_length, or words all unknown to the
        vocabulary (the model then reads only [UNK]s). Empty when it reads the text whole."""
        pieces = self.tokenizer.tokenize(text)
        keep = self.tokenizer.max_length - 2  # [CLS] and [SEP]
        notes = []
        if len(pieces) > keep:
            notes.append(f"the {self.text_field} is cut to {keep} of its {len(pieces)} word pieces (max_length "
                         f"{self.tokenizer.max_length} counts [CLS] and [SEP]); the model reads only those {keep}")
        if pieces and all(p == "[UNK]" for p in pieces[:keep]):
            notes.append(f"every word piece of the {self.text_field} is [UNK] (not in the vocabulary "
                         f"{self.tokenizer.vocab_path}): the model reads no words")
        return notes

    def to(self, device: torch.device | str) -> Answerer:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def predict(self, texts: Sequence[str], images: Sequence[Sequence[ImageFeatures]], k: int = 5,
                explain: bool = False, method: str = "relevance") -> list[Prediction]:
        """One batch: texts [B] and each text's image records (`num_images` each) -> B predictions.

        The inputs are built exactly as the finetuning dataset builds them (`encode_example` + `collate_finetune`),
        so an image and a question give what `lxm predict` gives for them. `explain`: each prediction also gets its
        images' box weights by `method` (`lxm.infer.explain.explain_batch`: "relevance" for the most probable
        prediction, with the words' shares, or the last cross layer's "attention"); the model then writes its
        attention out (`output_attentions=True`), so probabilities may differ in the last digits.
        """
        from lxm.infer.explain import explain_batch, row_weights, word_shares

        examples = [encode_example(i, text, [(rec, rec.normalized_boxes()) for rec in recs], self.tokenizer)
                    for i, (text, recs) in enumerate(zip(texts, images))]
        batch = collate_finetune(examples).to(self.device)
        self.model.eval()
        if not explain:
            with torch.no_grad():
                out = self.model(**batch.model_inputs())
                return [Prediction(top) for top in self.task.top(self.task.logits(out), k)]
        inputs = batch.model_inputs()
        logits, boxes, positions = explain_batch(self.task, self.model, inputs, method)
        with torch.no_grad():
            preds = [Prediction(top, method=method) for top in self.task.top(logits, k)]
        weights = row_weights(boxes, inputs.get("visual_attention_mask"))  # row = (example, image), as collated
        per = self.num_images
        for i, (p, text) in enumerate(zip(preds, texts)):
            p.attention = [weights[i * per + j] for j in range(per)]
            if positions is not None:  # an example's rows (NLVR2: one per image) add up
                p.words = word_shares(self.tokenizer, text, positions[i * per:(i + 1) * per].sum(0).cpu().numpy())
        return preds


# ---------------------------------------------------------------------------------------------------- loading


def _pretraining_run(path: Path) -> bool:
    try:
        raw = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError:
        return False  # load_run names the broken file
    return isinstance(raw, dict) and "task" not in raw


def looks_like_a_path(name: str) -> bool:
    """Whether `--model NAME` can only mean a local path: a Hub id is "name" or "owner/name", so a name starting
    with /, . or ~, with a backslash or two slashes, with a checkpoint file's suffix, or whose "owner" is a folder
    here (runs/nope, with runs/ present) is a path."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if Path(name).suffix.lower() in CHECKPOINT_SUFFIXES:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def _no_head(source: str) -> AskError:
    return AskError(f"{source}: a pretraining model has no task head to answer with; finetune it first "
                    f"(lxm finetune vqa --init {source} ...) and ask the finetuning run")


def _config_json(source: str) -> dict:
    """The config.json of a transformers / lxm directory or an already downloaded Hub id ({} if none)."""
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / "config.json"
    elif path.is_file():
        file = path.with_name("config.json")
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # not a valid repo id: the checkpoint was read some other way, there is no config
            cached = None
        file = Path(cached) if isinstance(cached, str) else None
    if file is None or not file.exists():
        return {}
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _config_answers(meta: dict, rows: int) -> list[str] | None:
    """The answer strings of a transformers config's `id2label`, when it names every answer row (the default
    two-entry {0: "LABEL_0", 1: "LABEL_1"} of an unnamed head does not)."""
    labels = meta.get("id2label")
    if not isinstance(labels, dict) or len(labels) != rows:
        return None
    try:
        table = {int(k): v for k, v in labels.items()}
    except (TypeError, ValueError):
        return None
    if sorted(table) != list(range(rows)) or not all(isinstance(v, str) for v in table.values()):
        return None
    return [table[i] for i in range(rows)]


def load_answerer(source: str | os.PathLike, answers: str | os.PathLike | None = None,
                  vocab: str | os.PathLike | None = None, task: str | None = None,
                  max_length: int | None = None) -> Answerer:
    """The task model of `source` (see the module docstring for the three kinds), ready to answer.

    Args:
        source: an lxm finetuning run directory, an original fine-tuned `.pth`, a transformers / lxm checkpoint
            directory or a Hub id.
        answers: the answer table of a checkpoint's answer head (a JSON list of strings, `trainval_label2ans.json`,
            or `{answer: id}`); its length must be the head's row count. A run has its own (RUN/answers.json).
        vocab: WordPiece vocabulary (file, directory or Hub id); default the run's, else bert-base-uncased.
        task: the task name of a checkpoint's head (default: vqa for an answer head, nlvr2 for a pair head; gqa,
            qa or classify read an answer head too, `answers` then being their table or labels); a run has its
            own and `task` must then match it.
        max_length: tokens incl. [CLS]/[SEP]; default the run's, else 20.

    Raises:
        AskError / ConfigError / CheckpointError: a model without a task head, an answer table that does not fit
            the head, a task that does not fit the head.
    """
    text = str(source)
    path = Path(source).expanduser()
    if not path.exists() and looks_like_a_path(text):  # a Hub lookup of "runs/nope" would take 20 s to fail
        kind = "file" if path.suffix.lower() in CHECKPOINT_SUFFIXES else "directory"
        raise AskError(f"{text}: no such {kind} (--model takes an lxm finetuning run, a checkpoint file or "
                       f"directory, or a Hub id)")
    if path.is_dir() and (path / "config.yaml").exists():
        if _pretraining_run(path):
            raise _no_head(text)
        cfg, task_obj, model = load_run(path, task)
        if answers is not None and isinstance(task_obj, AnswerTask):
            given = read_answer_table(answers)
            if given != task_obj.answers:
                raise AskError(f"{answers}: not the answer table of the run {text} (the run's own "
                               f"{path / 'answers.json'} is used; leave out --answers)")
        tokenizer = LxmertTokenizer(vocab or cfg.vocab, max_length=max_length or cfg.max_length)
        check_vocabulary(model, tokenizer.vocab_size, tokenizer.vocab_path, text)
        return Answerer(task_obj, model, tokenizer, text, "lxm run", features=tuple(str(f) for f in cfg.features))
    model, report = load_pretrained_with_report(source)
    if not isinstance(model, LxmertForFinetuning):
        raise _no_head(text)
    meta = _config_json(text)
    if model.config.task_qa:
        # the answer head: an answer task's answers, or a classification task's labels (same head shape)
        name = task or "vqa"
        cls = task_class(name)
        if issubclass(cls, Nlvr2Task):
            raise ConfigError(f"--task {name}: {text} has an answer head ({model.config.num_qa_labels} rows), not "
                              f"the NLVR2 pair head")
        rows = model.config.num_qa_labels
        if answers is not None:
            table = read_answer_table(answers)
            check_answer_table(table, model, answers, text)
        else:
            table = _config_answers(meta, rows)
            if table is None:
                raise AskError(f"{text}: its answer head has {rows} rows but no answer names; give its answer "
                               f"table with --answers (e.g. trainval_label2ans.json)")
            check_answer_table(table, model, f"{text} config.json id2label", text)
        task_obj: FinetuneTask = cls(table)
    else:
        name = task or "nlvr2"
        if not issubclass(task_class(name), Nlvr2Task):
            raise ConfigError(f"--task {name}: {text} has the NLVR2 pair head; only nlvr2 reads it")
        task_obj = task_class(name)()
    tokenizer = LxmertTokenizer(vocab or DEFAULT_VOCAB, max_length=max_length or DEFAULT_MAX_LENGTH)
    check_vocabulary(model, tokenizer.vocab_size, tokenizer.vocab_path, text)
    return Answerer(task_obj, model, tokenizer, text, f"{report.format} checkpoint")
