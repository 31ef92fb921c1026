"""What every `lxm` command shares: the stderr console, one-line errors for bad input, progress bars.

The command modules import this module only (never `lxm.cli` itself), so the package has no import cycle.
"""

from __future__ import annotations

from enum import Enum
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from lxm.errors import LxmError

err = Console(stderr=True, soft_wrap=True)  # messages name paths; never wrap them mid-path

USER_ERRORS = (LxmError, OSError)  # what the commands report in one line; everything else is a bug


class FeatureDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


# the detector choices of `lxm extract`, shared by `lxm ask` (which runs the same detector)
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


def fail(exc: BaseException) -> NoReturn:
    """Bad input (an LxmError, or an OSError, which names its file) -> one line on stderr and exit code 1.

    Anything else is a bug and is re-raised with its traceback: a KeyError from a bug must not read as bad input.
    """
    if not isinstance(exc, USER_ERRORS):
        raise exc
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"  # the file first, as every LxmError message
    else:
        text = str(exc)
    err.print(f"[red]error:[/red] {escape(text)}", highlight=False)
    raise typer.Exit(code=1)


def progress(unit: str = "bytes"):
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
    return Progress(TextColumn("{task.description}"), BarColumn(), *amount, TimeRemainingColumn(), console=err)


def advancing(items, bar, task):
    """Yield `items`, advancing a progress task after each."""
    for item in items:
        yield item
        bar.advance(task)
