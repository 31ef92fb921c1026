"""`lxm gallery`: a static HTML page of a finetuned model's predictions on a split (thin wrapper over
`lxm.gallery.build`)."""

from __future__ import annotations

from pathlib import Path

import typer

from lxm.cli.common import EXPLAIN_METHOD_HELP, USER_ERRORS, ExplainMethod, err, fail, progress, warn


def gallery_cmd(
    run: Path = typer.Argument(..., help="A finetuning run directory (lxm finetune --out)."),
    split: str = typer.Option(..., "--split", help="Labelled table of the corpus to show (vqa minival, gqa testdev, "
                                                   "nlvr2 dev, ...)."),
    images: list[Path] = typer.Option(..., "--images", help="Folder of the raw images, searched recursively (img_id "
                                                            "= file name without suffix, as lxm extract); "
                                                            "repeatable."),
    out: Path = typer.Option(..., "--out", help="Folder to write: index.html + assets/. An earlier gallery there "
                                                "is replaced, the folder's other files are kept; a folder that is "
                                                "not empty and holds no gallery is refused."),
    limit: int = typer.Option(200, "--limit", min=1, help="Show the first N examples (after --only-wrong), in the "
                                                          "split's order."),
    only_wrong: bool = typer.Option(False, "--only-wrong", help="Show only the examples the model gets wrong "
                                                                "(score 0)."),
    boxes: int = typer.Option(5, "--boxes", min=1, help="Boxes drawn per image of an example: the largest "
                                                        "weights of --explain-method."),
    explain_method: ExplainMethod = typer.Option(ExplainMethod.relevance, "--explain-method",
                                                 help=EXPLAIN_METHOD_HELP),
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

    One card per image (NLVR2: per image pair) with all its shown examples, each with its own picture: the boxes
    most relevant to its predicted answer (--explain-method relevance, Chefer et al. 2021; or attention: those its
    [CLS] attended to most in the last cross layer, mean over heads) drawn with their weights, and
    the question or statement, the verdict (right = score 100, partly right = 0 < score < 100, VQA's soft credit,
    wrong = score 0) and the score, the ground truth with scores, the top-5 predictions with probabilities and the
    score each would earn. At the top: the split's scores in percent (the accuracy is the mean score; the right /
    partly right / wrong counts beside it), per answer and question type (VQA), per structural type (GQA, with
    --questions), precision and recall per label (classify, NLVR2). Filters (verdict, per type, text search) and
    the order (dataset order, or most / least confident first) are also settable in the URL, e.g.
    index.html#verdict=wrong&answer_type=yes/no&sort=confident. Nothing is fetched from the network: open
    OUT/index.html in a browser. The page reflows down to a phone's width.

    OUT holds index.html, assets/ and two hidden files: .lock (a second lxm gallery into OUT while one writes fails
    at once) and .lxm-gallery.json (the files the gallery wrote: a later gallery replaces only those).

    Example: lxm gallery runs/vqa --split minival --images coco/val2014 --out gallery/vqa --only-wrong
    """
    from lxm.gallery.build import GalleryConfig, make_gallery

    cfg = GalleryConfig(split=split, images=[str(p) for p in images], limit=limit, only_wrong=only_wrong, boxes=boxes,
                        explain_method=explain_method.value,
                        vocab_dir=str(vocab_dir) if vocab_dir else None,
                        questions=str(questions) if questions else None, corpus=str(corpus) if corpus else None,
                        features=[str(f) for f in features] if features else None, batch_size=batch_size,
                        device=device)
    try:
        with progress("images") as bar:
            task = bar.add_task("draw images", total=None, visible=False)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, visible=True)

            result = make_gallery(run, out, cfg, log=lambda m: err.print(m, highlight=False),
                                  on_progress=advance)
    except USER_ERRORS as exc:
        fail(exc)
    s = result.summary
    scores = ", ".join(f"{k} {v:g}%" for k, v in s.metrics.items())
    partial = f", {s.partial} partly right" if s.partial else ""
    err.print(f"{s.task} {s.split}: {scores} over {s.examples} examples ({s.right} right{partial}, "
              f"{s.wrong} wrong; the {s.metric} is the mean score)", highlight=False)
    if result.missing:
        images = f"{len(result.missing)} image" + ("s" if len(result.missing) > 1 else "")
        warn(f"{result.missing_examples} of the {result.shown} shown examples have an image not found under "
             f"--images ({images}, e.g. {result.missing[0]}); they show a note")
    if result.failed:
        img, why = next(iter(result.failed.items()))
        warn(f"{len(result.failed)} images could not be drawn (e.g. {img}: {why})")
    err.print(f"wrote {result.page} ({result.shown} examples shown on {result.cards} cards, "
              f"{result.shown_wrong} wrong)", highlight=False)
