"""The `lxm` command line: a thin layer over the library's typed functions.

Stages in pipeline order: extract (or convert tsv) -> build-corpus -> pretrain -> finetune -> predict -> evaluate;
quickstart runs them all on a synthetic world. Heavy imports happen inside each command, so `lxm --help` is instant.
"""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from lxm.errors import ConfigError, LxmError

app = typer.Typer(
    name="lxm",
    help="LXMERT reproduced end to end: region features, pretraining corpus, pretraining, finetuning, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_err = Console(stderr=True, soft_wrap=True)  # messages name paths; never wrap them mid-path


class TargetFormat(str, Enum):
    lxm = "lxm"
    hf = "hf"
    original = "original"


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log library messages at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@app.command("convert-checkpoint")
def convert_checkpoint_cmd(
    src: str = typer.Argument(..., help="Checkpoint to read: an original *_LXRT.pth or fine-tuned BEST.pth, a "
                                        "transformers LXMERT directory or Hub id, or an lxm checkpoint directory."),
    dst: Path = typer.Argument(..., help="Where to write: a directory for --to lxm/hf, a .pth file for --to original."),
    to: TargetFormat = typer.Option(..., "--to", help="lxm: config.json + model.safetensors with lxm names; hf: a "
                                                     "directory transformers' LxmertForPreTraining.from_pretrained "
                                                     "reads; original: an airsplay-style module.bert.* .pth."),
) -> None:
    """Convert an LXMERT checkpoint between the original, transformers and lxm formats.

    The source is loaded strictly (every key and shape checked, coverage report printed) and written in the target
    format; values are copied bit for bit, so lxm -> hf -> lxm is lossless.

    Example: lxm convert-checkpoint snap/pretrained/model_LXRT.pth ckpt/lxmert-base --to lxm
    """
    from lxm.model.weights import convert_checkpoint

    try:
        report = convert_checkpoint(src, dst, to.value)
    except USER_ERRORS as exc:
        _fail(exc)
    _err.print(f"wrote {to.value} checkpoint to {dst} ({len(report.loaded)} tensors)", highlight=False)


convert_app = typer.Typer(help="Import region features from other formats into an lxm feature store.",
                          no_args_is_help=True)
export_app = typer.Typer(help="Write an lxm feature store out in other formats.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")
app.add_typer(export_app, name="export")


class FeatureDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


def _progress(unit: str = "bytes"):
    """A progress bar on stderr: byte counts and speed for files, item counts otherwise."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    amount = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    return Progress(TextColumn("{task.description}"), BarColumn(), *amount, TimeRemainingColumn(), console=_err)


def _advancing(items, bar, task):
    """Yield `items`, advancing a progress task after each."""
    for item in items:
        yield item
        bar.advance(task)


USER_ERRORS = (LxmError, OSError)  # what the commands report in one line; everything else is a bug


def _fail(exc: BaseException) -> NoReturn:
    """Bad input (an LxmError, or an OSError, which names its file) -> one line on stderr and exit code 1.

    Anything else is a bug and is re-raised with its traceback: a KeyError from a bug must not read as bad input.
    """
    if not isinstance(exc, USER_ERRORS):
        raise exc
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"  # the file first, as every LxmError message
    else:
        text = str(exc)
    _err.print(f"[red]error:[/red] {escape(text)}", highlight=False)
    raise typer.Exit(code=1)


@convert_app.command("tsv")
def convert_tsv_cmd(
    src: Path = typer.Argument(..., exists=True, dir_okay=False, help="LXMERT feature TSV (e.g. train2014_obj36.tsv)."),
    dst: Path = typer.Argument(..., help="Feature store directory to create or resume."),
    dtype: FeatureDtype = typer.Option(FeatureDtype.float16, help="Stored feature precision; float32 keeps the TSV "
                                       "values exactly (lxm export tsv then reproduces the file byte for byte)."),
    rows_per_shard: int = typer.Option(1024, min=1, help="Images per Arrow shard."),
) -> None:
    """Import an original 10-column base64 TSV into a memory-mapped feature store, streaming (constant memory).

    Re-running the same command after a crash skips the images already stored (without decoding them). Lines that
    cannot be used are listed in DST/failures.jsonl with file:line and the field; the other rows convert. The exit
    code is non-zero only if no line can be converted. Rows keep the TSV's order.

    Example: lxm convert tsv data/mscoco_imgfeat/train2014_obj36.tsv features/train2014
    """
    from lxm.extract.tsv import convert_tsv

    try:
        with _progress() as bar:
            task = bar.add_task(f"convert {src.name}", total=src.stat().st_size)
            summary = convert_tsv(src, dst, dtype=dtype.value, rows_per_shard=rows_per_shard,
                                  on_bytes=lambda n: bar.update(task, completed=n))
    except USER_ERRORS as exc:
        _fail(exc)
    _err.print(f"stored {summary['stored']} images in {dst} ({summary['already_present']} already present); "
               f"manifest: {summary['manifest']}", highlight=False)
    if summary["failed"]:
        lines = "1 line" if summary["failed"] == 1 else f"{summary['failed']} lines"
        _err.print(f"[yellow]warning:[/yellow] {lines} could not be converted; see {escape(summary['failures_file'])}",
                   highlight=False)


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

    Example: lxm export tsv features/val2014 val2014_obj36.tsv --first-ids mscoco_minival.json
    """
    from lxm.extract.store import FeatureStore, StoreError
    from lxm.extract.tsv import write_tsv

    try:
        store = FeatureStore(src)
        order = store.ids()
        if first_ids is not None:
            head = _read_id_list(first_ids)
            missing = [i for i in head if i not in store]
            if missing:
                raise StoreError(f"{first_ids}: {len(missing)} of {len(head)} ids are not in {src} "
                                 f"(first: {', '.join(missing[:3])})")
            head_set = set(head)
            order = head + [i for i in order if i not in head_set]
        with _progress("images") as bar:
            task = bar.add_task(f"export {dst.name}", total=len(order))
            count = write_tsv(_advancing((store.get(i) for i in order), bar, task), dst)
    except USER_ERRORS as exc:
        _fail(exc)
    _err.print(f"wrote {count} rows to {dst}", highlight=False)


@convert_app.command("h5")
def convert_h5_cmd(
    src: Path = typer.Argument(..., exists=True, dir_okay=False, help="HDF5 file in lxm's layout (lxm export h5)."),
    dst: Path = typer.Argument(..., help="Feature store directory to create or resume."),
    dtype: FeatureDtype = typer.Option(None, help="Stored precision (default: the file's)."),
) -> None:
    """Import an HDF5 feature file (layout: see `lxm.extract.h5`) into a feature store.

    Example: lxm convert h5 features.h5 features/train2014
    """
    from lxm.extract.h5 import h5_info, read_h5
    from lxm.extract.store import FeatureStoreWriter

    try:
        count, n, d, file_dtype = h5_info(src)
        writer = FeatureStoreWriter(dst, num_boxes=n, feature_dim=d, dtype=(dtype.value if dtype else file_dtype),
                                    metadata={"source": "h5", "h5": str(src.resolve())})
        with writer, _progress("images") as bar:
            task = bar.add_task(f"convert {src.name}", total=count)
            for rec in _advancing(read_h5(src), bar, task):
                if rec.img_id not in writer:
                    writer.add(rec)
    except USER_ERRORS as exc:
        _fail(exc)
    _err.print(f"stored {writer.written} images in {dst}", highlight=False)


@export_app.command("h5")
def export_h5_cmd(
    src: Path = typer.Argument(..., help="Feature store directory."),
    dst: Path = typer.Argument(..., help="HDF5 file to write (renamed into place when complete)."),
) -> None:
    """Write a feature store as one HDF5 file (layout documented in `lxm.extract.h5`), in index order.

    Example: lxm export h5 features/val2014 val2014_obj36.h5
    """
    from lxm.extract.h5 import write_h5
    from lxm.extract.store import FeatureStore

    try:
        store = FeatureStore(src)
        with _progress("images") as bar:
            task = bar.add_task(f"export {dst.name}", total=len(store))
            count = write_h5(_advancing(store, bar, task), dst, count=len(store), num_boxes=store.num_boxes,
                             feature_dim=store.feature_dim, dtype=store.dtype)
    except USER_ERRORS as exc:
        _fail(exc)
    _err.print(f"wrote {count} images to {dst}", highlight=False)


@app.command("show")
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

    from lxm.extract.images import load_bgr
    from lxm.extract.show import draw, load_vocab
    from lxm.extract.store import FeatureStore

    try:
        rec = FeatureStore(src).get(img_id)
        objects = attributes = None
        if vocab is not None:
            objects, attributes = load_vocab(vocab / "objects_vocab.txt"), load_vocab(vocab / "attributes_vocab.txt")
        picture = draw(load_bgr(image), rec, objects, attributes, top)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out), picture):
            raise OSError(f"{out}: could not write the image")
    except USER_ERRORS as exc:
        _fail(exc)
    _err.print(f"wrote {out}", highlight=False)


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


