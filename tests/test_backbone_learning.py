"""Learning tests over the other visual backends (issue 31): pictures of coloured shapes (`lxm.demo.world`, the
quickstart's world in the real raw formats) go through `lxm extract --backbone grid` (the tiny detector's res5 grid)
or `--backbone timm:vit_tiny_patch16_224` (a 2-block ViT), seeded random weights both, then `lxm build-corpus`,
`lxm pretrain` (no object/attribute losses: the stores have no labels) and `lxm finetune vqa`; finetuning from the
pretrained model beats finetuning from scratch on held-out minival questions, with margins.

The backbones are random, so what the model can read is what a random network keeps of the pixels: the colour
of the cells the shape covers (the patch embedding is linear in the pixels; random res5 filters respond to it as
well). Pretraining's QA objective learns the colour questions on the training images; finetuning from scratch gets
the same questions for a few epochs only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lxm.cli import app
from lxm.demo.world import make_world, train_vocab

pytestmark = pytest.mark.e2e  # whole recipes through the lxm CLI (README: Tests)

BACKBONES = {
    "grid": ["--backbone", "grid", "--grid", "4", "--weights", "random", "--detector", "tiny"],
    "timm": ["--backbone", "timm:vit_tiny_patch16_224", "--backbone-weights", "random", "--timm-arg", "depth=2",
             "--timm-arg", "embed_dim=32", "--timm-arg", "num_heads=2", "--timm-arg", "img_size=64"],
}


def _invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _learn(root: Path, backbone: str, pretrain_steps: int) -> dict[str, float]:
    make_world(root, train_images=96, val_images=48, nlvr2_pairs=4, image_size=96, seed=0)
    vocab = train_vocab(root)
    splits = ("train2014", "val2014")
    for split in splits:
        _invoke("extract", "--images", root / "images" / split, "--out", root / "features" / split,
                *BACKBONES[backbone])
    feats = [x for s in splits for x in ("--features", root / "features" / s)]
    _invoke("build-corpus", "--out", root / "corpus", "--coco", root / "raw" / "coco", "--vqa", root / "raw" / "vqa",
            "--minival-ids", root / "raw" / "minival.json", "--vqa-min-questions", "1", *feats)
    common = [*feats, "--corpus", root / "corpus", "--set", f"vocab={vocab}", "--config", "tiny",
              "--set", "dropout=0"]
    output = _invoke("pretrain", "--out", root / "pretrain", *common, "--set", "epochs=1000",
                     "--set", f"max_steps={pretrain_steps}", "--set", "batch_size=32", "--set", "lr=1e-3",
                     "--set", "warmup=0.05", "--set", "log_every=50", "--set", "checkpoint_every=100000",
                     "--set", "keep_last=1")
    config = (root / "pretrain" / "config.yaml").read_text()
    assert "- obj\n" not in config and "- attr\n" not in config and "- qa\n" in config, output
    best = {}
    for name, init in (("pretrained", ["--init", root / "pretrain"]), ("scratch", ["--set", "from_scratch=true"])):
        _invoke("finetune", "vqa", *init, "--out", root / name, *common, "--set", "epochs=6", "--set", "batch_size=32",
                "--set", "lr=3e-4", "--set", "train_splits=train")
        best[name] = json.loads((root / name / "summary.json").read_text())["best"]
    return best
