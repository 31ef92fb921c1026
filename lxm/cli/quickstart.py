"""`lxm quickstart`: the whole chain on a small synthetic world, offline, in about 25 s on 2 idle CPU cores.

It renders images of coloured shapes (Pillow), writes raw annotation files in the real COCO captions / VQA v2 /
NLVR2 formats describing them (datasets.md), then runs the real commands in order — extract, build-corpus, pretrain,
finetune vqa and nlvr2, predict, evaluate, ask, gallery, show, plot — and writes report.md with the commands, their
work and times, the metrics and the pictures. Nothing is downloaded: the detector has seeded random weights unless
--weights is given, and the WordPiece vocabulary is trained on the world's own text unless --vocab is given.

The ask stages put a minival question and an NLVR2 dev statement to `lxm ask` about the raw image files: the detector
runs again as the extract stage ran it, so the answers are `lxm predict`'s (up to the float16 rounding of the stored
features), and report.md sets the two side by side. The gallery stages write `lxm gallery`'s pages of both splits,
linked from report.md.

This module is the stage runner and the command: the world comes from the library (`lxm.demo.world`), and the
report (`lxm.demo.report`) reads its numbers from the files the commands write. Where a command gives its numbers
only on stdout (`lxm evaluate`, `lxm ask --json`), the stage keeps that stdout in a file under predictions/.

It is part of the program, not of the library: it drives the `lxm` command group it is given (the command passes
its own root, `typer.Context.find_root().command`), so it never imports `lxm.cli` and the package has no cycle.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import typer

from lxm.cli.common import USER_ERRORS, err, fail
from lxm.errors import LxmError

if TYPE_CHECKING:  # the library is imported inside the functions: `lxm --help` imports this module
    from lxm.demo.report import Stage

_logger = logging.getLogger(__name__)

PRETRAIN_BATCH, FINETUNE_BATCH = 16, 8


class QuickstartError(LxmError, RuntimeError):
    """A stage of the quickstart failed; the message names the command."""


@dataclass
class QuickstartConfig:
    """Sizes of the synthetic world and of the runs. The defaults cost 184 images to extract and 291 optimizer
    steps (187 of pretraining, 84 + 20 of finetuning): about 25 s on 2 idle CPU cores."""

    train_images: int = 48  # COCO-style train2014 images (captions + VQA questions)
    val_images: int = 16  # val2014 images; the first half is minival, the rest nominival
    nlvr2_pairs: int = 40  # NLVR2 train pairs (dev and test1 get a quarter each)
    image_size: int = 128  # pixels (square)
    # Pretraining is bounded by steps, not epochs, so its cost does not grow with the world: as many whole epochs as
    # fit (each one validated, the lr schedule run to its end), or the first steps of one if one epoch is longer.
    pretrain_steps: int = 200
    finetune_epochs: int = 4  # epochs of the world's own, known size (vqa 21 and nlvr2 5 steps each by default)
    weights: str = "random"  # detector weights; "random" = seeded random init (meaningless features)
    vocab: str = ""  # WordPiece vocabulary; "" = train a small one on the world's text
    detector_vocab: str = ""  # folder with the detector's objects_vocab.txt / attributes_vocab.txt: names in boxes.png
    # torch intra-op threads while the quickstart runs (restored after). The tiny models gain nothing from more, and
    # on a busy machine extra threads wait on each other: at load 6 on 2 cores the default run took 339 s with 2
    # threads (pretraining alone 224 s) and 38 s with 1, with the same results.
    threads: int = 1
    seed: int = 0
    backbone: str = "butd"  # lxm extract --backbone: butd (the detector's regions), grid, or timm:MODEL (with
    #   random weights unless `weights` names real ones: its own seeded init, offline)


@dataclass
class QuickstartResult:
    out: Path
    stages: list[Stage] = field(default_factory=list)
    load: tuple[float, float] | None = None  # 1-minute load average at the start and at the end
    metrics: dict = field(default_factory=dict)  # as `lxm.demo.report.read_metrics` reads them from the files
    # task -> what `lxm ask` was asked, its JSON reply, the ground truth and `lxm predict`'s answer for it
    asked: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- the run


def _invoke(cli: click.Command, stage: Stage, root: Path, log) -> None:
    """Run one `lxm` command in this process; its stdout goes to root/`stage.stdout` where that is set, a non-zero
    exit raises."""
    log(f"$ {' '.join(shlex.quote(a) for a in ['lxm', *stage.command])}")
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        try:
            code = cli.main(args=stage.command, prog_name="lxm", standalone_mode=False)
        except SystemExit as exc:
            code = exc.code
    stage.seconds = time.perf_counter() - t0
    if code not in (None, 0):
        raise QuickstartError(f"stage '{stage.name}' failed (exit {code}): lxm {' '.join(stage.command)}")
    if stage.stdout:
        (root / stage.stdout).write_text(buf.getvalue())


def pretrain_schedule(max_steps: int, sentences: int, batch: int) -> tuple[int, int]:
    """(epochs, max_steps) for `lxm pretrain`: the whole epochs of `sentences // batch` steps that fit in max_steps,
    so each is validated and the lr schedule (sized by epochs) ends at zero; one cut epoch if even one is longer."""
    per_epoch = max(1, sentences // batch)
    return max(1, max_steps // per_epoch), max_steps


def _pretrain_sentences(corpus: Path) -> int:
    """Sentences `lxm pretrain` trains on: those of its default splits (every quickstart image has features)."""
    import pyarrow.parquet as pq

    from lxm.train.config import PretrainConfig

    keep = set(PretrainConfig().train_splits)
    return sum(s in keep for s in pq.read_table(corpus / "corpus.parquet", columns=["split"]).column(0).to_pylist())


def _steps(run: Path) -> int:
    from lxm.train.plot import read_log

    train, _ = read_log(run)
    return train[-1]["step"] if train else 0


def run_quickstart(out: str | os.PathLike, cli: click.Command, cfg: QuickstartConfig | None = None, log=None
                   ) -> QuickstartResult:
    """Make the world in `out` and run the stages through `cli`, the `lxm` command group
    (`typer.main.get_command(lxm.cli.app)` from Python); `log` receives progress messages (default: logged)."""
    import torch

    cfg = cfg or QuickstartConfig()
    root = Path(out).resolve()
    if root.exists() and any(root.iterdir()):
        raise QuickstartError(f"{root} exists and is not empty; pass a new --out (runs are never overwritten)")
    for name in ("objects_vocab.txt", "attributes_vocab.txt") if cfg.detector_vocab else ():
        if not (Path(cfg.detector_vocab) / name).is_file():  # checked before minutes of work, not at the show stage
            raise QuickstartError(f"--detector-vocab {cfg.detector_vocab}: no {name} there")
    root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(root, cli, cfg, log or _logger.info)
    finally:
        torch.set_num_threads(threads)


def _run(root: Path, cli: click.Command, cfg: QuickstartConfig, log) -> QuickstartResult:
    from lxm.demo.report import (DEMO_TASKS, PREDICTIONS, REPLY, SCORES, Stage, ask_line, read_answers, read_metrics,
                                 scores_line, write_report)
    from lxm.demo.world import FIRST_VAL_ID, make_world, train_vocab

    result = QuickstartResult(root)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    counts = make_world(root, train_images=cfg.train_images, val_images=cfg.val_images, nlvr2_pairs=cfg.nlvr2_pairs,
                        image_size=cfg.image_size, seed=cfg.seed)
    log(f"world: {counts} in {root} ({time.perf_counter() - t0:.1f} s)")
    vocab = cfg.vocab or str(train_vocab(root))
    random_weights = cfg.weights == "random"
    detector = ["--detector", "tiny"] if random_weights else []

    def f(*parts: str) -> str:
        return str(root.joinpath(*parts))

    splits = ("train2014", "val2014", "nlvr2")
    feats = [f("features", s) for s in splits]
    images = {s: len(list((root / "images" / s).iterdir())) for s in splits}
    if cfg.backbone.startswith("timm:"):  # the model's own weights (or seeded random ones), no detector
        visual = ["--backbone", cfg.backbone, "--backbone-weights", cfg.weights]
    else:
        named = ["--backbone", cfg.backbone] if cfg.backbone != "butd" else []
        visual = ["--weights", cfg.weights, *detector, *named]
    stages = [Stage(f"extract {s}", ["extract", "--images", f("images", s), "--out", f("features", s), *visual,
                                     "--seed", str(cfg.seed)],
                    work=f"{images[s]} images") for s in splits]
    stages.append(Stage("build-corpus", ["build-corpus", "--out", f("corpus"), "--coco", f("raw", "coco"),
                                         "--vqa", f("raw", "vqa"), "--nlvr2", f("raw", "nlvr2"),
                                         "--minival-ids", f("raw", "minival.json"), "--vqa-min-questions", "1",
                                         "--overwrite", *[x for p in feats for x in ("--features", p)]]))
    for stage in stages:
        _invoke(cli, stage, root, log)
        result.stages.append(stage)
    common = [x for p in feats for x in ("--features", p)] + ["--corpus", f("corpus"), "--set", f"vocab={vocab}"]
    epochs, max_steps = pretrain_schedule(cfg.pretrain_steps, _pretrain_sentences(root / "corpus"), PRETRAIN_BATCH)
    stages = [Stage("pretrain", ["pretrain", "--config", "tiny", "--out", f("runs", "pretrain"), *common,
                                 "--set", f"epochs={epochs}", "--set", f"max_steps={max_steps}",
                                 "--set", f"batch_size={PRETRAIN_BATCH}", "--set", "checkpoint_every=100000",
                                 "--set", "keep_last=1", "--set", "log_every=5"])]
    for task in DEMO_TASKS:
        stages.append(Stage(f"finetune {task}", ["finetune", task, "--init", f("runs", "pretrain"), "--config", "tiny",
                                                 "--out", f("runs", task), *common,
                                                 "--set", f"epochs={cfg.finetune_epochs}",
                                                 "--set", f"batch_size={FINETUNE_BATCH}", "--set", "lr=3e-4"]))
    show_vocab = ["--vocab", cfg.detector_vocab] if cfg.detector_vocab else []
    names = ["--vocab-dir", cfg.detector_vocab] if cfg.detector_vocab else []
    shown = f"COCO_val2014_{FIRST_VAL_ID:012d}"
    asked = _ask_examples(root, shown)
    # the extract stage's detector: the same network, weights and seed, so the features are the stored ones
    ask = ["--random-detector", *detector] if random_weights else ["--detector-weights", cfg.weights]
    ask += ["--seed", str(cfg.seed), "--top", "5", "--json", *names]
    minival = len(json.loads((root / "raw" / "vqa" / "minival_questions.json").read_text())["questions"])
    stages += [
        Stage("predict vqa", ["predict", "vqa", "--checkpoint", f("runs", "vqa"), "--split", "minival",
                              "--out", f(PREDICTIONS["vqa"])]),
        Stage("evaluate vqa", ["evaluate", "vqa", "--questions", f("raw", "vqa", "minival_questions.json"),
                               "--annotations", f("raw", "vqa", "v2_mscoco_val2014_annotations.json"),
                               "--predictions", f(PREDICTIONS["vqa"])], stdout=SCORES.format(task="vqa")),
        Stage("predict nlvr2", ["predict", "nlvr2", "--checkpoint", f("runs", "nlvr2"), "--split", "dev",
                                "--out", f(PREDICTIONS["nlvr2"])]),
        Stage("evaluate nlvr2", ["evaluate", "nlvr2", "--annotations", f("raw", "nlvr2", "dev.json"),
                                 "--predictions", f(PREDICTIONS["nlvr2"])], stdout=SCORES.format(task="nlvr2")),
        Stage("ask vqa", ["ask", "--model", f("runs", "vqa"), "--image", f("images", "val2014", f"{shown}.jpg"),
                          "--question", asked["vqa"]["question"], *ask, "--explain", f("pictures", "ask_explain.png")],
              work="1 image, 1 question", stdout=REPLY.format(task="vqa")),
        Stage("ask nlvr2", ["ask", "--model", f("runs", "nlvr2"),
                            *[x for img in asked["nlvr2"]["images"] for x in ("--image", f("images", "nlvr2", img))],
                            "--statement", asked["nlvr2"]["statement"], *ask,
                            "--explain", f("pictures", "ask_explain_nlvr2.png")], work="2 images, 1 statement",
              stdout=REPLY.format(task="nlvr2")),
        Stage("gallery vqa", ["gallery", f("runs", "vqa"), "--split", "minival", "--images", f("images", "val2014"),
                              "--out", f("gallery", "vqa"), "--limit", str(minival), *names],
              work=f"{minival} questions"),
        Stage("gallery nlvr2", ["gallery", f("runs", "nlvr2"), "--split", "dev", "--images", f("images", "nlvr2"),
                                "--out", f("gallery", "nlvr2"), "--limit", str(counts["nlvr2_dev"]), *names],
              work=f"{counts['nlvr2_dev']} pairs"),
        Stage("show", ["show", f("features", "val2014"), shown, "--image", f("images", "val2014", f"{shown}.jpg"),
                       "--out", f("pictures", "boxes.png"), "--top", "5", *show_vocab]),
    ]
    stages += [Stage(f"plot {r}", ["plot", f("runs", r), "--out", f("pictures", r)]) for r in ("pretrain", "vqa",
                                                                                             "nlvr2")]
    for stage in stages:
        _invoke(cli, stage, root, log)
        result.stages.append(stage)
        kind, _, task = stage.name.partition(" ")
        if kind in ("pretrain", "finetune"):
            batch = PRETRAIN_BATCH if kind == "pretrain" else FINETUNE_BATCH
            stage.work = f"{_steps(root / 'runs' / (task or kind))} steps of {batch}"
        if kind == "evaluate":  # the console shows what the report will say
            log(f"{stage.name}: {scores_line(json.loads((root / stage.stdout).read_text()))}")
        if kind == "ask":
            log(f"{stage.name}: {ask_line({**asked[task], 'reply': json.loads((root / stage.stdout).read_text())})}")
    result.metrics = read_metrics(root)
    result.asked = read_answers(root, asked)
    if load0 is not None:
        result.load = (load0, os.getloadavg()[0])
    write_report(root, result.stages, counts=counts, vocab=vocab, random_weights=random_weights,
                 detector_vocab=bool(cfg.detector_vocab), threads=cfg.threads, asked=asked, load=result.load,
                 backbone=cfg.backbone)
    return result


def _ask_examples(root: Path, image: str) -> dict:
    """What the ask stages ask, with the ground truth: the first question of minival image `image` in the raw VQA
    file, and the statement of the first NLVR2 dev pair (with its two image files)."""
    raw = root / "raw"
    image_id = int(image.rsplit("_", 1)[1])
    question = next(q for q in json.loads((raw / "vqa" / "minival_questions.json").read_text())["questions"]
                    if q["image_id"] == image_id)
    truth = next(a["multiple_choice_answer"]
                 for a in json.loads((raw / "vqa" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
                 if a["question_id"] == question["question_id"])
    pair = json.loads((raw / "nlvr2" / "dev.json").read_text().splitlines()[0])
    stem = pair["identifier"].rsplit("-", 1)[0]  # "dev-0-0-0" shows dev-0-0-img0.png and dev-0-0-img1.png
    return {"vqa": {"question": question["question"], "question_id": question["question_id"], "image": image,
                    "truth": truth},
            "nlvr2": {"statement": pair["sentence"], "identifier": pair["identifier"],
                      "images": [f"{stem}-img{k}.png" for k in range(2)], "truth": pair["label"]}}


# ---------------------------------------------------------------------------------------------------- the command


def quickstart_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("lxm-quickstart"), "--out", help="Directory for the world, runs and report.md."),
    weights: str = typer.Option("random", "--weights", help="Detector weights for lxm extract; 'random' (default) "
                                                           "= seeded random init: meaningless features."),
    vocab: str = typer.Option("", "--vocab", help="WordPiece vocabulary (default: trained on the world's text)."),
    pretrain_steps: int = typer.Option(200, "--pretrain-steps", min=1, help="Pretraining optimizer steps at most "
                                                                             "(the whole epochs that fit)."),
    finetune_epochs: int = typer.Option(4, "--finetune-epochs", min=1, help="Finetuning epochs per task."),
    detector_vocab: str = typer.Option("", "--detector-vocab", help="Folder with the detector's objects_vocab.txt "
                                                                    "and attributes_vocab.txt: names in boxes.png."),
    backbone: str = typer.Option("butd", "--backbone", help="Visual backbone of the extract stages, as lxm extract "
                                                            "--backbone: butd, grid or timm:MODEL (e.g. "
                                                            "timm:vit_tiny_patch16_224; --weights random: its seeded "
                                                            "random init). Every later stage follows the stores."),
) -> None:
    """Run the whole chain on a small synthetic world, offline: render images of coloured shapes with COCO / VQA /
    NLVR2 annotation files, then extract, build-corpus, pretrain, finetune vqa and nlvr2, predict, evaluate, ask
    (a question and a statement about raw images, with --explain pictures), gallery
    (OUT/gallery/{vqa,nlvr2}/index.html), show and plot, and write OUT/report.md (commands, work, times, metrics,
    answers, pictures, links to the galleries). About 25 s on 2 idle CPU cores.

    Example: lxm quickstart --out /tmp/lxm-quickstart
    """
    cfg = QuickstartConfig(weights=weights, vocab=vocab, pretrain_steps=pretrain_steps, detector_vocab=detector_vocab,
                           finetune_epochs=finetune_epochs, backbone=backbone)
    if weights == "random":
        err.print("quickstart: the detector gets seeded RANDOM weights (no download); the features are meaningless "
                  "and the metrics only show that the chain runs. Pass --weights for real features.",
                  highlight=False)
    try:
        result = run_quickstart(out, ctx.find_root().command, cfg,
                                log=lambda m: err.print(m, highlight=False, markup=False))
    except USER_ERRORS as exc:
        fail(exc)
    err.print(f"report: {result.out / 'report.md'}", highlight=False)
