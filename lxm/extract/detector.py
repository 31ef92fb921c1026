"""The Visual Genome Faster R-CNN (bottom-up attention) in plain torch + torchvision.ops: the "torch" engine.

Reproduces the network of peteanderson80/bottom-up-attention `models/vg/ResNet-101/faster_rcnn_end2end_final/
test.prototxt` as converted to detectron2 names by airsplay/py-bottom-up-attention (`faster_rcnn_from_caffe_attr.pkl`);
detector spec §1: Caffe-style ResNet-101 C4 (stride in the 1x1 conv, frozen BN, 3x3/2 max-pool with pad 0 and ceil
mode), RPN with a 512-wide head and 12 anchors (6000 -> NMS 0.7 -> 300 proposals at test), ROIPool 14x14 on res4,
res5 with stride 1 / dilation 2, mean-pooled 2048-d features, 1601-way classifier and the attribute head
(class embedding 256 + feature -> 512 -> 401). Module names equal the detectron2 parameter names, so the converted
weights load with the identity map (`lxm.extract.weights`).

Class and attribute outputs follow detectron2's layout (background / "no attribute" LAST); `DetectorOutput`
converts them to Caffe's layout (first), which `lxm.extract.select` uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms
from torchvision.ops import roi_pool as torchvision_roi_pool


@dataclass
class DetectorConfig:
    """Sizes and test-time settings of the detector."""

    blocks: tuple[int, int, int, int] = (3, 4, 23, 3)  # bottleneck blocks in res2..res5 (ResNet-101)
    stem_channels: int = 64  # conv1 width
    res2_channels: int = 256  # res2 output; doubles per stage (res4 = 1024 feeds RPN and ROI pooling, res5 = 2048)
    bottleneck_channels: int = 64  # res2 bottleneck width; doubles per stage
    rpn_hidden: int = 512  # RPN 3x3 conv width (Caffe rpn_conv/3x3)
    anchor_sizes: tuple[int, ...] = (64, 128, 256, 512)  # = Caffe scales (4, 8, 16, 32) x base 16
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    stride: int = 16  # res4 stride
    num_classes: int = 1600  # object classes (+1 background)
    num_attrs: int = 400  # attributes (+1 "no attribute")
    attr_embed: int = 256  # class-embedding width of the attribute head
    attr_hidden: int = 512  # fc_attr width
    pooler_resolution: int = 14  # ROIPool output (res5 keeps it at 14x14: stride 1, dilation 2)
    pixel_mean_bgr: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)  # Caffe's, subtracted before resize
    min_size: int = 600  # shorter side after resizing (one scale, no test-time augmentation)
    max_size: int = 1000  # cap on the longer side
    pre_nms_topk: int = 6000  # RPN proposals kept before NMS
    rpn_nms: float = 0.7
    post_nms_topk: int = 300  # proposals per image after RPN NMS
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # detectron2 default (ROI head)
    roi_chunk: int = 256  # ROIs per res5 pass: bounds memory (300 ROIs x 14 x 14 x 2048 fp32 = 0.5 GB)

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)


def vg_r101(**overrides) -> DetectorConfig:
    """The BUTD 36-box detector as LXMERT ran it."""
    return DetectorConfig(**overrides)


def detector_tiny(**overrides) -> DetectorConfig:
    """Every module of the real detector at toy widths (tests, smoke runs): one block per stage, 1/16 widths."""
    values = dict(blocks=(1, 1, 1, 1), stem_channels=8, res2_channels=16, bottleneck_channels=4, rpn_hidden=16,
                  num_classes=20, num_attrs=8, attr_embed=8, attr_hidden=16, min_size=96, max_size=160,
                  pre_nms_topk=300, post_nms_topk=40)
    values.update(overrides)
    return DetectorConfig(**values)


class FrozenBatchNorm2d(nn.Module):
    """Caffe BatchNorm(use_global_stats) + Scale as a fixed affine, computed as detectron2's FrozenBatchNorm2d
    (detectron2/layers/batch_norm.py) computes it, operation for operation."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels) - eps)

    def forward(self, x: Tensor) -> Tensor:
        # Same branches as detectron2: the fused F.batch_norm at inference, the folded scale/shift under autograd.
        # The two round differently in the last bit, and a last-bit difference in res4 can move a ROI across
        # ROIPool's rounding edge, so anything else would make the torch and detectron2 engines pick other boxes.
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)


