"""The feature store: region features as memory-mapped Arrow IPC shards with an img_id index.

Replaces LXMERT's practice of decoding whole base64 TSVs into Python lists in RAM (airsplay/lxmert `src/utils.py`
`load_obj_tsv`; 80 GB for pretraining, 207 GB with 4 DataLoader workers, #37/#79/#105). Layout of a store directory:

- `part-*.arrow` shards in Arrow IPC *stream* format (what HF `datasets` reads with `Dataset.from_file`), columns
  named as the TSV fields: `img_id` string, `img_h`/`img_w`/`num_boxes` int32, `objects_id`/`attrs_id` int64[N],
  `objects_conf`/`attrs_conf` float32[N], `boxes` float32[N][4], `features` float16|float32[N][D] (fixed-size lists,
  so a row is addressable without offsets). Record batches of `batch_rows` rows (64 × 288 KiB ≈ 18 MB).
- `part-*.arrow.sha256`: each shard's sha256 (`sha256sum` format, `lxm.integrity`), written by its writer before
  the shard appears; a store written before checksums has none and reads as before.
- `index.arrow`: img_id -> (shard, row), in shard-name order, so the merge of many writers is deterministic.
- `manifest.json`: format, dtype, N, D, counts, shard list (with each shard's sha256), the index's sha256 and the
  extractor's metadata (engine, mode, weights sha256, scale rule, ...). Readers do not hash the shards (large,
  memory-mapped); `FeatureStore.verify_checksums` (`lxm inspect --verify`) does. A damaged manifest or index is
  rebuilt from the shards by `rebuild_store` (`lxm inspect --repair`) or by the next writer.
- `failures.jsonl`: one record per image (or TSV line) that could not be used, and why.
- `LOCK` (an empty file for `fcntl.flock`) and, while writers run, one `.writer-<id>` file per writer.

A shard becomes visible only complete (written under a temporary name, then renamed), so a killed writer loses at
most the shard in progress, and a new writer over the same directory skips every image already stored. Any number
of writers may share a directory at once (see `FeatureStoreWriter`); readers load manifest and index under a shared
lock, so they never pair one writer's index with another's manifest. The lock is `flock`: Linux and macOS, and NFS
where the kernel maps it onto NFS locks (Linux does since 2.6.12).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lxm import atomic, integrity
from lxm.errors import LxmError
from lxm.features.backbone import backbone_clash
from lxm.features.records import PAD_ID, ImageFeatures, RecordError
from lxm.jsonl import BadLine, read_json_lines

_logger = logging.getLogger(__name__)

STORE_FORMAT = "lxm-features"
STORE_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.arrow"
LOCK = "LOCK"  # flock'ed by writers (exclusive) and by readers loading the index (shared); kept, never deleted
WRITER_FILE = ".writer-"  # + writer id: one per live writer, flock'ed by it for life; holds its claims
FAILURES = "failures.jsonl"
DTYPES = {"float16": (pa.float16(), np.float16), "float32": (pa.float32(), np.float32)}


class StoreError(LxmError, ValueError):
    """The store directory is missing, incomplete or inconsistent; the message names the file."""


def store_schema(num_boxes: int, feature_dim: int, dtype: str) -> pa.Schema:
    feat_type = DTYPES[dtype][0]
    return pa.schema([
        ("img_id", pa.string()),
        ("img_h", pa.int32()),
        ("img_w", pa.int32()),
        ("objects_id", pa.list_(pa.int64(), num_boxes)),
        ("objects_conf", pa.list_(pa.float32(), num_boxes)),
        ("attrs_id", pa.list_(pa.int64(), num_boxes)),
        ("attrs_conf", pa.list_(pa.float32(), num_boxes)),
        ("num_boxes", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4), num_boxes)),
        ("features", pa.list_(pa.list_(feat_type, feature_dim), num_boxes)),
    ])


def _fixed(values: np.ndarray, *sizes: int) -> pa.Array:
    arr: pa.Array = pa.array(values.reshape(-1))
    for size in reversed(sizes):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def _open_stream(path: Path) -> pa.Table:
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"{path}: not a readable Arrow IPC stream ({exc})") from None


def repair_hint(root: str | os.PathLike) -> str:
    """What rebuilds a store's index.arrow and manifest.json from its finished shards (`rebuild_store`)."""
    return f"`lxm inspect --repair {root}` rebuilds it from the shards"


