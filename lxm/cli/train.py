"""`lxm pretrain`, `lxm finetune`, `lxm predict`, `lxm plot`: training runs (thin wrappers over `lxm.train`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import typer.core
from rich.markup import escape

from lxm.cli.common import USER_ERRORS, err, fail, keep_freed_memory_on_cpu, progress, report_submission
from lxm.errors import ConfigError


def _overrides(set_: list[str] | None, *, init: str | None = None, corpus: Path | None = None,
               features: list[Path] | None = None) -> list[str]:
    """--set items, then the dedicated options as the same key=value overrides (they win over the config file)."""
    out = list(set_ or [])
    if init:
        out.append(f"init={init}")
    if corpus is not None:
        out.append(f"corpus={corpus}")
    if features:
        out.append("features=" + json.dumps([str(f) for f in features]))
    return out


def _run_config(out: Path, resume: bool, config: str | None, overrides: list[str], load, task: str | None = None):
    """The command's config: with --resume and no --config, the run's own recipe (OUT/config.yaml) with the command's
    overrides (the trainer refuses any that change the recipe, lxm.train.config.RESUMABLE_KEYS); otherwise
    `load(--config or its default preset, overrides)`. `task`: the finetuning task of the command (None: pretrain),
    which must be the run's."""
    if resume and config is None and (out / "config.yaml").is_file():
        from lxm.train.config import FinetuneConfig, load_run_config

        path = out / "config.yaml"
        cfg = load_run_config(path, overrides)
        if not isinstance(cfg, FinetuneConfig) and task is not None:
            raise ConfigError(f"{path}: a pretraining run; resume it with lxm pretrain --out {out} --resume")
        if isinstance(cfg, FinetuneConfig) and cfg.task != task:
            raise ConfigError(f"{path}: a {cfg.task} finetuning run; resume it with lxm finetune {cfg.task} --out "
                              f"{out} --resume")
        return cfg
    return load(config, overrides)


def _print_plan(plan: dict) -> None:
    """`--dry-run`: what the run would do, one `key: value` line each, on stdout."""
    for key, value in plan.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
        typer.echo(f"{key}: {value}")


def _stopped(exc) -> None:
    """A run stopped by SIGINT / SIGTERM: where, and the command that continues it; exit 130 / 143."""
    # err prints no markup: a path prints as it is; soft_wrap: no line break inside the command to copy
    err.print(str(exc), highlight=False, soft_wrap=True)
    raise typer.Exit(code=exc.exit_code)


_RESUME_HELP = ("Continue the run in --out: its own recipe (OUT/config.yaml; give no other option, or only --set "
                "epochs=N and other keys that do not change the recipe) from its latest checkpoint.")
_OVERWRITE_HELP = ("Start afresh in an --out that holds a run: its lxm files (config.yaml, logs, checkpoints, best/, "
                   "predictions/, ...) are removed once the new run's inputs are checked; other files stay.")
_DRY_RUN_HELP = "Read and check every input, print what the run would do, write nothing."


class PretrainCommand(typer.core.TyperCommand):
    """`lxm pretrain`: its help ends with the presets `--config` takes, each with its one-line description, read
    from `lxm.train.config.PRETRAIN_PRESETS` when the help is shown (so `lxm --help` imports no torch)."""

    def format_help(self, ctx, formatter) -> None:
        if not getattr(self, "_presets_listed", False):
            from lxm.train.config import PRETRAIN_PRESETS, preset_summaries

            # one paragraph each (the terminal wraps them; a blank line between presets)
            lines = "\n\n".join(f"{name}: {summary}" for name, summary in preset_summaries(PRETRAIN_PRESETS))
            self.help = f"{self.help}\n\nPresets of --config (README: Reproduce the paper):\n\n{escape(lines)}"
            self._presets_listed = True
        super().format_help(ctx, formatter)


