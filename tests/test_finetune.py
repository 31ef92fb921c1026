"""Finetuning (`lxm finetune`, `lxm predict`): answer-head surgery, strict backbone loading, data layout, official
submission formats, and the paper's Table 3 point in miniature — finetuning from a briefly pretrained tiny model
beats finetuning from scratch on small VQA-like and NLVR2-like tasks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import BERT_VOCAB
from lxm.cli import app
from lxm.errors import ConfigError
from lxm.model import (CheckpointError, LxmertForFinetuning, LxmertForPreTraining, load_pretrained, lxmert_tiny,
                       pair_loss, save_lxm, soft_answer_loss)
from lxm.train.config import load_finetune_config
from lxm.train.finetune import build_task_model
from lxm.train.finetune_data import FinetuneDataset, collate_finetune
from lxm.train.tasks import TASKS, GqaTask, Nlvr2Task, VqaTask
from synthetic import COLORS, F, VQA_ANSWERS, make_finetune_world, one_and_two_process_losses

pytestmark = pytest.mark.e2e  # whole recipes through the lxm CLI (README: Tests)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    make_finetune_world(root)
    return root


def _cfg(world, task="vqa", *overrides):
    return load_finetune_config(task, "tiny", [f"corpus={world / 'ft_corpus'}", f"features=[{world / 'ft_feats'}]",
                                               f"vocab={BERT_VOCAB}", *overrides])


def _task(name):
    return TASKS[name](() if name == "nlvr2" else VQA_ANSWERS)


def _pretrained_dir(tmp_path, answers):
    torch.manual_seed(0)
    model = LxmertForPreTraining(lxmert_tiny(vocab_size=30522, visual_feat_dim=F, num_qa_labels=len(answers)))
    save_lxm(model, tmp_path / "pre")
    (tmp_path / "pre_answers.json").write_text(json.dumps([{"ans": a} for a in answers]))
    return model


def test_recipes_are_the_original_ones():
    for task, lr, splits, valid in (("vqa", 5e-5, ["train", "nominival"], "minival"),
                                    ("gqa", 1e-5, ["train", "valid"], "testdev"), ("nlvr2", 5e-5, ["train"], "dev")):
        cfg = load_finetune_config(task, "paper", ["corpus=c", "features=[f]", "init=x"])
        assert (cfg.optim.lr, cfg.train_splits, cfg.valid_split) == (lr, splits, valid)
        opt = cfg.optim
        assert (opt.batch_size, opt.epochs, opt.warmup, opt.clip_grad_norm, opt.optimizer) == (32, 4, 0.1, 5.0, "bert")
    with pytest.raises(ValueError, match="'init' is required"):
        load_finetune_config("vqa", "paper", ["corpus=c", "features=[f]"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_finetune_config("vqa", "paper", ["corpus=c", "features=[f]", "init=x", "learning_rate=1"])


def test_answer_head_rows_come_from_the_pretraining_head_by_converted_answer(world, tmp_path):
    pre = _pretrained_dir(tmp_path, ["2", "dog", "red", "yes"])
    logs = []
    cfg = _cfg(world, "vqa", f"init={tmp_path / 'pre'}", f"init_answers={tmp_path / 'pre_answers.json'}")
    answers = ["the dog", "two", "blue", "red"]  # convert_ans: "the dog" -> "dog", "two" -> "2"
    model = build_task_model(cfg, VqaTask(answers), 30522, F, log=logs.append)
    w_pre, b_pre = pre.answer_head.logit_fc[3].weight, pre.answer_head.logit_fc[3].bias
    w, b = model.answer_head.logit_fc[3].weight, model.answer_head.logit_fc[3].bias
    for row, src in ((0, 1), (1, 0), (3, 2)):
        assert torch.equal(w[row], w_pre[src]) and b[row] == b_pre[src]
    assert not w[2].any() and b[2] == 0  # "blue" is not in the pretraining table: zero row
    assert torch.equal(model.answer_head.logit_fc[0].weight, pre.answer_head.logit_fc[0].weight)
    for key, value in model.state_dict().items():
        if key.startswith("lxmert."):
            assert torch.equal(value, pre.state_dict()[key]), key
    assert any("3/4 rows" in m and "'blue'" in m for m in logs), logs
    assert model.cls.predictions is None and model.cls.seq_relationship is None and model.obj_predict_head is None


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_finetuning_builds_a_task_model_that_saves_and_loads_as_before(world, tmp_path, task):
    _pretrained_dir(tmp_path, COLORS)
    model = build_task_model(_cfg(world, task, f"init={tmp_path / 'pre'}"), _task(task), 30522, F,
                             log=lambda m: None)
    assert type(model) is LxmertForFinetuning
    # the same modules as the pretraining class with that head set: every checkpoint format is unchanged
    same = LxmertForPreTraining(model.config).state_dict()
    assert [(k, v.shape) for k, v in same.items()] == [(k, v.shape) for k, v in model.state_dict().items()]
    save_lxm(model, tmp_path / "best")
    loaded = load_pretrained(tmp_path / "best")
    assert type(loaded) is LxmertForFinetuning and loaded.config == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert type(load_pretrained(tmp_path / "pre")) is LxmertForPreTraining
    with pytest.raises(ConfigError, match="task_mask_lm=True"):
        LxmertForFinetuning(lxmert_tiny())


def test_a_partly_random_backbone_is_an_error(world, tmp_path):
    model = _pretrained_dir(tmp_path, COLORS)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("lxmert.encoder.x_layers.1.")}
    # an lxm training checkpoint carries its model config, so the gap cannot be hidden by inferring a smaller model
    torch.save({"model": sd, "model_config": model.config.to_dict()}, tmp_path / "partial.pth")
    cfg = _cfg(world, "nlvr2", f"init={tmp_path / 'partial.pth'}")
    with pytest.raises(CheckpointError, match="x_layers"):
        build_task_model(cfg, Nlvr2Task(), 30522, F, log=lambda m: None)


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_parameters_no_head_depends_on_keep_their_initial_values(tmp_path, task):
    world = tmp_path / "world"
    make_finetune_world(world, train=40, valid=8)
    pre = _pretrained_dir(tmp_path, COLORS)
    # which parameters get no gradient from the task loss, found by autograd on an unfrozen task model
    cfg = _cfg(world, task, f"init={tmp_path / 'pre'}")
    model = build_task_model(cfg, _task(task), 30522, F, log=lambda m: None)
    data = FinetuneDataset(_task(task), world / "ft_corpus", ["train"], [world / "ft_feats"], BERT_VOCAB)
    batch = collate_finetune([data[i] for i in range(4)])
    out = model(**batch.model_inputs())
    (pair_loss(out.pair_logits, batch.targets) if task == "nlvr2"
     else soft_answer_loss(out.answer_logits, batch.targets)).backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad and all(n.startswith("lxmert.encoder.x_layers.1.visn_") for n in no_grad), no_grad

    run = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "finetune", task, "--init", str(tmp_path / "pre"), "--config", "tiny", "--corpus", str(world / "ft_corpus"),
        "--features", str(world / "ft_feats"), "--out", str(run), "--set", f"vocab={BERT_VOCAB}",
        "--set", "batch_size=16", "--set", "epochs=1", "--set", "lr=1e-3", "--set", "train_splits=train",
        "--set", "valid_split=none"])
    assert result.exit_code == 0, result.output
    from lxm.model import load_pretrained

    tuned, init = load_pretrained(run / "best").state_dict(), pre.state_dict()
    # as the original: `.grad` stays None, so BertAdam skips them (no weight decay either)
    for name in no_grad:
        assert torch.equal(tuned[name], init[name]), name
    trained = [n for n, _ in model.named_parameters() if n.startswith("lxmert.") and n not in no_grad]
    assert all(not torch.equal(tuned[n], init[n]) for n in trained)


def test_nlvr2_batches_put_each_pair_on_consecutive_rows(world):
    data = FinetuneDataset(Nlvr2Task(), world / "ft_corpus", ["dev"], [world / "ft_feats"], BERT_VOCAB)
    batch = collate_finetune([data[0], data[1], data[2]])
    assert batch.input_ids.shape[0] == 6 and batch.targets.tolist() == data.targets[:3]
    assert batch.targets.dtype == torch.long
    for i in range(3):
        for k in range(2):
            feats = data.record(data.images[i][k]).features.astype(np.float32)
            assert np.array_equal(batch.visual_feats[2 * i + k].numpy(), feats)
        assert torch.equal(batch.input_ids[2 * i], batch.input_ids[2 * i + 1])
    model = LxmertForFinetuning(lxmert_tiny(vocab_size=30522, visual_feat_dim=F, task_qa=False, task_nlvr2=True,
                                            task_mask_lm=False, task_matched=False, task_obj_predict=False))
    out = model(**batch.model_inputs())
    pooled = out.pooled_output
    assert torch.allclose(out.pair_logits, model.nlvr2_head(pooled))  # the head concatenates rows 2i, 2i+1
    assert torch.allclose(out.pair_logits[1], model.nlvr2_head(pooled[2:4]))
    assert torch.allclose(pair_loss(out.pair_logits, batch.targets),
                          torch.nn.functional.cross_entropy(out.pair_logits, batch.targets))


def test_soft_answer_loss_is_bce_times_the_number_of_answers():
    logits, target = torch.randn(5, 12), torch.rand(5, 12)
    expected = torch.nn.BCEWithLogitsLoss()(logits, target) * 12
    assert torch.allclose(soft_answer_loss(logits, target), expected)


def test_submission_formats(tmp_path):
    # each task writes its own official format, under the name the original gave it
    vqa, gqa, nlvr2 = VqaTask(), GqaTask(), Nlvr2Task()
    assert (vqa.prediction_file_name("minival"), nlvr2.prediction_file_name("dev")) == ("minival_predict.json",
                                                                                        "dev_predict.csv")
    written = json.loads(vqa.write_predictions({5: "yes", 7: "2"}, tmp_path / "v.json").read_text())
    assert written == [{"question_id": 5, "answer": "yes"}, {"question_id": 7, "answer": "2"}]
    written = json.loads(gqa.write_predictions({"201": "no"}, tmp_path / "g.json").read_text())
    assert written == [{"questionId": "201", "prediction": "no"}]
    rows = list(csv.reader(nlvr2.write_predictions({"dev-1-0-0": "True", "dev-1-1-0": "False"},
                                                   tmp_path / "n.csv").open()))
    assert rows == [["dev-1-0-0", "True"], ["dev-1-1-0", "False"]]


def _finetune(world, task, out, init, *extra):
    args = ["finetune", task, *init, "--config", "tiny", "--corpus", str(world / "ft_corpus"),
            "--features", str(world / "ft_feats"), "--out", str(out), "--set", f"vocab={BERT_VOCAB}",
            "--set", "batch_size=32", "--set", "dropout=0", "--set", "epochs=6", "--set", "lr=3e-4",
            "--set", "train_splits=train", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text()), result.output


def test_finetuning_from_pretrained_beats_from_scratch(pretrained_world, world, tmp_path):
    _, run = pretrained_world
    best = {}
    for task in ("vqa", "nlvr2"):
        for name, init in (("pretrained", ["--init", str(run)]), ("scratch", ["--set", "from_scratch=true"])):
            summary, output = _finetune(world, task, tmp_path / f"{task}-{name}", init)
            best[task, name] = summary["best"]
            if (task, name) == ("vqa", "pretrained"):  # colours are in the pretraining QA table, objects are not
                assert f"4/{len(VQA_ANSWERS)} rows from the 4-way pretraining QA head" in output
    print("best validation accuracy:", best)
    # measured: VQA-like 61.0 vs 46.5, NLVR2-like 97.0 vs 55.0 (chance 50)
    assert best["vqa", "pretrained"] > best["vqa", "scratch"] + 8
    assert best["nlvr2", "pretrained"] > best["nlvr2", "scratch"] + 20
    assert best["nlvr2", "pretrained"] > 80

    # the run folder: resolved config, per-epoch metrics, best model, predictions of the best epoch
    vqa_run, nlvr2_run = tmp_path / "vqa-pretrained", tmp_path / "nlvr2-pretrained"
    metrics = [json.loads(line) for line in (vqa_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(6)) and max(m["accuracy"] for m in metrics) == best["vqa",
                                                                                                          "pretrained"]
    minival = json.loads((vqa_run / "predictions" / "minival_predict.json").read_text())
    assert len(minival) == 200 and set(minival[0]) == {"question_id", "answer"}

    # lxm predict on an unlabelled split writes the submission file
    out = tmp_path / "test_predict.json"
    result = CliRunner().invoke(app, ["predict", "vqa", "--checkpoint", str(vqa_run), "--split", "test",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    test = json.loads(out.read_text())
    assert len(test) == 200 and all(r["answer"] in VQA_ANSWERS for r in test)
    assert {r["question_id"]: r["answer"] for r in test} == {r["question_id"]: r["answer"] for r in minival}

    # NLVR2: predict dev, then score the CSV with the official metric against raw JSON-lines annotations
    out = tmp_path / "dev_predict.csv"
    result = CliRunner().invoke(app, ["predict", "nlvr2", "--checkpoint", str(nlvr2_run), "--split", "dev",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    dev = FinetuneDataset(Nlvr2Task(), world / "ft_corpus", ["dev"], [world / "ft_feats"], BERT_VOCAB)
    ann = tmp_path / "dev.json"
    ann.write_text("".join(json.dumps({"identifier": i, "label": "True" if t else "False"}) + "\n"
                           for i, t in zip(dev.ids, dev.targets)))
    result = CliRunner().invoke(app, ["evaluate", "nlvr2", "--annotations", str(ann), "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accuracy"] == best["nlvr2", "pretrained"]

    result = CliRunner().invoke(app, ["predict", "vqa", "--checkpoint", str(nlvr2_run), "--split", "dev",
                                      "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "is a nlvr2 run, not vqa" in result.output


def test_gqa_run_and_resume(world, tmp_path):
    run = tmp_path / "gqa"
    args = ["finetune", "gqa", "--set", "from_scratch=true", "--config", "tiny", "--corpus", str(world / "ft_corpus"),
            "--features", str(world / "ft_feats"), "--out", str(run), "--set", f"vocab={BERT_VOCAB}",
            "--set", "batch_size=32", "--set", "train_splits=train"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "320 training examples" in result.output  # 160 images x 2 questions
    first = json.loads((run / "summary.json").read_text())
    assert first["epochs"] == 1 and first["valid_split"] == "testdev"
    result = CliRunner().invoke(app, [*args, "--resume", "--set", "epochs=2"])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]
    # no validation split: every epoch replaces best/ (the last one is kept)
    result = CliRunner().invoke(app, [*args[:args.index("--out") + 1], str(tmp_path / "noval"), *args[args.index(
        "--out") + 2:], "--set", "epochs=2", "--set", "valid_split=none"])
    assert result.exit_code == 0, result.output
    noval = json.loads((tmp_path / "noval" / "summary.json").read_text())
    assert noval["best_epoch"] == 1 and noval["best"] is None  # nothing scored: no score, not -1.0
    preds = json.loads((run / "predictions" / "testdev_predict.json").read_text())
    assert set(preds[0]) == {"questionId", "prediction"} and preds[0]["questionId"].startswith("g")

    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    for name in ("losses.png", "validation.png"):
        with Image.open(run / "plots" / name) as im:
            # a drawn figure, not blank
            assert im.size[0] > 500 and len(im.convert("L").getcolors(1 << 16) or range(11)) > 10


def test_resume_logs_each_step_and_epoch_once_and_names_a_damaged_checkpoint(tmp_path):
    import shutil
    import subprocess

    world = tmp_path / "world"
    make_finetune_world(world, train=40, valid=8)
    run = tmp_path / "gqa"
    args = ["finetune", "gqa", "--set", "from_scratch=true", "--config", "tiny", "--corpus", str(world / "ft_corpus"),
            "--features", str(world / "ft_feats"), "--out", str(run), "--set", f"vocab={BERT_VOCAB}",
            "--set", "batch_size=16", "--set", "train_splits=train", "--set", "log_every=1"]
    assert CliRunner().invoke(app, args).exit_code == 0
    shutil.copy(run / "last.pt", tmp_path / "epoch1.pt")
    shutil.copy(run / "last.pt.sha256", tmp_path / "epoch1.pt.sha256")
    assert CliRunner().invoke(app, [*args, "--resume", "--set", "epochs=2"]).exit_code == 0
    # a crash after epoch 2 was logged but before its last.pt replaced epoch 1's, and a killed last.pt write
    shutil.copy(tmp_path / "epoch1.pt", run / "last.pt")
    shutil.copy(tmp_path / "epoch1.pt.sha256", run / "last.pt.sha256")
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / f".last.pt.tmp-{gone.pid}").write_bytes(b"x" * 1000)
    result = CliRunner().invoke(app, [*args, "--resume", "--set", "epochs=2"])
    assert result.exit_code == 0, result.output
    assert "1 epoch(s) done" in result.output and not (run / f".last.pt.tmp-{gone.pid}").exists()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 11))  # 80 questions // 16 = 5 per epoch
    assert [r["epoch"] for r in log if "valid" in r] == [0, 1]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]

    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    result = CliRunner().invoke(app, [*args, "--resume", "--set", "epochs=3"])
    assert result.exit_code == 1 and f"{run / 'last.pt'}: damaged checkpoint" in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_two_process_ddp_finetuning_matches_one_process(world, tmp_path):
    def args(out):
        return ["finetune", "nlvr2", "--set", "from_scratch=true", "--config", "tiny", "--corpus",
                str(world / "ft_corpus"), "--features", str(world / "ft_feats"), "--out", str(out),
                "--set", f"vocab={BERT_VOCAB}", "--set", "batch_size=32", "--set", "dropout=0", "--set", "epochs=1",
                "--set", "log_every=1"]

    a, b = one_and_two_process_losses(args, tmp_path, 29541)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]  # 160 pairs // 32
    for step in a:  # same global batches, each process half of each, gradients averaged by DDP
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["best"] == pytest.approx(
        json.loads((tmp_path / "one" / "summary.json").read_text())["best"], abs=2.0)


def _small_run(world, out, *sets, task="gqa"):
    args = ["finetune", task, "--set", "from_scratch=true", "--config", "tiny", "--corpus", str(world / "ft_corpus"),
            "--features", str(world / "ft_feats"), "--out", str(out), "--set", f"vocab={BERT_VOCAB}",
            "--set", "train_splits=train", "--set", "valid_split=none", "--set", "dropout=0", "--set", "log_every=1"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    world = tmp_path / "world"
    make_finetune_world(world, train=20, valid=4)  # 40 GQA questions: 5 steps of 8
    whole = _small_run(world, tmp_path / "whole", "batch_size=8")
    accumulated = _small_run(world, tmp_path / "acc", "batch_size=8", "micro_batch_size=4")
    a = {r["step"]: r for r in whole if "loss" in r}
    b = {r["step"]: r for r in accumulated if "loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:  # same global batches in two micro-batches of 4: same mean loss, same gradient
        for key in ("loss", "gqa", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert len({r["loss"] for r in a.values()}) > 1  # it trains: the losses are not one constant


def test_finetuning_writes_tensorboard_events_and_the_task_decides_the_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lxm.train.config import load_finetune_config
    from lxm.train.finetune import Finetuner
    from lxm.train.tasks import GqaTask

    world = tmp_path / "world"
    make_finetune_world(world, train=20, valid=4)
    log = _small_run(world, tmp_path / "run", "batch_size=8", "epochs=2", "valid_split=testdev")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [r["step"] for r in log if "loss" in r] == list(range(1, 11))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in log if "loss" in r])
    assert [e.step for e in events.Scalars("valid/accuracy")] == [5, 10]

    class Halved(GqaTask):  # a task is one class: its loss is what the finetuner optimises and logs
        def loss(self, out, batch):
            return {"halved": 0.5 * super().loss(out, batch)["gqa"]}

    cfg = load_finetune_config("gqa", "tiny", [
        f"corpus={world / 'ft_corpus'}", f"features=[{world / 'ft_feats'}]", f"vocab={BERT_VOCAB}",
        "from_scratch=true", "train_splits=train", "valid_split=none", "dropout=0", "log_every=1", "batch_size=8"])
    task = Halved(GqaTask.from_corpus(world / "ft_corpus").answers)
    Finetuner(cfg, tmp_path / "halved", task=task, log=lambda m: None).run()
    halved = [json.loads(line) for line in (tmp_path / "halved" / "log.jsonl").read_text().splitlines()]
    first = next(r for r in halved if "loss" in r)
    assert "gqa" not in first and first["halved"] == pytest.approx(0.5 * log[0]["gqa"], rel=1e-5)


def test_batches_move_to_a_device_with_every_tensor(world):
    from lxm.model.losses import PretrainLabels
    from lxm.train.data import Batch

    data = FinetuneDataset(_task("vqa"), world / "ft_corpus", ["train"], [world / "ft_feats"], BERT_VOCAB)
    batch = collate_finetune([data[0], data[1]])
    moved = batch.to("meta")
    assert type(moved) is type(batch) and moved.ids == batch.ids
    assert all(t.is_meta for t in (*moved.model_inputs().values(), moved.targets))
    assert batch.targets.shape == (2, len(VQA_ANSWERS)) and not batch.targets.is_meta
    labels = PretrainLabels(**{name: torch.zeros(2) for name in PretrainLabels.__dataclass_fields__})
    pre = Batch(*batch.model_inputs().values(), labels=labels, uids=["a", "b"]).to("meta")
    assert pre.uids == ["a", "b"] and all(getattr(pre.labels, n).is_meta for n in PretrainLabels.__dataclass_fields__)


def test_tasks_rank_their_predictions_by_the_probability_their_loss_defines():
    vqa = VqaTask(["red", "blue", "dog"])
    logits = torch.tensor([[0.0, 2.0, 2.0], [3.0, -1.0, 0.5]])
    top = vqa.top(logits, 2)
    # sigmoid per answer (the head is trained with BCE); equal logits keep the lower index first, as argmax
    assert [[a for a, _ in row] for row in top] == [["blue", "dog"], ["red", "dog"]]
    assert top[1][0][1] == pytest.approx(float(torch.sigmoid(torch.tensor(3.0))))
    assert [row[0][0] for row in top] == vqa.decode(logits)
    assert vqa.target_answers([(0, 0.3), (2, 1.0)]) == [("dog", 1.0), ("red", pytest.approx(0.3))]
    nlvr2 = Nlvr2Task()
    top = nlvr2.top(torch.tensor([[0.0, 1.0]]), 5)  # k beyond the classes: all of them
    assert [a for a, _ in top[0]] == ["True", "False"] and sum(p for _, p in top[0]) == pytest.approx(1.0)
    assert nlvr2.target_answers(0) == [("False", 1.0)]


def test_bf16_finetuning_follows_fp32_and_accumulates_in_fp32(tmp_path):
    world = tmp_path / "world"
    make_finetune_world(world, train=20, valid=4)
    fp32 = {r["step"]: r for r in _small_run(world, tmp_path / "fp32", "batch_size=8", "epochs=3") if "loss" in r}
    bf16 = {r["step"]: r for r in _small_run(world, tmp_path / "bf16", "batch_size=8", "epochs=3", "precision=bf16")
            if "loss" in r}
    acc = {r["step"]: r for r in _small_run(world, tmp_path / "acc", "batch_size=8", "epochs=3", "precision=bf16",
                                            "micro_batch_size=4") if "loss" in r}
    assert sorted(fp32) == sorted(bf16) == sorted(acc) == list(range(1, 16))
    for step in fp32:  # bf16 compute, fp32 masters: the fp32 curve to bf16 rounding
        assert bf16[step]["loss"] == pytest.approx(fp32[step]["loss"], rel=0.02), step
        # two micro-batches of 4 added in fp32 = the batch of 8 (to bf16 rounding of the two halves' activations)
        assert acc[step]["loss"] == pytest.approx(bf16[step]["loss"], rel=0.01), step
    assert (tmp_path / "bf16" / "best").exists()