def _strings(column: pa.Array | pa.ChunkedArray, path: Path, name: str = "img_id") -> list[str]:
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # Arrow checks no UTF-8 when it maps a file: damage shows only here
        raise StoreError(f"{path}: column '{name}' holds bytes that are not UTF-8 (the file is damaged)") from None


def finished_shards(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.arrow") if p.name != INDEX and not p.name.startswith("."))


@contextlib.contextmanager
def store_lock(root: str | os.PathLike, *, shared: bool = False) -> Iterator[None]:
    """Hold the store directory's LOCK file (`fcntl.flock`) for the duration of the block.

    Writers take it exclusively and briefly, to change what they share: shard names, claims, index.arrow with
    manifest.json, failures.jsonl. Readers take it shared, to load manifest and index as one consistent pair. A store
    without a LOCK file (written before locking existed, or a read-only copy) is read without it: no writer of this
    version can be running there. Locks are per open file, so two blocks in one process exclude each other too
    (never nest them).
    """
    path = Path(root) / LOCK
    try:
        fd: int | None = os.open(path, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o644)
    except (FileNotFoundError, PermissionError):
        if not shared:
            raise
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _drop_bad_failure(bad: BadLine) -> None:
    _logger.warning("%s:%d: not a JSON record (cut short by a kill?); dropped", bad.path, bad.number)


def _writer_alive(path: Path) -> bool:
    """Whether the writer registered as `path` still runs: it holds an flock on the file for its whole life, and the
    kernel drops that lock when the process ends however it ends (SIGKILL included), on any host sharing the
    directory. Unlike a pid check, this cannot mistake a reused pid or another host's pid for a live writer."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class FeatureStoreWriter:
    """Append ImageFeatures to a store directory, shard by shard; resumable, and safe with concurrent writers.

    Any number of writers (processes, also on other hosts sharing the directory) may write one store at once and
    lose or duplicate nothing:

    - each writer registers as `.writer-<id>` and holds an flock on that file while it lives, so "is it alive?" is
      "is its file locked?";
    - shard names are reserved under the store's LOCK: the next `<prefix>-<seq>.arrow` after every finished or
      reserved one, the reservation being the temporary file `.<name>.tmp-<id>`; no two writers write one name;
    - temporary files are deleted only when their writer is dead (its shard in progress is redone), never a live one's;
    - `claim` hands out img_ids that no finished shard holds and no live writer has claimed (the claims are the
      content of the `.writer-<id>` file), so concurrent extractors split the work instead of repeating it;
    - `close` rebuilds index.arrow and manifest.json over every finished shard under the LOCK; an image found in two
      shards (writers that add without claiming) is indexed once, from the first shard in name order.

    Args:
        root: the store directory (created if needed).
        num_boxes, feature_dim: N and D of every record (fixed per store).
        dtype: "float16" (half the disk, what training reads) or "float32" (exact TSV round trip).
        prefix: shard name prefix (only for readable names: writers sharing one are safe).
        rows_per_shard: images per shard file (1024 x 288 KiB ~ 0.3 GB in float32).
        metadata: recorded in manifest.json under "extractor".
        backbone: the visual backend (`lxm.features.backbone.BackboneInfo.manifest()`), recorded in manifest.json
            under "backbone"; None keeps what the store's manifest says (a store without it reads as "butd"). A
            writer whose backbone differs from the store's by name, model or grid is refused (`backbone_clash`).
    """

    def __init__(self, root: str | os.PathLike, *, num_boxes: int, feature_dim: int, dtype: str = "float16",
                 prefix: str = "part", rows_per_shard: int = 1024, batch_rows: int = 64,
                 metadata: dict[str, Any] | None = None, backbone: dict[str, Any] | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if "." in prefix or "/" in prefix:
            raise ValueError(f"shard prefix must not contain '.' or '/': {prefix!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.num_boxes, self.feature_dim, self.dtype = num_boxes, feature_dim, dtype
        self.prefix, self.rows_per_shard, self.batch_rows = prefix, rows_per_shard, batch_rows
        self.metadata = dict(metadata or {})
        self.backbone = dict(backbone) if backbone is not None else None
        self.schema = store_schema(num_boxes, feature_dim, dtype)
        self.id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.done: set[str] = set()  # img_ids in any finished shard (as of the last look) or added here
        self._read: set[str] = set()  # shard files whose img_ids are in `done`
        self._claimed: set[str] = set()  # claimed here, not yet in a finished shard of this writer
        self._buffer: list[ImageFeatures] = []
        self.written = 0
        self._registration = None
        with store_lock(self.root):
            self._check_existing_manifest()
            self._refresh()
            # a file object, not a bare fd: a writer dropped without close() releases its lock like a killed one
            self._registration = open(self.root / f"{WRITER_FILE}{self.id}", "x+b")  # noqa: SIM115 (held for life)
            fcntl.flock(self._registration.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._live_writers()  # clears what dead writers left

    def _check_existing_manifest(self) -> None:
        path = self.root / MANIFEST
        if not path.exists():
            return
        try:
            old = _read_manifest(path)
        except StoreError as exc:  # rebuilt from the shards at close; their schema is checked against this writer's
            _logger.warning("%s; this writer rebuilds it from the shards when it finishes", exc)
            return
        mine = {"num_boxes": self.num_boxes, "feature_dim": self.feature_dim, "dtype": self.dtype}
        clash = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
        if clash:
            raise StoreError(f"{path}: existing store has " +
                             ", ".join(f"{k}={a!r} (requested {b!r})" for k, (a, b) in clash.items()))
        if self.backbone is not None and (why := backbone_clash(old, self.backbone)):
            raise StoreError(f"{path}: {why}; write into a new directory")

    def _refresh(self) -> None:
        """Add the img_ids of shards finished since the last look, by any writer, to `done`."""
        for shard in finished_shards(self.root):
            if shard.name in self._read:
                continue
            table = _open_stream(shard)
            if table.schema != self.schema:
                raise StoreError(f"{shard}: schema differs from this writer's (N={self.num_boxes}, "
                                 f"D={self.feature_dim}, {self.dtype}); write into a new directory")
            self.done.update(_strings(table.column("img_id"), shard))
            self._read.add(shard.name)

    def _live_writers(self) -> dict[str, Path]:
        """The other live writers (id -> registration file). A dead writer's file is deleted (its claims lapse) and so
        are the temporary files no live writer owns: a dead writer's shard in progress, an index or manifest write
        cut short (those are written only under the LOCK, which the caller holds)."""
        live: dict[str, Path] = {}
        for path in self.root.glob(f"{WRITER_FILE}*"):
            wid = path.name[len(WRITER_FILE):]
            if wid == self.id:
                continue
            if _writer_alive(path):
                live[wid] = path
            else:
                path.unlink(missing_ok=True)
        owners = set(live) | {self.id}
        for tmp in [*self.root.glob(".*.arrow.tmp-*"), *self.root.glob(f".{MANIFEST}.tmp-*")]:
            if tmp.name.rsplit(".tmp-", 1)[1] not in owners:
                tmp.unlink(missing_ok=True)
        return live

    def _write_claims(self) -> None:
        # rewritten in place, not replaced: the flock belongs to this inode; readers read it only under the LOCK
        reg = self._registration
        assert reg is not None, "writer is closed"
        reg.seek(0)
        reg.truncate()
        reg.write(json.dumps(sorted(self._claimed)).encode())
        reg.flush()

    def claim(self, candidates: deque[str], limit: int) -> list[str]:
        """Take up to `limit` img_ids from the left of `candidates` for this writer to produce, and return them.

        Ids already stored are dropped. Ids another live writer has claimed are moved to the right end: they are
        offered again on later calls, in case that writer dies. Returns [] once every remaining candidate is held
        by another live writer (or none remains). A claim lasts until this writer's shard holding the image is
        finished, or until the writer closes or dies (so an image that failed here is not retried by another
        concurrent writer).
        """
        with store_lock(self.root):
            self._refresh()
            held: set[str] = set()
            for path in self._live_writers().values():
                try:
                    text = path.read_text()
                except FileNotFoundError:  # closed since: its shards are finished, _refresh saw them
                    continue
                held.update(json.loads(text) if text else [])
            got: list[str] = []
            skipped: list[str] = []
            while candidates and len(got) < limit:
                img_id = candidates.popleft()
                if img_id in self.done or img_id in self._claimed:
                    continue
                (skipped if img_id in held else got).append(img_id)
            candidates.extend(skipped)
            if got:
                self._claimed.update(got)
                self._write_claims()
        return got

    def __contains__(self, img_id: str) -> bool:
        return img_id in self.done

    def add(self, rec: ImageFeatures) -> None:
        """Buffer one record of 1..N boxes (fewer than N are padded in the shard; `num_boxes` keeps the count)."""
        rec.validate()
        if not 1 <= rec.num_boxes <= self.num_boxes or rec.features.shape[1] != self.feature_dim:
            raise RecordError(f"image {rec.img_id!r}: has {rec.num_boxes} boxes x {rec.features.shape[1]} features; "
                              f"this store holds 1 to {self.num_boxes} boxes x {self.feature_dim}")
        if rec.img_id in self.done:
            raise RecordError(f"image {rec.img_id!r}: already in the store {self.root}")
        self.done.add(rec.img_id)
        self._buffer.append(rec)
        if len(self._buffer) >= self.rows_per_shard:
            self._flush()

    def _batch(self, recs: list[ImageFeatures]) -> pa.RecordBatch:
        n, d = self.num_boxes, self.feature_dim
        np_dtype = DTYPES[self.dtype][1]

        def stack(name: str, dtype, fill) -> np.ndarray:
            """The records' `name` arrays as [len(recs), N, ...]: a record of K < N boxes padded with `fill`."""
            rows = [np.asarray(getattr(r, name)) for r in recs]
            out = np.full((len(rows), n, *rows[0].shape[1:]), fill, dtype=dtype)
            for i, row in enumerate(rows):
                out[i, :row.shape[0]] = row
            return out

        cols = [
            pa.array([r.img_id for r in recs], pa.string()),
            pa.array([r.img_h for r in recs], pa.int32()),
            pa.array([r.img_w for r in recs], pa.int32()),
            _fixed(stack("objects_id", np.int64, PAD_ID), n),
            _fixed(stack("objects_conf", np.float32, 0.0), n),
            _fixed(stack("attrs_id", np.int64, PAD_ID), n),
            _fixed(stack("attrs_conf", np.float32, 0.0), n),
            pa.array([r.num_boxes for r in recs], pa.int32()),
            _fixed(stack("boxes", np.float32, 0.0), n, 4),
            _fixed(stack("features", np_dtype, 0.0), n, d),
        ]
        return pa.RecordBatch.from_arrays(cols, schema=self.schema)

    def _reserve_name(self) -> str:
        """The next shard name after every finished or reserved one of this prefix, reserved by creating its
        temporary file (call under the LOCK). Names thus sort in the order writers began them."""
        pattern = re.compile(rf"\.?{re.escape(self.prefix)}-(\d+)\.arrow(\.tmp-.+)?")
        seqs = [int(m.group(1)) for p in self.root.iterdir() if (m := pattern.fullmatch(p.name))]
        name = f"{self.prefix}-{max(seqs, default=-1) + 1:05d}.arrow"
        (self.root / f".{name}.tmp-{self.id}").touch(exist_ok=False)
        return name

    def _flush(self) -> None:
        if not self._buffer:
            return
        with store_lock(self.root):
            name = self._reserve_name()
        tmp = self.root / f".{name}.tmp-{self.id}"
        try:  # the shard appears only complete
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, self.schema) as writer:
                for start in range(0, len(self._buffer), self.batch_rows):
                    writer.write_batch(self._batch(self._buffer[start:start + self.batch_rows]))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            # the checksum first: a shard is never visible without it (a kill in between leaves only a sidecar
            # of a name the next writer reuses)
            integrity.record_checksum(self.root / name, integrity.sha256_file(tmp))
            os.replace(tmp, self.root / name)
        finally:
            tmp.unlink(missing_ok=True)
        self._read.add(name)
        self._claimed.difference_update(r.img_id for r in self._buffer)
        self.written += len(self._buffer)
        self._buffer = []

    def update_failures(self, attempted: Iterable[str], failures: list[dict[str, Any]]) -> Path:
        """Rewrite failures.jsonl to hold one record per image that failed and is not stored.

        Earlier records of the images in `attempted` (tried by this writer: they failed again, or now succeeded)
        give way to `failures` ({"image", "img_id", "reason"} each); records of images now in the store are dropped;
        records of other images stay. Records are keyed by img_id (by "image" when they have none).
        """
        path = self.root / FAILURES
        attempted = set(attempted)
        with store_lock(self.root):
            self._refresh()
            records: dict[str, dict[str, Any]] = {}
            if path.exists():
                for _, rec in read_json_lines(path, on_bad=_drop_bad_failure):
                    if isinstance(rec, dict):
                        records[str(rec.get("img_id") or rec.get("image"))] = rec
            records = {k: r for k, r in records.items() if k not in attempted and k not in self.done}
            records.update((str(r.get("img_id") or r.get("image")), r) for r in failures)
            atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in records.values()))
        return path

    def close(self, finalize: bool = True) -> dict[str, Any] | None:
        """Write the last shard; with `finalize`, (re)build index.arrow and manifest.json over all shards. Then
        release this writer's claims."""
        if self._registration is None:
            return None
        try:
            self._flush()
            return finalize_store(self.root, metadata=self.metadata, backbone=self.backbone) if finalize else None
        finally:
            with store_lock(self.root):
                (self.root / f"{WRITER_FILE}{self.id}").unlink(missing_ok=True)
                self._registration.close()
                self._registration = None

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error keep what is complete (finished shards) but do not publish a manifest for a partial run.
        self.close(finalize=exc_type is None)


