"""`lxm gallery` pages as a reader sees them: right / partly right / wrong counts that agree with the accuracy (the
mean score, percent), a score per prediction, one card per image, per-label precision and recall, the order by
confidence, the layout at a phone's width and bidi-isolated user text (headless Chromium), and the output folder:
its lock, what a second gallery replaces (only the gallery's own files), a huge image as one line.

The world: four small images with matching synthetic features (tests/synthetic.py) and two tiny models finetuned
from scratch through the CLI on JSON lines over them: `qa` (ten annotator answers: soft scores) and `classify`."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import BERT_VOCAB
from synthetic import COLORS, OBJECTS, F, N, image
from typer.testing import CliRunner

from lxm.cli import app
from lxm.features.store import FeatureStoreWriter
from lxm.gallery.assets import asset_name
from lxm.gallery.build import GalleryConfig, load_records

RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: reverses the text after it up to the end of its paragraph (or isolate)
LABELS = ["yes", "no", "maybe"]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(*args):
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pages")
    rng = np.random.default_rng(3)
    (root / "images").mkdir()
    ids = [f"img{i}" for i in range(4)]
    with FeatureStoreWriter(root / "store", num_boxes=N, feature_dim=F, dtype="float32") as w:
        for i, img in enumerate(ids):
            w.add(image(img, i % len(OBJECTS), i % len(COLORS), rng))  # features of a 100 x 100 image
            cv2.imwrite(str(root / "images" / f"{img}.jpg"), rng.integers(0, 255, (100, 100, 3), dtype=np.uint8))
    qa, cls = [], []
    for n, img in enumerate(ids):
        # every answer of the table given by two of the ten annotators: any prediction earns partial credit
        qa.append({"question_id": f"q{n}a", "img_id": img, "question": "what is it?", "answer_type": "other",
                   "answers": [a for a in ("yes", "no", "red", "blue", "cat") for _ in range(2)]})
        qa.append({"question_id": f"q{n}b", "img_id": img, "question": "is it red?", "answer_type": "yes/no",
                   "answers": ["yes"] * 9 + ["no"]})
        qa.append({"question_id": f"q{n}c", "img_id": img, "question": "how many?", "answer_type": "number",
                   "answers": ["cat"] * 10})
        for k in range(3):
            cls.append({"id": f"{img}-{k}", "img_id": img, "text": f"statement {k} on {img}",
                        "label": LABELS[(n + k) % 3]})
    cls[0]["id"] = f"rlo-{RLO}id"  # a bidi override in an id, a text and a label
    cls[1]["text"] = f"{RLO}a cat on the left of a dog"
    cls[2]["label"] = f"{RLO}maybe"
    files = {"qa": _jsonl(root / "qa.jsonl", qa), "classify": _jsonl(root / "classify.jsonl", cls)}
    world = {"root": root, "images": root / "images", "ids": ids, "store": root / "store", "rows": {"qa": qa,
                                                                                                   "classify": cls}}
    for task, path in files.items():
        world[task] = root / f"run-{task}"
        _ok("finetune", task, "--config", "tiny", "--set", "from_scratch=true", "--set", f"vocab={BERT_VOCAB}",
            "--train", path, "--valid", path, "--features", root / "store", "--out", world[task], "--set", "epochs=1",
            "--set", "batch_size=4", "--set", "lr=1e-3")
    return world


def _records(world, task):
    return load_records(world[task], GalleryConfig(split="valid", images=[str(world["images"])]))


def _gallery(world, task, out, *extra):
    return _invoke("gallery", world[task], "--split", "valid", "--images", world["images"], "--out", out, *extra)


class _Node:
    def __init__(self, tag: str, attrs: dict, parent: _Node | None):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], ""

    def find_all(self, tag: str, cls: str | None = None) -> list[_Node]:
        found = []
        for c in self.children:
            if c.tag == tag and (cls is None or cls in (c.attrs.get("class") or "").split()):
                found.append(c)
            found.extend(c.find_all(tag, cls))
        return found

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class _Tree(HTMLParser):
    """A gallery page as a tree of elements (enough of HTML for the page lxm writes)."""

    VOID = {"meta", "img", "input", "br", "link"}

    def __init__(self, text: str):
        super().__init__()
        self.root = self.at = _Node("root", {}, None)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, dict(attrs), self.at)
        self.at.children.append(node)
        if tag not in self.VOID:
            self.at = node

    def handle_endtag(self, tag):
        node = self.at
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.at = node.parent

    def handle_data(self, data):
        self.at.children.append(_Node("#text", {}, self.at))
        self.at.children[-1].text = data


def _cells(table: _Node) -> list[list[str]]:
    return [[td.all_text() for td in tr.find_all("td")] for tr in table.find_all("tr") if tr.find_all("td")]


# ---------------------------------------------------------------------------------------------------- the page


def test_buckets_agree_with_the_accuracy_and_every_score_is_a_percent(world, tmp_path):
    """Right = score 100, partly right = 0 < score < 100, wrong = 0; the accuracy is the mean score (issue 27
    item 21: the page said "7 of 10 right" beside "56 accuracy", counting partial credit as right)."""
    data = _records(world, "qa")
    records, s = data.records, data.summary
    scores = [r.score for r in records]
    assert (s.right, s.partial, s.wrong) == (sum(x == 100 for x in scores), sum(0 < x < 100 for x in scores),
                                             sum(x == 0 for x in scores))
    assert s.partial >= len(world["ids"]), "every 'what is it?' earns partial credit"
    assert s.metrics["accuracy"] == pytest.approx(sum(scores) / len(scores), abs=0.01)
    out = tmp_path / "g"
    result = _gallery(world, "qa", out)
    assert result.exit_code == 0, result.output
    acc = f"{s.metrics['accuracy']:g}%"
    assert (f"qa valid: accuracy {acc} over {len(records)} examples ({s.right} right, {s.partial} partly right, "
            f"{s.wrong} wrong; the accuracy is the mean score)") in result.output
    tree = _Tree((out / "index.html").read_text(encoding="utf-8")).root
    summary = tree.find_all("section", "summary")[0].all_text()
    assert f"{acc} accuracy" in summary.replace("\xa0", " ")
    assert (f"{s.right} right (score 100) · {s.partial} partly right (0 < score < 100) · {s.wrong} wrong (score 0) "
            f"of {len(records)} examples; the accuracy is their mean score") in summary
    by_id = {str(r.id): r for r in records}
    articles = tree.find_all("article", "ex")
    assert sorted(a.attrs["data-id"] for a in articles) == sorted(by_id)
    for a in articles:
        r = by_id[a.attrs["data-id"]]
        assert a.attrs["data-bucket"] == r.bucket and r.bucket in a.attrs["class"].split()
        verdict = a.find_all("p", "verdict")[0].all_text()
        assert verdict.startswith({"right": "right", "partial": "partly right", "wrong": "wrong"}[r.bucket])
        assert f"score {r.score:g}%" in verdict
        truth, top = (_cells(t) for t in a.find_all("table"))
        assert truth == [[ans, f"{100 * sc:.2f}".rstrip("0").rstrip(".") + "%"] for ans, sc in r.truth]
        # each prediction with the score it would earn; the first one's is the example's
        truth_score = dict(r.truth)
        assert [row[-1] for row in top] == [f"{100 * truth_score.get(ans, 0):.2f}".rstrip("0").rstrip(".") + "%"
                                            for ans, _ in r.top]
        assert top[0][-1] == f"{r.score:g}%"
    # the per-type table is in percent too
    other = {row.value: row for row in s.by_type["answer_type"]}["other"]
    assert f"{other.score:g}%" in tree.find_all("table", "types")[0].all_text()


def test_classify_page_has_label_scores_precision_recall_and_one_card_per_image(world, tmp_path):
    data = _records(world, "classify")
    records, s = data.records, data.summary
    out = tmp_path / "g"
    assert _gallery(world, "classify", out).exit_code == 0
    tree = _Tree((out / "index.html").read_text(encoding="utf-8")).root
    # one card per image, holding all its examples in dataset order, each with its own picture (its attention)
    cards = tree.find_all("section", "card")
    assert [[a.attrs["data-id"] for a in c.find_all("article", "ex")] for c in cards] == \
        [[str(r.id) for r in records if r.images == (img,)] for img in world["ids"]]
    assert [[i.attrs["src"] for i in a.find_all("img")] for a in tree.find_all("article", "ex")] == \
        [[f"assets/{asset_name(r.id)}"] for r in records]
    assert asset_name(f"rlo-{RLO}id").startswith("ex-")  # an id that is no plain file name: a digest
    # labels: a score per prediction (100% for the true label, else 0%) and the example's score
    for a, r in zip(tree.find_all("article", "ex"), records):
        assert [row[-1] for row in _cells(a.find_all("table", "top")[0])] == \
            ["100%" if ans == r.truth[0][0] else "0%" for ans, _ in r.top]
        assert r.bucket in ("right", "wrong") and f"score {r.score:g}%" in a.all_text()
    # precision and recall per label, counted here from the records
    table = tree.find_all("table", "labels")[0]
    rows = {row[0]: row[1:] for row in _cells(table)}
    labels = {r.truth[0][0] for r in records} | {r.prediction for r in records}
    assert set(rows) == labels
    for label in labels:
        true = sum(r.truth[0][0] == label for r in records)
        predicted = sum(r.prediction == label for r in records)
        both = sum(r.truth[0][0] == label == r.prediction for r in records)

        def pct(num, den):
            return "–" if den == 0 else f"{100 * num / den:.2f}".rstrip("0").rstrip(".") + "%"

        assert rows[label] == [str(true), str(predicted), pct(both, predicted), pct(both, true)], label
    assert [(row.label, row.support, row.predicted, row.correct) for row in s.by_label] == \
        [(lab, int(v[0]), int(v[1]), sum(r.truth[0][0] == lab == r.prediction for r in records))
         for lab, v in rows.items()]


# ---------------------------------------------------------------------------------------------------- browser


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium not installed (apt-get install chromium)")
    return found


_PROBE = """<script>
window.addEventListener('load', function () {
  var root = document.documentElement, width = root.clientWidth, over = [];
  document.querySelectorAll('body *').forEach(function (el) {
    var r = el.getBoundingClientRect();
    if (r.width && r.right > width + 0.5) { over.push(el.tagName + '.' + el.className); }
  });
  // per verdict line: is each child after the one before it (to its right on the same line, or below it)?
  var lines = Array.prototype.map.call(document.querySelectorAll('p.verdict'), function (p) {
    var boxes = Array.prototype.map.call(p.children, function (c) { return c.getBoundingClientRect(); });
    return boxes.slice(1).map(function (b, i) {
      var a = boxes[i];
      return a.top < b.bottom && b.top < a.bottom ? a.right <= b.left + 0.5 : b.top >= a.bottom - 0.5;
    });
  });
  var order = Array.prototype.map.call(document.querySelectorAll('article.ex'), function (a) {
    return a.hasAttribute('hidden') ? null : a.getAttribute('data-id');
  }).filter(function (x) { return x !== null; });
  parent.postMessage(JSON.stringify({inner: window.innerWidth, client: width, scroll: root.scrollWidth,
                                     over: over.slice(0, 20), verdicts: lines, order: order}), '*');
});
</script>"""

# headless Chromium's window is at least 500 px wide: the page is opened in an iframe of the width to test
_FRAME = """<!doctype html><html><body style="margin:0"><iframe src="SRC" style="border:0;width:WIDTHpx;height:900px">
</iframe><pre id="probe"></pre><script>
window.addEventListener('message', function (e) { document.getElementById('probe').textContent = e.data; });
</script></body></html>"""


def _probe(chromium: str, out: Path, width: int, *, hash: str = "", html: str | None = None,
           shot: Path | None = None) -> dict:
    """Open a copy of OUT/index.html (beside it, so its pictures load) with a probe script, `width` pixels wide;
    the probe's measurements of the laid-out page."""
    text = html if html is not None else (out / "index.html").read_text(encoding="utf-8")
    (out / "probe-page.html").write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    frame = out / "probe.html"
    frame.write_text(_FRAME.replace("SRC", "probe-page.html" + hash).replace("WIDTH", str(width)), encoding="utf-8")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000",
           f"--window-size={width + 20},920"]
    done = subprocess.run([*cmd, "--dump-dom", frame.resolve().as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = next(n for n in _Tree(done.stdout).root.find_all("pre") if n.attrs.get("id") == "probe").all_text()
    if shot is not None:
        subprocess.run([*cmd, f"--screenshot={shot}", frame.resolve().as_uri()], capture_output=True, timeout=120,
                       check=True)
    frame.unlink()
    (out / "probe-page.html").unlink()
    assert probe, "the probe did not report (the page did not load?)"
    return json.loads(probe)


@pytest.mark.browser
@pytest.mark.parametrize("task", ["qa", "classify"])
def test_page_reflows_at_a_phone_width(world, tmp_path, task):
    chromium = _chromium()
    out = tmp_path / "g"
    assert _gallery(world, task, out).exit_code == 0
    for width in (400, 1280):
        probe = _probe(chromium, out, width)
        assert probe["inner"] == width, probe
        assert probe["scroll"] <= probe["client"], f"{width} px: wider than the window: {probe['over']}"
        assert probe["over"] == [], probe["over"]


@pytest.mark.browser
def test_bidi_overrides_in_user_text_stay_isolated(world, tmp_path):
    """U+202E in an id, a text and a label reorders only itself: every piece of text is in a <bdi>, and in the
    browser the parts of each verdict line (verdict, id, score, confidence) stay left to right."""
    chromium = _chromium()
    out = tmp_path / "g"
    assert _gallery(world, "classify", out).exit_code == 0
    html = (out / "index.html").read_text(encoding="utf-8")
    # (the text's words are highlighted by relevance, each in its own <bdi>, the sentence in one around them)
    for text in (f"rlo-{RLO}id", f"{RLO}a", f"{RLO}maybe"):
        assert f"<bdi>{text}</bdi>" in html
    # every piece of text holding the override is all of a <bdi> (in attributes it is never laid out)
    nodes = [n for n in _Tree(html).root.find_all("#text") if RLO in n.text]
    assert len(nodes) >= 3 and all(n.parent.tag == "bdi" and len(n.parent.children) == 1 for n in nodes)
    probe = _probe(chromium, out, 1280)
    assert probe["verdicts"] and all(all(line) for line in probe["verdicts"]), probe["verdicts"]
    # the check can fail: the same page without the isolation reorders the line holding the id
    bare = _probe(chromium, out, 1280, html=html.replace("<bdi>", "").replace("</bdi>", ""))
    assert [all(line) for line in bare["verdicts"]] == [r.id != f"rlo-{RLO}id" for r in _records(world,
                                                                                                  "classify").records]


@pytest.mark.browser
def test_order_by_confidence(world, tmp_path):
    chromium = _chromium()
    out = tmp_path / "g"
    assert _gallery(world, "qa", out).exit_code == 0
    records = _records(world, "qa").records
    conf = {str(r.id): r.confidence for r in records}
    cards = {}
    for r in records:
        cards.setdefault(r.images, []).append(str(r.id))
    for hash, sign, pick in (("#sort=confident", -1, min), ("#sort=unsure", 1, min), ("", 0, None)):
        order = _probe(chromium, out, 1280, hash=hash)["order"]
        if not sign:
            assert order == [str(r.id) for r in records]
            continue
        # the page rounds the confidence to 6 decimals; ties keep the dataset order
        key = {i: sign * round(c, 6) for i, c in conf.items()}
        within = [sorted(ids, key=lambda i: key[i]) for ids in cards.values()]
        expected = [i for ids in sorted(within, key=lambda ids: pick(key[i] for i in ids)) for i in ids]
        assert order == expected, hash
    # filters and order together: the wrong ones, least confident first
    wrong = [str(r.id) for r in records if r.wrong]
    order = _probe(chromium, out, 1280, hash="#verdict=wrong&sort=unsure")["order"]
    assert sorted(order) == sorted(wrong)


# ---------------------------------------------------------------------------------------------------- the folder


def test_second_gallery_into_a_folder_being_written_fails_at_once(world, tmp_path):
    out = tmp_path / "g"
    assert _gallery(world, "classify", out).exit_code == 0
    before = (out / "index.html").read_bytes()
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a gallery writing into OUT holds
        result = _gallery(world, "classify", out, "--limit", "1")
    finally:
        os.close(fd)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines == [f"error: {out}: another lxm gallery is writing into this folder (it "
                                               f"holds {out / '.lock'}); wait for it to finish or choose another --out"]
    assert (out / "index.html").read_bytes() == before
    # released at the end of a run: the next one goes through
    assert _gallery(world, "classify", out, "--limit", "1").exit_code == 0
    assert (out / "index.html").read_bytes() != before


def test_a_second_gallery_replaces_only_its_own_files(world, tmp_path):
    """Issue 27 item 27: a user's notes.txt and data/ beside a gallery survived nothing (exit 0)."""
    out = tmp_path / "g"
    assert _gallery(world, "qa", out).exit_code == 0
    (out / "notes.txt").write_text("my notes")
    (out / "data").mkdir()
    (out / "data" / "x.csv").write_text("1,2")
    (out / "assets" / "mine.txt").write_text("kept")
    manifest = json.loads((out / ".lxm-gallery.json").read_text())
    assert manifest["files"] == ["index.html", *(f"assets/{row['question_id']}.jpg" for row in world["rows"]["qa"])]
    result = _gallery(world, "classify", out, "--limit", "3")  # the first image's examples only
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "my notes" and (out / "data" / "x.csv").read_text() == "1,2"
    first = [asset_name(row["id"]) for row in world["rows"]["classify"][:3]]
    assert sorted(p.name for p in (out / "assets").iterdir()) == sorted([*first, "mine.txt"])
    assert "lxm gallery: classify valid" in (out / "index.html").read_text(encoding="utf-8")
    assert json.loads((out / ".lxm-gallery.json").read_text())["files"] == ["index.html",
                                                                             *(f"assets/{f}" for f in first)]
    # a gallery written before the manifest: its page's pictures are its files
    assert _gallery(world, "qa", out).exit_code == 0
    (out / ".lxm-gallery.json").unlink()
    shutil.copy(world["images"] / "img1.jpg", out / "assets" / "copy.jpg")  # a user's picture: not on the page
    assert _gallery(world, "qa", out, "--limit", "1").exit_code == 0
    assert sorted(p.name for p in (out / "assets").iterdir()) == ["copy.jpg", "mine.txt", "q0a.jpg"]
    assert (out / "notes.txt").exists() and (out / "data" / "x.csv").exists()
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".lxm-gallery.json", "assets", "data", "index.html",
                                                     "notes.txt"]


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height, with one row of pixel data (decoding would need ~3 B a pixel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x80" * (3 * width))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b""))


def test_a_huge_image_is_one_line(world, tmp_path):
    """Issue 27 item 28: a huge image gave a cv2 traceback; it is that image's failure: a note on its card and one
    warning line, the page is written."""
    images = tmp_path / "images"
    shutil.copytree(world["images"], images)
    (images / "img2.jpg").unlink()
    _png_header(images / "img2.png", 12_000, 12_000)  # 144 Mpx
    out = tmp_path / "g"
    result = _invoke("gallery", world["classify"], "--split", "valid", "--images", images, "--out", out)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 1 images could not be drawn (e.g. img2: ")
    assert str(images / "img2.png") in warnings[0]
    tree = _Tree((out / "index.html").read_text(encoding="utf-8")).root
    notes = [d.all_text() for d in tree.find_all("div", "noimg")]  # on each example of img2
    on_img2 = [row["id"] for row in world["rows"]["classify"] if row["img_id"] == "img2"]
    assert len(notes) == len(on_img2) == 3 and all(n.startswith(f"image not drawn: {images / 'img2.png'}: ")
                                                   for n in notes)
    assert sorted(p.name for p in (out / "assets").iterdir()) == sorted(
        asset_name(row["id"]) for row in world["rows"]["classify"] if row["img_id"] != "img2")
