"""`lxm finetune {vqa,gqa,nlvr2,qa,classify}` and `lxm predict`: pretrained LXMERT -> task models
(`LxmertForFinetuning`), validation, submission files.

Reproduces airsplay/lxmert `src/tasks/{vqa,gqa,nlvr2}.py` (lxmert.md §5-6): the task's head on the encoder's pooled
output (what differs per task — head, answer-head surgery, targets, loss, decoding, scores, submission format — is
the task object's, `lxm.train.tasks`); BertAdam with 10 % warm-up over `len(loader) * epochs`, clipping at 5.0; the
best epoch by the validation score is kept.

Initialisation (qa_answer_table.py `load_lxmert_qa`): the backbone must come complete from the checkpoint (anything
else is an error); the head comes from the task (`init_head`: VQA / GQA answer rows copied from the 9500-way
pretraining QA head by answer string, 3124/3129 and 1736/1842 with the original tables; the coverage is logged).
The original always built the model on `bert-base-uncased` first; here the checkpoint alone defines it.

Parameters no task head depends on (the vision half of the last cross layer) are frozen (`freeze_unused`): in the
original their `.grad` stays None, BertAdam skips them and they end at their initial values; frozen, the same holds
here, and DDP needs no dummy loss term to see every parameter.

Additions (the scaffold of `lxm.train.run`, shared with pretraining): DDP, gradient accumulation
(`micro_batch_size`), exact resume at epoch boundaries and, after SIGINT / SIGTERM, within an epoch (the logs rewound
to it, a damaged or checksum-mismatching last.pt named), a jsonl log and TensorBoard events, per-epoch metrics,
predictions in the official formats (written by `lxm.eval.formats`); for the custom-dataset tasks (qa, classify) a
`data["test"]` file is predicted by the best model after training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lxm import atomic
from lxm.errors import ConfigError
from lxm.infer.runs import evaluate, predict
from lxm.model import LxmertForFinetuning, load_pretrained, load_pretrained_with_report, preset, save_lxm
from lxm.model.weights import load_into
from lxm.train.config import FinetuneConfig, load_run_config
from lxm.train.finetune_data import FinetuneDataset, collate_finetune, steps_per_epoch
from lxm.train.report import epoch_seconds, unseen_labels_warning, validation_report
from lxm.train.run import (BEST_DIR, LAST, MODEL_DIR, PendingSteps, RunLogger, RunStopped, StopSignals,
                           build_optimizer, claim_run_folder, current_lr, latest_checkpoint, loader_workers,
                           micro_batch_size, open_run_folder, rank_rng_states, report_resume_changes, restore_newest,
                           save_state, start_process, stop_message, training_modules, training_state)
from lxm.train.step import MicroBatches, step_groups, train_step
from lxm.train.tasks import ANSWERS_FILE, FinetuneTask, task_class

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- model


def resolve_init(source: str) -> str:
    """An lxm pretraining/finetuning run directory -> its model directory; anything else is passed through."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.yaml").exists():
        load_run_config(path / "config.yaml")  # a damaged run config is named here (one line), not met later
        for name in (MODEL_DIR, BEST_DIR):
            if (path / name / "config.json").exists():
                return str(path / name)
        newest = latest_checkpoint(path)
        if newest is not None:
            return str(newest)
        raise FileNotFoundError(f"{path}: an lxm run without model/ or checkpoints/step-*.pt (did it start?)")
    return source


def unused_by_task_heads(model: LxmertForFinetuning) -> list[torch.nn.Module]:
    """The modules no finetuning head depends on: the answer and pair heads read only the pooled [CLS] state, so the
    vision half of the last cross layer (its self-attention and feed-forward; the cross-attention is shared with the
    language stream) feeds nothing. Without cross layers the whole vision stream does."""
    enc = model.lxmert.encoder
    if len(enc.x_layers) == 0:
        return [enc.visn_fc, enc.r_layers]
    last = enc.x_layers[-1]
    return [last.visn_self_att, last.visn_inter, last.visn_output]