class Conv2d(nn.Conv2d):
    """Bias-free conv followed by its frozen BN, named `<conv>.weight` / `<conv>.norm.*` as in detectron2."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class BottleneckBlock(nn.Module):
    """1x1 (carries the stride: Caffe/MSRA style) -> 3x3 (dilation) -> 1x1, identity or projection shortcut."""

    def __init__(self, cin: int, cout: int, bottleneck: int, stride: int, dilation: int = 1):
        super().__init__()
        self.shortcut = Conv2d(cin, cout, 1, stride=stride) if cin != cout or stride != 1 else None
        self.conv1 = Conv2d(cin, bottleneck, 1, stride=stride)
        self.conv2 = Conv2d(bottleneck, bottleneck, 3, padding=dilation, dilation=dilation)
        self.conv3 = Conv2d(bottleneck, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)  # in place, as detectron2 (same values)
        return F.relu_(out)


def _stage(n: int, cin: int, cout: int, bottleneck: int, stride: int, dilation: int = 1) -> nn.Sequential:
    blocks = [BottleneckBlock(cin if i == 0 else cout, cout, bottleneck, stride if i == 0 else 1, dilation)
              for i in range(n)]
    return nn.Sequential(*blocks)


class BasicStem(nn.Module):
    """conv1 7x7/2 + BN + ReLU, then Caffe's max-pool: 3x3/2, no padding, output size rounded UP (ceil_mode)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = Conv2d(3, channels, 7, stride=2, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Backbone(nn.Module):
    """stem + res2..res4 (C4): returns the stride-16 res4 map."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        c, b = cfg.res2_channels, cfg.bottleneck_channels
        self.stem = BasicStem(cfg.stem_channels)
        self.res2 = _stage(cfg.blocks[0], cfg.stem_channels, c, b, stride=1)
        self.res3 = _stage(cfg.blocks[1], c, c * 2, b * 2, stride=2)
        self.res4 = _stage(cfg.blocks[2], c * 2, c * 4, b * 4, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then per-anchor objectness logit and box deltas (detectron2 StandardRPNHead names)."""

    def __init__(self, cin: int, hidden: int, anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, anchors * 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.conv(x))
        return self.objectness_logits(h), self.anchor_deltas(h)


class ProposalGenerator(nn.Module):
    def __init__(self, cfg: DetectorConfig, cin: int):
        super().__init__()
        self.rpn_head = RPNHead(cin, cfg.rpn_hidden, cfg.num_anchors)
        cell = []
        for size in cfg.anchor_sizes:  # size-major, as detectron2's DefaultAnchorGenerator
            for ratio in cfg.anchor_ratios:
                w = math.sqrt(size * size / ratio)
                h = ratio * w
                cell.append([-w / 2, -h / 2, w / 2, h / 2])
        self.register_buffer("cell_anchors", torch.tensor(cell), persistent=False)


def decode_boxes(deltas: Tensor, boxes: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """detectron2 Box2BoxTransform.apply_deltas (continuous coordinates, dw/dh clamped at log(1000/16))."""
    boxes = boxes.to(deltas.dtype)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    clamp = math.log(1000.0 / 16)
    dw, dh = (deltas[:, 2::4] / ww).clamp(max=clamp), (deltas[:, 3::4] / wh).clamp(max=clamp)
    px, py = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    pw, ph = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    out = torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], dim=2)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


