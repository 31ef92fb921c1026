"""A finished finetuning run, used: load its best model (`load_run`), predict a split (`predict`, `predict_top`,
`predict_run`: what `lxm predict` runs), score predictions (`evaluate`), and the checks that keep a model, its
vocabulary, its answer table and its features together (`check_*`).

The batches are those of airsplay/lxmert `src/tasks/vqa.py` `VQA.predict` (eval mode, no_grad, the task's logits
decoded per batch); `lxm.train.finetune`'s trainer validates with the same `predict` / `evaluate`, and `lxm ask`,
`lxm gallery` and `lxm predict` load runs through `load_run`, so none of them imports the training recipe.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from lxm.errors import ConfigError
from lxm.eval.submission import SubmissionReport, check_submission_ids
from lxm.model import LxmertForFinetuning, load_pretrained
from lxm.train.config import FinetuneConfig, load_run_config
from lxm.train.finetune_data import FinetuneDataset, collate_finetune
from lxm.train.precision import autocast
from lxm.train.run import BEST_DIR, MODEL_DIR
from lxm.train.tasks import ANSWERS_FILE, FinetuneTask, task_class

_logger = logging.getLogger(__name__)


def batch_logits(task: FinetuneTask, model: LxmertForFinetuning, dataset: FinetuneDataset, *, batch_size: int = 256,
                 device: torch.device | str = "cpu", precision: str = "fp32", num_workers: int = 0):
    """(example ids, the task's logits) per batch of `dataset`, in order, under no_grad in eval mode."""
    model.eval()
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_finetune, num_workers=num_workers)
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            with autocast(precision, device.type):
                yield batch.ids, task.logits(model(**batch.model_inputs()))


def predict(task: FinetuneTask, model: LxmertForFinetuning, dataset: FinetuneDataset, *, batch_size: int = 256,
            device: torch.device | str = "cpu", precision: str = "fp32", num_workers: int = 0) -> dict:
    """id -> the task's prediction string (VQA/GQA the argmax answer, NLVR2 "True"/"False")."""
    out: dict = {}
    for ids, logits in batch_logits(task, model, dataset, batch_size=batch_size, device=device, precision=precision,
                                    num_workers=num_workers):
        out.update(zip(ids, task.decode(logits)))
    return out


def evaluate(task: FinetuneTask, dataset: FinetuneDataset, predictions: dict) -> dict[str, float]:
    """The original's local validation scores of `predictions` on a labelled dataset (`task.metric_names`)."""
    return task.score(dataset.ids, dataset.targets, predictions)


def load_run(run: str | os.PathLike, task: str | None = None) -> tuple[FinetuneConfig, FinetuneTask,
                                                                       LxmertForFinetuning]:
    """(config, task, best model) of a finetuning run directory; `task` (if given) must be the run's.

    Raises ConfigError / FileNotFoundError naming the run when it is not a finished finetuning run (a pretraining
    run, a run before its first epoch, another task's run)."""
    cfg, task_obj, model_dir = open_run(run, task)
    model = load_pretrained(model_dir)
    check_answer_table(task_obj.answers if task_obj.answer_table else None, model, Path(run) / ANSWERS_FILE,
                       str(model_dir))
    return cfg, task_obj, model


