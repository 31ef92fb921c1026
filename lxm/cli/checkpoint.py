"""`lxm convert-checkpoint`: LXMERT weights between the original, transformers and lxm formats (thin wrapper over
`lxm.model.weights`; an lxm run is read through `lxm.infer.runs.run_model`, which gives its answer names).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from lxm.cli.common import USER_ERRORS, err, fail
from lxm.errors import ConfigError


class TargetFormat(str, Enum):
    lxm = "lxm"
    hf = "hf"
    original = "original"


def convert_checkpoint_cmd(
    src: str = typer.Argument(..., help="Checkpoint to read: an lxm run directory (a finetuning run's best model with "
                                        "its answer table, a pretraining run's model), an original *_LXRT.pth or "
                                        "fine-tuned BEST.pth, a transformers LXMERT directory or Hub id, or an lxm "
                                        "checkpoint directory."),
    dst: Path = typer.Argument(..., help="Where to write: a directory for --to lxm/hf, a .pth file for --to original."),
    to: TargetFormat = typer.Option(..., "--to", help="lxm: config.json + model.safetensors with lxm names; hf: a "
                                                     "directory transformers' LxmertForPreTraining (a finetuned "
                                                     "model: LxmertForQuestionAnswering) .from_pretrained reads; "
                                                     "original: an airsplay-style .pth."),
    answers: Path = typer.Option(None, "--answers", exists=True, dir_okay=False,
                                 help="--to hf from a checkpoint that is not a run (e.g. an original BEST.pth): the "
                                      "answer table naming its answer head's rows (a JSON list, or {answer: id}), "
                                      "written as id2label / label2id."),
) -> None:
    """Convert an LXMERT checkpoint between the original, transformers and lxm formats.

    The source is loaded strictly (every key and shape checked, coverage report printed) and written in the target
    format; values are copied bit for bit, so lxm -> hf -> lxm is lossless.

    A finetuning run written --to hf names its answers: the run's answer table (VQA, GQA, qa) or labels (classify)
    become the config's id2label / label2id, so transformers.LxmertForQuestionAnswering.from_pretrained(DST) gives
    config.id2label[logits.argmax(-1)] as the answer. transformers has no NLVR2 pair head: an NLVR2 model is
    refused --to hf (nothing written); write it --to lxm or --to original.

    Example: lxm convert-checkpoint runs/vqa exports/vqa-hf --to hf
    """
    from lxm.model.weights import convert_checkpoint

    try:
        from lxm.infer.runs import is_run, run_model

        labels = None
        where = src
        if answers is not None and to is not TargetFormat.hf:
            raise ConfigError(f"--answers names the answers in an hf config (id2label); --to {to.value} holds none")
        if is_run(src):
            if answers is not None:
                raise ConfigError(f"--answers: {src} is a run; its answer table (RUN/answers.json) is used")
            model_dir, labels = run_model(src)
            where = str(model_dir)
        elif answers is not None:
            from lxm.corpus.layout import read_answer_table

            labels = read_answer_table(answers)
        if to is not TargetFormat.hf:
            labels = None  # only transformers' config holds the names; an lxm run keeps them in RUN/answers.json
        report = convert_checkpoint(where, dst, to.value, labels)
    except USER_ERRORS as exc:
        fail(exc)
    err.print(report.summary(), highlight=False, markup=False)
    err.print(f"wrote {to.value} checkpoint to {dst} ({len(report.loaded)} tensors"
              + (f", {len(labels)} answer names as id2label" if labels is not None else "") + ")", highlight=False)