class BoxPredictor(nn.Module):
    """Classifier, class-specific box regression and the attribute head (detectron2 fork names)."""

    def __init__(self, cfg: DetectorConfig, cin: int):
        super().__init__()
        k = cfg.num_classes
        self.cls_score = nn.Linear(cin, k + 1)
        self.bbox_pred = nn.Linear(cin, k * 4)
        self.cls_embedding = nn.Embedding(k + 1, cfg.attr_embed)
        self.fc_attr = nn.Linear(cin + cfg.attr_embed, cfg.attr_hidden)
        self.attr_score = nn.Linear(cfg.attr_hidden, cfg.num_attrs + 1)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cls_logits = self.cls_score(pooled)
        # The attribute head conditions on the predicted class, background included (Caffe: ArgMax over 1601).
        emb = self.cls_embedding(cls_logits.argmax(dim=1))
        attr_logits = self.attr_score(F.relu(self.fc_attr(torch.cat([pooled, emb], dim=1))))
        return cls_logits, self.bbox_pred(pooled), attr_logits


class ROIHeads(nn.Module):
    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        c4, c5 = cfg.res2_channels * 4, cfg.res2_channels * 8
        # stride 1 and dilation 2 everywhere: the 14x14 pooled grid stays 14x14 (Caffe res5a: dilation 2, pad 2)
        self.res5 = _stage(cfg.blocks[3], c4, c5, cfg.bottleneck_channels * 8, stride=1, dilation=2)
        self.box_predictor = BoxPredictor(cfg, c5)


@dataclass
class DetectorOutput:
    """Per-image detector outputs at the proposals. R proposals (<= post_nms_topk). Caffe layouts."""

    proposals: Tensor  # [R, 4] unregressed RPN boxes in ORIGINAL-image pixels
    features: Tensor  # [R, 2048] mean-pooled res5 features
    cls_prob: Tensor  # [R, 1 + num_classes] softmax, background FIRST
    attr_prob: Tensor  # [R, 1 + num_attrs] softmax, "no attribute" FIRST
    pred_boxes: Tensor  # [R, num_classes, 4] class-specific regressed boxes, original pixels, clipped
    scale: float  # resize factor applied to the image
    image_size: tuple[int, int] = field(default=(0, 0))  # (height, width) of the original image


def in_layout_of(x: Tensor, module: nn.Module) -> Tensor:
    """`x` (pooled ROIs: channels-last from `roi_pool`, float32 NCHW from detectron2's pooler) in the memory layout
    and dtype of `module`'s convolutions: NCHW float32 for the reference network (so both engines run the same
    convolution algorithm), channels-last bf16 under `--bf16` (`prepare_bf16`), where it would otherwise be reordered
    and cast in each of the two convolutions that read it (the cast is the one autocast makes: same values)."""
    # a 1x1 kernel is both contiguous and channels-last: ask the first larger one
    weight = next(m.weight for m in module.modules() if isinstance(m, nn.Conv2d) and m.weight[0, 0].numel() > 1)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return x.to(dtype=weight.dtype, memory_format=torch.channels_last)
    return x.to(dtype=weight.dtype, memory_format=torch.contiguous_format)


def _c_round(v: Tensor) -> Tensor:
    """C's roundf (halves away from zero; torch.round rounds them to even), float32 in, int64 out."""
    t = v.trunc()
    return (t + ((v - t).abs() >= 0.5).to(v.dtype) * v.sign()).long()


def _window_max(t: Tensor, dim: int, half: int) -> Tensor:
    """t's windows of 2 * half along `dim` from windows of `half`: out[i] = max(t[i], t[i + half]) (the last `half`
    entries, whose windows would pass the edge, are copied and never read)."""
    n = t.shape[dim] - half
    out = t.clone()
    torch.maximum(t.narrow(dim, 0, n), t.narrow(dim, half, n), out=out.narrow(dim, 0, n))
    return out


