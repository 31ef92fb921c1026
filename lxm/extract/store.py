"""The feature store: region features as memory-mapped Arrow IPC shards with an img_id index.

Replaces LXMERT's practice of decoding whole base64 TSVs into Python lists in RAM (airsplay/lxmert `src/utils.py`
`load_obj_tsv`; 80 GB for pretraining, 207 GB with 4 DataLoader workers, #37/#79/#105). Layout of a store directory:

- `part-*.arrow` shards in Arrow IPC *stream* format (what HF `datasets` reads with `Dataset.from_file`), columns
  named as the TSV fields: `img_id` string, `img_h`/`img_w`/`num_boxes` int32, `objects_id`/`attrs_id` int64[N],
  `objects_conf`/`attrs_conf` float32[N], `boxes` float32[N][4], `features` float16|float32[N][D] (fixed-size lists,
  so a row is addressable without offsets). Record batches of `batch_rows` rows (64 × 288 KiB ≈ 18 MB).
- `index.arrow`: img_id -> (shard, row), in shard-name order, so the merge of many writers is deterministic.
- `manifest.json`: format, dtype, N, D, counts, shard list and the extractor's metadata (engine, mode, weights
  sha256, scale rule, ...).

A shard becomes visible only complete (written under a temporary name, then renamed), so a killed writer loses at
most the shard in progress, and a new writer over the same directory skips every image already stored.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lxm import atomic
from lxm.extract.records import ImageFeatures, RecordError

_logger = logging.getLogger(__name__)

STORE_FORMAT = "lxm-features"
STORE_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.arrow"
DTYPES = {"float16": (pa.float16(), np.float16), "float32": (pa.float32(), np.float32)}


class StoreError(ValueError):
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


def finished_shards(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.arrow") if p.name != INDEX and not p.name.startswith("."))


class FeatureStoreWriter:
    """Append ImageFeatures to a store directory, shard by shard; resumable.

    Args:
        root: the store directory (created if needed).
        num_boxes, feature_dim: N and D of every record (fixed per store).
        dtype: "float16" (half the disk, what training reads) or "float32" (exact TSV round trip).
        prefix: shard name prefix; parallel writers into one directory use distinct prefixes.
        rows_per_shard: images per shard file (1024 x 288 KiB ~ 0.3 GB in float32).
        metadata: recorded in manifest.json under "extractor".
    """

    def __init__(self, root: str | os.PathLike, *, num_boxes: int, feature_dim: int, dtype: str = "float16",
                 prefix: str = "part", rows_per_shard: int = 1024, batch_rows: int = 64,
                 metadata: dict[str, Any] | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if "." in prefix or "/" in prefix:
            raise ValueError(f"shard prefix must not contain '.' or '/': {prefix!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.num_boxes, self.feature_dim, self.dtype = num_boxes, feature_dim, dtype
        self.prefix, self.rows_per_shard, self.batch_rows = prefix, rows_per_shard, batch_rows
        self.metadata = dict(metadata or {})
        self.schema = store_schema(num_boxes, feature_dim, dtype)
        self._check_existing_manifest()
        for stale in self.root.glob(f".{prefix}-*.arrow.tmp*"):
            stale.unlink()  # the shard a killed writer was writing; its images are redone
        self.done: set[str] = set()
        self._seq = 0
        for shard in finished_shards(self.root):
            table = _open_stream(shard)
            if table.schema != self.schema:
                raise StoreError(f"{shard}: schema differs from this writer's (N={num_boxes}, D={feature_dim}, "
                                 f"{dtype}); write into a new directory")
            self.done.update(table.column("img_id").to_pylist())
            if shard.name.startswith(prefix + "-"):
                self._seq = max(self._seq, int(shard.stem.rsplit("-", 1)[1]) + 1)
        self._buffer: list[ImageFeatures] = []
        self.written = 0

    def _check_existing_manifest(self) -> None:
        path = self.root / MANIFEST
        if not path.exists():
            return
        old = json.loads(path.read_text())
        mine = {"num_boxes": self.num_boxes, "feature_dim": self.feature_dim, "dtype": self.dtype}
        clash = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
        if clash:
            raise StoreError(f"{path}: existing store has " +
                             ", ".join(f"{k}={a!r} (requested {b!r})" for k, (a, b) in clash.items()))

    def __contains__(self, img_id: str) -> bool:
        return img_id in self.done

    def add(self, rec: ImageFeatures) -> None:
        rec.validate()
        if rec.num_boxes != self.num_boxes or rec.features.shape[1] != self.feature_dim:
            raise RecordError(f"image {rec.img_id!r}: has {rec.num_boxes} boxes x {rec.features.shape[1]} features; "
                              f"this store holds exactly {self.num_boxes} x {self.feature_dim}")
        if rec.img_id in self.done:
            raise RecordError(f"image {rec.img_id!r}: already in the store {self.root}")
        self.done.add(rec.img_id)
        self._buffer.append(rec)
        if len(self._buffer) >= self.rows_per_shard:
            self._flush()

    def _batch(self, recs: list[ImageFeatures]) -> pa.RecordBatch:
        n, d = self.num_boxes, self.feature_dim
        np_dtype = DTYPES[self.dtype][1]
        cols = [
            pa.array([r.img_id for r in recs], pa.string()),
            pa.array([r.img_h for r in recs], pa.int32()),
            pa.array([r.img_w for r in recs], pa.int32()),
            _fixed(np.stack([r.objects_id for r in recs]).astype(np.int64), n),
            _fixed(np.stack([r.objects_conf for r in recs]).astype(np.float32), n),
            _fixed(np.stack([r.attrs_id for r in recs]).astype(np.int64), n),
            _fixed(np.stack([r.attrs_conf for r in recs]).astype(np.float32), n),
            pa.array([n] * len(recs), pa.int32()),
            _fixed(np.stack([r.boxes for r in recs]).astype(np.float32), n, 4),
            _fixed(np.stack([r.features for r in recs]).astype(np_dtype), n, d),
        ]
        return pa.RecordBatch.from_arrays(cols, schema=self.schema)

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"{self.prefix}-{self._seq:05d}.arrow"
        with atomic.atomic_path(self.root / name, fsync=True) as tmp:  # the shard appears only complete
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, self.schema) as writer:
                for start in range(0, len(self._buffer), self.batch_rows):
                    writer.write_batch(self._batch(self._buffer[start:start + self.batch_rows]))
        self.written += len(self._buffer)
        self._buffer = []
        self._seq += 1

    def close(self, finalize: bool = True) -> dict[str, Any] | None:
        """Write the last shard; with `finalize`, (re)build index.arrow and manifest.json over all shards."""
        self._flush()
        return finalize_store(self.root, metadata=self.metadata) if finalize else None

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error keep what is complete (finished shards) but do not publish a manifest for a partial run.
        self.close(finalize=exc_type is None)


def finalize_store(root: str | os.PathLike, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build index.arrow and manifest.json from the finished shards (sorted by name: deterministic)."""
    root = Path(root)
    shards = finished_shards(root)
    if not shards:
        raise StoreError(f"{root}: no finished shards to index")
    ids: list[str] = []
    shard_col: list[int] = []
    row_col: list[int] = []
    entries = []
    seen: dict[str, str] = {}
    schema = None
    for i, shard in enumerate(shards):
        table = _open_stream(shard)
        if schema is None:
            schema = table.schema
        elif table.schema != schema:
            raise StoreError(f"{shard}: schema differs from {shards[0].name}")
        shard_ids = table.column("img_id").to_pylist()
        for j, img_id in enumerate(shard_ids):
            if img_id in seen:
                raise StoreError(f"{root}: image {img_id!r} is stored twice ({seen[img_id]} and {shard.name})")
            seen[img_id] = shard.name
        ids += shard_ids
        shard_col += [i] * len(shard_ids)
        row_col += list(range(len(shard_ids)))
        entries.append({"file": shard.name, "rows": len(shard_ids)})
    assert schema is not None
    feat_type = schema.field("features").type
    num_boxes, feature_dim = feat_type.list_size, feat_type.value_type.list_size
    dtype = {pa.float16(): "float16", pa.float32(): "float32"}[feat_type.value_type.value_type]
    index = pa.table({"img_id": pa.array(ids, pa.string()), "shard": pa.array(shard_col, pa.int32()),
                      "row": pa.array(row_col, pa.int32())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, index.schema) as writer:
        writer.write_table(index)
    atomic.write_bytes(root / INDEX, sink.getvalue().to_pybytes())
    old = {}
    if (root / MANIFEST).exists():
        old = json.loads((root / MANIFEST).read_text())
    from lxm import __version__

    manifest = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "lxm_version": __version__,
        "num_images": len(ids), "num_boxes": num_boxes, "feature_dim": feature_dim, "dtype": dtype,
        "shards": entries, "extractor": metadata if metadata else old.get("extractor", {}),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic.write_bytes(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


class FeatureStore:
    """Read-only, memory-mapped access to a store by img_id or position.

    Only the directory path is pickled, so DataLoader workers reopen the memory maps instead of copying features.
    Returned arrays are read-only views into the mapped shards (features keep the store's dtype).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.exists():
            hint = " (shards exist: the writer did not finish; re-run the same command to resume)" \
                if self.root.is_dir() and finished_shards(self.root) else ""
            raise StoreError(f"{self.root}: not a feature store: {MANIFEST} missing{hint}")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: format is {self.manifest.get('format')!r}, not {STORE_FORMAT!r}")
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
        table = _open_stream(self.root / INDEX)
        self._ids = table.column("img_id").to_pylist()
        self._shard_of = table.column("shard").to_numpy()
        self._row_of = table.column("row").to_numpy()
        self._pos = {img_id: i for i, img_id in enumerate(self._ids)}
        if len(self._ids) != self.manifest["num_images"]:
            raise StoreError(f"{self.root}: index has {len(self._ids)} images, manifest says "
                             f"{self.manifest['num_images']}")

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
            table = _open_stream(self.root / self.manifest["shards"][i]["file"])
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

            views[chunk] = {
                "img_id": table.column("img_id").chunk(chunk).to_pylist(),
                "img_h": table.column("img_h").chunk(chunk).to_numpy(),
                "img_w": table.column("img_w").chunk(chunk).to_numpy(),
                "objects_id": flat("objects_id", n), "objects_conf": flat("objects_conf", n),
                "attrs_id": flat("attrs_id", n), "attrs_conf": flat("attrs_conf", n),
                "boxes": flat("boxes", n, 4), "features": flat("features", n, d),
            }
        return views[chunk]  # type: ignore[return-value]

    def at(self, position: int) -> ImageFeatures:
        """The record at `position` in index order."""
        self._load_index()
        assert self._shard_of is not None and self._row_of is not None
        shard, row = int(self._shard_of[position]), int(self._row_of[position])
        starts = self._shard(shard)[0]
        chunk = bisect.bisect_right(starts, row) - 1
        v = self._views(shard, chunk)
        i = row - starts[chunk]
        return ImageFeatures(img_id=v["img_id"][i], img_h=int(v["img_h"][i]), img_w=int(v["img_w"][i]),
                             objects_id=v["objects_id"][i], objects_conf=v["objects_conf"][i],
                             attrs_id=v["attrs_id"][i], attrs_conf=v["attrs_conf"][i], boxes=v["boxes"][i],
                             features=v["features"][i])

    def get(self, img_id: str) -> ImageFeatures:
        self._load_index()
        assert self._pos is not None
        try:
            return self.at(self._pos[img_id])
        except KeyError:
            raise KeyError(f"{self.root}: no features for image {img_id!r}") from None

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
