"""`lxm pretrain`: LXMERT pretraining with the five objectives, resumable and torchrun-ready.

Reproduces the loop of airsplay/lxmert `src/pretrain/lxmert_pretrain.py` (`LXMERT.train`): per step the summed losses
of MLM, matching, object / attribute / feature prediction and QA (lxm.model.losses), BertAdam with 5 % warm-up over
`len(loader) * epochs`, clipping at 1.0, validation loss on minival each epoch, per-epoch and best checkpoints.
Additions the original lacked: gradient accumulation, DistributedDataParallel, exact resume from the newest step or
epoch checkpoint (model, optimizer, scheduler, RNG, data position; a damaged or checksum-mismatching newest checkpoint
is set aside with a warning and the next older one used, the logs are rewound so that redone steps appear once;
`--set epochs=N` on resume stretches the schedule), step checkpoints written atomically, fsynced and checksummed, a
step checkpoint on SIGINT / SIGTERM, a jsonl log of every loss term, NaN guard, `--dry-run` (`Pretrainer.plan`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lxm.errors import ConfigError
from lxm.features import stores_backbone
from lxm.model import LOSS_NAMES, LxmertForPreTraining, load_pretrained_with_report, preset, pretraining_step_losses, save_lxm
from lxm.train.config import PretrainConfig
from lxm.corpus.layout import answers_name, corpus_file, read_answer_table
from lxm.train.data import PretrainDataset, collate
from lxm.train.precision import autocast
from lxm.train.run import (CKPT_DIR, MODEL_DIR, PendingSteps, RunLogger, RunStopped, StopSignals, build_optimizer,
                           claim_run_folder, copy_checkpoint, current_lr, loader_workers, micro_batch_size,
                           open_run_folder, rank_rng_states, remove_checkpoint, report_resume_changes, restore_newest,
                           save_state, start_process, stop_message, training_modules, training_state)
from lxm.train.step import MicroBatches, step_groups, train_step

_logger = logging.getLogger(__name__)

LABEL_LOSSES = ("obj", "attr")  # the objectives that read the detector's object / attribute labels


def _answers(cfg: PretrainConfig) -> list[str]:
    return read_answer_table(cfg.answers or corpus_file(cfg.corpus, answers_name("qa")))


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


def resolve_objectives(cfg: PretrainConfig, stores) -> PretrainConfig:
    """`cfg` with its objectives set: unset (None) means all six where the stores' backbone has object/attribute
    labels (the VG detector's regions), and all but "obj" and "attr" where it has none (grid cells, timm patches:
    feature regression, masked LM, matching and QA stay). Asking for a label loss on a store without labels, or
    reading stores of different backbones together, is a ConfigError naming the store(s)."""
    try:
        backbone = stores_backbone(stores)
    except ValueError as exc:
        raise ConfigError(f"config: 'features': {exc}") from None
    if cfg.objectives is None:
        allowed = [o for o in LOSS_NAMES if backbone.labels or o not in LABEL_LOSSES]
        return dataclasses.replace(cfg, objectives=allowed)
    asked = [o for o in cfg.objectives if o in LABEL_LOSSES]
    if asked and not backbone.labels:
        raise ConfigError(f"config: 'objectives' asks for {' and '.join(asked)} but {stores[0].root} holds "
                          f"{backbone.summary()}: drop them (the default leaves them out for such stores)")
    return cfg


def objective_heads(objectives: list[str]) -> dict[str, bool]:
    """The model-config head switches (`LxmertConfig.task_*`, `visual_*_loss`) that the pretraining `objectives`
    need: the original builds only the heads of its --task* flags and --visualLosses (`LXRTPretraining.__init__`)."""
    on = set(objectives)
    return dict(task_mask_lm="mlm" in on, task_matched="match" in on, task_obj_predict=bool(on & {"obj", "attr", "feat"}),
                visual_obj_loss="obj" in on, visual_attr_loss="attr" in on, visual_feat_loss="feat" in on,
                task_qa="qa" in on)


def build_model(cfg: PretrainConfig, vocab_size: int, feat_dim: int, num_answers: int,
                label_counts: tuple[int, int] | None = None, log=None) -> LxmertForPreTraining:
    """The model of `cfg.model`: a preset built fresh, or a checkpoint loaded (its coverage report goes to `log`)."""
    if Path(cfg.model).exists() or "/" in cfg.model:
        model, report = load_pretrained_with_report(cfg.model)
        (log or _logger.info)(report.summary())
        heads = objective_heads(cfg.objectives)
        differ = sorted(k for k, on in heads.items() if getattr(model.config, k) != on)
        if differ:  # a head without its loss would get no gradient (DDP refuses), a loss without its head no logits
            raise ConfigError(f"{cfg.model}: its heads ({', '.join(f'{k}={getattr(model.config, k)}' for k in differ)})"
                              f" do not match 'objectives' {cfg.objectives}")
        if model.config.num_qa_labels != num_answers:
            raise ConfigError(f"{cfg.model}: answer head has {model.config.num_qa_labels} answers, the answer table "
                              f"{num_answers}")
        if label_counts and label_counts != (model.config.num_object_labels, model.config.num_attr_labels):
            raise ConfigError(f"{cfg.model}: object/attribute heads of {model.config.num_object_labels}/"
                              f"{model.config.num_attr_labels} classes, the features' detector has {label_counts}")
        return model
    labels = {} if label_counts is None else dict(num_object_labels=label_counts[0], num_attr_labels=label_counts[1])
    model_cfg = preset(cfg.model).replace(vocab_size=vocab_size, visual_feat_dim=feat_dim, num_qa_labels=num_answers,
                                          **labels, **objective_heads(cfg.objectives))
    if cfg.dropout is not None:
        model_cfg = model_cfg.replace(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    return LxmertForPreTraining(model_cfg)


_CKPT_NAME = re.compile(r"^(step|epoch)-(\d+)\.pt$")


def resume_candidates(out: Path, steps_per_epoch: int) -> list[Path]:
    """The checkpoints a run can resume from, newest first: OUT/checkpoints/step-N.pt (after N steps) and
    epoch-E.pt (after epoch E, i.e. (E + 1) * steps_per_epoch steps; a run killed before its first step checkpoint
    resumes from there); at equal steps the step checkpoint first."""
    found = []
    for path in (out / CKPT_DIR).glob("*.pt"):
        m = _CKPT_NAME.match(path.name)
        if m is not None:
            n = int(m.group(2))
            found.append(((n, 1) if m.group(1) == "step" else ((n + 1) * steps_per_epoch, 0), path.name, path))
    return [path for *_, path in sorted(found, reverse=True)]


class Pretrainer:
    def __init__(self, cfg: PretrainConfig, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 dry_run: bool = False, log=None, on_record=None, on_step=None):
        """Read and check everything the run needs (data, vocabulary, model, the checkpoint to resume from), then —
        unless `dry_run` — write OUT/config.yaml: a failure before that leaves OUT as it was. The run folder is held
        (`RunLock`) from the start. `resume`: continue the run in OUT (its recipe: only
        `lxm.train.config.RESUMABLE_KEYS` may change, the schedule follows the new total); `overwrite`: replace lxm's
        files of the run in OUT (`check_run_folder`).
        `log` receives messages (default: logged); `on_record` every log record (after it is written);
        `on_step(step, epoch)` is called after every optimizer step in the main process (a progress bar: log records
        come only every `log_every` steps)."""
        self.cfg, self.out, self.log, self.on_record = cfg, Path(out), log or _logger.info, on_record
        self.on_step = on_step
        self.dry_run = dry_run
        self.resumed_from: Path | None = None
        self.dist, self.device = start_process(cfg.runtime)
        self._lock, self.changes = claim_run_folder(cfg, self.out, self.dist, resume=resume, overwrite=overwrite,
                                                    dry_run=dry_run)
        try:
            self._setup(cfg, resume, overwrite)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (the end of `run`, or a failed start)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _setup(self, cfg: PretrainConfig, resume: bool, overwrite: bool) -> None:
        has_checkpoint = resume and any(_CKPT_NAME.match(p.name) for p in (self.out / CKPT_DIR).glob("*.pt"))
        answers = _answers(cfg)
        common = dict(word_mask_rate=cfg.word_mask_rate, obj_mask_rate=cfg.obj_mask_rate, max_length=cfg.max_length,
                      sources=cfg.sources, negatives=cfg.objectives is None or "match" in cfg.objectives)
        self.train_set = PretrainDataset(cfg.corpus, cfg.features, cfg.vocab, answers, splits=cfg.train_splits,
                                         seed=cfg.runtime.seed, **common)
        self.cfg = cfg = resolve_objectives(cfg, self.train_set.stores)  # written as resolved to config.yaml
        self.valid_set = None
        if cfg.valid_split is not None:
            try:
                self.valid_set = PretrainDataset(cfg.corpus, cfg.features, cfg.vocab, answers,
                                                 splits=[cfg.valid_split], seed=cfg.runtime.seed + 1, **common)
            except ValueError:
                self.log(f"no {cfg.valid_split} sentences with features: validation skipped")
        feat_dim = self.train_set.stores[0].feature_dim
        main_log = self.log if self.dist.is_main else (lambda *_: None)  # reports once, not once per process
        self.model = build_model(cfg, self.train_set.tokenizer.vocab_size, feat_dim, len(answers),
                                 detector_label_counts(self.train_set.stores), log=main_log)
        if cfg.init_bert and not has_checkpoint:
            from lxm.model.weights import init_from_bert

            # BERT-base has 12 layers, LXMERT's language encoder 9: the rest are left out, as the original's
            # from_pretrained("bert-base-uncased") leaves them
            main_log(init_from_bert(self.model, cfg.init_bert, extra_layers="ignore").summary())
        self.model = self.model.to(self.device)
        self.replica, self.step_model = training_modules(self.model, cfg.runtime, self.dist, self.device)
        self.workers = loader_workers(cfg.runtime.num_workers, self.device)
        self.micro = micro_batch_size(cfg.optim.batch_size, cfg.optim.micro_batch_size, self.dist)
        self.steps_per_epoch = len(self.train_set) // cfg.optim.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.train_set)} training sentences are fewer than one batch of "
                              f"{cfg.optim.batch_size}")
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, self.steps_per_epoch)
        self.loss_cfg = cfg.losses
        self.step, self.epoch, self.position, self.best = 0, 0, 0, float("inf")
        self.logger = RunLogger(self.out, self.dist.is_main, self.on_record)
        self.pending = PendingSteps(self.logger, self.dist)  # step values, read at log steps and checkpoints
        if resume:
            self._resume()
            if self.replica is not None:
                self.replica.sync()
        if self.dry_run:
            return
        # every input read and checked: from here on OUT is written
        if self.dist.is_main:
            open_run_folder(cfg, self.out, CKPT_DIR, overwrite=overwrite)
        if resume:
            self.logger.resume_at(self.step, self.epoch)  # the steps redone from here must not appear twice in the logs
        report_resume_changes(self.changes, self.steps_per_epoch * cfg.optim.epochs, self.step, self.epoch, self.log,
                              self.logger)

    def plan(self) -> dict[str, Any]:
        """What the run would do (`lxm pretrain --dry-run`): data, steps, optimisation, device, model, start point."""
        cfg = self.cfg
        return {"out": str(self.out), "sentences": len(self.train_set),
                "valid_sentences": len(self.valid_set) if self.valid_set is not None else 0,
                "steps_per_epoch": self.steps_per_epoch, "epochs": cfg.optim.epochs, "total_steps": self.total_steps,
                "batch_size": cfg.optim.batch_size, "micro_batch_size": self.micro, "lr": cfg.optim.lr,
                "warmup": cfg.optim.warmup,
                "optimizer": cfg.optim.optimizer, "precision": cfg.runtime.precision, "device": str(self.device),
                "processes": self.dist.world_size, "model": cfg.model,
                "init": f"BERT weights from {cfg.init_bert}" if cfg.init_bert else "random (from scratch)",
                "objectives": ", ".join(cfg.objectives),
                "qa_schedule": (f"from epoch {cfg.qa_start_epoch}, weight {cfg.qa_weight:g}" if "qa" in cfg.objectives
                                else "no QA"),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "answers": self.model.config.num_qa_labels,
                "start": ({"from": str(self.resumed_from), "step": self.step, "epoch": self.epoch}
                          if self.resumed_from else {"from": "fresh", "step": 0, "epoch": 0}),
                "changes_on_resume": {k: list(v) for k, v in self.changes.items()}}

    # ---- checkpoints
    def _state(self, rank_rngs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return training_state(self.model, self.optimizer, self.scheduler, rank_rngs, step=self.step, epoch=self.epoch,
                              position=self.position, best=self.best,
                              config=json.loads(json.dumps(dataclasses.asdict(self.cfg))))

    def _resume(self) -> None:
        candidates = resume_candidates(self.out, self.steps_per_epoch)
        if not candidates:
            self.log(f"{self.out}: no checkpoint to resume from; starting fresh")
            return
        # a damaged (or checksum-mismatching) newest checkpoint is set aside (named in a warning), the next older one
        # is used; a dry run only reads
        path, state = restore_newest(candidates, self.model, self.optimizer, self.scheduler,
                                     set_aside=self.dist.is_main and not self.dry_run, info=self.dist)
        self.step, self.epoch = state["step"], state["epoch"]
        self.position, self.best = state["position"], state["best"]
        self.resumed_from = path
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.position})")

    def _checkpoint(self, name: str) -> None:
        self.pending.settle()  # no checkpoint of a step the non-finite guard has not seen
        rank_rngs = rank_rng_states(self.dist)  # every rank takes part; rank 0 writes
        if not self.dist.is_main:
            return
        save_state(self.out / CKPT_DIR / name, self._state(rank_rngs))
        for kind in ("step", "epoch"):  # keep the last K of each (best.pt is a separate copy)
            found = sorted((p for p in (self.out / CKPT_DIR).glob(f"{kind}-*.pt") if _CKPT_NAME.match(p.name)),
                           key=lambda p: int(p.stem.split("-")[1]))
            for old in found[: -self.cfg.keep_last]:
                remove_checkpoint(old)

    # ---- loop
    def _loss_fn(self, model, batch) -> dict[str, torch.Tensor]:
        batch = batch.to(self.device, non_blocking=True)
        losses, _ = pretraining_step_losses(model, batch.labels, self.loss_cfg, **batch.model_inputs())
        if self.epoch < self.cfg.qa_start_epoch and "qa" in losses:
            losses["qa"] = losses["qa"] * 0.0  # kept in the graph (DDP), contributes nothing: the paper's stage 1
        elif self.cfg.qa_weight != 1.0 and "qa" in losses:
            losses["qa"] = losses["qa"] * self.cfg.qa_weight  # the paper's stage 2 counted QA twice
        return losses

    def validate(self) -> dict[str, float]:
        if self.valid_set is None:
            return {}
        self.model.eval()
        loader = DataLoader(self.valid_set, batch_size=self.micro, collate_fn=collate,
                            num_workers=self.workers, generator=torch.Generator().manual_seed(self.cfg.runtime.seed),
                            pin_memory=self.device.type == "cuda")
        sums: dict[str, float] = {}
        hits: dict[str, list[int]] = {}  # per QA source: [correct, labelled]
        n = 0
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(self.device)
                with autocast(self.cfg.runtime.precision, self.device.type):
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
        """Train to the end (or to a SIGINT / SIGTERM: a step checkpoint, then RunStopped); releases the run folder."""
        if self.dry_run:
            raise RuntimeError("Pretrainer(dry_run=True) only plans; build it without dry_run to train")
        try:
            with StopSignals(self.dist, self.device, self.cfg.runtime.log_every) as stop:
                return self._train(stop)
        finally:
            self.close()

    def _train(self, stop: StopSignals) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        if self.replica is not None:
            self.replica.train()
        last: dict[str, float] = {}
        while self.step < self.total_steps and self.epoch < cfg.optim.epochs:
            self.train_set.set_epoch(self.epoch)
            sampler = MicroBatches(len(self.train_set), cfg.optim.batch_size, self.micro, self.epoch, cfg.runtime.seed,
                                   self.dist, start=self.position)
            # Own generator: creating the iterator must not draw from the global RNG (dropout), or a resumed run
            # would diverge from the uninterrupted one.
            # pinned host memory lets `non_blocking` copies to the GPU overlap the step
            loader = DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate,
                                num_workers=self.workers, generator=torch.Generator().manual_seed(cfg.runtime.seed),
                                pin_memory=self.device.type == "cuda")
            t0 = time.perf_counter()
            for group in step_groups(loader, sampler.per_step):
                values = train_step(self.step_model, group, self._loss_fn, self.optimizer, self.scheduler,
                                  clip_grad_norm=cfg.optim.clip_grad_norm, precision=cfg.runtime.precision,
                                  device_type=self.device.type, replica=self.replica)
                self.pending.add(self.step, values, uids=[u for b in group for u in b.uids])
                self.step += 1
                self.position += 1
                if self.on_step is not None and self.dist.is_main:
                    self.on_step(self.step, self.epoch)
                if self.step % cfg.runtime.log_every == 0 or self.step == self.total_steps:
                    last = self.pending.settle()  # the global batch's losses, not this process's share
                    dt = time.perf_counter() - t0
                    self.logger.log({"step": self.step, "epoch": self.epoch,
                                     "lr": current_lr(self.optimizer, self.scheduler),
                               "samples_per_s": cfg.optim.batch_size * cfg.runtime.log_every / max(dt, 1e-9),
                               **{k: round(v, 6) for k, v in last.items()}})
                    t0 = time.perf_counter()
                if self.step % cfg.checkpoint_every == 0:
                    self._checkpoint(f"step-{self.step}.pt")
                if (signum := stop.requested(self.step)) is not None:
                    if self.step % cfg.checkpoint_every:
                        self._checkpoint(f"step-{self.step}.pt")
                    raise RunStopped(stop_message(
                        signum, f"at step {self.step} of {self.total_steps} (epoch {self.epoch}, batch "
                                f"{self.position} of {self.steps_per_epoch})",
                        self.out / CKPT_DIR / f"step-{self.step}.pt", f"lxm pretrain --out {self.out} --resume"),
                        signum)
                if self.step >= self.total_steps:
                    break
            if self.position >= self.steps_per_epoch:  # epoch finished
                self.pending.settle()  # the epoch's last steps, checked before its model is scored and saved
                valid = self.validate()
                if valid:
                    self.logger.log({"step": self.step, "epoch": self.epoch, "valid": valid})
                self.epoch, self.position = self.epoch + 1, 0
                self._checkpoint(f"epoch-{self.epoch - 1:02d}.pt")
                if valid and valid["loss"] < self.best and self.dist.is_main:
                    self.best = valid["loss"]
                    copy_checkpoint(self.out / CKPT_DIR / f"epoch-{self.epoch - 1:02d}.pt",
                                    self.out / CKPT_DIR / "best.pt")
                if self.epoch < cfg.optim.epochs and (signum := stop.requested()) is not None:  # e.g. during validation
                    raise RunStopped(stop_message(signum, f"after epoch {self.epoch - 1} (step {self.step})",
                                                  self.out / CKPT_DIR / f"epoch-{self.epoch - 1:02d}.pt",
                                                  f"lxm pretrain --out {self.out} --resume"), signum)
        self._checkpoint(f"step-{self.step}.pt")
        if self.dist.is_main:  # the final weights as an lxm model directory: what `lxm finetune --init RUN` reads
            save_lxm(self.model, self.out / MODEL_DIR)
        return {"step": self.step, "epoch": self.epoch, "last": last}