def finalize_store(root: str | os.PathLike, metadata: dict[str, Any] | None = None,
                   backbone: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build index.arrow and manifest.json from the finished shards (sorted by name: deterministic), under the
    store's LOCK, so concurrent writers never interleave the two files and readers see them as one pair."""
    root = Path(root)
    with store_lock(root):
        return _finalize(root, metadata, backbone)


def _finalize(root: Path, metadata: dict[str, Any] | None, backbone: dict[str, Any] | None = None) -> dict[str, Any]:
    shards = finished_shards(root)
    if not shards:
        raise StoreError(f"{root}: no finished shards to index")
    ids: list[str] = []
    shard_col: list[int] = []
    row_col: list[int] = []
    entries = []
    seen: dict[str, str] = {}
    repeats: list[tuple[str, str, str]] = []
    schema = None
    for i, shard in enumerate(shards):
        table = _open_stream(shard)
        if schema is None:
            schema = table.schema
        elif table.schema != schema:
            raise StoreError(f"{shard}: schema differs from {shards[0].name}")
        shard_ids = _strings(table.column("img_id"), shard)
        for j, img_id in enumerate(shard_ids):
            if img_id in seen:
                repeats.append((img_id, seen[img_id], shard.name))
                continue
            seen[img_id] = shard.name
            ids.append(img_id)
            shard_col.append(i)
            row_col.append(j)
        entry = {"file": shard.name, "rows": len(shard_ids)}
        digest = integrity.recorded_checksum(shard)  # recorded when its writer finished it (none in older stores)
        if digest is not None:
            entry["sha256"] = digest
        entries.append(entry)
    if repeats:
        img_id, first, again = repeats[0]
        _logger.warning("%s: %d rows repeat an image stored earlier (e.g. %r in %s and %s); indexed once, from the "
                        "first shard", root, len(repeats), img_id, first, again)
    assert schema is not None
    feat_type = schema.field("features").type
    num_boxes, feature_dim = feat_type.list_size, feat_type.value_type.list_size
    dtype = {pa.float16(): "float16", pa.float32(): "float32"}[feat_type.value_type.value_type]
    index = pa.table({"img_id": pa.array(ids, pa.string()), "shard": pa.array(shard_col, pa.int32()),
                      "row": pa.array(row_col, pa.int32())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, index.schema) as writer:
        writer.write_table(index)
    index_bytes = sink.getvalue().to_pybytes()
    atomic.write_bytes(root / INDEX, index_bytes)
    old: dict[str, Any] = {}
    if (root / MANIFEST).exists():
        try:
            old = _read_manifest(root / MANIFEST)
        except StoreError as exc:
            _logger.warning("%s; rebuilt from the shards%s", exc,
                            "" if metadata else " (the extractor's metadata it held is lost)")
    from lxm import __version__

    manifest = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "lxm_version": __version__,
        "num_images": len(ids), "num_boxes": num_boxes, "feature_dim": feature_dim, "dtype": dtype,
        "shards": entries, "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
        "extractor": metadata if metadata else old.get("extractor", {}),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # a store written before backends has none (it reads as "butd"); a writer that extracted nothing (no metadata:
    # it loaded no weights) keeps the recorded one, which names the weights' sha256
    chosen = backbone if backbone and (metadata or not old.get("backbone")) else old.get("backbone")
    if chosen:
        manifest["backbone"] = chosen
    atomic.write_bytes(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    """manifest.json, checked field by field: a damaged one is a StoreError naming it, never a KeyError later."""
    hint = repair_hint(path.parent)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: not valid JSON ({exc}); {hint}") from None
    except UnicodeDecodeError:
        raise StoreError(f"{path}: not UTF-8 text; {hint}") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{path}: expected a JSON object; {hint}")
    if manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: format is {manifest.get('format')!r}, not {STORE_FORMAT!r}")
    for name in ("num_images", "num_boxes", "feature_dim"):
        if not isinstance(manifest.get(name), int) or isinstance(manifest[name], bool) or manifest[name] < 0:
            raise StoreError(f"{path}: field '{name}' must be a non-negative integer, got {manifest.get(name)!r}")
    if not isinstance(manifest.get("dtype"), str) or manifest["dtype"] not in DTYPES:
        raise StoreError(f"{path}: field 'dtype' must be one of {', '.join(DTYPES)}, got {manifest.get('dtype')!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                               and isinstance(e.get("rows"), int) for e in shards):
        raise StoreError(f"{path}: field 'shards' must be a list of {{'file': name, 'rows': count}}; {hint}")
    if sum(e["rows"] for e in shards) < manifest["num_images"]:
        raise StoreError(f"{path}: lists {len(shards)} shard(s) with {sum(e['rows'] for e in shards)} rows for "
                         f"{manifest['num_images']} images; {hint}")
    return manifest


def live_writers(root: str | os.PathLike) -> int:
    """How many writers are filling the store now (each holds the flock of its `.writer-<id>` file while it runs)."""
    return sum(_writer_alive(p) for p in Path(root).glob(f"{WRITER_FILE}*"))


def rebuild_store(root: str | os.PathLike) -> dict[str, Any]:
    """Rebuild index.arrow and manifest.json from the finished shards (a damaged or missing manifest or index:
    `lxm inspect --repair`); the extractor's metadata is kept when the old manifest still reads. Safe while writers
    run: they finalize the same way, under the same lock. Returns the new manifest."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: no such directory")
    return finalize_store(root)


class FeatureStore:
    """Read-only, memory-mapped access to a store by img_id or position.

    Only the directory path is pickled, so DataLoader workers reopen the memory maps instead of copying features.
    Returned arrays are read-only views into the mapped shards (features keep the store's dtype).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.exists():
            hint = ""
            if self.root.is_dir() and (running := live_writers(self.root)):
                hint = (f" ({running} writer{' is' if running == 1 else 's are'} running and fill it: it is "
                        f"readable once they finish)")
            elif self.root.is_dir() and finished_shards(self.root):
                hint = (f" (shards exist: the writer did not finish; re-run the same command to resume, or "
                        f"{repair_hint(self.root)})")
            raise StoreError(f"{self.root}: not a feature store: {MANIFEST} missing{hint}")
        self.manifest = _read_manifest(path)
        self._ids: list[str] | None = None
        self._pos: dict[str, int] | None = None
        self._shard_of: np.ndarray | None = None
        self._row_of: np.ndarray | None = None
        self._tables: dict[int, tuple[list[int], list[dict[str, Any] | None], pa.Table]] = {}

    # pickling: the path only
    def __getstate__(self) -> dict[str, str]:
        return {"root": str(self.root)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["root"])

    @property
    def num_boxes(self) -> int:
        return int(self.manifest["num_boxes"])

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    def _load_index(self) -> None:
        if self._ids is not None:
            return
        path = self.root / INDEX
        with store_lock(self.root, shared=True):  # writers replace index and manifest together under the lock
            self.manifest = _read_manifest(self.root / MANIFEST)
            table = _open_stream(path)
        if table.column_names != ["img_id", "shard", "row"]:
            raise StoreError(f"{path}: columns {table.column_names}, expected img_id, shard, row")
        if table.num_rows != self.manifest["num_images"]:  # a stream cut at a batch boundary still reads
            raise StoreError(f"{path}: has {table.num_rows} images, {MANIFEST} says {self.manifest['num_images']} "
                             f"(truncated? {repair_hint(self.root)})")
        ids = _strings(table.column("img_id"), path)
        shard_of = table.column("shard").to_numpy()
        row_of = table.column("row").to_numpy()
        rows = np.array([e["rows"] for e in self.manifest["shards"]] + [0], np.int64)  # last: no shard, no row
        listed = (shard_of >= 0) & (shard_of < len(rows) - 1)
        bad = ~listed | (row_of < 0) | (row_of >= rows[np.where(listed, shard_of, -1)])
        if bad.any():
            i = int(np.argmax(bad))
            raise StoreError(f"{path}: image {ids[i]!r} points at shard {int(shard_of[i])} row {int(row_of[i])}, "
                             f"which {MANIFEST} does not list (damaged; {repair_hint(self.root)})")
        self._ids, self._shard_of, self._row_of = ids, shard_of, row_of
        self._pos = {img_id: i for i, img_id in enumerate(self._ids)}

    def ids(self) -> list[str]:
        self._load_index()
        assert self._ids is not None
        return list(self._ids)

    def __len__(self) -> int:
        return int(self.manifest["num_images"])

    def __contains__(self, img_id: str) -> bool:
        self._load_index()
        assert self._pos is not None
        return img_id in self._pos

    def _shard(self, i: int):
        if i not in self._tables:
            entry = self.manifest["shards"][i]
            path = self.root / entry["file"]
            table = _open_stream(path)
            if table.num_rows != entry["rows"]:  # a stream cut at a batch boundary still reads
                raise StoreError(f"{path}: has {table.num_rows} images, {MANIFEST} says {entry['rows']} (truncated?)")
            if table.schema != store_schema(self.num_boxes, self.feature_dim, self.dtype):
                raise StoreError(f"{path}: schema differs from the one {MANIFEST} describes (N={self.num_boxes}, "
                                 f"D={self.feature_dim}, {self.dtype})")
            starts, total = [], 0
            for batch_len in (len(c) for c in table.column("img_id").chunks):
                starts.append(total)
                total += batch_len
            self._tables[i] = (starts, [None] * len(starts), table)
        return self._tables[i]

    def _views(self, shard: int, chunk: int) -> dict[str, Any]:
        starts, views, table = self._shard(shard)
        if views[chunk] is None:
            n, d = self.num_boxes, self.feature_dim

            def flat(name: str, *shape: int) -> np.ndarray:
                arr = table.column(name).chunk(chunk)
                for _ in shape:
                    arr = arr.flatten()
                return arr.to_numpy(zero_copy_only=True).reshape(-1, *shape)

            path = self.root / self.manifest["shards"][shard]["file"]
            views[chunk] = {
                "img_id": _strings(table.column("img_id").chunk(chunk), path),
                "img_h": table.column("img_h").chunk(chunk).to_numpy(),
                "img_w": table.column("img_w").chunk(chunk).to_numpy(),
                "objects_id": flat("objects_id", n), "objects_conf": flat("objects_conf", n),
                "attrs_id": flat("attrs_id", n), "attrs_conf": flat("attrs_conf", n),
                "boxes": flat("boxes", n, 4), "features": flat("features", n, d),
                "num_boxes": table.column("num_boxes").chunk(chunk).to_numpy(),
            }
        return views[chunk]  # type: ignore[return-value]

    def at(self, position: int) -> ImageFeatures:
        """The record at `position` in index order: its `num_boxes` real boxes (K <= N rows; padding is not read)."""
        self._load_index()
        assert self._shard_of is not None and self._row_of is not None
        shard, row = int(self._shard_of[position]), int(self._row_of[position])
        starts = self._shard(shard)[0]
        chunk = bisect.bisect_right(starts, row) - 1
        v = self._views(shard, chunk)
        i = row - starts[chunk]
        k = int(v["num_boxes"][i])
        if not 1 <= k <= self.num_boxes:
            path = self.root / self.manifest["shards"][shard]["file"]
            raise StoreError(f"{path}: row {row} (image {v['img_id'][i]!r}): field 'num_boxes' is {k}, outside "
                             f"1..{self.num_boxes} (damaged)")
        return ImageFeatures(img_id=v["img_id"][i], img_h=int(v["img_h"][i]), img_w=int(v["img_w"][i]),
                             objects_id=v["objects_id"][i, :k], objects_conf=v["objects_conf"][i, :k],
                             attrs_id=v["attrs_id"][i, :k], attrs_conf=v["attrs_conf"][i, :k], boxes=v["boxes"][i, :k],
                             features=v["features"][i, :k])

    def get(self, img_id: str) -> ImageFeatures:
        """The record of `img_id`; StoreError (bad input, not a KeyError) when the store does not hold it."""
        self._load_index()
        assert self._pos is not None
        position = self._pos.get(img_id)
        if position is None:
            raise StoreError(f"no image {img_id!r} in {self.root}")
        return self.at(position)

    def verify(self) -> None:
        """Open the index and every shard and check their row counts against the manifest (cheap: memory maps,
        no feature is read); raises StoreError naming the damaged file."""
        self._load_index()
        for i in range(len(self.manifest["shards"])):
            self._shard(i)

    def verify_checksums(self, on_file: Callable[[str], None] | None = None) -> dict[str, list[str]]:
        """Read every shard and the index whole and compare their sha256 with what the writer recorded (the shard's
        `NAME.sha256` sidecar and the manifest; the index's in the manifest). Slow: it reads every byte.

        Returns {"ok": [...], "damaged": ["FILE: why", ...], "unchecked": [...]} by file name; "unchecked" are files
        without a recorded checksum (written by an lxm that recorded none). `on_file(name)` follows the progress.
        """
        report: dict[str, list[str]] = {"ok": [], "damaged": [], "unchecked": []}
        index = self.root / INDEX
        want = self.manifest.get("index_sha256")
        if not isinstance(want, str):
            report["unchecked"].append(INDEX)
        elif not index.is_file():
            report["damaged"].append(f"{index}: missing ({repair_hint(self.root)})")
        elif (have := integrity.sha256_file(index)) != want:
            report["damaged"].append(f"{index}: sha256 {have[:12]}... differs from the {want[:12]}... in {MANIFEST} "
                                     f"({repair_hint(self.root)})")
        else:
            report["ok"].append(INDEX)
        for entry in self.manifest["shards"]:
            kind, line = self._check_shard(entry)
            report[kind].append(line)
            if on_file is not None:
                on_file(entry["file"])
        return report

    def _check_shard(self, entry: dict[str, Any]) -> tuple[str, str]:
        path = self.root / entry["file"]
        try:
            recorded = integrity.recorded_checksum(path)
            want = entry.get("sha256") or recorded
            if want is None:
                return "unchecked", entry["file"]
            have = integrity.sha256_file(path)
        except integrity.IntegrityError as exc:
            return "damaged", str(exc)
        except OSError as exc:
            return "damaged", f"{path}: {exc.strerror or exc}"
        if have != want or (recorded is not None and recorded != want):
            return "damaged", (f"{path}: damaged after it was written: sha256 {have[:12]}... differs from the "
                               f"{want[:12]}... recorded (delete it and re-run the writer: its images are extracted "
                               f"again)")
        return "ok", entry["file"]

    def __iter__(self) -> Iterator[ImageFeatures]:
        for i in range(len(self)):
            yield self.at(i)


def store_index(stores: list[FeatureStore]) -> dict[str, int]:
    """img_id -> position of the first store that holds it (several stores serve one dataset)."""
    where: dict[str, int] = {}
    for k, store in enumerate(stores):
        for img_id in store.ids():
            where.setdefault(img_id, k)
    return where


def read_normalized(store: FeatureStore, img_id: str) -> tuple[ImageFeatures, np.ndarray]:
    """(record, boxes as LXMERT feeds them); a box outside its image is an error naming the store and image."""
    rec = store.get(img_id)
    try:
        return rec, rec.normalized_boxes()
    except RecordError as exc:
        raise RecordError(f"{store.root}: {exc}") from None