def roi_pool(feat: Tensor, rois: Tensor, size: int, spatial_scale: float) -> Tensor:
    """`torchvision.ops.roi_pool(feat, rois, size, spatial_scale)`, value for value, computed with range-max tables.

    feat [N, C, H, W] (float32 or bfloat16, any memory layout), rois [R, 5] (image index, x1, y1, x2, y2 in image
    pixels) -> [R, C, size, size] in feat's dtype, in channels-last memory.

    Bins are computed as torchvision's CPU kernel computes them (float32: corners `roundf(x * scale)`, width
    `max(x2 - x1 + 1, 1)`, bin edges `floor(p * w / size)` / `ceil((p + 1) * w / size)` shifted and clipped to the
    map; an empty bin is 0, a bin's max starts at -FLT_MAX and ignores NaN). The max over a bin [h0, h1) x [w0, w1) is
    the max of four overlapping 2^a x 2^b windows (a sparse table: max is idempotent), so it is the same value, not
    an approximation, and a bfloat16 map gives exactly the float32 result rounded (a max of bf16 values is one).
    Why: torchvision's CPU kernel is one scalar loop that also writes argmax indices for a backward pass inference
    never runs (0.6 s of a 5.7 s bf16 image on 2 cores, plus a float32 copy of the map); this runs on all cores in
    ~0.15 s.
    """
    return RangeMaxPool(feat, rois, size, spatial_scale).pool(0, rois.shape[0])


class RangeMaxPool:
    """`roi_pool` of a fixed set of ROIs, pooled a slice at a time (the detector's `roi_chunk`s): the bins of every
    ROI are computed once, and each image's range-max tables are built once, deep enough for all of its ROIs, and
    kept until a slice needs another image (ROIs come grouped by image, so each image's tables are built once and
    only one image's are held)."""

    def __init__(self, feat: Tensor, rois: Tensor, size: int, spatial_scale: float):
        self.feat, self.size = feat, size
        self.owners = rois[:, 0].long()
        boxes = rois[:, 1:].float()
        x1, y1, x2, y2 = (_c_round(boxes[:, i] * spatial_scale) for i in range(4))
        p = torch.arange(size, dtype=torch.float32, device=feat.device)
        _, _, h, w = feat.shape

        def edges(start: Tensor, end: Tensor, limit: int) -> tuple[Tensor, Tensor]:
            bin_size = (end - start + 1).clamp(min=1).float() / float(size)  # [R]
            lo = torch.floor(p[None] * bin_size[:, None]).long() + start[:, None]
            hi = torch.ceil((p[None] + 1) * bin_size[:, None]).long() + start[:, None]
            return lo.clamp(0, limit), hi.clamp(0, limit)  # [R, size]

        self.hs, self.he = edges(y1, y2, h)
        self.ws, self.we = edges(x1, x2, w)
        lh, lw = (self.he - self.hs).clamp(min=1), (self.we - self.ws).clamp(min=1)
        self.kh, self.kw = torch.log2(lh.double()).floor().long(), torch.log2(lw.double()).floor().long()  # exact
        self._cached: tuple[int, int, Tensor] | None = None  # (image, kw_max, flat tables) of the last image

    def _tables(self, img: int) -> tuple[int, Tensor]:
        """(kw_max, flat) for image `img`: flat[((a * (kw_max + 1) + b) * H + y) * W + x] = the max of the map over
        [y, y + 2^a) x [x, x + 2^b) (past the edge: unused), for every a, b its ROIs' bins need."""
        if self._cached is None or self._cached[0] != img:
            self._cached = (img, *self._build(img))
        return self._cached[1], self._cached[2]

    def _build(self, img: int) -> tuple[int, Tensor]:
        mine = self.owners == img
        kh_max, kw_max = int(self.kh[mine].max()), int(self.kw[mine].max())
        floor = torch.tensor(-3.4028234663852886e38, dtype=torch.float32).to(self.feat.dtype)  # -FLT_MAX
        base = torch.fmax(self.feat[img].permute(1, 2, 0).contiguous(), floor)  # [H, W, C]; NaN ignored
        rows = [base]
        for k in range(1, kw_max + 1):
            rows.append(_window_max(rows[-1], 1, 1 << (k - 1)))
        tables = list(rows)
        for k in range(1, kh_max + 1):
            rows = [_window_max(t, 0, 1 << (k - 1)) for t in rows]
            tables += rows
        return kw_max, torch.stack(tables).reshape(-1, base.shape[-1])  # [(a, b, y, x), C]

    def pool(self, start: int, end: int) -> Tensor:
        """ROIs [start, end) -> [end - start, C, size, size] in the map's dtype, channels-last memory."""
        _, c, h, w = self.feat.shape
        size, r = self.size, end - start
        out = self.feat.new_empty(r, size, size, c)
        owners = self.owners[start:end]
        for img in owners.unique().tolist():
            sel = (owners == img).nonzero().squeeze(1)
            kw_max, flat = self._tables(img)
            i_hs, i_he, i_ws, i_we, i_kh, i_kw = (t[start:end][sel] for t in (self.hs, self.he, self.ws, self.we,
                                                                               self.kh, self.kw))
            t0 = (i_kh[:, :, None] * (kw_max + 1) + i_kw[:, None, :]) * h  # [S, size, size]: each bin's table
            ys = (i_hs[:, :, None], (i_he - (1 << i_kh))[:, :, None])  # the two windows' first rows, per bin row
            xs = (i_ws[:, None, :], (i_we - (1 << i_kw))[:, None, :])  # and first columns, per bin column
            corners = [((t0 + y) * w + x).clamp(0, flat.shape[0] - 1).reshape(-1) for y in ys for x in xs]
            whole = sel.numel() == r  # one image: gather straight into the output
            m = out.view(-1, c) if whole else self.feat.new_empty(sel.numel() * size * size, c)
            torch.index_select(flat, 0, corners[0], out=m)
            other = torch.empty_like(m)  # two buffers for the four corners: large fresh tensors cost page faults
            for idx in corners[1:]:
                torch.maximum(m, torch.index_select(flat, 0, idx, out=other), out=m)
            empty = ((i_he <= i_hs)[:, :, None] | (i_we <= i_ws)[:, None, :]).reshape(-1, 1)
            if bool(empty.any()):
                m.masked_fill_(empty, 0)
            if not whole:
                out[sel] = m.view(-1, size, size, c)
        return out.permute(0, 3, 1, 2)


