"""Visual backends other than the detector's own region selection: `lxm extract --backbone NAME` (issue 31).

A backend turns an image into N feature vectors with a box each (original-image pixels, x1 y1 x2 y2), and, for the
detector, object/attribute labels. `butd` without `--boxes-file` is the 36-region pipeline of
`lxm.extract.pipeline` itself, unchanged; this module holds the three others, behind one small interface
(`Backend`: `load`, `prepare`, `run`) that `extract` drives batch by batch with the same claims, resumption and
failures.jsonl as the detector:

- `GivenBoxes` (`butd --boxes-file FILE.jsonl`): the VG detector pools and classifies exactly the boxes a file gives
  per image, in order, with no NMS and no selection -- the given-box mode of the bottom-up-attention ports
  (airsplay/py-bottom-up-attention `demo/demo_feature_extraction_given_box.ipynb`: boxes scaled by the image's
  resize factor, then ROI pooling, res5, the classifier and the attribute head). Counts vary per image; the store's
  N is the largest count in the file. An image without a line in the file is a failure (failures.jsonl names the
  file), as an unreadable image is: the other images are extracted.
- `GridFeatures` (`grid`, `--grid G`): the detector's res5 run over the whole res4 map, as grid-feats-vqa
  (facebookresearch/grid-feats-vqa `extract_grid_feature.py`: `model.backbone` then `roi_heads.get_conv5_features`,
  i.e. `res5(res4)`), then average-pooled to G x G cells (`adaptive_avg_pool2d`; row-major, top-left first), each
  cell's box its extent in the original image. Differences from grid-feats-vqa, on purpose: res5 keeps the BUTD
  detector's stride 1 / dilation 2 (the weights were trained so; grid-feats-vqa sets RES5_DILATION = 1 on its own
  detector, whose res5 then halves the map), and the map is pooled to a fixed G x G so a store has one N (they keep
  the whole stride-32 map). No ROI head, no NMS, no labels.
- `TimmFeatures` (`timm:MODEL`): any timm image model's `forward_features` -- patch tokens with the prefix (class /
  register) tokens dropped (`model.num_prefix_tokens`), or the last feature map flattened row-major -- on the
  model's own preprocessing (`timm.data.resolve_data_config` + `create_transform`, eval mode), each patch's box its
  extent in the original image after the transform's resize and centre crop (the crop's margins are outside every
  patch). No labels. The images of a batch go through the model together (one forward per batch), so unlike the
  detector's rows a patch feature may differ in the last bits with `--batch-size`.

Label-less records hold `NO_LABEL` (-1) ids and 0.0 confidences (`lxm.features.records`). The backend is recorded
in the manifest (`lxm.features.backbone.BackboneInfo`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lxm.devices import resolve_device
from lxm.errors import ConfigError, MissingDependencyError
from lxm.extract.detector import detector_outputs, in_layout_of
from lxm.extract.images import caffe_blob, load_bgr
from lxm.extract.pipeline import EngineChoice, ExtractConfig, build_detector, ieee_fp32
from lxm.extract.weights import RANDOM, WeightsError, load_torch_weights
from lxm.features.backbone import BackboneInfo
from lxm.features.records import NO_LABEL, ImageFeatures
from lxm.integrity import sha256_file
from lxm.jsonl import read_json_lines

_logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"


@dataclass
class BackboneConfig:
    """Which backend `lxm extract` runs, and its own settings (the detector's are in `ExtractConfig`)."""

    name: str = "butd"  # "butd", "grid" or "timm:MODEL" (any timm model name, with its pretrained tag)
    weights: str | None = None  # timm: a .pth/.safetensors state_dict, a Hub id, or "random"; None: the model
    #   name's own pretrained weights from the Hub (grid and butd use ExtractConfig.weights, the detector's)
    grid: int = 8  # grid: cells per side (N = grid * grid)
    boxes_file: str | None = None  # butd: JSONL of {"img_id", "boxes": [[x1, y1, x2, y2], ...]} in pixels
    model_args: dict[str, Any] = field(default_factory=dict)  # timm: create_model keyword overrides (tiny tests)

    @property
    def timm_model(self) -> str | None:
        return self.name[len(TIMM_PREFIX):] if self.name.startswith(TIMM_PREFIX) else None

    def validate(self) -> "BackboneConfig":
        if self.name not in ("butd", "grid") and not (self.timm_model or "").strip():
            raise ConfigError(f"unknown --backbone {self.name!r}; one of butd, grid, timm:MODEL (a timm model name, "
                              f"e.g. timm:vit_base_patch16_224)")
        if self.boxes_file is not None and self.name != "butd":
            raise ConfigError(f"--boxes-file gives the detector its boxes: it needs --backbone butd, not {self.name!r}")
        if self.name == "grid" and self.grid < 1:
            raise ConfigError(f"--grid must be at least 1, got {self.grid}")
        if self.weights is not None and self.timm_model is None:
            raise ConfigError(f"--backbone-weights names a timm model's weights; --backbone {self.name} uses the "
                              f"detector's --weights")
        if self.model_args and self.timm_model is None:
            raise ConfigError(f"--timm-arg is for timm: backbones, not {self.name!r}")
        return self


def make_backend(cfg: ExtractConfig, bcfg: BackboneConfig) -> "Backend | None":
    """The backend `extract` runs for `bcfg`, or None for the detector's own selection (`butd`: the pipeline's)."""
    bcfg.validate()
    if bcfg.timm_model is not None:
        return TimmFeatures(cfg, bcfg)
    if bcfg.name == "grid":
        return GridFeatures(cfg, bcfg)
    if bcfg.boxes_file is not None:
        return GivenBoxes(cfg, bcfg)
    return None


class Backend:
    """What `extract` asks of a backend. `info` is known before any weights load (N and D fix the store)."""

    info: BackboneInfo

    def load(self, on_weights: Callable[[str], None] | None = None, on_engine: Callable[[str], None] | None = None,
             on_download: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Build the network and load its weights (once, only when there is work); return the manifest's
        "extractor" metadata; `info` then carries the weights and their sha256."""
        raise NotImplementedError

    def prepare(self, path: Path, max_pixels: int | None) -> Any:
        """Decode and preprocess one image (in the loader thread); ImageError / cv2.error for a bad image."""
        raise NotImplementedError

    def run(self, batch: list[tuple[Path, Any]], dtype) -> list[tuple[Path, ImageFeatures | str]]:
        """(path, prepared input or the reason it failed) per image -> (path, record or reason), in order."""
        raise NotImplementedError


def label_less(img_id: str, size: tuple[int, int], boxes: np.ndarray, features: np.ndarray, dtype) -> ImageFeatures:
    """A record without labels: ids NO_LABEL, confidences 0.0 (what the label losses ignore)."""
    n = boxes.shape[0]
    return ImageFeatures(img_id=img_id, img_h=size[0], img_w=size[1],
                         objects_id=np.full(n, NO_LABEL, np.int64), objects_conf=np.zeros(n, np.float32),
                         attrs_id=np.full(n, NO_LABEL, np.int64), attrs_conf=np.zeros(n, np.float32),
                         boxes=boxes.astype(np.float32), features=features.astype(dtype))


class _DetectorBackend(Backend):
    """Shared by `grid` and given boxes: the VG detector (torch engine), Caffe preprocessing as `lxm extract`."""

    def __init__(self, cfg: ExtractConfig, bcfg: BackboneConfig):
        if cfg.engine == "detectron2":
            raise ConfigError(f"--backbone {bcfg.name}{' --boxes-file' if bcfg.boxes_file else ''} runs on the torch "
                              f"engine only; use --engine torch (or auto)")
        self.cfg, self.bcfg, self.det = cfg, bcfg, cfg.detector_config()
        self.device = resolve_device(cfg.device)
        self.model: Any = None

    def load(self, on_weights=None, on_engine=None, on_download=None) -> dict[str, Any]:
        engine = EngineChoice("torch", self.cfg.engine, reason="" if self.cfg.engine == "torch" else
                              f"--backbone {self.info.name} runs on the torch engine")
        (on_engine or _logger.info)(engine.summary())
        self.model, meta = build_detector(self.cfg, on_weights, engine, on_download)
        self.info = replace(self.info, weights=meta["weights"],
                            weights_sha256=None if meta["random_weights"] else meta["weights_sha256"])
        det = self.det
        return {"backbone": self.info.name, "device": str(self.device), "bf16": self.cfg.bf16, "tf32": False,
                "scale_rule": f"short side {det.min_size}, long side <= {det.max_size} (Caffe, cv2 float resize)",
                "images": str(Path(self.cfg.images).resolve()), **meta}

    def prepare(self, path: Path, max_pixels: int | None):
        img = load_bgr(path, max_pixels=max_pixels)
        blob, scale = caffe_blob(img, self.det.pixel_mean_bgr, self.det.min_size, self.det.max_size)
        return blob, scale, img.shape[:2]

    def _precision(self):
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return ieee_fp32(self.device)

    def _image(self, blob: np.ndarray) -> torch.Tensor:
        image = torch.from_numpy(blob[None]).to(self.device)
        return image.contiguous(memory_format=torch.channels_last) if self.cfg.bf16 else image


class GridFeatures(_DetectorBackend):
    """res5 over the whole res4 map, average-pooled to grid x grid cells (see the module docstring)."""

    def __init__(self, cfg: ExtractConfig, bcfg: BackboneConfig):
        super().__init__(cfg, bcfg)
        g = bcfg.grid
        self.info = BackboneInfo(name="grid", num_boxes=g * g, feature_dim=self.det.res2_channels * 8, labels=False,
                                 weights=cfg.weights, detector=cfg.detector, grid=g)

    @torch.no_grad()
    def grid_map(self, blob: np.ndarray) -> torch.Tensor:
        """[D, h, w] float32: res5 of the whole res4 map of one preprocessed image (stride 16, as res4)."""
        res5 = self.model.roi_heads.res5
        with self._precision():
            feat = self.model.backbone(self._image(blob))
            return res5(in_layout_of(feat, res5))[0].float()

    def run(self, batch, dtype):
        out = []
        g = self.bcfg.grid
        for path, item in batch:  # one image at a time, as the detector: rows never depend on --batch-size
            if isinstance(item, str):
                out.append((path, item))
                continue
            blob, scale, size = item
            fmap = self.grid_map(blob)
            pooled = F.adaptive_avg_pool2d(fmap[None], g)[0]  # [D, g, g]
            feats = pooled.flatten(1).t().cpu().numpy()  # [g * g, D], row-major cells
            boxes = cell_boxes(fmap.shape[1:], g, self.det.stride, blob.shape[1:], scale, size)
            out.append((path, label_less(path.stem, size, boxes, feats, dtype)))
        return out


def cell_boxes(map_size: tuple[int, int], g: int, stride: int, resized: tuple[int, int], scale: float,
               size: tuple[int, int]) -> np.ndarray:
    """[g * g, 4] original-image pixel boxes of adaptive_avg_pool2d's cells over a stride-`stride` map.

    Cell i along an axis of n map positions averages positions [floor(i n / g), ceil((i + 1) n / g)) (torch's
    adaptive pooling); a position covers `stride` resized pixels; the extent is divided by the resize factor, and
    an edge at or past the resized image's border is the original's border (the resized size was rounded)."""
    def edges(n: int, limit: int, original: int) -> tuple[np.ndarray, np.ndarray]:
        i = np.arange(g)
        lo, hi = (i * n) // g * stride, -((-(i + 1) * n) // g) * stride
        return (np.where(lo >= limit, original, lo / scale), np.where(hi >= limit, original, hi / scale))

    (h, w), (rh, rw), (oh, ow) = map_size, resized, size
    y1, y2 = edges(h, rh, oh)
    x1, x2 = edges(w, rw, ow)
    boxes = np.stack([np.repeat(x1[None], g, 0), np.repeat(y1[:, None], g, 1), np.repeat(x2[None], g, 0),
                      np.repeat(y2[:, None], g, 1)], -1).reshape(-1, 4)
    return np.clip(boxes, 0, [ow, oh, ow, oh]).astype(np.float32)


class GivenBoxes(_DetectorBackend):
    """The detector's pooling, classifier and attribute head at boxes read from a JSONL file."""

    def __init__(self, cfg: ExtractConfig, bcfg: BackboneConfig):
        super().__init__(cfg, bcfg)
        path = Path(bcfg.boxes_file).expanduser().resolve()
        self.boxes = read_boxes_file(path)
        if not self.boxes:
            raise ConfigError(f"{path}: no lines: give one {{\"img_id\": ..., \"boxes\": [[x1, y1, x2, y2], ...]}} "
                              f"per image")
        self.path = path
        n = max(len(b) for b in self.boxes.values())
        self.info = BackboneInfo(name="butd", num_boxes=n, feature_dim=self.det.res2_channels * 8, labels=True,
                                 weights=cfg.weights, detector=cfg.detector, boxes_file=str(path),
                                 boxes_sha256=sha256_file(path))

    def prepare(self, path: Path, max_pixels: int | None):
        if path.stem not in self.boxes:  # before decoding: no line, no work
            return f"no boxes for img_id {path.stem!r} in {self.path}"
        return super().prepare(path, max_pixels)

    @torch.no_grad()
    def pool(self, blob: np.ndarray, scale: float, size: tuple[int, int], boxes: np.ndarray):
        """The detector's outputs at `boxes` ([K, 4] original pixels) of one preprocessed image (DetectorOutput)."""
        rois = torch.from_numpy(boxes).to(self.device) * scale  # resized-image pixels, as the RPN's proposals
        with self._precision():
            feat = self.model.backbone(self._image(blob))
            pooled, cls, deltas, attrs = self.model.box_head(feat, [rois])
        return detector_outputs([rois], pooled, cls, deltas, attrs, [scale], [size], self.det.bbox_reg_weights)[0]

    def run(self, batch, dtype):
        out = []
        for path, item in batch:
            if isinstance(item, str):
                out.append((path, item))
                continue
            blob, scale, (h, w) = item
            boxes = self.boxes[path.stem]
            outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > w) | (boxes[:, 3] > h)
            if outside.any():
                k = int(np.argmax(outside))
                out.append((path, f"{self.path}: img_id {path.stem!r}: box {k} {boxes[k].tolist()} lies outside the "
                                  f"{w}x{h} image"))
                continue
            det = self.pool(blob, scale, (h, w), boxes)
            obj_conf, obj_id = det.cls_prob[:, 1:].max(dim=1)  # as lxm.extract.select: background excluded
            attr_conf, attr_id = det.attr_prob[:, 1:].max(dim=1)
            out.append((path, ImageFeatures(
                img_id=path.stem, img_h=h, img_w=w,
                objects_id=obj_id.cpu().numpy().astype(np.int64), objects_conf=obj_conf.cpu().numpy().astype(np.float32),
                attrs_id=attr_id.cpu().numpy().astype(np.int64), attrs_conf=attr_conf.cpu().numpy().astype(np.float32),
                boxes=boxes.copy(), features=det.features.cpu().numpy().astype(dtype))))
        return out


def read_boxes_file(path: Path) -> dict[str, np.ndarray]:
    """img_id -> [K, 4] float32 boxes from a JSONL file; a bad line is a one-line ConfigError naming FILE:LINE."""
    if not path.is_file():
        raise ConfigError(f"--boxes-file {path}: no such file")
    out: dict[str, np.ndarray] = {}
    first: dict[str, int] = {}
    for number, rec in read_json_lines(path, objects=True, error=ConfigError):
        where = f"{path}:{number}"
        img_id, boxes = rec.get("img_id"), rec.get("boxes")
        if not isinstance(img_id, str) or not img_id:
            raise ConfigError(f"{where}: field 'img_id' must be a non-empty string (the image's file stem)")
        if img_id in first:
            raise ConfigError(f"{where}: img_id {img_id!r} repeats line {first[img_id]}")
        first[img_id] = number
        try:
            arr = np.asarray(boxes, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.zeros((0, 0))
        if not isinstance(boxes, list) or not boxes or arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
            raise ConfigError(f"{where}: field 'boxes' must be a non-empty list of [x1, y1, x2, y2] number lists")
        bad = (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])
        if bad.any():
            k = int(np.argmax(bad))
            raise ConfigError(f"{where}: field 'boxes': box {k} {arr[k].tolist()} needs x2 > x1 and y2 > y1")
        out[img_id] = arr.astype(np.float32)
    return out


class TimmFeatures(Backend):
    """A timm model's patch tokens / last feature map (see the module docstring)."""

    def __init__(self, cfg: ExtractConfig, bcfg: BackboneConfig):
        try:
            import timm
        except ImportError:
            raise MissingDependencyError("--backbone timm:... needs timm: pip install timm") from None
        self.timm, self.cfg, self.bcfg = timm, cfg, bcfg
        self.device = resolve_device(cfg.device)
        self.name = bcfg.timm_model
        try:
            with torch.device("meta"):  # the shapes without building the weights
                meta_model = self._create()
        except RuntimeError as exc:
            raise ConfigError(f"--backbone {bcfg.name}: {str(exc).splitlines()[0]}") from None
        self.data_config = self._data_config(meta_model)
        _, h, w = self.data_config["input_size"]
        with torch.device("meta"):
            out = meta_model.forward_features(torch.empty(1, 3, h, w))
        tokens, dim = self._layout(meta_model, out)
        self.info = BackboneInfo(name="timm", num_boxes=tokens, feature_dim=dim, labels=False,
                                 weights=bcfg.weights, model=self.name, model_args=dict(bcfg.model_args),
                                 input_size=(h, w))
        self.transform = timm.data.create_transform(**self.data_config, is_training=False)
        self.geometry = crop_geometry(self.transform, (h, w))
        self.model: Any = None

    def _create(self):
        try:
            return self.timm.create_model(self.name, pretrained=False, **self.bcfg.model_args)
        except (RuntimeError, TypeError) as exc:  # an unknown name or keyword
            raise ConfigError(f"--backbone {self.bcfg.name}: timm cannot build it ({str(exc).splitlines()[0]})") \
                from None

    def _data_config(self, model) -> dict[str, Any]:
        config = self.timm.data.resolve_data_config({}, model=model)
        fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if fixed is not None and tuple(config["input_size"][1:]) != tuple(fixed):  # img_size overridden
            config["input_size"] = (3, *fixed)
        return config

    def _layout(self, model, out: torch.Tensor) -> tuple[int, int]:
        """(tokens after the prefix, D) of `forward_features`' output."""
        if out.ndim == 3:
            return out.shape[1] - model.num_prefix_tokens, out.shape[2]
        if out.ndim == 4:
            if getattr(model, "output_fmt", "NCHW") == "NHWC":
                return out.shape[1] * out.shape[2], out.shape[3]
            return out.shape[2] * out.shape[3], out.shape[1]
        raise ConfigError(f"--backbone {self.bcfg.name}: forward_features gives a {out.ndim}-d output; expected "
                          f"tokens [B, T, D] or a map [B, C, H, W]")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] float32: forward_features of a preprocessed batch, prefix tokens dropped / map flattened."""
        with torch.no_grad(), (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.bf16
                               else ieee_fp32(self.device)):
            out = self.model.forward_features(x.to(self.device))
        if out.ndim == 3:
            out = out[:, self.model.num_prefix_tokens:]
        elif getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            out = out.flatten(1, 2)
        else:
            out = out.flatten(2).transpose(1, 2)
        return out.float()

    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid over the model's input."""
        n = self.info.num_boxes
        size = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if size is not None and size[0] * size[1] == n:
            return int(size[0]), int(size[1])
        _, h, w = self.data_config["input_size"]
        for rows in range(1, n + 1):  # a feature map: the factorisation with the input's aspect ratio
            if n % rows == 0 and abs(rows / (n // rows) - h / w) < 1e-6:
                return rows, n // rows
        raise ConfigError(f"--backbone {self.bcfg.name}: cannot lay {n} tokens out on the {h}x{w} input")

    def load(self, on_weights=None, on_engine=None, on_download=None) -> dict[str, Any]:
        (on_engine or _logger.info)(f"backbone: timm {self.timm.__version__} {self.name}")
        with torch.random.fork_rng(devices=[]):  # seeded random init without touching the process's generator
            torch.manual_seed(self.cfg.seed)
            model = self._create()
        source, digest = load_timm_weights(model, self.bcfg.weights, self.cfg.seed)
        (on_weights or _logger.info)(f"backbone weights: {source}" + (f" (sha256 {digest[:12]}...)" if digest else ""))
        self.model = model.eval().to(self.device)
        self.rows, self.cols = self.grid_size()
        self.info = replace(self.info, weights=source, weights_sha256=digest)
        return {"backbone": "timm", "timm_version": self.timm.__version__, "device": str(self.device),
                "bf16": self.cfg.bf16, "tf32": False, "images": str(Path(self.cfg.images).resolve()),
                "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
                "transform": [type(t).__name__ for t in self.transform.transforms]}

    def prepare(self, path: Path, max_pixels: int | None):
        from PIL import Image

        rgb = cv2.cvtColor(load_bgr(path, max_pixels=max_pixels), cv2.COLOR_BGR2RGB)
        return self.transform(Image.fromarray(rgb)), rgb.shape[:2]

    def boxes(self, size: tuple[int, int]) -> np.ndarray:
        """[rows * cols, 4] original-image boxes of the patches of an image of `size` (h, w), row-major."""
        return patch_boxes(self.geometry(size), self.info.input_size, self.rows, self.cols, size)

    def run(self, batch, dtype):
        good = [(path, item) for path, item in batch if not isinstance(item, str)]
        feats = self.features(torch.stack([item[0] for _, item in good])).cpu().numpy() if good else []
        done = {path: label_less(path.stem, item[1], self.boxes(item[1]), f, dtype)
                for (path, item), f in zip(good, feats)}
        return [(path, item if isinstance(item, str) else done[path]) for path, item in batch]


def load_timm_weights(model, weights: str | None, seed: int) -> tuple[str, str | None]:
    """Fill `model` from `weights` (strict): "random" (kept as built), a local .pth/.safetensors state_dict, a Hub id
    (its model.safetensors, else pytorch_model.bin), or None (the model name's own Hub weights). Returns (source,
    sha256 of the file or None)."""
    if weights == RANDOM:
        _logger.warning("backbone weights are RANDOM (seed %d): features are meaningless", seed)
        return f"random(seed={seed})", None
    path = Path(weights).expanduser() if weights is not None else None
    if path is None or not path.exists():
        if weights is not None and (weights.startswith((".", "/", "~")) or
                                    weights.endswith((".pth", ".pt", ".bin", ".safetensors"))):
            raise WeightsError(f"--backbone-weights {weights}: no such file")
        repo = weights or (model.pretrained_cfg or {}).get("hf_hub_id")
        if not repo:
            raise WeightsError("this timm model names no Hub weights; give --backbone-weights FILE or random")
        path = hub_file(repo)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        sd = load_torch_weights(path)  # torch.load(weights_only=True): no arbitrary unpickling
    target = model.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [k for k in sd if k in target and tuple(sd[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f"{title} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                 if keys]
        raise WeightsError(f"{path}: weights do not match timm model {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return str(path), sha256_file(path)


def hub_file(repo: str) -> Path:
    """The weights file of a Hugging Face Hub repository (timm's layout: model.safetensors or pytorch_model.bin)."""
    from huggingface_hub import hf_hub_download

    errors = []
    for name in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(repo_id=repo, filename=name))
        except Exception as exc:  # noqa: BLE001 (offline, missing file, bad id: all one message)
            errors.append(type(exc).__name__)
    raise WeightsError(f"could not fetch {repo!r} from the Hugging Face Hub ({', '.join(errors)}); offline, download "
                       f"its model.safetensors elsewhere and pass the file with --backbone-weights")


def crop_geometry(transform, input_size: tuple[int, int]) -> Callable[[tuple[int, int]], tuple[float, float, float,
                                                                                               float]]:
    """For timm's eval transform: size (h, w) of an original image -> (sx, sy, left, top) such that the model's
    input pixel (x, y) shows original pixel ((x + left) / sx, (y + top) / sy); torchvision's Resize (int: the short
    side, as torchvision rounds the long one; (h, w): exact) then CenterCrop (offsets rounded as torchvision)."""
    import torchvision.transforms as T

    steps = []
    for t in transform.transforms:
        name = type(t).__name__
        if isinstance(t, T.Resize) and t.max_size is None:
            steps.append(("resize", t.size))
        elif isinstance(t, T.CenterCrop) or name == "CenterCropOrPad":
            size = t.size if isinstance(t.size, (tuple, list)) else (t.size, t.size)
            steps.append(("crop", tuple(size)))
        elif name in ("ToTensor", "MaybeToTensor", "Normalize", "MaybePILToTensor", "PILToTensor"):
            continue
        else:
            raise ConfigError(f"timm transform step {name} is not supported for patch boxes (Resize + CenterCrop "
                              f"are)")

    def geometry(size: tuple[int, int]) -> tuple[float, float, float, float]:
        h, w = size
        sx = sy = 1.0
        left = top = 0.0
        ch, cw = h, w
        for kind, arg in steps:
            if kind == "resize":
                if isinstance(arg, int) or len(arg) == 1:
                    short = arg if isinstance(arg, int) else arg[0]
                    nh, nw = (short, int(short * cw / ch)) if ch <= cw else (int(short * ch / cw), short)
                else:
                    nh, nw = arg
                # a resize after a crop scales the offsets too
                sx, sy, left, top = sx * nw / cw, sy * nh / ch, left * nw / cw, top * nh / ch
                ch, cw = nh, nw
            else:
                th, tw = arg
                left += int(round((cw - tw) / 2.0))
                top += int(round((ch - th) / 2.0))
                ch, cw = th, tw
        if (ch, cw) != tuple(input_size):
            raise ConfigError(f"timm transform gives {ch}x{cw} inputs, the model takes {input_size[0]}x"
                              f"{input_size[1]}")
        return sx, sy, left, top

    return geometry


def patch_boxes(geometry: tuple[float, float, float, float], input_size: tuple[int, int], rows: int, cols: int,
                size: tuple[int, int]) -> np.ndarray:
    """[rows * cols, 4] original-image boxes (row-major) of a rows x cols patch grid over the model's input, for an
    image of `size` (h, w) whose input is `geometry` (`crop_geometry`); clipped to the image (a padded crop)."""
    sx, sy, left, top = geometry
    (ih, iw), (h, w) = input_size, size
    xs = (np.arange(cols + 1) * iw / cols + left) / sx
    ys = (np.arange(rows + 1) * ih / rows + top) / sy
    boxes = np.stack([np.tile(xs[:-1], rows), np.repeat(ys[:-1], cols), np.tile(xs[1:], rows),
                      np.repeat(ys[1:], cols)], -1)
    return np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
