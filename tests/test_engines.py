"""The two extraction engines, and how `--engine auto` chooses between them.

The detectron2 engine equals the torch engine bit for bit given the same weights, on the tiny and on the full-size
ResNet-101 detector, and `lxm extract` writes the same store rows with either. detectron2 is not on PyPI: where it is
not installed, conftest puts the source snapshot ../shared/vendor/detectron2 on the path (pure Python suffices for
this network; its PyPI dependencies come with the `detectron2` extra), so none of these tests skips.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED, VENDORED_DETECTRON2
from lxm.cli import app
from lxm.errors import MissingDependencyError
from lxm.extract.detector import FrozenBatchNorm2d, GeneralizedRCNN, detector_tiny, vg_r101
from lxm.extract.images import caffe_blob, load_bgr
from lxm.extract.pipeline import package_commit
from lxm.extract.select import select_lxmert
from lxm.features.store import FeatureStore

IMAGES = SHARED / "fixtures" / "butd-coco-sample" / "images"
TINY = ["--weights", "random", "--detector", "tiny", "--boxes", "10"]


@pytest.fixture(scope="module")
def engine_d2():
    """lxm.extract.engine_d2 on an installed detectron2 or else the vendored snapshot (see conftest)."""
    try:
        return importlib.import_module("lxm.extract.engine_d2")
    except MissingDependencyError as exc:
        pytest.fail(f"detectron2 is neither installed nor at {VENDORED_DETECTRON2} (or its `detectron2` extra is "
                    f"missing): {exc}")


@pytest.fixture
def hidden_detectron2(monkeypatch):
    """detectron2 unimportable in this process for one test, whether or not it is importable here."""
    for name in ["detectron2", *(m for m in sys.modules if m.startswith("detectron2."))]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "lxm.extract.engine_d2", raising=False)


def _extract(*args):
    return CliRunner().invoke(app, ["extract", *[str(a) for a in args]])


def _inputs(cfg, path):
    img = load_bgr(path)
    blob, scale = caffe_blob(img, cfg.pixel_mean_bgr, cfg.min_size, cfg.max_size)
    return torch.from_numpy(blob)[None], [blob.shape[1:]], [scale], [img.shape[:2]]


def _assert_same_selection(a, b, num_boxes):
    sa = select_lxmert(a.proposals, a.cls_prob, a.attr_prob, num_boxes=num_boxes)
    sb = select_lxmert(b.proposals, b.cls_prob, b.attr_prob, num_boxes=num_boxes)
    for field in ("indices", "boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "score"):
        assert torch.equal(getattr(sa, field), getattr(sb, field)), field
    return sa


def test_detectron2_is_imported_only_by_its_engine():
    env = dict(os.environ)  # a detectron2 importable in the child, so that an import of it would show
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(VENDORED_DETECTRON2), env.get("PYTHONPATH")) if p)
    code = ("import importlib.util, sys; assert importlib.util.find_spec('detectron2'), 'detectron2 not importable'; "
            "import lxm.cli, lxm.extract.pipeline, lxm.extract.detector, lxm.features.store; "
            "lxm.extract.pipeline.choose_engine('torch'); "
            "sys.exit(1 if any(m.startswith('detectron2') for m in sys.modules) else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_missing_detectron2_gives_a_clear_message(tmp_path, hidden_detectron2):
    result = _extract("--images", IMAGES, "--out", tmp_path / "s", *TINY, "--engine", "detectron2")
    assert result.exit_code == 1 and "not on PyPI" in result.output and "Traceback" not in result.output


def test_engine_auto_falls_back_to_torch_where_detectron2_does_not_import(tmp_path, hidden_detectron2):
    result = _extract("--images", IMAGES, "--out", tmp_path / "s", *TINY)  # --engine auto is the default
    assert result.exit_code == 0, result.output
    assert "engine: torch, chosen by --engine auto (detectron2 does not import: " in result.output
    extractor = FeatureStore(tmp_path / "s").manifest["extractor"]
    assert (extractor["engine"], extractor["engine_requested"]) == ("torch", "auto")
    assert "detectron2" not in extractor


def test_engine_auto_takes_detectron2_where_it_imports(tmp_path, engine_d2):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(min(IMAGES.glob("*.jpg")), imgs)
    result = _extract("--images", imgs, "--out", tmp_path / "s", *TINY)
    assert result.exit_code == 0, result.output
    d2 = engine_d2.detectron2
    commit = package_commit(d2)
    if d2.__file__.startswith(str(VENDORED_DETECTRON2)):
        assert commit == "unknown"  # a copied source tree: neither a git checkout nor a pip-installed distribution
    assert f"engine: detectron2 {d2.__version__} (commit {commit}), chosen by --engine auto" in result.output
    extractor = FeatureStore(tmp_path / "s").manifest["extractor"]
    assert (extractor["engine"], extractor["engine_requested"]) == ("detectron2", "auto")
    assert extractor["detectron2"] == {"version": d2.__version__, "commit": commit}


@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_extract_writes_the_same_store_rows_with_either_engine(tmp_path, engine_d2, precision):
    stores = {}
    for engine in ("torch", "detectron2"):
        result = _extract("--images", IMAGES, "--out", tmp_path / engine, *TINY, *precision, "--engine", engine)
        assert result.exit_code == 0, result.output
        assert f"engine: {engine}" in result.output and "asked for" in result.output
        stores[engine] = FeatureStore(tmp_path / engine)
    ours, theirs = stores["torch"], stores["detectron2"]
    assert sorted(ours.ids()) == sorted(theirs.ids()) == sorted(p.stem for p in IMAGES.glob("*.jpg"))
    assert ours.dtype == theirs.dtype == "float16"
    for img_id in ours.ids():
        a, b = ours.get(img_id), theirs.get(img_id)
        for field in ("img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes", "features"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{img_id} {field}")
    meta_a, meta_b = ours.manifest["extractor"], theirs.manifest["extractor"]
    assert (meta_a["engine"], meta_b["engine"]) == ("torch", "detectron2")
    engine_keys = {"engine", "engine_requested", "detectron2"}
    assert {k: v for k, v in meta_a.items() if k not in engine_keys} == \
        {k: v for k, v in meta_b.items() if k not in engine_keys}  # same weights, detector, selection


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
        args = _inputs(cfg, path)
        with torch.no_grad():
            assert torch.equal(torch_engine.backbone(args[0]), d2.model.backbone(args[0])["res4"]), path.name
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a, b = torch_engine(*args)[0], d2(*args)[0]
        assert not [w for w in caught if "meshgrid" in str(w.message)]  # detectron2's, silenced by the engine
        for field in ("proposals", "features", "cls_prob", "attr_prob", "pred_boxes"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (path.name, field)
        _assert_same_selection(a, b, num_boxes=10)


@pytest.mark.e2e
def test_engines_agree_bit_for_bit_on_the_full_size_detector_on_a_real_image(engine_d2):
    """The full ResNet-101 BUTD network (random weights) on a fixture image: one forward pass per engine, its
    backbone map caught on the way. ~35 s on 2 CPU cores, most of it res5 over the 300 proposals."""
    cfg = vg_r101()
    torch_engine = GeneralizedRCNN(cfg).eval()
    torch_engine.init_random(0)
    with torch.no_grad():  # softer class / attribute logits: random weights otherwise give one-hot probabilities
        torch_engine.roi_heads.box_predictor.cls_score.weight.mul_(0.1)
        torch_engine.roi_heads.box_predictor.attr_score.weight.mul_(0.03)
    d2 = engine_d2.Detectron2Detector(cfg)
    d2.load_from(torch_engine)
    maps = {}
    torch_engine.backbone.register_forward_hook(lambda m, i, out: maps.__setitem__("torch", out))
    d2.model.backbone.register_forward_hook(lambda m, i, out: maps.__setitem__("detectron2", out["res4"]))
    # the smallest fixture image (600 x 626 after resizing); its released rows hold a pair of tied boxes
    args = _inputs(cfg, IMAGES / "COCO_train2014_000000207647.jpg")
    a, b = torch_engine(*args)[0], d2(*args)[0]
    assert maps["torch"].shape == (1, 1024, 38, 39) and torch.equal(maps["torch"], maps["detectron2"])
    assert a.proposals.shape == (300, 4) and a.features.shape == (300, 2048)
    for field in ("proposals", "features", "cls_prob", "attr_prob", "pred_boxes"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    best = a.cls_prob[:, 1:].max(dim=1).values
    assert 0.05 < best.median() < 0.95  # the probabilities compared are not saturated
    sel = _assert_same_selection(a, b, num_boxes=36)
    assert len(set(sel.indices.tolist())) == 36


def test_roi_heads_of_both_engines_take_an_image_without_proposals(engine_d2):
    from detectron2.structures import Boxes, Instances

    cfg = detector_tiny()
    torch_engine = GeneralizedRCNN(cfg).eval()
    torch_engine.init_random(1)
    d2 = engine_d2.Detectron2Detector(cfg)
    d2.load_from(torch_engine)
    feat = torch.randn(1, cfg.res2_channels * 4, 6, 8)
    none = Instances((96, 128), proposal_boxes=Boxes(torch.zeros(0, 4)))
    with torch.no_grad():
        ours = torch_engine.box_head(feat, [torch.zeros(0, 4)])
        theirs = d2.model.roi_heads.extract({"res4": feat}, [none], cfg.roi_chunk)
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in theirs] == [(0, 128), (0, 21), (0, 80), (0, 9)]


def _fake_package(root, name="fakepkg"):
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("__version__ = '1.0'\n")
    spec = importlib.util.spec_from_file_location(name, root / name / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_package_commit_reads_pips_record_or_a_git_checkout_and_never_guesses(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    site = tmp_path / "site"
    module = _fake_package(site)
    assert package_commit(module) == "unknown"  # a bare source tree
    info = site / "fakepkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
    (info / "direct_url.json").write_text(json.dumps({"url": "https://github.com/o/fakepkg.git", "vcs_info": {
        "vcs": "git", "requested_revision": commit, "commit_id": commit}}))
    monkeypatch.syspath_prepend(str(site))
    assert package_commit(module) == commit  # pip install git+https://...@commit
    other = _fake_package(tmp_path / "elsewhere")  # same name, another copy: the record is not its own
    assert package_commit(other) == "unknown"

    clone = tmp_path / "clone"
    module = _fake_package(clone, "gitpkg")
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert package_commit(module) == head  # pip install -e . in a clone, or a clone on PYTHONPATH
