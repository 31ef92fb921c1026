"""BertAdam reproduces the original optimizer's arithmetic; the schedule is LXMERT's warmup_linear."""

from __future__ import annotations

import pytest
import torch

from lxm.train.optim import BertAdam, make_optimizer, warmup_linear


def _reference_steps(p0, grads, lr, warmup, t_total, wd=0.01, b1=0.9, b2=0.999, e=1e-6):
    """The pytorch-pretrained-bert BertAdam update, written out with plain tensor arithmetic."""
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step, g in enumerate(grads):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        update = m / (v.sqrt() + e) + wd * p
        x = step / t_total
        mult = x / warmup if x < warmup else max((x - 1.0) / (warmup - 1.0), 0.0)
        p = p - lr * mult * update
    return p


def test_bertadam_matches_the_original_update_rule():
    torch.manual_seed(0)
    p0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(12)]
    param = torch.nn.Parameter(p0.clone())
    opt = BertAdam([param], lr=1e-2, warmup=0.25, t_total=12)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(param.data, _reference_steps(p0, grads, 1e-2, 0.25, 12), rtol=1e-6, atol=1e-7)


def test_first_update_uses_lr_zero_and_decay_applies_to_biases():
    bias = torch.nn.Parameter(torch.ones(3))
    opt = BertAdam([bias], lr=0.1, warmup=0.1, t_total=10)
    bias.grad = torch.ones(3)
    opt.step()
    assert torch.equal(bias.data, torch.ones(3))  # progress 0 -> multiplier 0
    assert opt.current_lr()[0] == pytest.approx(0.1)  # step 1 of 10 = end of warm-up
    bias.grad = torch.zeros(3)
    before = bias.data.clone()
    opt.step()
    assert (bias.data < before).all()  # weight decay moves even a zero-gradient bias


def test_warmup_linear_shape():
    assert warmup_linear(0.0, 0.05) == 0.0
    assert warmup_linear(0.025, 0.05) == pytest.approx(0.5)
    assert warmup_linear(0.05, 0.05) == pytest.approx(1.0)
    assert warmup_linear(0.525, 0.05) == pytest.approx(0.5)
    assert warmup_linear(1.0, 0.05) == 0.0 and warmup_linear(1.2, 0.05) == 0.0


def test_adamw_option_has_the_same_schedule_and_spares_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt, sched = make_optimizer(model, "adamw", lr=1.0, t_total=20, warmup=0.1)
    no_decay = opt.param_groups[1]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # linear bias + LayerNorm weight/bias
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 17 / 18])
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(model, "sgd", 1.0, 10, 0.1)


def _train(params, grads, opt):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.compile
def test_fused_bertadam_matches_the_original_update_rule_and_compiles_once():
    """`fused=True` (the update under torch.compile): the original's arithmetic to rounding, on parameters of several
    sizes (the small ones and a non-contiguous one take the eager path), the schedule's new lr each step compiling
    nothing."""
    from torch._dynamo.utils import counters

    from lxm.train import optim

    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (300, 250), (70001,)]
    assert max(a * b for a, b in (s + (1,) if len(s) == 1 else s for s in shapes)) >= optim.FUSED_MIN_NUMEL
    p0 = [torch.randn(*s) for s in shapes] + [torch.randn(300, 260).t()]
    grads = [[torch.randn_like(p) for p in p0] for _ in range(12)]
    params = [torch.nn.Parameter(p.clone()) for p in p0[:-1]] + [torch.nn.Parameter(p0[-1].clone().t().t())]
    assert not params[-1].is_contiguous()
    opt = BertAdam(params, lr=1e-2, warmup=0.25, t_total=12, fused=True)
    _train(params, grads[:1], opt)
    assert optim.compiled_update.cache_info().currsize == 1  # the compiled update was built (and is kept)
    graphs = counters["stats"]["unique_graphs"]
    _train(params, grads[1:], opt)
    assert counters["stats"]["unique_graphs"] == graphs  # 11 more steps, 11 new learning rates: no new graph
    for k, (p, start) in enumerate(zip(params, p0)):
        reference = _reference_steps(start, [g[k] for g in grads], 1e-2, 0.25, 12)
        torch.testing.assert_close(p.data, reference, rtol=1e-6, atol=1e-7)
    assert [opt.state[p]["step"] for p in params] == [12] * len(params)


def test_fused_and_eager_bertadam_share_their_state():
    """A checkpoint of the fused optimizer resumes in the eager one (and so the reverse): same keys, same moments."""
    torch.manual_seed(1)
    p0 = [torch.randn(400, 190), torch.randn(9)]
    grads = [[torch.randn_like(p) for p in p0] for _ in range(6)]
    runs = {}
    for first, second in ((True, False), (False, True), (False, False)):
        params = [torch.nn.Parameter(p.clone()) for p in p0]
        opt = BertAdam(params, lr=1e-2, warmup=0.2, t_total=6, fused=first)
        _train(params, grads[:3], opt)
        state = opt.state_dict()
        opt = BertAdam(params, lr=1e-2, warmup=0.2, t_total=6, fused=second)
        opt.load_state_dict(state)
        _train(params, grads[3:], opt)
        runs[first, second] = [p.data for p in params]
    for k in range(len(p0)):
        torch.testing.assert_close(runs[True, False][k], runs[False, False][k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(runs[False, True][k], runs[False, False][k], rtol=1e-6, atol=1e-7)


@pytest.mark.compile
def test_fused_optimizer_option_reaches_both_optimizers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    bert, _ = make_optimizer(model, "bert", lr=1.0, t_total=20, warmup=0.1, fused=True)
    adamw, _ = make_optimizer(model, "adamw", lr=1.0, t_total=20, warmup=0.1, fused=True)
    plain, _ = make_optimizer(model, "adamw", lr=1.0, t_total=20, warmup=0.1)
    assert bert.fused and adamw.defaults["fused"] and not plain.defaults["fused"]


def test_the_gpu_fused_update_is_the_eager_steps_arithmetic_over_all_parameters():
    """`BertAdam(fused=True)` on a GPU runs `bert_adam_foreach` (multi-tensor operations over a group); on the CPU the
    compiled loop. The foreach update is the eager step's operations in its order: equal bit for bit (run here on
    CPU tensors, where the multi-tensor operations are the same per-tensor kernels)."""
    from lxm.train.optim import bert_adam_foreach, fused_update

    assert fused_update("cuda") == "foreach" and fused_update("cpu") == "compiled"
    torch.manual_seed(1)
    shapes = [(300, 40), (40,), (7, 3, 2)]
    eager = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in eager]
    opt = BertAdam(eager, lr=1e-2, warmup=0.25, t_total=10)
    ms, vs = [torch.zeros_like(p) for p in mine], [torch.zeros_like(p) for p in mine]
    for step in range(5):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(eager, grads):
            p.grad = g.clone()
        opt.step()
        lr = BertAdam.scheduled_lr(opt.param_groups[0], step)
        with torch.no_grad():
            bert_adam_foreach([p.data for p in mine], grads, ms, vs, lr, 0.9, 0.999, 1e-6, 0.01)
        for a, b in zip(eager, mine):
            assert torch.equal(a.data, b.data), step
    for p, m, v in zip(eager, ms, vs):
        assert torch.equal(opt.state[p]["next_m"], m) and torch.equal(opt.state[p]["next_v"], v)
