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

It is part of the program, not of the library: it drives the `lxm` command group it is given (the command passes
its own root, `typer.Context.find_root().command`), so it never imports `lxm.cli` and the package has no cycle.
"""

from __future__ import annotations

import contextlib
import csv
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

if TYPE_CHECKING:
    import numpy as np

_logger = logging.getLogger(__name__)

SHAPES = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue", "yellow"]
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
PRETRAIN_BATCH, FINETUNE_BATCH = 16, 8
FIRST_VAL_ID = 1001  # image_id of the first val2014 image: a minival one, shown by `lxm show` and asked by `lxm ask`


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


@dataclass
class Stage:
    name: str
    command: list[str]
    seconds: float = 0.0
    work: str = ""  # what the stage did, in machine-independent terms (images, optimizer steps)
    output: str = ""


@dataclass
class QuickstartResult:
    out: Path
    stages: list[Stage] = field(default_factory=list)
    load: tuple[float, float] | None = None  # 1-minute load average at the start and at the end
    metrics: dict = field(default_factory=dict)
    # task -> what `lxm ask` was asked, its JSON reply, the ground truth and `lxm predict`'s answer for it
    asked: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- the world


def _draw(shape: str, color: str, size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(img)
    r = int(size * rng.uniform(0.22, 0.34))
    cx, cy = (int(rng.integers(r + 4, size - r - 4)) for _ in range(2))
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=RGB[color])
    elif shape == "square":
        d.rectangle(box, fill=RGB[color])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=RGB[color])
    return img


def _vqa_annotation(qid: int, image_id: int, answer: str, qtype: str, atype: str) -> dict:
    return {"question_type": qtype, "multiple_choice_answer": answer, "image_id": image_id, "answer_type": atype,
            "question_id": qid, "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i in range(10)]}


def make_world(root: Path, cfg: QuickstartConfig) -> dict:
    """Images under root/images/{train2014,val2014,nlvr2}, raw files under root/raw/{coco,vqa,nlvr2}."""
    import numpy as np  # here, not at the top: `lxm --help` imports this module

    rng = np.random.default_rng(cfg.seed)
    raw = root / "raw"
    for sub in ("images/train2014", "images/val2014", "images/nlvr2", "raw/coco", "raw/vqa", "raw/nlvr2"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    counts = {}
    minival = []
    for split, n, first in (("train2014", cfg.train_images, 1), ("val2014", cfg.val_images, FIRST_VAL_ID)):
        images, captions, questions, annotations = [], [], [], []
        for k in range(n):
            image_id = first + k
            name = f"COCO_{split}_{image_id:012d}"
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]
            _draw(shape, color, cfg.image_size, rng).save(root / "images" / split / f"{name}.jpg", quality=95)
            images.append({"id": image_id, "file_name": f"{name}.jpg", "width": cfg.image_size,
                           "height": cfg.image_size})
            for c, text in enumerate((f"A {color} {shape}.", f"a {color} {shape} on a white background")):
                captions.append({"image_id": image_id, "id": image_id * 10 + c, "caption": text})
            probe = SHAPES[int(rng.integers(len(SHAPES)))]
            for q, (text, answer, qtype, atype) in enumerate((
                    (f"What color is the {shape}?", color, "what color is the", "other"),
                    ("What shape is this?", shape, "what", "other"),
                    (f"Is there a {probe}?", "yes" if probe == shape else "no", "is there a", "yes/no"))):
                qid = image_id * 10 + q
                questions.append({"image_id": image_id, "question": text, "question_id": qid})
                annotations.append(_vqa_annotation(qid, image_id, answer, qtype, atype))
            if split == "val2014" and k < n // 2:
                minival.append({"img_id": name, "sentf": {}})
        (raw / "coco" / f"captions_{split}.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": images, "annotations": captions}))
        (raw / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": questions}))
        (raw / "vqa" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))
        counts[split] = n
    (raw / "minival.json").write_text(json.dumps(minival))
    for split, n in (("train", cfg.nlvr2_pairs), ("dev", max(4, cfg.nlvr2_pairs // 4)),
                     ("test1", max(4, cfg.nlvr2_pairs // 4))):
        lines = []
        for p in range(n):
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]
            true = bool(rng.random() < 0.5)
            shown = [(shape, color), (shape, color)]
            if not true:
                other = SHAPES[(SHAPES.index(shape) + int(rng.integers(1, len(SHAPES)))) % len(SHAPES)]
                shown[int(rng.integers(2))] = (other, COLORS[int(rng.integers(len(COLORS)))])
            stem = f"{split}-{p}-0"
            for k, (s, c) in enumerate(shown):
                _draw(s, c, cfg.image_size, rng).save(root / "images" / "nlvr2" / f"{stem}-img{k}.png")
            lines.append(json.dumps({"identifier": f"{stem}-0", "sentence": f"Both images show a {color} {shape}.",
                                     "label": "True" if true else "False", "left_url": "", "right_url": "",
                                     "writer": "quickstart", "synset": shape, "query": shape,
                                     "validation": {}, "extra_validations": {}}))
        (raw / "nlvr2" / f"{split}.json").write_text("\n".join(lines) + "\n")
        counts[f"nlvr2_{split}"] = n
    # the VQA minival questions, as the official evaluator's --questions file
    val_q = json.loads((raw / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    mini_ids = {int(m["img_id"].rsplit("_", 1)[1]) for m in minival}
    (raw / "vqa" / "minival_questions.json").write_text(json.dumps(
        {"questions": [q for q in val_q if q["image_id"] in mini_ids]}))
    return counts


def train_vocab(root: Path) -> Path:
    """A small WordPiece vocabulary trained on the world's text (lxmert.md §11.6); [PAD] first, as BERT's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    texts = []
    for path in (root / "raw").rglob("*.json"):
        texts.append(path.read_text())
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(texts, trainer=trainer)
    out = root / "vocab"
    out.mkdir(exist_ok=True)
    tok.model.save(str(out))
    return out / "vocab.txt"


