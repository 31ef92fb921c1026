"""`lxm gallery`: the records (top-1 = `lxm predict`'s answer, ground truth, right/wrong = the task's score), the
page (escaping, relative assets only, no network reference, --only-wrong / --limit, missing images), the errors,
and the page in a real browser (headless Chromium: example counts under the URL-hash filters, a screenshot).

The world: real COCO images (the shared fixture) extracted with the tiny random detector, tiny VQA-, GQA- and
NLVR2-like tables over their img_ids, and tiny models finetuned from scratch on them through the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html import escape as html_escape
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import BERT_VOCAB, SHARED
from typer.testing import CliRunner

from lxm.cli import app
from lxm.corpus.build import GQA_SCHEMA, NLVR2_SCHEMA, VQA_SCHEMA
from lxm.gallery.assets import load_asset
from lxm.gallery.build import GalleryConfig, load_records
from lxm.train.config import load_config
from lxm.infer.runs import load_run
from lxm.train.finetune_data import collate_finetune

pytestmark = pytest.mark.e2e  # whole recipes through the lxm CLI (README: Tests)

FIXTURE = SHARED / "fixtures" / "butd-coco-sample"
ANSWERS = ["yes", "no", "2", "3", "red", "blue", "cat"]
SCRIPT_QUESTION = "what is <script>alert('x')</script> & \"this\"?"
# (text, label, answer_type, question_type), asked of every image
QUESTIONS = [("is there a cat?", [("yes", 1.0), ("no", 0.3)], "yes/no", "is there a"),
             ("how many people are there?", [("2", 0.9), ("3", 0.6)], "number", "how many"),
             ("what color is the wall?", [("red", 1.0), ("blue", 0.3)], "other", "what color is the"),
             ("is it sunny?", [("no", 1.0)], "yes/no", "is it")]
STRUCTURAL = ["verify", "query", "query", "logical"]  # GQA-like types.structural of QUESTIONS


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(*args):
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def _finetune(world, task, out, *valid):
    _ok("finetune", task, "--config", "tiny", "--set", "from_scratch=true", "--set", f"vocab={BERT_VOCAB}",
        "--corpus", world["corpus"], "--features", world["store"], "--out", out, "--set", "train_splits=train",
        "--set", "epochs=1", "--set", "batch_size=4", "--set", "lr=1e-3", *valid)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    images = root / "images" / "sub"  # a subfolder: searched recursively, as lxm extract
    images.mkdir(parents=True)
    for path in sorted((FIXTURE / "images").glob("*.jpg"))[:6]:
        shutil.copy(path, images / path.name)
    _ok("extract", "--images", root / "images", "--out", root / "store", "--detector", "tiny", "--weights", "random",
        "--dtype", "float32", "--boxes", "10")
    ids = sorted(p.stem for p in images.glob("*.jpg"))
    corpus = root / "corpus"
    (corpus / "finetune").mkdir(parents=True)
    (corpus / "vocab").mkdir()
    vqa, gqa, questions = {"train": [], "minival": []}, {"train": [], "testdev": []}, {}
    qid = 0
    for split in ("train", "minival"):
        for img in ids:
            for k, (text, label, atype, qtype) in enumerate(QUESTIONS):
                qid += 1
                if split == "minival" and img == ids[1] and k == 2:
                    text = SCRIPT_QUESTION
                vqa[split].append(dict(question_id=qid, img_id=img, sent=text, label=label, answer_type=atype,
                                       question_type=qtype))
                gsplit = "testdev" if split == "minival" else "train"
                gqa[gsplit].append(dict(question_id=f"g{qid}", img_id=img, sent=text, label=[label[0]]))
                questions[f"g{qid}"] = {"question": text, "answer": label[0][0], "types": {"structural": STRUCTURAL[k]}}
    for split, rows in vqa.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=VQA_SCHEMA), corpus / "finetune" / f"vqa_{split}.parquet")
    pq.write_table(pa.Table.from_pylist([{**r, "label": None} for r in vqa["minival"]], schema=VQA_SCHEMA),
                   corpus / "finetune" / "vqa_test.parquet")
    for split, rows in gqa.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=GQA_SCHEMA), corpus / "finetune" / f"gqa_{split}.parquet")
    testdev = {r["question_id"] for r in gqa["testdev"]}
    (root / "gqa_testdev_questions.json").write_text(json.dumps({q: v for q, v in questions.items() if q in testdev}))
    nlvr2 = {}
    for split in ("train", "dev"):
        nlvr2[split] = [dict(identifier=f"{split}-{s}-{p}-0", img0=ids[(2 * s + p) % 6], img1=ids[(2 * s + p + 1) % 6],
                             label=(s + p) % 2, sent=f"there are {s + p} dogs", uid=f"nlvr2_{split}_{s}_{p}")
                        for s in range(6) for p in range(2)]
        pq.write_table(pa.Table.from_pylist(nlvr2[split], schema=NLVR2_SCHEMA),
                       corpus / "finetune" / f"nlvr2_{split}.parquet")
    for task in ("vqa", "gqa"):
        (corpus / "vocab" / f"{task}_answers.json").write_text(json.dumps(ANSWERS))
    world = {"root": root, "images": root / "images", "ids": ids, "corpus": corpus, "store": root / "store",
             "questions": root / "gqa_testdev_questions.json"}
    world["vqa"] = _finetune(world, "vqa", root / "run-vqa")
    world["nlvr2"] = _finetune(world, "nlvr2", root / "run-nlvr2")
    world["gqa"] = _finetune(world, "gqa", root / "run-gqa")
    return world


class _Page(HTMLParser):
    """The examples of a gallery page (or of a DOM dumped by the browser): their attributes and their own pictures
    (src, alt), grouped in cards (one card per image)."""

    def __init__(self, text: str):
        super().__init__()
        self.examples: list[dict] = []
        self.cards: list[dict] = []
        self.at: dict | None = None  # the example being read
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and a.get("class") == "card":
            self.cards.append({**a, "examples": []})
        elif tag == "article" and "ex" in (a.get("class") or "").split():
            self.at = {**a, "imgs": [], "alts": [], "noimg": 0}
            self.examples.append(self.at)
            self.cards[-1]["examples"].append(self.at)
        elif tag == "img" and self.at is not None:
            self.at["imgs"].append(a["src"])
            self.at["alts"].append(a["alt"])
        elif tag == "div" and a.get("class") == "noimg" and self.at is not None:
            self.at["noimg"] += 1

    def handle_endtag(self, tag):
        if tag == "article":
            self.at = None

    @property
    def shown(self) -> list[dict]:
        return [e for e in self.examples if "hidden" not in e]


def _fails(result, message):
    """Exit code 1 with `message` in one `error:` line, the last of the output (no traceback)."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("error: ") and message in lines[-1], result.output
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.output


