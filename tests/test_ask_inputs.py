"""Wrong inputs to `lxm ask` and `lxm predict` (issue 27): each is one line naming the user's file or option, given
before the model or the detector runs; the model's own sizes (features, vocabulary, answer table) are checked
against what it is given; the `--explain` picture tells near-uniform attention apart.

The world is test_ask's, smaller: two COCO fixture images extracted with the tiny random-weight detector, a VQA
table and a classification file over them, one tiny model of each finetuned from scratch through the CLI.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import BERT_VOCAB, tiny_fixture_store
from typer.testing import CliRunner

from lxm.cli import app
from lxm.corpus.build import VQA_SCHEMA
from lxm.features.records import ImageFeatures
from lxm.infer import load_answerer
from lxm.infer.explain import render_attention, shade_levels, weight_summary
from lxm.model import LxmertForFinetuning, save_lxm
from lxm.infer.runs import load_run, predict_run

STEMS = ["COCO_train2014_000000084002", "COCO_train2014_000000131486"]
ANSWERS = ["red", "blue", "dog", "cat"]
QUESTIONS = ["what is in the picture?", "what color is it?", "how many are there?"]
DETECT = ["--detector", "tiny", "--engine", "torch", "--random-detector"]
runner = CliRunner()


def _invoke(args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _finetune(root: Path, task: str, *extra) -> Path:
    out = root / f"run_{task}"
    data = ["--corpus", root / "corpus", "--set", "train_splits=train", "--set", "valid_split=minival"] \
        if not extra else []
    result = _invoke(["finetune", task, "--config", "tiny", "--set", "from_scratch=true",
                      "--set", f"vocab={BERT_VOCAB}", *data, "--features", root / "store", "--out", out,
                      "--set", "batch_size=2", "--set", "epochs=1", *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ask_inputs")
    tiny_fixture_store(root, STEMS)
    vqa = [dict(question_id=i + 1, img_id=STEMS[i % 2], sent=QUESTIONS[i % 3], label=[(ANSWERS[i % 4], 1.0)],
                answer_type="other", question_type="what") for i in range(6)]
    ft = root / "corpus" / "finetune"
    ft.mkdir(parents=True)
    (root / "corpus" / "vocab").mkdir()
    for split in ("train", "minival"):
        pq.write_table(pa.Table.from_pylist(vqa, schema=VQA_SCHEMA), ft / f"vqa_{split}.parquet")
    (root / "corpus" / "vocab" / "vqa_answers.json").write_text(json.dumps(ANSWERS))
    classify = root / "classify.jsonl"
    classify.write_text("".join(json.dumps({"id": i, "img_id": STEMS[i % 2], "text": QUESTIONS[i % 3],
                                            "label": "abcd"[i % 4]}) + "\n" for i in range(8)))
    return {"root": root, "vqa_run": _finetune(root, "vqa"),
            "classify_run": _finetune(root, "classify", "--train", classify, "--valid", classify)}


def _image(world, k: int = 0) -> Path:
    return world["root"] / "images" / f"{STEMS[k]}.jpg"


def _copy_run(world, tmp_path: Path, name: str = "vqa_run") -> Path:
    copy = tmp_path / name
    shutil.copytree(world[name], copy)
    return copy


# ---------------------------------------------------------------------------------------------------- item 4


def test_the_feature_size_is_checked_against_the_model_before_the_detector_runs(world, tmp_path):
    run, q = world["vqa_run"], ["--question", QUESTIONS[0]]
    # the tiny model reads the tiny detector's 128-dim features; the full detector gives 2048. The weights file
    # does not exist: had the detector been built first, the error would be about it
    line = _one_line_error(_invoke(["ask", "--model", run, "--image", _image(world), *q, "--detector", "vg-r101",
                                    "--detector-weights", tmp_path / "missing.pkl"]),
                           "2048", "128", "--detector tiny")
    assert "missing.pkl" not in line
    # a store of another size than the model's (a model reading 64-dim features, the store holding 128)
    _, _, trained = load_run(run)
    other = LxmertForFinetuning(trained.config.replace(visual_feat_dim=64))
    save_lxm(other, tmp_path / "m64")
    _one_line_error(_invoke(["ask", "--model", tmp_path / "m64", "--answers", run / "answers.json", "--vocab",
                             BERT_VOCAB, "--features", world["root"] / "store", "--image-id", STEMS[0], *q]),
                    str(world["root"] / "store"), "128", "64")
    # lxm predict checks the run's stores the same way, before predicting
    copy = _copy_run(world, tmp_path)
    shutil.rmtree(copy / "best")
    save_lxm(other, copy / "best")
    _one_line_error(_invoke(["predict", "vqa", "--checkpoint", copy, "--split", "minival", "--out",
                             tmp_path / "p.json"]), str(world["root"] / "store"), "128", "64")
    assert not (tmp_path / "p.json").exists()


# ---------------------------------------------------------------------------------------------------- item 9


def _grid_record(n: int = 36, size: int = 600) -> ImageFeatures:
    """n disjoint boxes on a grid, so each box's shading can be read off the picture alone."""
    side = int(np.ceil(np.sqrt(n)))
    cell = size // side
    boxes = np.array([[c * cell + 4, r * cell + 4, (c + 1) * cell - 5, (r + 1) * cell - 5]
                      for r in range(side) for c in range(side)][:n], dtype=np.float32)
    zeros = np.zeros(n, np.float32)
    return ImageFeatures("grid", size, size, np.zeros(n, np.int64), zeros, np.zeros(n, np.int64), zeros, boxes,
                         np.zeros((n, 8), np.float32))


