"""What every `lxm` command shares: the stderr console, one-line errors for bad input, progress bars, and the
process-wide settings a command (never the library) applies.

The command modules import this module only (never `lxm.cli` itself), so the package has no import cycle.
"""

from __future__ import annotations

import datetime
import json
import time
from enum import Enum
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from lxm.errors import LxmError

# Messages name paths; never wrap them mid-path. No markup: a path such as `st[/red]` prints as it is (colour comes
# from `Text` styles, as in `fail` and `warn`).
err = Console(stderr=True, soft_wrap=True, markup=False)

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


class ExplainMethod(str, Enum):
    """What `lxm ask --explain` and `lxm gallery` show (`lxm.infer.explain.EXPLAIN_METHODS`)."""

    relevance = "relevance"
    attention = "attention"


EXPLAIN_METHOD_HELP = ("relevance (default): each box's and word's share of the gradient-weighted relevance for the "
                       "answer through every layer (Chefer et al., ICCV 2021); attention: the last cross layer's "
                       "[CLS] -> boxes attention (mean over heads), boxes only.")


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
    err.print(Text.assemble(("error:", "red"), " ", text), highlight=False)
    raise typer.Exit(code=1)


def keep_freed_memory_on_cpu(enabled: bool, device: str, what: str) -> None:
    """What `lxm pretrain`, `lxm finetune` and `lxm extract` do once before their work: with `enabled` (the config's
    `keep_freed_memory`) and `device` (the config's, read by `lxm.devices.resolve_device`; `what` names it in the
    error of a bad one) on the CPU, have glibc keep freed memory for reuse (`lxm.memory.keep_freed_memory`).
    Process-wide, so the command applies it, never the library (trainers and `extract()` leave malloc alone)."""
    if not enabled:
        return
    from lxm.devices import resolve_device  # here: `lxm --help` does not import torch
    from lxm.memory import keep_freed_memory

    if resolve_device(device, what=what).type == "cpu":
        keep_freed_memory()


def warn(text: str) -> None:
    """One warning line on stderr, the text exactly as given (no markup)."""
    err.print(Text.assemble(("warning:", "yellow"), " ", text), highlight=False)


def progress(unit: str = "bytes", *, every_s: float = 60.0, min_gap_s: float = 5.0, console: Console | None = None):
    """Progress on stderr for `unit`s ("bytes": sizes and speed; anything else, e.g. "steps" or "images": counts).

    On a terminal: a rich `Progress` bar (description, bar, done/total, ETA; the elapsed time once finished). Without
    one (stderr not a TTY: CI, `lxm ... > log 2>&1`) a bar would write nothing for the whole job, so the returned
    object, with the same calls (a context manager with `add_task`, `update`, `advance`), prints plain lines
    instead: `DESCRIPTION: DONE/TOTAL UNIT (P %), ELAPSED elapsed, ETA T`, one whenever another tenth of the total
    is done (at least `min_gap_s` seconds after the last line: a job of seconds gets no ten lines) or `every_s`
    seconds have passed, and one with the final count when the task completes or the block ends.
    """
    console = console or err
    if not console.is_terminal:
        return LineProgress(unit, every_s=every_s, min_gap_s=min_gap_s, console=console)
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
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), *amount,  # descriptions name files
                    TimeRemainingColumn(elapsed_when_finished=True), console=console)


