"""Pipeline test: a shortened `lxm quickstart` runs every stage through the real commands and writes its report; its
work is bounded in optimizer steps, its pictures (boxes.png, losses.png, validation.png, the ask --explain ones) read
at a glance, `lxm ask` on the raw images answers as `lxm predict` did, and the galleries linked from the report are
self-contained."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lxm.cli import app

pytestmark = pytest.mark.e2e  # whole recipes through the lxm CLI (README: Tests)

PRETRAIN_STEPS = 40  # the shortened run: 2 whole epochs of the world's 17 batches fit


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--pretrain-steps", str(PRETRAIN_STEPS),
                                      "--finetune-epochs", "2"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_quickstart_runs_the_whole_chain(quickstart):
    out, output = quickstart
    assert "RANDOM weights" in output  # said plainly
    report = (out / "report.md").read_text()
    for stage in ("extract train2014", "build-corpus", "pretrain", "finetune vqa", "finetune nlvr2", "predict vqa",
                  "evaluate vqa", "evaluate nlvr2", "ask vqa", "ask nlvr2", "gallery vqa", "gallery nlvr2", "show",
                  "plot nlvr2"):
        assert f"| {stage} |" in report, stage
    assert "seeded random weights" in report and "![boxes](pictures/boxes.png)" in report
    # the raw files are in the official formats: the corpus builder read them, the evaluators scored against them
    vqa = json.loads((out / "predictions" / "vqa_minival_predict.json").read_text())
    minival_q = json.loads((out / "raw" / "vqa" / "minival_questions.json").read_text())["questions"]
    assert sorted(r["question_id"] for r in vqa) == sorted(q["question_id"] for q in minival_q)
    rows = list(csv.reader((out / "predictions" / "nlvr2_dev_predict.csv").open()))
    assert rows and all(label in ("True", "False") for _, label in rows)
    assert "| VQA minival, official accuracy (overall, %) | " in report
    # the console says what the report says: the scores of the evaluate stages and the answers of the ask stages
    overall = re.search(r"\| VQA minival, official accuracy \(overall, %\) \| (\S+) \|", report).group(1)
    assert f"evaluate vqa: overall {overall} %" in output and "evaluate nlvr2: accuracy " in output
    top = json.loads((out / "predictions" / "ask_vqa.json").read_text())["answers"][0]
    assert "ask vqa: " in output and f"-> {top['answer']} {top['score']:.4g}" in output
    assert "ask nlvr2: " in output
    for png in ("boxes.png", "pretrain/losses.png", "vqa/validation.png", "nlvr2/losses.png"):
        assert (out / "pictures" / png).stat().st_size > 2_000, png
    again = CliRunner().invoke(app, ["quickstart", "--out", str(out)])
    assert again.exit_code != 0 and "not empty" in again.output


def test_pretraining_is_bounded_by_steps_and_the_report_counts_the_work(quickstart):
    from lxm.train.plot import read_log

    out, _ = quickstart
    train, valid = read_log(out / "runs" / "pretrain")
    per_epoch = valid[0]["step"]  # the first validation comes at the end of the first epoch
    steps = train[-1]["step"]
    # as many whole epochs as fit in the budget: every epoch validated, the lr schedule run to its end
    assert steps <= PRETRAIN_STEPS < steps + per_epoch and steps == per_epoch * len(valid)
    assert train[-1]["lr"] == pytest.approx(0.0, abs=1e-9)
    report = (out / "report.md").read_text()
    assert f"| pretrain | {steps} steps of 16 |" in report
    for task in ("vqa", "nlvr2"):
        summary = json.loads((out / "runs" / task / "summary.json").read_text())
        assert f"| finetune {task} | {summary['steps']} steps of 8 |" in report
    images = len(list((out / "images" / "train2014").iterdir()))
    assert f"| extract train2014 | {images} images |" in report


@pytest.mark.parametrize(("steps", "sentences", "batch", "expected"), [
    (200, 280, 16, (11, 200)),  # 17 batches an epoch: 11 whole epochs (187 steps) fit in 200
    (17, 280, 16, (1, 17)),  # exactly one epoch
    (5, 280, 16, (1, 5)),  # less than one epoch: the first 5 steps of it
    (200, 16, 16, (200, 200)),  # one batch an epoch
])
def test_pretrain_epochs_fit_the_step_budget(steps, sentences, batch, expected):
    from lxm.cli.quickstart import pretrain_schedule

    epochs, max_steps = pretrain_schedule(steps, sentences, batch)
    assert (epochs, max_steps) == expected
    assert min(epochs * (sentences // batch), max_steps) <= steps


def test_boxes_picture_is_upscaled_and_labelled_inside(quickstart):
    from PIL import Image

    out, _ = quickstart
    with Image.open(out / "pictures" / "boxes.png") as im:
        assert max(im.size) >= 800  # the world's images are 128 pixels: upscaled so labels are readable


def test_plots_draw_no_series_twice_and_keep_coinciding_ones_visible(quickstart):
    from lxm.train.plot import losses_figure, read_log, validation_figure

    out, _ = quickstart
    for run in ("pretrain", "vqa", "nlvr2"):
        train, valid = read_log(out / "runs" / run)
        for fig in (losses_figure(train, run), validation_figure(valid, run)):
            fig.canvas.draw()
            for ax in fig.axes:
                lines = ax.get_lines()
                if ax.get_yscale() == "log":  # loss panels: one curve per distinct series
                    data = [(tuple(ln.get_xdata()), tuple(ln.get_ydata())) for ln in lines]
                    assert len(set(data)) == len(data), (run, [ln.get_label() for ln in lines])
                else:  # score panels: coinciding metrics are each drawn, each differently
                    styles = [(ln.get_linestyle(), ln.get_marker()) for ln in lines]
                    assert len(set(styles)) == len(styles), (run, styles)
                if "epoch" in ax.get_xlabel():
                    low, high = ax.get_xlim()
                    ticks = [t for t in ax.get_xticks() if low <= t <= high]
                    assert ticks and all(float(t).is_integer() for t in ticks), (run, ticks)
    train, valid = read_log(out / "runs" / "vqa")
    labels = [ln.get_label() for ln in losses_figure(train, "vqa").axes[0].get_lines()]
    assert labels == ["loss = vqa"]  # a single-task finetuning loss is its task loss: one curve, both names
    _, valid = read_log(out / "runs" / "nlvr2")
    (ax,) = validation_figure(valid, "nlvr2").axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"accuracy", "consistency (= accuracy)"}  # one pair per sentence here: they coincide
    first, second = lines["accuracy"], lines["consistency (= accuracy)"]
    assert list(first.get_ydata()) == list(second.get_ydata())
    # the one drawn on top is thinner with smaller markers, so the one below shows around it
    assert second.get_linewidth() < first.get_linewidth() and second.get_markersize() < first.get_markersize()


def test_a_missing_detector_vocabulary_is_named_before_any_work(tmp_path):
    (tmp_path / "vg").mkdir()
    (tmp_path / "vg" / "objects_vocab.txt").write_text("person\n")
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "qs"), "--detector-vocab",
                                      str(tmp_path / "vg")])
    assert result.exit_code == 1 and "attributes_vocab.txt" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "qs").exists()


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a real PNG file."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_ask_answers_the_raw_image_as_predict_did_and_explains(quickstart):
    from lxm.train.tasks import task_class

    out, _ = quickstart
    report = (out / "report.md").read_text()
    # the question asked: the first one of the first minival image in the raw VQA file
    minival = json.loads((out / "raw" / "minival.json").read_text())
    image = minival[0]["img_id"]
    image_id = int(image.rsplit("_", 1)[1])
    question = next(q for q in json.loads((out / "raw" / "vqa" / "minival_questions.json").read_text())["questions"]
                    if q["image_id"] == image_id)
    reply = json.loads((out / "predictions" / "ask_vqa.json").read_text())
    assert "RANDOM" in reply["detector"] and Path(reply["model"]) == (out / "runs" / "vqa").resolve()
    answers = reply["answers"]
    assert len(answers) == 5 and len({a["answer"] for a in answers}) == 5
    scores = [a["score"] for a in answers]
    assert scores == sorted(scores, reverse=True) and all(0 < p <= 1 for p in scores)
    assert {a["answer"] for a in answers} <= set(task_class("vqa").from_run(out / "runs" / "vqa").class_names)
    # from the raw image, the detector run again: lxm predict's answer from the stored (float16) features
    predicted = {r["question_id"]: r["answer"] for r in
                 json.loads((out / "predictions" / "vqa_minival_predict.json").read_text())}
    assert answers[0]["answer"] == predicted[question["question_id"]]
    assert f"Q: *{question['question']}* (`{image}`, question_id {question['question_id']};" in report
    assert f"`lxm predict` **{predicted[question['question_id']]}**" in report
    for a in answers:
        assert f"| {a['answer']} | {a['score']:.4g} |" in report
    # NLVR2: the first dev pair's statement, judged as lxm predict judged it
    pair = json.loads((out / "raw" / "nlvr2" / "dev.json").read_text().splitlines()[0])
    judged = json.loads((out / "predictions" / "ask_nlvr2.json").read_text())
    with open(out / "predictions" / "nlvr2_dev_predict.csv", newline="") as f:
        labels = dict(csv.reader(f))
    assert judged["label"] is (labels[pair["identifier"]] == "True") and 0.5 <= judged["score"] <= 1
    assert f"S: *{pair['sentence']}* (pair `{pair['identifier']}`" in report
    # the explain pictures: real PNGs, upscaled as lxm show's (the images are 128 pixels), the pair side by side
    for name in ("ask_explain.png", "ask_explain_nlvr2.png"):
        assert f"](pictures/{name})" in report
        assert (out / "pictures" / name).stat().st_size > 10_000, name
    width, height = _png_size(out / "pictures" / "ask_explain.png")
    assert max(width, height) >= 800 and min(width, height) >= 400
    pair_width, _ = _png_size(out / "pictures" / "ask_explain_nlvr2.png")
    assert pair_width > width


class _Refs(HTMLParser):
    """The src / href attributes of a page, and its example articles."""

    def __init__(self, text: str):
        super().__init__()
        self.refs: list[str] = []
        self.examples = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [a[k] for k in ("src", "href") if a.get(k)]
        self.examples += tag == "article" and "ex" in (a.get("class") or "").split()


def test_galleries_are_linked_from_the_report_and_self_contained(quickstart):
    out, _ = quickstart
    report = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", report)  # markdown links and images
    assert "gallery/vqa/index.html" in links and "gallery/nlvr2/index.html" in links
    for link in links:  # every link of the report is relative and there
        assert "://" not in link and not link.startswith("/") and (out / link).is_file(), link
    minival = json.loads((out / "raw" / "vqa" / "minival_questions.json").read_text())["questions"]
    dev = (out / "raw" / "nlvr2" / "dev.json").read_text().splitlines()
    for task, examples, images in (("vqa", len(minival), len(minival)), ("nlvr2", len(dev), 2 * len(dev))):
        page = out / "gallery" / task / "index.html"
        html = _Refs(page.read_text())
        assert html.examples == examples, task  # the whole split shown
        files = {ref for ref in html.refs if not ref.startswith("#")}
        assert len(files) == images, task  # each example's images drawn once, with that example's attention
        for ref in files:  # relative, inside the gallery folder, there
            assert "://" not in ref and not ref.startswith("/") and ".." not in ref, ref
            assert (page.parent / ref).stat().st_size > 1_000, ref
        assert f"| gallery {task} | {examples} {'questions' if task == 'vqa' else 'pairs'} |" in report


@pytest.mark.parametrize("backbone, name, cells", [("timm:vit_tiny_patch16_224", "timm", 196), ("grid", "grid", 64)])
def test_quickstart_runs_the_whole_chain_over_another_backbone(tmp_path, backbone, name, cells):
    """`lxm quickstart --backbone grid|timm:MODEL` (issue 31): the extract stages store the tiny detector's 8 x 8 grid
    cells or a ViT's patches (seeded random weights, offline), pretraining leaves out the label losses, and every
    later stage (finetune, predict, evaluate, ask on the raw images with its picture, gallery, show, plot) follows
    the stores."""
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--backbone", backbone,
                                      "--pretrain-steps", "10", "--finetune-epochs", "1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "features" / "val2014" / "manifest.json").read_text())
    assert (manifest["backbone"]["name"], manifest["num_boxes"], manifest["backbone"]["labels"]) == (name, cells,
                                                                                                     False)
    if name == "timm":
        assert manifest["backbone"]["model"] == "vit_tiny_patch16_224"
    else:
        assert (manifest["backbone"]["grid"], manifest["backbone"]["detector"]) == (8, "tiny")
    config = (out / "runs" / "pretrain" / "config.yaml").read_text()
    assert "- obj\n" not in config and "- attr\n" not in config and "- feat\n" in config
    report = (out / "report.md").read_text()
    assert f"`--backbone {backbone}` with seeded random weights" in report
    for stage in ("ask vqa", "ask nlvr2", "gallery nlvr2", "show", "plot vqa"):
        assert f"| {stage} |" in report, stage
    assert f"backbone: {backbone} (the run's)" in result.output
    assert (out / "pictures" / "ask_explain.png").stat().st_size > 2_000
    # the gallery's page shows each example's picture with its strongest cells / patches drawn
    page = (out / "gallery" / "vqa" / "index.html").read_text()
    pictures = re.findall(r'<img src="([^"]+\.jpg)"', page)
    assert pictures and all((out / "gallery" / "vqa" / src).stat().st_size > 1_000 for src in pictures)
