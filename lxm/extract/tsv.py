"""LXMERT's feature TSV format: streaming reader and byte-exact writer.

Format (airsplay/lxmert `src/utils.py` L12-54; writer `data/mscoco_imgfeat/extract_coco_image.py`): one image per
line, no header, 10 tab-separated fields in `FIELDS` order; arrays are base64 of little-endian raw bytes (ids int64,
confidences/boxes/features float32); lines end with CRLF (Python's csv writer). The original loader decoded whole
files into RAM (80 GB for pretraining, airsplay/lxmert #37); this reader yields one record at a time.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from lxm.atomic import atomic_path
from lxm.extract.records import FIELDS, ImageFeatures, RecordError

LINE_END = b"\r\n"
_ARRAYS = {"objects_id": np.int64, "objects_conf": np.float32, "attrs_id": np.int64, "attrs_conf": np.float32,
           "boxes": np.float32, "features": np.float32}


def _decode(path: str, lineno: int, name: str, text: bytes, dtype) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RecordError(f"{path}:{lineno}: field '{name}': invalid base64 ({exc})") from None
    if len(raw) % np.dtype(dtype).itemsize:
        raise RecordError(f"{path}:{lineno}: field '{name}': {len(raw)} bytes is not a whole number of "
                          f"{np.dtype(dtype).name} values")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=False)


def parse_row(line: bytes, *, path: str = "<tsv>", lineno: int = 0) -> ImageFeatures:
    """One TSV line (without its line ending) -> ImageFeatures."""
    parts = line.split(b"\t")
    if len(parts) != len(FIELDS):
        raise RecordError(f"{path}:{lineno}: expected {len(FIELDS)} tab-separated fields, found {len(parts)}")
    row = dict(zip(FIELDS, parts))
    try:
        img_id = row["img_id"].decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError(f"{path}:{lineno}: field 'img_id' is not UTF-8") from None
    ints = {}
    for name in ("img_h", "img_w", "num_boxes"):
        try:
            ints[name] = int(row[name])
        except ValueError:
            raise RecordError(f"{path}:{lineno}: field '{name}' is not an integer: {row[name][:20]!r}") from None
    n = ints["num_boxes"]
    arrays = {name: _decode(path, lineno, name, row[name], dtype) for name, dtype in _ARRAYS.items()}
    for name in ("objects_id", "objects_conf", "attrs_id", "attrs_conf"):
        if arrays[name].size != n:
            raise RecordError(f"{path}:{lineno}: field '{name}' has {arrays[name].size} values, num_boxes is {n}")
    if arrays["boxes"].size != 4 * n:
        raise RecordError(f"{path}:{lineno}: field 'boxes' has {arrays['boxes'].size} values, expected {4 * n}")
    feats = arrays["features"]
    if n == 0 or feats.size % n:
        raise RecordError(f"{path}:{lineno}: field 'features' has {feats.size} values, not a multiple of {n} boxes")
    rec = ImageFeatures(img_id=img_id, img_h=ints["img_h"], img_w=ints["img_w"],
                        objects_id=arrays["objects_id"], objects_conf=arrays["objects_conf"],
                        attrs_id=arrays["attrs_id"], attrs_conf=arrays["attrs_conf"],
                        boxes=arrays["boxes"].reshape(n, 4), features=feats.reshape(n, -1))
    try:
        return rec.validate()
    except RecordError as exc:
        raise RecordError(f"{path}:{lineno}: {exc}") from None


def read_tsv(path: str | os.PathLike, *, limit: int | None = None,
             on_bytes: Callable[[int], None] | None = None) -> Iterator[ImageFeatures]:
    """Stream records from an LXMERT feature TSV (LF or CRLF line endings).

    Args:
        limit: stop after that many rows (LXMERT's `topk`).
        on_bytes: called with the number of bytes consumed after each row (progress reporting).
    """
    path = Path(path)
    consumed = 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and lineno > limit:
                return
            consumed += len(line)
            stripped = line.rstrip(b"\r\n")
            if stripped:
                yield parse_row(stripped, path=str(path), lineno=lineno)
            if on_bytes is not None:
                on_bytes(consumed)


def _b64(arr: np.ndarray, dtype) -> bytes:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())


def format_row(rec: ImageFeatures) -> bytes:
    """ImageFeatures -> one TSV line (no line ending), exactly as the original extraction script wrote it."""
    rec.validate()
    return b"\t".join([
        rec.img_id.encode("utf-8"), str(int(rec.img_h)).encode(), str(int(rec.img_w)).encode(),
        _b64(rec.objects_id, np.int64), _b64(rec.objects_conf, np.float32),
        _b64(rec.attrs_id, np.int64), _b64(rec.attrs_conf, np.float32),
        str(rec.num_boxes).encode(), _b64(rec.boxes, np.float32), _b64(rec.features, np.float32),
    ])


def write_tsv(records: Iterable[ImageFeatures], path: str | os.PathLike) -> int:
    """Write records as an LXMERT TSV (CRLF lines); written to a temporary name and renamed when complete."""
    path = Path(path)
    count = 0
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            for rec in records:
                f.write(format_row(rec) + LINE_END)
                count += 1
    return count
