"""Finetuning data: the VQA / GQA / NLVR2 tables of `lxm build-corpus` x memory-mapped region features.

Reproduces the datasets of airsplay/lxmert `src/tasks/vqa_data.py`, `gqa_data.py` and `nlvr2_data.py`
(lxmert.md §5): questions (or NLVR2 statements) whose images have features — the others are dropped and counted, as
the original's `if img_id in imgid2img` filter — tokenised to 20 pieces, boxes normalised by the image size.

- VQA / GQA: the target is the dense soft-score vector over the task's answer table (`label` entries outside the
  table are skipped, as the original); test splits have no label.
- NLVR2: one example = a statement and an image pair; the batch holds 2P (image, sentence) rows, pair i at rows
  2i (img0) and 2i+1 (img1), as `nlvr2_model.py` flattens `[P, 2, N, F]`; the pair head reads the two pooled outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lxm.errors import LxmError
from lxm.features.store import FeatureStore, read_normalized, store_index
from lxm.model.tokenizer import LxmertTokenizer
from lxm.train.data import corpus_file, read_corpus_table


class FinetuneDataError(LxmError, ValueError):
    """A finetuning table or its features cannot be used."""


@dataclass
class FinetuneBatch:
    """A collated finetuning batch. R rows = B questions (VQA/GQA) or 2P image-sentence rows for P NLVR2 pairs.

    T tokens, N boxes, F feature size, A answers.
    """

    input_ids: torch.Tensor  # [R, T] long
    attention_mask: torch.Tensor  # [R, T] long
    token_type_ids: torch.Tensor  # [R, T] long, zeros
    visual_feats: torch.Tensor  # [R, N, F] float32
    visual_boxes: torch.Tensor  # [R, N, 4] float32, normalised (x1, y1, x2, y2)
    target: torch.Tensor | None = None  # VQA/GQA [B, A] float soft scores; NLVR2 [P] long 0/1; None on test splits
    ids: list = field(default_factory=list)  # question ids (VQA int, GQA str) or NLVR2 identifiers, one per example

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "token_type_ids": self.token_type_ids, "visual_feats": self.visual_feats,
                "visual_boxes": self.visual_boxes}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "FinetuneBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return FinetuneBatch(move(self.input_ids), move(self.attention_mask), move(self.token_type_ids),
                             move(self.visual_feats), move(self.visual_boxes), move(self.target), self.ids)


def table_path(corpus: str | os.PathLike, task: str, split: str) -> Path:
    path = corpus_file(corpus, "finetune") / f"{task}_{split}.parquet"
    if not path.exists():
        have = sorted(p.stem for p in (Path(corpus) / "finetune").glob(f"{task}_*.parquet"))
        raise FinetuneDataError(f"{path}: no such table (this corpus has {', '.join(have) or 'no ' + task + ' tables'}"
                                f"; build it with lxm build-corpus --{task} ...)")
    return path


class FinetuneDataset(Dataset):
    """The rows of `<corpus>/finetune/<task>_<split>.parquet` (several splits concatenated) whose images have features.

    Args:
        task: "vqa", "gqa" or "nlvr2".
        corpus: the corpus directory of `lxm build-corpus`.
        splits: table names, e.g. ["train", "nominival"].
        features: feature store directories.
        vocab: WordPiece vocabulary (file, directory or Hub id).
        answers: the task's answer table (VQA 3129, GQA 1842 strings; id = position); unused for NLVR2.
        max_length: tokens incl. [CLS] and [SEP] (20).
    """

    def __init__(self, task: str, corpus: str | os.PathLike, splits: list[str], features: list[str | os.PathLike],
                 vocab: str | os.PathLike, answers: list[str] | None = None, *, max_length: int = 20):
        self.task = task
        self.stores = [FeatureStore(f) for f in features]
        where = store_index(self.stores)
        self.ans2id = {a: i for i, a in enumerate(answers or [])}
        self.num_answers = len(self.ans2id)
        self.ids: list = []
        self.texts: list[str] = []
        self.images: list[tuple[str, ...]] = []
        self.targets: list = []
        self.labelled = True
        self.dropped = 0
        for split in splits:
            path = table_path(corpus, task, split)
            table = read_corpus_table(path)
            cols = {c: table.column(c).to_pylist() for c in table.column_names}
            id_col, img_cols = ("identifier", ("img0", "img1")) if task == "nlvr2" else ("question_id", ("img_id",))
            for i in range(table.num_rows):
                imgs = tuple(cols[c][i] for c in img_cols)
                if not all(img in where for img in imgs):
                    self.dropped += 1
                    continue
                self.ids.append(cols[id_col][i])
                self.texts.append(cols["sent"][i])
                self.images.append(imgs)
                if task == "nlvr2":
                    label = cols["label"][i]
                    self.targets.append(None if label is None or label < 0 else int(label))
                else:
                    pairs = cols["label"][i]
                    self.targets.append(None if pairs is None else
                                        [(self.ans2id[a], float(s)) for a, s in pairs if a in self.ans2id])
        if not self.ids:
            raise FinetuneDataError(f"{Path(corpus) / 'finetune'}: no {task} example of splits {splits} has its "
                                    f"image(s) in the feature stores {[str(f) for f in features]} "
                                    f"({self.dropped} dropped)")
        self.labelled = all(t is not None for t in self.targets)
        self.store_of = where
        self.tokenizer = LxmertTokenizer(vocab, max_length=max_length)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.ids)

    def _image(self, img_id: str) -> tuple[np.ndarray, np.ndarray]:
        rec, boxes = read_normalized(self.stores[self.store_of[img_id]], img_id)
        return rec.features.astype(np.float32), boxes

    def __getitem__(self, index: int) -> dict:
        enc = self.tokenizer.encode(self.texts[index])
        images = [self._image(img) for img in self.images[index]]
        target = self.targets[index]
        if target is not None and self.task != "nlvr2":
            dense = np.zeros(self.num_answers, dtype=np.float32)
            for k, score in target:
                dense[k] = score
            target = dense
        return {"id": self.ids[index], "input_ids": enc.input_ids[0], "attention_mask": enc.attention_mask[0],
                "images": images, "target": target}


def collate_finetune(items: list[dict]) -> FinetuneBatch:
    """Stack examples; an NLVR2 example contributes one row per image (its sentence repeated)."""
    ids, masks, feats, boxes = [], [], [], []
    for x in items:
        for f, b in x["images"]:
            ids.append(x["input_ids"])
            masks.append(x["attention_mask"])
            feats.append(f)
            boxes.append(b)
    input_ids = torch.from_numpy(np.stack(ids))
    target = None
    if all(x["target"] is not None for x in items):
        first = items[0]["target"]
        target = (torch.tensor([x["target"] for x in items], dtype=torch.long) if isinstance(first, int)
                  else torch.from_numpy(np.stack([x["target"] for x in items])))
    return FinetuneBatch(input_ids, torch.from_numpy(np.stack(masks)), torch.zeros_like(input_ids),
                         torch.from_numpy(np.stack(feats)), torch.from_numpy(np.stack(boxes)), target,
                         [x["id"] for x in items])
