"""Pretraining data: corpus sentences x memory-mapped region features -> masked, labelled batches.

Reproduces airsplay/lxmert `src/pretrain/lxmert_data.py` (`LXMERTTorchDataset`, matching negatives, random box
features) and the masking of `src/pretrain/lxmert_pretrain.py` (`random_word`, `random_feat`,
`convert_example_to_features`); paper §3.1, lxmert.md §2.3:

- words: each wordpiece (never [CLS]/[SEP]) is selected with p = 0.15; of those 80 % -> [MASK], 10 % -> a uniformly
  random vocabulary entry, 10 % kept; the label is the original id (ignore -1 elsewhere);
- objects: each box is selected with p = 0.15; 80 % -> zero vector, 10 % -> the feature of a random box of a random
  sentence's image, 10 % kept; feat_mask = 1 for all selected; boxes are never masked;
- matching: with p = 0.5 the sentence is replaced by that of a random sentence of a DIFFERENT image (label 0);
- QA: for matched, labelled sentences one answer sampled in proportion to its score; -1 otherwise.

Unlike the original (tokenisation in the model, `random` module state), tokenisation happens here and every random
choice comes from a generator seeded by (seed, epoch, index): an item is the same whatever the worker count.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lxm.corpus.answers import convert_ans
from lxm.corpus.layout import CORPUS_TABLE, corpus_file, read_corpus_table
from lxm.errors import LxmError
from lxm.features.store import FeatureStore, read_normalized, store_index
from lxm.model.losses import IGNORE_INDEX, PretrainLabels
from lxm.model.tokenizer import LxmertTokenizer

IGNORE = IGNORE_INDEX  # "no target" in the MLM and QA labels (LXMERT's -1)


class PretrainDataError(LxmError, ValueError):
    """The corpus and the feature stores give no usable sentence; the message names both."""


@dataclass
class PretrainExample:
    """One item, numpy arrays. T tokens, N boxes, F feature size."""

    uid: str
    source: str
    input_ids: np.ndarray  # [T] int64 after word masking
    attention_mask: np.ndarray  # [T] int64
    mlm_labels: np.ndarray  # [T] int64: original id where masked, -1 elsewhere
    visual_feats: np.ndarray  # [N, F] after object masking; the stores' dtype (float16 stays float16, see `_moved`)
    visual_boxes: np.ndarray  # [N, 4] float32, normalised
    feat_target: np.ndarray  # [N, F] the unmasked features, dtype as visual_feats
    feat_mask: np.ndarray  # [N] float32, 1 where selected for masking
    obj_labels: np.ndarray  # [N] int64
    obj_conf: np.ndarray  # [N] float32
    attr_labels: np.ndarray  # [N] int64
    attr_conf: np.ndarray  # [N] float32
    matched: int  # 1 = the sentence describes this image
    answer: int  # answer-table id, -1 when unlabelled or mismatched


def _moved(value, device: torch.device | str, non_blocking: bool):
    """A tensor, or a dataclass of tensors (PretrainLabels), on `device`; anything else (ids, None) as it is.

    float16 tensors (region features from a float16 store) become float32 there: features travel through the
    loader, worker pipes and the host-to-device copy at half the bytes, and float16 -> float32 is exact, so the
    model sees the values it would have seen converted on the host."""
    if isinstance(value, torch.Tensor):
        moved = value.to(device, non_blocking=non_blocking)
        return moved.float() if moved.dtype == torch.float16 else moved
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _moved(getattr(value, f.name), device, non_blocking)
                                             for f in dataclasses.fields(value)})
    return value


def _pinned(value):
    """`_moved`'s counterpart for DataLoader(pin_memory=True): tensors (and dataclasses of them) page-locked."""
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _pinned(getattr(value, f.name))
                                             for f in dataclasses.fields(value)})
    return value


@dataclass
class ModelInputs:
    """What the encoder reads, shared by the pretraining and finetuning batches (R rows, T tokens, N boxes, F
    features; R = B sentences, or 2P image-sentence rows for P NLVR2 pairs)."""

    input_ids: torch.Tensor  # [R, T] long
    attention_mask: torch.Tensor  # [R, T] long
    token_type_ids: torch.Tensor  # [R, T] long, zeros
    visual_feats: torch.Tensor  # [R, N, F] float32, or float16 until `to(device)` (masked in pretraining)
    visual_boxes: torch.Tensor  # [R, N, 4] float32, normalised (x1, y1, x2, y2)
    visual_attention_mask: torch.Tensor | None = field(default=None, kw_only=True)  # [R, N] long: 1 a real box, 0
    #   padding (stores whose images have fewer boxes than others: given boxes); None: every box real (36 regions)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The model's keyword arguments (a mask that is None, no padding, left out: the model's default)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelInputs)
                if getattr(self, f.name) is not None}

    def pin_memory(self):
        """What DataLoader(pin_memory=True) calls on a custom batch (CUDA only): every tensor pinned."""
        return _pinned(self)

    def to(self, device: torch.device | str, non_blocking: bool = False):
        """A copy of the batch with every tensor (labels included) on `device`."""
        return dataclasses.replace(self, **{f.name: _moved(getattr(self, f.name), device, non_blocking)
                                            for f in dataclasses.fields(self)})


