"""Issue 27 (items 3, 5, 6, 7, 14, 15, 19): what `lxm finetune` takes from an lxm `--init` run (its vocabulary and
model size, offline), the checks before training (an unlabelled validation file, a set smaller than a batch), the
progress it shows without a terminal, classification labels as written in JSON, and the end-of-run report (majority
baseline, predicted-answer histogram, per-label / per-answer-type scores, confusion matrix, wall time per epoch)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from lxm.cli import app
from lxm.cli.common import LineProgress, progress
from lxm.eval import MetricsInputError, read_classify_jsonl
from lxm.features.store import FeatureStoreWriter
from lxm.train.finetune_data import FinetuneDataError, steps_per_epoch
from lxm.train.report import (confusion_matrix, epoch_seconds, few_answers_warning, histogram, majority_prediction,
                              per_group_scores, per_label_scores, report_lines, validation_report)
from lxm.train.tasks import ClassifyTask, Nlvr2Task, QaLabel, QaTask, VqaTask
from synthetic import COLORS, F, OBJECTS, image, pretrain_args

WORDS = [*COLORS, *OBJECTS, "a", "an", "the", "is", "what", "color", "thing", "?"]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A 40-image feature store, classification files over it (30 train, 10 valid with one label unseen in
    training, 10 unlabelled) and an lxm pretraining run of the tiny model whose vocabulary is NOT bert-base-uncased
    (a 25-piece WordPiece file, as the quickstart trains its own): RUN/config.yaml (PretrainConfig) + RUN/model/."""
    from lxm.model import LxmertForPreTraining, lxmert_tiny, save_lxm
    from lxm.train.config import pretrain_tiny

    root = tmp_path_factory.mktemp("mini")
    rng = np.random.default_rng(0)
    shown = []
    with FeatureStoreWriter(root / "feats", num_boxes=6, feature_dim=F, dtype="float32") as w:
        for i in range(40):
            obj, col = int(rng.integers(len(OBJECTS))), int(rng.integers(len(COLORS)))
            w.add(image(f"im{i:02d}", obj, col, rng))
            shown.append((f"im{i:02d}", OBJECTS[obj], COLORS[col]))
    labels = ["yes", "no", "maybe"]
    rows = [{"id": i, "img_id": img, "text": f"a {col} {obj}", "label": labels[i % 2]}
            for i, (img, obj, col) in enumerate(shown)]
    for r in rows[30:33]:
        r["label"] = labels[2]  # validation only: a label no training example has
    files = {"train": _jsonl(root / "train.jsonl", rows[:30]), "valid": _jsonl(root / "valid.jsonl", rows[30:]),
             "test": _jsonl(root / "test.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in rows[30:]])}
    vocab = root / "vocab" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    run = root / "pre"
    run.mkdir()
    cfg = pretrain_tiny()
    cfg.corpus, cfg.features, cfg.vocab = str(root / "corpus"), [str(root / "feats")], str(vocab)
    (run / "config.yaml").write_text(cfg.to_yaml())
    torch_model = LxmertForPreTraining(lxmert_tiny(vocab_size=5 + len(WORDS), visual_feat_dim=F))
    save_lxm(torch_model, run / "model")
    return root, files, vocab, run


def _finetune(root, files, out, *extra):
    return CliRunner().invoke(app, ["finetune", "classify", "--train", str(files["train"]), "--features",
                                    str(root / "feats"), "--out", str(out), *extra])


# ---------------------------------------------------------------------------------------------------- runs


def test_init_run_gives_vocabulary_and_size_offline_with_per_step_progress_and_a_report(mini, tmp_path,
                                                                                        monkeypatch, caplog):
    """Items 3, 6, 7, 14 (unseen labels), 15, 19 through one `lxm finetune classify --init RUN` run (paper recipe,
    no --set vocab, Hub switched off): the run's vocabulary and model size are used and recorded; without a
    terminal the progress reaches 3/3 steps; the epoch's use of 30 examples in batches of 8 is said; the report
    is printed and in summary.json."""
    root, files, vocab, run = mini
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cls"
    result = _finetune(root, files, out, "--init", str(run), "--valid", str(files["valid"]), "--set", "epochs=2",
                       "--set", "batch_size=8", "--set", "lr=1e-3", "--set", "log_every=10")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["vocab"] == str(vocab) and cfg["model"] == "tiny"  # not bert-base-uncased / base
    text = result.output
    assert "each epoch: 3 steps of 8 examples, 24 of the 30 training examples (6 left out" in text
    assert "6/6 steps (100 %)" in text  # log_every 10 > 6 steps: only on_step moves it (ETA lines: unit test)
    assert "3 of 10 validation examples have a label that no training example has ('maybe' (3))" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    report = summary["report"]
    assert sorted(summary["epoch_seconds"]) == ["0", "1"] and all(s > 0 for s in summary["epoch_seconds"].values())
    assert report["examples"] == 10 and report["scores"]["accuracy"] == summary["best"]
    # the majority label of training ("yes": 15 of 30, first seen) predicted for all: 4 of the 10 valid rows
    assert report["majority_baseline"] == {"prediction": "yes", "scores": ClassifyTask(["no", "yes"]).score(
        list(range(30, 40)), [r["label"] for r in map(json.loads, files["valid"].read_text().splitlines())],
        {i: "yes" for i in range(30, 40)})}
    assert sum(n for _, n in report["predicted"]["top"]) == 10
    assert set(report["per_label"]) >= {"maybe"} and report["per_label"]["maybe"]["recall"] == 0.0
    assert report["confusion"]["labels"] == sorted(report["per_label"])
    assert sum(map(sum, report["confusion"]["matrix"])) == 10
    assert any("no training example has" in w for w in report["warnings"])
    assert "majority baseline" in text and "wall time per epoch: 0:" in text


def test_unlabelled_validation_and_too_small_sets_are_refused_before_training(mini, tmp_path):
    root, files, vocab, run = mini
    out = tmp_path / "r"
    result = _finetune(root, files, out, "--init", str(run), "--valid", str(files["test"]))
    assert result.exit_code == 1, result.output
    line = result.output.replace("\n", "")
    assert f"{files['test']}: 10 of 10 examples have no label, but validation scores labelled examples" in line
    assert "--test" in line and "Traceback" not in result.output
    assert not (out / "best").exists() and not (out / "summary.json").exists()
    result = _finetune(root, files, tmp_path / "r2", "--init", str(run), "--set", "batch_size=64")
    assert result.exit_code == 1 and "--set batch_size=N with N <= 30" in result.output.replace("\n", "")


def test_qa_questions_without_an_answer_in_the_table_are_warned_about():
    """qa: a validation question none of whose answers is in the answer table scores 0 whatever the model says; the
    report (and the start of the run) says how many and which answers."""
    task = QaTask(["yes", "no"])
    targets = [task.row_target({"label": a}) for a in (["maybe", "maybe", "yes"], ["blue"] * 3, ["no"],
                                                        {"green": 1.0}, {"yes": 0.5})]
    assert [bool(t.targets) for t in targets] == [True, False, True, False, True]
    assert task.unseen_labels(targets) == {"blue": 1, "green": 1}
    assert task.unseen_labels([QaLabel([(0, 1.0)], ["yes"]), None]) == {}
    report = validation_report(task, list(range(5)), targets, dict.fromkeys(range(5), "yes"), targets)
    assert any(w.startswith("2 of 5 validation examples have no answer in the answer table ('blue' (1), "
                            "'green' (1))") for w in report["warnings"])


def test_steps_per_epoch_says_what_an_epoch_uses():
    assert steps_per_epoch(32, 8) == (4, "each epoch: 4 steps of 8 examples")
    steps, line = steps_per_epoch(30, 8)
    assert steps == 3 and "24 of the 30 training examples (6 left out" in line
    with pytest.raises(FinetuneDataError, match=r"30 training examples are fewer than one batch of 32; .*"
                                                 r"--set batch_size=N with N <= 30"):
        steps_per_epoch(30, 32)


# ---------------------------------------------------------------------------------------------------- labels


def test_classify_labels_keep_their_json_spelling_and_mixed_spellings_are_refused(tmp_path):
    def rec(i, label):
        return {"id": i, "img_id": "x", "text": "t", "label": label}

    path = _jsonl(tmp_path / "a.jsonl", [rec(1, True), rec(2, 1), rec(3, 1.0), rec(4, "True"), rec(5, 2.5)])
    assert [r.label for r in read_classify_jsonl(path)] == ["true", "1", "1.0", "True", "2.5"]
    path = _jsonl(tmp_path / "b.jsonl", [rec(1, 1), rec(2, "x"), rec(3, "1")])
    with pytest.raises(MetricsInputError, match=r"b.jsonl:3: field 'label': \"1\", but line 1 writes the label '1' "
                                                r"as a number or boolean"):
        read_classify_jsonl(path)
    path = _jsonl(tmp_path / "c.jsonl", [rec(1, "true"), rec(2, True)])
    with pytest.raises(MetricsInputError, match=r"c.jsonl:2: field 'label': true, but line 1"):
        read_classify_jsonl(path)


# ---------------------------------------------------------------------------------------------------- report


def test_per_label_scores_and_confusion_matrix_against_a_hand_computation():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "a", "a"]
    scores = per_label_scores(gold, pred)
    # a: tp 2, predicted 4, gold 3; b: tp 1, predicted 2, gold 2; c: tp 0, predicted 0, gold 1
    assert scores["a"] == {"precision": 50.0, "recall": 66.67, "f1": 57.14, "support": 3, "predicted": 4}
    assert scores["b"] == {"precision": 50.0, "recall": 50.0, "f1": 50.0, "support": 2, "predicted": 2}
    assert scores["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    assert confusion_matrix(gold, pred, ["a", "b", "c"]) == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]


def test_few_distinct_answers_warning_and_histogram():
    hist = histogram(["yes", "no", "yes", "yes"])
    assert hist == [("yes", 3), ("no", 1)]
    warning = few_answers_warning(hist, gold_distinct=5)
    assert warning.startswith("the model predicts only 2 distinct answers over the 4 validation examples "
                              "('yes' 75 %, 'no' 25 %)")
    assert few_answers_warning(hist, gold_distinct=2) is None  # every label is predicted
    assert few_answers_warning(histogram(list("abcd")), gold_distinct=9) is None  # more than 3 distinct


def test_majority_baseline_and_report_of_single_label_tasks():
    task = Nlvr2Task()
    ids = [f"dev-{i}-0-0" for i in range(4)]  # NLVR2 identifiers: split-set-pair-sentence
    report = validation_report(task, ids, [1, 1, 0, 1], {i: "True" for i in ids}, train_targets=[0, 0, 1])
    assert report["majority_baseline"]["prediction"] == "False"
    assert report["majority_baseline"]["scores"]["accuracy"] == 25.0 and report["scores"]["accuracy"] == 75.0
    assert report["confusion"] == {"labels": ["False", "True"], "matrix": [[0, 1], [0, 3]]}
    assert report["predicted"] == {"distinct": 1, "top": [["True", 4]]}
    assert report["warnings"][0].startswith("the model predicts only 1 distinct answer over the 4")
    lines = report_lines(report, "accuracy")
    assert lines[0] == "accuracy 75.0 on 4 validation examples; majority baseline 25.0 (always 'False')"
    assert any(line.startswith("confusion (rows gold, columns predicted): False: 0 1 | True: 0 3") for line in lines)
    assert majority_prediction(ClassifyTask(["x", "y"]), ["y", "z", "z", "y", "x"]) == "y"  # "z": no class


def test_answer_task_report_scores_per_answer_type():
    task = VqaTask(["yes", "no", "2"])
    ids = [1, 2, 3, 4]
    targets = [[(0, 1.0)], [(1, 0.6), (0, 0.3)], [(2, 1.0)], [(0, 1.0)]]
    preds = {1: "yes", 2: "yes", 3: "yes", 4: "no"}
    report = validation_report(task, ids, targets, preds, train_targets=[[(1, 1.0)], [(1, 0.9)], [(0, 1.0)]],
                               info={"answer_type": ["yes/no", "yes/no", "number", None]})
    assert report["per_answer_type"] == {"number": {"accuracy": 0.0, "count": 1},
                                         "yes/no": {"accuracy": 65.0, "count": 2}}
    assert report["majority_baseline"] == {"prediction": "no", "scores": {"accuracy": 15.0}}
    assert "per_label" not in report and "confusion" not in report
    assert per_group_scores(task, ids, targets, preds, [None] * 4) == {}


def test_epoch_seconds_are_read_from_the_log_skipping_bad_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 3, "epoch": 0, "loss": 1.0}\n{"step": 3, "epoch": 0, "valid": {}, "epoch_seconds": '
                    b'2.5}\n\xff\xfe\n{"step": 6, "epoch": 1, "valid": {"accuracy": 1}, "epoch_seconds": 3}\n')
    assert epoch_seconds(log) == {0: 2.5, 1: 3.0}


# ---------------------------------------------------------------------------------------------------- progress


def test_progress_without_a_terminal_prints_lines_that_reach_the_total():
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    assert not console.is_terminal
    with progress("steps", min_gap_s=0, console=console) as bar:
        assert isinstance(bar, LineProgress)
        task = bar.add_task("finetune qa", total=None)
        bar.update(task, total=20, completed=0)
        for step in range(1, 21):
            bar.update(task, completed=step, description=f"qa loss {step}")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10  # one per tenth
    assert lines[0].startswith("qa loss 2: 2/20 steps (10 %), 0:00:00 elapsed, ETA ")
    assert lines[-1].startswith("qa loss 20: 20/20 steps (100 %)") and "ETA" not in lines[-1]
    buf = io.StringIO()
    with progress("steps", console=Console(file=buf, width=200)) as bar:  # a job of milliseconds: the last line only
        task = bar.add_task("draw", total=20)
        for _ in range(20):
            bar.advance(task)
    assert [line.split(",")[0] for line in buf.getvalue().splitlines()] == ["draw: 20/20 steps (100 %)"]
    buf = io.StringIO()
    with progress("images", console=Console(file=buf, width=200)) as bar:
        task = bar.add_task("extract", total=50)
        bar.advance(task, 3)  # stopped early: the block's end says where
    assert buf.getvalue().splitlines() == [buf.getvalue().splitlines()[0]]
    assert buf.getvalue().startswith("extract: 3/50 images (6 %)")
    buf = io.StringIO()
    with progress("images", every_s=0, console=Console(file=buf, width=200)) as bar:
        task = bar.add_task("extract", total=1000)
        for _ in range(3):
            bar.advance(task)  # no tenth reached: the time limit (here 0 s) prints each
    assert [line.split(",")[0] for line in buf.getvalue().splitlines()] == [
        "extract: 1/1000 images (0 %)", "extract: 2/1000 images (0 %)", "extract: 3/1000 images (0 %)"]
    from rich.progress import Progress

    assert isinstance(progress("steps", console=Console(file=io.StringIO(), force_terminal=True)), Progress)


# ---------------------------------------------------------------------------------------------------- the Hub


def test_pretraining_progress_moves_every_step_without_a_terminal(data, tmp_path):
    result = CliRunner().invoke(app, ["pretrain",
                                      *pretrain_args(data, tmp_path / "run", "max_steps=3", "log_every=10")])
    assert result.exit_code == 0, result.output
    assert "pretrain: 3/3 steps (100 %)" in result.output  # no log record before the end: each step moved it


def test_an_unreachable_vocabulary_names_the_fix_and_hub_lines_print_once(tmp_path):
    """Offline (HF_HUB_OFFLINE): the tokenizer's error names --set vocab=PATH/vocab.txt; with the CLI's logging,
    a record of huggingface_hub's loggers (its retry lines) is printed once, not by its handler and the root's."""
    code = textwrap.dedent("""
        from lxm.cli import _root
        _root(verbose=False)
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        from lxm.model.tokenizer import LxmertTokenizer, TokenizerError
        try:
            LxmertTokenizer("no-such-org/no-such-vocab")
        except TokenizerError as exc:
            print(exc)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Retrying in 1s") == 1, done.stderr
    assert "--set vocab=PATH/vocab.txt" in done.stdout and "\n" not in done.stdout.strip()


def test_what_an_init_run_settles_and_what_the_user_keeps(mini, tmp_path):
    """The init run's vocabulary and size fill only what the config file / --set left unset; a model directory of
    another architecture is recorded as "custom"; an init that is no lxm run (a Hub id) changes nothing."""
    from lxm.model import LxmertForPreTraining, lxmert_tiny, save_lxm
    from lxm.train.config import load_finetune_config

    root, files, vocab, run = mini
    base = ["features=[f]", f"data={{train: {files['train']}}}"]
    cfg = load_finetune_config("classify", "paper", [*base, f"init={run / 'model'}"])
    assert (cfg.vocab, cfg.model) == (str(vocab), "tiny")
    cfg = load_finetune_config("classify", "paper", [*base, f"init={run}", "vocab=mine.txt", "model=small"])
    assert (cfg.vocab, cfg.model) == ("mine.txt", "small")
    cfg = load_finetune_config("classify", "paper", [*base, "init=unc-nlp/lxmert-base-uncased"])
    assert (cfg.vocab, cfg.model) == ("bert-base-uncased", "base")
    save_lxm(LxmertForPreTraining(lxmert_tiny(hidden_size=16, num_attention_heads=2)), tmp_path / "odd")
    assert load_finetune_config("classify", "paper", [*base, f"init={tmp_path / 'odd'}"]).model == "custom"
