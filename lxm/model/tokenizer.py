"""BERT uncased WordPiece tokenisation as LXMERT feeds it.

Reproduces `src/lxrt/entry.py` `convert_sents_to_features` (L36-71) with `BertTokenizer("bert-base-uncased",
do_lower_case=True)` of airsplay/lxmert: `sent.strip()`, WordPiece, truncate to `max_length - 2` pieces,
`[CLS] ... [SEP]`, segment ids 0, zero padding to `max_length` (20 everywhere in LXMERT), attention mask 1/0.
The original tokenised inside the model forward on every batch; lxm does it in the dataset.

Backed by the `tokenizers` WordPiece implementation (BertNormalizer lowercase + accent stripping, BertPreTokenizer),
which splits exactly as BERT's Python tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lxm.errors import LxmError

DEFAULT_MAX_LENGTH = 20  # LXMERT's max_seq_length in pretraining and all three tasks
VOCAB_FILE = "vocab.txt"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TokenizerError(LxmError, ValueError):
    """The vocabulary could not be found or read; the message says how to pass a local one."""


@dataclass
class Encoding:
    """One batch of tokenised sentences (numpy, so datasets can use it without torch)."""

    input_ids: np.ndarray  # [B, max_length] int64
    attention_mask: np.ndarray  # [B, max_length] int64, 1 = real token
    token_type_ids: np.ndarray  # [B, max_length] int64, all 0


def _resolve_vocab(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / VOCAB_FILE).is_file():
            return path / VOCAB_FILE
        raise TokenizerError(f"{path}: directory has no {VOCAB_FILE}")
    text = str(source)
    if text.startswith((".", "/", "~")) or text.endswith(".txt"):
        raise TokenizerError(f"{source}: vocabulary file not found")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=text, filename=VOCAB_FILE))
    except Exception as exc:  # offline / unknown repo: tell the user what to do instead
        raise TokenizerError(
            f"could not fetch {VOCAB_FILE} of '{text}' from the Hugging Face Hub ({type(exc).__name__}); pass a "
            f"local vocabulary instead: --set vocab=PATH/vocab.txt (lxm pretrain / finetune; lxm ask: --vocab "
            f"PATH/vocab.txt), a file of one WordPiece per line (e.g. bert-base-uncased's 30,522) or a directory "
            f"holding one"
        ) from None


class LxmertTokenizer:
    """WordPiece tokenizer producing fixed-length LXMERT inputs.

    Args:
        vocab: a vocab.txt path, a directory holding one, or a Hub id (default `bert-base-uncased`).
        max_length: total length including [CLS] and [SEP] (LXMERT: 20).
        lowercase: lower-case and strip accents (uncased models).
    """

    def __init__(self, vocab: str | os.PathLike = "bert-base-uncased", max_length: int = DEFAULT_MAX_LENGTH,
                 lowercase: bool = True):
        from tokenizers import BertWordPieceTokenizer

        if max_length < 3:
            raise TokenizerError(f"max_length must be at least 3 ([CLS] + one piece + [SEP]), got {max_length}")
        self.vocab_path = _resolve_vocab(vocab)
        try:
            def make() -> BertWordPieceTokenizer:
                return BertWordPieceTokenizer(str(self.vocab_path), lowercase=lowercase, strip_accents=None,
                                              clean_text=True, handle_chinese_chars=True)

            self._tok, self._raw = make(), make()  # _raw: no truncation/padding, for `tokenize`
        except Exception as exc:
            raise TokenizerError(f"{self.vocab_path}: not a WordPiece vocabulary ({exc})") from None
        vocab_map = self._tok.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab_map]
        if missing:
            raise TokenizerError(f"{self.vocab_path}: vocabulary lacks special token(s) {', '.join(missing)}")
        if vocab_map["[PAD]"] != 0:
            raise TokenizerError(
                f"{self.vocab_path}: [PAD] must have id 0 (LXMERT pads with 0), has {vocab_map['[PAD]']}")
        self.max_length = max_length
        self._tok.enable_truncation(max_length=max_length)  # counts [CLS]/[SEP]: at most max_length-2 pieces
        self._tok.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
        self.pad_id = 0
        self.unk_id = vocab_map["[UNK]"]
        self.cls_id = vocab_map["[CLS]"]
        self.sep_id = vocab_map["[SEP]"]
        self.mask_id = vocab_map["[MASK]"]
        self.vocab_size = self._tok.get_vocab_size()

    def tokenize(self, text: str) -> list[str]:
        """WordPieces of `text` without specials or truncation."""
        return self._raw.encode(text.strip(), add_special_tokens=False).tokens

    def encode(self, texts: list[str] | str) -> Encoding:
        """Tokenise sentences to [B, max_length] arrays (one sentence gives B = 1)."""
        if isinstance(texts, str):
            texts = [texts]
        encs = self._tok.encode_batch([t.strip() for t in texts])
        ids = np.asarray([e.ids for e in encs], dtype=np.int64).reshape(len(encs), self.max_length)
        mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64).reshape(len(encs), self.max_length)
        return Encoding(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        """WordPieces -> ids ([UNK] for pieces not in the vocabulary)."""
        return [self._raw.token_to_id(t) if self._raw.token_to_id(t) is not None else self.unk_id for t in tokens]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]