def freeze_unused(model: LxmertForFinetuning) -> int:
    """Freeze `unused_by_task_heads` (requires_grad False); returns the number of parameters frozen.

    In the original these parameters keep `.grad` None, so BertAdam skips them (weight decay included) and they end
    at their initial values. A zero loss term would satisfy DDP's gradient reduction too, but gives them zero
    gradients that BertAdam then decays; frozen, DDP leaves them out of the reduction and both optimizers skip them.
    """
    frozen = 0
    for module in unused_by_task_heads(model):
        for p in module.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def build_task_model(cfg: FinetuneConfig, task: FinetuneTask, vocab_size: int, feat_dim: int, log=None
                     ) -> LxmertForFinetuning:
    """The task model, from scratch (cfg.from_scratch) or from cfg.init with the task's head initialisation; `log`
    receives the coverage reports (default: logged)."""
    log = log or _logger.info
    drop = {} if cfg.dropout is None else {"hidden_dropout_prob": cfg.dropout,
                                           "attention_probs_dropout_prob": cfg.dropout}
    if cfg.from_scratch:
        base = preset(cfg.model).replace(vocab_size=vocab_size, visual_feat_dim=feat_dim, **drop)
        log(f"from scratch: {cfg.model} preset, no pretrained weights")
        return LxmertForFinetuning(task.model_config(base))
    init = resolve_init(cfg.init)
    pre, report = load_pretrained_with_report(init)
    log(report.summary())
    if pre.config.vocab_size != vocab_size:
        raise ConfigError(f"{init}: word embeddings for {pre.config.vocab_size} pieces, but the vocabulary "
                          f"{cfg.vocab} has {vocab_size}")
    if pre.config.visual_feat_dim != feat_dim:
        raise ConfigError(f"{init}: visual features of {pre.config.visual_feat_dim} dims, but the feature stores "
                          f"hold {feat_dim}")
    model = LxmertForFinetuning(task.model_config(pre.config.replace(**drop)))
    sd = {k: v for k, v in pre.state_dict().items() if k.startswith("lxmert.")}
    sd.update(task.init_head(pre, init, cfg, log))
    load_into(model, sd, source=init, fmt="lxm", init_missing_heads=True)  # raises on any backbone gap
    return model


# ---------------------------------------------------------------------------------------------------- trainer