def test_near_uniform_attention_is_shaded_apart_and_its_range_printed():
    n = 36
    weights = np.full(n, 1 / n)
    up, down, uniform = 14, 29, 32
    weights[up] += 5e-4  # two boxes 1e-3 apart, every other at exactly 1/N
    weights[down] -= 5e-4
    levels = shade_levels(weights)
    assert levels[up] == 1.0 and levels[down] == 0.0 and np.all(levels[[0, 1, uniform]] == 0.5)
    image = np.full((600, 600, 3), 200, np.uint8)
    rec = _grid_record(n)
    pic = render_attention([image], [rec], [weights], "q", "a (0.50)", top=2)
    scale = pic.image.shape[1] / 600  # drawn at the long-side rule of lxm show

    def brightness(box: int) -> float:  # the middle of the box, away from its outline and any label
        x1, y1, x2, y2 = (float(v) * scale for v in rec.boxes[box])
        cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2) + pic.title_height
        assert not any(r[0] <= cx <= r[2] and r[1] <= cy <= r[3] for r in (lab.rect for lab in pic.labels))
        return float(pic.image[cy - 2:cy + 3, cx - 2:cx + 3].mean())

    assert {lab.box for lab in pic.labels} == {up, 0}  # the two strongest (ties: the first box)
    assert brightness(down) + 30 < brightness(uniform)  # 1e-3 below the other: visibly darker
    assert brightness(uniform) > 200 * 0.3 + 30  # a box at exactly 1/N is lighter than outside every box
    # the title says how far from uniform the weights are, with decimals enough to tell the two boxes apart
    summary = [line for line in pic.title if "entropy" in line]
    assert summary, pic.title
    assert "min 0.0273" in " ".join(pic.title) and "max 0.0283" in " ".join(pic.title)
    assert "1.000 of uniform" in " ".join(pic.title)
    labels = {lab.box: lab.text.split()[-1] for lab in pic.labels}
    assert labels[up] == "0.0283"  # the label has as many decimals as tell the labelled boxes from 1/N
    one = np.zeros(n)
    one[5] = 1.0
    assert "entropy 0.000 nats = 0.000 of uniform" in weight_summary(one)


# ---------------------------------------------------------------------------------------------------- item 10


def test_a_device_that_cannot_be_used_is_an_error_in_ask_predict_and_gallery(world, tmp_path):
    run = world["vqa_run"]
    args = ["--image", _image(world), "--question", QUESTIONS[0], *DETECT]
    _one_line_error(_invoke(["ask", "--model", run, *args, "--device", "banana"]), "--device", "banana")
    _one_line_error(_invoke(["predict", "vqa", "--checkpoint", run, "--split", "minival", "--out",
                             tmp_path / "p.json", "--device", "banana"]), "banana")
    _one_line_error(_invoke(["gallery", run, "--split", "minival", "--images", world["root"] / "images",
                             "--out", tmp_path / "gallery", "--device", "banana"]), "banana")
    if not torch.cuda.is_available():
        _one_line_error(_invoke(["ask", "--model", run, *args, "--device", "cuda"]), "CUDA is not available")
        _one_line_error(_invoke(["predict", "vqa", "--checkpoint", run, "--split", "minival", "--out",
                                 tmp_path / "p.json", "--device", "cuda"]), "CUDA is not available")
        _one_line_error(_invoke(["gallery", run, "--split", "minival", "--images", world["root"] / "images",
                                 "--out", tmp_path / "gallery", "--device", "cuda"]), "CUDA is not available")
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "gallery" / "index.html").exists()