def _gallery(world, task, out, *extra, images=None):
    return _ok("gallery", world[task], "--split", {"vqa": "minival", "gqa": "testdev", "nlvr2": "dev"}[task],
               "--images", images or world["images"], "--out", out, *extra)


def _records(world, task, split, **kw):
    return load_records(world[task], GalleryConfig(split=split, images=[str(world["images"])], **kw))


# ---------------------------------------------------------------------------------------------------- records


def test_vqa_records_are_predict_and_the_task_score(world, tmp_path):
    data = _records(world, "vqa", "minival")
    records, summary, task = data.records, data.summary, data.task
    assert [r.id for r in records] == data.dataset.ids and len(records) == 6 * len(QUESTIONS)
    # top-1 = lxm predict's answer
    _ok("predict", "vqa", "--checkpoint", world["vqa"], "--split", "minival", "--out", tmp_path / "p.json")
    predicted = {r["question_id"]: r["answer"] for r in json.loads((tmp_path / "p.json").read_text())}
    assert {r.id: r.prediction for r in records} == predicted
    # ground truth = the table's answers with their scores, best first; five predictions, probabilities descending
    table = pq.read_table(world["corpus"] / "finetune" / "vqa_minival.parquet").to_pylist()
    for r, row in zip(records, table):
        assert r.truth == sorted(((a, s) for a, s in row["label"]), key=lambda kv: -kv[1])
        assert r.types == {"answer_type": row["answer_type"], "question_type": row["question_type"]}
        assert len(r.top) == 5 and [p for _, p in r.top] == sorted((p for _, p in r.top), reverse=True)
        # the per-example score is the soft score of the predicted answer; right = full credit, partly = some
        assert r.score == round(100 * dict(r.truth).get(r.prediction, 0.0), 2)
        assert r.bucket == ("right" if r.score == 100 else "partial" if r.score > 0 else "wrong")
    # the summary is the task's own score; the per-example scores add up to it
    assert summary.metrics == task.score(data.dataset.ids, data.dataset.targets, predicted)
    assert summary.metrics["accuracy"] == pytest.approx(sum(r.score for r in records) / len(records), abs=0.01)
    assert (summary.right, summary.partial, summary.wrong) == tuple(
        sum(r.bucket == b for r in records) for b in ("right", "partial", "wrong"))
    assert summary.right + summary.partial + summary.wrong == len(records)
    assert 0 < summary.wrong < len(records), "the world must have both right and wrong examples"
    rows = {row.value: row for row in summary.by_type["answer_type"]}
    assert {v: row.count for v, row in rows.items()} == {"yes/no": 12, "number": 6, "other": 6}
    yes_no = [r for r in records if r.types["answer_type"] == "yes/no"]
    assert rows["yes/no"].score == pytest.approx(sum(r.score for r in yes_no) / len(yes_no), abs=0.01)


