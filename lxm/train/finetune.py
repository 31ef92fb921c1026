"""`lxm finetune {vqa,gqa,nlvr2}` and `lxm predict`: pretrained LXMERT -> task models (`LxmertForFinetuning`),
validation, submission files.

Reproduces airsplay/lxmert `src/tasks/{vqa,gqa,nlvr2}.py` and `*_model.py` (lxmert.md §5-6): the encoder's pooled
output feeds an answer head (768 -> 1536 -> GeLU -> LN -> A; BCE on soft scores x A) or, for NLVR2, the pair head on
the two pooled outputs of (img0, sentence), (img1, sentence) (CE); BertAdam with 10 % warm-up over
`len(loader) * epochs`, clipping at 5.0; the best epoch by the validation score is kept.

Initialisation (qa_answer_table.py `load_lxmert_qa`): the backbone must come complete from the checkpoint (anything
else is an error); VQA / GQA answer rows are copied from the 9500-way pretraining QA head by answer string after
`convert_ans`, rows not found are zero (3124/3129 and 1736/1842 with the original tables), and the coverage is
printed. The original always built the model on `bert-base-uncased` first; here the checkpoint alone defines it.

Parameters no task head depends on (the vision half of the last cross layer) are frozen (`freeze_unused`): in the
original their `.grad` stays None, BertAdam skips them and they end at their initial values; frozen, the same holds
here, and DDP needs no dummy loss term to see every parameter.

Additions: exact resume at epoch boundaries (the logs rewound to it, a damaged last.pt named), a jsonl log,
per-epoch metrics, predictions in the official formats (written by `lxm.eval.formats`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from lxm.corpus.answers import convert_ans
from lxm.errors import ConfigError
from lxm.eval import nlvr2_metrics, prediction_file_name, write_predictions
from lxm.model import (LxmertConfig, LxmertForFinetuning, LxmertForPreTraining, load_pretrained,
                       load_pretrained_with_report, pair_loss, preset, save_lxm, soft_answer_loss)
from lxm.model.weights import load_into
from lxm.train.config import FinetuneConfig
from lxm.train.data import corpus_file, read_answer_table
from lxm.train.finetune_data import FinetuneDataset, collate_finetune
from lxm.train.loop import (append_jsonl, autocast, mean_across_ranks, restore_newest, rewind_logs, start_run,
                            train_step, training_state)
from lxm.train.optim import make_optimizer
from lxm.train.pretrain import MicroBatches, save_state

_logger = logging.getLogger(__name__)

BEST_DIR = "best"  # lxm model directory of the best epoch (what `lxm predict` loads)
LAST = "last.pt"  # model + optimizer + epoch + RNG: what --resume reads


# ---------------------------------------------------------------------------------------------------- answer tables


def task_answers(cfg: FinetuneConfig) -> list[str]:
    if cfg.task == "nlvr2":
        return []
    return read_answer_table(corpus_file(cfg.corpus, f"vocab/{cfg.task}_answers.json"))


# ---------------------------------------------------------------------------------------------------- model


def task_config(base: LxmertConfig, task: str, num_answers: int) -> LxmertConfig:
    """The backbone of `base` with only the task's head: answer head (VQA/GQA) or NLVR2 pair head."""
    qa = task != "nlvr2"
    return base.replace(task_mask_lm=False, task_matched=False, task_obj_predict=False, task_qa=qa,
                        num_qa_labels=num_answers if qa else base.num_qa_labels, task_nlvr2=not qa)