class Finetuner:
    def __init__(self, cfg: FinetuneConfig, out: str | os.PathLike, *, task: FinetuneTask | None = None,
                 resume: bool = False, overwrite: bool = False, dry_run: bool = False, log=None, on_record=None,
                 on_step=None):
        """Read and check everything the run needs (data, features, vocabulary, init weights, the checkpoint to
        resume from), then — unless `dry_run` — write OUT/config.yaml and answers.json: a failure before that leaves
        OUT as it was. The run folder is held (`RunLock`) from the start. `resume`: continue the run in OUT (its
        recipe: only `lxm.train.config.RESUMABLE_KEYS` may change, the schedule follows the new total);
        `overwrite`: replace lxm's files of the run in OUT (`check_run_folder`).
        `task` defaults to cfg.task's class with the corpus's answer table; `log` receives messages (default:
        logged); `on_record` every log record (after it is written); `on_step(step, epoch)` is called after every
        optimizer step in the main process (a progress bar: log records come only every `log_every` steps)."""
        self.cfg, self.out, self.log = cfg, Path(out), log or _logger.info
        self.on_step = on_step
        self.dry_run, self.resumed_from = dry_run, None
        self.dist, self.device = start_process(cfg.runtime)
        self._lock, self.changes = claim_run_folder(cfg, self.out, self.dist, resume=resume, overwrite=overwrite,
                                                    dry_run=dry_run)
        try:
            self._setup(cfg, task, resume, overwrite, on_record)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (the end of `run`, or a failed start)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _setup(self, cfg: FinetuneConfig, task: FinetuneTask | None, resume: bool, overwrite: bool,
               on_record) -> None:
        self.task = task or task_class(cfg.task).from_config(cfg)
        self.logger = RunLogger(self.out, self.dist.is_main, on_record)
        self.pending = PendingSteps(self.logger, self.dist)  # step values, read at log steps and epoch ends
        self.train_set = FinetuneDataset(self.task, cfg.corpus, cfg.train_splits, cfg.features, cfg.vocab,
                                         max_length=cfg.max_length)
        self.train_set.require_labels("training", "a test split? train on labelled splits")
        self.valid_set = None
        if cfg.valid_split is not None:
            self.valid_set = FinetuneDataset(self.task, cfg.corpus, [cfg.valid_split], cfg.features, cfg.vocab,
                                             max_length=cfg.max_length)
            self.valid_set.require_labels(
                "validation", "--valid takes a labelled file; predict an unlabelled one with --test"
                if self.task.reads_files else "--set valid_split=SPLIT names a labelled split, or none")
            unseen = self.task.unseen_labels(self.valid_set.targets)
            if unseen and self.dist.is_main:  # logged: lxm prints warnings; a notebook's logging shows them
                _logger.warning("%s: %s", self.task.split_source(cfg.corpus, cfg.valid_split),
                                unseen_labels_warning(unseen, len(self.valid_set), phrase=self.task.unseen_phrase))
        self.test_set = None  # read now: a bad test file must fail before training, not after it
        if "test" in cfg.data:
            self.test_set = FinetuneDataset(self.task, cfg.corpus, ["test"], cfg.features, cfg.vocab,
                                            max_length=cfg.max_length)
        self.log(f"{cfg.task}: {len(self.train_set)} training examples ({'+'.join(cfg.train_splits)}; "
                 f"{self.train_set.dropped} without features dropped)"
                 + (f", {len(self.valid_set)} validation ({cfg.valid_split})" if self.valid_set else ""))
        self.steps_per_epoch, plan = steps_per_epoch(len(self.train_set), cfg.optim.batch_size)
        self.log(plan)
        feat_dim = self.train_set.stores[0].feature_dim
        self.model = build_task_model(cfg, self.task, self.train_set.tokenizer.vocab_size, feat_dim,
                                      log=self.log if self.dist.is_main else (lambda *_: None))
        frozen = freeze_unused(self.model)
        if self.dist.is_main:
            self.log(f"{frozen} parameters that no task head depends on (the last cross layer's vision branch) keep "
                     f"their initial values, as in the original")
        self.model.to(self.device)
        self.replica, self.step_model = training_modules(self.model, cfg.runtime, self.dist, self.device)
        self.workers = loader_workers(cfg.runtime.num_workers, self.device)
        self.micro = micro_batch_size(cfg.optim.batch_size, cfg.optim.micro_batch_size, self.dist)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, self.steps_per_epoch)
        self.epoch, self.step, self.best, self.best_epoch = 0, 0, -1.0, -1
        self.position = 0  # optimizer steps done in the current epoch (a run stopped by a signal resumes there)
        if resume:
            self._resume()
            if self.replica is not None:
                self.replica.sync()
        if self.dry_run:
            return
        # every input read and checked: from here on OUT is written
        if self.dist.is_main:
            open_run_folder(cfg, self.out, overwrite=overwrite)
            if self.task.answer_table:
                atomic.write_text(self.out / ANSWERS_FILE, json.dumps(self.task.answers) + "\n")
        if resume:  # a crash after the last epoch's logs but before last.pt must not log that epoch twice
            self.logger.resume_at(self.step, self.epoch)
        report_resume_changes(self.changes, self.steps_per_epoch * cfg.optim.epochs, self.step, self.epoch, self.log,
                              self.logger)

    def plan(self) -> dict[str, Any]:
        """What the run would do (`lxm finetune --dry-run`): data, steps, optimisation, device, head, init, start."""
        cfg = self.cfg
        labels = self.task.answers
        return {"task": cfg.task, "out": str(self.out), "train_examples": len(self.train_set),
                "train_without_features": self.train_set.dropped,
                "valid_examples": len(self.valid_set) if self.valid_set is not None else 0,
                "valid_split": cfg.valid_split,
                "test_examples": len(self.test_set) if self.test_set is not None else 0,
                "steps_per_epoch": self.steps_per_epoch, "epochs": cfg.optim.epochs,
                "total_steps": self.steps_per_epoch * cfg.optim.epochs, "batch_size": cfg.optim.batch_size,
                "micro_batch_size": self.micro, "lr": cfg.optim.lr, "warmup": cfg.optim.warmup,
                "optimizer": cfg.optim.optimizer,
                "precision": cfg.runtime.precision, "device": str(self.device), "processes": self.dist.world_size,
                "init": f"from scratch ({cfg.model} preset)" if cfg.from_scratch else cfg.init,
                "vocab": cfg.vocab, "answers": len(labels), "first_answers": list(labels[:10]),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "start": ({"from": str(self.resumed_from), "epoch": self.epoch, "step": self.step}
                          if self.resumed_from else {"from": "fresh", "epoch": 0, "step": 0}),
                "changes_on_resume": {k: list(v) for k, v in self.changes.items()}}

    def _state(self, rank_rngs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return training_state(self.model, self.optimizer, self.scheduler, rank_rngs, epoch=self.epoch, step=self.step,
                              position=self.position, best=self.best, best_epoch=self.best_epoch)

    def _resume(self) -> None:
        path = self.out / LAST
        if not path.exists():
            self.log(f"{self.out}: nothing to resume from; starting fresh")
            return
        # one checkpoint only: a damaged (or checksum-mismatching) last.pt is an error naming it, never a silent
        # fresh start
        _, state = restore_newest([path], self.model, self.optimizer, self.scheduler, info=self.dist)
        self.epoch, self.step, self.best, self.best_epoch = (state["epoch"], state["step"], state["best"],
                                                              state["best_epoch"])
        self.position = state.get("position", 0)  # last.pt of an older lxm: epoch boundaries only
        self.resumed_from = path
        within = f", {self.position} step(s) into epoch {self.epoch}" if self.position else ""
        self.log(f"resumed from {path}: {self.epoch} epoch(s) done{within}, best {self.best} "
                 f"(epoch {self.best_epoch})")

    def _loss_fn(self, model, batch) -> dict[str, torch.Tensor]:
        # the parameters no head reads are frozen (freeze_unused): DDP-safe without a dummy loss term
        losses, _ = self.task.training_forward(model, batch.to(self.device, non_blocking=True))
        return losses

    def validate(self) -> tuple[dict[str, float], dict]:
        if self.valid_set is None:
            return {}, {}
        preds = predict(self.task, self.model, self.valid_set, batch_size=self.cfg.eval_batch_size,
                        device=self.device, precision=self.cfg.runtime.precision, num_workers=self.workers)
        self.model.train()
        return (evaluate(self.task, self.valid_set, preds) if self.valid_set.labelled else {}), preds

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs (or to a SIGINT / SIGTERM: last.pt at that step, then RunStopped), predict the
        test file; releases the run folder."""
        if self.dry_run:
            raise RuntimeError("Finetuner(dry_run=True) only plans; build it without dry_run to train")
        try:
            with StopSignals(self.dist, self.device, self.cfg.runtime.log_every) as stop:
                return self._train(stop)
        finally:
            self.close()

    def _train(self, stop: StopSignals) -> dict[str, Any]:
        cfg, key = self.cfg, self.task.metric_names[0]
        self.model.train()
        if self.replica is not None:
            self.replica.train()
        best_preds = None  # the best epoch's validation predictions, for the report
        while self.epoch < cfg.optim.epochs:
            epoch_start = time.perf_counter()
            sampler = MicroBatches(len(self.train_set), cfg.optim.batch_size, self.micro, self.epoch, cfg.runtime.seed,
                                   self.dist, start=self.position)
            loader = DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate_finetune,
                                num_workers=self.workers, generator=torch.Generator().manual_seed(cfg.runtime.seed),
                                pin_memory=self.device.type == "cuda")
            t0 = time.perf_counter()
            for group in step_groups(loader, sampler.per_step):
                values = train_step(self.step_model, group, self._loss_fn, self.optimizer, self.scheduler,
                                  clip_grad_norm=cfg.optim.clip_grad_norm, precision=cfg.runtime.precision,
                                  device_type=self.device.type, replica=self.replica)
                self.pending.add(self.step, values, ids=[str(i) for b in group for i in b.ids])
                self.step += 1
                self.position += 1
                if self.on_step is not None and self.dist.is_main:
                    self.on_step(self.step, self.epoch)
                if self.step % cfg.runtime.log_every == 0:
                    last = self.pending.settle()  # the global batch's losses, not this process's share
                    dt = time.perf_counter() - t0
                    self.logger.log({"step": self.step, "epoch": self.epoch,
                                     "lr": current_lr(self.optimizer, self.scheduler),
                                     "samples_per_s": cfg.optim.batch_size * cfg.runtime.log_every / max(dt, 1e-9),
                                     **{k: round(v, 6) for k, v in last.items()}})
                    t0 = time.perf_counter()
                if (signum := stop.requested(self.step)) is not None:
                    self.pending.settle()  # no checkpoint of a step the non-finite guard has not seen
                    rank_rngs = rank_rng_states(self.dist)  # every rank takes part; rank 0 writes
                    if self.dist.is_main:
                        save_state(self.out / LAST, self._state(rank_rngs))
                    raise RunStopped(stop_message(
                        signum, f"at step {self.step} (epoch {self.epoch}, step {self.position} of "
                                f"{self.steps_per_epoch})", self.out / LAST,
                        f"lxm finetune {cfg.task} --out {self.out} --resume"), signum)
            self.pending.settle()  # the epoch's last steps, checked before its model is scored and saved
            metrics, preds = self.validate()
            self.epoch, self.position = self.epoch + 1, 0
            rank_rngs = rank_rng_states(self.dist)  # every rank takes part; rank 0 writes last.pt below
            if self.dist.is_main:
                self.logger.metrics({"epoch": self.epoch - 1, "step": self.step, "valid_split": cfg.valid_split,
                                     **metrics})
                self.logger.log({"step": self.step, "epoch": self.epoch - 1, "valid": metrics,
                                 "epoch_seconds": round(time.perf_counter() - epoch_start, 3)})
                # without a labelled validation split the last epoch is kept as best/
                improved = key not in metrics or metrics[key] > self.best or self.best_epoch < 0
                if improved:
                    self.best, self.best_epoch = metrics.get(key, -1.0), self.epoch - 1
                    save_lxm(self.model, self.out / BEST_DIR)
                    best_preds = preds
                    if preds:
                        self.task.write_predictions(preds, self.out / "predictions" / self.task.prediction_file_name(
                            cfg.valid_split))
                save_state(self.out / LAST, self._state(rank_rngs))  # after best/: a crash never loses the best model
            if self.epoch < cfg.optim.epochs and (signum := stop.requested()) is not None:  # e.g. during validation
                raise RunStopped(stop_message(signum, f"after epoch {self.epoch - 1} (step {self.step})",
                                              self.out / LAST, f"lxm finetune {cfg.task} --out {self.out} --resume"),
                                 signum)
        summary = {"task": cfg.task, "epochs": self.epoch, "steps": self.step, "best_epoch": self.best_epoch,
                   "best": self.best if self.valid_set is not None else None,  # None: nothing was scored
                   "valid_split": cfg.valid_split}
        if self.dist.is_main:
            summary["epoch_seconds"] = epoch_seconds(self.out / "log.jsonl")
            if self.valid_set is not None and self.best_epoch >= 0:
                if not best_preds:  # the best epoch ran before a resume: its model predicts again
                    best_preds = predict(self.task, load_pretrained(self.out / BEST_DIR).to(self.device),
                                         self.valid_set, batch_size=cfg.eval_batch_size, device=self.device,
                                         precision=cfg.runtime.precision, num_workers=self.workers)
                summary["report"] = validation_report(self.task, self.valid_set.ids, self.valid_set.targets,
                                                      best_preds, self.train_set.targets, self.valid_set.info)
        if self.dist.is_main and self.test_set is not None:
            summary["test_predictions"] = str(self.predict_test())
        if self.dist.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def predict_test(self) -> Path:
        """Write the best model's predictions of the test set (labels optional) to OUT/predictions/."""
        model = load_pretrained(self.out / BEST_DIR).to(self.device)
        preds = predict(self.task, model, self.test_set, batch_size=self.cfg.eval_batch_size, device=self.device,
                        precision=self.cfg.runtime.precision, num_workers=self.workers)
        path = self.task.write_predictions(preds, self.out / "predictions" / self.task.prediction_file_name("test"))
        self.log(f"test: predictions of {len(self.test_set)} examples by the best model ({self.test_set.dropped} "
                 f"without features dropped) in {path}")
        return path


