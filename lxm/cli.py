"""The `lxm` command line: a thin layer over the library's typed functions.

Only commands that work are registered; later stages (extract, build-corpus, pretrain, finetune, evaluate) are added
as they land.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="lxm",
    help="LXMERT reproduced end to end: region features, pretraining corpus, pretraining, finetuning, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_err = Console(stderr=True)


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
    from lxm.model.weights import CheckpointError, convert_checkpoint

    try:
        report = convert_checkpoint(src, dst, to.value)
    except CheckpointError as exc:
        _err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(code=1) from None
    _err.print(f"wrote {to.value} checkpoint to {dst} ({len(report.loaded)} tensors)", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
