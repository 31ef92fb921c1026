"""LXMERT's feature TSV format: streaming reader and byte-exact writer.

Format (airsplay/lxmert `src/utils.py` L12-54; writer `data/mscoco_imgfeat/extract_coco_image.py`): one image per
line, no header, 10 tab-separated fields in `FIELDS` order; arrays are base64 of little-endian raw bytes (ids int64,
confidences/boxes/features float32); lines end with CRLF (Python's csv writer). The original loader decoded whole
files into RAM (80 GB for pretraining, airsplay/lxmert #37); this reader yields one record at a time.

`convert_tsv` (`lxm convert tsv`) imports a TSV into a feature store (`lxm.features.store`). Unlike `load_obj_tsv`,
which stops at the first bad row, a bad line is recorded in the store's failures.jsonl and the rest converts; a
resumed conversion skips stored rows by their img_id without decoding them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from lxm.atomic import atomic_path, write_bytes
from lxm.features.records import FIELDS, ImageFeatures, RecordError
from lxm.features.store import MANIFEST, FeatureStoreWriter
from lxm.jsonl import scan_json_lines

_logger = logging.getLogger(__name__)

LINE_END = b"\r\n"
FAILURES = "failures.jsonl"
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


def iter_lines(path: str | os.PathLike, *,
               on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its ending) for each non-empty line of a TSV, undecoded.

    Args:
        on_bytes: called with the number of bytes consumed after each line (progress reporting).
    """
    consumed = 0
    with Path(path).open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            consumed += len(line)
            stripped = line.rstrip(b"\r\n")
            if stripped:
                yield lineno, stripped
            if on_bytes is not None:
                on_bytes(consumed)


def line_img_id(line: bytes) -> str | None:
    """The img_id (first field) of a TSV line, read without decoding the rest; None if empty or not UTF-8."""
    end = line.find(b"\t")
    try:
        return line[:end if end >= 0 else len(line)].decode("utf-8") or None
    except UnicodeDecodeError:
        return None


def read_tsv(path: str | os.PathLike, *, limit: int | None = None,
             on_bytes: Callable[[int], None] | None = None) -> Iterator[ImageFeatures]:
    """Stream records from an LXMERT feature TSV (LF or CRLF line endings); a bad line raises RecordError.

    Args:
        limit: stop after that many lines (LXMERT's `topk`).
        on_bytes: called with the number of bytes consumed after each row (progress reporting).
    """
    for lineno, line in iter_lines(path, on_bytes=on_bytes):
        if limit is not None and lineno > limit:
            return
        yield parse_row(line, path=str(path), lineno=lineno)


def _store_geometry(src: Path) -> tuple[int, int]:
    """(N, D) of the first line that decodes; an error naming the first problem when none does."""
    first_problem = None
    for lineno, line in iter_lines(src):
        try:
            rec = parse_row(line, path=str(src), lineno=lineno)
        except RecordError as exc:
            first_problem = first_problem or f"line {lineno}: {str(exc).removeprefix(f'{src}:{lineno}: ')}"
            continue
        return rec.num_boxes, int(rec.features.shape[1])
    raise RecordError(f"{src}: no line can be converted ({first_problem or 'the file has no rows'})")


def _drop_failures_of(path: Path, source: str) -> None:
    """Remove `source`'s records from failures.jsonl, keeping every other source's.

    Bad lines are never stored, so each run meets all of them again and records each once; a record cut short by
    a kill is dropped with them.
    """
    if not path.exists():
        return
    kept = [line.raw + b"\n" for line in scan_json_lines(path)
            if line.bad is None and not (isinstance(line.value, dict)
                                         and str(line.value.get("image", "")).rsplit(":", 1)[0] == source)]
    write_bytes(path, b"".join(kept))


