"""lxm.model.matmul: row-halved products compute what F.linear computes, are chosen by measurement only where they
can gain, and leave every other product to F.linear; the fused q/k/v projection equals three separate ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_inputs, randomize_
from lxm.model import LxmertForPreTraining, PretrainLabels, lxmert_tiny, pretraining_step_losses
from lxm.model import matmul


@pytest.fixture(autouse=True)
def fresh_decisions():
    saved = dict(matmul._decided)
    matmul._decided.clear()
    yield
    matmul._decided.clear()
    matmul._decided.update(saved)


def _bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of bf16's rounding step at b's magnitude."""
    step = b.float().abs().clamp_min(1e-3) * 2.0 ** -7
    return float(((a.float() - b.float()).abs() / step).max())


@pytest.mark.parametrize("bias", [True, False])
def test_row_halves_equal_the_whole_product(bias):
    x, w, b = _bf16(37, 96, seed=0), _bf16(48, 96, seed=1), _bf16(48, seed=2)
    whole = matmul._product(x, w.t(), b if bias else None, halves=False)
    halves = matmul._product(x, w.t(), b if bias else None, halves=True)
    assert halves.shape == whole.shape == (37, 48) and halves.is_contiguous()
    assert _ulps(halves, whole) <= 1.0  # the same sums; at most one rounding step apart (different blocking)
    torch.testing.assert_close(whole, torch.addmm(b, x, w.t()) if bias else x @ w.t())


@pytest.mark.parametrize("halves", [True, False])
def test_the_row_split_linear_has_f_linears_outputs_and_gradients(halves):
    x = _bf16(3, 25, 64, seed=3).requires_grad_()
    w, b = _bf16(40, 64, seed=4).requires_grad_(), _bf16(40, seed=5).requires_grad_()
    g = _bf16(3, 25, 40, seed=6)
    matmul._decided[(75, 40, 64, (40, 1), w.stride(), torch.bfloat16, torch.get_num_threads())] = halves
    out = matmul._RowSplitLinear.apply(x, w, b, halves)
    out.backward(g)
    got = (out.detach(), x.grad, w.grad, b.grad)
    x.grad = w.grad = b.grad = None
    ref = F.linear(x, w, b)
    ref.backward(g)
    for name, a, r in zip(("out", "x.grad", "w.grad", "b.grad"), got, (ref.detach(), x.grad, w.grad, b.grad)):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert _ulps(a, r) <= 1.0, name


def test_only_cpu_bf16_products_with_enough_rows_and_a_narrow_output_are_measured():
    rows = matmul.MIN_ROWS
    assert not matmul.halves_pay(torch.zeros(rows, 8), torch.zeros(8, 64))  # fp32
    assert not matmul.halves_pay(torch.zeros(rows - 1, 8, dtype=torch.bfloat16), torch.zeros(8, 64,
                                                                                              dtype=torch.bfloat16))
    assert not matmul.halves_pay(torch.zeros(rows, 8, dtype=torch.bfloat16),
                                 torch.zeros(8, matmul.MAX_WIDTH + 1, dtype=torch.bfloat16))
    assert matmul.decisions() == {}  # none of them was timed
    a, b = torch.zeros(rows, 64, dtype=torch.bfloat16), torch.zeros(64, 32, dtype=torch.bfloat16)
    first = matmul.halves_pay(a, b)
    assert len(matmul.decisions()) == 1
    key = next(iter(matmul.decisions()))
    assert key[:3] == (rows, 64, 32) and key[-1] == torch.get_num_threads()
    matmul._decided[key] = not first  # a recorded decision is what later calls use: no second measurement
    assert matmul.halves_pay(a, b) is (not first)
    assert len(matmul.decisions()) == 1


def test_linear_takes_the_split_path_only_where_halves_were_measured_faster(monkeypatch):
    monkeypatch.setattr(matmul, "MIN_ROWS", 8)
    x = _bf16(16, 32, seed=7).requires_grad_()
    w, b = _bf16(24, 32, seed=8).requires_grad_(), _bf16(24, seed=9).requires_grad_()
    monkeypatch.setattr(matmul, "MARGIN", float("inf"))  # halves never pay
    assert type(matmul.linear(x, w, b).grad_fn).__name__ == "AddmmBackward0"
    matmul._decided.clear()
    monkeypatch.setattr(matmul, "MARGIN", 0.0)  # halves always pay
    out = matmul.linear(x, w, b)
    assert type(out.grad_fn).__name__ == "_RowSplitLinearBackward"
    assert _ulps(out.detach(), F.linear(x, w, b).detach()) <= 1.0
    assert type(matmul.linear(x.float(), w.float(), b.float()).grad_fn).__name__ == "AddmmBackward0"  # fp32
    with torch.no_grad():
        assert matmul.linear(x[:4], w, b).shape == (4, 24)  # few rows: F.linear
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 activations: autocast's own F.linear
        out = matmul.linear(x, w.float(), b.float())
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ == "AddmmBackward0"


def _step_grads(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    losses, _ = pretraining_step_losses(model, labels, **inputs)
    sum(losses.values()).backward()
    return {k: v.detach().float() for k, v in losses.items()}, {
        n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_a_bf16_model_with_every_product_halved_trains_as_with_none(monkeypatch):
    """The tiny model in bf16 with every linear layer's products row-halved (MIN_ROWS 1, MARGIN 0) against the
    same model with none: losses and gradients within bf16 rounding."""
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    model = randomize_(LxmertForPreTraining(cfg), 11).eval().to(torch.bfloat16)
    inputs, raw = make_inputs(cfg)
    labels = PretrainLabels(**raw)
    monkeypatch.setattr(matmul, "MIN_ROWS", 10**9)
    ref_losses, ref_grads = _step_grads(model, inputs, labels)
    monkeypatch.setattr(matmul, "MIN_ROWS", 1)
    monkeypatch.setattr(matmul, "MARGIN", 0.0)
    losses, grads = _step_grads(model, inputs, labels)
    assert any(matmul.decisions().values())  # products were halved
    for name in ref_losses:
        torch.testing.assert_close(losses[name], ref_losses[name], rtol=1e-2, atol=1e-2, msg=name)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        # here bit-equal (small K); the bound allows other CPUs' kernels a rounding step in the products
        assert float((grads[name] - ref_grads[name]).abs().max() / scale) < 0.02, name


def test_the_fused_qkv_projection_equals_three_projections():
    torch.manual_seed(0)
    cfg = lxmert_tiny()
    att = randomize_(LxmertForPreTraining(cfg), 12).lxmert.encoder.layer[0].attention.self
    x = torch.randn(5, 7, cfg.hidden_size)
    q, k, v = att.project(x)
    for got, proj in zip((q, k, v), (att.query, att.key, att.value)):
        torch.testing.assert_close(got, proj(x), atol=1e-6, rtol=1e-6)
    k2, v2 = att.project(x, "kv")
    torch.testing.assert_close(k2, k)
    torch.testing.assert_close(v2, v)


def test_an_fp32_model_under_bf16_autocast_keeps_autocasts_products(monkeypatch):
    monkeypatch.setattr(matmul, "MIN_ROWS", 1)
    monkeypatch.setattr(matmul, "MARGIN", 0.0)
    cfg = lxmert_tiny()
    model = randomize_(LxmertForPreTraining(cfg), 13).eval()
    inputs, raw = make_inputs(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = pretraining_step_losses(model, PretrainLabels(**raw), **inputs)
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert matmul.decisions() == {}  # nothing went through the row-split path