class DetectorPreset(str, Enum):
    vg_r101 = "vg-r101"
    tiny = "tiny"


class Engine(str, Enum):
    auto = "auto"
    torch = "torch"
    detectron2 = "detectron2"


class SelectMode(str, Enum):
    lxmert = "lxmert"
    maxnms = "maxnms"


@app.command("extract")
def extract_cmd(
    images: Path = typer.Option(..., "--images", exists=True, file_okay=False,
                                help="Folder of images (jpg/png/...); img_id = file name without suffix."),
    out: Path = typer.Option(..., "--out", help="Feature store directory (created, or resumed if it exists)."),
    weights: str = typer.Option(..., "--weights", help="faster_rcnn_from_caffe_attr.pkl or pytorch_model.bin path, "
                                                       "an http(s) URL, a Hub id (unc-nlp/frcnn-vg-finetuned), or "
                                                       "'random' (seeded random weights: meaningless features)."),
    engine: Engine = typer.Option(Engine.auto, help="auto: detectron2 if it imports, else torch (said in the output "
                                                    "and the manifest); torch: plain torch + torchvision; "
                                                    "detectron2: the same network in detectron2 (not on PyPI: "
                                                    "installed from its repository, or the Docker image)."),
    mode: SelectMode = typer.Option(SelectMode.lxmert, help="lxmert: the released TSVs' rule (per-class NMS 0.3 on "
                                                            "proposals, score >= 0.2, exactly N); maxnms: airsplay's "
                                                            "detectron2 demo rule."),
    boxes: int = typer.Option(36, "--boxes", min=1, help="Boxes per image."),
    device: str = typer.Option("cpu", help="cpu or cuda (fails if CUDA is absent)."),
    dtype: FeatureDtype = typer.Option(FeatureDtype.float16, help="Stored feature precision."),
    batch_size: int = typer.Option(4, min=1, help="Images per step; equal-size images share a backbone pass."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast (faster on GPUs; features drift slightly)."),
    detector: DetectorPreset = typer.Option(DetectorPreset.vg_r101, help="Network: the BUTD ResNet-101 detector, or "
                                                                         "'tiny' for smoke tests."),
    shard: str = typer.Option(None, "--shard", help="i/n: process the i-th of n disjoint parts of the sorted image "
                                                    "list (default: torchrun's RANK/WORLD_SIZE, else 0/1)."),
    seed: int = typer.Option(0, help="Seed for --weights random."),
    rows_per_shard: int = typer.Option(1024, min=1, help="Images per Arrow shard (a crash loses at most one shard)."),
) -> None:
    """Extract 36-box Visual Genome Faster R-CNN region features from a folder of images into a feature store.

    Images are found in the folder and its subfolders. Re-running the same command skips images already stored;
    images that cannot be used are listed in failures.jsonl with the reason (one record per image). Several runs
    may write one --out at once (e.g. one per GPU, with or without --shard): they split the work. The exit code is
    non-zero if the folder holds no image, or none of them could be used.

    Example: lxm extract --images coco/train2014 --out features/train2014 --weights faster_rcnn_from_caffe_attr.pkl
    """
    from lxm.extract.images import ImageError
    from lxm.extract.pipeline import ExtractConfig, extract, shard_from_env

    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            _fail(ConfigError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}"))
    else:
        i, n = shard_from_env()
    # --weights random is announced once, by the weights loader's logged warning (it also lands in the manifest)
    cfg = ExtractConfig(images=str(images), out=str(out), weights=weights, engine=engine.value,
                        detector=detector.value, mode=mode.value,
                        num_boxes=boxes, device=device, dtype=dtype.value, batch_size=batch_size, bf16=bf16,
                        seed=seed, shard=i, num_shards=n, rows_per_shard=rows_per_shard)
    try:
        with _progress("images") as bar:
            tasks: list = []  # the bar appears with its total, once the images are listed (not before an error)

            def progress(done: int, total: int, per_s: float) -> None:
                if not tasks:
                    tasks.append(bar.add_task("", total=total))
                bar.update(tasks[0], completed=done, total=total, description=f"extract {images.name} {per_s:.1f} img/s")

            summary = extract(cfg, on_progress=progress, on_weights=lambda line: _err.print(line, highlight=False),
                              on_engine=lambda line: _err.print(line, highlight=False))
    except USER_ERRORS as exc:
        _fail(exc)
    s = summary
    if s["images"] == 0:
        _err.print(f"shard {i}/{n} holds none of the {s['folder_images']} images in {images}: nothing to do",
                   highlight=False)
        return
    if s["already_done"] == s["images"]:
        _err.print(f"all {s['images']} images are already in the store ({s['store_images']} images in {out})",
                   highlight=False)
        return
    others = f", {s['left_to_others']} left to another run writing this store" if s["left_to_others"] else ""
    _err.print(f"extracted {s['extracted']} images, {s['already_done']} already done, {s['failed']} failed (see "
               f"{s['failures_file']}){others}; store holds {s['store_images']} images; {s['seconds']} s",
               highlight=False)
    if s["extracted"] + s["already_done"] + s["left_to_others"] == 0:
        _fail(ImageError(f"{images}: none of its {s['images']} images could be used; the reasons are in "
                         f"{s['failures_file']}"))


@app.command("build-corpus")
def build_corpus_cmd(
    out: Path = typer.Option(..., "--out", help="Output directory (written complete or not at all)."),
    coco: Path = typer.Option(None, "--coco", exists=True, file_okay=False,
                              help="Folder with captions_train2014.json and captions_val2014.json."),
    vg: Path = typer.Option(None, "--vg", exists=True, file_okay=False,
                            help="Folder with image_data.json, region_descriptions.json, question_answers.json."),
    vqa: Path = typer.Option(None, "--vqa", exists=True, file_okay=False,
                             help="Folder with v2_OpenEnded_mscoco_*_questions.json and v2_mscoco_*_annotations.json."),
    gqa: Path = typer.Option(None, "--gqa", exists=True, file_okay=False,
                             help="Folder with {train,val,testdev}_balanced_questions.json "
                                  "(+ submission_all_questions.json)."),
    nlvr2: Path = typer.Option(None, "--nlvr2", exists=True, file_okay=False,
                               help="Folder with NLVR2's train.json, dev.json, test1.json (+ test2.json), JSON "
                                    "lines; or a clone of lil-lab/nlvr (reads nlvr2/data/, never NLVR1's nlvr/)."),
    minival_ids: Path = typer.Option(None, "--minival-ids", exists=True, dir_okay=False,
                                     help="LXMERT's mscoco_minival.json or a JSON list of img_ids (the 5K minival)."),
    features: list[Path] = typer.Option(None, "--features", help="Feature store(s): keep only sentences whose image "
                                                                 "has features (drops reported per source)."),
    qa_table: Path = typer.Option(None, "--qa-table", exists=True, dir_okay=False,
                                  help="LXMERT's all_ans.json (default: the most frequent answers of the data)."),
    vqa_min_questions: int = typer.Option(9, help="VQA vocabulary: answers given for at least this many questions."),
    export_lxmert_json: bool = typer.Option(False, "--export-lxmert-json",
                                            help="Also write mscoco_{train,nominival,minival}.json and vgnococo.json "
                                                 "for the original LXMERT code."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
) -> None:
    """Build LXMERT's aggregated pretraining corpus (COCO captions, VG captions, VQA, GQA, VG-QA) and the VQA / GQA /
    NLVR2 finetuning sets from the original annotation files; any source may be omitted.

    Writes corpus.parquet (one row per sentence: uid, img_id, source, split, text, labels), finetune/*.parquet,
    vocab/{vqa,gqa,qa}_answers.json, stats.json (and report.json with duplicates / unknown images), and prints the
    paper's Table 1.

    Example: lxm build-corpus --coco raw/coco --vg raw/vg --vqa raw/vqa --gqa raw/gqa --nlvr2 raw/nlvr2 --minival-ids mscoco_minival.json --out corpus/
    """
    from rich.table import Table

    from lxm.corpus.build import SOURCES, CorpusInputs, build_corpus, table1

    inputs = CorpusInputs(out=out, coco=coco, vg=vg, vqa=vqa, gqa=gqa, nlvr2=nlvr2, minival_ids=minival_ids,
                          features=list(features or []), qa_table=qa_table, vqa_min_questions=vqa_min_questions,
                          export_lxmert_json=export_lxmert_json, overwrite=overwrite)
    try:
        with _err.status("reading the annotation files ..."):
            result = build_corpus(inputs)
    except USER_ERRORS as exc:
        _fail(exc)
    table = Table(title="Pretraining data (paper Table 1 layout)")
    for col in ("image split", "images", *SOURCES, "all"):
        table.add_column(col, justify="right")
    for row in table1(result["stats"]):
        table.add_row(*row)
    Console(soft_wrap=True).print(table)
    for source, problems in sorted(result["report"].items()):
        _err.print(f"{source}: " + ", ".join(f"{k} {v}" for k, v in sorted(problems.items())), highlight=False)
    if result["dropped_without_features"]:
        _err.print("dropped (no features): " + ", ".join(f"{k} {v}" for k, v in
                                                          sorted(result["dropped_without_features"].items())),
                   highlight=False)
    _err.print(f"wrote {len(result['rows'])} sentences and {len(result['finetune_counts'])} finetuning sets "
               f"to {out}", highlight=False)


def _overrides(set_: list[str] | None, *, init: str | None = None, corpus: Path | None = None,
               features: list[Path] | None = None) -> list[str]:
    """--set items, then the dedicated options as the same key=value overrides (they win over the config file)."""
    out = list(set_ or [])
    if init:
        out.append(f"init={init}")
    if corpus is not None:
        out.append(f"corpus={corpus}")
    if features:
        out.append("features=" + json.dumps([str(f) for f in features]))
    return out


@app.command("pretrain")
def pretrain_cmd(
    out: Path = typer.Option(..., "--out", help="Run directory: config.yaml, log.jsonl, checkpoints/."),
    config: str = typer.Option("base", "--config", help="Preset (base = the original recipe, tiny = smoke test) or a "
                                                       "YAML file of PretrainConfig keys."),
    corpus: Path = typer.Option(None, "--corpus", help="Corpus directory from lxm build-corpus (overrides config)."),
    features: list[Path] = typer.Option(None, "--features", help="Feature store directories (override config)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a config key: --set lr=5e-5 --set epochs=12."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
) -> None:
    """Pretrain LXMERT (MLM, matching, object/attribute/feature prediction, QA) as the original recipe by default.

    Writes OUT/config.yaml (resolved) first, a jsonl log of every loss term, checkpoints every N steps and each epoch
    (atomically; --resume continues exactly), and best.pt by minival loss. Multi-process:
    torchrun --nproc_per_node 4 -m lxm.cli pretrain ... (DDP; gloo on CPU, nccl on GPU).

    Example: lxm pretrain --corpus corpus/ --features features/train2014 --features features/val2014 --features features/vg --out runs/lxmert
    """
    from lxm.train.config import load_config
    from lxm.train.pretrain import Pretrainer

    try:
        cfg = load_config(config, _overrides(set_, corpus=corpus, features=features))
        with _progress("steps") as bar:
            task = bar.add_task("pretrain", total=None)

            def advance(record):
                if "loss" in record:
                    bar.update(task, completed=record["step"], description=f"pretrain loss {record['loss']:.3f} "
                               f"{record.get('samples_per_s', 0):.0f} samples/s")

            trainer = Pretrainer(cfg, out, resume=resume, log=lambda m: _err.print(m, highlight=False),
                                 on_record=advance)
            bar.update(task, total=trainer.total_steps, completed=trainer.step)
            result = trainer.run()
    except USER_ERRORS as exc:
        _fail(exc)
    _err.print(f"done: step {result['step']}, epoch {result['epoch']}; logs and checkpoints in {out}", highlight=False)


@app.command("finetune")
def finetune_cmd(
    task: str = typer.Argument(..., help="vqa, gqa or nlvr2."),
    out: Path = typer.Option(..., "--out", help="Run directory: config.yaml, log.jsonl, metrics.jsonl, best/, "
                                                "predictions/, last.pt."),
    init: str = typer.Option(None, "--init", help="Pretrained weights: an lxm pretraining run directory, an "
                                                  "original *_LXRT.pth, a transformers LXMERT directory or Hub id."),
    config: str = typer.Option("paper", "--config", help="Preset (paper = the original recipe of the task, tiny = "
                                                         "smoke test) or a YAML file of FinetuneConfig keys."),
    corpus: Path = typer.Option(None, "--corpus", help="Corpus directory from lxm build-corpus (overrides config)."),
    features: list[Path] = typer.Option(None, "--features", help="Feature store directories (override config)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a config key: --set lr=1e-5 --set epochs=4."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out after its last finished epoch."),
) -> None:
    """Finetune LXMERT on VQA, GQA or NLVR2 with the original recipes (batch 32, lr 5e-5 / 1e-5 / 5e-5, 4 epochs,
    warm-up 10 %, clip 5.0).

    VQA trains on train+nominival and validates on minival; GQA train+valid / testdev; NLVR2 train / dev. The
    answer head starts from the pretraining QA head by answer string (coverage printed). Each epoch appends the
    validation score to OUT/metrics.jsonl; the best epoch is kept in OUT/best/ with its predictions in
    OUT/predictions/ (official formats). Multi-process: torchrun --nproc_per_node 4 -m lxm.cli finetune ...

    Example: lxm finetune vqa --init runs/lxmert --corpus corpus/ --features features/train2014 --features features/val2014 --out runs/vqa
    """
    from lxm.train.config import load_finetune_config
    from lxm.train.finetune import Finetuner

    try:
        cfg = load_finetune_config(task, config, _overrides(set_, init=init, corpus=corpus, features=features))
        with _progress("steps") as bar:
            bar_task = bar.add_task(f"finetune {task}", total=None)

            def advance(record):
                if "loss" in record:
                    bar.update(bar_task, completed=record["step"],
                               description=f"{task} epoch {record['epoch']} loss {record['loss']:.3f} "
                                           f"{record.get('samples_per_s', 0):.0f} samples/s")
                elif "valid" in record and record["valid"]:
                    _err.print(f"epoch {record['epoch']}: {cfg.valid_split} "
                               + ", ".join(f"{k} {v}" for k, v in record["valid"].items()), highlight=False)

            trainer = Finetuner(cfg, out, resume=resume, log=lambda m: _err.print(m, highlight=False),
                                on_record=advance)
            bar.update(bar_task, total=trainer.steps_per_epoch * cfg.epochs, completed=trainer.step)
            result = trainer.run()
    except USER_ERRORS as exc:
        _fail(exc)
    _err.print(f"done: {result['epochs']} epochs; best {cfg.valid_split} accuracy {result['best']} (epoch "
               f"{result['best_epoch']}); model in {out / 'best'}", highlight=False)


@app.command("predict")
def predict_cmd(
    task: str = typer.Argument(..., help="vqa, gqa or nlvr2 (must match the run)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A finetuning run directory (lxm finetune --out)."),
    split: str = typer.Option(..., "--split", help="Table of the corpus to predict: vqa test/minival/testdev, "
                                                   "gqa testdev/submit, nlvr2 dev/test1/test2."),
    out: Path = typer.Option(..., "--out", help="Submission file to write (JSON for VQA/GQA, CSV for NLVR2)."),
    corpus: Path = typer.Option(None, "--corpus", help="Corpus directory (default: the run's)."),
    features: list[Path] = typer.Option(None, "--features", help="Feature stores (default: the run's)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Evaluation batch size (default: the run's)."),
    questions: Path = typer.Option(None, "--questions", exists=True, dir_okay=False,
                                   help="GQA only: the split's questions with answers (e.g. "
                                        "testdev_balanced_questions.json); prints lxm evaluate gqa's table."),
    choices: Path = typer.Option(None, "--choices", exists=True, dir_okay=False,
                                 help="GQA only, with --questions: choices file for validity / plausibility."),
) -> None:
    """Write the official submission file of a split with the run's best model.

    VQA [{"question_id", "answer"}], GQA [{"questionId", "prediction"}], NLVR2 CSV identifier,True|False. When the
    split has labels, the local score is printed too (use lxm evaluate for the official one). GQA with --questions
    also prints every eval.py number of the written file as JSON, exactly as lxm evaluate gqa.

    Example: lxm predict vqa --checkpoint runs/vqa --split test --features features/test2015 --out test_predict.json
    """
    from lxm.train.finetune import predict_run

    if (questions or choices) and task != "gqa":
        _fail(ConfigError(f"--questions / --choices score GQA predictions; this is {task}"))
    if choices and not questions:
        _fail(ConfigError("--choices needs --questions"))
    try:
        path, scores = predict_run(checkpoint, task, split, out, corpus=str(corpus) if corpus else None,
                                   features=[str(f) for f in features] if features else None, batch_size=batch_size,
                                   log=lambda m: _err.print(m, highlight=False))
    except USER_ERRORS as exc:
        _fail(exc)
    _err.print(f"wrote {path}" + (f" (local {split} " + ", ".join(f"{k} {v}" for k, v in scores.items()) + ")"
                                  if scores else ""), highlight=False)
    if questions:  # the file just written, scored as lxm evaluate gqa would
        typer.echo(json.dumps(_gqa_scores(questions, path, choices), indent=2))


@app.command("plot")
def plot_cmd(
    run: Path = typer.Argument(..., help="A pretraining or finetuning run directory (reads its log.jsonl)."),
    out: Path = typer.Option(None, "--out", help="Directory for the PNG files (default RUN/plots)."),
) -> None:
    """Plot a run's training losses (every named term, log scale) and validation values per epoch as PNG files.

    Example: lxm plot runs/lxmert
    """
    from lxm.train.plot import plot_run

    try:
        written = plot_run(run, out)
    except USER_ERRORS as exc:
        _fail(exc)
    for path in written:
        _err.print(f"wrote {path}", highlight=False)


@app.command("quickstart")
def quickstart_cmd(
    out: Path = typer.Option(Path("lxm-quickstart"), "--out", help="Directory for the world, runs and report.md."),
    weights: str = typer.Option("random", "--weights", help="Detector weights for lxm extract; 'random' (default) "
                                                           "= seeded random init: meaningless features."),
    vocab: str = typer.Option("", "--vocab", help="WordPiece vocabulary (default: trained on the world's text)."),
    pretrain_steps: int = typer.Option(200, "--pretrain-steps", min=1, help="Pretraining optimizer steps at most "
                                                                             "(the whole epochs that fit)."),
    finetune_epochs: int = typer.Option(4, "--finetune-epochs", min=1, help="Finetuning epochs per task."),
    detector_vocab: str = typer.Option("", "--detector-vocab", help="Folder with the detector's objects_vocab.txt "
                                                                    "and attributes_vocab.txt: names in boxes.png."),
) -> None:
    """Run the whole chain on a small synthetic world, offline: render images of coloured shapes with COCO / VQA /
    NLVR2 annotation files, then extract, build-corpus, pretrain, finetune vqa and nlvr2, predict, evaluate, show and
    plot, and write OUT/report.md (commands, work, times, metrics, pictures). About 25 s on 2 idle CPU cores.

    Example: lxm quickstart --out /tmp/lxm-quickstart
    """
    from lxm.quickstart import QuickstartConfig, run_quickstart

    cfg = QuickstartConfig(weights=weights, vocab=vocab, pretrain_steps=pretrain_steps, detector_vocab=detector_vocab,
                           finetune_epochs=finetune_epochs)
    if weights == "random":
        _err.print("quickstart: the detector gets seeded RANDOM weights (no download); the features are meaningless "
                   "and the metrics only show that the chain runs. Pass --weights for real features.",
                   highlight=False)
    try:
        result = run_quickstart(out, cfg, log=lambda m: _err.print(m, highlight=False, markup=False))
    except USER_ERRORS as exc:
        _fail(exc)
    _err.print(f"report: {result.out / 'report.md'}", highlight=False)


evaluate_app = typer.Typer(help="Score predictions with the official VQA / GQA / NLVR2 metrics (JSON to stdout).",
                           no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")


def _json_file(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


@evaluate_app.command("vqa")
def evaluate_vqa_cmd(
    questions: Path = typer.Option(..., "--questions", exists=True, dir_okay=False,
                                   help="v2_OpenEnded_mscoco_*_questions.json (the evaluated questions)."),
    annotations: Path = typer.Option(..., "--annotations", exists=True, dir_okay=False,
                                     help="v2_mscoco_*_annotations.json."),
    predictions: Path = typer.Option(..., "--predictions", exists=True, dir_okay=False,
                                     help='Results: [{"question_id": int, "answer": str}, ...].'),
) -> None:
    """Official VQA accuracy (overall, per answer type, per question type; 0-100).

    Example: lxm evaluate vqa --questions v2_OpenEnded_mscoco_val2014_questions.json --annotations v2_mscoco_val2014_annotations.json --predictions minival_predict.json
    """
    from lxm.train.metrics import vqa_accuracy, vqa_inputs

    result = _scored(lambda: vqa_accuracy(*vqa_inputs(_json_file(questions), _json_file(annotations),
                                                      _json_file(predictions))),
                     questions=questions, annotations=annotations, predictions=predictions)
    typer.echo(json.dumps(result, indent=2))


def _scored(compute, **paths: Path | None):
    """Run a metric; a bad input becomes one line naming its file (the metric says which input, `exc.source`)."""
    from lxm.train.metrics import MetricsInputError

    try:
        return compute()
    except MetricsInputError as exc:
        path = paths.get(exc.source)
        _fail(MetricsInputError(exc.source, f"{path}: {exc}") if path else exc)
    except USER_ERRORS as exc:
        _fail(exc)


def _gqa_scores(questions: Path, predictions: Path, choices: Path | None) -> dict:
    from lxm.train.metrics import gqa_metrics, gqa_predictions

    return _scored(lambda: gqa_metrics(_json_file(questions), gqa_predictions(_json_file(predictions)),
                                       _json_file(choices) if choices else None),
                   questions=questions, predictions=predictions, choices=choices)


@evaluate_app.command("gqa")
def evaluate_gqa_cmd(
    questions: Path = typer.Option(..., "--questions", exists=True, dir_okay=False,
                                   help="GQA questions with answers, e.g. testdev_balanced_questions.json."),
    predictions: Path = typer.Option(..., "--predictions", exists=True, dir_okay=False,
                                     help='[{"questionId": str, "prediction": str}, ...].'),
    choices: Path = typer.Option(None, "--choices", exists=True, dir_okay=False,
                                 help="GQA choices file (valid / plausible answers per question, e.g. "
                                      "val_choices.json): adds validity and plausibility."),
) -> None:
    """Every number of GQA's eval.py, unrounded, in percent: accuracy, binary, open, consistency, validity and
    plausibility (with --choices), distribution (chi-square / 100, lower is better) and (accuracy, questions) per
    structural type, semantic type, steps and words.

    Balanced questions are scored; entailed ids absent from --questions are skipped (counted in entailed_absent),
    predictions for other ids are ignored (counted in ignored_predictions).

    Example: lxm evaluate gqa --questions testdev_balanced_questions.json --predictions testdev_predict.json
    """
    typer.echo(json.dumps(_gqa_scores(questions, predictions, choices), indent=2))


@evaluate_app.command("nlvr2")
def evaluate_nlvr2_cmd(
    annotations: Path = typer.Option(..., "--annotations", exists=True, dir_okay=False,
                                     help="NLVR2 dev.json / test1.json / balanced_dev.json ... (JSON lines): the "
                                          "examples scored."),
    predictions: Path = typer.Option(..., "--predictions", exists=True, dir_okay=False,
                                     help="CSV lines identifier,True|False[,...] (an identifier,prediction header "
                                          "is skipped)."),
) -> None:
    """NLVR2 accuracy and consistency (0-100), as the official metrics.py, over the examples of --annotations.

    Predictions for other identifiers are ignored and counted (ignored_predictions), so full dev predictions score
    the balanced / unbalanced subsets.

    Example: lxm evaluate nlvr2 --annotations dev.json --predictions dev_predict.csv
    """
    from lxm.train.metrics import nlvr2_labels, nlvr2_metrics, nlvr2_predictions

    result = _scored(lambda: nlvr2_metrics(nlvr2_labels(annotations.read_text()),
                                           nlvr2_predictions(predictions.read_text())),
                     annotations=annotations, predictions=predictions)
    typer.echo(json.dumps(result, indent=2))


@app.command("inspect")
def inspect_cmd(src: Path = typer.Argument(..., help="Feature store directory.")) -> None:
    """Print a feature store's counts, dtype, shards and extractor metadata.

    Example: lxm inspect features/train2014
    """
    import json

    from lxm.extract.store import FeatureStore

    try:
        store = FeatureStore(src)
        store.verify()  # a truncated index or shard is reported here, naming the file
        m = store.manifest
        size = sum((src / s["file"]).stat().st_size for s in m["shards"])
        rec = store.at(0) if len(store) else None
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"{src}: {m['num_images']} images x {m['num_boxes']} boxes x {m['feature_dim']} features "
               f"({m['dtype']}), {len(m['shards'])} shards, {size / 2**20:.1f} MiB")
    typer.echo(f"lxm version {m.get('lxm_version', '?')}, updated {m.get('updated', '?')}")
    typer.echo("extractor: " + json.dumps(m.get("extractor", {}), sort_keys=True))
    if rec is not None:
        typer.echo(f"first image: {rec.img_id} ({rec.img_w}x{rec.img_h}), objects {rec.objects_id[:5].tolist()}..., "
                   f"features mean {float(rec.features.astype('float32').mean()):.4f}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
