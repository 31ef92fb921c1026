"""`lxm pretrain` end to end on a tiny model: outputs, exact resume after SIGKILL, 2-process DDP = 1 process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lxm.cli import app
from synthetic import log_records, pretrain_args

pytestmark = pytest.mark.e2e  # whole recipes through the lxm CLI (README: Tests)


def test_pretrain_writes_config_logs_and_checkpoints(data, tmp_path):
    result = CliRunner().invoke(app, ["pretrain",
                                      *pretrain_args(data, tmp_path / "run", "epochs=2", "checkpoint_every=3")])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["optim"]["batch_size"] == 4 and cfg["optim"]["lr"] == 1e-3 and cfg["optim"]["optimizer"] == "bert"
    steps = [r for r in log_records(tmp_path / "run") if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # 17 training sentences // 4 = 4 steps x 2 epochs
    assert {"mlm", "match", "obj", "attr", "feat", "qa", "lr", "grad_norm"} <= set(steps[0])
    assert any("valid" in r for r in log_records(tmp_path / "run"))
    ckpts = {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert {"epoch-00.pt", "epoch-01.pt", "best.pt", "step-8.pt", "step-6.pt"} <= ckpts
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    # the final weights as an lxm model directory, and a step checkpoint, both load with their own config
    from lxm.model import load_pretrained

    final = load_pretrained(tmp_path / "run" / "model")
    from_step = load_pretrained(tmp_path / "run" / "checkpoints" / "step-8.pt")
    assert final.config == from_step.config and final.config.hidden_size == 32
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plots" / "losses.png").stat().st_size > 10_000
    assert (tmp_path / "plots" / "validation.png").stat().st_size > 10_000
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), from_step.state_dict().values()))
    # pretraining: every branch feeds a loss, so every parameter is updated (nothing is frozen or skipped)
    earlier = torch.load(tmp_path / "run" / "checkpoints" / "step-6.pt", weights_only=True)["model"]
    unchanged = [n for n, p in final.named_parameters() if torch.equal(p.detach(), earlier[n])]
    assert unchanged == []


def test_unknown_config_key_is_an_error(data, tmp_path):
    result = CliRunner().invoke(app, ["pretrain", *pretrain_args(data, tmp_path / "r", "learning_rate=1")])
    assert result.exit_code == 1 and "unknown config key" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_gpu_asked_for_without_cuda_is_a_one_line_error_not_a_cpu_run(data, tmp_path, device):
    """lxm.devices' rule in `lxm pretrain` as in the other commands: the run and its plan stop before anything is
    written, rather than train on the CPU."""
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(app, ["pretrain", *pretrain_args(data, tmp_path / "r", f"device={device}"),
                                          *extra])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"config: 'runtime.device' {device}: CUDA is not available" in errors[0], result.output
    assert not (tmp_path / "r").exists()


def test_resume_after_sigkill_gives_the_same_next_step_loss(data, tmp_path):
    cmd = [sys.executable, "-m", "lxm.cli", "pretrain"]
    args = lambda out: pretrain_args(data, out, "epochs=4", "checkpoint_every=1")  # noqa: E731
    subprocess.run(cmd + args(tmp_path / "full"), check=True, capture_output=True)
    reference = {r["step"]: r["loss"] for r in log_records(tmp_path / "full") if "loss" in r and "step" in r}
    proc = subprocess.Popen(cmd + args(tmp_path / "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "cut" / "checkpoints").glob("step-5.pt")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [r["step"] for r in log_records(tmp_path / "cut") if "loss" in r and "step" in r]
    assert 5 <= max(before) < 16, "the kill should land mid-run"
    subprocess.run(cmd + args(tmp_path / "cut") + ["--resume"], check=True, capture_output=True)
    assert not list((tmp_path / "cut" / "checkpoints").glob(".*.tmp-*"))  # a write the kill cut short is removed
    log = log_records(tmp_path / "cut")
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 17))  # the redone steps are logged once
    resumed = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert max(resumed) == max(reference) == 16
    for step in range(1, 17):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_resume_skips_a_damaged_checkpoint_removes_stale_temp_files_and_logs_each_step_once(data, tmp_path, caplog):
    run = tmp_path / "run"
    args = ["pretrain", *pretrain_args(data, run, "epochs=1", "checkpoint_every=1", "dropout=0")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    before = {r["step"]: r["loss"] for r in log_records(run) if "loss" in r}
    ckpts = run / "checkpoints"
    newest = ckpts / "step-4.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # as a crash during the write-back leaves
    for path in ckpts.glob("epoch-00.pt*"):  # the epoch's checkpoint is a resume point of step 4 too: gone here
        path.unlink()
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale, busy = ckpts / f".step-5.pt.tmp-{gone.pid}", ckpts / f".step-5.pt.tmp-{alive.pid}"
        stale.write_bytes(b"x" * 1000)
        busy.write_bytes(b"x" * 1000)
        with caplog.at_level("WARNING"):
            result = CliRunner().invoke(app, [*args, "--resume"])
        assert result.exit_code == 0, result.output
        assert not stale.exists() and busy.exists()  # a live writer's file is left alone
    finally:
        alive.kill()
        alive.wait()
    assert "step-3.pt at step 3" in result.output
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(newest) in m and "damaged" in m for m in warnings), warnings
    assert (ckpts / "step-4.pt.damaged").exists() and torch.load(newest, weights_only=True)["step"] == 4
    log = log_records(run)
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == [1, 2, 3, 4]  # step 4 was redone: logged once, as the validation of its epoch
    assert [r["epoch"] for r in log if "valid" in r] == [0]
    assert {r["step"]: r["loss"] for r in log if "loss" in r}[4] == pytest.approx(before[4], rel=1e-5)

    for path in [*ckpts.glob("step-*.pt"), *ckpts.glob("epoch-*.pt")]:  # every checkpoint damaged: one line
        path.write_bytes(b"")
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 1 and "no intact checkpoint" in result.output and "Traceback" not in result.output


def test_plot_reads_each_step_once_from_a_log_with_redone_steps(tmp_path):
    from lxm.train.plot import read_log

    first = [{"step": s, "epoch": 0, "loss": 10.0 - s, "mlm": 5.0} for s in range(1, 7)]
    redone = [{"step": s, "epoch": 0, "loss": 20.0 - s, "mlm": 4.0} for s in range(4, 9)]
    valid = [{"step": 4, "epoch": 0, "valid": {"loss": 3.0}}, {"step": 4, "epoch": 0, "valid": {"loss": 2.0}}]
    lines = [*first, valid[0], *redone[:1], valid[1], *redone[1:]]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    train, val = read_log(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["loss"] for r in train] == [9.0, 8.0, 7.0, *(20.0 - s for s in range(4, 9))]  # the last record wins
    assert [r["valid"]["loss"] for r in val] == [2.0]
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 0, result.output


def test_two_process_ddp_matches_one_process_with_accumulation(data, tmp_path):
    one = pretrain_args(data, tmp_path / "one", "epochs=1", "dropout=0", "micro_batch_size=2", "valid_split=none")
    subprocess.run([sys.executable, "-m", "lxm.cli", "pretrain", *one], check=True, capture_output=True)
    two = pretrain_args(data, tmp_path / "two", "epochs=1", "dropout=0", "valid_split=none")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29533", "-m", "lxm.cli", "pretrain", *two], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = {r["step"]: r for r in log_records(tmp_path / "one") if "loss" in r}
    b = {r["step"]: r for r in log_records(tmp_path / "two") if "loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "mlm", "obj", "feat"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_a_two_process_resume_continues_each_ranks_dropout_stream(data, tmp_path):
    """Each rank draws its own dropout masks (seed + rank); a checkpoint keeps every rank's RNG states and a resume
    restores each rank's own, so the resumed run logs the uninterrupted run's losses (dropout on). Restoring rank
    0's states on every rank, as before, changes rank 1's masks from the first resumed step."""
    def torchrun(port, *args):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), "-m", "lxm.cli", "pretrain", *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    sets = ("epochs=2", "valid_split=none", "checkpoint_every=100")  # 4 steps an epoch: 17 sentences // 4
    torchrun(29535, *pretrain_args(data, tmp_path / "full", *sets))
    torchrun(29536, *pretrain_args(data, tmp_path / "cut", *sets, "max_steps=3"))
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "step-3.pt", weights_only=False)["rank_rng"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])
    torchrun(29537, "--out", str(tmp_path / "cut"), "--resume", "--set", "max_steps=none")
    full = {r["step"]: r["loss"] for r in log_records(tmp_path / "full") if "loss" in r}
    cut = {r["step"]: r["loss"] for r in log_records(tmp_path / "cut") if "loss" in r}
    assert sorted(full) == sorted(cut) == list(range(1, 9))
    for step in range(1, 9):
        assert cut[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