@dataclass
class Batch(ModelInputs):
    """A collated pretraining batch (B sentences, T tokens, N boxes, F features); inputs as ModelInputs."""

    labels: PretrainLabels  # mlm [B,T], matched [B], obj/attr [B,N], feat target [B,N,F] + mask [B,N], answers [B]
    uids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def pad_boxes(values: np.ndarray, n: int, axis: int = 0, fill=0) -> np.ndarray:
    """`values` with its box axis padded to `n` entries of `fill` (itself when it has `n` already)."""
    short = n - values.shape[axis]
    if short == 0:
        return values
    widths = [(0, 0)] * values.ndim
    widths[axis] = (0, short)
    return np.pad(values, widths, constant_values=fill)


def box_mask(counts: list[int], n: int) -> torch.Tensor | None:
    """[len(counts), n] long: 1 for each row's first counts[i] boxes; None when every row has `n` (no padding: the
    model's unmasked path, as LXMERT's fixed 36 boxes)."""
    if all(c == n for c in counts):
        return None
    return (torch.arange(n)[None, :] < torch.tensor(counts)[:, None]).long()


def collate(items: list[PretrainExample]) -> Batch:
    """Stack examples; images with fewer boxes than the batch's most are padded (zero features and boxes, ignored
    labels, never masked) and masked out of attention (`visual_attention_mask`) and every visual loss."""
    n = max(len(x.visual_feats) for x in items)

    def stack(name: str, fill=0) -> torch.Tensor:
        return torch.from_numpy(np.stack([pad_boxes(getattr(x, name), n, fill=fill) for x in items]))

    ids = torch.from_numpy(np.stack([x.input_ids for x in items]))
    labels = PretrainLabels(
        mlm_labels=torch.from_numpy(np.stack([x.mlm_labels for x in items])),
        matched=torch.tensor([x.matched for x in items], dtype=torch.long),
        obj_labels=stack("obj_labels", IGNORE), obj_conf=stack("obj_conf"), attr_labels=stack("attr_labels", IGNORE),
        attr_conf=stack("attr_conf"), feat_target=stack("feat_target"), feat_mask=stack("feat_mask"),
        answers=torch.tensor([x.answer for x in items], dtype=torch.long),
        box_mask=box_mask([len(x.visual_feats) for x in items], n),
    )
    return Batch(ids, torch.from_numpy(np.stack([x.attention_mask for x in items])), torch.zeros_like(ids),
                 stack("visual_feats"), stack("visual_boxes"), labels, [x.uid for x in items],
                 [x.source for x in items], visual_attention_mask=labels.box_mask)


