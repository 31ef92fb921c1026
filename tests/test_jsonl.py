"""`lxm.jsonl`, the one reader of JSON lines files: good lines, blank lines, and each kind of bad line named by
`FILE:LINE` (issue 29, item 6)."""

from __future__ import annotations

import io
import json

import pytest

from lxm.errors import LxmError
from lxm.jsonl import NOT_JSON, NOT_OBJECT, NOT_UTF8, JsonLinesError, read_json_lines, scan_json_lines


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_values_come_with_their_line_numbers_blank_lines_skipped_or_kept(tmp_path):
    path = _write(tmp_path / "a.jsonl", b'{"a": 1}\n\n  \r\n[1, 2]\r\n"x"\n{"b": "\xc3\xa9\xe2\x80\xa8"}')  # no last \n
    assert list(read_json_lines(path)) == [(1, {"a": 1}), (4, [1, 2]), (5, "x"), (6, {"b": "é\u2028"})]
    lines = list(scan_json_lines(path, skip_blank=False))
    assert [(n, raw) for n, raw, _, _ in lines] == [(1, b'{"a": 1}'), (2, b""), (3, b"  "), (4, b"[1, 2]"),
                                                     (5, b'"x"'), (6, b'{"b": "\xc3\xa9\xe2\x80\xa8"}')]
    assert [bad.problem for *_, bad in lines if bad is not None] == [NOT_JSON, NOT_JSON]  # the blank lines
    assert list(read_json_lines(tmp_path / "a.jsonl", lines=io.StringIO('{"a": 1}\n\n7\n'))) == [(1, {"a": 1}), (3, 7)]


def test_a_line_that_is_not_json_raises_one_line_naming_file_and_line(tmp_path):
    path = _write(tmp_path / "b.jsonl", b'{"a": 1}\n{"a": 2,\n{"a": 3}\n')
    with pytest.raises(JsonLinesError) as exc:
        list(read_json_lines(path))
    assert isinstance(exc.value, LxmError) and isinstance(exc.value, ValueError)
    assert str(exc.value) == f"{path}:2: not JSON (Expecting property name enclosed in double quotes at column 9)"
    assert "\n" not in str(exc.value)


def test_a_line_that_is_not_utf8_names_its_byte_in_the_file(tmp_path):
    path = _write(tmp_path / "c.jsonl", b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(JsonLinesError, match=rf"^{path}:2: not UTF-8 text at byte 16 \(invalid start byte\)"):
        list(read_json_lines(path))
    assert [bad and bad.problem for *_, bad in scan_json_lines(path)] == [None, NOT_UTF8]


def test_objects_only_and_the_callers_own_error_class(tmp_path):
    class MyError(LxmError):
        pass

    path = _write(tmp_path / "d.jsonl", json.dumps({"a": 1}).encode() + b"\n[1]\n")
    assert list(read_json_lines(path)) == [(1, {"a": 1}), (2, [1])]
    with pytest.raises(MyError, match=rf"^{path}:2: expected a JSON object, got list$"):
        list(read_json_lines(path, objects=True, error=MyError))
    assert [line.bad.problem for line in scan_json_lines(path, objects=True) if line.bad] == [NOT_OBJECT]


def test_on_bad_sees_every_bad_line_and_reading_goes_on(tmp_path):
    path = _write(tmp_path / "e.jsonl", b'1\n{\n\xfe\n2\n"s"\n')
    seen = []
    assert list(read_json_lines(path, objects=False, on_bad=seen.append)) == [(1, 1), (4, 2), (5, "s")]
    assert [(bad.number, bad.problem, bad.raw) for bad in seen] == [(2, NOT_JSON, b"{"), (3, NOT_UTF8, b"\xfe")]
    assert str(seen[0]) == f"{path}:2: {seen[0].reason}"
