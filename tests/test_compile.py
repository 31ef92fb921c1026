"""`--set compile=true`: training through torch.compile (inductor) on CPU gives the eager model's numbers, and a
compiled run resumed from a checkpoint continues exactly as the uninterrupted compiled run."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_inputs, randomize_
from lxm.cli import app
from lxm.model import LxmertForPreTraining, PretrainLabels, lxmert_tiny, pretraining_step_losses
from synthetic import log_records, pretrain_args

pytestmark = pytest.mark.compile


def test_the_compiled_step_equals_the_eager_step():
    cfg = lxmert_tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = randomize_(LxmertForPreTraining(cfg), 3, scale=0.1).train()
    inputs, raw = make_inputs(cfg)
    labels = PretrainLabels(**raw)
    results = []
    for forward in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        losses, _ = pretraining_step_losses(forward, labels, **inputs)
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager_losses, eager_grads), (comp_losses, comp_grads) = results
    assert set(eager_losses) == set(comp_losses) == {"mlm", "match", "obj", "attr", "feat", "qa"}
    for name in eager_losses:
        assert torch.allclose(comp_losses[name], eager_losses[name], rtol=1e-5, atol=1e-6), name
    assert set(comp_grads) == set(eager_grads)
    for name, grad in eager_grads.items():  # fused kernels reorder sums: equal to float32 rounding
        assert torch.allclose(comp_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_a_resumed_compiled_run_continues_exactly(data, tmp_path):
    sets = ("epochs=2", "checkpoint_every=1", "dropout=0", "compile=true")
    result = CliRunner().invoke(app, ["pretrain", *pretrain_args(data, tmp_path / "full", *sets)])
    assert result.exit_code == 0, result.output
    reference = {r["step"]: r["loss"] for r in log_records(tmp_path / "full") if "loss" in r}
    cut = tmp_path / "cut"
    result = CliRunner().invoke(app, ["pretrain", *pretrain_args(data, cut, *sets, "max_steps=5")])
    assert result.exit_code == 0, result.output
    assert max(r["step"] for r in log_records(cut) if "loss" in r) == 5
    result = CliRunner().invoke(app, ["pretrain", *pretrain_args(data, cut, *sets), "--resume"])
    assert result.exit_code == 0, result.output
    resumed = {r["step"]: r["loss"] for r in log_records(cut) if "loss" in r}
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fused_optimizer_trains_as_the_eager_one_and_resumes_exactly(data, tmp_path, monkeypatch,
                                                                         precision):
    """`--set fused_optimizer=true` (BertAdam's update compiled; in bf16 it also reads the copy's gradients and
    writes its weights): `lxm pretrain` gives the eager optimizer's losses to rounding, and a run cut after
    step 5 and resumed continues exactly as the uninterrupted fused run. Every parameter takes the compiled update
    here (the tiny model's are mostly below the size where it pays)."""
    from lxm.train import optim

    monkeypatch.setattr(optim, "FUSED_MIN_NUMEL", 1)
    sets = ("epochs=2", "checkpoint_every=1", "dropout=0", f"precision={precision}")
    losses = {}
    for name, extra in (("eager", ()), ("fused", ("fused_optimizer=true",))):
        result = CliRunner().invoke(app, ["pretrain", *pretrain_args(data, tmp_path / name, *sets, *extra)])
        assert result.exit_code == 0, result.output
        losses[name] = {r["step"]: r["loss"] for r in log_records(tmp_path / name) if "loss" in r}
    assert sorted(losses["fused"]) == sorted(losses["eager"]) == list(range(1, 9))
    assert "fused_optimizer: true" in (tmp_path / "fused" / "config.yaml").read_text()
    # fp32: float32 rounding. bf16: the masters differ by float32 rounding, and where that moves a weight across a
    # bf16 rounding boundary the copy differs by one bf16 step, so the losses may differ by bf16's unit roundoff
    # 2^-8 (seen: 3.5e-5 relative on an AMX Xeon, 9.5e-4 on an AVX2-only EPYC, whose kernels round differently)
    rel = 1e-5 if precision == "fp32" else 2.0**-8
    for step, loss in losses["eager"].items():
        assert losses["fused"][step] == pytest.approx(loss, rel=rel, abs=1e-6), step
    cut = tmp_path / "cut"
    result = CliRunner().invoke(app, ["pretrain",
                                      *pretrain_args(data, cut, *sets, "fused_optimizer=true", "max_steps=5")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["pretrain", *pretrain_args(data, cut, *sets, "fused_optimizer=true"), "--resume"])
    assert result.exit_code == 0, result.output
    resumed = {r["step"]: r["loss"] for r in log_records(cut) if "loss" in r}
    assert resumed == losses["fused"]
