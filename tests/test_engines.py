"""The detectron2 engine equals the torch engine bit for bit given the same weights.

detectron2 is not on PyPI: where it is not installed, the tests use the source snapshot in
../shared/vendor/detectron2 (pure Python suffices for this network) with its PyPI dependencies from the `detectron2`
extra; they skip only where neither is there.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED
from lxm.cli import app
from lxm.extract.detector import FrozenBatchNorm2d, GeneralizedRCNN, detector_tiny
from lxm.extract.images import caffe_blob, load_bgr
from lxm.extract.select import select_lxmert

IMAGES = SHARED / "fixtures" / "butd-coco-sample" / "images"
VENDORED_DETECTRON2 = SHARED / "vendor" / "detectron2"


@pytest.fixture(scope="module")
def engine_d2():
    """lxm.extract.engine_d2, on an installed detectron2 or else the vendored snapshot (read in place, not copied)."""
    if importlib.util.find_spec("detectron2") is None and (VENDORED_DETECTRON2 / "detectron2").is_dir():
        sys.path.insert(0, str(VENDORED_DETECTRON2))
    return pytest.importorskip("lxm.extract.engine_d2", reason="detectron2 or its dependencies (extra 'detectron2')")


def test_detectron2_is_imported_only_by_its_engine():
    code = ("import sys, lxm.cli, lxm.extract.pipeline, lxm.extract.detector, lxm.extract.store; "
            "sys.exit(1 if any(m.startswith('detectron2') for m in sys.modules) else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_detectron2_gives_a_clear_message(tmp_path, monkeypatch):
    # Make detectron2 unimportable in this process, whether or not it (or the vendored copy) is importable here.
    for name in ["detectron2", *(m for m in sys.modules if m.startswith("detectron2."))]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "lxm.extract.engine_d2", raising=False)
    result = CliRunner().invoke(app, ["extract", "--images", str(IMAGES), "--out", str(tmp_path / "s"),
                                      "--weights", "random", "--detector", "tiny", "--engine", "detectron2"])
    assert result.exit_code == 1 and "not on PyPI" in result.output and "Traceback" not in result.output


def test_frozen_batchnorm_equals_detectrons_bit_for_bit(engine_d2):
    from detectron2.layers import FrozenBatchNorm2d as D2FrozenBatchNorm2d

    g = torch.Generator().manual_seed(0)
    ours, theirs = FrozenBatchNorm2d(24), D2FrozenBatchNorm2d(24)
    for name, value in (("weight", 1 + 0.3 * torch.randn(24, generator=g)), ("bias", torch.randn(24, generator=g)),
                        ("running_mean", torch.randn(24, generator=g)),
                        ("running_var", 0.1 + torch.rand(24, generator=g))):
        getattr(ours, name).copy_(value), getattr(theirs, name).copy_(value)
    x = 3 * torch.randn(2, 24, 13, 17, generator=g)
    with torch.no_grad():  # inference: detectron2 runs the fused F.batch_norm
        assert torch.equal(ours(x), theirs(x))
    xg = x.clone().requires_grad_()  # autograd: the folded scale/shift
    assert torch.equal(ours(xg), theirs(xg))


def test_engines_agree_bit_for_bit_on_backbone_proposals_features_and_boxes(engine_d2):
    cfg = detector_tiny()
    torch_engine = GeneralizedRCNN(cfg).eval()
    torch_engine.init_random(7)
    d2 = engine_d2.Detectron2Detector(cfg)
    d2.load_from(torch_engine)
    for path in sorted(IMAGES.glob("*.jpg"))[:4]:
        img = load_bgr(path)
        blob, scale = caffe_blob(img, cfg.pixel_mean_bgr, cfg.min_size, cfg.max_size)
        args = (torch.from_numpy(blob)[None], [blob.shape[1:]], [scale], [img.shape[:2]])
        with torch.no_grad():
            assert torch.equal(torch_engine.backbone(args[0]), d2.model.backbone(args[0])["res4"]), path.name
        a, b = torch_engine(*args)[0], d2(*args)[0]
        for field in ("proposals", "features", "cls_prob", "attr_prob", "pred_boxes"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (path.name, field)
        sa = select_lxmert(a.proposals, a.cls_prob, a.attr_prob, num_boxes=10)
        sb = select_lxmert(b.proposals, b.cls_prob, b.attr_prob, num_boxes=10)
        assert sa.indices.tolist() == sb.indices.tolist()
        np.testing.assert_array_equal(sa.objects_id.numpy(), sb.objects_id.numpy())