def pretrain_cmd(
    out: Path = typer.Option(..., "--out", help="Run directory: config.yaml, log.jsonl, checkpoints/."),
    config: str = typer.Option(None, "--config", help="Preset (base = the original code's recipe, the default; tiny = "
                                                      "smoke test; paper/... = the paper's runs, listed below) or a "
                                                      "YAML file of PretrainConfig keys.",
                               show_default=False),
    corpus: Path = typer.Option(None, "--corpus", help="Corpus directory from lxm build-corpus (overrides config)."),
    features: list[Path] = typer.Option(None, "--features", help="Feature store directories (override config)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a config key: --set lr=5e-5 --set epochs=12."),
    resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """Pretrain LXMERT (MLM, matching, object/attribute/feature prediction, QA) as the original recipe by default.

    Reads and checks every input, then writes OUT/config.yaml (resolved), a jsonl log of every loss term, checkpoints
    every N steps and each epoch (atomically, with sha256 sidecars; --resume continues exactly), and best.pt by
    minival loss. OUT must be new or empty (or --resume / --overwrite); one process at a time. SIGINT / SIGTERM stop
    after the current step with a checkpoint and print the resume command. Multi-process:
    torchrun --nproc_per_node 4 -m lxm.cli pretrain ... (DDP; gloo on CPU, nccl on GPU).

    Example: lxm pretrain --corpus corpus/ --features features/train2014 --features features/val2014 --features features/vg --out runs/lxmert
    """
    from lxm.train.config import load_config
    from lxm.train.pretrain import Pretrainer
    from lxm.train.run import RunStopped

    try:
        cfg = _run_config(out, resume, config, _overrides(set_, corpus=corpus, features=features), load_config)
        if dry_run:
            _print_plan(Pretrainer(cfg, out, resume=resume, overwrite=overwrite, dry_run=True,
                                   log=lambda m: err.print(m, highlight=False)).plan())
            return
        keep_freed_memory_on_cpu(cfg.runtime.keep_freed_memory, cfg.runtime.device, "config: 'runtime.device'")
        with progress("steps") as bar:
            task = bar.add_task("pretrain", total=None)

            def advance(record):
                if "loss" in record:
                    bar.update(task, description=f"pretrain loss {record['loss']:.3f} "
                                                 f"{record.get('samples_per_s', 0):.0f} samples/s")

            trainer = Pretrainer(cfg, out, resume=resume, overwrite=overwrite,
                                 log=lambda m: err.print(m, highlight=False),
                                 on_record=advance, on_step=lambda step, _: bar.update(task, completed=step))
            bar.update(task, total=trainer.total_steps, completed=trainer.step)
            result = trainer.run()
    except RunStopped as exc:
        _stopped(exc)
    except USER_ERRORS as exc:
        fail(exc)
    err.print(f"done: step {result['step']}, epoch {result['epoch']}; logs and checkpoints in {out}", highlight=False)


def _data_overrides(task: str, train: Path | None, valid: Path | None, test: Path | None,
                    min_answer_count: int | None) -> list[str]:
    """--train/--valid/--test/--min-answer-count as overrides (data={...}, valid_split, min_answer_count)."""
    from lxm.train.tasks import TASKS

    if task not in TASKS:  # before anything else: "foo reads the corpus" would send the user astray
        raise ConfigError(f"unknown task {task!r} ({', '.join(TASKS)})")
    given = {"train": train, "valid": valid, "test": test}
    if not TASKS[task].reads_files:
        if any(v is not None for v in given.values()) or min_answer_count is not None:
            files = "|".join(name for name, cls in TASKS.items() if cls.reads_files)
            raise ConfigError(f"--train/--valid/--test/--min-answer-count are for lxm finetune {files}; {task} "
                              f"reads the corpus (--corpus)")
        return []
    if min_answer_count is not None and not TASKS[task].builds_answer_table:
        builders = "|".join(name for name, cls in TASKS.items() if cls.builds_answer_table)
        raise ConfigError(f"--min-answer-count is for lxm finetune {builders} (the answer table); {task} takes every "
                          f"label")
    out = [f"min_answer_count={min_answer_count}"] if min_answer_count is not None else []
    if train is None:
        if valid is not None or test is not None:
            raise ConfigError("--valid / --test need --train (they replace the config's data files together)")
        return out  # the config file may hold `data`; without a train file the config says so
    out.append("data=" + json.dumps({k: str(v) for k, v in given.items() if v is not None}))
    out.append(f"valid_split={'valid' if valid is not None else 'none'}")
    return out


def finetune_cmd(
    task: str = typer.Argument(..., help="vqa, gqa, nlvr2 (corpus tables), qa or classify (your JSON lines files)."),
    out: Path = typer.Option(..., "--out", help="Run directory: config.yaml, log.jsonl, metrics.jsonl, best/, "
                                                "predictions/, last.pt."),
    init: str = typer.Option(None, "--init", help="Pretrained weights: an lxm pretraining run directory, an "
                                                  "original *_LXRT.pth, a transformers LXMERT directory or Hub id."),
    config: str = typer.Option(None, "--config", help="Preset (paper = the original recipe of the task, the "
                                                      "default; tiny = smoke test) or a YAML file of FinetuneConfig "
                                                      "keys.", show_default=False),
    corpus: Path = typer.Option(None, "--corpus", help="Corpus directory from lxm build-corpus (overrides config)."),
    features: list[Path] = typer.Option(None, "--features", help="Feature store directories (override config)."),
    train: Path = typer.Option(None, "--train", exists=True, dir_okay=False,
                               help="qa / classify: the training JSON lines file (its answers / labels make the "
                                    "head)."),
    valid: Path = typer.Option(None, "--valid", exists=True, dir_okay=False,
                               help="qa / classify: validation JSON lines file, scored after each epoch."),
    test: Path = typer.Option(None, "--test", exists=True, dir_okay=False,
                              help="qa / classify: JSON lines file (labels optional) predicted by the best model "
                                   "into OUT/predictions/ after training."),
    min_answer_count: int = typer.Option(None, "--min-answer-count", min=1,
                                         help="qa: answers given by fewer training questions are left out of the "
                                              "answer table (default 1)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a config key: --set lr=1e-5 --set epochs=4."),
    resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """Finetune LXMERT on VQA, GQA or NLVR2 with the original recipes (batch 32, lr 5e-5 / 1e-5 / 5e-5, 4 epochs,
    warm-up 10 %, clip 5.0), or on your own data (qa, classify: the same recipe, lr 5e-5).

    VQA trains on train+nominival and validates on minival; GQA train+valid / testdev; NLVR2 train / dev. The
    answer head starts from the pretraining QA head by answer string (coverage printed). Each epoch appends the
    validation score to OUT/metrics.jsonl; the best epoch is kept in OUT/best/ with its predictions in
    OUT/predictions/ (official formats). Multi-process: torchrun --nproc_per_node 4 -m lxm.cli finetune ...

    Your own datasets are JSON lines files (--train, --valid, --test; images in --features). qa: {"question_id",
    "img_id", "question", "answers": ["a", ...] (annotators: VQA soft scores and VQA accuracy) or {"a": score}};
    the answer table comes from --train (--min-answer-count), predictions in the VQA format. classify: {"id",
    "img_id", "text", "label"}; labels from --train, a fresh head on the pooled output, accuracy and macro-F1,
    predictions as CSV id,label.

    Example: lxm finetune qa --train train.jsonl --valid valid.jsonl --test test.jsonl --features features/mine --init runs/lxmert --out runs/myqa
    """
    from lxm.train.config import load_finetune_config
    from lxm.train.finetune import Finetuner
    from lxm.train.run import RunStopped

    try:
        overrides = (_overrides(set_, init=init, corpus=corpus, features=features)
                     + _data_overrides(task, train, valid, test, min_answer_count))
        cfg = _run_config(out, resume, config, overrides, lambda name, items: load_finetune_config(task, name, items),
                          task)
        if dry_run:
            _print_plan(Finetuner(cfg, out, resume=resume, overwrite=overwrite, dry_run=True,
                                  log=lambda m: err.print(m, highlight=False)).plan())
            return
        keep_freed_memory_on_cpu(cfg.runtime.keep_freed_memory, cfg.runtime.device, "config: 'runtime.device'")
        with progress("steps") as bar:
            bar_task = bar.add_task(f"finetune {task}", total=None)

            def advance(record):
                if "loss" in record:
                    bar.update(bar_task, description=f"{task} epoch {record['epoch']} loss {record['loss']:.3f} "
                                                     f"{record.get('samples_per_s', 0):.0f} samples/s")
                elif "valid" in record and record["valid"]:
                    err.print(f"epoch {record['epoch']}: {cfg.valid_split} "
                              + ", ".join(f"{k} {v}" for k, v in record["valid"].items()), highlight=False)

            trainer = Finetuner(cfg, out, resume=resume, overwrite=overwrite,
                                log=lambda m: err.print(m, highlight=False),
                                on_record=advance, on_step=lambda step, _: bar.update(bar_task, completed=step))
            bar.update(bar_task, total=trainer.steps_per_epoch * cfg.optim.epochs, completed=trainer.step)
            result = trainer.run()
    except RunStopped as exc:
        _stopped(exc)
    except USER_ERRORS as exc:
        fail(exc)
    key = trainer.task.metric_names[0]
    if "report" in result:  # the best epoch's validation predictions, read closer (summary.json "report")
        from lxm.train.report import report_lines

        err.print(f"best epoch {result['best_epoch']} on {cfg.valid_split}:", highlight=False)
        for line in report_lines(result["report"], key):
            err.print(f"  {line}", highlight=False)
    seconds = result.get("epoch_seconds") or {}
    if seconds:
        err.print("wall time per epoch: " + ", ".join(f"{e}: {s:.1f} s" for e, s in sorted(seconds.items())),
                  highlight=False)
    best = (f"best {cfg.valid_split} {key} {result['best']} (epoch {result['best_epoch']})" if cfg.valid_split
            else f"no validation split: the last epoch ({result['best_epoch']}) kept")
    err.print(f"done: {result['epochs']} epochs; {best}; model in {out / 'best'}"
              + (f"; test predictions in {result['test_predictions']}" if "test_predictions" in result else ""),
              highlight=False)


def predict_cmd(
    task: str = typer.Argument(..., help="vqa, gqa, nlvr2, qa or classify (must match the run)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A finetuning run directory (lxm finetune --out)."),
    split: str = typer.Option(..., "--split", help="Table of the corpus to predict: vqa test/minival/testdev, "
                                                   "gqa testdev/submit, nlvr2 dev/test1/test2; qa / classify: "
                                                   "valid/test (the run's files) or a FILE.jsonl."),
    out: Path = typer.Option(..., "--out", help="Submission file to write (JSON for VQA/GQA/qa, CSV for "
                                                "NLVR2/classify)."),
    corpus: Path = typer.Option(None, "--corpus", help="Corpus directory (default: the run's)."),
    features: list[Path] = typer.Option(None, "--features", help="Feature stores (default: the run's)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1,
                                   help="Evaluation batch size, at least 1 (default: the run's)."),
    device: str = typer.Option("auto", "--device", help="auto (this machine's GPU when CUDA is available, else the "
                                                        "CPU), cpu, cuda or cuda:N (an error without CUDA)."),
    questions: Path = typer.Option(None, "--questions", exists=True, dir_okay=False,
                                   help="GQA only: the split's questions with answers (e.g. "
                                        "testdev_balanced_questions.json); prints lxm evaluate gqa's table."),
    choices: Path = typer.Option(None, "--choices", exists=True, dir_okay=False,
                                 help="GQA only, with --questions: choices file for validity / plausibility."),
) -> None:
    """Write the official submission file of a split with the run's best model.

    VQA and qa [{"question_id", "answer"}], GQA [{"questionId", "prediction"}], NLVR2 CSV identifier,True|False,
    classify CSV id,label. When the split has labels, the local score is printed too (use lxm evaluate for the
    official one). On a split an evaluation server takes (vqa test: all of test2015, which the server wants for
    test-dev as for test-standard; gqa submit; nlvr2 test1 / test2) the written file is checked as lxm
    check-submission does, against every question of the split and the run's answer table; a file that is not
    ready stays written, the command exits 1 with the counts and first offending ids (e.g. questions whose images
    have no features). GQA with --questions
    also prints every eval.py number of the written file as JSON, exactly as lxm evaluate gqa.

    Example: lxm predict vqa --checkpoint runs/vqa --split test --features features/test2015 --out test_predict.json
    """
    from lxm.infer.outputs import check_output_file
    from lxm.infer.runs import predict_run
    from lxm.train.tasks import TASKS

    if task not in TASKS:
        fail(ConfigError(f"unknown task {task!r} ({', '.join(TASKS)})"))
    if (questions or choices) and not TASKS[task].structural_types:
        fail(ConfigError(f"--questions / --choices score GQA predictions; this is {task}"))
    if choices and not questions:
        fail(ConfigError("--choices needs --questions"))
    try:
        check_output_file(out, "--out")  # before the model runs: its predictions would be lost
        path, scores, submission = predict_run(
            checkpoint, task, split, out, corpus=str(corpus) if corpus else None,
            features=[str(f) for f in features] if features else None, batch_size=batch_size, device=device,
            log=lambda m: err.print(m, highlight=False))
    except USER_ERRORS as exc:
        fail(exc)
    err.print(f"wrote {path}" + (f" (local {split} " + ", ".join(f"{k} {v}" for k, v in scores.items()) + ")"
                                 if scores else ""), highlight=False)
    if submission is not None:
        report_submission(submission, f"the file is written; lxm check-submission {task} {path} --questions Q "
                                      f"checks it again")
    if questions:  # the file just written, scored as lxm evaluate gqa would
        from lxm.eval import evaluate_gqa

        try:
            table = evaluate_gqa(questions, path, choices)
        except USER_ERRORS as exc:
            fail(exc)
        typer.echo(json.dumps(table, indent=2))


def plot_cmd(
    run: Path = typer.Argument(..., help="A pretraining or finetuning run directory (reads its log.jsonl)."),
    out: Path = typer.Option(None, "--out", help="Directory for the PNG files (default RUN/plots)."),
) -> None:
    """Plot a run's training losses (every named term, log scale) and validation values per epoch as PNG files.

    Example: lxm plot runs/lxmert
    """
    from lxm.train.plot import plot_run

    try:
        written = plot_run(run, out)
    except USER_ERRORS as exc:
        fail(exc)
    for path in written:
        err.print(f"wrote {path}", highlight=False)
