"""Checksums of what lxm writes, so that a file damaged after it was written is refused instead of used.

torch's zip reader checks no CRC and safetensors/Arrow readers check no content checksum: 256 random bytes inside a
checkpoint, a model file or a feature shard load without a word and change results. Each such file gets a sidecar
`NAME.sha256` in `sha256sum`'s format (`HEX  NAME`), so `sha256sum -c NAME.sha256` checks it outside lxm too; the
readers (resume, `--init`, `ask --model`, `predict`, `lxm inspect --verify`) compare before using the file.

A file without a sidecar (written by an older lxm, or by another tool) is used as it is: there is nothing to compare.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from lxm import atomic
from lxm.errors import LxmError

SUFFIX = ".sha256"
_CHUNK = 8 << 20


class IntegrityError(LxmError):
    """A file's content differs from the checksum recorded when lxm wrote it; the message names the file."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sidecar(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def record_checksum(path: str | os.PathLike, digest: str | None = None) -> str:
    """Write `path`'s sidecar (atomically) and return the hex digest (`digest` when the caller computed it)."""
    path = Path(path)
    digest = digest or sha256_file(path)
    atomic.write_text(sidecar(path), f"{digest}  {path.name}\n")
    return digest


@contextlib.contextmanager
def checksummed_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """`lxm.atomic.atomic_path` that also records the new file's checksum. The old sidecar goes first and the new one
    is written after the rename, so a crash in between leaves a file without a sidecar (used unchecked), never a
    file beside another file's checksum (which would read as damage)."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        sidecar(path).unlink()
    with atomic.atomic_path(path, fsync=fsync) as tmp:
        yield tmp
        digest = sha256_file(tmp)
    record_checksum(path, digest)


def recorded_checksum(path: str | os.PathLike) -> str | None:
    """The digest in `path`'s sidecar, or None when there is none; a sidecar that is not one is an IntegrityError."""
    side = sidecar(path)
    try:
        text = side.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    digest = text.split(maxsplit=1)[0].lower() if text.strip() else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise IntegrityError(f"{side}: not a sha256 checksum file (expected 'HEX  {Path(path).name}')")
    return digest


def verify_checksum(path: str | os.PathLike, *, required: bool = False) -> bool:
    """Compare `path` with its sidecar. True: it matches; False: no sidecar (and not `required`).
    Raises IntegrityError naming the file when it differs (or has no sidecar while `required`)."""
    path = Path(path)
    want = recorded_checksum(path)
    if want is None:
        if required:
            raise IntegrityError(f"{path}: no recorded checksum ({sidecar(path).name} is missing)")
        return False
    have = sha256_file(path)
    if have != want:
        raise IntegrityError(f"{path}: damaged after it was written: its sha256 {have[:12]}... differs from the "
                             f"{want[:12]}... recorded in {sidecar(path).name}")
    return True
