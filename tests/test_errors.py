"""Bad input is one line naming the file (and line / field), without a traceback; a bug keeps its traceback.

Each case runs the `lxm` CLI in-process on real files damaged the way users damage them (issue 11, fault 6).
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import BERT_VOCAB, SHARED
from lxm.cli import app
from lxm.cli.common import fail
from lxm.errors import LxmError
from lxm.train.config import load_config

SAMPLE = SHARED / "fixtures" / "butd-coco-sample" / "train2014_obj36.tsv"
IMAGES = SHARED / "fixtures" / "butd-coco-sample" / "images"


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles: str) -> str:
    """The command failed with exactly one `error:` line containing every needle, and no exception escaped."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store") / "s"
    assert _cli("convert", "tsv", SAMPLE, root).exit_code == 0
    return root


def _copy_store(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


# ---------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("command", [["pretrain"], ["finetune", "vqa"]])
def test_yaml_syntax_error_names_the_file_and_line(tmp_path, command):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_size: 8\nfeatures: [a, b\nlr: 1.0e-4\n")  # the ']' is missing
    result = _cli(*command, "--config", cfg, "--out", tmp_path / "out")
    line = _one_line_error(result, f"{cfg}:3:", "not valid YAML", "line 2")
    assert "flow sequence" in line


@pytest.mark.parametrize("command", [["pretrain"], ["finetune", "nlvr2"]])
def test_wrongly_typed_yaml_value_is_checked_like_set(tmp_path, command):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("corpus: c\nfeatures: [f]\nepochs: two\n")
    _one_line_error(_cli(*command, "--config", cfg, "--out", tmp_path / "out"), str(cfg), "'optim.epochs'",
                    "expected int", "'two'")
    cfg.write_text("corpus: c\nfeatures: [f]\nbatch_size: null\n")
    _one_line_error(_cli(*command, "--config", cfg, "--out", tmp_path / "out"), "'optim.batch_size'", "expected int")


def test_yaml_values_are_converted_as_set_converts_them(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("corpus: c\nfeatures: f1,f2\nlr: 1e-4\nwarmup: 0.1\nepochs: 3\nlosses:\n  obj_attr_confidence: off\n")
    loaded = load_config(str(cfg))  # PyYAML reads 1e-4 as a string; --set lr=1e-4 gives the float
    assert loaded.optim.lr == 1e-4 and isinstance(loaded.optim.lr, float)
    assert loaded.features == ["f1", "f2"] and loaded.optim.epochs == 3 and loaded.losses.obj_attr_confidence is False
    cfg.write_text("corpus: c\nfeatures: [f]\nwarmup: 1\n")  # an int for a float field widens
    with pytest.raises(LxmError, match="'optim.warmup' must be in"):
        load_config(str(cfg))


# ---------------------------------------------------------------------------------------------------- runs


class _NotATensor:
    """Any user class: torch.load(weights_only=True) refuses to unpickle it."""

    def __init__(self):
        self.step = 3


def test_resume_from_a_checkpoint_that_needs_unsafe_unpickling(data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": _NotATensor(), "step": 3}, run / "checkpoints" / "step-3.pt")
    result = _cli("pretrain", "--config", "tiny", "--corpus", data / "corpus", "--features", data / "feats",
                  "--out", run, "--set", f"vocab={BERT_VOCAB}", "--set", "batch_size=4", "--resume")
    _one_line_error(result, "step-3.pt")


@pytest.mark.parametrize("command", [["pretrain"], ["finetune", "vqa", "--set", "from_scratch=true"],
                                     ["finetune", "nlvr2", "--set", "from_scratch=true"]])
def test_a_corpus_option_that_is_not_a_corpus(store, tmp_path, command):
    empty = tmp_path / "not-a-corpus"
    empty.mkdir()
    wanted = {"pretrain": "vocab/qa_answers.json", "vqa": "vocab/vqa_answers.json", "nlvr2": "finetune"}
    name = wanted[command[1] if command[0] == "finetune" else "pretrain"]
    result = _cli(*command, "--config", "tiny", "--corpus", empty, "--features", store, "--out", tmp_path / "out",
                  "--set", f"vocab={BERT_VOCAB}")
    _one_line_error(result, str(empty), f"no {name}", "run lxm build-corpus first")


def test_predict_on_a_pretraining_run(data, tmp_path):
    run = tmp_path / "pre"
    result = _cli("pretrain", "--config", "tiny", "--corpus", data / "corpus", "--features", data / "feats",
                  "--out", run, "--set", f"vocab={BERT_VOCAB}", "--set", "batch_size=4", "--set", "max_steps=1",
                  "--set", "valid_split=none")
    assert result.exit_code == 0, result.output
    for task in ("vqa", "nlvr2"):  # the default task of FinetuneConfig must not make it look like a vqa run
        result = _cli("predict", task, "--checkpoint", run, "--split", "minival", "--out", tmp_path / "p.json")
        _one_line_error(result, str(run / "config.yaml"), "a pretraining run", "lxm finetune")


# ---------------------------------------------------------------------------------------------------- extraction


def test_detector_pickle_holding_object_arrays(tmp_path):
    weights = tmp_path / "weights.pkl"
    sd = {"backbone.stem.conv1.weight": np.zeros((4, 3, 7, 7), np.float32),
          "roi_heads.box_predictor.cls_score.weight": np.array([[0.1, "x"], [None, 2]], dtype=object)}
    weights.write_bytes(pickle.dumps({"model": sd}))
    result = _cli("extract", "--images", IMAGES, "--out", tmp_path / "s", "--weights", weights, "--detector", "tiny")
    _one_line_error(result, str(weights), "'roi_heads.box_predictor.cls_score.weight'", "dtype object")


def test_show_of_an_unknown_image(store, tmp_path):
    image = next(IMAGES.glob("*.jpg"))
    result = _cli("show", store, "COCO_nope", "--image", image, "--out", tmp_path / "b.png")
    line = _one_line_error(result, f"no image 'COCO_nope' in {store}")
    assert "missing field" not in line


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_rows(path):
    """The shard as a complete stream of its first 5 rows: what a cut at a record-batch boundary reads as."""
    table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all().slice(0, 5)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    path.write_bytes(sink.getvalue().to_pybytes())


@pytest.mark.parametrize("damage", ["manifest", "index", "shard", "shard-rows", "shard-missing", "manifest-field"])
def test_inspect_names_the_damaged_file(store, tmp_path, damage):
    root = _copy_store(store, tmp_path / "s")
    shard = root / json.loads((root / "manifest.json").read_text())["shards"][0]["file"]
    if damage == "manifest":
        damaged = root / "manifest.json"
        _truncate(damaged)
    elif damage == "manifest-field":
        damaged = root / "manifest.json"
        manifest = json.loads(damaged.read_text())
        del manifest["num_boxes"]
        damaged.write_text(json.dumps(manifest))
    elif damage == "index":
        damaged = root / "index.arrow"
        _truncate(damaged)
    elif damage == "shard-missing":
        damaged = shard
        shard.unlink()
    else:
        damaged = shard
        (_truncate if damage == "shard" else _drop_rows)(shard)
    line = _one_line_error(_cli("inspect", root), str(damaged))
    if damage == "manifest-field":
        assert "'num_boxes'" in line
    if damage == "shard-rows":
        assert "has 5 images" in line and "says 10" in line


# ---------------------------------------------------------------------------------------------------- bugs


def test_a_bug_keyerror_is_not_reworded_as_bad_input():
    with pytest.raises(KeyError, match="objects_id"):
        try:
            {}["objects_id"]
        except KeyError as exc:
            fail(exc)
    with pytest.raises(typer.Exit):
        fail(LxmError("x.json: field 'y' missing"))
    with pytest.raises(typer.Exit):
        fail(FileNotFoundError(2, "No such file or directory", "x.json"))


def test_a_bug_in_a_command_keeps_its_traceback(store, tmp_path, monkeypatch):
    from lxm.features.store import FeatureStore

    def broken(self, img_id):
        return {}["objects_id"]  # what a bug in the reader looks like (the old CLI said "missing field")

    monkeypatch.setattr(FeatureStore, "get", broken)
    image = next(IMAGES.glob("*.jpg"))
    result = _cli("show", store, image.stem, "--image", image, "--out", tmp_path / "b.png")
    assert isinstance(result.exception, KeyError)  # propagates: the user sees the traceback
    assert "missing field" not in result.output
