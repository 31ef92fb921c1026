"""Finetuning data: the task tables of `lxm build-corpus` (or a custom task's JSON lines files) x memory-mapped
region features -> typed batches.

Reproduces the datasets of airsplay/lxmert `src/tasks/vqa_data.py`, `gqa_data.py` and `nlvr2_data.py`
(lxmert.md §5): questions (or NLVR2 statements) whose images have features — the others are dropped and counted, as
the original's `if img_id in imgid2img` filter — tokenised to 20 pieces, boxes normalised by the image size. What
a row's label becomes is the task's (`lxm.train.tasks`): VQA / GQA / custom QA a dense soft-score vector over the
task's answer table, NLVR2 a 0/1 pair label, classification a label index; test splits have none.

An example may show several images (NLVR2: two); the batch holds one (image, sentence) row per image, pair i of an
NLVR2 batch at rows 2i (img0) and 2i+1 (img1), as `nlvr2_model.py` flattens `[P, 2, N, F]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from lxm.errors import LxmError
from lxm.features.records import ImageFeatures
from lxm.features.backbone import stores_backbone
from lxm.features.store import FeatureStore, read_normalized, store_index
from lxm.model.tokenizer import LxmertTokenizer
from lxm.train.data import ModelInputs, box_mask, pad_boxes
from lxm.train.tasks import FinetuneTask


class FinetuneDataError(LxmError, ValueError):
    """A finetuning table or its features cannot be used."""


@dataclass
class FinetuneExample:
    """One question (VQA / GQA) or one statement with its image pair (NLVR2); numpy arrays. T tokens, I images of
    the example, N boxes, F feature size."""

    id: int | str  # question id (VQA int, GQA str) or NLVR2 identifier
    input_ids: np.ndarray  # [T] int64
    attention_mask: np.ndarray  # [T] int64
    visual_feats: np.ndarray  # [I, N, F] float32, or float16 from a float16 store (float32 once on the device)
    visual_boxes: np.ndarray  # [I, N, 4] float32, normalised (x1, y1, x2, y2)
    target: np.ndarray | None = None  # the task's `example_target`: [A] float32 soft scores over A answers (answer
    #   tasks), a 0-d int64 class (NLVR2 0/1; classify, lxm.model.IGNORE_INDEX: not a training label); None: unlabelled
    box_counts: list[int] | None = None  # real boxes of each image when they differ (the rest of N is padding);
    #   None: all N real


@dataclass
class FinetuneBatch(ModelInputs):
    """A collated finetuning batch; inputs as ModelInputs with R rows = B questions (VQA/GQA) or 2P image-sentence
    rows for P NLVR2 pairs."""

    targets: torch.Tensor | None = None  # the examples' targets stacked: [B, A] float32 (answer tasks), [B] long
    #   (NLVR2: B = P pairs; classify); None when an example has none (an unlabelled split)
    ids: list = field(default_factory=list)  # question ids (VQA int, GQA str) or NLVR2 identifiers, one per example


class FinetuneDataset(Dataset):
    """The rows of the task's splits (`task.read_split`: `<corpus>/finetune/<task>_<split>.parquet`, or a custom
    task's JSON lines files; several splits concatenated) whose images have features.

    Args:
        task: the task (its table, id and image columns, targets; an answer task carries its answer table).
        corpus: the corpus directory of `lxm build-corpus` (unused by the custom tasks).
        splits: table names, e.g. ["train", "nominival"] (custom tasks: names in their data, or .jsonl paths).
        features: feature store directories.
        vocab: WordPiece vocabulary (file, directory or Hub id).
        max_length: tokens incl. [CLS] and [SEP] (20).
    """

    def __init__(self, task: FinetuneTask, corpus: str | os.PathLike, splits: list[str],
                 features: list[str | os.PathLike], vocab: str | os.PathLike, *, max_length: int = 20):
        self.task = task
        self.stores = [FeatureStore(f) for f in features]
        try:
            self.backbone = stores_backbone(self.stores)  # one backbone: a model reads one kind of feature
        except ValueError as exc:
            raise FinetuneDataError(f"--features: {exc}") from None
        where = store_index(self.stores)
        self.ids: list = []
        self.texts: list[str] = []
        self.images: list[tuple[str, ...]] = []
        self.targets: list = []  # the task's row_target per example (None: unlabelled)
        self.info: dict[str, list] = {c: [] for c in task.info_columns}  # display columns, per example
        self.dropped = 0
        for split in splits:
            cols = task.read_split(corpus, split)
            for i in range(len(cols[task.id_column])):
                imgs = tuple(cols[c][i] for c in task.image_columns)
                if not all(img in where for img in imgs):
                    self.dropped += 1
                    continue
                self.ids.append(cols[task.id_column][i])
                self.texts.append(cols["sent"][i])
                self.images.append(imgs)
                self.targets.append(task.row_target({c: v[i] for c, v in cols.items()}))
                for c in task.info_columns:
                    self.info[c].append(cols[c][i] if c in cols else None)
        if not self.ids:
            raise FinetuneDataError(f"{task.name} splits {splits}: no example has its image(s) in the feature "
                                    f"stores {[str(f) for f in features]} ({self.dropped} dropped)")
        self.labelled = all(t is not None for t in self.targets)
        self.corpus, self.splits = corpus, list(splits)
        self.store_of = where
        self.tokenizer = LxmertTokenizer(vocab, max_length=max_length)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.ids)

    def require_labels(self, role: str, fix: str) -> None:
        """FinetuneDataError naming the split's file(s) when an example has no label: `role` says what needs the
        labels (training, validation), `fix` what to do instead; checked before any training step."""
        if self.labelled:
            return
        missing = sum(t is None for t in self.targets)
        where = ", ".join(self.task.split_source(self.corpus, s) for s in self.splits)
        raise FinetuneDataError(f"{where}: {missing} of {len(self)} examples have no label, but {role} scores "
                                f"labelled examples ({fix})")

    def record(self, img_id: str) -> ImageFeatures:
        """The stored features of one image (its boxes, labels and size: what `lxm gallery` draws)."""
        return self.stores[self.store_of[img_id]].get(img_id)

    def __getitem__(self, index: int) -> FinetuneExample:
        recs = [read_normalized(self.stores[self.store_of[img]], img) for img in self.images[index]]
        target = self.targets[index]
        return encode_example(self.ids[index], self.texts[index], recs, self.tokenizer,
                              None if target is None else self.task.example_target(target))


def steps_per_epoch(examples: int, batch_size: int) -> tuple[int, str]:
    """(optimizer steps per epoch, a line saying how many examples an epoch uses) of a training set.

    Every epoch trains on whole batches only (drop_last, as the original's loader, and the same batches in any
    number of processes): the last `examples % batch_size` examples of each epoch's shuffled order are left out —
    different ones each epoch. A set smaller than one batch is a FinetuneDataError naming `--set batch_size=N`.
    """
    steps = examples // batch_size
    if steps == 0:
        raise FinetuneDataError(f"{examples} training examples are fewer than one batch of {batch_size}; use a "
                                f"smaller batch: --set batch_size=N with N <= {examples}")
    left = examples - steps * batch_size
    line = f"each epoch: {steps} steps of {batch_size} examples"
    if left:
        line += (f", {steps * batch_size} of the {examples} training examples ({left} left out, different ones each "
                 f"epoch: whole batches only, as the original; --set batch_size=N with N dividing {examples} uses "
                 f"all)")
    return steps, line


def encode_example(example_id, text: str, images: list[tuple[ImageFeatures, np.ndarray]],
                   tokenizer: LxmertTokenizer, target: np.ndarray | None = None) -> FinetuneExample:
    """One example from its text and its images' (record, normalised boxes), as the dataset and `lxm ask` build
    it; `target` is the task's `example_target` (None: unlabelled)."""
    enc = tokenizer.encode(text)
    counts = [len(rec.features) for rec, _ in images]
    n = max(counts)
    feats = np.stack([pad_boxes(rec.features, n) for rec, _ in images])
    if feats.dtype != np.float16:  # float16 (a float16 store) stays so until the device (ModelInputs.to)
        feats = feats.astype(np.float32)
    boxes = np.stack([pad_boxes(b, n) for _, b in images])
    return FinetuneExample(example_id, enc.input_ids[0], enc.attention_mask[0], feats, boxes, target,
                           None if all(c == n for c in counts) else counts)