class PretrainDataset(Dataset):
    """Sentences of `corpus.parquet` (chosen splits and sources) whose images are in the feature stores.

    Args:
        corpus: the corpus directory (or its corpus.parquet) written by `lxm build-corpus`.
        features: feature store directories.
        vocab: WordPiece vocabulary (file, directory or Hub id).
        answers: the pretraining answer table (list of answer strings; id = position).
        splits / sources: which rows to use (LXMERT trains on train + nominival + vgnococo, all five sources).
        word_mask_rate / obj_mask_rate: 0.15 / 0.15 as LXMERT.
        max_length: tokens incl. [CLS] and [SEP] (20).
        seed: base of the per-(epoch, item) random generators (LXMERT: 9595).
        negatives: swap half the sentences for another image's (the matching task); off, every pair is matched, as
            the original's data without --taskMatched. The draw is made either way, so masks stay the same.
    """

    def __init__(self, corpus: str | os.PathLike, features: list[str | os.PathLike], vocab: str | os.PathLike,
                 answers: list[str], *, splits=("train", "nominival", "vgnococo"),
                 sources=("mscoco", "vg", "vqa", "gqa", "vgqa"), word_mask_rate: float = 0.15,
                 obj_mask_rate: float = 0.15, max_length: int = 20, seed: int = 9595, negatives: bool = True):
        path = Path(corpus)
        path = corpus_file(path, CORPUS_TABLE) if path.suffix != ".parquet" else path
        table = read_corpus_table(path, ["uid", "img_id", "source", "split", "text", "labels"])
        self.stores = [FeatureStore(f) for f in features]
        where = store_index(self.stores)
        keep_splits, keep_sources = set(splits), set(sources)
        cols = {c: table.column(c).to_pylist() for c in ("uid", "img_id", "source", "split", "text")}
        raw_labels = table.column("labels").to_pylist()
        self.ans2id = {a: i for i, a in enumerate(answers)}
        self.uids, self.img_ids, self.sources, self.texts, self.labels = [], [], [], [], []
        self.dropped_no_features = 0
        for i in range(table.num_rows):
            if cols["split"][i] not in keep_splits or cols["source"][i] not in keep_sources:
                continue
            if cols["img_id"][i] not in where:
                self.dropped_no_features += 1
                continue
            self.uids.append(cols["uid"][i])
            self.img_ids.append(cols["img_id"][i])
            self.sources.append(cols["source"][i])
            self.texts.append(cols["text"][i])
            self.labels.append(self._table_labels(raw_labels[i]))
        if not self.uids:
            raise PretrainDataError(f"{path}: no sentence of splits {sorted(keep_splits)} / sources "
                                    f"{sorted(keep_sources)} has features in {[str(f) for f in features]}")
        self.store_of = [where[i] for i in self.img_ids]
        # float16 stores keep their features float16 up to the device (exact: masking copies or zeroes values)
        self.feat_dtype = np.float16 if all(s.dtype == "float16" for s in self.stores) else np.float32
        # a one-image toy corpus has no negative to draw
        self.negatives = negatives and len(set(self.img_ids)) > 1
        self.tokenizer = LxmertTokenizer(vocab, max_length=max_length)
        self.word_mask_rate, self.obj_mask_rate = word_mask_rate, obj_mask_rate
        self.max_length, self.seed, self.epoch = max_length, seed, 0

    def _table_labels(self, pairs) -> list[tuple[int, float]]:
        """LXMERT's load-time label cleaning: convert_ans, then keep answers of the table (scores of merged keys add
        up as the original dict update would overwrite; we keep the maximum)."""
        out: dict[int, float] = {}
        for answer, score in pairs or []:
            idx = self.ans2id.get(convert_ans(answer))
            if idx is not None:
                out[idx] = max(out.get(idx, 0.0), float(score))
        return list(out.items())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.uids)

    def _features(self, i: int):
        return read_normalized(self.stores[self.store_of[i]], self.img_ids[i])

    def __getitem__(self, index: int) -> PretrainExample:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        text, matched = self.texts[index], 1
        if rng.random() < 0.5 and self.negatives:  # matching negative: a sentence of another image
            while True:
                other = int(rng.integers(len(self)))
                if self.img_ids[other] != self.img_ids[index]:
                    text, matched = self.texts[other], 0
                    break
        ids, mlm, length = self._mask_words(text, rng)
        attention = np.zeros(self.max_length, dtype=np.int64)
        attention[:length] = 1
        rec, boxes = self._features(index)
        target = rec.features.astype(self.feat_dtype, copy=False)
        feats, feat_mask = self._mask_objects(target, rng)
        answer = IGNORE
        if matched and self.labels[index]:
            keys, scores = zip(*self.labels[index])
            answer = keys[0] if len(keys) == 1 else keys[int(rng.choice(len(keys), p=np.array(scores) / sum(scores)))]
        return PretrainExample(
            uid=self.uids[index], source=self.sources[index], input_ids=ids,
            attention_mask=attention, mlm_labels=mlm,
            visual_feats=feats, visual_boxes=boxes, feat_target=target, feat_mask=feat_mask,
            obj_labels=rec.objects_id.astype(np.int64), obj_conf=rec.objects_conf.astype(np.float32),
            attr_labels=rec.attrs_id.astype(np.int64), attr_conf=rec.attrs_conf.astype(np.float32),
            matched=matched, answer=int(answer))

    def _mask_words(self, text: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """[CLS] pieces [SEP] padded, with 15 % of the pieces masked -> (ids [T], labels [T], real length)."""
        tok = self.tokenizer
        pieces = tok.tokenize(text)[: self.max_length - 2]
        ids = tok.convert_tokens_to_ids(pieces)
        labels = [IGNORE] * len(ids)
        for k in range(len(ids)):
            p = rng.random()
            if p < self.word_mask_rate:
                p /= self.word_mask_rate
                labels[k] = ids[k]
                if p < 0.8:
                    ids[k] = tok.mask_id
                elif p < 0.9:
                    ids[k] = int(rng.integers(tok.vocab_size))  # any vocabulary entry, as the original
        out = np.zeros(self.max_length, dtype=np.int64)
        lab = np.full(self.max_length, IGNORE, dtype=np.int64)
        out[: len(ids) + 2] = [tok.cls_id, *ids, tok.sep_id]
        lab[1: len(ids) + 1] = labels
        return out, lab, len(ids) + 2

    def _mask_objects(self, feats: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        out = feats.copy()
        mask = np.zeros(len(feats), dtype=np.float32)
        for k in range(len(feats)):
            p = rng.random()
            if p < self.obj_mask_rate:
                p /= self.obj_mask_rate
                if p < 0.8:
                    out[k] = 0.0
                elif p < 0.9:  # the feature of a random box of a random sentence's image
                    j = int(rng.integers(len(self)))
                    other = self.stores[self.store_of[j]].get(self.img_ids[j])
                    out[k] = other.features[int(rng.integers(other.num_boxes))]
                mask[k] = 1.0
        return out, mask
