"""`lxm extract`: a folder of images -> a feature store, crash-safe, resumable, shardable.

Per image: decode and preprocess as Caffe did (`lxm.extract.images`), run the detector (engine "torch",
`lxm.extract.detector`, or "detectron2", `lxm.extract.engine_d2`; "auto" takes detectron2 when it imports, see
`choose_engine`), choose the boxes (`lxm.extract.select`, mode "lxmert" by default), and append an
`ImageFeatures` record to the store (`lxm.features.store`). Each image runs through the detector on its own (see
`detect`), so a store's rows are bit-identical whatever `--batch-size` and whoever extracted them; a batch is the
unit of claiming, of decoding ahead (a loader thread), of box selection (all its images in one sweep,
`select_boxes`) and of the copy to the host (one block, `image_records`). On a GPU the selection of a batch runs on a
worker thread while the detector runs the next (`overlaps_selection`): its tie sorts and copies wait on the CPU, not
the GPU. A bad image never stops the run: it is written to failures.jsonl with the reason.

Images are found in the folder and its subfolders (Visual Genome's `VG_100K/`, `VG_100K_2/`); the img_id is the file
stem. Workers split the sorted list disjointly (`--shard i/n`), and any number of runs may write one store at once:
they share the work through the store's claims (`lxm.features.store.FeatureStoreWriter.claim`). The original
extraction (peteanderson80/bottom-up-attention `tools/generate_tsv.py`) split its image list across GPUs the same
way (`image_ids[i::len(gpus)]`), but into one TSV per GPU, to be merged afterwards.

`--backbone` picks the visual backend (issue 31): "butd" (this pipeline's detector and selection, the default),
"butd" with `--boxes-file` (given boxes), "grid" and "timm:MODEL" run through `lxm.extract.backends` in the same
claim/decode/write loop; the manifest records the backend under "backbone" (`lxm.features.backbone`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from lxm.devices import resolve_device
from lxm.errors import ConfigError, MissingDependencyError
from lxm.extract.detector import DetectorConfig, DetectorOutput, GeneralizedRCNN, detector_tiny, prepare_bf16, vg_r101
from lxm.extract.images import IMAGE_SUFFIXES, ImageError, caffe_blob, image_limits, list_images, load_bgr
from lxm.extract.select import Selection, select_lxmert_batch, select_maxnms
from lxm.extract.weights import RANDOM, load_detector_weights
from lxm.features.backbone import BackboneInfo
from lxm.features.records import ImageFeatures
from lxm.features.store import FeatureStoreWriter

_logger = logging.getLogger(__name__)

DETECTORS = {"vg-r101": vg_r101, "tiny": detector_tiny}
ENGINES = ("auto", "torch", "detectron2")


@dataclass
class ExtractConfig:
    """Everything `lxm extract` needs; written to the store's manifest."""

    images: str  # folder of images; img_id = file name without suffix
    out: str  # feature store directory
    weights: str  # .pkl / .pth / .bin path, URL, Hub id, or "random"
    engine: str = "auto"  # "torch" (torch + torchvision.ops), "detectron2" (needs it), "auto": detectron2 if it imports
    detector: str = "vg-r101"  # network preset: "vg-r101" (BUTD) or "tiny" (tests)
    mode: str = "lxmert"  # box selection: "lxmert" (released TSVs) or "maxnms" (airsplay detectron2 demo)
    num_boxes: int = 36  # boxes per image
    device: str = "cpu"  # "auto", "cpu", "cuda" or "cuda:N" (lxm.devices.resolve_device)
    dtype: str = "float16"  # stored feature precision
    batch_size: int = 4  # images claimed, decoded ahead and box-selected together (the detector takes one at a time)
    bf16: bool = False  # bf16 network (prepare_bf16: BN folded, channels-last) under autocast; features drift, off
    prefetch: bool = True  # decode + preprocess the next batch in a thread while the detector runs this one
    overlap: bool | None = None  # choose the boxes of a batch in a thread while the detector runs the next one;
    #   None: on CUDA only (`overlaps_selection`). Either way the store's rows are the same bits.
    keep_freed_memory: bool = True  # CPU: glibc keeps freed memory for reuse (lxm.memory): each image's res5
    #   activations reuse pages; process-wide, so `lxm extract` applies it before calling extract(), which does not
    seed: int = 0  # random-weights seed
    shard: int = 0  # this worker's index ...
    num_shards: int = 1  # ... of this many (images split disjointly: sorted list [shard::num_shards])
    rows_per_shard: int = 1024  # images per Arrow shard file
    min_size: int | None = None  # override the detector preset's scale rule (short side) ...
    max_size: int | None = None  # ... and long-side cap
    max_pixels: int | None = None  # larger images are failures, refused from their header (None: image_limits())
    backbone: str = "butd"  # visual backend: "butd" (the detector's regions), "grid", "timm:MODEL" (backends.py)
    backbone_weights: str | None = None  # timm: .pth/.safetensors file, Hub id or "random"; None: the name's own
    grid: int = 8  # grid: cells per side
    boxes_file: str | None = None  # butd: JSONL of given boxes per image (pooled and classified, not selected)
    timm_args: dict | None = None  # timm: create_model keyword overrides (e.g. {"depth": 2} for tests)

    def detector_config(self) -> DetectorConfig:
        if self.detector not in DETECTORS:
            raise ConfigError(f"unknown detector {self.detector!r}; one of {', '.join(DETECTORS)}")
        cfg = DETECTORS[self.detector]()
        if self.min_size is not None:
            cfg.min_size = self.min_size
        if self.max_size is not None:
            cfg.max_size = self.max_size
        return cfg

    def backbone_config(self):
        """The `lxm.extract.backends.BackboneConfig` of these fields."""
        from lxm.extract.backends import BackboneConfig

        return BackboneConfig(name=self.backbone, weights=self.backbone_weights, grid=self.grid,
                              boxes_file=self.boxes_file, model_args=dict(self.timm_args or {})).validate()


