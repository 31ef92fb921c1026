"""`lxm gallery`: a static HTML page of a finetuned model's predictions on a split (thin wrapper over
`lxm.gallery.build`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from lxm.cli.common import USER_ERRORS, err, fail, progress


def gallery_cmd(
    run: Path = typer.Argument(..., help="A finetuning run directory (lxm finetune --out)."),
    split: str = typer.Option(..., "--split", help="Labelled table of the corpus to show (vqa minival, gqa testdev, "
                                                   "nlvr2 dev, ...)."),
    images: list[Path] = typer.Option(..., "--images", help="Folder of the raw images, searched recursively (img_id "
                                                            "= file name without suffix, as lxm extract); "
                                                            "repeatable."),
    out: Path = typer.Option(..., "--out", help="Folder to write: index.html + assets/ (an earlier gallery there is "
                                                "replaced)."),
    limit: int = typer.Option(200, "--limit", min=1, help="Show the first N examples (after --only-wrong), in the "
                                                          "split's order."),
    only_wrong: bool = typer.Option(False, "--only-wrong", help="Show only the examples the model gets wrong."),
    boxes: int = typer.Option(5, "--boxes", min=1, help="Boxes drawn per image, most confident first."),
    vocab_dir: Path = typer.Option(None, "--vocab-dir", exists=True, file_okay=False,
                                   help="Folder with objects_vocab.txt and attributes_vocab.txt (BUTD names); "
                                        "without it box labels are ids."),
    questions: Path = typer.Option(None, "--questions", exists=True, dir_okay=False,
                                   help="GQA only: the split's questions JSON (e.g. testdev_balanced_questions.json) "
                                        "for accuracy per structural type."),
    corpus: Path = typer.Option(None, "--corpus", help="Corpus directory (default: the run's)."),
    features: list[Path] = typer.Option(None, "--features", help="Feature stores (default: the run's)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Evaluation batch size (default: the run's)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cuda or cpu."),
) -> None:
    """Write a self-contained HTML page of what a finetuned model gets right and wrong on a split.

    Per example: the image(s) with their most confident boxes drawn, the question or statement, the ground truth
    (VQA answers with their scores), the top-5 predictions with probabilities, right or wrong. At the top: the
    split's scores (VQA per answer and question type, GQA per structural type with --questions, NLVR2 accuracy and
    consistency) and filters (wrong only, per type, text search; also settable in the URL, e.g.
    index.html#wrong=1&answer_type=yes/no). Nothing is fetched from the network: open OUT/index.html in a browser.

    Example: lxm gallery runs/vqa --split minival --images coco/val2014 --out gallery/vqa --only-wrong
    """
    from lxm.gallery.build import GalleryConfig, make_gallery

    cfg = GalleryConfig(split=split, images=[str(p) for p in images], limit=limit, only_wrong=only_wrong, boxes=boxes,
                        vocab_dir=str(vocab_dir) if vocab_dir else None,
                        questions=str(questions) if questions else None, corpus=str(corpus) if corpus else None,
                        features=[str(f) for f in features] if features else None, batch_size=batch_size,
                        device=device)
    try:
        with progress("images") as bar:
            task = bar.add_task("draw images", total=None, visible=False)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, visible=True)

            result = make_gallery(run, out, cfg, log=lambda m: err.print(m, highlight=False), on_progress=advance)
    except USER_ERRORS as exc:
        fail(exc)
    s = result.summary
    scores = ", ".join(f"{k} {v:g}" for k, v in s.metrics.items())
    err.print(f"{s.task} {s.split}: {scores} over {s.examples} examples ({s.examples - s.right} wrong)",
              highlight=False)
    if result.missing:
        images = f"{len(result.missing)} image" + ("s" if len(result.missing) > 1 else "")
        err.print(f"[yellow]warning:[/yellow] {result.missing_examples} of the {result.shown} shown examples have "
                  f"an image not found under --images ({images}, e.g. {escape(result.missing[0])}); they show a note",
                  highlight=False)
    if result.failed:
        img, why = next(iter(result.failed.items()))
        err.print(f"[yellow]warning:[/yellow] {len(result.failed)} images could not be drawn (e.g. {escape(img)}: "
                  f"{escape(why)})", highlight=False)
    err.print(f"wrote {result.page} ({result.shown} examples shown, {result.shown_wrong} wrong)", highlight=False)
