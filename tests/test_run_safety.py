"""Run folders under faults and wrong commands (issue 27 items 1, 10, 20, 25, 26, 29, 30, 32, 34): a failed command
leaves a run as it was, `--resume` alone continues a run on its own recipe (more epochs: the schedule follows),
SIGTERM stops with a checkpoint and the resume command, one process per run folder, no mixing into a finished run,
checksummed checkpoints, epoch checkpoints as resume points, only lxm's own temp files removed, `--dry-run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import BERT_VOCAB
from lxm.cli import app
from lxm.model import CheckpointError
from lxm.train.config import load_finetune_config, pretrain_tiny
from lxm.train.finetune import Finetuner, resolve_init
from lxm.train.optim import make_optimizer
from lxm.train.pretrain import resume_candidates
from lxm.train.run import (DiskFullError, NonFiniteLossError, RunLock, RunLogger, RunStopped, latest_checkpoint,
                           read_state, remove_checkpoint, remove_stale_temp_files, restore_newest, restore_state,
                           rewind_logs, save_state, step_checkpoints, training_state)
from synthetic import make_custom_world

pytestmark = pytest.mark.e2e  # whole recipes through the lxm CLI (README: Tests)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return root, make_custom_world(root, train=24, valid=8)  # qa: 48 training questions, 3 steps of 16


def _args(world, run, *extra, train=None):
    root, paths = world
    return ["finetune", "qa", "--set", "from_scratch=true", "--config", "tiny", "--train",
            str(train or paths["qa_train"]), "--valid", str(paths["qa_valid"]), "--features", str(root / "ft_feats"),
            "--out", str(run), "--set", f"vocab={BERT_VOCAB}", "--set", "batch_size=16", *extra]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _snapshot(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_failed_command_leaves_the_run_as_it_was_and_resume_alone_continues_on_a_rebuilt_schedule(world, tmp_path):
    run = tmp_path / "run"
    result = _invoke(*_args(world, run))
    assert result.exit_code == 0, result.output
    before = _snapshot(run)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    # the failed resume of the issue: a bad --train with --resume
    result = _invoke(*_args(world, run, "--resume", train=bad))
    assert result.exit_code == 1 and "bad.jsonl" in result.output
    assert _snapshot(run) == before
    # a changed recipe is refused by name, the run untouched
    result = _invoke("finetune", "qa", "--out", run, "--resume", "--set", "lr=0.5", "--set", "batch_size=8")
    assert result.exit_code == 1 and "lr 0.001 -> 0.5" in result.output and "batch_size 16 -> 8" in result.output
    assert _snapshot(run) == before
    for command, words in ((("finetune", "classify"), "a qa finetuning run; resume it with lxm finetune qa"),
                           (("pretrain",), "a qa finetuning run")):  # another task's or recipe's resume
        result = _invoke(*command, "--out", run, "--resume")
        assert result.exit_code == 1 and words in result.output.replace("\n", " "), result.output
    assert _snapshot(run) == before
    # a fresh run whose inputs fail writes nothing into its new folder
    result = _invoke(*_args(world, tmp_path / "new", train=bad))
    assert result.exit_code == 1 and not (tmp_path / "new" / "config.yaml").exists()

    last = torch.load(run / "last.pt", weights_only=True)["model"]
    result = _invoke("finetune", "qa", "--out", run, "--resume", "--set", "epochs=2")  # nothing else repeated
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "epochs 1 -> 2" in result.output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    config = (run / "config.yaml").read_text()
    assert "epochs: 2" in config and config.replace("epochs: 2", "epochs: 1") == before["config.yaml"].decode()
    steps = [r for r in _log(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    # the schedule spans the 6 steps now: warm-up then decay, never the old end's lr 0 for the new steps
    assert all(r["lr"] > 0 for r in steps[3:5]), [r["lr"] for r in steps]
    assert any(r.get("resume_changes") == {"optim.epochs": [1, 2]} for r in _log(run))
    now = torch.load(run / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(now[k], last[k]) for k in now if now[k].is_floating_point())


def test_the_schedule_after_a_resume_is_the_resumed_configs(tmp_path):
    """BertAdam keeps its schedule in the param groups, AdamW's LambdaLR in a lambda: both follow the new total."""
    for kind in ("bert", "adamw"):
        model = torch.nn.Linear(4, 4)
        opt, sched = make_optimizer(model, kind, 1e-2, t_total=4, warmup=0.25)
        for _ in range(4):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            if sched:
                sched.step()
            opt.zero_grad()
        save_state(tmp_path / f"{kind}.pt", training_state(model, opt, sched))
        longer = torch.nn.Linear(4, 4)
        opt2, sched2 = make_optimizer(longer, kind, 1e-2, t_total=8, warmup=0.25)
        restore_state(tmp_path / f"{kind}.pt", longer, opt2, sched2)
        lr = opt2.param_groups[0]["lr"] if sched2 else opt2.current_lr()[0]
        assert lr == pytest.approx(1e-2 * (8 - 4) / (8 - 2)), kind  # step 4 of 8, decay after 2 warm-up steps
        weight = longer.weight.detach().clone()
        longer(torch.randn(2, 4)).sum().backward()
        opt2.step()
        assert not torch.equal(weight, longer.weight), kind