def test_nlvr2_records_and_summary(world):
    data = _records(world, "nlvr2", "dev")
    records, summary = data.records, data.summary
    assert set(summary.metrics) == {"accuracy", "consistency"} and summary.by_type == {}
    assert all(r.truth in ([("True", 1.0)], [("False", 1.0)]) and len(r.top) == 2 for r in records)
    assert all((r.bucket == "right") == (r.prediction == r.truth[0][0]) and r.score in (0.0, 100.0)
               for r in records)
    assert summary.partial == 0 and summary.right + summary.wrong == len(records)
    assert summary.metrics["accuracy"] == round(100 * summary.right / len(records), 2)
    assert [r.images for r in records] == data.dataset.images and all(len(r.images) == 2 for r in records)


def test_custom_tasks_show_in_the_gallery(world, tmp_path):
    """qa and classify runs (JSON lines over the same images) through the same records and page."""
    qa, cls = [], []
    for n, img in enumerate(world["ids"]):
        for k, (text, label, atype, qtype) in enumerate(QUESTIONS):
            qa.append({"question_id": 10 * n + k, "img_id": img, "question": text, "answer_type": atype,
                       "answers": [label[0][0]] * 8 + [label[-1][0]] * 2})
        cls += [{"id": f"{img}-{k}", "img_id": img, "text": t, "label": lab}
                for k, (t, lab) in enumerate((("a cat", "no"), ("a room", "yes")))]
    files = {}
    for task, rows in (("qa", qa), ("classify", cls)):
        files[task] = tmp_path / f"{task}.jsonl"
        files[task].write_text("".join(json.dumps(r) + "\n" for r in rows))
        run = tmp_path / f"run-{task}"
        _ok("finetune", task, "--config", "tiny", "--set", "from_scratch=true", "--set", f"vocab={BERT_VOCAB}",
            "--train", files[task], "--valid", files[task], "--features", world["store"], "--out", run,
            "--set", "epochs=1", "--set", "batch_size=4", "--set", "lr=1e-3")
        data = load_records(run, GalleryConfig(split="valid", images=[str(world["images"])]))
        assert len(data.records) == len(rows) and data.summary.task == task
        _ok("predict", task, "--checkpoint", run, "--split", "valid", "--out", tmp_path / f"{task}.out")
        metrics = json.loads(_ok("evaluate", task, "--annotations", files[task], "--predictions",
                                 tmp_path / f"{task}.out").output)
        assert data.summary.metrics["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.01)
        if task == "qa":  # soft VQA accuracy per question, the truth with its soft scores, per answer type
            assert {row.value for row in data.summary.by_type["answer_type"]} == {"yes/no", "number", "other"}
            assert all(r.truth[0][1] == 1.0 for r in data.records)
        else:
            assert set(data.summary.metrics) == {"accuracy", "macro_f1"}
            assert all(r.truth in ([("yes", 1.0)], [("no", 1.0)]) and r.score in (0.0, 100.0) for r in data.records)
        _ok("gallery", run, "--split", "valid", "--images", world["images"], "--out", tmp_path / f"g-{task}")
        assert len(_Page((tmp_path / f"g-{task}" / "index.html").read_text()).examples) == len(rows)


# ---------------------------------------------------------------------------------------------------- the page


def test_page_is_self_contained_and_escaped(world, tmp_path):
    out = tmp_path / "g"
    result = _gallery(world, "vqa", out, "--vocab-dir", FIXTURE / "vocab")
    assert f"wrote {out / 'index.html'}" in result.output
    html = (out / "index.html").read_text()
    page = _Page(html)
    records = _records(world, "vqa", "minival").records
    assert [e["data-id"] for e in page.examples] == [str(r.id) for r in records]  # all shown, dataset order
    assert [e["data-bucket"] for e in page.examples] == [r.bucket for r in records]
    assert [e["data-answer-type"] for e in page.examples] == [r.types["answer_type"] for r in records]
    # the question with markup in it is text, not markup: the only script is the page's own
    assert html.count("<script") == 1 and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp;" in html
    assert not any(s in html for s in ("http://", "https://", "//cdn", "src=\"/", "href=\"/"))
    srcs = [src for e in page.examples for src in e["imgs"]]  # each example its own picture (its attention)
    assert srcs == [f"assets/{r.id}.jpg" for r in records]  # referenced relatively
    assert [len(card["examples"]) for card in page.cards] == [len(QUESTIONS)] * 6  # one card per image
    assert "Boxes: on each example&#x27;s picture, the boxes most relevant to its predicted answer" in html
    for src in srcs:
        assert (out / src).stat().st_size > 5000 and (out / src).read_bytes()[:2] == b"\xff\xd8"
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".lxm-gallery.json", "assets", "index.html"]
    assert not list(tmp_path.glob(".g.*"))  # no temporary folder left beside it
    # the summary at the top: the split's score and the per-type tables
    data = _records(world, "vqa", "minival")
    s = data.summary
    assert (f'<b>{s.right}</b> right</span> (score 100) · <span class="b-partial"><b>{s.partial}</b> partly right'
            f'</span> (0 &lt; score &lt; 100) · <span class="b-wrong"><b>{s.wrong}</b> wrong</span> (score 0) of '
            f'<b>{len(records)}</b> examples') in html
    assert "<caption>answer type</caption>" in html and "<caption>question type</caption>" in html