def convert_tsv(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "float16",
                rows_per_shard: int = 1024, on_bytes: Callable[[int], None] | None = None,
                max_boxes: int | None = None) -> dict:
    """Import an LXMERT TSV into the feature store `dst` (created or resumed), streaming; returns a summary.

    The store holds up to N boxes per image: `max_boxes`, or (None) the first decodable line's count; D is that
    line's feature size. Rows of fewer boxes are stored as they are (the store pads them and keeps each row's
    `num_boxes`), so TSVs of a varying count per image convert (extractions that kept 10-100 boxes by confidence:
    `max_boxes=100`; lxm's own exports of given-box stores). A line whose img_id the store
    already holds is skipped on that field alone. A line that cannot be used (bad base64, counts that disagree with
    num_boxes, missing fields, more than N boxes, another D, an img_id repeated from an earlier line) is written to
    `dst/failures.jsonl` as lxm extract writes its failures, `{"image": "<tsv>:<line>", "img_id", "reason"}` with the
    reason naming `file:line: field`, and the other lines convert. Every run rewrites this TSV's records there, so
    each bad line has one record however often the command is re-run.
    """
    src = Path(src).resolve()
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    first_boxes, feature_dim = _store_geometry(src)
    manifest = Path(dst) / MANIFEST
    stored = json.loads(manifest.read_text()).get("num_boxes") if max_boxes is None and manifest.exists() else None
    num_boxes = max_boxes or stored or first_boxes  # a resume keeps the store's N
    meta = {"source": "tsv", "tsv": str(src), "engine": "caffe (imported)"}
    writer = FeatureStoreWriter(dst, num_boxes=num_boxes, feature_dim=feature_dim, dtype=dtype,
                                rows_per_shard=rows_per_shard, metadata=meta)
    failures_path = writer.root / FAILURES
    summary = {"lines": 0, "stored": 0, "already_present": 0, "failed": 0}
    seen: dict[str, int] = {}  # img_id -> its first line in this file
    t0 = time.perf_counter()
    try:
        _drop_failures_of(failures_path, str(src))
        with failures_path.open("a") as failures:
            def fail(lineno: int, img_id: str | None, reason: str) -> None:
                failures.write(json.dumps({"image": f"{src}:{lineno}", "img_id": img_id, "reason": reason}) + "\n")
                failures.flush()  # a kill keeps what was found so far
                summary["failed"] += 1

            for lineno, line in iter_lines(src, on_bytes=on_bytes):
                summary["lines"] += 1
                img_id = line_img_id(line)
                if img_id is not None:
                    if img_id in seen:
                        fail(lineno, img_id, f"{src}:{lineno}: field 'img_id' {img_id!r} repeats line {seen[img_id]}")
                        continue
                    seen[img_id] = lineno
                    if img_id in writer:
                        summary["already_present"] += 1
                        continue
                try:
                    rec = parse_row(line, path=str(src), lineno=lineno)
                except RecordError as exc:
                    fail(lineno, img_id, str(exc))
                    continue
                if rec.num_boxes > num_boxes:
                    fail(lineno, img_id, f"{src}:{lineno}: field 'num_boxes' is {rec.num_boxes}; this store holds "
                                         f"up to {num_boxes} boxes per image (convert with --max-boxes "
                                         f"{rec.num_boxes} or more)")
                    continue
                if rec.features.shape[1] != feature_dim:
                    fail(lineno, img_id, f"{src}:{lineno}: field 'features' has {rec.features.shape[1]} values per "
                                         f"box; this store holds {feature_dim}")
                    continue
                writer.add(rec)
                summary["stored"] += 1
    except BaseException:
        writer.close(finalize=False)  # keep the finished shards for a resume, publish no manifest
        raise
    manifest = writer.close()
    summary.update(seconds=round(time.perf_counter() - t0, 2), store_images=manifest["num_images"] if manifest else 0,
                   failures_file=str(failures_path), manifest=str(writer.root / "manifest.json"))
    _logger.info("converted %s: %s", src, summary)
    return summary


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
