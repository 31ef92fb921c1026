"""The pictures lxm draws: `lxm show` on LXMERT's released rows (names, upscaling, label layout) and `lxm plot` on
hand-written logs (series drawn once, coinciding metrics each visible, whole epochs on the axis)."""

from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pytest
from conftest import SHARED
from typer.testing import CliRunner

from lxm.cli import app
from lxm.features.records import ImageFeatures
from lxm.features.tsv import read_tsv

SAMPLE = SHARED / "fixtures" / "butd-coco-sample"


@pytest.fixture(scope="module")
def rows():
    return list(read_tsv(SAMPLE / "train2014_obj36.tsv"))


def _assert_layout(drawing):
    height, width = drawing.image.shape[:2]
    for label in drawing.labels:
        x1, y1, x2, y2 = label.rect
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, label  # never cut by the border
    for a, b in itertools.combinations(drawing.labels, 2):
        assert not (a.rect[0] < b.rect[2] and b.rect[0] < a.rect[2] and a.rect[1] < b.rect[3]
                    and b.rect[1] < a.rect[3]), (a, b)


def test_show_labels_every_released_box_with_vocabulary_names_without_overlap(rows):
    from lxm.extract.draw import load_vocab
    from lxm.extract.show import render

    objects, attributes = load_vocab(SAMPLE / "vocab" / "objects_vocab.txt"), load_vocab(
        SAMPLE / "vocab" / "attributes_vocab.txt")
    for rec in rows:
        image = cv2.imread(str(SAMPLE / "images" / f"{rec.img_id}.jpg"))
        drawing = render(image, rec, objects, attributes)
        assert max(drawing.image.shape[:2]) >= 800 and drawing.scale > 1  # COCO's 500-640 px images, upscaled
        assert len(drawing.labels) == rec.num_boxes and not drawing.unlabelled, rec.img_id  # 36 boxes, all labelled
        _assert_layout(drawing)
        for label in drawing.labels:
            i = label.box
            assert label.text == f"{attributes[rec.attrs_id[i]]} {objects[rec.objects_id[i]]} {rec.objects_conf[i]:.2f}"
            x1, y1, x2, y2 = label.rect  # the label's background was painted: it shows
            assert (drawing.image[y1:y2, x1:x2] != cv2.resize(image, drawing.image.shape[1::-1])[y1:y2, x1:x2]).any()


def test_show_command_writes_the_upscaled_picture(tmp_path, rows):
    assert CliRunner().invoke(app, ["convert", "tsv", str(SAMPLE / "train2014_obj36.tsv"), str(tmp_path / "s")]
                              ).exit_code == 0
    rec = rows[0]
    result = CliRunner().invoke(app, ["show", str(tmp_path / "s"), rec.img_id, "--image",
                                      str(SAMPLE / "images" / f"{rec.img_id}.jpg"), "--out", str(tmp_path / "b.png"),
                                      "--vocab", str(SAMPLE / "vocab"), "--top", "5"])
    assert result.exit_code == 0, result.output
    picture = cv2.imread(str(tmp_path / "b.png"))
    assert picture.shape[:2] == (round(rec.img_h * 800 / rec.img_w), 800)


def _crowded(n: int, h: int, w: int) -> ImageFeatures:
    """n boxes all on the same spot of a small h x w image: the hard case for label placement."""
    return ImageFeatures(img_id="crowd", img_h=h, img_w=w, objects_id=np.arange(n) % 5, attrs_id=np.arange(n) % 3,
                         objects_conf=np.linspace(0.9, 0.1, n, dtype=np.float32), attrs_conf=np.ones(n, np.float32),
                         boxes=np.tile(np.array([[10, 10, 40, 30]], np.float32), (n, 1)),
                         features=np.zeros((n, 4), np.float32))


def test_show_places_crowded_labels_apart_and_inside_a_small_image():
    from lxm.extract.show import render

    image = np.full((48, 64, 3), 200, np.uint8)
    drawing = render(image, _crowded(36, 48, 64))
    assert drawing.image.shape[:2] == (600, 800)
    assert len(drawing.labels) + len(drawing.unlabelled) == 36 and len(drawing.labels) >= 30
    assert any(label.leader for label in drawing.labels)  # those far from their box are tied to it by a line
    _assert_layout(drawing)
    assert drawing.labels[0].text == "attr0 obj0 0.90"  # ids without a vocabulary, strongest first
    # a name wider than the picture is drawn smaller, not cut
    wide = render(image, _crowded(1, 48, 64), objects=["x" * 120] * 5, attributes=["a"] * 3, long_side=200)
    _assert_layout(wide)


def _plot(tmp_path, records):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    from lxm.train.plot import losses_figure, read_log, validation_figure

    train, valid = read_log(run)
    return losses_figure(train, "run") if train else None, validation_figure(valid, "run") if valid else None


def _integer_ticks(ax):
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def test_plot_of_one_epoch_has_whole_epoch_ticks(tmp_path):
    _, fig = _plot(tmp_path, [{"step": 1, "epoch": 0, "loss": 2.0, "vqa": 2.0},
                              {"step": 1, "epoch": 0, "valid": {"accuracy": 50.0}}])
    (ax,) = fig.axes
    assert _integer_ticks(ax) and 0 in ax.get_xticks()


def test_plot_keeps_three_coinciding_scores_distinct_and_merges_equal_losses(tmp_path):
    # pretraining logs qa_acc as a fraction: drawn in percent, on the accuracies' scale
    scores = [{"accuracy": a, "consistency": a, "qa_acc_vqa": a / 100} for a in (40.0, 55.0, 55.0)]
    losses = [{"loss": 3.0 - e, "mlm": 3.0 - e, "obj": 0.0} for e in range(3)]  # obj 0: nothing to draw on a log axis
    records = [{"step": 10 * (e + 1), "epoch": e, "loss": 1.0 / (e + 1), "mlm": 1.0 / (e + 1), "match": 0.5}
               for e in range(3)]
    records += [{"step": 10 * (e + 1), "epoch": e, "valid": {**scores[e], **losses[e]}} for e in range(3)]
    train_fig, valid_fig = _plot(tmp_path, records)
    assert [ln.get_label() for ln in train_fig.axes[0].get_lines()] == ["loss = mlm", "match"]
    loss_ax, score_ax = valid_fig.axes
    assert [ln.get_label() for ln in loss_ax.get_lines()] == ["loss = mlm"]
    lines = score_ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["accuracy", "consistency (= accuracy)",
                                                "qa_acc_vqa (= accuracy, consistency)"]
    assert len({(ln.get_linestyle(), ln.get_marker()) for ln in lines}) == 3
    widths = [ln.get_linewidth() for ln in lines]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 3  # each later one thinner, on top
    assert _integer_ticks(loss_ax) and _integer_ticks(score_ax)
