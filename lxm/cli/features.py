"""`lxm convert`, `lxm export`, `lxm inspect`, `lxm show`: feature stores in and out of other formats, looked at.

Thin wrappers over `lxm.features` (store, TSV, HDF5) and `lxm.extract.show`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lxm.cli.common import USER_ERRORS, FeatureDtype, advancing, err, fail, progress, warn
from lxm.errors import ConfigError

convert_app = typer.Typer(help="Import region features from other formats into an lxm feature store.",
                          no_args_is_help=True)
export_app = typer.Typer(help="Write an lxm feature store out in other formats.", no_args_is_help=True)


@convert_app.command("tsv")
def convert_tsv_cmd(
    src: Path = typer.Argument(..., exists=True, dir_okay=False, help="LXMERT feature TSV (e.g. train2014_obj36.tsv)."),
    dst: Path = typer.Argument(..., help="Feature store directory to create or resume."),
    dtype: FeatureDtype = typer.Option(FeatureDtype.float16, help="Stored feature precision; float32 keeps the TSV "
                                       "values exactly (lxm export tsv then reproduces the file byte for byte)."),
    rows_per_shard: int = typer.Option(1024, min=1, help="Images per Arrow shard."),
    max_boxes: int | None = typer.Option(None, "--max-boxes", min=1,
                                         help="The most boxes a row may hold (the store's N); rows of fewer are "
                                              "stored as they are. Default: the first row's count (a resume: the "
                                              "store's). Give it for TSVs of varying counts (an "
                                              "extraction that kept 10-100 boxes by confidence: 100)."),
) -> None:
    """Import an original 10-column base64 TSV into a memory-mapped feature store, streaming (constant memory).

    Rows may hold different box counts up to N (--max-boxes); each keeps its own. Re-running the same command after
    a crash skips the images already stored (without decoding them). Lines that cannot be used are listed in
    DST/failures.jsonl with file:line and the field; the other rows convert. The exit code is non-zero only if no
    line can be converted. Rows keep the TSV's order.

    Example: lxm convert tsv data/mscoco_imgfeat/train2014_obj36.tsv features/train2014
    Example: lxm convert tsv val2014_adaptive.tsv features/val2014-adaptive --max-boxes 100
    """
    from lxm.features.tsv import convert_tsv

    try:
        with progress() as bar:
            task = bar.add_task(f"convert {src.name}", total=src.stat().st_size)
            summary = convert_tsv(src, dst, dtype=dtype.value, rows_per_shard=rows_per_shard,
                                  on_bytes=lambda n: bar.update(task, completed=n), max_boxes=max_boxes)
    except USER_ERRORS as exc:
        fail(exc)
    err.print(f"stored {summary['stored']} images in {dst} ({summary['already_present']} already present); "
              f"manifest: {summary['manifest']}", highlight=False)
    if summary["failed"]:
        lines = "1 line" if summary["failed"] == 1 else f"{summary['failed']} lines"
        warn(f"{lines} could not be converted; see {summary['failures_file']}")


@export_app.command("tsv")
def export_tsv_cmd(
    src: Path = typer.Argument(..., help="Feature store directory."),
    dst: Path = typer.Argument(..., help="TSV file to write (written to a temporary name, renamed when complete)."),
    first_ids: Path | None = typer.Option(None, "--first-ids", exists=True, dir_okay=False,
                                          help="JSON list of img_ids (or LXMERT's mscoco_minival.json records) to "
                                               "write first, in that order; LXMERT reads minival as the first 5000 "
                                               "rows of val2014_obj36.tsv."),
) -> None:
    """Write a feature store as LXMERT's 10-column base64 TSV (for the original code).

    Each row holds its image's real boxes (num_boxes per row, as load_obj_tsv reads it): a --boxes-file store gives
    rows of different lengths, which the original's batching (equal counts per batch) cannot stack. A label-less
    store (grid, timm:) writes object/attribute ids -1 and confidences 0: the original finetuning reads only boxes
    and features, its pretraining's label losses cannot use them. Both are said on stderr.

    Example: lxm export tsv features/val2014 val2014_obj36.tsv --first-ids mscoco_minival.json
    """
    from lxm.features.store import FeatureStore, StoreError
    from lxm.features.tsv import write_tsv

    from lxm.features.backbone import store_backbone

    try:
        store = FeatureStore(src)
        info = store_backbone(store.manifest)
        if not info.labels:
            warn(f"{src}: backbone {info.name} has no labels: the TSV's object/attribute ids are -1 and their "
                 f"confidences 0 (LXMERT's finetuning reads only boxes and features; its pretraining needs labels)")
        if info.given_boxes:
            warn(f"{src}: given boxes: rows hold up to {info.num_boxes} boxes, each its own count (load_obj_tsv "
                 f"reads them; LXMERT's DataLoader stacks equal counts only)")
        order = store.ids()
        if first_ids is not None:
            head = _read_id_list(first_ids)
            missing = [i for i in head if i not in store]
            if missing:
                raise StoreError(f"{first_ids}: {len(missing)} of {len(head)} ids are not in {src} "
                                 f"(first: {', '.join(missing[:3])})")
            head_set = set(head)
            order = head + [i for i in order if i not in head_set]
        with progress("images") as bar:
            task = bar.add_task(f"export {dst.name}", total=len(order))
            count = write_tsv(advancing((store.get(i) for i in order), bar, task), dst)
    except USER_ERRORS as exc:
        fail(exc)
    err.print(f"wrote {count} rows to {dst}", highlight=False)


@convert_app.command("h5")
def convert_h5_cmd(
    src: Path = typer.Argument(..., exists=True, dir_okay=False, help="HDF5 file in lxm's layout (lxm export h5)."),
    dst: Path = typer.Argument(..., help="Feature store directory to create or resume."),
    dtype: FeatureDtype = typer.Option(None, help="Stored precision (default: the file's)."),
) -> None:
    """Import an HDF5 feature file (layout: see `lxm.features.h5`) into a feature store.

    Example: lxm convert h5 features.h5 features/train2014
    """
    from lxm.features.h5 import h5_backbone, h5_info, read_h5
    from lxm.features.store import FeatureStoreWriter

    try:
        count, n, d, file_dtype = h5_info(src)
        writer = FeatureStoreWriter(dst, num_boxes=n, feature_dim=d, dtype=(dtype.value if dtype else file_dtype),
                                    metadata={"source": "h5", "h5": str(src.resolve())}, backbone=h5_backbone(src))
        with writer, progress("images") as bar:
            task = bar.add_task(f"convert {src.name}", total=count)
            for rec in advancing(read_h5(src), bar, task):
                if rec.img_id not in writer:
                    writer.add(rec)
    except USER_ERRORS as exc:
        fail(exc)
    err.print(f"stored {writer.written} images in {dst}", highlight=False)


@export_app.command("h5")
def export_h5_cmd(
    src: Path = typer.Argument(..., help="Feature store directory."),
    dst: Path = typer.Argument(..., help="HDF5 file to write (renamed into place when complete)."),
) -> None:
    """Write a feature store as one HDF5 file (layout documented in `lxm.features.h5`), in index order.

    Example: lxm export h5 features/val2014 val2014_obj36.h5
    """
    from lxm.features.h5 import write_h5
    from lxm.features.store import FeatureStore

    try:
        store = FeatureStore(src)
        with progress("images") as bar:
            task = bar.add_task(f"export {dst.name}", total=len(store))
            count = write_h5(advancing(store, bar, task), dst, count=len(store), num_boxes=store.num_boxes,
                             feature_dim=store.feature_dim, dtype=store.dtype,
                             backbone=store.manifest.get("backbone"))
    except USER_ERRORS as exc:
        fail(exc)
    err.print(f"wrote {count} images to {dst}", highlight=False)


def show_cmd(
    src: Path = typer.Argument(..., help="Feature store directory."),
    img_id: str = typer.Argument(..., help="Image id (file stem) to draw."),
    image: Path = typer.Option(..., "--image", exists=True, dir_okay=False, help="The image the features came from."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
    vocab: Path = typer.Option(None, "--vocab", exists=True, file_okay=False,
                               help="Folder with objects_vocab.txt and attributes_vocab.txt (BUTD 1600/400 names); "
                                    "without it labels are ids."),
    top: int = typer.Option(None, "--top", min=1, help="Draw only the N most confident boxes."),
) -> None:
    """Draw an image's stored boxes with attribute + object names and confidences.

    Example: lxm show features/train2014 COCO_train2014_000000132417 --image coco/COCO_train2014_000000132417.jpg --out boxes.png --vocab vg_vocab/
    """
    import cv2

    from lxm.extract.images import ImageError, load_bgr
    from lxm.extract.draw import detector_classes, fit_names, load_vocab
    from lxm.extract.show import draw
    from lxm.features.store import FeatureStore

    if out.is_dir():  # before any drawing; cv2 would fail on it with a traceback
        fail(ConfigError(f"--out {out}: is a directory; give the PNG file to write"))
    try:
        store = FeatureStore(src)
        rec = store.get(img_id)
        objects = attributes = None
        if vocab is not None:
            objects, attributes = load_vocab(vocab / "objects_vocab.txt"), load_vocab(vocab / "attributes_vocab.txt")
            objects, attributes = fit_names(objects, attributes, detector_classes(store.manifest),
                                            option=f"--vocab {vocab}", source=f"the features in {src}")
        try:
            bgr = load_bgr(image)
        except ImageError as exc:
            raise ImageError(f"{image}: {exc}") from None
        picture = draw(bgr, rec, objects, attributes, top)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out), picture):
            raise OSError(f"{out}: could not write the image")
    except USER_ERRORS as exc:
        fail(exc)
    err.print(f"wrote {out}", highlight=False)


def _read_id_list(path: Path) -> list[str]:
    import json

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of img_ids or of records with 'img_id'")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get("img_id"), str):
            out.append(item["img_id"])
        else:
            raise ConfigError(f"{path}: record {i}: field 'img_id' missing")
    return list(dict.fromkeys(out))


def inspect_cmd(
    src: Path = typer.Argument(..., help="Feature store directory."),
    verify: bool = typer.Option(False, "--verify", help="Also read every shard and the index whole and compare "
                                "their sha256 with what the writer recorded; damaged files are listed and the exit "
                                "code is 1. Slow: reads every byte."),
    repair: bool = typer.Option(False, "--repair", help="First rebuild index.arrow and manifest.json from the "
                                "finished shards (a damaged or missing manifest or index; the shards themselves "
                                "are not changed)."),
) -> None:
    """Print a feature store's counts, dtype, shards and extractor metadata, and whether writers are filling it.

    Example: lxm inspect features/train2014 --verify
    """
    import json

    from rich.text import Text

    from lxm.features.backbone import store_backbone
    from lxm.features.store import FeatureStore, StoreError, live_writers, rebuild_store

    try:
        if not src.is_dir():
            raise StoreError(f"{src}: no such directory")
        running = live_writers(src)
        if repair:
            m = rebuild_store(src)
            err.print(f"rebuilt {src}/index.arrow and manifest.json from {len(m['shards'])} shards "
                      f"({m['num_images']} images)", highlight=False)
        store = FeatureStore(src)
        store.verify()  # a truncated index or shard is reported here, naming the file
        m = store.manifest
        size = sum((src / s["file"]).stat().st_size for s in m["shards"])
        rec = store.at(0) if len(store) else None
        checked = None
        if verify:
            with progress("files") as bar:
                task = bar.add_task("verify", total=len(m["shards"]))
                checked = store.verify_checksums(on_file=lambda name: bar.advance(task))
    except USER_ERRORS as exc:
        fail(exc)
    upto = "up to " if store_backbone(m).given_boxes else ""
    typer.echo(f"{src}: {m['num_images']} images x {upto}{m['num_boxes']} boxes x {m['feature_dim']} features "
               f"({m['dtype']}), {len(m['shards'])} shards, {size / 2**20:.1f} MiB")
    if running:
        typer.echo(f"{running} writer{' is' if running == 1 else 's are'} running: this is the store as of their "
                   f"last finished run; it grows until they finish")
    typer.echo(f"lxm version {m.get('lxm_version', '?')}, updated {m.get('updated', '?')}")
    typer.echo("backbone: " + store_backbone(m).summary())
    typer.echo("extractor: " + json.dumps(m.get("extractor", {}), sort_keys=True))
    if rec is not None:
        typer.echo(f"first image: {rec.img_id} ({rec.img_w}x{rec.img_h}), objects {rec.objects_id[:5].tolist()}..., "
                   f"features mean {float(rec.features.astype('float32').mean()):.4f}")
    if checked is not None:
        unchecked = (f"; {len(checked['unchecked'])} without a recorded checksum (written before lxm recorded "
                     f"them), not checked: {', '.join(checked['unchecked'][:3])}"
                     f"{' ...' if len(checked['unchecked']) > 3 else ''}") if checked["unchecked"] else ""
        typer.echo(f"verify: {len(checked['ok'])} file(s) match their recorded sha256{unchecked}")
        if checked["damaged"]:
            for line in checked["damaged"]:
                err.print(Text.assemble(("damaged:", "red"), " ", line), highlight=False)
            raise typer.Exit(code=1)