@dataclass(frozen=True)
class EngineChoice:
    """The engine a run uses, what was asked for, and which detectron2 it runs; recorded in the store's manifest."""

    name: str  # "torch" or "detectron2"
    requested: str  # "auto", "torch" or "detectron2"
    detectron2_version: str | None = None  # detectron2.__version__, when the engine is detectron2
    detectron2_commit: str | None = None  # the commit of its source, or "unknown" (see `package_commit`)
    reason: str = ""  # why "auto" fell back to torch

    def summary(self) -> str:
        """One line for the CLI, e.g. "engine: detectron2 0.6 (commit unknown), chosen by --engine auto"."""
        if self.name == "detectron2":
            what = f"detectron2 {self.detectron2_version} (commit {self.detectron2_commit})"
        else:
            what = "torch"
        how = "asked for" if self.requested == self.name else f"chosen by --engine {self.requested}"
        return f"engine: {what}, {how}" + (f" ({self.reason})" if self.reason else "")

    def manifest(self) -> dict:
        meta: dict = {"engine": self.name, "engine_requested": self.requested}
        if self.name == "detectron2":
            meta["detectron2"] = {"version": self.detectron2_version, "commit": self.detectron2_commit}
        return meta


def choose_engine(requested: str) -> EngineChoice:
    """Resolve `--engine`: "auto" is detectron2 when lxm's detectron2 engine imports (detectron2 and its
    dependencies), else torch; "detectron2" fails with a one-line MissingDependencyError where it does not import.
    """
    if requested not in ENGINES:
        raise ConfigError(f"unknown engine {requested!r}; one of {', '.join(ENGINES)}")
    if requested == "torch":
        return EngineChoice("torch", requested)
    try:
        engine_d2 = importlib.import_module("lxm.extract.engine_d2")  # the only module that imports detectron2
    except MissingDependencyError as exc:
        if requested == "detectron2":
            raise
        # the engine raises its install hint `from None`; the ImportError it replaced says what is missing
        return EngineChoice("torch", requested, reason=f"detectron2 does not import: {exc.__context__ or exc}")
    d2 = engine_d2.detectron2
    return EngineChoice("detectron2", requested, getattr(d2, "__version__", "unknown"), package_commit(d2))


