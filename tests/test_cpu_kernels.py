"""lxm.model.cpu_kernels against the plain PyTorch path, and the one switch that picks between them.

Plain: `nn.Dropout` and `F.scaled_dot_product_attention(..., dropout_p=p)`, what runs on GPUs. The kernels change
how a training forward draws dropout and computes attention with dropout on CPU, never what: each is checked against
the plain path, and the switch (model setting, `LXM_CPU_KERNELS`) is checked by what the model actually calls.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from conftest import make_inputs, randomize_
from lxm.errors import ConfigError
from lxm.model import LxmertForPreTraining, PretrainLabels, build_lxmert, lxmert_tiny, pretraining_step_losses
from lxm.model import cpu_kernels
from lxm.model.modeling import LxmertAttention


class _Calls(TorchFunctionMode):
    """Records the torch functions called inside it (by name)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _training_forward_calls(model) -> list[str]:
    cfg = model.config
    inputs, raw = make_inputs(cfg)
    with _Calls() as calls:
        losses, _ = pretraining_step_losses(model.train(), PretrainLabels(**raw), **inputs)
    sum(losses.values()).backward()
    return calls.names


# ---------------------------------------------------------------------------------------------------- the switch


def test_the_environment_variable_overrides_the_setting(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    assert [cpu_kernels.configured(s) for s in (None, True, False)] == [None, True, False]
    cpu = torch.zeros(1)
    assert cpu_kernels.active(None, cpu) and cpu_kernels.active(True, cpu) and not cpu_kernels.active(False, cpu)
    assert not cpu_kernels.active(None, torch.zeros(1, device="meta"))  # by device: on for CPU tensors only
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert [cpu_kernels.configured(s) for s in (None, True, False)] == [False, False, False]
    monkeypatch.setenv(cpu_kernels.ENV, "1")
    assert [cpu_kernels.configured(s) for s in (None, True, False)] == [True, True, True]
    monkeypatch.setenv(cpu_kernels.ENV, "yes please")
    with pytest.raises(ConfigError, match="LXM_CPU_KERNELS='yes please'"):
        cpu_kernels.configured(None)


def test_the_model_setting_reaches_every_module_and_the_environment_wins(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    model = build_lxmert(lxmert_tiny(), cpu_kernels=False)
    users = [m for m in model.modules() if hasattr(m, "cpu_kernels") and m is not model]
    assert len(users) > 10 and {m.cpu_kernels for m in users} == {False} and model.cpu_kernels is False
    model.set_cpu_kernels(None)
    assert {m.cpu_kernels for m in users} == {None}
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    model.set_cpu_kernels(True)
    assert {m.cpu_kernels for m in users} == {False}
    assert LxmertForPreTraining(lxmert_tiny()).cpu_kernels is False  # a model built under the variable


def test_with_the_kernels_off_the_model_is_plain_torch_nn_and_trains_through_sdpa(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    torch.manual_seed(0)
    model = LxmertForPreTraining(lxmert_tiny())
    leaves = {type(m) for m in model.modules() if not list(m.children())}
    assert leaves and all(t.__module__.startswith("torch.nn.modules.") for t in leaves), leaves
    assert {torch.nn.Dropout, torch.nn.GELU, torch.nn.Linear, torch.nn.LayerNorm} <= leaves
    names = _training_forward_calls(model)
    # a cross layer attends four times: the shared cross-attention both ways, then each stream to itself
    layers = model.config.l_layers + model.config.r_layers + 4 * model.config.x_layers
    assert names.count("scaled_dot_product_attention") == layers
    assert "dropout" in names and "apply" not in names  # nn.Dropout's F.dropout; no custom autograd Function


def test_with_the_kernels_on_a_cpu_training_forward_uses_them_and_evaluation_stays_sdpa(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    torch.manual_seed(0)
    model = LxmertForPreTraining(lxmert_tiny())  # None: on for CPU tensors
    names = _training_forward_calls(model)
    assert "scaled_dot_product_attention" not in names and "dropout" not in names
    inputs, _ = make_inputs(model.config)
    with torch.no_grad(), _Calls() as calls:
        model.eval()(**inputs)
    assert calls.names.count("scaled_dot_product_attention") > 0  # no dropout: nothing for the kernels to do


def test_both_paths_give_the_same_evaluation_bits_and_differ_only_in_the_training_draws(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    cfg = lxmert_tiny()
    plain = randomize_(build_lxmert(cfg, cpu_kernels=False), 3)
    kernels = randomize_(build_lxmert(cfg, cpu_kernels=True), 3)
    inputs, raw = make_inputs(cfg)
    with torch.no_grad():
        a, b = plain.eval()(**inputs), kernels.eval()(**inputs)
    assert torch.equal(a.mlm_logits, b.mlm_logits) and torch.equal(a.pooled_output, b.pooled_output)
    labels = PretrainLabels(**raw)
    losses = []
    for model in (plain, kernels):
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(float(sum(pretraining_step_losses(model.train(), labels, **inputs)[0].values())))
    assert losses[0] != losses[1]  # the draws differ (their expectations: the kernel tests below)


# ---------------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_drops_at_rate_p_keeps_the_expectation_and_passes_the_gradient(dtype):
    x = torch.randn(1000, 1001, dtype=dtype, requires_grad=True)  # odd size: the last 64-bit draw is cut
    torch.manual_seed(0)
    y = cpu_kernels.dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.0015  # 1M draws: 5 sigma = 0.0015
    scale = torch.tensor(1 / (1 - 6554 / 65536), dtype=dtype)  # p rounded to 2**-16; the scale in x's dtype
    assert torch.equal(y[kept], x[kept] * scale)
    # the four 16-bit fields of each 64-bit draw are independent: neighbours are dropped together at rate p**2
    d = ~kept.reshape(-1)[: 1000 * 1000].reshape(-1, 4)
    assert all(abs((d[:, i] & d[:, i + 1]).float().mean().item() - 0.01) < 0.0015 for i in range(3))
    torch.manual_seed(0)
    assert torch.equal(cpu_kernels.dropout(x, 0.1), y)  # the global RNG decides: resumable runs stay exact
    y.sum().backward()
    assert torch.equal(x.grad, kept.to(dtype) * scale)
    assert cpu_kernels.dropout(x, 0.0) is x
    assert torch.equal(cpu_kernels.dropout(x.detach(), 1.0), torch.zeros_like(x))


def test_dropout_matches_nn_dropout_where_p_is_a_multiple_of_2_to_the_minus_16():
    """p = 0.25 needs no rounding: the same drop rate and the very same scale as `nn.Dropout`'s, so the two differ
    only in which elements they drop."""
    x = torch.rand(400, 500) + 0.5
    torch.manual_seed(1)
    ours = cpu_kernels.dropout(x, 0.25)
    torch.manual_seed(1)
    plain = torch.nn.Dropout(0.25).train()(x)
    for y in (ours, plain):
        kept = y != 0
        assert abs(kept.float().mean().item() - 0.75) < 0.005  # 200k draws: 5 sigma = 0.0048
        assert torch.equal(y[kept], x[kept] * (1 / 0.75))
    assert not torch.equal(ours, plain)


# ---------------------------------------------------------------------------------------------------- attention


def _attention_inputs():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    keys = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keys[1, ..., 4:] = False
    probs = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~keys, float("-inf")).softmax(-1)
    return q, k, v, keys, probs


def test_attention_with_dropout_is_the_written_out_product_with_the_dropout_draw():
    q, k, v, keys, probs = _attention_inputs()
    torch.manual_seed(3)
    out = cpu_kernels.attention_with_dropout(q, k, v, keys, 0.1)
    torch.manual_seed(3)
    mask = cpu_kernels.dropout_scaled_mask(probs.shape, 0.1, torch.float32, "cpu")  # the same draw, same order
    torch.testing.assert_close(out, (probs * mask) @ v, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, probs @ v, atol=1e-3)  # it drops


def test_attention_kernel_and_sdpa_agree_without_dropout_and_in_expectation_with_it():
    q, k, v, keys, probs = _attention_inputs()
    torch.testing.assert_close(cpu_kernels.attention_with_dropout(q, k, v, keys, 0.0),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=keys), atol=1e-6, rtol=1e-6)
    # one call over 4000 copies of the batch: 4000 independent draws of each path
    copies = [x.repeat(4000, 1, 1, 1) for x in (q, k, v, keys)]
    torch.manual_seed(5)
    ours = cpu_kernels.attention_with_dropout(*copies, 0.3).view(4000, *q.shape).mean(0)
    plain = F.scaled_dot_product_attention(*copies[:3], attn_mask=copies[3], dropout_p=0.3).view(4000, *q.shape).mean(0)
    clean = probs @ v
    spread = (ours - clean).abs().max()
    assert spread < 0.1 and (plain - clean).abs().max() < 0.1  # both unbiased: 4000 draws, ~5 sigma


def test_the_model_attention_takes_the_plain_or_the_kernel_path_by_the_switch():
    q, k, v, keys, probs = _attention_inputs()
    att = LxmertAttention(32, 4, 0.1).train()

    def flat(x):
        return x.transpose(1, 2).reshape(2, x.shape[2], 32)

    att.cpu_kernels = True
    torch.manual_seed(3)
    out, none = att.attend(flat(q), flat(k), flat(v), keys)
    torch.manual_seed(3)
    torch.testing.assert_close(out, flat(cpu_kernels.attention_with_dropout(q, k, v, keys, 0.1)))
    assert none is None
    att.cpu_kernels = False
    torch.manual_seed(3)
    out, _ = att.attend(flat(q), flat(k), flat(v), keys)
    torch.manual_seed(3)
    torch.testing.assert_close(out, flat(F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=0.1)))
    att.eval()
    out, _ = att.attend(flat(q), flat(k), flat(v), keys)
    torch.testing.assert_close(out, flat(probs @ v), atol=1e-6, rtol=1e-6)


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