def test_sigterm_stops_with_a_checkpoint_and_the_resume_command_then_resume_continues_exactly(world, tmp_path):
    root, paths = world
    overrides = [f"data={{train: {paths['qa_train']}}}", "valid_split=none", f"features=[{root / 'ft_feats'}]",
                 f"vocab={BERT_VOCAB}", "from_scratch=true", "batch_size=16", "epochs=2"]
    cfg = load_finetune_config("qa", "tiny", overrides)
    Finetuner(cfg, tmp_path / "full").run()
    reference = {r["step"]: r["loss"] for r in _log(tmp_path / "full") if "loss" in r}

    def stop_at_4(step, epoch):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "cut"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunStopped) as stopped:
        Finetuner(cfg, run, on_step=stop_at_4).run()
    assert stopped.value.exit_code == 143
    message = str(stopped.value)
    assert "SIGTERM at step 4 (epoch 1, step 1 of 3)" in message
    assert f"lxm finetune qa --out {run} --resume" in message and "\n" not in message
    assert torch.load(run / "last.pt", weights_only=True)["position"] == 1
    assert signal.getsignal(signal.SIGTERM) is handler  # the handlers are put back
    result = _invoke("finetune", "qa", "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    resumed = {r["step"]: r["loss"] for r in _log(run) if "loss" in r}
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step

    def stop_in_validation(record):  # a signal while the epoch's validation runs: stop after its last.pt
        if "valid" in record:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "cut2"
    with pytest.raises(RunStopped, match="stopped by SIGINT after epoch 0 \\(step 3\\)") as stopped:
        Finetuner(cfg, run, on_record=stop_in_validation).run()
    assert stopped.value.exit_code == 130
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["epoch"], state["position"]) == (1, 0)


