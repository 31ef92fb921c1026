"""What the benchmarks read from `../shared` (or `LXM_SHARED`), or a stand-in when it is not there.

A fresh GPU machine may hold only the project: `benchmarks/gpu.sh` must report there too. The weights are random
in every benchmark anyway, so the stand-ins cost nothing in meaning: BERT's vocabulary becomes a synthetic one of the
same size (30,522 word pieces: the model's embedding table and the tokenizer's ids keep their shapes), the 10
fixture photos become generated images of the same size class (640 x 480 JPEGs of filled shapes).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LXM_SHARED") or ROOT.parent / "shared")
BERT_VOCAB = SHARED / "vocab" / "bert-base-uncased-vocab.txt"
FIXTURE_IMAGES = SHARED / "fixtures" / "butd-coco-sample" / "images"
VOCAB_SIZE = 30522  # bert-base-uncased's


def vocab(folder: Path, words: list[str]) -> Path:
    """BERT's vocabulary file when the shared folder has it, else a synthetic one of its size written into `folder`:
    the special tokens, `words` (the benchmark's text) and `[unused<i>]` fillers."""
    if BERT_VOCAB.is_file():
        return BERT_VOCAB
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words)]
    pieces += [f"[unused{i}]" for i in range(VOCAB_SIZE - len(pieces))]
    path = Path(folder) / "vocab.txt"
    path.write_text("\n".join(pieces) + "\n")
    return path


def images(folder: Path, count: int | None = None, seed: int = 0) -> Path:
    """A folder of images to extract: the shared fixtures themselves when they exist and `count` is None; else
    `count` (default 10) images written into `folder`, the fixtures in turn (so a steady rate is measured on real
    photos) or, without them, generated 640 x 480 JPEGs."""
    fixtures = sorted(FIXTURE_IMAGES.glob("*.jpg")) if FIXTURE_IMAGES.is_dir() else []
    if fixtures and count is None:
        return FIXTURE_IMAGES
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count or 10):
        out = folder / f"img{i:05d}.jpg"
        if fixtures:
            shutil.copyfile(fixtures[i % len(fixtures)], out)
            continue
        img = np.full((480, 640, 3), rng.integers(150, 250, 3), np.uint8)
        for _ in range(int(rng.integers(2, 6))):
            x, y = int(rng.integers(40, 600)), int(rng.integers(40, 440))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            if rng.random() < 0.5:
                cv2.circle(img, (x, y), int(rng.integers(15, 90)), colour, -1)
            else:
                cv2.rectangle(img, (x, y), (x + int(rng.integers(20, 160)), y + int(rng.integers(20, 120))), colour, -1)
        cv2.imwrite(str(out), img)
    return folder