# ---------------------------------------------------------------------------------------------------- the run


def _invoke(cli: click.Command, stage: Stage, log) -> str:
    """Run one `lxm` command in this process; its stdout is returned, a non-zero exit raises."""
    log(f"$ {' '.join(shlex.quote(a) for a in ['lxm', *stage.command])}")
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        try:
            code = cli.main(args=stage.command, prog_name="lxm", standalone_mode=False)
        except SystemExit as exc:
            code = exc.code
    stage.seconds = time.perf_counter() - t0
    stage.output = buf.getvalue()
    if code not in (None, 0):
        raise QuickstartError(f"stage '{stage.name}' failed (exit {code}): lxm {' '.join(stage.command)}")
    return stage.output


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
    from lxm.train.plot import read_log

    result = QuickstartResult(root)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    counts = make_world(root, cfg)
    log(f"world: {counts} in {root} ({time.perf_counter() - t0:.1f} s)")
    vocab = cfg.vocab or str(train_vocab(root))
    random_weights = cfg.weights == "random"
    detector = ["--detector", "tiny"] if random_weights else []

    def f(*parts: str) -> str:
        return str(root.joinpath(*parts))

    splits = ("train2014", "val2014", "nlvr2")
    feats = [f("features", s) for s in splits]
    images = {s: len(list((root / "images" / s).iterdir())) for s in splits}
    stages = [Stage(f"extract {s}", ["extract", "--images", f("images", s), "--out", f("features", s),
                                     "--weights", cfg.weights, *detector, "--seed", str(cfg.seed)],
                    work=f"{images[s]} images") for s in splits]
    stages.append(Stage("build-corpus", ["build-corpus", "--out", f("corpus"), "--coco", f("raw", "coco"),
                                         "--vqa", f("raw", "vqa"), "--nlvr2", f("raw", "nlvr2"),
                                         "--minival-ids", f("raw", "minival.json"), "--vqa-min-questions", "1",
                                         "--overwrite", *[x for p in feats for x in ("--features", p)]]))
    for stage in stages:
        _invoke(cli, stage, log)
        result.stages.append(stage)
    common = [x for p in feats for x in ("--features", p)] + ["--corpus", f("corpus"), "--set", f"vocab={vocab}"]
    epochs, max_steps = pretrain_schedule(cfg.pretrain_steps, _pretrain_sentences(root / "corpus"), PRETRAIN_BATCH)
    stages = [Stage("pretrain", ["pretrain", "--config", "tiny", "--out", f("runs", "pretrain"), *common,
                                 "--set", f"epochs={epochs}", "--set", f"max_steps={max_steps}",
                                 "--set", f"batch_size={PRETRAIN_BATCH}", "--set", "checkpoint_every=100000",
                                 "--set", "keep_last=1", "--set", "log_every=5"])]
    for task in ("vqa", "nlvr2"):
        stages.append(Stage(f"finetune {task}", ["finetune", task, "--init", f("runs", "pretrain"), "--config", "tiny",
                                                 "--out", f("runs", task), *common,
                                                 "--set", f"epochs={cfg.finetune_epochs}",
                                                 "--set", f"batch_size={FINETUNE_BATCH}", "--set", "lr=3e-4"]))
    show_vocab = ["--vocab", cfg.detector_vocab] if cfg.detector_vocab else []
    names = ["--vocab-dir", cfg.detector_vocab] if cfg.detector_vocab else []
    shown = f"COCO_val2014_{FIRST_VAL_ID:012d}"
    result.asked = asked = _ask_examples(root, shown)
    # the extract stage's detector: the same network, weights and seed, so the features are the stored ones
    ask = ["--random-detector", *detector] if random_weights else ["--detector-weights", cfg.weights]
    ask += ["--seed", str(cfg.seed), "--top", "5", "--json", *names]
    minival = len(json.loads((root / "raw" / "vqa" / "minival_questions.json").read_text())["questions"])
    stages += [
        Stage("predict vqa", ["predict", "vqa", "--checkpoint", f("runs", "vqa"), "--split", "minival",
                              "--out", f("predictions", "vqa_minival_predict.json")]),
        Stage("evaluate vqa", ["evaluate", "vqa", "--questions", f("raw", "vqa", "minival_questions.json"),
                               "--annotations", f("raw", "vqa", "v2_mscoco_val2014_annotations.json"),
                               "--predictions", f("predictions", "vqa_minival_predict.json")]),
        Stage("predict nlvr2", ["predict", "nlvr2", "--checkpoint", f("runs", "nlvr2"), "--split", "dev",
                                "--out", f("predictions", "nlvr2_dev_predict.csv")]),
        Stage("evaluate nlvr2", ["evaluate", "nlvr2", "--annotations", f("raw", "nlvr2", "dev.json"),
                                 "--predictions", f("predictions", "nlvr2_dev_predict.csv")]),
        Stage("ask vqa", ["ask", "--model", f("runs", "vqa"), "--image", f("images", "val2014", f"{shown}.jpg"),
                          "--question", asked["vqa"]["question"], *ask, "--explain", f("pictures", "ask_explain.png")],
              work="1 image, 1 question"),
        Stage("ask nlvr2", ["ask", "--model", f("runs", "nlvr2"),
                            *[x for img in asked["nlvr2"]["images"] for x in ("--image", f("images", "nlvr2", img))],
                            "--statement", asked["nlvr2"]["statement"], *ask,
                            "--explain", f("pictures", "ask_explain_nlvr2.png")], work="2 images, 1 statement"),
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
        output = _invoke(cli, stage, log)
        result.stages.append(stage)
        if stage.name in ("pretrain", "finetune vqa", "finetune nlvr2"):
            batch = PRETRAIN_BATCH if stage.name == "pretrain" else FINETUNE_BATCH
            stage.work = f"{_steps(root / 'runs' / stage.name.split()[-1])} steps of {batch}"
        if stage.name.startswith("evaluate"):
            result.metrics[stage.name.split()[1]] = json.loads(output)
            log(f"{stage.name}: {_scores_line(result.metrics[stage.name.split()[1]])}")  # stdout went to the report
        if stage.name.startswith("ask"):
            task = stage.name.split()[1]
            asked[task]["reply"] = json.loads(output)
            log(f"{stage.name}: {_ask_line(asked[task])}")
            # kept beside the predictions it is compared with (stdout of `lxm ask --json`)
            (root / "predictions" / f"ask_{task}.json").write_text(output)
    with open(root / "predictions" / "nlvr2_dev_predict.csv", newline="") as handle:
        asked["nlvr2"]["predict"] = dict(csv.reader(handle))[asked["nlvr2"]["identifier"]]
    vqa_predictions = json.loads((root / "predictions" / "vqa_minival_predict.json").read_text())
    asked["vqa"]["predict"] = next(r["answer"] for r in vqa_predictions
                                   if r["question_id"] == asked["vqa"]["question_id"])
    _, pre_valid = read_log(root / "runs" / "pretrain")
    result.metrics["pretrain_minival"] = pre_valid[-1]["valid"] if pre_valid else {}
    for task in ("vqa", "nlvr2"):
        result.metrics[f"{task}_best"] = json.loads((root / "runs" / task / "summary.json").read_text())
    if load0 is not None:
        result.load = (load0, os.getloadavg()[0])
    write_report(result, cfg, counts, vocab, random_weights)
    return result


def _num(value) -> str:
    """A number for people: 4 significant digits, so that 6.85e-06 stays 6.85e-06 (":.4f" made it 0.0000)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}"


def _scores_line(scores: dict) -> str:
    """`lxm evaluate`'s scores in one line, in percent as it gives them: overall / accuracy first, then per type."""
    parts = [f"{k} {_num(v)} %" for k, v in scores.items() if k in ("overall", "accuracy", "consistency")]
    for atype, v in sorted((scores.get("perAnswerType") or {}).items()):
        parts.append(f"{atype} {_num(v)} %")
    return ", ".join(parts) or json.dumps(scores)


def _ask_line(asked: dict) -> str:
    """What `lxm ask` was asked and answered, with the ground truth."""
    reply = asked.get("reply", {})
    text = asked.get("question") or asked.get("statement")
    if "answers" in reply:
        said = ", ".join(f"{a['answer']} {_num(a['score'])}" for a in reply["answers"])
    else:
        said = f"{reply.get('label')} {_num(reply.get('score'))}"
    return f"{text!r} -> {said} (probabilities; ground truth {asked.get('truth')})"


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


def _ask_lines(result: QuickstartResult) -> list[str]:
    """The report's section on the ask stages: each request, the reply, the ground truth and predict's answer."""
    if not result.asked:
        return []
    vqa, nlvr2 = result.asked["vqa"], result.asked["nlvr2"]
    lines = ["", "## Asking the model", "",
             ("`lxm ask` on the raw image files: the detector runs again as the extract stage ran it, so the answers "
              "are `lxm predict`'s from the stored features, up to their float16 rounding. The `--json` replies are "
              "in `predictions/ask_vqa.json` and `predictions/ask_nlvr2.json`."), "",
             (f"Q: *{vqa['question']}* (`{vqa['image']}`, question_id {vqa['question_id']}; ground truth "
              f"**{vqa['truth']}**, `lxm predict` **{vqa['predict']}**)"), "",
             "| answer | probability |", "|---|---|"]
    lines += [f"| {a['answer']} | {_num(a['score'])} |" for a in vqa.get("reply", {}).get("answers", [])]
    reply = nlvr2.get("reply", {})
    lines += ["", (f"S: *{nlvr2['statement']}* (pair `{nlvr2['identifier']}`; ground truth **{nlvr2['truth']}**, "
                   f"`lxm predict` **{nlvr2['predict']}**): `lxm ask` says **{reply.get('label')}** with probability "
                   f"{_num(reply.get('score', float('nan')))}."), "",
              ("Where the answer looked (`lxm ask --explain`): each box lit by the last cross layer's [CLS] -> boxes "
               "attention, the strongest labelled:"), "",
              "![ask explain](pictures/ask_explain.png)", "", "![ask explain nlvr2](pictures/ask_explain_nlvr2.png)"]
    return lines


def write_report(result: QuickstartResult, cfg: QuickstartConfig, counts: dict, vocab: str, random_weights: bool
                 ) -> Path:
    m = result.metrics
    lines = ["# lxm quickstart report", ""]
    if random_weights:
        lines += [("**The region features come from a detector with seeded random weights** (`--weights random`, the "
                   "tiny detector): they carry little of what the images show, so the numbers below prove that the "
                   "chain runs end to end, not what LXMERT reaches. Pass `--weights` with the BUTD detector "
                   "weights for real features."), ""]
    lines += [(f"World: {counts['train2014']} train2014 + {counts['val2014']} val2014 images of coloured shapes "
               f"(captions and VQA questions), NLVR2 pairs train {counts['nlvr2_train']} / dev {counts['nlvr2_dev']} "
               f"/ test1 {counts['nlvr2_test1']}. Vocabulary: `{vocab}`."), "",
              "## Metrics", "", "Accuracies and consistency in percent; losses as logged.", "",
              "| what | value |", "|---|---|"]
    vqa, nlvr2 = m.get("vqa", {}), m.get("nlvr2", {})
    lines.append(f"| VQA minival, official accuracy (overall, %) | {_num(vqa.get('overall'))} |")
    for atype, value in sorted(vqa.get("perAnswerType", {}).items()):
        lines.append(f"| VQA minival, answer type {atype} (%) | {_num(value)} |")
    lines.append(f"| NLVR2 dev accuracy / consistency (%) | {_num(nlvr2.get('accuracy'))} / "
                 f"{_num(nlvr2.get('consistency'))} |")
    for key, value in sorted(m.get("pretrain_minival", {}).items()):
        if key.startswith("qa_acc") and isinstance(value, (int, float)):  # pretraining logs it as a fraction
            lines.append(f"| pretraining minival {key} (last epoch, %) | {_num(100 * value)} |")
        else:
            lines.append(f"| pretraining minival {'total' if key == 'loss' else key} loss (last epoch) | "
                         f"{_num(value)} |")
    for task in ("vqa", "nlvr2"):
        best = m.get(f"{task}_best", {})
        lines.append(f"| {task} finetuning: best local validation accuracy (%, epoch) | {_num(best.get('best'))} "
                     f"({best.get('best_epoch')}) |")
    lines += _ask_lines(result)
    lines += ["", "## Gallery", "", ("Every minival question and NLVR2 dev pair with its boxes, ground truth, top-5 "
                                     "predictions and right or wrong, the accuracy per type and filters (`lxm "
                                     "gallery`; static pages, open them in a browser): "
                                     "[VQA minival](gallery/vqa/index.html), [NLVR2 dev](gallery/nlvr2/index.html).")]
    lines += ["", "## Commands", "", "| stage | work | seconds | command |", "|---|---|---|---|"]
    for stage in result.stages:
        cmd = " ".join(shlex.quote(a) for a in ["lxm", *stage.command]).replace(str(result.out) + "/", "")
        lines.append(f"| {stage.name} | {stage.work} | {stage.seconds:.1f} | `{cmd}` |")
    total = sum(s.seconds for s in result.stages)
    images = sum(int(s.work.split()[0]) for s in result.stages if s.work.endswith(" images"))
    steps = sum(int(s.work.split()[0]) for s in result.stages if " steps of " in s.work)
    load = ""
    if result.load:  # seconds mean little on a busy machine; the load says how busy it was
        load = f" 1-minute load average {result.load[0]:.1f} at the start, {result.load[1]:.1f} at the end."
    names = ("names from `--detector-vocab`" if cfg.detector_vocab else
             "class and attribute ids: the detector's vocabulary was not given")
    lines += ["", (f"Total {total:.0f} s for {images} images and {steps} optimizer steps, on {os.cpu_count()} CPU "
                   f"cores with {cfg.threads} torch thread(s).{load} Paths are relative to `{result.out}`."), "",
              "## Pictures", "", f"Boxes and labels of one image (`lxm show`, upscaled; {names}):", "",
              "![boxes](pictures/boxes.png)", ""]
    for run in ("pretrain", "vqa", "nlvr2"):
        for name in ("losses", "validation"):
            if (result.out / "pictures" / run / f"{name}.png").exists():
                lines += [f"{run} {name} (`lxm plot`):", "", f"![{run} {name}](pictures/{run}/{name}.png)", ""]
    path = result.out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


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
) -> None:
    """Run the whole chain on a small synthetic world, offline: render images of coloured shapes with COCO / VQA /
    NLVR2 annotation files, then extract, build-corpus, pretrain, finetune vqa and nlvr2, predict, evaluate, ask
    (a question and a statement about raw images, with --explain pictures), gallery
    (OUT/gallery/{vqa,nlvr2}/index.html), show and plot, and write OUT/report.md (commands, work, times, metrics,
    answers, pictures, links to the galleries). About 25 s on 2 idle CPU cores.

    Example: lxm quickstart --out /tmp/lxm-quickstart
    """
    cfg = QuickstartConfig(weights=weights, vocab=vocab, pretrain_steps=pretrain_steps, detector_vocab=detector_vocab,
                           finetune_epochs=finetune_epochs)
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