# ---------------------------------------------------------------------------------------------------- item 11, 12


def test_empty_text_is_refused_and_cut_or_unknown_text_is_warned(world):
    run = world["vqa_run"]
    for text in ("", "   "):
        _one_line_error(_invoke(["ask", "--model", run, "--image", _image(world), "--question", text, *DETECT]),
                        "--question", "empty")
    long = " ".join(["dog"] * 300)
    result = _invoke(["ask", "--model", run, "--image", _image(world), "--question", long, *DETECT])
    assert result.exit_code == 0, result.output
    assert "warning: command line: the question is cut to 18 of its 300 word pieces" in result.stderr
    answerer = load_answerer(run)
    unknown = "\U0001F984 \U0001F984"  # a unicorn emoji: not in BERT's vocabulary
    assert answerer.tokenizer.tokenize(unknown) == ["[UNK]", "[UNK]"]
    assert any("[UNK]" in note for note in answerer.text_warnings(unknown))
    assert answerer.text_warnings(QUESTIONS[0]) == []
    result = _invoke(["ask", "--model", run, "--image", _image(world), "--question", unknown, *DETECT])
    assert result.exit_code == 0 and "every word piece of the question is [UNK]" in result.stderr


def test_top_prints_as_many_labels_of_a_classification_model_as_json_gives(world):
    args = ["ask", "--model", world["classify_run"], "--image", _image(world), "--statement", QUESTIONS[1],
            *DETECT, "--top", "3"]
    text, as_json = _invoke(args), _invoke([*args, "--json"])
    assert text.exit_code == 0 and as_json.exit_code == 0, text.output + as_json.output
    labels = json.loads(as_json.stdout.strip().splitlines()[-1])["labels"]
    printed = [line.split() for line in text.stdout.splitlines() if line.startswith("  ")]
    assert len(labels) == 3 and [p[0] for p in printed] == [x["label"] for x in labels]


# ---------------------------------------------------------------------------------------------------- item 16, 17


def test_predict_batch_size_must_be_positive(world, tmp_path):
    for bad in ("-4", "0"):
        result = _invoke(["predict", "vqa", "--checkpoint", world["vqa_run"], "--split", "minival",
                          "--out", tmp_path / "p.json", "--batch-size", bad])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        text = re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)  # typer's usage error, boxed and wrapped
        assert "--batch-size" in text and "greater than or equal to 1" in text, text
    with pytest.raises(ValueError, match="--batch-size 0"):
        predict_run(world["vqa_run"], "vqa", "minival", tmp_path / "p.json", batch_size=0)
    assert not (tmp_path / "p.json").exists()


def test_an_output_path_that_is_a_directory_is_refused_before_the_model_runs(world, tmp_path):
    folder = tmp_path / "a folder"
    folder.mkdir()
    absent = tmp_path / "no-run"  # the model does not exist: the output check must come first to be seen
    base = ["ask", "--model", absent, "--image", _image(world), "--question", QUESTIONS[0], *DETECT]
    _one_line_error(_invoke([*base, "--explain", folder]), f"--explain {folder}", "is a directory")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": str(_image(world)), "question": QUESTIONS[0]}) + "\n")
    _one_line_error(_invoke(["ask", "--model", absent, "--questions", questions, *DETECT, "--out", folder]),
                    f"--out {folder}", "is a directory")
    _one_line_error(_invoke(["predict", "vqa", "--checkpoint", absent, "--split", "minival", "--out", folder]),
                    f"--out {folder}", "is a directory")
    (tmp_path / "file").write_text("x")  # a parent that is a file
    _one_line_error(_invoke(["predict", "vqa", "--checkpoint", absent, "--split", "minival",
                             "--out", tmp_path / "file" / "p.json"]), "file", "is a file, not a folder")
    _one_line_error(_invoke(["ask", "--model", absent, "--questions", questions, *DETECT, "--explain-dir",
                             tmp_path / "file"]), "--explain-dir", "is a file")
    # a missing parent folder is made (the answers are written)
    result = _invoke(["ask", "--model", world["vqa_run"], "--questions", questions, *DETECT, "--out",
                      tmp_path / "new" / "answers.jsonl"])
    assert result.exit_code == 0 and (tmp_path / "new" / "answers.jsonl").is_file(), result.output


