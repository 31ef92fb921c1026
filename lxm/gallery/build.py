"""`lxm gallery` end to end: a finetuning run and a labelled split -> OUT/index.html + OUT/assets/.

The run's best model predicts the split as `lxm predict` does (`load_run`, the run's corpus / features / vocab
unless overridden, `lxm.infer.explain.predict_explained`: the batches of `predict_top`, its first prediction is
`predict`'s, with the box weights of every example: relevance for its predicted answer, or the last cross layer's
[CLS] -> boxes attention, `GalleryConfig.explain_method`); `records` turns that into typed records and the summary,
`assets` draws each shown example's strongest boxes, `page` writes the page.

OUT is an lxm gallery folder: index.html, assets/, and two hidden files of its own: `.lock` (held with `flock` while
a gallery is written, so a second `lxm gallery` into the same OUT fails at once, naming it) and `.lxm-gallery.json`
(the files the gallery wrote). A new gallery replaces only those files: anything else a user keeps in OUT (notes, a
data/ folder) stays. A folder that is not empty and holds no gallery is refused, untouched. Each file is written
under a temporary name and renamed into place, the page after its pictures, and the previous gallery's pictures
are removed only after the new page is in place, so a crash at any moment leaves a complete page (the old one or
the new one) and the manifest always covers every file a gallery wrote.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from lxm.atomic import atomic_path
from lxm.errors import ConfigError, LxmError
from lxm.extract.images import ImageError
from lxm.extract.draw import detector_classes, fit_names, read_names
from lxm.gallery import page
from lxm.gallery import records as gallery_records
from lxm.gallery.assets import NOTES, asset_name, draw_asset, index_images, load_asset
from lxm.gallery.page import GENERATOR, ImageView
from lxm.gallery.records import GalleryError, GalleryRecord, Summary

_logger = logging.getLogger(__name__)

ASSETS = "assets"
PAGE = "index.html"
LOCK = ".lock"  # flock'ed while a gallery is written into the folder; kept, never deleted
MANIFEST = ".lxm-gallery.json"  # {"generator": "lxm gallery", "files": [paths relative to OUT]}: what may be replaced
# the names a gallery writes (its page, its pictures) and the temporary names `lxm.atomic` gives them
_OWN_FILE = re.compile(rf"{re.escape(PAGE)}|{ASSETS}/[A-Za-z0-9][A-Za-z0-9._-]*\.jpg")
_OWN_TMP = {"": re.compile(r"\.(index\.html|\.lxm-gallery\.json)\.tmp-[0-9]+"),
            ASSETS: re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._-]*\.jpg\.tmp-[0-9]+")}


@dataclass
class GalleryConfig:
    split: str  # corpus table to show, e.g. "minival" (must be labelled)
    images: list[str]  # folders searched recursively for the images (img_id = file stem, as lxm extract)
    limit: int | None = 200  # examples shown: the first N (after --only-wrong) in dataset order; None = all
    only_wrong: bool = False  # show only the examples the model gets wrong (score 0)
    boxes: int = 5  # boxes drawn per image of an example: the largest weights (GalleryRecord.attention)
    explain_method: str = "relevance"  # the boxes' weights: "relevance" (for the predicted answer) or "attention"
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
    failed: dict[str, str] = field(default_factory=dict)  # img_id -> why it could not be drawn (one line)
    cards: int = 0  # cards on the page: one per image (NLVR2: per image pair)


def _is_gallery_page(index: Path) -> bool:
    try:
        with open(index, encoding="utf-8", errors="replace") as f:
            return f'name="generator" content="{GENERATOR}"' in f.read(4000)
    except OSError:
        return False


def gallery_files(out: Path) -> list[str] | None:
    """The files an earlier gallery wrote into `out` (relative paths: index.html, assets/NAME.jpg), from its
    manifest, or from its page's pictures for a gallery written before manifests; None when `out` holds no
    gallery. Only names a gallery writes are returned, whatever a damaged manifest says."""
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            files = data["files"] if data.get("generator") == GENERATOR else None
        except (ValueError, TypeError, KeyError, AttributeError, OSError):
            files = None
        if isinstance(files, list):
            return [f for f in files if isinstance(f, str) and _OWN_FILE.fullmatch(f)]
    if not _is_gallery_page(out / PAGE):
        return None
    html = (out / PAGE).read_text(encoding="utf-8", errors="replace")
    return [PAGE, *dict.fromkeys(f for f in re.findall(r'src="([^"]+)"', html) if _OWN_FILE.fullmatch(f))]


def check_out(out: Path) -> None:
    """OUT may be written: absent, an empty folder, or a folder holding an earlier gallery (whose files are
    replaced; the folder's other files are kept). Anything else is refused before anything is written."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GalleryError(f"{out}: exists and is not a folder; choose another --out")
    if not any(p.name not in (LOCK, MANIFEST) for p in out.iterdir()):
        return
    if gallery_files(out) is None:
        raise GalleryError(f"{out}: not empty and holds no lxm gallery (nothing in it was changed); choose an empty "
                           f"or new folder for --out")


@contextlib.contextmanager
def locked_out(out: Path) -> Iterator[None]:
    """Hold OUT/.lock (creating OUT if needed) for the block; another holder -> GalleryError at once, naming OUT.
    A folder this call created is removed again when the block fails before writing into it."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GalleryError(f"{out}: cannot create the folder ({exc.strerror}); choose another --out") from None
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    failed = True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise GalleryError(f"{out}: another lxm gallery is writing into this folder (it holds {out / LOCK}); "
                               f"wait for it to finish or choose another --out") from None
        yield
        failed = False
    finally:
        os.close(fd)  # releases the flock
        if failed and created and not any(p.name != LOCK for p in out.iterdir()):
            (out / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()


def _write_manifest(out: Path, files: list[str]) -> None:
    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"generator": GENERATOR, "files": files}, indent=1) + "\n", encoding="utf-8")


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a gallery killed while writing into `out` (under the lock no other gallery runs here);
    only the exact names a gallery gives them."""
    for sub, pattern in _OWN_TMP.items():
        folder = out / sub
        if folder.is_dir():
            for p in folder.iterdir():
                if pattern.fullmatch(p.name) and p.is_file():
                    p.unlink(missing_ok=True)


@dataclass
class GalleryData:
    """A split as the gallery sees it: every example's record and the split's summary."""

    task: Any  # the run's FinetuneTask
    dataset: Any  # the FinetuneDataset predicted (its records give the boxes drawn)
    records: list[GalleryRecord]  # one per example, dataset order
    summary: Summary


def load_records(run: str | os.PathLike, cfg: GalleryConfig, log: Callable[[str], None] | None = None
                 ) -> GalleryData:
    """Predict `cfg.split` with the run's best model (as `lxm predict`, its attentions with it) and build its records
    and summary."""
    from lxm.devices import resolve_device
    from lxm.infer.explain import predict_explained
    from lxm.infer.runs import load_run
    from lxm.train.finetune_data import FinetuneDataset

    log = log or _logger.info
    run_cfg, task, model = load_run(run)
    if cfg.questions and not task.structural_types:
        raise ConfigError(f"--questions gives GQA's structural types; {run} is a {task.name} run")
    data = FinetuneDataset(task, cfg.corpus or run_cfg.corpus, [cfg.split], cfg.features or run_cfg.features,
                           run_cfg.vocab, max_length=run_cfg.max_length)
    if not data.labelled:
        raise GalleryError(f"{task.name} split {cfg.split!r} has no labels (a test split?); the gallery shows right "
                           f"and wrong, it needs a labelled split")
    structural = gallery_records.read_structural_types(cfg.questions, data.ids) if cfg.questions else None
    log(f"{task.name} {cfg.split}: predicting {len(data)} examples ({data.dropped} without features dropped)")
    dev = resolve_device(cfg.device)
    model.to(dev)
    found = predict_explained(task, model, data, cfg.top_k, batch_size=cfg.batch_size or run_cfg.eval_batch_size,
                              device=dev, precision=run_cfg.runtime.precision, method=cfg.explain_method)
    top = {i: best for i, (best, _, _) in found.items()}
    attention = {i: weights for i, (_, weights, _) in found.items()}
    words = {i: shares for i, (_, _, shares) in found.items() if shares is not None}
    notes = []
    if task.structural_types and structural is None:
        notes.append("No accuracy per structural type: pass --questions with the split's GQA questions JSON "
                     "(e.g. testdev_balanced_questions.json).")
    types = gallery_records.example_types(task, data.info, len(data), structural)
    records = gallery_records.build_records(task, data.ids, data.texts, data.images, data.targets, top, types,
                                            attention, words)
    return GalleryData(task, data, records, gallery_records.summarize(task, cfg.split, records, data.targets, notes))


def _failure(path: Path, exc: BaseException) -> str:
    """One line saying why image `path` could not be drawn."""
    if isinstance(exc, MemoryError):
        return f"{path}: not enough memory to decode the image"
    text = " ".join(str(exc).split())
    if isinstance(exc, cv2.error):
        return f"{path}: OpenCV could not decode or draw the image ({text[-200:]})"
    return text if str(path) in text else f"{path}: {text}"


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
    with locked_out(out):
        check_out(out)  # again under the lock: what a gallery finished meanwhile wrote may be replaced
        return _write_gallery(run, out, cfg, where, objects, attributes, log, on_progress)


def _write_gallery(run: str | os.PathLike, out: Path, cfg: GalleryConfig, where: dict[str, Path],
                   objects: list[str] | None, attributes: list[str] | None, log: Callable[[str], None] | None,
                   on_progress: Callable[[int, int], None] | None) -> GalleryResult:
    loaded = load_records(run, cfg, log)
    task, data, records, summary = loaded.task, loaded.dataset, loaded.records, loaded.summary
    # names of another detector's classes would label every box wrongly: ids instead, with a warning
    objects, attributes = fit_names(objects, attributes, detector_classes(data.stores[0].manifest),
                                    option="--vocab-dir", source=f"the features in {data.stores[0].root}",
                                    strict=False)
    shown = gallery_records.select(records, only_wrong=cfg.only_wrong, limit=cfg.limit)

    needed = list(dict.fromkeys(img for r in shown for img in r.images))
    missing = [img for img in needed if img not in where]
    if needed and len(missing) == len(needed):
        raise ImageError(f"--images {', '.join(map(str, cfg.images))}: none of the {len(needed)} images of the shown "
                         f"examples is there (e.g. {needed[0]!r}; the img_id is the file name without suffix)")

    old = gallery_files(out) or []
    _remove_stale_temporaries(out)
    todo = [img for img in needed if img in where]
    # each example's own picture of each of its images (its attention differs); an image is decoded once
    uses: dict[str, list[tuple[int, int]]] = {}  # img_id -> (shown example, position of the image in it)
    for n, r in enumerate(shown):
        for k, img in enumerate(r.images):
            if img in where:
                uses.setdefault(img, []).append((n, k))
    names = {(n, k): asset_name(shown[n].id, k, len(shown[n].images)) for img in todo for n, k in uses[img]}
    # first the manifest of everything this run may write, so a crash leaves no file it does not list
    _write_manifest(out, list(dict.fromkeys([*old, PAGE, *(f"{ASSETS}/{name}" for name in names.values())])))
    (out / ASSETS).mkdir(exist_ok=True)
    views: list[list[ImageView | None]] = [[None] * len(r.images) for r in shown]
    failed: dict[str, str] = {}
    done = 0
    if on_progress:
        on_progress(0, len(names))
    for img in todo:
        try:
            bgr, rec = load_asset(where[img], data.record(img))
        except (LxmError, cv2.error, MemoryError) as exc:  # one image's failure: said on its cards and at the end
            failed[img] = _failure(where[img], exc)
        for n, k in uses[img]:
            if img not in failed:
                try:
                    with atomic_path(out / ASSETS / names[n, k]) as tmp:
                        labels = draw_asset(bgr, rec, shown[n].attention[k], tmp, objects=objects,
                                            attributes=attributes, boxes=cfg.boxes)
                    views[n][k] = ImageView(img, f"{ASSETS}/{names[n, k]}", labels=tuple(x.text for x in labels))
                except (LxmError, cv2.error, MemoryError) as exc:  # its later pictures are not tried
                    failed[img] = _failure(where[img], exc)
            if img in failed:
                views[n][k] = ImageView(img, None, f"image not drawn: {failed[img]}")
            done += 1
            if on_progress:
                on_progress(done, len(names))
    shown_views = [[v or ImageView(img, None, "image not found") for v, img in zip(vs, r.images)]
                   for vs, r in zip(views, shown)]

    which = "wrong examples" if cfg.only_wrong else "examples"
    cards = len(page.group_by_image(shown))
    lines = [f"run {run}, {task.name} {cfg.split}: {len(records)} examples ({data.dropped} without features "
             f"dropped); shown: the first {len(shown)} {which} in dataset order"
             + (f" (--limit {cfg.limit})" if cfg.limit is not None else "")
             + f", on {cards} cards (one per image{' pair' if len(task.image_columns) > 1 else ''}).",
             NOTES[cfg.explain_method],
             "The summary scores all examples of the split; the filters act on those shown. Right = score 100, "
             + ("partly right = 0 < score < 100 (soft credit: an answer only some annotators gave), "
                if summary.partial_credit else "")
             + "wrong = score 0; each prediction's score is what it would have earned."]
    warnings = []
    examples_missing = sum(any(img in missing for img in r.images) for r in shown)
    if examples_missing:
        warnings.append(f"{examples_missing} of the {len(shown)} shown examples have an image not found under "
                        f"--images (shown with a note).")
    if failed:
        warnings.append(f"{len(failed)} images could not be drawn (shown with the reason).")
    title = f"lxm gallery: {task.name} {cfg.split}"
    html = page.render_page(summary, shown, shown_views, title=title, lines=lines, warnings=warnings)
    with atomic_path(out / PAGE) as tmp:
        tmp.write_text(html, encoding="utf-8")
    new = [PAGE, *(v.src for vs in shown_views for v in vs if v.src is not None)]
    _write_manifest(out, new)
    for name in old:  # the previous gallery's pictures this one does not show: only now, its page is replaced
        if name not in new:
            (out / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only when empty
        (out / ASSETS).rmdir()
    return GalleryResult(out / PAGE, summary, len(shown), sum(r.wrong for r in shown), missing, examples_missing,
                         failed, cards)