class TorchvisionPool:
    """`RangeMaxPool`'s interface over torchvision's own `roi_pool` kernel: on a GPU one launch per slice and no host
    synchronisation (the range-max tables are the CPU's speed-up: torchvision's CPU kernel is one scalar loop). The
    same values: the range-max pool equals torchvision's value for value (tests/test_detector_ops.py)."""

    def __init__(self, feat: Tensor, rois: Tensor, size: int, spatial_scale: float):
        # float32 map and corners (the kernel wants one dtype; bfloat16 corners would be off by pixels): a bf16 map's
        # maxima come back exact, rounded from the float32 result (the max of bf16 values is one of them)
        self.dtype, self.map, self.rois = feat.dtype, feat.float(), rois.float()
        self.size, self.spatial_scale = size, spatial_scale

    def pool(self, start: int, end: int) -> Tensor:
        """ROIs [start, end) -> [end - start, C, size, size] in the map's dtype."""
        out = torchvision_roi_pool(self.map, self.rois[start:end], self.size, self.spatial_scale)
        return out.to(self.dtype)


def roi_pooler(device_type: str) -> type[RangeMaxPool] | type[TorchvisionPool]:
    """The ROI pooling of a map on `device_type`: the range-max tables on the CPU, torchvision's kernel elsewhere."""
    return RangeMaxPool if device_type == "cpu" else TorchvisionPool


def mean_pool(x: Tensor) -> Tensor:
    """[R, C, h, w] res5 output -> [R, C] mean over the grid (Caffe `pool5`, detectron2's `.mean(dim=[2, 3])`).

    float32: exactly that. bfloat16 (`--bf16`): the sum as a matrix product with ones (accumulated in float32, rounded
    to bf16 once), then divided in float32 -- so the value is within one bf16 rounding of the bf16 mean; torch's bf16
    CPU reduction over a channels-last map is ~10x slower than the product (145 vs 13 ms for 256 ROIs).
    """
    if x.dtype != torch.bfloat16:
        return x.mean(dim=(2, 3))
    r, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(r, h * w, c)  # a view when x is channels-last
    return torch.bmm(x.new_ones(r, 1, h * w), rows).squeeze(1).float().div_(h * w)


