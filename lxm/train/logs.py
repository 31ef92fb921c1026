"""Reading a run's JSON-lines logs (OUT/log.jsonl, OUT/metrics.jsonl) line by line, damage included.

A log must never stop a resume, a plot or a report: a crash can cut the last line, and a disk can damage any. The
readers (`lxm.train.run.rewind_logs`, `lxm.train.plot.read_log`, `lxm.train.report.epoch_seconds`) each decide what
to do with a line that is not a record; they share the decoding here. No torch: `lxm plot` stays light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes, Any, str | None]]:
    """(line number, raw bytes, the decoded value or None, None or why not: "not UTF-8" / "not JSON") for each line
    of `path`, read as bytes: a line that is not UTF-8 is reported, not raised."""
    for n, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            yield n, raw, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError:
            yield n, raw, None, "not UTF-8"
        except json.JSONDecodeError:
            yield n, raw, None, "not JSON"
