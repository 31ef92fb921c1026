"""`lxm gallery` end to end: a finetuning run and a labelled split -> OUT/index.html + OUT/assets/.

The run's best model predicts the split as `lxm predict` does (`load_run`, the run's corpus / features / vocab
unless overridden, `predict_top`: its first prediction is `predict`'s); `records` turns that into typed records and
the summary, `assets` draws the shown images, `page` writes the page. The folder is built under a temporary name
beside OUT and renamed into place at the end, so a crash never leaves a half page and a second run into OUT
replaces the first (only a folder that is empty or holds an earlier gallery is replaced).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxm.errors import ConfigError
from lxm.extract.images import ImageError
from lxm.gallery import records as gallery_records
from lxm.gallery.assets import asset_name, draw_asset, index_images, read_names
from lxm.gallery.page import GENERATOR, ImageView, render_page
from lxm.gallery.records import GalleryError, GalleryRecord, Summary

_logger = logging.getLogger(__name__)

ASSETS = "assets"
PAGE = "index.html"


@dataclass
class GalleryConfig:
    split: str  # corpus table to show, e.g. "minival" (must be labelled)
    images: list[str]  # folders searched recursively for the images (img_id = file stem, as lxm extract)
    limit: int | None = 200  # examples shown: the first N (after --only-wrong) in dataset order; None = all
    only_wrong: bool = False  # show only the examples the model gets wrong (score 0)
    boxes: int = 5  # boxes drawn per image, most confident object first
    top_k: int = 5  # predictions listed per example
    vocab_dir: str | None = None  # folder with objects_vocab.txt / attributes_vocab.txt; None = labels are ids
    questions: str | None = None  # GQA only: the split's questions JSON, for the per structural type table
    corpus: str | None = None  # None = the run's
    features: list[str] | None = None  # feature stores; None = the run's
    batch_size: int | None = None  # None = the run's eval_batch_size
    device: str = "auto"  # auto / cuda / cpu


@dataclass
class GalleryResult:
    page: Path  # OUT/index.html
    summary: Summary  # over the whole split
    shown: int
    shown_wrong: int
    missing: list[str] = field(default_factory=list)  # img_ids of shown examples not found under --images
    missing_examples: int = 0  # shown examples with an image not found
    failed: dict[str, str] = field(default_factory=dict)  # img_id -> why it could not be drawn


def check_out(out: Path) -> None:
    """OUT may be replaced: absent, an empty folder, or an earlier gallery (its index.html says so)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GalleryError(f"{out}: exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    index = out / PAGE
    if index.is_file() and f'name="generator" content="{GENERATOR}"' in index.read_text(errors="replace")[:4000]:
        return
    raise GalleryError(f"{out}: exists and is not an lxm gallery (it would be replaced); choose another --out")


def _install(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    if old.exists():
        shutil.rmtree(old)


@dataclass
class GalleryData:
    """A split as the gallery sees it: every example's record and the split's summary."""

    task: Any  # the run's FinetuneTask
    dataset: Any  # the FinetuneDataset predicted (its records give the boxes drawn)
    records: list[GalleryRecord]  # one per example, dataset order
    summary: Summary


def load_records(run: str | os.PathLike, cfg: GalleryConfig, log: Callable[[str], None] | None = None
                 ) -> GalleryData:
    """Predict `cfg.split` with the run's best model (as `lxm predict`) and build its records and summary."""
    from lxm.train.finetune import load_run, pick_inference_device, predict_top
    from lxm.train.finetune_data import FinetuneDataset

    log = log or _logger.info
    run_cfg, task, model = load_run(run)
    if cfg.questions and task.name != "gqa":
        raise ConfigError(f"--questions gives GQA's structural types; {run} is a {task.name} run")
    data = FinetuneDataset(task, cfg.corpus or run_cfg.corpus, [cfg.split], cfg.features or run_cfg.features,
                           run_cfg.vocab, max_length=run_cfg.max_length)
    if not data.labelled:
        raise GalleryError(f"{task.name} split {cfg.split!r} has no labels (a test split?); the gallery shows right "
                           f"and wrong, it needs a labelled split")
    structural = gallery_records.read_structural_types(cfg.questions, data.ids) if cfg.questions else None
    log(f"{task.name} {cfg.split}: predicting {len(data)} examples ({data.dropped} without features dropped)")
    dev = pick_inference_device(cfg.device)
    model.to(dev)
    top = predict_top(task, model, data, cfg.top_k, batch_size=cfg.batch_size or run_cfg.eval_batch_size,
                      device=dev, precision=run_cfg.precision)
    notes = []
    if task.name == "gqa" and structural is None:
        notes.append("No accuracy per structural type: pass --questions with the split's GQA questions JSON "
                     "(e.g. testdev_balanced_questions.json).")
    types = gallery_records.example_types(task, data.info, len(data), structural)
    records = gallery_records.build_records(task, data.ids, data.texts, data.images, data.targets, top, types)
    return GalleryData(task, data, records, gallery_records.summarize(task, cfg.split, records, data.targets, notes))


def make_gallery(run: str | os.PathLike, out: str | os.PathLike, cfg: GalleryConfig, *,
                 log: Callable[[str], None] | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> GalleryResult:
    """Write the gallery of `cfg.split` of finetuning run `run` into folder `out`.

    `log` receives messages (default: logged); `on_progress(done, total)` follows the drawing of the images."""
    out = Path(out)
    check_out(out)
    if cfg.boxes < 1 or cfg.top_k < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise ConfigError("--boxes, --limit and the number of predictions must be at least 1")
    where = index_images(cfg.images)
    if not where:
        raise ImageError(f"--images {', '.join(map(str, cfg.images))}: no image files found")
    objects, attributes = read_names(cfg.vocab_dir)
    loaded = load_records(run, cfg, log)
    task, data, records, summary = loaded.task, loaded.dataset, loaded.records, loaded.summary
    shown = gallery_records.select(records, only_wrong=cfg.only_wrong, limit=cfg.limit)

    needed = list(dict.fromkeys(img for r in shown for img in r.images))
    missing = [img for img in needed if img not in where]
    if needed and len(missing) == len(needed):
        raise ImageError(f"--images {', '.join(map(str, cfg.images))}: none of the {len(needed)} images of the shown "
                         f"examples is there (e.g. {needed[0]!r}; the img_id is the file name without suffix)")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / ASSETS).mkdir(parents=True)
    try:
        drawn: dict[str, ImageView] = {}
        failed: dict[str, str] = {}
        todo = [img for img in needed if img in where]
        if on_progress:
            on_progress(0, len(todo))
        for n, img in enumerate(todo):
            name = asset_name(img)
            try:
                draw_asset(where[img], data.record(img), tmp / ASSETS / name, objects=objects,
                           attributes=attributes, boxes=cfg.boxes)
                drawn[img] = ImageView(img, f"{ASSETS}/{name}")
            except ImageError as exc:
                failed[img] = str(exc)
                drawn[img] = ImageView(img, None, f"image not drawn: {exc}")
            if on_progress:
                on_progress(n + 1, len(todo))
        views = [[drawn.get(img) or ImageView(img, None, "image not found") for img in r.images] for r in shown]

        which = "wrong examples" if cfg.only_wrong else "examples"
        lines = [f"run {run}, {task.name} {cfg.split}: {len(records)} examples ({data.dropped} without features "
                 f"dropped); shown: the first {len(shown)} {which} in dataset order"
                 + (f" (--limit {cfg.limit})" if cfg.limit is not None else "") + ".",
                 "The summary scores all examples of the split; the filters act on those shown."]
        warnings = []
        examples_missing = sum(any(img in missing for img in r.images) for r in shown)
        if examples_missing:
            warnings.append(f"{examples_missing} of the {len(shown)} shown examples have an image not found under "
                            f"--images (shown with a note).")
        if failed:
            warnings.append(f"{len(failed)} images could not be drawn (shown with the reason).")
        title = f"lxm gallery: {task.name} {cfg.split}"
        html = render_page(summary, shown, views, title=title, lines=lines, warnings=warnings)
        (tmp / PAGE).write_text(html, encoding="utf-8")
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return GalleryResult(out / PAGE, summary, len(shown), sum(not r.right for r in shown), missing,
                         examples_missing, failed)