def fold_frozen_bn(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the convolution that computes norm(conv(x)) in one step, for a bias-free `conv` and a
    frozen BatchNorm `norm` (ours or detectron2's: weight, bias, running_mean, running_var, eps), in float32:
    w * s and beta - mu * s per output channel, s = gamma / sqrt(var + eps)."""
    if conv.bias is not None:
        raise ValueError(f"fold_frozen_bn: {type(conv).__name__} already has a bias")
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return conv.weight * scale.reshape(-1, 1, 1, 1), norm.bias - norm.running_mean * scale


@torch.no_grad()
def prepare_bf16(model: nn.Module) -> nn.Module:
    """The network `--bf16` runs (in place; either engine's module tree): every frozen BatchNorm folded into its
    convolution's weight and bias (float32 arithmetic, then one rounding), every convolution's weight and bias
    stored in bfloat16 and channels-last, the layout oneDNN's bf16 convolutions run fastest on.

    Why: under autocast each convolution otherwise casts its weight on every call, and each frozen BN is a separate
    pass over a bf16 activation (8 % of a bf16 image on CPU). Rounding the folded weight once is no less exact than
    rounding the convolution's output before the BN. The float32 path keeps the separate BN, bit for bit as
    detectron2. Linear layers and embeddings are untouched (autocast casts them, as before).
    """
    for module in model.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        weight, bias, norm = module.weight, module.bias, getattr(module, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            weight, bias = fold_frozen_bn(module, norm)
            module.norm = nn.Identity()  # ours calls it; detectron2's Conv2d calls a non-None norm
        module.weight = nn.Parameter(weight.to(torch.bfloat16, memory_format=torch.channels_last), requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)
    return model


class GeneralizedRCNN(nn.Module):
    """backbone -> proposal_generator -> roi_heads, with detectron2's top-level names."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.proposal_generator = ProposalGenerator(cfg, cfg.res2_channels * 4)
        self.roi_heads = ROIHeads(cfg)

    def init_random(self, seed: int = 0) -> None:
        """Seeded random weights (tests and demos): N(0, 0.01) convs/linears, mild random frozen-BN statistics."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, t in self.state_dict().items():
                if name.endswith("conv3.norm.weight"):
                    # small residual branches keep 33 random blocks from blowing the activations up
                    t.copy_(0.1 + 0.01 * torch.randn(t.shape, generator=g))
                elif name.endswith("norm.weight"):
                    t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
                elif name.endswith("norm.running_var"):
                    t.copy_(1.0 + 0.1 * torch.rand(t.shape, generator=g))
                elif name.endswith(("norm.bias", "norm.running_mean")):
                    t.copy_(0.1 * torch.randn(t.shape, generator=g))
                elif name.endswith("bias"):
                    t.zero_()
                elif name.startswith(("proposal_generator.rpn_head.anchor_deltas",
                                      "roi_heads.box_predictor.bbox_pred")):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.001)  # near-identity boxes, as detectron2's init
                elif name.startswith(("proposal_generator.rpn_head.objectness", "roi_heads.box_predictor.cls_score")):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.01)
                else:
                    fan_in = max(t[0].numel(), 1)
                    t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / fan_in))

    def proposals(self, feat: Tensor, image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """RPN for a batch of res4 maps [B, C, h, w] of images with the given (resized) sizes -> boxes per image."""
        cfg = self.cfg
        logits, deltas = self.proposal_generator.rpn_head(feat)
        b, a, h, w = logits.shape
        ys = torch.arange(h, device=feat.device, dtype=torch.float32) * cfg.stride
        xs = torch.arange(w, device=feat.device, dtype=torch.float32) * cfg.stride
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
        anchors = (shifts + self.proposal_generator.cell_anchors.to(feat.device)[None]).reshape(-1, 4)
        logits = logits.permute(0, 2, 3, 1).reshape(b, -1)  # location-major, anchor-minor, as the anchors
        deltas = deltas.reshape(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
        out = []
        for i, (ih, iw) in enumerate(image_sizes):
            k = min(cfg.pre_nms_topk, logits.shape[1])
            scores, idx = logits[i].float().topk(k)
            boxes = decode_boxes(deltas[i, idx].float(), anchors[idx], (1.0, 1.0, 1.0, 1.0))
            boxes = clip_boxes(boxes, ih, iw)
            ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores = boxes[ok], scores[ok]
            keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.long), cfg.rpn_nms)
            out.append(boxes[keep[: cfg.post_nms_topk]])
        return out

    def box_head(self, feat: Tensor, boxes: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """ROIPool + res5 + predictors for all images' proposals at once, in chunks of `roi_chunk` ROIs."""
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        if rois.shape[0] == 0:
            p5 = self.roi_heads.res5[-1].conv3.out_channels
            pred = self.roi_heads.box_predictor
            return (feat.new_zeros(0, p5), feat.new_zeros(0, pred.cls_score.out_features),
                    feat.new_zeros(0, pred.bbox_pred.out_features), feat.new_zeros(0, pred.attr_score.out_features))
        # ROI corners in float32 under --bf16 too (bfloat16 corners would be off by up to 4 px at 1000 px); the pooled
        # maxima are exact in the map's own dtype (`roi_pool`: torchvision's values, the detectron2 engine's pooler).
        pooler = roi_pooler(feat.device.type)(feat, rois.float(), self.cfg.pooler_resolution, 1.0 / self.cfg.stride)
        pooled, cls, deltas, attrs = [], [], [], []
        for start in range(0, rois.shape[0], self.cfg.roi_chunk):
            x = pooler.pool(start, min(start + self.cfg.roi_chunk, rois.shape[0]))
            p = mean_pool(self.roi_heads.res5(in_layout_of(x, self.roi_heads.res5)))
            c, d, a = self.roi_heads.box_predictor(p)
            pooled.append(p), cls.append(c), deltas.append(d), attrs.append(a)
        return torch.cat(pooled), torch.cat(cls), torch.cat(deltas), torch.cat(attrs)

    @torch.no_grad()
    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]], scales: list[float],
                original_sizes: list[tuple[int, int]]) -> list[DetectorOutput]:
        """images [B, 3, H, W] (mean-subtracted BGR, same padded size) -> one DetectorOutput per image."""
        feat = self.backbone(images)
        props = self.proposals(feat, image_sizes)
        return detector_outputs(props, *self.box_head(feat, props), scales, original_sizes, self.cfg.bbox_reg_weights)