def test_only_wrong_limit_and_rerun_replaces(world, tmp_path):
    records = _records(world, "vqa", "minival").records
    out = tmp_path / "g"
    result = _gallery(world, "vqa", out, "--only-wrong")
    wrong = [r for r in records if r.wrong]
    page = _Page((out / "index.html").read_text())
    assert [e["data-id"] for e in page.examples] == [str(r.id) for r in wrong]
    assert f"{len(wrong)} wrong" in result.output
    # a second run into OUT replaces the first: --limit keeps the first N in dataset order, with only their images
    _gallery(world, "vqa", out, "--limit", "3")
    page = _Page((out / "index.html").read_text())
    assert [e["data-id"] for e in page.examples] == [str(r.id) for r in records[:3]]
    assert sorted(p.name for p in (out / "assets").iterdir()) == sorted(f"{r.id}.jpg" for r in records[:3])


def test_nlvr2_page_shows_both_images(world, tmp_path):
    out = tmp_path / "g"
    _gallery(world, "nlvr2", out)
    html = (out / "index.html").read_text()
    page = _Page(html)
    data = _records(world, "nlvr2", "dev")
    # one card per image pair, holding every statement about that pair, each with its pictures of both images
    assert {e["data-id"]: e["imgs"] for e in page.examples} == \
        {str(r.id): [f"assets/{r.id}-0.jpg", f"assets/{r.id}-1.jpg"] for r in data.records}
    images = {str(r.id): r.images for r in data.records}
    assert all(alt.startswith(f"{img}; most attended boxes: ") for e in page.examples
               for alt, img in zip(e["alts"], images[e["data-id"]], strict=True))
    assert len(page.cards) == len({r.images for r in data.records}) < len(data.records)
    for name, value in data.summary.metrics.items():
        assert f"{value:.2f}".rstrip("0").rstrip(".") in html and f"</b> {name}</span>" in html


