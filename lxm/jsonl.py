"""JSON lines files read line by line: the one reader of every JSON lines input and log of lxm.

The format is jsonlines.org's (also NLVR2's annotation files, lil-lab/nlvr `nlvr2/data/*.json`): one JSON value per
line, UTF-8, lines ended by "\\n" (a "\\r" before it is dropped). Users: NLVR2 annotations (`lxm.corpus.build`,
`lxm.eval.formats.nlvr2_labels`), custom datasets (`lxm.eval.formats`), `lxm ask --questions` (`lxm.infer`), the
stores' failures.jsonl (`lxm.features`), a run's log.jsonl / metrics.jsonl (`lxm.train`).

Two readers over one decoding:
- `read_json_lines`: (line number, value) of the good lines; a bad line raises `JsonLinesError` (or the caller's
  class) with the one-line message `FILE:LINE: problem`, or is handed to `on_bad` and skipped.
- `scan_json_lines`: every line with its raw bytes, its value and its problem, none raised: for readers that must
  get past damage (a log cut by a crash) or keep lines byte for byte.

A bad line is one that is not UTF-8, not JSON, or (with `objects=True`) not a JSON object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lxm.errors import LxmError

# the kinds of bad line (`BadLine.problem`); summaries count lines by these words
NOT_UTF8, NOT_JSON, NOT_OBJECT = "not UTF-8", "not JSON", "not a JSON object"


class JsonLinesError(LxmError, ValueError):
    """A line of a JSON lines file cannot be used; the message is `FILE:LINE: problem`."""


@dataclass(frozen=True)
class BadLine:
    """A line that is not a usable JSON value; `str()` is its one-line message `FILE:LINE: reason`."""

    path: str
    number: int  # from 1
    raw: bytes  # the line without its ending
    problem: str  # NOT_UTF8, NOT_JSON or NOT_OBJECT
    reason: str  # what is wrong, without the file and line: "not JSON (Expecting value at column 1)"

    def __str__(self) -> str:
        return f"{self.path}:{self.number}: {self.reason}"


class JsonLine(NamedTuple):
    """One line of `scan_json_lines`: `value` is None where `bad` says why the line is not one."""

    number: int
    raw: bytes
    value: Any
    bad: BadLine | None


def _raw_lines(path: str | os.PathLike, lines: Iterable[bytes | str] | None) -> Iterator[bytes | str]:
    if lines is not None:
        yield from lines
        return
    with Path(path).open("rb") as f:  # streamed: NLVR2's train.json and a long run's log are read a line at a time
        yield from f


def scan_json_lines(path: str | os.PathLike, *, lines: Iterable[bytes | str] | None = None, objects: bool = False,
                    skip_blank: bool = True) -> Iterator[JsonLine]:
    """Every line of the JSON lines file `path`, decoded or not: nothing is raised for a bad line (an `OSError` of
    the file still is).

    Args:
        lines: the lines to read instead of the file's (as a file yields them, endings included; str lines are
            already decoded); `path` then only names them in messages.
        objects: a value that is not a JSON object is a bad line (NOT_OBJECT).
        skip_blank: leave out lines of nothing but whitespace (else they are bad lines, NOT_JSON; readers that
            count lines, such as a log's, keep them).
    """
    name = str(path)
    offset = 0  # of the line in the file: a UTF-8 error names the file's byte, as an editor shows it
    for number, item in enumerate(_raw_lines(path, lines), start=1):
        start, offset = offset, offset + len(item)
        text = item.removesuffix("\n").removesuffix("\r") if isinstance(item, str) else None
        raw = item.removesuffix(b"\n").removesuffix(b"\r") if text is None else text.encode("utf-8", "surrogatepass")
        if skip_blank and not raw.strip():
            continue
        if text is None:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield JsonLine(number, raw, None, BadLine(
                    name, number, raw, NOT_UTF8,
                    f"not UTF-8 text at byte {start + exc.start} ({exc.reason}); JSON lines files are UTF-8"))
                continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield JsonLine(number, raw, None, BadLine(name, number, raw, NOT_JSON,
                                                      f"not JSON ({exc.msg} at column {exc.colno})"))
            continue
        if objects and not isinstance(value, dict):
            yield JsonLine(number, raw, None, BadLine(name, number, raw, NOT_OBJECT,
                                                      f"expected a JSON object, got {type(value).__name__}"))
            continue
        yield JsonLine(number, raw, value, None)


def read_json_lines(path: str | os.PathLike, *, lines: Iterable[bytes | str] | None = None, objects: bool = False,
                    skip_blank: bool = True, on_bad: Callable[[BadLine], None] | None = None,
                    error: Callable[[str], Exception] = JsonLinesError) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each good line of the JSON lines file `path`.

    A bad line (see the module docstring) raises `error(message)`, the message being `FILE:LINE: reason`, e.g.
    `dev.json:3: not JSON (Expecting ',' delimiter at column 40)`; with `on_bad`, the line's `BadLine` goes there
    instead (which may raise, log or count it) and the line is skipped.

    Args:
        lines, objects, skip_blank: as `scan_json_lines`'s.
        error: the exception class (or factory) for a bad line, for callers with their own error class.
    """
    for line in scan_json_lines(path, lines=lines, objects=objects, skip_blank=skip_blank):
        if line.bad is None:
            yield line.number, line.value
        elif on_bad is not None:
            on_bad(line.bad)
        else:
            raise error(str(line.bad))
