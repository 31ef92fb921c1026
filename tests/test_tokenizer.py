"""WordPiece tokenisation as LXMERT feeds it, on the real bert-base-uncased vocabulary."""

from __future__ import annotations

import pytest

from lxm.model import LxmertTokenizer, TokenizerError


@pytest.fixture(scope="module")
def tok(bert_vocab):
    return LxmertTokenizer(bert_vocab)


@pytest.fixture(scope="module")
def vocab(bert_vocab):
    return {w: i for i, w in enumerate(bert_vocab.read_text().splitlines())}


def test_special_ids_are_berts(tok):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.vocab_size == 30522


def test_sentence_is_lowercased_wrapped_and_padded(tok, vocab):
    enc = tok.encode("  A Man riding a HORSE.  ")
    words = ["a", "man", "riding", "a", "horse", "."]
    expected = [vocab["[CLS]"]] + [vocab[w] for w in words] + [vocab["[SEP]"]]
    assert enc.input_ids.shape == (1, 20)
    assert enc.input_ids[0, : len(expected)].tolist() == expected
    assert enc.input_ids[0, len(expected):].tolist() == [0] * (20 - len(expected))
    assert enc.attention_mask[0].tolist() == [1] * len(expected) + [0] * (20 - len(expected))
    assert enc.token_type_ids.sum() == 0


def test_wordpiece_and_accents(tok):
    assert tok.tokenize("unaffable") == ["una", "##ffa", "##ble"]
    assert tok.tokenize("Café") == ["cafe"]


def test_long_sentences_keep_18_pieces(tok):
    enc = tok.encode(["word " * 40, "short"])
    assert enc.input_ids.shape == (2, 20)
    assert enc.input_ids[0, 0] == 101 and enc.input_ids[0, 19] == 102
    assert enc.attention_mask[0].sum() == 20
    assert tok.decode(enc.input_ids[1]) == "short"


def test_max_length_is_configurable(bert_vocab):
    enc = LxmertTokenizer(bert_vocab, max_length=8).encode("is the man riding a horse on the beach?")
    assert enc.input_ids.shape == (1, 8) and enc.input_ids[0, -1] == 102


def test_directory_with_vocab_txt(tmp_path, bert_vocab):
    (tmp_path / "vocab.txt").write_bytes(bert_vocab.read_bytes())
    assert LxmertTokenizer(tmp_path).encode("dog").input_ids[0, :3].tolist() == [101, 3899, 102]


def test_offline_hub_failure_says_how_to_pass_a_local_vocab(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time, unlike the env var
    with pytest.raises(TokenizerError, match="pass a local vocabulary"):
        LxmertTokenizer("bert-base-uncased")


def test_missing_file_and_bad_vocab(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        LxmertTokenizer(tmp_path / "vocab.txt")
    (tmp_path / "v.txt").write_text("[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    with pytest.raises(TokenizerError, match=r"\[PAD\]"):
        LxmertTokenizer(tmp_path / "v.txt")