def test_drawn_boxes_are_the_most_attended(world, tmp_path):
    """Each example's picture of each of its images outlines the boxes its [CLS] attended to most (issue 28): the
    record's weights are the model's own last cross layer [CLS] -> boxes attention for that example and image
    (NLVR2: its two rows), and the boxes drawn (labelled "attribute object weight", listed in the picture's alt
    text) are the --boxes largest of them, strongest first, their outlines in the picture."""
    data = _records(world, "nlvr2", "dev", explain_method="attention")
    _, _, model = load_run(world["nlvr2"])
    model.eval()
    for r in data.records[:3]:  # one example at a time: rows 0 and 1 are its left and right image
        batch = collate_finetune([data.dataset[data.dataset.ids.index(r.id)]])
        with torch.no_grad():
            probs = model(**batch.model_inputs(), output_attentions=True).cross_attentions[-1]
        assert len(r.attention) == 2
        for k in range(2):
            np.testing.assert_allclose(r.attention[k], probs[k, :, 0, :].mean(0).numpy(), rtol=1e-5, atol=1e-7)
            assert r.attention[k].shape == (10,) and abs(float(r.attention[k].sum()) - 1) < 1e-5
    out = tmp_path / "g"
    _gallery(world, "nlvr2", out, "--boxes", "3", "--explain-method", "attention")
    page = _Page((out / "index.html").read_text())
    by_id = {str(r.id): r for r in data.records}
    assert sorted(e["data-id"] for e in page.examples) == sorted(by_id)
    for e in page.examples:
        r = by_id[e["data-id"]]
        for alt, src, img, weights in zip(e["alts"], e["imgs"], r.images, r.attention):
            rec = data.dataset.record(img)
            name, listed = alt.split("; most attended boxes: ")
            labels = [label.rsplit(" ", 1) for label in listed.split(", ")]
            top = [int(i) for i in np.argsort(-weights, kind="stable")[:3]]
            assert name == img and [n for n, _ in labels] == [f"attr{rec.attrs_id[i]} obj{rec.objects_id[i]}"
                                                              for i in top]
            digits = len(labels[0][1].split(".")[1])
            assert [w for _, w in labels] == [f"{weights[i]:.{digits}f}" for i in top]
            assert min(weights[top]) >= max(np.delete(weights, top))  # no box left out weighs more
            # the strongest box's outline is drawn: the picture differs from the plain image along it
            bgr, scaled = load_asset(next((world["images"] / "sub").glob(f"{img}.*")), rec)
            drawn = cv2.imread(str(out / src)).astype(np.float32)
            h, w = bgr.shape[:2]
            x1, y1, x2, y2 = (min(max(round(float(v)), 0), side - 1)
                              for v, side in zip(scaled.boxes[top[0]], (w, h, w, h)))
            edge = np.zeros((h, w), bool)
            edge[y1:y2 + 1, [x1, x2]] = edge[[y1, y2], x1:x2 + 1] = True
            diff = np.abs(drawn - bgr.astype(np.float32)).mean(-1)
            assert diff[edge].mean() > 3 * diff.mean() and diff[edge].mean() > 30, (img, src)


def test_gqa_structural_types_from_questions(world, tmp_path):
    out = tmp_path / "g"
    _gallery(world, "gqa", out)
    html = (out / "index.html").read_text()
    assert "No accuracy per structural type: pass --questions" in html and "data-structural" not in html
    _gallery(world, "gqa", out, "--questions", world["questions"])
    page = _Page((out / "index.html").read_text())
    assert [e["data-structural"] for e in page.examples] == STRUCTURAL * 6
    data = _records(world, "gqa", "testdev", questions=str(world["questions"]))
    rows = {row.value: row.count for row in data.summary.by_type["structural"]}
    assert rows == {"verify": 6, "query": 12, "logical": 6}


def test_missing_images(world, tmp_path):
    some = tmp_path / "some"
    some.mkdir()
    for img in world["ids"][1:]:
        shutil.copy(world["images"] / "sub" / f"{img}.jpg", some)
    out = tmp_path / "g"
    result = _gallery(world, "vqa", out, images=some)
    assert "warning:" in result.output and f"{len(QUESTIONS)} of the 24 shown examples have an image not found" \
        in result.output
    page = _Page((out / "index.html").read_text())
    records = _records(world, "vqa", "minival").records
    assert [e["noimg"] for e in page.examples] == [int(r.images[0] == world["ids"][0]) for r in records]
    assert "image not found" in (out / "index.html").read_text()

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(world["images"] / "sub" / f"{world['ids'][0]}.jpg", other / "unrelated.jpg")
    result = _invoke("gallery", world["vqa"], "--split", "minival", "--images", other, "--out", tmp_path / "g2")
    _fails(result, "none of the 6 images of the shown examples is there")
    assert not (tmp_path / "g2").exists() and not list(tmp_path.glob(".g2.*"))


