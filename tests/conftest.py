"""Shared fixtures: paths to ../shared, a seeded tiny transformers LXMERT (the oracle) and matching inputs, the tiny
corpus (`data`) and the pretrained learning world; the worlds themselves are built in `synthetic`."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (as CI lays it out), or wherever LXM_SHARED points
SHARED = Path(os.environ.get("LXM_SHARED") or REPO.parent / "shared")
BERT_VOCAB = SHARED / "vocab" / "bert-base-uncased-vocab.txt"
HF_KEYS = SHARED / "reference" / "hf_lxmert_keys.txt"
# detectron2 is not on PyPI: where it is not installed, the tests import the unmodified source snapshot in
# ../shared/vendor/detectron2 in place (pure Python; its PyPI dependencies come with the dev extra). It goes on the
# path here, once for the session, so `lxm extract --engine auto` picks the same engine in every test, in any order.
VENDORED_DETECTRON2 = SHARED / "vendor" / "detectron2"
if importlib.util.find_spec("detectron2") is None and (VENDORED_DETECTRON2 / "detectron2").is_dir():
    sys.path.append(str(VENDORED_DETECTRON2))  # appended: its setup.py must not shadow anything


FIXTURE = SHARED / "fixtures" / "butd-coco-sample"  # 10 COCO images + their rows of LXMERT's released TSV


def tiny_fixture_store(root: Path, stems) -> None:
    """root/images: links to the fixture's COCO images `stems`; root/store: their features by `lxm extract` with the
    tiny random-weight detector (what `lxm ask --detector tiny --random-detector` computes for the same files)."""
    from typer.testing import CliRunner

    from lxm.cli import app

    (root / "images").mkdir()
    for stem in stems:
        (root / "images" / f"{stem}.jpg").symlink_to(FIXTURE / "images" / f"{stem}.jpg")
    result = CliRunner().invoke(app, ["extract", "--images", str(root / "images"), "--out", str(root / "store"),
                                      "--detector", "tiny", "--weights", "random", "--dtype", "float32",
                                      "--engine", "torch"])
    assert result.exit_code == 0, result.output


def pytest_configure(config):
    if not (SHARED / "vocab").is_dir() or not (SHARED / "fixtures").is_dir():
        pytest.exit(f"the shared test fixtures are not at {SHARED}: the tests read ../shared beside the checkout "
                    f"(fixtures/, vocab/, reference/); set LXM_SHARED=/path/to/shared to use another place", returncode=4)


def tiny_hf_kwargs(**overrides):
    """transformers LxmertConfig kwargs equal to lxm's `lxmert_tiny()` preset: every field of it that transformers'
    config also has (the same names mean the same thing there), so a change of the preset reaches both sides."""
    import dataclasses

    import transformers

    from lxm.model import lxmert_tiny

    known = transformers.LxmertConfig().to_dict()
    kw = {k: v for k, v in dataclasses.asdict(lxmert_tiny()).items() if k in known}
    kw.update(overrides)
    return kw


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter (biases and LayerNorms included) distinct random values, so parity tests are sensitive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if name.endswith("LayerNorm.weight") or "layer_norm.weight" in name else noise)
    return model


def make_inputs(cfg, batch: int = 4, seq: int = 12, boxes: int = 5, seed: int = 1, pad=(0, 2, 4, 6)):
    """Realistic inputs: [CLS] ... [SEP] + padding, features in [0, 2), normalised boxes, and pretraining labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):
        n_pad = pad[i % len(pad)]
        length = seq - n_pad
        ids[i, 0], ids[i, length - 1] = 2, 3
        ids[i, length:] = 0
        mask[i, length:] = 0
    feats = torch.rand(batch, boxes, cfg.visual_feat_dim, generator=g) * 2
    xy = torch.rand(batch, boxes, 2, generator=g) * 0.7
    wh = torch.rand(batch, boxes, 2, generator=g) * 0.3
    visual_boxes = torch.cat([xy, xy + wh], dim=-1)
    mlm = torch.full((batch, seq), -1, dtype=torch.long)
    pick = (torch.rand(batch, seq, generator=g) < 0.3) & mask.bool()
    pick[:, 0] = False
    pick[0, 1] = True  # at least one masked token
    mlm[pick] = ids[pick]
    feat_mask = (torch.rand(batch, boxes, generator=g) < 0.3).float()
    feat_mask[0, 0] = 1.0
    labels = dict(
        mlm_labels=mlm,
        matched=torch.randint(0, 2, (batch,), generator=g),
        obj_labels=torch.randint(0, cfg.num_object_labels, (batch, boxes), generator=g),
        obj_conf=torch.rand(batch, boxes, generator=g),
        attr_labels=torch.randint(0, cfg.num_attr_labels, (batch, boxes), generator=g),
        attr_conf=torch.rand(batch, boxes, generator=g),
        feat_target=feats.clone(),
        feat_mask=feat_mask,
        answers=torch.randint(0, cfg.num_qa_labels, (batch,), generator=g),
    )
    labels["answers"][labels["matched"] == 0] = -1
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), visual_feats=feats,
                  visual_boxes=visual_boxes)
    return inputs, labels


@pytest.fixture(scope="session")
def bert_vocab() -> Path:
    if not BERT_VOCAB.exists():
        pytest.fail(f"shared fixture missing: {BERT_VOCAB}")
    return BERT_VOCAB


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny corpus built by `lxm build-corpus` from small raw files of every source, with random features for
    its images (`synthetic.make_tiny_corpus`; pass it to `synthetic.pretrain_args`); one per test module."""
    from synthetic import make_tiny_corpus

    return make_tiny_corpus(tmp_path_factory.mktemp("pt"))


@pytest.fixture(scope="session")
def pretrained_world(tmp_path_factory):
    """(world root, run dir): the synthetic pretraining world and a tiny model pretrained on it by `lxm pretrain`
    (~90 s); shared by the pretraining and finetuning learning tests."""
    from synthetic import make_pretraining_world, pretrain

    root = tmp_path_factory.mktemp("world")
    make_pretraining_world(root)
    return root, pretrain(root)