def package_commit(module) -> str:
    """The git commit a package's source came from, where that is recorded; "unknown" otherwise (never guessed).

    Looks at the installed distribution that provides this very module (pip records `vcs_info.commit_id` in its
    PEP 610 direct_url.json for `pip install git+https://...@<commit>`), then for a git checkout whose top folder
    holds the package (`pip install -e .` in a clone, or a clone on PYTHONPATH). A source tree that is neither (a
    copied snapshot, a wheel built elsewhere) gives "unknown".
    """
    package = Path(module.__file__).resolve().parent
    name = module.__name__.partition(".")[0]
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None and Path(dist.locate_file(name)).resolve() == package:  # not another copy on the path
        commit = json.loads(dist.read_text("direct_url.json") or "{}").get("vcs_info", {}).get("commit_id", "")
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return commit
    if (package.parent / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(package.parent), "rev-parse", "HEAD"], check=False,
                                  capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            head = ""
        if re.fullmatch(r"[0-9a-f]{40}", head):
            return head
    return "unknown"


class _Done:
    """A finished result with a Future's `result()`: the batch decoded in place when `prefetch` is off."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value



def select_boxes(outs: list[DetectorOutput], mode: str, num_boxes: int) -> list[Selection]:
    """The chosen boxes of each detector output: LXMERT's rule for all images at once (`select_lxmert_batch`), or
    airsplay's "maxnms" per image."""
    if mode == "lxmert":
        return select_lxmert_batch([o.proposals for o in outs], [o.cls_prob for o in outs],
                                   [o.attr_prob for o in outs], num_boxes=num_boxes)
    return [select_maxnms(o.proposals, o.pred_boxes, o.cls_prob, o.attr_prob, num_boxes=num_boxes) for o in outs]


def image_records(img_ids: list[str], outs: list[DetectorOutput], sels: list[Selection], dtype
                  ) -> list[ImageFeatures]:
    """The stored records of a batch: each detector output at its selected boxes, features cast to `dtype` (what
    `lxm extract` writes and `lxm ask` computes in memory).

    Every field of every image crosses to the host in ONE copy (a [sum K, D + 8] float32 block: features, box, and
    the ids and confidences, exact in float32: ids < 2^24), instead of six small copies an image, each a sync on a GPU.
    """
    if not outs:
        return []
    block = torch.cat([
        torch.cat([o.features[s.indices].float(), s.boxes.float(),
                   torch.stack([s.objects_id.float(), s.objects_conf.float(), s.attrs_id.float(), s.attrs_conf.float()],
                               1)], 1)
        for o, s in zip(outs, sels)]).cpu().numpy()
    records, start = [], 0
    for img_id, o, s in zip(img_ids, outs, sels):
        rows, start = block[start:start + s.indices.shape[0]], start + s.indices.shape[0]
        d = rows.shape[1] - 8
        records.append(ImageFeatures(
            img_id=img_id, img_h=o.image_size[0], img_w=o.image_size[1],
            objects_id=rows[:, d + 4].astype(np.int64), objects_conf=rows[:, d + 5].copy(),
            attrs_id=rows[:, d + 6].astype(np.int64), attrs_conf=rows[:, d + 7].copy(),
            boxes=rows[:, d:d + 4].copy(), features=rows[:, :d].astype(dtype)))
    return records


def build_detector(cfg: ExtractConfig, on_weights: Callable[[str], None] | None = None,
                   engine: EngineChoice | None = None, on_download: Callable[[int, int], None] | None = None
                   ) -> tuple[torch.nn.Module, dict]:
    """The network of `engine` (default: `choose_engine(cfg.engine)`) with its weights and its manifest entries.

    Both engines load through the same checked loader: the torch network is filled, and the detectron2 one takes its
    tensors (the names are identical). `on_weights` receives the loader's one-line report (the CLI prints it);
    without it the report is logged. `on_download(done, total)` follows a download of URL weights (bytes).
    """
    engine = engine or choose_engine(cfg.engine)
    det_cfg = cfg.detector_config()
    model = GeneralizedRCNN(det_cfg).eval()
    report = load_detector_weights(model, cfg.weights, seed=cfg.seed, on_bytes=on_download)
    (on_weights or _logger.info)(report.summary())
    if engine.name == "detectron2":
        from lxm.extract.engine_d2 import Detectron2Detector

        d2 = Detectron2Detector(det_cfg, str(resolve_device(cfg.device)))
        d2.load_from(model)
        model = d2
    model = model.to(resolve_device(cfg.device))
    if cfg.bf16:  # BN folded, bf16 channels-last convolutions; fp32 keeps the reference network bit for bit
        model = prepare_bf16(model)
    return model, {**engine.manifest(), "weights": report.source,
                                           "weights_sha256": report.sha256, "random_weights": cfg.weights == RANDOM,
                                           "detector": asdict(det_cfg)}


