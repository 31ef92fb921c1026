"""`lxm pretrain`: LXMERT pretraining with the five objectives, resumable and torchrun-ready.

Reproduces the loop of airsplay/lxmert `src/pretrain/lxmert_pretrain.py` (`LXMERT.train`): per step the summed losses
of MLM, matching, object / attribute / feature prediction and QA (lxm.model.losses), BertAdam with 5 % warm-up over
`len(loader) * epochs`, clipping at 1.0, validation loss on minival each epoch, per-epoch and best checkpoints.
Additions the original lacked: gradient accumulation, DistributedDataParallel, exact resume (model, optimizer,
scheduler, RNG, data position; a damaged newest checkpoint is set aside with a warning and the next older one used,
the logs are rewound so that redone steps appear once), step checkpoints written atomically and fsynced, a jsonl log
of every loss term, NaN guard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lxm.atomic import atomic_path
from lxm.errors import ConfigError
from lxm.model import LxmertForPreTraining, load_pretrained_with_report, preset, pretraining_step_losses, save_lxm
from lxm.train.config import PretrainConfig
from lxm.train.data import PretrainDataset, collate, corpus_file, read_answer_table
from lxm.train.precision import autocast
from lxm.train.run import (CKPT_DIR, MODEL_DIR, RunLogger, build_optimizer, current_lr, mean_across_ranks,
                           micro_batch_size, restore_newest, save_state, start_run, step_checkpoints, training_state,
                           loader_workers, training_modules)
from lxm.train.step import MicroBatches, step_groups, train_step

_logger = logging.getLogger(__name__)


def _answers(cfg: PretrainConfig) -> list[str]:
    return read_answer_table(cfg.answers or corpus_file(cfg.corpus, "vocab/qa_answers.json"))


def detector_label_counts(stores) -> tuple[int, int] | None:
    """(object classes, attribute classes) of the detector that wrote the stores, from their manifests; None for
    stores without that record (converted TSVs: the BUTD detector's 1600 / 400)."""
    counts = set()
    for store in stores:
        det = (store.manifest.get("extractor") or {}).get("detector") or {}
        if "num_classes" in det and "num_attrs" in det:
            counts.add((int(det["num_classes"]), int(det["num_attrs"])))
    if len(counts) > 1:
        raise ConfigError(f"feature stores come from detectors with different label sets: {sorted(counts)}")
    return counts.pop() if counts else None


def build_model(cfg: PretrainConfig, vocab_size: int, feat_dim: int, num_answers: int,
                label_counts: tuple[int, int] | None = None, log=None) -> LxmertForPreTraining:
    """The model of `cfg.model`: a preset built fresh, or a checkpoint loaded (its coverage report goes to `log`)."""
    if Path(cfg.model).exists() or "/" in cfg.model:
        model, report = load_pretrained_with_report(cfg.model)
        (log or _logger.info)(report.summary())
        if model.config.num_qa_labels != num_answers:
            raise ConfigError(f"{cfg.model}: answer head has {model.config.num_qa_labels} answers, the answer table "
                              f"{num_answers}")
        if label_counts and label_counts != (model.config.num_object_labels, model.config.num_attr_labels):
            raise ConfigError(f"{cfg.model}: object/attribute heads of {model.config.num_object_labels}/"
                              f"{model.config.num_attr_labels} classes, the features' detector has {label_counts}")
        return model
    labels = {} if label_counts is None else dict(num_object_labels=label_counts[0], num_attr_labels=label_counts[1])
    model_cfg = preset(cfg.model).replace(vocab_size=vocab_size, visual_feat_dim=feat_dim, num_qa_labels=num_answers,
                                          **labels)
    if cfg.dropout is not None:
        model_cfg = model_cfg.replace(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    return LxmertForPreTraining(model_cfg)


class Pretrainer:
    def __init__(self, cfg: PretrainConfig, out: str | os.PathLike, *, resume: bool = False, log=None,
                 on_record=None):
        """`log` receives messages (default: logged); `on_record` every log record (after it is written), e.g. for a
        progress bar."""
        self.cfg, self.out, self.log, self.on_record = cfg, Path(out), log or _logger.info, on_record
        self.dist, self.device = start_run(cfg, self.out, CKPT_DIR)
        answers = _answers(cfg)
        common = dict(word_mask_rate=cfg.word_mask_rate, obj_mask_rate=cfg.obj_mask_rate, max_length=cfg.max_length,
                      sources=cfg.sources)
        self.train_set = PretrainDataset(cfg.corpus, cfg.features, cfg.vocab, answers, splits=cfg.train_splits,
                                         seed=cfg.seed, **common)
        self.valid_set = None
        if cfg.valid_split is not None:
            try:
                self.valid_set = PretrainDataset(cfg.corpus, cfg.features, cfg.vocab, answers,
                                                 splits=[cfg.valid_split], seed=cfg.seed + 1, **common)
            except ValueError:
                self.log(f"no {cfg.valid_split} sentences with features: validation skipped")
        feat_dim = self.train_set.stores[0].feature_dim
        main_log = self.log if self.dist.is_main else (lambda *_: None)  # reports once, not once per process
        self.model = build_model(cfg, self.train_set.tokenizer.vocab_size, feat_dim, len(answers),
                                 detector_label_counts(self.train_set.stores), log=main_log)
        if cfg.init_bert and not resume:
            from lxm.model.weights import init_from_bert

            main_log(init_from_bert(self.model, cfg.init_bert).summary())
        self.model = self.model.to(self.device)
        self.replica, self.step_model = training_modules(self.model, cfg, self.dist, self.device)
        self.workers = loader_workers(cfg.num_workers, self.device)
        self.micro = micro_batch_size(cfg.batch_size, cfg.micro_batch_size, self.dist)
        self.steps_per_epoch = len(self.train_set) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.train_set)} training sentences are fewer than one batch of {cfg.batch_size}")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, self.steps_per_epoch)
        self.loss_cfg = cfg.losses
        self.step, self.epoch, self.position, self.best = 0, 0, 0, float("inf")
        self.logger = RunLogger(self.out, self.dist.is_main, on_record)
        if resume:
            self._resume()
            if self.replica is not None:
                self.replica.sync()

    # ---- checkpoints
    def _state(self) -> dict[str, Any]:
        return training_state(self.model, self.optimizer, self.scheduler, step=self.step, epoch=self.epoch,
                              position=self.position, best=self.best,
                              config=json.loads(json.dumps(dataclasses.asdict(self.cfg))))

    def _resume(self) -> None:
        candidates = step_checkpoints(self.out)
        if not candidates:
            self.log(f"{self.out}: no checkpoint to resume from; starting fresh")
        else:  # a damaged newest checkpoint is set aside (named in a warning), the next older one is used
            path, state = restore_newest(candidates, self.model, self.optimizer, self.scheduler,
                                         set_aside=self.dist.is_main)
            self.step, self.epoch = state["step"], state["epoch"]
            self.position, self.best = state["position"], state["best"]
            self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.position})")
        self.logger.resume_at(self.step, self.epoch)  # the steps redone from here must not appear twice in the logs

    def _checkpoint(self, name: str) -> None:
        if not self.dist.is_main:
            return
        save_state(self.out / CKPT_DIR / name, self._state())
        for kind in ("step", "epoch"):  # keep the last K of each (best.pt is a separate copy)
            found = sorted((self.out / CKPT_DIR).glob(f"{kind}-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
            for old in found[: -self.cfg.keep_last]:
                old.unlink()

    # ---- loop
    def _loss_fn(self, model, batch) -> dict[str, torch.Tensor]:
        batch = batch.to(self.device, non_blocking=True)
        losses, _ = pretraining_step_losses(model, batch.labels, self.loss_cfg, **batch.model_inputs())
        if self.epoch < self.cfg.qa_start_epoch and "qa" in losses:
            losses["qa"] = losses["qa"] * 0.0  # kept in the graph (DDP), contributes nothing: the paper's stage 1
        return losses

    def validate(self) -> dict[str, float]:
        if self.valid_set is None:
            return {}
        self.model.eval()
        loader = DataLoader(self.valid_set, batch_size=self.micro, collate_fn=collate,
                            num_workers=self.workers, generator=torch.Generator().manual_seed(self.cfg.seed),
                            pin_memory=self.device.type == "cuda")
        sums: dict[str, float] = {}
        hits: dict[str, list[int]] = {}  # per QA source: [correct, labelled]
        n = 0
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(self.device)
                with autocast(self.cfg.precision, self.device.type):
                    losses, out = pretraining_step_losses(self.model, batch.labels, self.loss_cfg,
                                                          **batch.model_inputs())
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(batch.uids)
                n += len(batch.uids)
                if out.answer_logits is not None:
                    pred = out.answer_logits.argmax(-1).tolist()
                    for src, p, a in zip(batch.sources, pred, batch.labels.answers.tolist()):
                        if a >= 0:
                            h = hits.setdefault(src, [0, 0])
                            h[0] += int(p == a)
                            h[1] += 1
        self.model.train()
        result = {k: v / n for k, v in sums.items()}
        result["loss"] = sum(result.values())
        for src, (ok, total) in sorted(hits.items()):
            result[f"qa_acc_{src}"] = ok / total  # the original printed QA accuracy per dataset each epoch
        return result

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        if self.replica is not None:
            self.replica.train()
        last: dict[str, float] = {}
        while self.step < self.total_steps and self.epoch < cfg.epochs:
            self.train_set.set_epoch(self.epoch)
            sampler = MicroBatches(len(self.train_set), cfg.batch_size, self.micro, self.epoch, cfg.seed, self.dist,
                                   start=self.position)
            # Own generator: creating the iterator must not draw from the global RNG (dropout), or a resumed run
            # would diverge from the uninterrupted one.
            # pinned host memory lets `non_blocking` copies to the GPU overlap the step
            loader = DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate,
                                num_workers=self.workers, generator=torch.Generator().manual_seed(cfg.seed),
                                pin_memory=self.device.type == "cuda")
            t0 = time.perf_counter()
            for group in step_groups(loader, sampler.per_step):
                last = train_step(self.step_model, group, self._loss_fn, self.optimizer, self.scheduler,
                                  clip_grad_norm=cfg.clip_grad_norm, precision=cfg.precision,
                                  device_type=self.device.type, replica=self.replica)
                last = mean_across_ranks(last, self.dist)  # the global batch's losses, not this process's share
                self.logger.check_finite(last, self.step, uids=[u for b in group for u in b.uids])
                self.step += 1
                self.position += 1
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    dt = time.perf_counter() - t0
                    self.logger.log({"step": self.step, "epoch": self.epoch,
                                     "lr": current_lr(self.optimizer, self.scheduler),
                               "samples_per_s": cfg.batch_size * cfg.log_every / max(dt, 1e-9),
                               **{k: round(v, 6) for k, v in last.items()}})
                    t0 = time.perf_counter()
                if self.step % cfg.checkpoint_every == 0:
                    self._checkpoint(f"step-{self.step}.pt")
                if self.step >= self.total_steps:
                    break
            if self.position >= self.steps_per_epoch:  # epoch finished
                valid = self.validate()
                if valid:
                    self.logger.log({"step": self.step, "epoch": self.epoch, "valid": valid})
                self.epoch, self.position = self.epoch + 1, 0
                self._checkpoint(f"epoch-{self.epoch - 1:02d}.pt")
                if valid and valid["loss"] < self.best and self.dist.is_main:
                    self.best = valid["loss"]
                    with atomic_path(self.out / CKPT_DIR / "best.pt") as tmp:  # a killed copy leaves no half file
                        shutil.copyfile(self.out / CKPT_DIR / f"epoch-{self.epoch - 1:02d}.pt", tmp)
        self._checkpoint(f"step-{self.step}.pt")
        if self.dist.is_main:  # the final weights as an lxm model directory: what `lxm finetune --init RUN` reads
            save_lxm(self.model, self.out / MODEL_DIR)
        return {"step": self.step, "epoch": self.epoch, "last": last}