class LineProgress:
    """`progress()` without a terminal: the calls of rich's Progress that lxm uses, printed as plain lines."""

    def __init__(self, unit: str, *, every_s: float = 60.0, min_gap_s: float = 5.0, console: Console | None = None):
        self.unit, self.every_s, self.min_gap_s, self.console = unit, every_s, min_gap_s, console or err
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        for task_id in self.tasks:  # where each task stopped, unless its last line already said so
            self._line(task_id, final=True)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, visible: bool = True,
                 **_fields) -> int:
        task_id = len(self.tasks)
        now = time.monotonic()
        self.tasks[task_id] = {"description": description, "total": total, "completed": completed,
                               "visible": visible, "start": now, "start_completed": completed, "printed_at": now,
                               "printed": None, "tenth": self._tenth(completed, total)}
        return task_id

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, visible: bool | None = None,
               **_fields) -> None:
        task = self.tasks[task_id]
        now = time.monotonic()
        if description is not None:
            task["description"] = description
        if visible is not None:
            task["visible"] = visible
        if completed is not None or advance is not None:
            task["completed"] = completed if completed is not None else task["completed"] + advance
        if total is not None and total != task["total"]:
            # the job's size is known from here (a resumed run starts part-way): rate and ETA count from now
            task.update(total=total, start=now, start_completed=task["completed"], printed_at=now,
                        tenth=self._tenth(task["completed"], total))
        elif completed is not None or advance is not None:
            tenth = self._tenth(task["completed"], task["total"])
            done = task["total"] is not None and task["completed"] >= task["total"]
            since = now - task["printed_at"]
            if ((done and task["printed"] != (task["completed"], task["total"]))
                    or (tenth > task["tenth"] and since >= self.min_gap_s) or since >= self.every_s):
                task["tenth"] = tenth
                self._line(task_id)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    @staticmethod
    def _tenth(completed: float, total: float | None) -> int:
        return int(10 * completed // total) if total else 0

    def _amount(self, value: float) -> str:
        if self.unit != "bytes":
            return f"{value:g}"
        for size in ("B", "KB", "MB", "GB"):
            if abs(value) < 1000 or size == "GB":
                return f"{value:.0f} {size}" if size == "B" else f"{value:.1f} {size}"
            value /= 1000
        return f"{value}"

    def _line(self, task_id: int, final: bool = False) -> None:
        task = self.tasks[task_id]
        state = (task["completed"], task["total"])
        if not task["visible"] or (final and task["printed"] == state) or (final and task["printed"] is None
                                                                            and not task["completed"]):
            return
        now = time.monotonic()
        elapsed = now - task["start"]
        total, done = task["total"], task["completed"]
        unit = "" if self.unit == "bytes" else f" {self.unit}"
        text = f"{task['description']}: {self._amount(done)}"
        if total:
            text += f"/{self._amount(total)}{unit} ({100 * done / total:.0f} %)"
        else:
            text += unit
        text += f", {datetime.timedelta(seconds=round(elapsed))} elapsed"
        rate = (done - task["start_completed"]) / elapsed if elapsed > 0 else 0.0
        if total and done < total:
            eta = datetime.timedelta(seconds=round((total - done) / rate)) if rate > 0 else "unknown"
            text += f", ETA {eta}"
        self.console.print(text, highlight=False, markup=False)
        task["printed"], task["printed_at"] = state, now


def advancing(items, bar, task):
    """Yield `items`, advancing a progress task after each."""
    for item in items:
        yield item
        bar.advance(task)


def report_submission(report, note: str | None = None, *, summary_to_stdout: bool = False) -> None:
    """Print a submission check (`lxm.eval.submission.SubmissionReport`): a ready file gets its one-line summary
    (on stdout with `summary_to_stdout`, the result of `lxm check-submission`; else stderr); a file that is not
    ready gets an error line with the counts, one line per problem with its first offending ids, `note`, and exit 1."""
    if report.ok:
        if summary_to_stdout:
            typer.echo(report.summary())
        else:
            err.print(report.summary(), highlight=False)
        return
    err.print(Text.assemble(("error:", "red"), " ", report.summary()), highlight=False)
    for line in report.details():
        err.print(f"  {line}", highlight=False)
    if note:
        err.print(f"  {note}", highlight=False)
    raise typer.Exit(code=1)


def parse_timm_args(items: list[str] | None) -> dict:
    """`--timm-arg KEY=VALUE` options as `timm.create_model` keywords (VALUE read as JSON where it is, else a string);
    a malformed one is a ConfigError."""
    from lxm.errors import ConfigError

    out: dict = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ConfigError(f"--timm-arg must look like KEY=VALUE (e.g. depth=2), got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
