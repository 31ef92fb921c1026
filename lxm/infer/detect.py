"""Region features for `lxm ask`: from raw images through the detector, or from feature stores.

`Detector` runs exactly what `lxm extract` runs for one image (`lxm.extract.pipeline`): Caffe decoding and
preprocessing (`load_bgr`, `caffe_blob`), the Faster R-CNN (`build_detector`, engine "auto" / "torch" /
"detectron2"), LXMERT's 36-box selection (`select_boxes`: "lxmert", or "maxnms") and the same records (`image_records`), kept in
memory in float32 (a float16 store rounds them; with `dtype="float32"` the store holds these very values). Equal-
size images of one call share a backbone pass, as in `lxm extract`. `StoredFeatures` reads records that `lxm
extract` (or `lxm convert`) already wrote.

Random detector weights give meaningless features; they exist for smoke tests and are said in `describe()`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from lxm.extract.images import ImageError, caffe_blob, load_bgr
from lxm.extract.pipeline import (DETECTORS, ExtractConfig, build_detector, choose_engine, detect,
                                  detector_backbone, image_records, select_boxes)
from lxm.extract.weights import RANDOM
from lxm.features.records import ImageFeatures
from lxm.features.store import FeatureStore, StoreError, store_index

_logger = logging.getLogger(__name__)


def detector_config(weights: str | None, *, detector: str = "vg-r101", engine: str = "auto", device: str = "cpu",
                    num_boxes: int = 36, mode: str = "lxmert", seed: int = 0, batch_size: int = 4,
                    backbone: str = "butd", backbone_weights: str | None = None, grid: int = 8,
                    timm_args: dict | None = None) -> ExtractConfig:
    """The `ExtractConfig` of `lxm extract --weights W --detector D [--backbone B ...]` for in-memory use (float32,
    no store); `weights` None = random weights (seeded by `seed`)."""
    return ExtractConfig(images="", out="", weights=weights or RANDOM, engine=engine, detector=detector, mode=mode,
                         num_boxes=num_boxes, device=device, dtype="float32", batch_size=batch_size, seed=seed,
                         backbone=backbone, backbone_weights=backbone_weights, grid=grid, timm_args=timm_args)


def feature_dim(detector: str) -> int:
    """The size of the region features detector preset `detector` gives (its res5 channels: 2048 for vg-r101),
    known without building it; ConfigError for an unknown preset."""
    return detector_config(None, detector=detector).detector_config().res2_channels * 8


def detectors_for(dim: int) -> list[str]:
    """The detector presets whose region features have `dim` values (what a model reading `dim` needs)."""
    return [name for name in DETECTORS if feature_dim(name) == dim]


def check_image_file(path: str | os.PathLike) -> Path:
    """`path` is an image file to read (an ImageError naming it otherwise: missing, a directory)."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a directory (give an image file)")
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    return path


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The BGR image of `path` as the detector decodes it; an ImageError naming the file otherwise (missing, a
    directory, undecodable, larger than the limits of `lxm.extract.images.load_bgr`)."""
    path = check_image_file(path)
    try:
        return load_bgr(path)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


class Detector:
    """The detector of `lxm extract`, one call per group of images -> `ImageFeatures` (img_id = file stem).

    Args:
        cfg: as `lxm extract`'s (see `detector_config`); `images`, `out`, `dtype` and the store fields are unused.
        on_weights: receives the weights loader's one-line report (default: logged).
    """

    def __init__(self, cfg: ExtractConfig, on_weights: Callable[[str], None] | None = None):
        from lxm.extract.backends import make_backend  # the visual backends of `lxm extract --backbone`

        self.cfg = cfg
        self.det = cfg.detector_config()
        self.device = torch.device(cfg.device)
        self.backend = make_backend(cfg, cfg.backbone_config())  # None: the detector's own 36 regions
        if self.backend is not None:  # grid cells or timm patches, as `lxm extract --backbone` computes them
            self.meta = self.backend.load(on_weights)
            self.model, self.engine = None, choose_engine("torch")
            return
        self.engine = choose_engine(cfg.engine)
        self.model, self.meta = build_detector(cfg, on_weights, self.engine)

    @property
    def info(self):
        """The `BackboneInfo` of the records (N, D, labels), as a store of `lxm extract --backbone` records it."""
        return self.backend.info if self.backend is not None else detector_backbone(self.cfg)

    @property
    def random_weights(self) -> bool:
        if self.backend is not None:
            return (self.backend.info.weights or "").startswith(RANDOM)
        return bool(self.meta["random_weights"])

    def describe(self) -> str:
        if self.backend is not None:
            note = " (RANDOM weights: meaningless features, a smoke test only)" if self.random_weights else ""
            return f"backbone {self.backend.info.summary()}{note}"
        weights = ("RANDOM weights (meaningless features: a smoke test only)" if self.random_weights
                   else f"weights {self.meta['weights']}")
        return f"{self.cfg.detector} detector ({self.engine.name}), {weights}, {self.cfg.num_boxes} boxes"

    def records(self, paths: Sequence[str | os.PathLike]) -> list[ImageFeatures]:
        """The features of each image, in order (`cfg.batch_size` images per detector call)."""
        if self.backend is not None:
            return self._backend_records([Path(p) for p in paths])
        out: list[ImageFeatures] = []
        for start in range(0, len(paths), self.cfg.batch_size):
            chunk = [Path(p) for p in paths[start:start + self.cfg.batch_size]]
            blobs = []
            for path in chunk:
                img = read_image(path)
                try:
                    blob, scale = caffe_blob(img, self.det.pixel_mean_bgr, self.det.min_size, self.det.max_size)
                except cv2.error as exc:
                    raise ImageError(f"{path}: cannot preprocess ({str(exc).strip().splitlines()[-1]})") from None
                blobs.append((blob, scale, img.shape[:2]))
            with torch.no_grad():
                dets = detect(self.model, blobs, self.device, self.cfg.bf16)
            for path, det in zip(chunk, dets):
                if det.proposals.shape[0] < self.cfg.num_boxes:
                    raise ImageError(f"{path}: only {det.proposals.shape[0]} proposals, fewer than "
                                     f"{self.cfg.num_boxes} boxes")
            sels = select_boxes(dets, self.cfg.mode, self.cfg.num_boxes)
            out.extend(image_records([p.stem for p in chunk], dets, sels, np.float32))
        return out

    def _backend_records(self, paths: list[Path]) -> list[ImageFeatures]:
        out: list[ImageFeatures] = []
        for start in range(0, len(paths), self.cfg.batch_size):
            batch = []
            for path in paths[start:start + self.cfg.batch_size]:
                check_image_file(path)
                try:
                    batch.append((path, self.backend.prepare(path, None)))
                except (ImageError, cv2.error) as exc:
                    raise ImageError(f"{path}: {str(exc).strip().splitlines()[-1]}") from None
            with torch.no_grad():
                done = self.backend.run(batch, np.float32)
            for path, rec in done:
                if isinstance(rec, str):
                    raise ImageError(f"{path}: {rec}")
                out.append(rec)
        return out


class StoredFeatures:
    """Records of feature stores by img_id (the first store that holds an id serves it)."""

    def __init__(self, stores: Sequence[str | os.PathLike]):
        self.roots = [str(s) for s in stores]
        self.stores = [FeatureStore(s) for s in stores]
        self.where = store_index(self.stores)

    @property
    def random_weights(self) -> bool:
        return any(s.manifest.get("extractor", {}).get("random_weights") for s in self.stores)

    def describe(self) -> str:
        note = " (extracted with RANDOM detector weights: meaningless features)" if self.random_weights else ""
        return f"stored features {', '.join(self.roots)}{note}"

    def records(self, image_ids: Sequence[str]) -> list[ImageFeatures]:
        out = []
        for img_id in image_ids:
            if img_id not in self.where:
                raise StoreError(f"no image {img_id!r} in the feature store(s) {', '.join(self.roots)}")
            out.append(self.stores[self.where[img_id]].get(img_id))
        return out