def collate_finetune(items: list[FinetuneExample]) -> FinetuneBatch:
    """Stack examples; an example of I images contributes I rows (its sentence repeated). `targets` stacks the
    examples' targets (the task chose their shape and dtype) when every example has one (a labelled split), else
    None."""
    rows = [len(x.visual_feats) for x in items]
    input_ids = torch.from_numpy(np.repeat(np.stack([x.input_ids for x in items]), rows, axis=0))
    targets = None
    if all(x.target is not None for x in items):
        targets = torch.from_numpy(np.stack([x.target for x in items]))
    n = max(x.visual_feats.shape[1] for x in items)  # images with fewer boxes are padded and masked
    counts = [c for x in items for c in (x.box_counts or [x.visual_feats.shape[1]] * len(x.visual_feats))]
    return FinetuneBatch(input_ids, torch.from_numpy(np.repeat(np.stack([x.attention_mask for x in items]), rows,
                                                               axis=0)),
                         torch.zeros_like(input_ids),
                         torch.from_numpy(np.concatenate([pad_boxes(x.visual_feats, n, axis=1) for x in items])),
                         torch.from_numpy(np.concatenate([pad_boxes(x.visual_boxes, n, axis=1) for x in items])),
                         targets, [x.id for x in items], visual_attention_mask=box_mask(counts, n))
