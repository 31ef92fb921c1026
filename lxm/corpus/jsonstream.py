"""Streaming readers for the huge top-level JSON containers of VG and GQA.

`region_descriptions.json` (a list, ~0.7 GB) and `train_balanced_questions.json` (an object keyed by question id,
~1.3 GB) become several GB of Python objects with `json.load`. These readers decode one element at a time with
`json.JSONDecoder.raw_decode` over a sliding text buffer, so memory stays at one element plus the buffer.

Kept rather than ijson (issue 29 item 6: switch only if ijson is at least as fast), because ijson 3.6.0 with its C
backend (yajl2_c) was slower on these files' shapes: `python benchmarks/corpus.py --parse-only --rounds 5`, medians,
ijson / jsonstream = 1.80 on the VG region list and 1.61 on GQA questions with every field of a real record; only on
GQA records slimmed to the builder's fields (~0.16 KB each, where this reader's per-element Python work dominates)
was ijson faster (0.75). Figures and machine: benchmarks/README.md, `corpus.py`.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lxm.errors import LxmError

_CHUNK = 1 << 22  # 4 MiB of text per read
_WS = " \t\n\r"


class JSONStreamError(LxmError, ValueError):
    pass


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        self.f = path.open("rb")  # decoded here, so that a byte that is not UTF-8 is named by its file offset
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.read = 0  # bytes read from the file
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.decoder = json.JSONDecoder()

    def close(self) -> None:
        self.f.close()

    def _more(self) -> bool:
        if self.eof:
            return False
        raw = self.f.read(_CHUNK)
        start = self.read - len(self.utf8.getstate()[0])  # file offset of the bytes decoded now (a cut character)
        self.read += len(raw)
        try:
            data = self.utf8.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            raise JSONStreamError(f"{self.path}: not UTF-8 text at byte {start + exc.start} ({exc.reason}); "
                                  f"annotation files are UTF-8 JSON: re-download the file or re-save it as UTF-8"
                                  ) from None
        if not raw:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        """Next non-whitespace character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise JSONStreamError(f"{self.path}: not valid JSON (expected one of {chars!r} at offset ~{self.pos}, "
                                  f"found {c!r})")
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self._more():
                    continue
                raise JSONStreamError(f"{self.path}: not valid JSON ({exc.msg})") from None
            # A value that reaches the very end of the buffer may be cut (e.g. a number); read on to be sure.
            if end == len(self.buf) and not self.eof and self._more():
                continue
            self.pos = end
            return obj


def iter_json_list(path: str | Path) -> Iterator[Any]:
    """Elements of a file holding one JSON list."""
    r = _Reader(Path(path))
    try:
        r.expect("[")
        if r.peek() == "]":
            return
        while True:
            yield r.value()
            if r.expect(",]") == "]":
                return
    finally:
        r.close()


def iter_json_object(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(key, value) pairs of a file holding one JSON object."""
    r = _Reader(Path(path))
    try:
        r.expect("{")
        if r.peek() == "}":
            return
        while True:
            key = r.value()
            if not isinstance(key, str):
                raise JSONStreamError(f"{path}: not valid JSON (object key is not a string)")
            r.expect(":")
            yield key, r.value()
            if r.expect(",}") == "}":
                return
    finally:
        r.close()
