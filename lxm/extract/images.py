"""Image decoding and Caffe-style preprocessing for the detector.

Reproduces `_get_image_blob` of py-faster-rcnn `lib/fast_rcnn/test.py` as the BUTD extraction ran it (detector spec
§1.1): `cv2.imread` (BGR; EXIF orientation applied; grayscale, 16-bit and alpha images become 8-bit BGR), float32,
subtract the Caffe pixel mean BEFORE resizing, one scale `s = 600 / short side`, reduced so the long side stays
<= 1000, `cv2.resize(fx=s, fy=s, INTER_LINEAR)` on the float image. (The transformers FRCNN demo fed RGB by mistake,
transformers #8333; the channel order here is tested.)
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from lxm.errors import LxmError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(LxmError, ValueError):
    """An image or the image folder could not be used; the message says why. A bad image is recorded in
    failures.jsonl and the run goes on; a bad folder (missing, two images with one img_id) stops it."""


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files in `folder` and all its subfolders, sorted by path relative to `folder` (every worker sees the
    same order, so `--shard i/n` splits disjointly).

    Subfolders are searched because the datasets ship that way (Visual Genome unpacks to `VG_100K/` and
    `VG_100K_2/`). Names starting with "." (`.ipynb_checkpoints/`, macOS `._x.jpg`) are skipped. Symlinked folders
    are followed, each real folder once. The img_id is the file stem, so two files with one stem are an error naming
    both: which one LXMERT's annotations mean cannot be told.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a directory")
    found: list[tuple[str, Path]] = []
    visited: set[tuple[int, int]] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in visited:  # a symlink loop or a second link to a folder already listed
            dirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                path = Path(top, name)
                found.append((path.relative_to(folder).as_posix(), path))
    found.sort()
    by_id: dict[str, Path] = {}
    for _, path in found:
        other = by_id.setdefault(path.stem, path)
        if other is not path:
            raise ImageError(f"{folder}: two images have the img_id {path.stem!r}: {other.relative_to(folder)} and "
                             f"{path.relative_to(folder)}; rename or remove one")
    return [path for _, path in found]


def load_bgr(path: str | os.PathLike) -> np.ndarray:
    """Decode an image as 8-bit BGR [H, W, 3], as Caffe's `cv2.imread(path)` did."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror})") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)  # applies EXIF orientation; drops alpha; 16-bit -> 8-bit
    if img is None:
        raise ImageError("not a decodable image")
    if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
        raise ImageError(f"unexpected decoded shape {img.shape}")
    return img


def caffe_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The single test scale of py-faster-rcnn: short side to min_size unless the long side would pass max_size."""
    short, long = min(height, width), max(height, width)
    scale = min_size / short
    if round(scale * long) > max_size:
        scale = max_size / long
    return float(scale)


def caffe_blob(img_bgr: np.ndarray, mean_bgr, min_size: int, max_size: int) -> tuple[np.ndarray, float]:
    """BGR uint8 [H, W, 3] -> (mean-subtracted, resized float32 [3, H', W'], scale)."""
    im = img_bgr.astype(np.float32, copy=True)
    im -= np.asarray(mean_bgr, dtype=np.float32)
    scale = caffe_scale(im.shape[0], im.shape[1], min_size, max_size)
    im = cv2.resize(im, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(im.transpose(2, 0, 1)), scale