def detector_outputs(proposals: list[Tensor], pooled: Tensor, cls_logits: Tensor, deltas: Tensor, attr_logits: Tensor,
                     scales: list[float], original_sizes: list[tuple[int, int]],
                     bbox_reg_weights: tuple[float, float, float, float]) -> list[DetectorOutput]:
    """Per-image `DetectorOutput`s from the ROI head's results over all images' proposals; both engines end here.

    Args:
        proposals: per image, [R_i, 4] RPN boxes in resized-image pixels.
        pooled / cls_logits / deltas / attr_logits: [sum R_i, ...] in the order of `proposals`, detectron2 layouts.
        scales / original_sizes: per image, the resize factor and the (height, width) before resizing.
    """
    outs, start = [], 0
    for i, p in enumerate(proposals):
        n = p.shape[0]
        sl = slice(start, start + n)
        start += n
        cls_prob = F.softmax(cls_logits[sl].float(), dim=1)
        attr_prob = F.softmax(attr_logits[sl].float(), dim=1)
        pred = decode_boxes(deltas[sl].float(), p, bbox_reg_weights).reshape(n, -1, 4)
        s = scales[i]
        oh, ow = original_sizes[i]
        outs.append(DetectorOutput(
            # resized size is round(size * s), so p / s can pass the original border by a rounding hair
            proposals=clip_boxes(p / s, oh, ow),
            features=pooled[sl].float(),
            cls_prob=torch.cat([cls_prob[:, -1:], cls_prob[:, :-1]], dim=1),  # background last -> first
            attr_prob=torch.cat([attr_prob[:, -1:], attr_prob[:, :-1]], dim=1),
            pred_boxes=clip_boxes(pred / s, oh, ow),
            scale=s, image_size=(oh, ow),
        ))
    return outs
