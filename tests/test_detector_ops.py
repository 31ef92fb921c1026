"""The detector's own operations: ROI max pooling (== torchvision's, value for value), the res5 mean pool, and the
`--bf16` network (`prepare_bf16`: frozen BN folded into its convolution, bf16 channels-last weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import roi_pool as tv_roi_pool

from conftest import SHARED
from lxm.extract.detector import (
    Conv2d,
    FrozenBatchNorm2d,
    GeneralizedRCNN,
    RangeMaxPool,
    detector_tiny,
    fold_frozen_bn,
    mean_pool,
    prepare_bf16,
    roi_pool,
)
from lxm.extract.images import caffe_blob, load_bgr

IMAGES = SHARED / "fixtures" / "butd-coco-sample" / "images"

# crafted ROIs (image index, x1, y1, x2, y2) at scale 1/16 on a 38 x 50 map (an image of ~600 x 800)
HARD_ROIS = [
    [0, 0, 0, 799, 599],  # the whole image
    [0, 8, 8, 8, 8],  # one pixel whose corners x * scale = 0.5: roundf -> 1 (torch.round would give 0)
    [1, 7.5, 7.5, 23.5, 24.5],  # halves again, 1 x 1 cell
    [0, 24, 40, 56, 72],  # x * scale = 1.5, 2.5, 3.5, 4.5: halves away from zero, never to even
    [0, -50, -50, -10, -10],  # entirely left of / above the map: clipped to empty bins -> 0
    [1, 900, 700, 1200, 900],  # entirely right of / below the map
    [0, 100.5, 200.49, 100.5, 210],  # zero width
    [1, 0.49999997 * 16, 24, 39.99, 600],  # just below a half
    [0, 20, 30, 10, 5],  # x2 < x1, y2 < y1: torchvision forces 1 x 1
    [1, 0, 0, 1e4, 1e4],  # far past the map: bins of ~45 cells, clipped (range-max tables up to 32 wide)
    [0, 790, 590, 799, 599],  # the last cell
]


def _rois(generator, count=200):
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([780.0, 580.0])
    wh = torch.rand(count, 2, generator=generator) * 450
    owner = torch.randint(0, 2, (count, 1), generator=generator).float()  # images interleaved, not sorted
    return torch.cat([torch.tensor(HARD_ROIS), torch.cat([owner, xy, xy + wh], 1)])


@pytest.mark.parametrize("size", [14, 7, 3])
def test_roi_pool_equals_torchvision_value_for_value(size):
    g = torch.Generator().manual_seed(size)
    feat = torch.randn(2, 32, 38, 50, generator=g) * 3
    feat[0, 3, 5, 7] = float("nan")  # torchvision's max skips NaN
    feat[1, :, 10:13, 10:13] = -float("inf")  # and starts at -FLT_MAX
    feat[0, 5, :20] = -3.4028234663852886e38
    rois = _rois(g)
    ref = tv_roi_pool(feat, rois, size, 1 / 16)
    assert not ref.isnan().any()
    out = roi_pool(feat, rois, size, 1 / 16)
    assert out.shape == ref.shape == (len(rois), 32, size, size) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)
    assert (ref[4] == 0).all() and (ref[5] == 0).all()  # the crafted empty ROIs are there and are zeros
    assert torch.equal(roi_pool(feat.contiguous(memory_format=torch.channels_last), rois, size, 1 / 16), ref)
    # a bf16 map gives torchvision's float32 result rounded to bf16 (the max of bf16 values is one of them)
    relu = feat.nan_to_num(0.0).relu()
    expected = tv_roi_pool(relu.to(torch.bfloat16).float(), rois, size, 1 / 16).to(torch.bfloat16)
    got = roi_pool(relu.to(torch.bfloat16), rois, size, 1 / 16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_the_pooling_is_chosen_by_device_and_both_give_the_same_values():
    """The range-max tables are the CPU's; elsewhere (CUDA) torchvision's kernel pools, slice by slice as the detector
    asks: the same values, in float32 and from a bf16 map (run here on CPU tensors)."""
    from lxm.extract.detector import RangeMaxPool, TorchvisionPool, roi_pooler

    assert roi_pooler("cpu") is RangeMaxPool and roi_pooler("cuda") is TorchvisionPool
    g = torch.Generator().manual_seed(5)
    feat = (torch.randn(2, 16, 38, 50, generator=g) * 3).relu()
    rois = _rois(g)
    for dtype in (torch.float32, torch.bfloat16):
        plain, tables = (cls(feat.to(dtype), rois, 14, 1 / 16) for cls in (TorchvisionPool, RangeMaxPool))
        for start, end in ((0, 7), (7, len(rois))):
            got, want = plain.pool(start, end), tables.pool(start, end)
            assert got.dtype == dtype and torch.equal(got, want), (dtype, start)


def test_roi_pool_of_no_rois_and_of_one_image():
    feat = torch.randn(1, 8, 6, 9)
    assert roi_pool(feat, torch.zeros(0, 5), 14, 1 / 16).shape == (0, 8, 14, 14)
    rois = torch.tensor([[0, 3.0, 4.0, 100.0, 60.0], [0, 0.0, 0.0, 143.0, 95.0]])
    assert torch.equal(roi_pool(feat, rois, 4, 1 / 16), tv_roi_pool(feat, rois, 4, 1 / 16))


def test_range_max_pool_in_slices_equals_torchvision_and_builds_each_images_tables_once():
    # what the detector does: ROIs grouped by image, pooled in chunks that cross image boundaries
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(3, 16, 38, 50, generator=g)
    rois = _rois(g, 150)
    rois[:, 0] = torch.randint(0, 3, (len(rois),), generator=g).float()
    rois = rois[rois[:, 0].argsort(stable=True)]
    pooler = RangeMaxPool(feat, rois, 7, 1 / 16)
    built = []
    build = pooler._build
    pooler._build = lambda img: built.append(img) or build(img)
    out = torch.cat([pooler.pool(start, min(start + 64, len(rois))) for start in range(0, len(rois), 64)])
    assert torch.equal(out, tv_roi_pool(feat, rois, 7, 1 / 16))
    assert built == [0, 1, 2]  # each image's tables built once, on its first slice, reused by the next ones


def test_mean_pool_fp32_is_the_mean_and_bf16_is_within_one_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, 14, 14, generator=g).relu() * 4
    assert torch.equal(mean_pool(x), x.mean(dim=(2, 3)))
    xb = x.to(torch.bfloat16, memory_format=torch.channels_last)
    exact = xb.float().mean(dim=(2, 3))
    got = mean_pool(xb)
    assert got.dtype == torch.float32 and got.shape == (5, 64)
    # the sum is rounded to bf16 once (8 significant bits), then divided in float32
    assert ((got - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all()
    assert (got - exact).abs().max() > 0  # it is the rounded path, not the mean (else this test proves nothing)


def test_fold_frozen_bn_computes_conv_then_bn():
    g = torch.Generator().manual_seed(1)
    conv = Conv2d(6, 10, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        for name, value in (("weight", 1 + 0.3 * torch.randn(10, generator=g)), ("bias", torch.randn(10, generator=g)),
                            ("running_mean", torch.randn(10, generator=g)),
                            ("running_var", 0.1 + torch.rand(10, generator=g))):
            getattr(conv.norm, name).copy_(value)
    x = torch.randn(2, 6, 9, 11, generator=g)
    weight, bias = fold_frozen_bn(conv, conv.norm)
    with torch.no_grad():
        ref = conv(x)
        folded = torch.nn.functional.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already has a bias"):
        fold_frozen_bn(torch.nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4))


def test_prepare_bf16_folds_every_bn_and_keeps_the_detector_close_to_fp32():
    cfg = detector_tiny()
    ref = GeneralizedRCNN(cfg).eval()
    ref.init_random(3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # BN means that matter (init_random's are small): a wrong fold is then 6 % off, not 0.5 %
        for m in ref.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
    bf16 = prepare_bf16(copy.deepcopy(ref))
    convs = [m for m in bf16.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in bf16.modules())
    folded = [m for m in bf16.modules() if isinstance(m, Conv2d)]
    assert folded and all(m.bias is not None and m.bias.dtype == torch.bfloat16 for m in folded)
    assert ref.roi_heads.box_predictor.cls_score.weight.dtype == torch.float32  # linears: autocast's business
    img = load_bgr(min(IMAGES.glob("*.jpg")))
    blob, scale = caffe_blob(img, cfg.pixel_mean_bgr, cfg.min_size, cfg.max_size)
    x = torch.from_numpy(blob)[None]
    with torch.no_grad():
        feat = ref.backbone(x)
        props = ref.proposals(feat, [blob.shape[1:]])  # the same proposals for both: features comparable per box
        pooled = ref.box_head(feat, props)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feat16 = bf16.backbone(x.contiguous(memory_format=torch.channels_last))
            pooled16 = bf16.box_head(feat16, props)[0]
    assert feat16.dtype == torch.bfloat16 and feat16.is_contiguous(memory_format=torch.channels_last)
    assert len(pooled16) == len(props[0]) > 10
    for a, b in ((feat, feat16), (pooled, pooled16)):  # a few bf16 roundings deep: measured 0.3 %
        assert ((a - b.float()).norm() / a.norm()).item() < 0.01
