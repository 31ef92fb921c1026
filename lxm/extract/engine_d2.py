"""The "detectron2" engine: the same VG Faster R-CNN expressed in detectron2's current API.

Detector spec §1.7 / §6: airsplay/py-bottom-up-attention forked detectron2 (2019) and added config switches; with
today's detectron2 the same network is built from extension points instead:

- a backbone builder registered in BACKBONE_REGISTRY whose stem uses Caffe's max-pool (pad 0, ceil mode);
- `BUTDRes5ROIHeads`, a `Res5ROIHeads` subclass registered in ROI_HEADS_REGISTRY, with the res5 stage at stride 1 /
  dilation 2 and a box predictor that carries the attribute head;
- custom config keys under `MODEL.BUTD` (attribute sizes, block counts), added before the config is filled;
- stock keys for the rest (`MODEL.RPN.CONV_DIMS: [512]`, ROIPool 14, anchors 64-512, Caffe pixel mean, FrozenBN).

This module is the only place that imports detectron2; it is loaded when `--engine detectron2` is asked for or
`--engine auto` (the default) finds detectron2 importable (`lxm.extract.pipeline.choose_engine`). Weights come from
the same checked loader as the torch engine (identical parameter names), and preprocessing, the per-image outputs
(`lxm.extract.detector.detector_outputs`) and box selection are shared. The torch engine computes every layer with
the same operations as detectron2 (its FrozenBN included), so on the CPU both engines give bit-identical backbone
maps, proposals, features, probabilities and boxes, on the tiny and on the full-size ResNet-101 detector
(tests/test_engines.py, on the detectron2 source snapshot where detectron2 is not installed).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

try:
    with warnings.catch_warnings():
        # detectron2 decorates helpers with torch.jit.script, which torch now deprecates: noise for lxm's users
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        import detectron2  # noqa: F401  (its __version__ and source commit go into the store's manifest)
        from detectron2.config import CfgNode, get_cfg
        from detectron2.layers import ShapeSpec
        from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, build_model
        from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet
        from detectron2.modeling.roi_heads import Res5ROIHeads
        from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
        from detectron2.structures import Boxes, ImageList
except ImportError as exc:  # tests/test_engines.py hides detectron2 to exercise this
    from lxm.errors import MissingDependencyError

    # `from None` keeps the CLI's message to one line; choose_engine reads the ImportError from __context__
    raise MissingDependencyError(
        "the detectron2 engine needs detectron2 and its dependencies (pip install 'lxm[detectron2]'); detectron2 is "
        "not on PyPI: pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' (see "
        f"README), or use the torch engine (--engine torch or auto). ({exc})"
    ) from None

from lxm.extract.detector import DetectorConfig, DetectorOutput, detector_outputs, in_layout_of, mean_pool


def add_butd_config(cfg: CfgNode) -> None:
    """Custom keys of the BUTD detector (must exist before values are set or merged)."""
    cfg.MODEL.BUTD = CfgNode()
    cfg.MODEL.BUTD.BLOCKS = [3, 4, 23, 3]  # bottleneck blocks of res2..res5
    cfg.MODEL.BUTD.NUM_ATTRS = 400
    cfg.MODEL.BUTD.ATTR_EMBED = 256
    cfg.MODEL.BUTD.ATTR_HIDDEN = 512


def butd_cfg(det: DetectorConfig, device: str = "cpu") -> CfgNode:
    cfg = get_cfg()
    add_butd_config(cfg)
    m = cfg.MODEL
    m.DEVICE = device
    m.META_ARCHITECTURE = "GeneralizedRCNN"
    m.WEIGHTS = ""
    m.PIXEL_MEAN = list(det.pixel_mean_bgr)
    m.PIXEL_STD = [1.0, 1.0, 1.0]
    m.BUTD.BLOCKS = list(det.blocks)
    m.BUTD.NUM_ATTRS, m.BUTD.ATTR_EMBED, m.BUTD.ATTR_HIDDEN = det.num_attrs, det.attr_embed, det.attr_hidden
    m.BACKBONE.NAME = "build_butd_resnet_backbone"
    m.RESNETS.NORM = "FrozenBN"
    m.RESNETS.STRIDE_IN_1X1 = True
    m.RESNETS.STEM_OUT_CHANNELS = det.stem_channels
    m.RESNETS.RES2_OUT_CHANNELS = det.res2_channels
    m.RESNETS.WIDTH_PER_GROUP = det.bottleneck_channels
    m.RESNETS.NUM_GROUPS = 1
    m.RESNETS.OUT_FEATURES = ["res4"]
    m.PROPOSAL_GENERATOR.NAME = "RPN"
    m.PROPOSAL_GENERATOR.MIN_SIZE = 0
    m.RPN.IN_FEATURES = ["res4"]
    m.RPN.CONV_DIMS = [det.rpn_hidden]
    m.RPN.PRE_NMS_TOPK_TEST = det.pre_nms_topk
    m.RPN.POST_NMS_TOPK_TEST = det.post_nms_topk
    m.RPN.NMS_THRESH = det.rpn_nms
    m.RPN.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    m.ANCHOR_GENERATOR.SIZES = [list(det.anchor_sizes)]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(det.anchor_ratios)]
    m.ANCHOR_GENERATOR.OFFSET = 0.0
    m.ROI_HEADS.NAME = "BUTDRes5ROIHeads"
    m.ROI_HEADS.IN_FEATURES = ["res4"]
    m.ROI_HEADS.NUM_CLASSES = det.num_classes
    m.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = det.pooler_resolution
    m.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = tuple(det.bbox_reg_weights)
    cfg.INPUT.FORMAT = "BGR"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = det.min_size, det.max_size
    return cfg


class CaffeMaxPoolStem(BasicStem):
    """detectron2's stem with Caffe's pool1: 3x3/2, no padding, ceil mode (the fork's MODEL.CAFFE_MAXPOOL)."""

    def forward(self, x):
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


@BACKBONE_REGISTRY.register()
def build_butd_resnet_backbone(cfg, input_shape):
    r = cfg.MODEL.RESNETS
    stem = CaffeMaxPoolStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages, cin, cout, bottleneck = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.WIDTH_PER_GROUP
    for i, n in enumerate(cfg.MODEL.BUTD.BLOCKS[:3]):  # res2..res4; res5 lives in the ROI head (C4)
        stages.append(ResNet.make_stage(BottleneckBlock, n, stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                                        in_channels=cin, bottleneck_channels=bottleneck, out_channels=cout,
                                        num_groups=1, norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1))
        cin, cout, bottleneck = cout, cout * 2, bottleneck * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=0)