def resolve_init(source: str) -> str:
    """An lxm pretraining/finetuning run directory -> its model directory; anything else is passed through."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.yaml").exists():
        for name in ("model", BEST_DIR):
            if (path / name / "config.json").exists():
                return str(path / name)
        steps = sorted((path / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        if steps:
            return str(steps[-1])
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


def _pretraining_answers(cfg: FinetuneConfig, init_path: str, rows: int) -> tuple[list[str], str] | None:
    """(answer strings of the init's QA head rows, their file): init_answers (must fit), else the first table of
    `rows` answers among the init run's own and the corpus's; None when none fits."""
    if cfg.init_answers:
        table = read_answer_table(cfg.init_answers)
        if len(table) != rows:
            raise ConfigError(f"init_answers {cfg.init_answers}: {len(table)} answers, but the QA head of {init_path} "
                              f"has {rows} rows")
        return table, cfg.init_answers
    candidates = []
    run = Path(init_path).parent if Path(init_path).name in ("model", BEST_DIR) else Path(init_path).parent.parent
    if (run / "config.yaml").exists():
        run_cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        if run_cfg.get("answers"):
            candidates.append(Path(run_cfg["answers"]))
        elif run_cfg.get("corpus"):
            candidates.append(Path(run_cfg["corpus"]) / "vocab" / "qa_answers.json")
    candidates.append(Path(cfg.corpus) / "vocab" / "qa_answers.json")
    for path in candidates:
        if path.exists():
            table = read_answer_table(path)
            if len(table) == rows:
                return table, str(path)
    return None


def build_task_model(cfg: FinetuneConfig, answers: list[str], vocab_size: int, feat_dim: int, log=None
                     ) -> LxmertForFinetuning:
    """The task model, from scratch (cfg.from_scratch) or from cfg.init with the answer-head surgery; `log` receives
    the coverage reports (default: logged)."""
    log = log or _logger.info
    drop = {} if cfg.dropout < 0 else dict(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    if cfg.from_scratch:
        base = preset(cfg.model).replace(vocab_size=vocab_size, visual_feat_dim=feat_dim, **drop)
        log(f"from scratch: {cfg.model} preset, no pretrained weights")
        return LxmertForFinetuning(task_config(base, cfg.task, len(answers)))
    init = resolve_init(cfg.init)
    pre, report = load_pretrained_with_report(init)
    log(report.summary())
    if pre.config.vocab_size != vocab_size:
        raise ConfigError(f"{init}: word embeddings for {pre.config.vocab_size} pieces, but the vocabulary "
                          f"{cfg.vocab} has {vocab_size}")
    if pre.config.visual_feat_dim != feat_dim:
        raise ConfigError(f"{init}: visual features of {pre.config.visual_feat_dim} dims, but the feature stores "
                          f"hold {feat_dim}")
    model = LxmertForFinetuning(task_config(pre.config.replace(**drop), cfg.task, len(answers)))
    src = pre.state_dict()
    sd = {k: v for k, v in src.items() if k.startswith("lxmert.")}
    if cfg.task == "nlvr2":
        if pre.nlvr2_head is not None:
            sd.update({k: v for k, v in src.items() if k.startswith("nlvr2_head.")})
            log("pair head: copied from the checkpoint")
        else:
            log("pair head: fresh init (the original --loadLXMERT loads the encoder only)")
    elif pre.answer_head is not None:
        sd.update(_answer_head_surgery(cfg, init, pre, answers, log))
    else:
        log(f"answer head: fresh init ({init} has no QA head)")
    load_into(model, sd, source=init, fmt="lxm", init_missing_heads=True)  # raises on any backbone gap
    return model


def _answer_head_surgery(cfg: FinetuneConfig, init: str, pre: LxmertForPreTraining, answers: list[str], log
                         ) -> dict[str, torch.Tensor]:
    head = {k: v for k, v in pre.state_dict().items() if k.startswith("answer_head.")}
    rows = pre.config.num_qa_labels
    w, b = head.pop("answer_head.logit_fc.3.weight"), head.pop("answer_head.logit_fc.3.bias")
    found = _pretraining_answers(cfg, init, rows)
    if found is None and rows == len(answers):  # no pretraining table of this size: a head finetuned on this task
        log(f"answer head: copied as is ({rows} answers: a finetuned {cfg.task} head)")
        return {**head, "answer_head.logit_fc.3.weight": w, "answer_head.logit_fc.3.bias": b}
    if found is None:
        raise ConfigError(f"{init}: its QA head has {rows} rows but no answer table of that size was found (the "
                          f"init run's, {Path(cfg.corpus) / 'vocab' / 'qa_answers.json'}); pass --set "
                          f"init_answers=PATH (LXMERT's all_ans.json)")
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
    found = len(answers) - len(missing)
    log(f"answer head: {found}/{len(answers)} rows from the {rows}-way pretraining QA head ({where}); "
        f"{len(missing)} set to zero" + (f", e.g. {', '.join(repr(a) for a in missing[:5])}" if missing else ""))
    return {**head, "answer_head.logit_fc.3.weight": new_w, "answer_head.logit_fc.3.bias": new_b}


# ---------------------------------------------------------------------------------------------------- predictions


def predict(model: LxmertForFinetuning, dataset: FinetuneDataset, answers: list[str], *, batch_size: int = 256,
            device: torch.device | str = "cpu", precision: str = "fp32", num_workers: int = 0) -> dict:
    """id -> predicted answer string (VQA/GQA argmax) or "True"/"False" (NLVR2)."""
    model.eval()
    out: dict = {}
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_finetune, num_workers=num_workers)
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            with autocast(precision, device.type):
                res = model(**batch.model_inputs())
            if dataset.task == "nlvr2":
                pred = res.pair_logits.argmax(-1).tolist()
                out.update({i: "True" if p == 1 else "False" for i, p in zip(batch.ids, pred)})
            else:
                pred = res.answer_logits.argmax(-1).tolist()
                out.update({i: answers[p] for i, p in zip(batch.ids, pred)})
    return out


def score(dataset: FinetuneDataset, predictions: dict, answers: list[str]) -> dict[str, float]:
    """The original's local validation scores: VQA/GQA mean label score of the prediction (VQA soft accuracy, GQA
    exact match) x 100; NLVR2 accuracy and consistency."""
    if dataset.task == "nlvr2":
        labels = {i: "True" if t == 1 else "False" for i, t in zip(dataset.ids, dataset.targets)}
        scores = nlvr2_metrics(labels, predictions)  # predictions cover exactly the split: nothing ignored
        return {"accuracy": scores["accuracy"], "consistency": scores["consistency"]}
    ans2id = {a: i for i, a in enumerate(answers)}
    total = 0.0
    for qid, target in zip(dataset.ids, dataset.targets):
        total += dict(target).get(ans2id[predictions[qid]], 0.0)
    return {"accuracy": round(100 * total / len(dataset), 2)}


# ---------------------------------------------------------------------------------------------------- trainer


class Finetuner:
    def __init__(self, cfg: FinetuneConfig, out: str | os.PathLike, *, resume: bool = False, log=None,
                 on_record=None):
        """`log` receives messages (default: logged); `on_record` every log record (after it is written)."""
        self.cfg, self.out, self.log, self.on_record = cfg, Path(out), log or _logger.info, on_record
        self.dist, self.device = start_run(cfg, self.out)
        self.answers = task_answers(cfg)
        if self.dist.is_main and self.answers:
            (self.out / "answers.json").write_text(json.dumps(self.answers) + "\n")
        self.train_set = FinetuneDataset(cfg.task, cfg.corpus, cfg.train_splits, cfg.features, cfg.vocab,
                                         self.answers, max_length=cfg.max_length)
        if not self.train_set.labelled:
            raise ConfigError(f"{cfg.task} splits {cfg.train_splits}: some examples have no label (a test split?)")
        self.valid_set = None
        if cfg.valid_split != "none":
            self.valid_set = FinetuneDataset(cfg.task, cfg.corpus, [cfg.valid_split], cfg.features, cfg.vocab,
                                             self.answers, max_length=cfg.max_length)
        self.log(f"{cfg.task}: {len(self.train_set)} training examples ({'+'.join(cfg.train_splits)}; "
                 f"{self.train_set.dropped} without features dropped)"
                 + (f", {len(self.valid_set)} validation ({cfg.valid_split})" if self.valid_set else ""))
        feat_dim = self.train_set.stores[0].feature_dim
        self.model = build_task_model(cfg, self.answers, self.train_set.tokenizer.vocab_size, feat_dim,
                                      log=self.log if self.dist.is_main else (lambda *_: None))
        frozen = freeze_unused(self.model)
        if self.dist.is_main:
            self.log(f"{frozen} parameters that no task head depends on (the last cross layer's vision branch) keep "
                     f"their initial values, as in the original")
        self.model.to(self.device)
        self.ddp = self.model
        if self.dist.world_size > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by {self.dist.world_size} processes")
        self.steps_per_epoch = len(self.train_set) // cfg.batch_size  # drop_last, as the original loader
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.train_set)} training examples are fewer than one batch of {cfg.batch_size}")
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg.optimizer, cfg.lr,
                                                        self.steps_per_epoch * cfg.epochs, cfg.warmup,
                                                        cfg.weight_decay)
        self.epoch, self.step, self.best, self.best_epoch = 0, 0, -1.0, -1
        if resume:
            self._resume()

    def _state(self) -> dict[str, Any]:
        return training_state(self.model, self.optimizer, self.scheduler, epoch=self.epoch, step=self.step,
                              best=self.best, best_epoch=self.best_epoch)

    def _resume(self) -> None:
        path = self.out / LAST
        if not path.exists():
            self.log(f"{self.out}: nothing to resume from; starting fresh")
        else:  # one checkpoint only: a damaged last.pt is an error naming it, never a silent fresh start
            _, state = restore_newest([path], self.model, self.optimizer, self.scheduler)
            self.epoch, self.step, self.best, self.best_epoch = (state["epoch"], state["step"], state["best"],
                                                                  state["best_epoch"])
            self.log(f"resumed from {path}: {self.epoch} epoch(s) done, best {self.best} (epoch {self.best_epoch})")
        if self.dist.is_main:  # a crash after the last epoch's logs but before last.pt must not log that epoch twice
            rewind_logs(self.out, self.step, self.epoch)

    def _loss_fn(self, model, batch) -> dict[str, torch.Tensor]:
        batch = batch.to(self.device, non_blocking=True)
        out = model(**batch.model_inputs())  # the parameters no head reads are frozen (freeze_unused): DDP-safe
        if self.cfg.task == "nlvr2":
            return {"nlvr2": pair_loss(out.pair_logits, batch.target)}
        return {self.cfg.task: soft_answer_loss(out.answer_logits, batch.target)}

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        append_jsonl(self.out / "log.jsonl", record)
        if self.on_record is not None:
            self.on_record(record)

    def validate(self) -> tuple[dict[str, float], dict]:
        if self.valid_set is None:
            return {}, {}
        preds = predict(self.model, self.valid_set, self.answers, batch_size=self.cfg.eval_batch_size,
                        device=self.device, precision=self.cfg.precision, num_workers=self.cfg.num_workers)
        self.model.train()
        return (score(self.valid_set, preds, self.answers) if self.valid_set.labelled else {}), preds

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        micro = cfg.batch_size // self.dist.world_size
        while self.epoch < cfg.epochs:
            sampler = MicroBatches(len(self.train_set), cfg.batch_size, micro, self.epoch, cfg.seed, self.dist)
            loader = DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate_finetune,
                                num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
            t0 = time.perf_counter()
            for batch in loader:
                last = train_step(self.ddp, [batch], self._loss_fn, self.optimizer, self.scheduler,
                                  clip_grad_norm=cfg.clip_grad_norm, precision=cfg.precision,
                                  device_type=self.device.type)
                last = mean_across_ranks(last, self.dist)
                if not np.isfinite(last["loss"]):
                    self._log({"step": self.step, "error": "non-finite loss", "ids": [str(i) for i in batch.ids]})
                    raise FloatingPointError(f"non-finite loss at step {self.step}; batch ids logged in "
                                             f"{self.out / 'log.jsonl'}")
                self.step += 1
                if self.step % cfg.log_every == 0:
                    dt = time.perf_counter() - t0
                    lr = self.optimizer.param_groups[0]["lr"] if self.scheduler else self.optimizer.current_lr()[0]
                    self._log({"step": self.step, "epoch": self.epoch, "lr": lr,
                               "samples_per_s": cfg.batch_size * cfg.log_every / max(dt, 1e-9),
                               **{k: round(v, 6) for k, v in last.items()}})
                    t0 = time.perf_counter()
            metrics, preds = self.validate()
            self.epoch += 1
            if self.dist.is_main:
                record = {"epoch": self.epoch - 1, "step": self.step, "valid_split": cfg.valid_split, **metrics}
                append_jsonl(self.out / "metrics.jsonl", record)
                self._log({"step": self.step, "epoch": self.epoch - 1, "valid": metrics})
                # without a labelled validation split the last epoch is kept as best/
                improved = "accuracy" not in metrics or metrics["accuracy"] > self.best or self.best_epoch < 0
                if improved:
                    self.best, self.best_epoch = metrics.get("accuracy", -1.0), self.epoch - 1
                    save_lxm(self.model, self.out / BEST_DIR)
                    if preds:
                        write_predictions(cfg.task, preds, self.out / "predictions" / prediction_file_name(
                            cfg.task, cfg.valid_split))
                save_state(self.out / LAST, self._state())  # after best/: a crash never loses the best model
        summary = {"task": cfg.task, "epochs": self.epoch, "steps": self.step, "best_epoch": self.best_epoch,
                   "best": self.best, "valid_split": cfg.valid_split}
        if self.dist.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


# ---------------------------------------------------------------------------------------------------- lxm predict


def predict_run(run: str | os.PathLike, task: str, split: str, out: str | os.PathLike, *, corpus: str | None = None,
                features: list[str] | None = None, batch_size: int | None = None, device: str = "auto",
                log=None) -> tuple[Path, dict]:
    """Load RUN/best (and RUN/config.yaml for corpus, features, vocab, answers), predict `split`, write `out`;
    `log` receives messages (default: logged).

    Returns (path written, scores when the split is labelled else {})."""
    log = log or _logger.info
    run = Path(run)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}: not an lxm finetuning run (no config.yaml)")
    try:
        raw = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{run / 'config.yaml'}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or "task" not in raw:
        # a pretraining run has a config.yaml too, and FinetuneConfig's default task would pass for it
        kind = "a pretraining run" if isinstance(raw, dict) and "word_mask_rate" in raw else "not a finetuning run"
        raise ConfigError(f"{run / 'config.yaml'}: {kind} (no field 'task'); lxm predict needs the --out directory "
                          f"of lxm finetune")
    cfg = FinetuneConfig(**{k: v for k, v in raw.items() if k in FinetuneConfig.__dataclass_fields__})
    if cfg.task != task:
        raise ConfigError(f"{run} is a {cfg.task} run, not {task}")
    model_dir = run / BEST_DIR
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{run}: no {BEST_DIR}/ model yet (the run has not finished an epoch)")
    answers = read_answer_table(run / "answers.json") if cfg.task != "nlvr2" else []
    model = load_pretrained(model_dir)
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model.to(dev)
    data = FinetuneDataset(cfg.task, corpus or cfg.corpus, [split], features or cfg.features, cfg.vocab, answers,
                           max_length=cfg.max_length)
    log(f"{cfg.task} {split}: {len(data)} examples ({data.dropped} without features dropped)")
    preds = predict(model, data, answers, batch_size=batch_size or cfg.eval_batch_size, device=dev,
                    precision=cfg.precision)
    path = write_predictions(cfg.task, preds, out)
    return path, (score(data, preds, answers) if data.labelled else {})
