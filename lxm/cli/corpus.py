"""`lxm build-corpus`: the pretraining corpus and the finetuning sets from the raw annotation files (thin wrapper over
`lxm.corpus.build`).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from lxm.cli.common import USER_ERRORS, err, fail


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
        with err.status("reading the annotation files ..."):
            result = build_corpus(inputs)
    except USER_ERRORS as exc:
        fail(exc)
    table = Table(title="Pretraining data (paper Table 1 layout)")
    for col in ("image split", "images", *SOURCES, "all"):
        table.add_column(col, justify="right")
    for row in table1(result["stats"]):
        table.add_row(*row)
    Console(soft_wrap=True).print(table)
    for source, problems in sorted(result["report"].items()):
        err.print(f"{source}: " + ", ".join(f"{k} {v}" for k, v in sorted(problems.items())), highlight=False)
    if result["dropped_without_features"]:
        err.print("dropped (no features): " + ", ".join(f"{k} {v}" for k, v in
                                                         sorted(result["dropped_without_features"].items())),
                  highlight=False)
    err.print(f"wrote {len(result['rows'])} sentences and {len(result['finetune_counts'])} finetuning sets "
              f"to {out}", highlight=False)