def test_errors_are_one_line(world, tmp_path):
    pre = tmp_path / "pre"
    pre.mkdir()
    # a pretraining run's config: whole, with no field 'task'
    (pre / "config.yaml").write_text(load_config("tiny", ["corpus=c", "features=[f]"]).to_yaml())
    not_run = tmp_path / "empty"
    not_run.mkdir()
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    cases = [([pre, "--split", "minival"], "a pretraining run"),
             ([not_run, "--split", "minival"], "not an lxm finetuning run"),
             ([world["vqa"], "--split", "nosuch"], "vqa_nosuch.parquet: no such table"),
             ([world["vqa"], "--split", "test"], "has no labels"),
             ([world["vqa"], "--split", "minival", "--questions", world["questions"]], "is a vqa run")]
    for args, message in cases:
        result = _invoke("gallery", *args, "--images", world["images"], "--out", tmp_path / "g")
        _fails(result, message)
        assert not (tmp_path / "g").exists()
    result = _invoke("gallery", world["vqa"], "--split", "minival", "--images", world["images"], "--out", stranger)
    _fails(result, "holds no lxm gallery")
    result = _invoke("gallery", world["vqa"], "--split", "minival", "--images", tmp_path / "nowhere", "--out",
                     tmp_path / "g")
    _fails(result, "nowhere: not a directory")
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_page_writer_needs_no_torch():
    code = "import sys, lxm.gallery.page, lxm.gallery.records; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------- browser


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium not installed (apt-get install chromium)")
    return found


def _browse(chromium: str, page: Path, *flags: str, hash: str = "") -> str:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", *flags,
           page.resolve().as_uri() + hash]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.browser
def test_page_filters_in_a_browser(world, tmp_path):
    chromium = _chromium()
    out = tmp_path / "g"
    _gallery(world, "vqa", out, "--vocab-dir", FIXTURE / "vocab")
    records = _records(world, "vqa", "minival").records
    index = out / "index.html"
    wrong = [str(r.id) for r in records if r.wrong]
    yes_no = [str(r.id) for r in records if r.types["answer_type"] == "yes/no"]
    both = [str(r.id) for r in records if r.wrong and r.types["answer_type"] == "yes/no"]
    for hash, expected in (("", [str(r.id) for r in records]), ("#wrong=1", wrong), ("#answer_type=yes/no", yes_no),
                           ("#wrong=1&answer_type=yes%2Fno", both), ("#q=sunny", [str(r.id) for r in records
                                                                                 if r.text == "is it sunny?"])):
        text = _browse(chromium, index, "--dump-dom", hash=hash)
        dom = _Page(text)
        assert len(dom.examples) == len(records)
        assert [e["data-id"] for e in dom.shown] == expected, hash
        assert f"showing {len(expected)} of {len(records)}" in text
    shot = tmp_path / "gallery.png"
    _browse(chromium, index, f"--screenshot={shot}", "--window-size=1280,2000", hash="#wrong=1")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_drawn_boxes_default_to_the_relevance_for_the_predicted_answer(world, tmp_path):
    """Without --explain-method the gallery's box weights are the relevance shares of each example's predicted answer
    (`lxm.infer.explain.explain_batch`), the example explained alone giving the same as in its batch, and the page
    highlights each word of the text by its share (the two images' relevance added up)."""
    from lxm.infer.explain import explain_batch, word_shares

    data = _records(world, "nlvr2", "dev")
    _, task, model = load_run(world["nlvr2"])
    for r in data.records[:3]:
        batch = collate_finetune([data.dataset[data.dataset.ids.index(r.id)]])
        logits, boxes, words = explain_batch(task, model, batch.model_inputs(), "relevance")
        assert r.top[0][0] == task.top(logits, 1)[0][0][0]
        for k in range(2):  # rows 0 and 1: the left and right image
            np.testing.assert_allclose(r.attention[k], boxes[k].numpy(), rtol=1e-4, atol=1e-6)
            assert abs(float(r.attention[k].sum()) - 1) < 1e-5
        expected = word_shares(data.dataset.tokenizer, r.text, words.sum(0).numpy())
        assert [w for w, _ in r.words] == r.text.split() == [w for w, _ in expected]
        np.testing.assert_allclose([s for _, s in r.words], [s for _, s in expected], rtol=1e-4, atol=1e-6)
    out = tmp_path / "g"
    _gallery(world, "nlvr2", out)
    html = (out / "index.html").read_text()
    r = data.records[0]
    top = max(s for _, s in r.words)
    marks = " ".join(f'<mark style="background:rgba(255,200,0,{s / top:.2f})" title="share {s:.3f}"><bdi>'
                     f'{html_escape(w)}</bdi></mark>' for w, s in r.words)
    assert f'<p class="text"><bdi>{marks}</bdi></p>' in html
