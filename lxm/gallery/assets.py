"""The gallery's pictures: each shown image with its most confident stored boxes drawn (`lxm.extract.show.render`,
the drawing of `lxm show`), downscaled and written as a JPEG beside the page.

Images are found as `lxm extract` finds them (`lxm.extract.images.list_images`: every subfolder, img_id = file
stem), so the folders given to extraction can be given here unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from lxm.extract.images import ImageError, list_images, load_bgr
from lxm.extract.show import fit_names, load_vocab, render
from lxm.features.records import ImageFeatures

LONG_SIDE = 480  # pixels of an asset's long side (smaller images are enlarged to it, as lxm show does)
JPEG_QUALITY = 85
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")


def index_images(folders: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """img_id -> image file over all `folders`; one img_id in two folders is an error naming both files."""
    where: dict[str, Path] = {}
    for folder in folders:
        for path in list_images(folder):
            other = where.setdefault(path.stem, path)
            if other != path:
                raise ImageError(f"--images: two images have the img_id {path.stem!r}: {other} and {path}; "
                                 f"pass one of the folders")
    return where


def read_names(vocab_dir: str | os.PathLike | None, classes: tuple[int, int] | None = None
               ) -> tuple[list[str] | None, list[str] | None]:
    """(object names, attribute names) from a folder with objects_vocab.txt / attributes_vocab.txt; (None, None)
    without one, or with a logged warning when they are not the vocabulary of the detector with `classes` (labels
    are ids then; `lxm.extract.show.fit_names`)."""
    if vocab_dir is None:
        return None, None
    folder = Path(vocab_dir)
    return fit_names(load_vocab(folder / "objects_vocab.txt"), load_vocab(folder / "attributes_vocab.txt"), classes,
                     option=f"--vocab-dir {folder}", strict=False)


def asset_name(img_id: str) -> str:
    """The asset's file name: the img_id when it is a plain file name, else a digest of it (an img_id may hold
    characters a URL or a file system would mangle)."""
    if _SAFE.fullmatch(img_id):
        return f"{img_id}.jpg"
    return f"img-{hashlib.sha1(img_id.encode()).hexdigest()[:16]}.jpg"


def draw_asset(image: Path, rec: ImageFeatures, out: Path, *, objects: list[str] | None = None,
               attributes: list[str] | None = None, boxes: int = 5, long_side: int = LONG_SIDE) -> None:
    """Draw the `boxes` most confident boxes of `rec` on `image`, at most `long_side` pixels, into the JPEG `out`.

    The image is shrunk before drawing (its boxes with it), so the labels keep `render`'s size on the asset and
    stay readable where the page shows it at its own size. Raises ImageError (an undecodable image, or not the
    image the features came from)."""
    try:
        bgr = load_bgr(image)
        if bgr.shape[:2] != (rec.img_h, rec.img_w):
            raise ImageError(f"image is {bgr.shape[1]}x{bgr.shape[0]} but the features of {rec.img_id!r} were "
                             f"extracted from a {rec.img_w}x{rec.img_h} image")
    except ImageError as exc:
        raise ImageError(f"{image}: {exc}") from None
    scale = long_side / max(rec.img_h, rec.img_w)
    if scale < 1:  # INTER_AREA: no aliasing when shrinking
        w, h = max(1, round(rec.img_w * scale)), max(1, round(rec.img_h * scale))
        bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)
        sx, sy = w / rec.img_w, h / rec.img_h
        rec = dataclasses.replace(rec, img_h=h, img_w=w, boxes=rec.boxes * np.array([sx, sy, sx, sy], np.float32))
    picture = render(bgr, rec, objects, attributes, boxes, long_side=long_side).image
    ok, data = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"{out}: could not encode the image")
    out.write_bytes(data.tobytes())