def test_one_process_per_run_folder_and_no_mixing_into_a_finished_run(world, tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire()  # another run holds the folder
    try:
        result = _invoke(*_args(world, run))
        assert result.exit_code == 1 and f"{run}: another lxm process (pid {os.getpid()})" in result.output
        assert not (run / "config.yaml").exists()
    finally:
        lock.release()
    assert _invoke(*_args(world, run)).exit_code == 0
    (run / "notes.txt").write_text("mine")
    result = _invoke(*_args(world, run))  # a second fresh run into the finished one
    assert result.exit_code == 1 and "already holds a run" in result.output and "--overwrite" in result.output
    result = _invoke(*_args(world, run, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    assert [r["step"] for r in _log(run) if "loss" in r] == [1, 2, 3]
    assert (run / "notes.txt").read_text() == "mine"  # not lxm's: kept
    result = _invoke(*_args(world, tmp_path / "other", "--resume", "--overwrite"))
    assert result.exit_code == 1 and "give one of them" in result.output


def test_dry_run_reports_the_plan_and_writes_nothing(world, tmp_path):
    run = tmp_path / "dry"
    result = _invoke(*_args(world, run, "--dry-run"))
    assert result.exit_code == 0, result.output
    assert "train_examples: 48" in result.output and "steps_per_epoch: 3" in result.output
    assert "valid_examples: 16" in result.output and "device: cpu" in result.output
    assert not run.exists()
    result = _invoke(*_args(world, run, "--dry-run", "--set", "device=banana"))
    assert result.exit_code == 1 and "'banana'" in result.output and "Traceback" not in result.output
    if not torch.cuda.is_available():  # lxm.devices' rule: a GPU asked for and absent is an error, not the CPU
        result = _invoke(*_args(world, run, "--dry-run", "--set", "device=cuda:0"))
        assert result.exit_code == 1 and "CUDA is not available" in result.output.replace("\n", " ")
    assert not run.exists()


def test_a_damaged_run_config_is_named_in_one_line(world, tmp_path):
    run = tmp_path / "run"
    assert _invoke(*_args(world, run)).exit_code == 0
    good = (run / "config.yaml").read_text()
    for damage, words in ((good.replace("max_length: 20", "max_length: twenty"), "'max_length'"),
                          (good[: len(good) // 2].rsplit("\n", 1)[0] + "\n", "incomplete"),
                          (b"\xff\xfe" + good.encode(), "not UTF-8")):
        if isinstance(damage, bytes):
            (run / "config.yaml").write_bytes(damage)
        else:
            (run / "config.yaml").write_text(damage)
        for command in (("finetune", "qa", "--out", run, "--resume"),  # the run resumed, or as another's --init
                        _args(world, tmp_path / "other", "--set", "from_scratch=false", "--init", run)):
            result = _invoke(*command)
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            text = result.output.replace("\n", "")
            assert f"{run / 'config.yaml'}" in text and words in text


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_carry_a_checksum_and_a_mismatch_is_a_damaged_checkpoint(tmp_path, caplog):
    model = torch.nn.Linear(8, 8)
    opt, sched = make_optimizer(model, "bert", 1e-3, t_total=10, warmup=0.1)
    older, newer = tmp_path / "step-1.pt", tmp_path / "step-2.pt"
    save_state(older, training_state(model, opt, sched, step=1))
    save_state(newer, training_state(model, opt, sched, step=2))
    assert (tmp_path / "step-2.pt.sha256").read_text().endswith("  step-2.pt\n")
    data = bytearray(newer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the weights: torch's zip reader would load it
    newer.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{newer}: damaged checkpoint"):
        read_state(newer)
    with caplog.at_level("WARNING"):
        path, state = restore_newest([newer, older], model, opt, sched)
    assert path == older and state["step"] == 1
    assert any(str(newer) in r.getMessage() for r in caplog.records)
    remove_checkpoint(older)
    assert not older.exists() and not (tmp_path / "step-1.pt.sha256").exists()


def test_a_full_disk_is_named(tmp_path):
    target = tmp_path / "last.pt"
    (tmp_path / f".last.pt.tmp-{os.getpid()}").symlink_to("/dev/full")  # every write there: ENOSPC
    with pytest.raises(DiskFullError, match=f"{target}: disk full"):
        save_state(target, {"x": torch.zeros(100_000)})
    assert not target.exists()


def test_epoch_checkpoints_are_resume_candidates(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "epoch-00.pt").write_bytes(b"")
    assert resume_candidates(tmp_path, steps_per_epoch=4) == [ckpts / "epoch-00.pt"]
    for name in ("step-3.pt", "step-4.pt", "epoch-01.pt", "best.pt", "step-5.pt.damaged"):
        (ckpts / name).write_bytes(b"")
    assert [p.name for p in resume_candidates(tmp_path, 4)] == ["epoch-01.pt", "step-4.pt", "epoch-00.pt",
                                                                  "step-3.pt"]


def test_one_step_checkpoint_lister_serves_resume_and_init(tmp_path):
    """`step_checkpoints` (newest first, by number not by name) is what `--resume` and `--init RUN` both read; a
    stray file that only looks like a checkpoint is not one."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("step-9.pt", "step-10.pt", "step-old.pt", "step-2.pt.damaged", "epoch-00.pt"):
        (ckpts / name).write_bytes(b"")
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-10.pt", "step-9.pt"]
    assert latest_checkpoint(tmp_path) == ckpts / "step-10.pt"
    config = yaml.safe_load(pretrain_tiny().to_yaml()) | {"corpus": "c", "features": ["f"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))  # a pretraining run that saved no model yet
    assert resolve_init(str(tmp_path)) == str(ckpts / "step-10.pt")


def test_only_lxms_own_temp_files_of_finished_writers_are_removed(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    pid = gone.pid
    lxm_own = [f".last.pt.tmp-{pid}", f".config.yaml.tmp-{pid}", f"checkpoints/.step-3.pt.tmp-{pid}",
               f"checkpoints/.step-3.pt.sha256.tmp-{pid}", f"best/.model.safetensors.tmp-{pid}"]
    others = [f".notes.txt.tmp-{pid}", f"data/.step-3.pt.tmp-{pid}", f"checkpoints/.mine.bin.tmp-{pid}",
              f".last.pt.tmp-{os.getppid()}"]  # not lxm's names / folders, or a live writer
    for name in lxm_own + others:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == sorted(lxm_own)
    assert all((tmp_path / name).exists() for name in others)


# ---------------------------------------------------------------------------------------------------- logs


def test_a_log_with_bytes_that_are_not_utf8_does_not_stop_a_resume(tmp_path, caplog):
    lines = [json.dumps({"step": s, "epoch": 0, "loss": 1.0}).encode() for s in (1, 2, 3)]
    (tmp_path / "log.jsonl").write_bytes(lines[0] + b"\n\xff\xfe garbage\n" + lines[1] + b"\n" + lines[2] + b"\n")
    (tmp_path / "metrics.jsonl").write_bytes(b"\xc3\x28\n" + json.dumps({"epoch": 0}).encode() + b"\n")
    with caplog.at_level("WARNING"):
        rewind_logs(tmp_path, step=2, epoch=0)
    assert (tmp_path / "log.jsonl").read_bytes() == lines[0] + b"\n\xff\xfe garbage\n" + lines[1] + b"\n"
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"\xc3\x28\n"
    assert any("log.jsonl" in r.getMessage() and "2" in r.getMessage() for r in caplog.records)


def test_a_non_finite_loss_is_one_line_naming_the_step_and_the_batch_in_strict_json(tmp_path):
    logger = RunLogger(tmp_path, True)
    with pytest.raises(NonFiniteLossError) as caught:
        logger.check_finite({"loss": float("nan"), "mlm": float("inf"), "grad_norm": 1.0}, 6, uids=["a", "b"])
    message = str(caught.value)
    assert "at step 7" in message and "(a b)" in message and str(tmp_path / "log.jsonl") in message
    assert "\n" not in message and isinstance(caught.value, FloatingPointError)

    def refuse(name):
        raise AssertionError(f"bare {name} in the log")

    (record,) = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert record["step"] == 7 and record["uids"] == ["a", "b"] and record["losses"]["loss"] == "nan"


def test_a_pretraining_run_killed_after_an_epoch_resumes_from_its_epoch_checkpoint_to_more_epochs(tmp_path):
    from synthetic import make_pretraining_world

    make_pretraining_world(tmp_path, images=72)  # 32 training images, 2 sentences each: 4 steps of 16
    run = tmp_path / "run"
    args = ["pretrain", "--config", "tiny", "--corpus", tmp_path / "corpus", "--features", tmp_path / "feats",
            "--out", run, "--set", f"vocab={BERT_VOCAB}", "--set", "batch_size=16", "--set", "checkpoint_every=1000"]
    result = _invoke(*args, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "sentences: 64" in result.output and "total_steps: 4" in result.output and not run.exists()
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    ckpts = run / "checkpoints"
    assert (ckpts / "epoch-00.pt.sha256").exists() and (ckpts / "best.pt.sha256").exists()
    for path in ckpts.glob("step-*"):  # as if killed after epoch 0, before the final step checkpoint
        path.unlink()
    weights = (run / "model" / "model.safetensors").read_bytes()
    result = _invoke("pretrain", "--out", run, "--resume", "--set", "epochs=2")
    assert result.exit_code == 0, result.output
    assert "epoch-00.pt at step 4" in result.output.replace("\n", "")
    steps = [r for r in _log(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(r["lr"] > 0 for r in steps[4:7]), [r["lr"] for r in steps]
    assert (run / "model" / "model.safetensors").read_bytes() != weights


def test_lxm_finetune_stopped_by_sigterm_exits_143_with_the_resume_command(world, tmp_path):
    import sys
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lxm.cli", *map(str, _args(world, run, "--set", "epochs=200"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "log.jsonl").exists() and (run / "log.jsonl").read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM at step" in stderr and f"lxm finetune qa --out {run} --resume" in stderr
    assert "Traceback" not in stderr and (run / "last.pt.sha256").exists()


def test_each_process_takes_its_own_gpu_and_a_gpu_asked_for_must_exist():
    """lxm.devices' decision on a machine with a given number of GPUs (tested without one): torchrun's processes take
    cuda:LOCAL_RANK for `auto` and `cuda`, never all GPU 0; a GPU that is not there is an error, not the CPU."""
    from lxm.devices import device_for
    from lxm.errors import ConfigError

    for spec in ("auto", "cuda", None, " CUDA "):
        assert device_for(spec, gpus=8, local_rank=3) == torch.device("cuda", 3), spec
    assert device_for("cuda:5", gpus=8, local_rank=3) == torch.device("cuda", 5)
    assert device_for("auto", gpus=0, local_rank=3) == device_for("cpu", gpus=8, local_rank=3) == torch.device("cpu")
    for spec, gpus, words in (("cuda", 0, "CUDA is not available"), ("cuda:8", 8, "this machine has 8 GPU.s. .cuda:0..cuda:7."),
                              ("cuda", 2, "this machine has 2 GPU.s."), ("gpu", 8, "not a device")):
        with pytest.raises(ConfigError, match=words):
            device_for(spec, gpus=gpus, local_rank=3 if spec == "cuda" else 0, what="--device")


def test_step_values_are_read_at_once_and_the_first_bad_step_is_named(tmp_path):
    """`PendingSteps`: the trainers keep each step's values on the device and read them together (one host read)
    at log steps and before checkpoints; what is read equals the values given, and the non-finite guard sees every
    step in order, so a bad step is named with its own batch even when later steps followed it."""
    from lxm.train.run import DistInfo, PendingSteps

    logger = RunLogger(tmp_path, True)
    pending = PendingSteps(logger, DistInfo())
    assert pending.settle() is None
    values = [{"loss": torch.tensor(v, dtype=torch.float64), "mlm": torch.tensor(v / 3, dtype=torch.float64)}
              for v in (2.5, 1.0 / 3.0)]
    for step, v in enumerate(values):
        pending.add(step, v, uids=[f"u{step}"])
    assert pending.settle() == {"loss": 1.0 / 3.0, "mlm": (1.0 / 3.0) / 3} and pending.settle() is None
    for step, v in enumerate((1.0, float("nan"), float("inf"))):
        pending.add(10 + step, {"loss": torch.tensor(v, dtype=torch.float64)}, uids=[f"b{step}"])
    with pytest.raises(NonFiniteLossError, match=r"at step 12 .*\(b1\)"):
        pending.settle()


def test_a_training_step_returns_its_values_on_the_device_unread():
    """No host read inside the step (on a GPU each one is a synchronisation): losses and grad norm come back as 0-d
    float64 tensors, averaged over micro-batches, with 'loss' their sum."""
    from lxm.train.step import train_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.randn(3, 4), torch.randn(3, 4)]

    def loss_fn(m, x):
        out = m(x)
        return {"a": out.pow(2).mean(), "b": out.abs().mean()}

    with torch.no_grad():
        expected = {k: sum(float(loss_fn(model, x)[k]) / 2 for x in batches) for k in ("a", "b")}
    out = train_step(model, batches, loss_fn, opt, clip_grad_norm=1.0)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float64 for v in out.values())
    assert set(out) == {"a", "b", "loss", "grad_norm"} and float(out["grad_norm"]) > 0
    assert float(out["a"]) == pytest.approx(expected["a"]) and float(out["loss"]) == float(out["a"] + out["b"])


def _stop_worker(rank: int, port: int, results) -> None:
    """One of two gloo processes: rank 1 gets SIGTERM after step 3; both ask after each step with every=5."""
    import torch.distributed as dist

    from lxm.train.run import DistInfo, StopSignals

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stop = StopSignals(DistInfo(rank, 2, rank), torch.device("cpu"), every=5)
        seen = []
        for step in range(1, 11):
            if rank == 1 and step == 4:
                stop.signum = signal.SIGTERM  # what the handler records
            seen.append(stop.requested(step))
        seen.append(stop.requested())  # a point every process reaches (an epoch's end)
        results[rank] = seen
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_under_torchrun_a_stop_request_is_combined_every_log_interval_on_every_rank():
    """The stop flag's all-reduce (a sync on a GPU) runs every `every` steps, not every step; both processes see a
    SIGTERM that reached one of them at the same step, the next step due (5 after a signal at step 4)."""
    import torch.multiprocessing as mp

    from lxm.train.run import stop_check_due

    assert [s for s in range(1, 13) if stop_check_due(s, 5, 2)] == [5, 10] and stop_check_due(None, 5, 2)
    assert all(stop_check_due(s, 5, 1) for s in range(1, 13))  # one process: a flag, read every step
    results = mp.Manager().dict()
    mp.spawn(_stop_worker, args=(29541, results), nprocs=2, join=True)
    term = int(signal.SIGTERM)
    assert results[0] == results[1] == [None] * 4 + [term] + [None] * 4 + [term, term]
