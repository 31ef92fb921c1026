"""Image decoding and Caffe-style preprocessing for the detector.

Reproduces `_get_image_blob` of py-faster-rcnn `lib/fast_rcnn/test.py` as the BUTD extraction ran it (detector spec
§1.1): `cv2.imread` (BGR; EXIF orientation applied; grayscale, 16-bit and alpha images become 8-bit BGR), float32,
subtract the Caffe pixel mean BEFORE resizing, one scale `s = 600 / short side`, reduced so the long side stays
<= 1000, `cv2.resize(fx=s, fy=s, INTER_LINEAR)` on the float image. (The transformers FRCNN demo fed RGB by mistake,
transformers #8333; the channel order here is tested.) Unlike `cv2.imread`, an image is refused from its header when
it has more pixels than a limit, and a file when it is larger than a cap (`image_limits`), before either is decoded
or read: a 2.7 MB PNG can claim 30000 x 30000 pixels, 14 GB to decode.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lxm.errors import ConfigError, LxmError

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Decoding costs ~14 bytes per pixel: 100 Mpx (a 10000 x 10000 photo) needs ~1.4 GB. The detector's input is at most
# 1000 pixels on the long side, so nothing larger is needed to extract features.
MAX_PIXELS = 100_000_000
MAX_BYTES = 1 << 30  # a file larger than this is not read (np.fromfile would hold all of it in memory)
DETECTOR_LONG_SIDE = 1000


class ImageError(LxmError, ValueError):
    """An image or the image folder could not be used; the message says why. A bad image is recorded in
    failures.jsonl and the run goes on; a bad folder (missing, two images with one img_id) stops it."""


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files in `folder` and all its subfolders, sorted by path relative to `folder` (every worker sees the
    same order, so `--shard i/n` splits disjointly).

    Subfolders are searched because the datasets ship that way (Visual Genome unpacks to `VG_100K/` and
    `VG_100K_2/`). Names starting with "." (`.ipynb_checkpoints/`, macOS `._x.jpg`) are skipped. Symlinked folders
    are followed, each real folder once (a dataset linked in from another disk, `images/VG_100K -> /data/VG_100K`,
    is found), except a link to `folder` itself or to a folder above it (a link to `/` would walk the whole file
    system; a link to `..` everything beside the images): those are skipped with a logged warning. Linked image
    files are read wherever they lead. The img_id is the file stem, so two
    files with one stem are an error naming both: which one LXMERT's annotations mean cannot be told.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a directory")
    root = os.path.realpath(folder)
    found: list[tuple[str, Path]] = []
    visited: set[tuple[int, int]] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in visited:  # a symlink loop or a second link to a folder already listed
            dirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        kept = []
        for d in dirs:
            if d.startswith("."):
                continue
            link = os.path.join(top, d)
            target = os.path.realpath(link)
            if os.path.islink(link) and os.path.commonpath([root, target]) == target:
                _logger.warning("%s: a link to %s, which holds %s itself: not followed", link, target, folder)
                continue
            kept.append(d)
        dirs[:] = kept
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


def image_limits() -> tuple[int, int]:
    """(largest number of pixels, largest file size in bytes) an image may have: $LXM_MAX_IMAGE_PIXELS and
    $LXM_MAX_IMAGE_BYTES when set, else MAX_PIXELS and MAX_BYTES."""
    limits = []
    for var, default in (("LXM_MAX_IMAGE_PIXELS", MAX_PIXELS), ("LXM_MAX_IMAGE_BYTES", MAX_BYTES)):
        text = os.environ.get(var, "").strip()
        try:
            value = int(text) if text else default
        except ValueError:
            raise ConfigError(f"${var}={text!r}: not a whole number") from None
        if value < 1:
            raise ConfigError(f"${var}={text!r}: must be at least 1")
        limits.append(value)
    return limits[0], limits[1]


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) from the image's header, without decoding its pixels (PIL opens lazily); None when PIL does
    not know the format (cv2 may still: the file-size cap then bounds the decode). PIL itself refuses a header of
    more than twice `PIL.Image.MAX_IMAGE_PIXELS` (~179 Mpx): `Image.DecompressionBombError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit decides, not PIL's warning
            with Image.open(path) as im:
                return int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError:
        raise
    except (OSError, ValueError, SyntaxError, struct.error):  # not an image PIL can identify, or a broken header
        return None


def load_bgr(path: str | os.PathLike, *, max_pixels: int | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Decode an image as 8-bit BGR [H, W, 3], as Caffe's `cv2.imread(path)` did.

    Decoding costs about 14 bytes per pixel (the 8-bit image, then the float32 blob), so the header is read first
    and an image of more than `max_pixels` pixels is refused before any pixel is decoded, as is a file of more than
    `max_bytes` bytes before it is read (defaults: `image_limits()`). Every failure, running out of memory
    included, is an ImageError: one image's failure, never the run's.
    """
    path = Path(path)
    default_pixels, default_bytes = image_limits()
    max_pixels, max_bytes = max_pixels or default_pixels, max_bytes or default_bytes
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror})") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    if size > max_bytes:
        raise ImageError(f"file of {size} bytes is larger than the limit of {max_bytes} bytes "
                         f"($LXM_MAX_IMAGE_BYTES raises it)")
    how = (f"(decoding costs ~14 bytes per pixel; --max-pixels or $LXM_MAX_IMAGE_PIXELS raises the limit; the "
           f"detector sees at most {DETECTOR_LONG_SIDE} pixels on the long side, so a smaller copy serves as well)")
    try:
        dims = header_size(path)
    except Image.DecompressionBombError:
        raise ImageError(f"its header claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, beyond PIL's "
                         f"decompression-bomb limit and the limit of {max_pixels} {how}") from None
    if dims is not None and dims[0] * dims[1] > max_pixels:
        raise ImageError(f"{dims[0]}x{dims[1]} = {dims[0] * dims[1]} pixels, more than the limit of {max_pixels} "
                         f"{how}")
    try:
        data = np.fromfile(path, dtype=np.uint8)
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)  # applies EXIF orientation; drops alpha; 16-bit -> 8-bit
    except MemoryError:
        raise ImageError(f"out of memory decoding it ({size} bytes"
                         + (f", {dims[0]}x{dims[1]} pixels)" if dims else ")")) from None
    except cv2.error as exc:
        raise ImageError(f"not a decodable image ({str(exc).strip().splitlines()[-1]})") from None
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
    """BGR uint8 [H, W, 3] -> (mean-subtracted, resized float32 [3, H', W'], scale). Running out of memory (the
    float copy takes 12 bytes per pixel) is an ImageError, as in `load_bgr`."""
    try:
        im = img_bgr.astype(np.float32, copy=True)
        im -= np.asarray(mean_bgr, dtype=np.float32)
        scale = caffe_scale(im.shape[0], im.shape[1], min_size, max_size)
        im = cv2.resize(im, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(im.transpose(2, 0, 1)), scale
    except MemoryError:
        raise ImageError(f"out of memory preprocessing its {img_bgr.shape[1]}x{img_bgr.shape[0]} pixels") from None