def open_run(run: str | os.PathLike, task: str | None = None) -> tuple[FinetuneConfig, FinetuneTask, Path]:
    """(config, task with its answer table, best model directory) of a finished finetuning run, without loading the
    model: what `load_run` loads, `lxm check-submission --run` and `lxm convert-checkpoint RUN` read.

    Raises ConfigError / FileNotFoundError naming the run, as `load_run`."""
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"{run}: no such directory (expected the --out directory of lxm finetune)")
    if not run.is_dir():
        raise ConfigError(f"{run}: not a directory (expected the --out directory of lxm finetune)")
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}: not an lxm finetuning run (no config.yaml)")
    # every key read and checked (a damaged file -- not UTF-8, truncated, `max_length: twenty` -- is one line)
    cfg = load_run_config(run / "config.yaml")
    if not isinstance(cfg, FinetuneConfig):  # a pretraining run has a config.yaml too
        raise ConfigError(f"{run / 'config.yaml'}: a pretraining run (no field 'task'); this needs the --out "
                          f"directory of lxm finetune")
    if task is not None and cfg.task != task:
        raise ConfigError(f"{run} is a {cfg.task} run, not {task}")
    model_dir = run / BEST_DIR
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{run}: no {BEST_DIR}/ model yet (the run has not finished an epoch)")
    return cfg, task_class(cfg.task).from_run(run), model_dir


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a run directory of lxm (its config.yaml), rather than a checkpoint."""
    return (Path(path) / "config.yaml").is_file()


def run_model(run: str | os.PathLike) -> tuple[Path, list[str] | None]:
    """(model directory, names of its answer head's rows) of an lxm run: a finetuning run's best/ with its answer
    table or classification labels (None for NLVR2's pair head), a pretraining run's model/ with None (what `lxm
    convert-checkpoint RUN` converts)."""
    run = Path(run)
    if isinstance(load_run_config(run / "config.yaml"), FinetuneConfig):
        _, task, model_dir = open_run(run)
        return model_dir, (task.class_names if task.answer_table else None)
    model_dir = run / MODEL_DIR
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{run}: no {MODEL_DIR}/ model yet (the pretraining run has not finished)")
    return model_dir, None


def check_answer_table(answers: list[str] | None, model: LxmertForFinetuning, file: str | os.PathLike,
                       source: str) -> None:
    """An answer table (answers, or a classification task's labels) must name each row of `model`'s answer head
    once: a table one short or long, or with an answer twice, maps logits to the wrong strings without any error.
    `file` is the table's file and `source` the model, for the message; `answers` None (NLVR2) checks nothing."""
    if answers is None:
        return
    seen: set[str] = set()
    for answer in answers:
        if answer in seen:
            raise ConfigError(f"{file}: the answer {answer!r} is in the table twice (each answer names one row of "
                              f"the answer head)")
        seen.add(answer)
    rows = model.config.num_qa_labels if model.config.task_qa else 0
    if len(answers) != rows:
        raise ConfigError(f"{file}: {len(answers)} answers, but the answer head of {source} has {rows} rows (the "
                          f"answer table the model was trained with is needed)")


def check_vocabulary(model: LxmertForFinetuning, vocab_size: int, vocab: str | os.PathLike, source: str) -> None:
    """The vocabulary must be the one the model's word embeddings were trained with: another one (a file cut short,
    another model's) maps words to the wrong rows and gives wrong answers without any error."""
    rows = model.config.vocab_size
    if vocab_size != rows:
        raise ConfigError(f"{vocab}: a vocabulary of {vocab_size} word pieces, but the model {source} has word "
                          f"embeddings for {rows} (use the vocabulary it was trained with)")


def check_feature_dim(model: LxmertForFinetuning, dim: int, what: str, source: str, fix: str = "") -> None:
    """The region features `what` gives (`dim` per box) must be the size the model's visual encoder reads."""
    want = model.config.visual_feat_dim
    if dim != want:
        raise ConfigError(f"{what}: {dim}-dim region features, but the model {source} reads {want}-dim features"
                          + (f" ({fix})" if fix else ""))


def predict_top(task: FinetuneTask, model: LxmertForFinetuning, dataset: FinetuneDataset, k: int = 5, *,
                batch_size: int = 256, device: torch.device | str = "cpu", precision: str = "fp32") -> dict:
    """id -> the k most probable predictions [(prediction string, probability)], best first (`FinetuneTask.top`);
    the first is `predict`'s."""
    out: dict = {}
    for ids, logits in batch_logits(task, model, dataset, batch_size=batch_size, device=device, precision=precision):
        out.update(zip(ids, task.top(logits, k)))
    return out


class Prediction(NamedTuple):
    """What `predict_run` did."""

    path: Path  # the submission file written
    scores: dict  # the local scores when the split is labelled, else {}
    submission: SubmissionReport | None  # the file checked against every id of the split (a split the task's
    #   server takes, `FinetuneTask.submission_splits`); None: not such a split


def predict_run(run: str | os.PathLike, task: str, split: str, out: str | os.PathLike, *, corpus: str | None = None,
                features: list[str] | None = None, batch_size: int | None = None, device: str = "auto",
                log=None) -> Prediction:
    """Load RUN/best (and RUN/config.yaml for corpus, features, vocab, answers), predict `split`, write `out`;
    `log` receives messages (default: logged).

    On a split the task's server takes (VQA test, GQA submit, NLVR2 test1 / test2), the written file is checked as
    `lxm check-submission` does, against every id of the split's table (built from the official questions file;
    examples dropped for missing features are missing from the file) and the run's answer table: a file that is not
    ready is still written, its report says why."""
    from lxm.devices import resolve_device

    log = log or _logger.info
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    dev = resolve_device(device)
    cfg, task_obj, model = load_run(run, task)
    model_dir = str(Path(run) / BEST_DIR)
    data = FinetuneDataset(task_obj, corpus or cfg.corpus, [split], features or cfg.features, cfg.vocab,
                           max_length=cfg.max_length)
    check_vocabulary(model, data.tokenizer.vocab_size, data.tokenizer.vocab_path, model_dir)
    for store in data.stores:
        check_feature_dim(model, store.feature_dim, str(store.root), model_dir,
                          "give --features extracted with the detector the model was trained on")
    model.to(dev)
    log(f"{cfg.task} {split}: {len(data)} examples ({data.dropped} without features dropped)")
    preds = predict(task_obj, model, data, batch_size=batch_size or cfg.eval_batch_size, device=dev,
                    precision=cfg.runtime.precision)
    path = task_obj.write_predictions(preds, out)
    report = None
    if task_obj.submission_format is not None and split in task_obj.submission_splits:
        ids = task_obj.read_split(corpus or cfg.corpus, split)[task_obj.id_column]
        report = check_submission_ids(task_obj.submission_format, path, ids,
                                      task_obj.answers if task_obj.answer_table else None)
    return Prediction(path, evaluate(task_obj, data, preds) if data.labelled else {}, report)