class AttributeOutputLayers(FastRCNNOutputLayers):
    """FastRCNNOutputLayers (cls_score 1601, bbox_pred 6400) plus the BUTD attribute head."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        super().__init__(cfg, input_shape)
        b = cfg.MODEL.BUTD
        dim = input_shape.channels
        self.cls_embedding = nn.Embedding(cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1, b.ATTR_EMBED)
        self.fc_attr = nn.Linear(dim + b.ATTR_EMBED, b.ATTR_HIDDEN)
        self.attr_score = nn.Linear(b.ATTR_HIDDEN, b.NUM_ATTRS + 1)

    def attributes(self, pooled: torch.Tensor, cls_logits: torch.Tensor) -> torch.Tensor:
        emb = self.cls_embedding(cls_logits.argmax(dim=1))
        return self.attr_score(F.relu(self.fc_attr(torch.cat([pooled, emb], dim=1))))


@ROI_HEADS_REGISTRY.register()
class BUTDRes5ROIHeads(Res5ROIHeads):
    """Res5ROIHeads with the dilated, stride-1 res5 of the BUTD model and the attribute predictor."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["box_predictor"] = AttributeOutputLayers(cfg, ShapeSpec(channels=ret["box_predictor"].cls_score.in_features,
                                                                    height=1, width=1))
        return ret

    @classmethod
    def _build_res5_block(cls, cfg):
        r = cfg.MODEL.RESNETS
        out_channels = r.RES2_OUT_CHANNELS * 8
        blocks = ResNet.make_stage(BottleneckBlock, cfg.MODEL.BUTD.BLOCKS[3],
                                   stride_per_block=[1] * cfg.MODEL.BUTD.BLOCKS[3], in_channels=out_channels // 2,
                                   bottleneck_channels=r.WIDTH_PER_GROUP * 8, out_channels=out_channels,
                                   num_groups=1, norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1, dilation=2)
        return nn.Sequential(*blocks), out_channels

    def extract(self, features, proposals, chunk: int):
        """Pooled res5 features and raw predictions for every proposal of every image (no NMS, no filtering)."""
        flat = Boxes.cat([p.proposal_boxes for p in proposals])
        feat = features[self.in_features[0]].float()  # ROIPool in float32, as the torch engine (`box_head`)
        pred = self.box_predictor
        if len(flat) == 0:  # no proposal in any image: empty results (torch.cat of nothing would raise)
            return (feat.new_zeros(0, pred.cls_score.in_features), feat.new_zeros(0, pred.cls_score.out_features),
                    feat.new_zeros(0, pred.bbox_pred.out_features), feat.new_zeros(0, pred.attr_score.out_features))
        counts = torch.tensor([len(p) for p in proposals], device=flat.tensor.device)
        owners = torch.repeat_interleave(torch.arange(len(proposals), device=flat.tensor.device), counts)
        pooled, cls, deltas, attrs = [], [], [], []
        for start in range(0, len(flat), chunk):
            sel = slice(start, start + chunk)
            rois = torch.cat([owners[sel, None].to(flat.tensor.dtype), flat.tensor[sel]], dim=1)
            x = self.pooler.level_poolers[0](feat, rois)
            p = mean_pool(self.res5(in_layout_of(x, self.res5)))
            c, d = pred(p)
            pooled.append(p), cls.append(c), deltas.append(d), attrs.append(pred.attributes(p, c))
        return torch.cat(pooled), torch.cat(cls), torch.cat(deltas), torch.cat(attrs)


class Detectron2Detector(nn.Module):
    """Same call signature and outputs as `lxm.extract.detector.GeneralizedRCNN`."""

    def __init__(self, det: DetectorConfig, device: str = "cpu"):
        super().__init__()
        self.cfg = det
        self.d2cfg = butd_cfg(det, device)
        self.model = build_model(self.d2cfg).eval()

    def load_from(self, torch_engine: nn.Module) -> None:
        """Take the torch engine's (already loaded and checked) weights; the names are identical."""
        missing, unexpected = self.model.load_state_dict(torch_engine.state_dict(), strict=True)
        assert not missing and not unexpected

    @torch.no_grad()
    def forward(self, images: torch.Tensor, image_sizes, scales, original_sizes) -> list[DetectorOutput]:
        m = self.model
        batch = ImageList(images, [tuple(int(v) for v in s) for s in image_sizes])
        features = m.backbone(batch.tensor)
        with warnings.catch_warnings():
            # detectron2's anchor grid calls torch.meshgrid without `indexing` (it means "ij", today's default)
            warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release", category=UserWarning)
            proposals, _ = m.proposal_generator(batch, features, None)
        heads = m.roi_heads.extract(features, proposals, self.cfg.roi_chunk)
        return detector_outputs([p.proposal_boxes.tensor for p in proposals], *heads, scales, original_sizes,
                                self.cfg.bbox_reg_weights)
