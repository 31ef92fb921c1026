"""`lxm convert-checkpoint`: LXMERT weights between the original, transformers and lxm formats (thin wrapper over
`lxm.model.weights`).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from lxm.cli.common import USER_ERRORS, err, fail


class TargetFormat(str, Enum):
    lxm = "lxm"
    hf = "hf"
    original = "original"


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
        fail(exc)
    err.print(report.summary(), highlight=False, markup=False)
    err.print(f"wrote {to.value} checkpoint to {dst} ({len(report.loaded)} tensors)", highlight=False)
