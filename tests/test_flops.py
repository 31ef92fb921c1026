"""The analytic FLOP count of a pretraining step (lxm.model.flops, the numerator of MFU) against torch's own
FlopCounterMode over a real forward + backward of `pretraining_step_losses`."""

from __future__ import annotations

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_inputs
from lxm.model import LxmertForPreTraining, PretrainLabels, lxmert_tiny, pretraining_step_losses
from lxm.model.flops import pretraining_step_flops


def _counted(model, inputs, labels) -> int:
    # the math backend spells attention as bmm, which the counter sees (the fused CPU kernel it does not count)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        losses, _ = pretraining_step_losses(model, labels, **inputs)
        sum(losses.values()).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("visual_losses", [True, False])
def test_the_analytic_count_is_what_a_step_multiplies(visual_losses):
    cfg = lxmert_tiny(visual_obj_loss=visual_losses, visual_feat_loss=visual_losses)
    model = LxmertForPreTraining(cfg).train()
    inputs, raw = make_inputs(cfg, pad=(0,))  # no padding: every attention position is a real one
    labels = PretrainLabels(**raw)
    masked = int((labels.mlm_labels != -1).sum()), int((labels.feat_mask != 0).sum())
    lengths = inputs["attention_mask"].sum(1).tolist()
    flops = pretraining_step_flops(cfg, lengths, inputs["visual_feats"].shape[1], *masked)
    assert _counted(model, inputs, labels) == flops.training

    # with padding lxm skips the padded rows in every matrix product except attention, which it runs on the padded
    # [B, T] layout: exactly that attention over padded positions is the difference
    inputs, raw = make_inputs(cfg, pad=(0, 2, 4, 6))
    labels = PretrainLabels(**raw)
    masked = int((labels.mlm_labels != -1).sum()), int((labels.feat_mask != 0).sum())
    lengths = inputs["attention_mask"].sum(1).tolist()
    real = pretraining_step_flops(cfg, lengths, inputs["visual_feats"].shape[1], *masked)
    padded = pretraining_step_flops(cfg, [inputs["input_ids"].shape[1]] * len(lengths), inputs["visual_feats"].shape[1],
                                    *masked)
    assert real.training < flops.training
    assert _counted(model, inputs, labels) - real.training == 3 * (padded.attention - real.attention)
