"""The detectron2 engine equals the torch engine given the same weights (skipped where detectron2 is absent)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED
from lxm.cli import app
from lxm.extract.detector import GeneralizedRCNN, detector_tiny
from lxm.extract.images import caffe_blob, load_bgr
from lxm.extract.select import select_lxmert

IMAGES = SHARED / "fixtures" / "butd-coco-sample" / "images"


def test_detectron2_is_imported_only_by_its_engine():
    code = ("import sys, lxm.cli, lxm.extract.pipeline, lxm.extract.detector, lxm.extract.store; "
            "sys.exit(1 if any(m.startswith('detectron2') for m in sys.modules) else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_detectron2_gives_a_clear_message(tmp_path):
    pytest.importorskip("lxm")
    try:
        import detectron2  # noqa: F401
        pytest.skip("detectron2 is installed here")
    except ImportError:
        pass
    result = CliRunner().invoke(app, ["extract", "--images", str(IMAGES), "--out", str(tmp_path / "s"),
                                      "--weights", "random", "--detector", "tiny", "--engine", "detectron2"])
    assert result.exit_code == 1 and "not on PyPI" in result.output


def test_engines_agree_on_proposals_features_and_boxes():
    pytest.importorskip("detectron2")
    from lxm.extract.engine_d2 import Detectron2Detector

    cfg = detector_tiny()
    torch_engine = GeneralizedRCNN(cfg).eval()
    torch_engine.init_random(7)
    d2 = Detectron2Detector(cfg)
    d2.load_from(torch_engine)
    for path in sorted(IMAGES.glob("*.jpg"))[:4]:
        img = load_bgr(path)
        blob, scale = caffe_blob(img, cfg.pixel_mean_bgr, cfg.min_size, cfg.max_size)
        args = (torch.from_numpy(blob)[None], [blob.shape[1:]], [scale], [img.shape[:2]])
        a, b = torch_engine(*args)[0], d2(*args)[0]
        torch.testing.assert_close(b.proposals, a.proposals, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(b.features, a.features, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.cls_prob, a.cls_prob, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.attr_prob, a.attr_prob, rtol=1e-4, atol=1e-5)
        sa = select_lxmert(a.proposals, a.cls_prob, a.attr_prob, num_boxes=10)
        sb = select_lxmert(b.proposals, b.cls_prob, b.attr_prob, num_boxes=10)
        assert sa.indices.tolist() == sb.indices.tolist()
        np.testing.assert_array_equal(sa.objects_id.numpy(), sb.objects_id.numpy())