def detector_backbone(cfg: ExtractConfig) -> BackboneInfo:
    """The `BackboneInfo` of the detector's own regions ("butd": `cfg.num_boxes` x res5 channels, with labels)."""
    return BackboneInfo(name="butd", num_boxes=cfg.num_boxes, feature_dim=cfg.detector_config().res2_channels * 8,
                        labels=True, weights=cfg.weights, detector=cfg.detector)


def overlaps_selection(cfg: ExtractConfig, device: torch.device) -> bool:
    """Whether box selection and the host copy run on a worker beside the detector: `cfg.overlap`, or where unset
    on a GPU (the detector's kernels run there while the worker waits on its copies and sorts the ties on the CPU);
    on a CPU both would share the same cores, so the work stays in line."""
    return cfg.overlap if cfg.overlap is not None else device.type == "cuda"


@contextlib.contextmanager
def ieee_fp32(device: torch.device):
    """fp32 means IEEE fp32 on a GPU too: cuDNN's convolutions and cuBLAS's products without TF32 inside the block
    (torch lets cuDNN use TF32 by default, which would make GPU fp32 features differ from the reference network's and
    from CPU stores); the flags are restored after. Nothing to do elsewhere."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def detect(model: torch.nn.Module, blobs: list[tuple[np.ndarray, float, tuple[int, int]]], device: torch.device,
           bf16: bool = False):
    """Run the detector on preprocessed images, each on its own (a batch of one). Returns outputs in order.

    Not one backbone pass per group of equal-size images: convolution libraries pick their algorithm per batch size,
    so a shared pass changed the tiny detector's features by an fp16 ulp (the full one's happened to agree). One
    image at a time, an image's rows never depend on --batch-size, on its neighbours, or on how runs split the work.
    """
    outs = []
    for blob, scale, size in blobs:
        image = torch.from_numpy(blob[None]).to(device)
        if bf16:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else ieee_fp32(device):
            outs.extend(model(image, [tuple(blob.shape[1:])], [scale], [size]))
    return outs


def extract(cfg: ExtractConfig, on_progress: Callable[[int, int, float], None] | None = None,
            on_weights: Callable[[str], None] | None = None, on_engine: Callable[[str], None] | None = None,
            on_download: Callable[[int, int], None] | None = None) -> dict:
    """Extract features for this worker's share of `cfg.images` into `cfg.out`; returns a summary.

    Runs into one `cfg.out` may overlap (several `lxm extract` at once, with or without `--shard`): each takes its
    images through the store's claims (`FeatureStoreWriter.claim`), so none is lost or extracted twice, and images
    another live run holds are left to it. failures.jsonl keeps one record per image that failed and is not stored.
    Nothing process-wide is changed: `cfg.keep_freed_memory` is for the program to apply (`lxm extract` calls
    `lxm.memory.keep_freed_memory` first on CPU; a script may do the same).

    Args:
        on_progress: called as (images handled, images to do, images through the detector per second) before the
            detector is built and after each image; "to do" excludes the images stored before this run began.
        on_weights: called with the one-line report of the detector weights once they are loaded (default: logged).
        on_engine: called with the engine's one-line description (`EngineChoice.summary`) once it is chosen, before
            the weights load (default: logged). Neither is called when there is nothing left to extract.
        on_download: called as (bytes so far, total bytes or 0) while URL weights download (default: the start and
            the end are logged).

    Returns:
        A dict: folder_images, images (this worker's share), already_done (stored by earlier or concurrent runs),
        extracted, failed, left_to_others (held by another live run when this one ran out of work), seconds,
        store_images, failures_file, engine ("torch" / "detectron2"; None when nothing was left to extract).

    Raises:
        ImageError: the folder is missing, holds no image at all, or holds two images with one img_id.
    """
    if not (0 <= cfg.shard < cfg.num_shards):
        raise ConfigError(f"shard {cfg.shard} is outside 0..{cfg.num_shards - 1}")
    if cfg.mode not in ("lxmert", "maxnms"):
        raise ConfigError(f"unknown selection mode {cfg.mode!r}; 'lxmert' or 'maxnms'")
    if cfg.engine not in ENGINES:
        raise ConfigError(f"unknown engine {cfg.engine!r}; one of {', '.join(ENGINES)}")
    device = resolve_device(cfg.device)  # a wrong --device fails before the folder is listed
    image_limits()  # a wrong $LXM_MAX_IMAGE_PIXELS / _BYTES too
    every = list_images(cfg.images)
    if not every:
        raise ImageError(f"{cfg.images}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files in it and "
                         f"its subfolders)")
    paths = every[cfg.shard::cfg.num_shards]
    det = cfg.detector_config()
    from lxm.extract.backends import make_backend  # backends imports this module

    backend = make_backend(cfg, cfg.backbone_config())  # None: the detector's own selection (below)
    info = backend.info if backend is not None else detector_backbone(cfg)
    np_dtype = np.float16 if cfg.dtype == "float16" else np.float32
    prefix = "part" if cfg.num_shards == 1 else f"part-r{cfg.shard:03d}of{cfg.num_shards:03d}"
    writer = FeatureStoreWriter(cfg.out, num_boxes=info.num_boxes, feature_dim=info.feature_dim, dtype=cfg.dtype,
                                prefix=prefix, rows_per_shard=cfg.rows_per_shard, backbone=info.manifest())
    by_id = {p.stem: p for p in paths}
    candidates = deque(p.stem for p in paths if p.stem not in writer)
    total = len(candidates)
    summary: dict = {"folder_images": len(every), "images": len(paths), "extracted": 0, "failed": 0, "engine": None}
    attempted: set[str] = set()
    failures: list[dict] = []
    merged = (0, 0)  # (failures, images written) when failures.jsonl was last rewritten
    finishing = None  # the batch being selected on the worker (a Future of its records)
    detected = 0  # images through the detector (the rate: selection and writing trail it by a batch at most)
    if on_progress is not None:
        on_progress(0, total, 0.0)
    t0 = time.perf_counter()

    def fail(path: Path, reason: str) -> None:
        failures.append({"image": str(path), "img_id": path.stem, "reason": reason})
        summary["failed"] += 1

    try:
        if candidates and backend is not None:
            writer.metadata = backend.load(on_weights, on_engine, on_download)
            writer.backbone = backend.info.manifest()  # now with its weights and their sha256
            summary["engine"] = "timm" if backend.info.name == "timm" else "torch"
            t0 = time.perf_counter()
        elif candidates:
            engine = choose_engine(cfg.engine)
            (on_engine or _logger.info)(engine.summary())
            summary["engine"] = engine.name
            model, meta = build_detector(cfg, on_weights, engine, on_download)
            writer.metadata = {
                "mode": cfg.mode, "num_boxes": cfg.num_boxes, "device": str(device),
                "bf16": cfg.bf16, "tf32": False,  # fp32 is IEEE fp32 on GPUs too (ieee_fp32)
                "scale_rule": f"short side {det.min_size}, long side <= {det.max_size} (Caffe, cv2 float resize)",
                "nms": "per-class 0.3, Caffe cpu_nms (+1, >=)" if cfg.mode == "lxmert" else "class-agnostic maxnms",
                "images": str(Path(cfg.images).resolve()), **meta,
            }
            writer.backbone = replace(info, weights=meta["weights"], weights_sha256=None if meta["random_weights"]
                                      else meta["weights_sha256"]).manifest()
            t0 = time.perf_counter()  # the rate counts extraction, not loading the weights

        def decode(ids: list[str]) -> list[tuple[Path, tuple | str]]:
            """(path, (blob, scale, (h, w)) or the reason it failed) per image; cv2 and numpy release the GIL."""
            out: list[tuple[Path, tuple | str]] = []
            for path in (by_id[i] for i in ids):
                try:
                    if backend is not None:
                        out.append((path, backend.prepare(path, cfg.max_pixels)))
                        continue
                    img = load_bgr(path, max_pixels=cfg.max_pixels)
                    blob, scale = caffe_blob(img, det.pixel_mean_bgr, det.min_size, det.max_size)
                    out.append((path, (blob, scale, img.shape[:2])))
                except (ImageError, cv2.error) as exc:  # out of memory included (an ImageError): one image's failure
                    out.append((path, str(exc)))
            return out

        def claim_and_decode():
            """The next batch: claimed here (the writer is not thread-safe), decoded ahead in the loader thread."""
            ids = writer.claim(candidates, cfg.batch_size) if candidates else []
            if not ids:
                return None
            attempted.update(ids)
            return len(ids), loader.submit(decode, ids) if loader is not None else _Done(decode(ids))

        def finish(batch: list[tuple[str, DetectorOutput]]) -> list[ImageFeatures]:
            """Choose the boxes of a detected batch and build its records (on the selection worker when it overlaps)."""
            outs = [out for _, out in batch]
            return image_records([i for i, _ in batch], outs, select_boxes(outs, cfg.mode, cfg.num_boxes), np_dtype)

        def store(records) -> None:
            for rec in records.result():
                writer.add(rec)
                summary["extracted"] += 1

        loader = ThreadPoolExecutor(1, thread_name_prefix="lxm-decode") if cfg.prefetch and candidates else None
        selector = (ThreadPoolExecutor(1, thread_name_prefix="lxm-select")
                    if overlaps_selection(cfg, device) and candidates and backend is None else None)
        try:
            pending = claim_and_decode()
            while pending is not None:
                decoded = pending[1].result()
                pending = claim_and_decode()  # decodes while the detector runs on `decoded`
                # handled before this batch: all taken from `candidates` but this batch and the one decoded ahead
                before = total - len(candidates) - len(decoded) - (pending[0] if pending is not None else 0)
                batch: list[tuple[str, DetectorOutput]] = []
                if backend is not None:  # grid / timm / given boxes: the backend takes the batch (backends.py)
                    for k, (path, rec) in enumerate(backend.run(decoded, np_dtype)):
                        if isinstance(rec, str):
                            fail(path, rec)
                        else:
                            writer.add(rec)
                            summary["extracted"] += 1
                        if on_progress is not None:
                            on_progress(before + k + 1, total, summary["extracted"] / (time.perf_counter() - t0))
                    decoded = []  # nothing left for the detector loop below
                for k, (path, item) in enumerate(decoded):
                    if isinstance(item, str):
                        fail(path, item)
                    elif (out := detect(model, [item], device, cfg.bf16)[0]).proposals.shape[0] < cfg.num_boxes:
                        fail(path, f"only {out.proposals.shape[0]} proposals, fewer than {cfg.num_boxes} boxes")
                    else:
                        batch.append((path.stem, out))
                        detected += 1
                    if on_progress is not None:  # per image: the full detector takes seconds for each
                        on_progress(before + k + 1, total, detected / (time.perf_counter() - t0))
                if finishing is not None:  # the previous batch, selected while this one was detected
                    done, finishing = finishing, None
                    store(done)
                if batch and selector is not None:
                    finishing = selector.submit(finish, batch)
                elif batch:
                    store(_Done(finish(batch)))
                if len(failures) > merged[0] and writer.written > merged[1]:  # visible during a long run, per shard
                    writer.update_failures(attempted, failures)
                    merged = (len(failures), writer.written)
            if finishing is not None:
                done, finishing = finishing, None
                store(done)
        finally:
            for pool in (loader, selector):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
        failures_path = writer.update_failures(attempted, failures)
    except BaseException:
        if finishing is not None and not finishing.cancelled() and finishing.exception() is None:
            store(finishing)  # a batch selected before the stop is kept
        writer.close(finalize=False)
        raise
    manifest = writer.close(finalize=bool(writer.done))
    summary["left_to_others"] = sum(1 for i in candidates if i not in writer.done)
    summary["already_done"] = len(paths) - summary["extracted"] - summary["failed"] - summary["left_to_others"]
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["store_images"] = manifest["num_images"] if manifest else 0
    summary["failures_file"] = str(failures_path)
    return summary


def shard_from_env() -> tuple[int, int]:
    """torchrun's RANK / WORLD_SIZE as (shard, num_shards); (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