# ---------------------------------------------------------------------------------------------------- item 18


def test_misleading_errors_name_the_real_problem(world, tmp_path, monkeypatch):
    run, q = world["vqa_run"], ["--question", QUESTIONS[0]]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/nope", "./nope", str(tmp_path / "nope"), "~/surely-no-such-lxm-run"):
        line = _one_line_error(_invoke(["ask", "--model", name, "--image", _image(world), *q, *DETECT]),
                               name, "no such directory")
        assert "could not fetch" not in line  # no Hub lookup
    _one_line_error(_invoke(["ask", "--model", "runs/BEST.pth", "--image", _image(world), *q, *DETECT]),
                    "no such file")
    _one_line_error(_invoke(["predict", "vqa", "--checkpoint", "runs/nope", "--split", "minival", "--out", "p.json"]),
                    "runs/nope", "no such directory")
    _one_line_error(_invoke(["ask", "--model", run, "--image", tmp_path / "runs", *q, *DETECT]),
                    str(tmp_path / "runs"), "is a directory")
    _one_line_error(_invoke(["ask", "--model", run, "--image", _image(world), "--image-id", STEMS[0], *q]),
                    "--image-id needs --features")
    train = tmp_path / "t.jsonl"
    train.write_text("{}\n")
    _one_line_error(_invoke(["finetune", "foo", "--train", train, "--out", tmp_path / "r"]),
                    "unknown task 'foo' (vqa, gqa, nlvr2, qa, classify)")
    _one_line_error(_invoke(["predict", "foo", "--checkpoint", run, "--split", "x", "--out", "p.json"]),
                    "unknown task 'foo'")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------- item 28


def test_an_image_beyond_the_pixel_limit_is_one_line_in_ask(world, monkeypatch):
    monkeypatch.setenv("LXM_MAX_IMAGE_PIXELS", "1000")
    _one_line_error(_invoke(["ask", "--model", world["vqa_run"], "--image", _image(world), "--question",
                             QUESTIONS[0], *DETECT]), STEMS[0], "limit")


# ---------------------------------------------------------------------------------------------------- item 33


def test_an_answer_table_or_vocabulary_that_does_not_fit_the_model_is_refused(world, tmp_path):
    for name, table, needles in (("short", ANSWERS[:3], ("3 answers", "4 rows")),
                                 ("long", ANSWERS + ["green"], ("5 answers", "4 rows")),
                                 ("twice", ANSWERS[:3] + ["red"], ("'red'", "twice"))):
        run = _copy_run(world, tmp_path / name)
        (run / "answers.json").write_text(json.dumps(table))
        answers = str(run / "answers.json")
        _one_line_error(_invoke(["predict", "vqa", "--checkpoint", run, "--split", "minival", "--out",
                                 tmp_path / name / "p.json"]), answers, *needles)
        _one_line_error(_invoke(["ask", "--model", run, "--image", _image(world), "--question", QUESTIONS[0],
                                 *DETECT]), answers, *needles)
        assert not (tmp_path / name / "p.json").exists()
    # --answers of a checkpoint: a duplicate is refused as in a run
    (tmp_path / "dup.json").write_text(json.dumps(ANSWERS[:3] + ["red"]))
    _one_line_error(_invoke(["ask", "--model", world["vqa_run"] / "best", "--answers", tmp_path / "dup.json",
                             "--vocab", BERT_VOCAB, "--image", _image(world), "--question", QUESTIONS[0], *DETECT]),
                    "dup.json", "'red'", "twice")
    # a vocabulary cut short (its special tokens kept): 200 pieces against the model's 30522 embedding rows
    cut = tmp_path / "cut_vocab.txt"
    cut.write_text("".join(Path(BERT_VOCAB).read_text().splitlines(keepends=True)[:200]))
    run = _copy_run(world, tmp_path / "cut")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["vocab"] = str(cut)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    _one_line_error(_invoke(["predict", "vqa", "--checkpoint", run, "--split", "minival", "--out",
                             tmp_path / "p.json"]), str(cut), "200", "30522")
    _one_line_error(_invoke(["ask", "--model", world["vqa_run"], "--vocab", cut, "--image", _image(world),
                             "--question", QUESTIONS[0], *DETECT]), str(cut), "200", "30522")
    assert not (tmp_path / "p.json").exists()
