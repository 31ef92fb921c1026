"""`lxm extract`: a folder of images -> a feature store, with the VG Faster R-CNN or another visual backend (thin
wrapper over `lxm.extract.pipeline` and `lxm.extract.backends`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from lxm.cli.common import (USER_ERRORS, DetectorPreset, Engine, FeatureDtype, SelectMode, err, fail,
                            keep_freed_memory_on_cpu, parse_timm_args, progress)
from lxm.errors import ConfigError


def extract_cmd(
    images: Path = typer.Option(..., "--images", exists=True, file_okay=False,
                                help="Folder of images (jpg/png/...); img_id = file name without suffix."),
    out: Path = typer.Option(..., "--out", help="Feature store directory (created, or resumed if it exists)."),
    weights: str = typer.Option(None, "--weights", help="Detector weights (butd and grid; required there): "
                                                        "faster_rcnn_from_caffe_attr.pkl or pytorch_model.bin path, "
                                                       "an http(s) URL, a Hub id (unc-nlp/frcnn-vg-finetuned), or "
                                                       "'random' (seeded random weights: meaningless features)."),
    engine: Engine = typer.Option(Engine.auto, help="auto: detectron2 if it imports, else torch (said in the output "
                                                    "and the manifest); torch: plain torch + torchvision; "
                                                    "detectron2: the same network in detectron2 (not on PyPI: "
                                                    "installed from its repository, or the Docker image)."),
    mode: SelectMode = typer.Option(SelectMode.lxmert, help="lxmert: the released TSVs' rule (per-class NMS 0.3 on "
                                                            "proposals, score >= 0.2, exactly N); maxnms: airsplay's "
                                                            "detectron2 demo rule."),
    boxes: int = typer.Option(None, "--boxes", min=1, help="Boxes the detector selects per image (default 36; "
                                                           "butd only: grid and timm: have fixed cells, "
                                                           "--boxes-file its own counts)."),
    backbone: str = typer.Option("butd", "--backbone", help="Visual backend: butd (the detector's selected regions, "
                                 "with labels), grid (the detector's res5 over the whole image, average-pooled to "
                                 "--grid x --grid cells, no labels), or timm:MODEL (a timm model's patch tokens or last "
                                 "feature map, e.g. timm:vit_base_patch16_clip_224.openai; no labels). Recorded in "
                                 "the manifest."),
    backbone_weights: str = typer.Option(None, "--backbone-weights", help="timm: a state_dict file (.pth / "
                                         ".safetensors), a Hub id (timm/vit_base_patch16_224.augreg_in21k), or "
                                         "'random' (meaningless features, for tests); default: the model name's own "
                                         "Hub weights. grid and butd use --weights."),
    grid: int = typer.Option(8, "--grid", min=1, help="grid: cells per side (8: 64 cells)."),
    boxes_file: Path = typer.Option(None, "--boxes-file", exists=True, dir_okay=False,
                                    help="butd: JSONL lines {\"img_id\": ..., \"boxes\": [[x1, y1, x2, y2], ...]} "
                                         "in original-image pixels; the detector pools and classifies exactly these "
                                         "boxes, in order (no NMS, no selection). Images without a line are "
                                         "failures (failures.jsonl)."),
    timm_arg: list[str] = typer.Option(None, "--timm-arg", help="timm: KEY=VALUE passed to timm.create_model "
                                       "(VALUE read as JSON, else a string), repeatable; e.g. --timm-arg depth=2 for "
                                       "a tiny test model. Recorded in the manifest."),
    device: str = typer.Option("cpu", help="cpu, auto (this process's GPU if CUDA is available, else the CPU), "
                                           "cuda or cuda:N (an error if CUDA is absent; under torchrun, cuda is "
                                           "cuda:LOCAL_RANK)."),
    dtype: FeatureDtype = typer.Option(FeatureDtype.float16, help="Stored feature precision."),
    batch_size: int = typer.Option(4, min=1, help="Images claimed and decoded ahead per step; the detector takes "
                                                  "them one at a time, so results do not depend on it."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 network (frozen BN folded into bf16 convolutions, "
                              "autocast): on CPU ~4.3x faster with AMX, 2.2-2.7x with AVX512-BF16 (GPU: not measured); "
                              "features drift slightly (cosine ~0.99), so keep it off to match the released features."),
    prefetch: bool = typer.Option(True, "--prefetch/--no-prefetch",
                                  help="Decode and preprocess the next batch in a thread while the detector runs."),
    overlap: bool = typer.Option(None, "--overlap/--no-overlap", show_default=False,
                                 help="Choose the boxes of a batch in a thread while the detector runs the next one "
                                      "(default: on for CUDA, off on CPU, where both would share the cores). The "
                                      "stored rows are the same either way."),
    detector: DetectorPreset = typer.Option(DetectorPreset.vg_r101, help="Network: the BUTD ResNet-101 detector, or "
                                                                         "'tiny' for smoke tests."),
    shard: str = typer.Option(None, "--shard", help="i/n: process the i-th of n disjoint parts of the sorted image "
                                                    "list (default: torchrun's RANK/WORLD_SIZE, else 0/1)."),
    seed: int = typer.Option(0, help="Seed for --weights random."),
    rows_per_shard: int = typer.Option(1024, min=1, help="Images per Arrow shard (a crash loses at most one shard)."),
    max_pixels: int = typer.Option(None, "--max-pixels", min=1,
                                   help="Refuse (as a failure in failures.jsonl) images with more pixels than this, "
                                        "from their header, before decoding (default: $LXM_MAX_IMAGE_PIXELS, else "
                                        "100000000; decoding costs ~14 bytes per pixel). Files over "
                                        "$LXM_MAX_IMAGE_BYTES (default 1 GiB) are not read."),
) -> None:
    """Extract 36-box Visual Genome Faster R-CNN region features (or another --backbone's) from a folder of images
    into a feature store.

    Images are found in the folder and its subfolders. Re-running the same command skips images already stored;
    images that cannot be used are listed in failures.jsonl with the reason (one record per image). Several runs
    may write one --out at once (e.g. one per GPU, with or without --shard): they split the work. The exit code is
    non-zero if the folder holds no image, or none of them could be used.

    Example: lxm extract --images coco/train2014 --out features/train2014 --weights faster_rcnn_from_caffe_attr.pkl

    Example: lxm extract --images coco/val2014 --out features/val2014-vit --backbone timm:vit_base_patch16_clip_224.openai
    """
    from lxm.extract.images import ImageError
    from lxm.extract.pipeline import ExtractConfig, extract, shard_from_env

    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            fail(ConfigError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}"))
    else:
        i, n = shard_from_env()
    if boxes is not None and (backbone != "butd" or boxes_file is not None):
        fail(ConfigError(f"--boxes counts the detector's selected regions; --backbone {backbone}"
                         f"{' --boxes-file' if boxes_file is not None else ''} fixes the boxes itself"))
    if weights is None and not backbone.startswith("timm:"):
        fail(ConfigError(f"--weights is required with --backbone {backbone} (the detector's weights, or 'random')"))
    if weights is not None and backbone.startswith("timm:"):
        fail(ConfigError("--weights names the detector's weights; a timm: backbone takes --backbone-weights"))
    try:
        timm_args = parse_timm_args(timm_arg)
    except ConfigError as exc:
        fail(exc)
    # --weights random is announced once, by the weights loader's logged warning (it also lands in the manifest)
    cfg = ExtractConfig(images=str(images), out=str(out), weights=weights or "", engine=engine.value,
                        detector=detector.value, mode=mode.value,
                        num_boxes=36 if boxes is None else boxes, device=device, dtype=dtype.value,
                        batch_size=batch_size, bf16=bf16, prefetch=prefetch, overlap=overlap, seed=seed, shard=i,
                        num_shards=n, rows_per_shard=rows_per_shard, max_pixels=max_pixels, backbone=backbone,
                        backbone_weights=backbone_weights, grid=grid,
                        boxes_file=None if boxes_file is None else str(boxes_file), timm_args=timm_args or None)
    try:
        keep_freed_memory_on_cpu(cfg.keep_freed_memory, cfg.device, "--device")
        with progress("images") as bar:
            tasks: list = []  # the bar appears with its total, once the images are listed (not before an error)

            def show_progress(done: int, total: int, per_s: float) -> None:
                if not tasks:
                    tasks.append(bar.add_task("", total=total))
                bar.update(tasks[0], completed=done, total=total,
                           description=f"extract {images.name} {per_s:.1f} img/s")

            downloads: list = []

            def show_download(done: int, total: int) -> None:  # URL weights; the bar counts MiB
                if not downloads:
                    downloads.append(bar.add_task(f"download {weights.split('?')[0].rsplit('/', 1)[-1]} (MiB)",
                                                  total=total / 2**20 if total else None))
                bar.update(downloads[0], completed=done / 2**20)

            summary = extract(cfg, on_progress=show_progress, on_weights=lambda line: err.print(line, highlight=False),
                              on_engine=lambda line: err.print(line, highlight=False), on_download=show_download)
    except USER_ERRORS as exc:
        fail(exc)
    s = summary
    if s["images"] == 0:
        err.print(f"shard {i}/{n} holds none of the {s['folder_images']} images in {images}: nothing to do",
                  highlight=False)
        return
    if s["already_done"] == s["images"]:
        err.print(f"all {s['images']} images are already in the store ({s['store_images']} images in {out})",
                  highlight=False)
        return
    others = f", {s['left_to_others']} left to another run writing this store" if s["left_to_others"] else ""
    err.print(f"extracted {s['extracted']} images, {s['already_done']} already done, {s['failed']} failed (see "
              f"{s['failures_file']}){others}; store holds {s['store_images']} images; {s['seconds']} s",
              highlight=False)
    if s["extracted"] + s["already_done"] + s["left_to_others"] == 0:
        fail(ImageError(f"{images}: none of its {s['images']} images could be used; the reasons are in "
                        f"{s['failures_file']}"))
