"""Visual backends of `lxm extract --backbone` (issue 31): grid features, given boxes and timm models on the fixture
images with random weights and tiny configs; the store's up-to-N records, the manifest's backbone, and the exports."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_pool
from typer.testing import CliRunner

from conftest import SHARED
from lxm.cli import app
from lxm.extract.detector import GeneralizedRCNN, detector_tiny, in_layout_of
from lxm.extract.images import caffe_blob, load_bgr
from lxm.extract.weights import load_detector_weights
from lxm.features import NO_LABEL, FeatureStore, FeatureStoreWriter, ImageFeatures, StoreError, store_backbone
from lxm.features.h5 import read_h5
from lxm.features.tsv import read_tsv
from lxm.model.losses import IGNORE_INDEX

IMAGES = SHARED / "fixtures" / "butd-coco-sample" / "images"
DETECTOR = ["--weights", "random", "--detector", "tiny", "--engine", "torch"]
TINY_VIT = ["--backbone", "timm:vit_tiny_patch16_224", "--timm-arg", "depth=2", "--timm-arg", "embed_dim=32",
            "--timm-arg", "num_heads=2", "--timm-arg", "img_size=64"]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _extract(*args):
    return _cli("extract", "--images", IMAGES, *args)


def _paths():
    return sorted(IMAGES.glob("*.jpg"))


def _tiny_detector() -> GeneralizedRCNN:
    model = GeneralizedRCNN(detector_tiny()).eval()
    load_detector_weights(model, "random", seed=0)
    return model


def test_no_label_is_the_losses_ignore_index():
    assert NO_LABEL == IGNORE_INDEX


def test_grid_features_are_res5_of_the_res4_map_average_pooled(tmp_path):
    g = 4
    result = _extract("--out", tmp_path / "s", *DETECTOR, "--backbone", "grid", "--grid", g, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    store = FeatureStore(tmp_path / "s")
    info = store_backbone(store.manifest)
    assert (info.name, info.grid, info.num_boxes, info.feature_dim, info.labels) == ("grid", g, g * g, 128, False)
    assert info.detector == "tiny" and info.weights == "random(seed=0)"
    model, det = _tiny_detector(), detector_tiny()
    assert sorted(store.ids()) == [p.stem for p in _paths()]
    for path in _paths():
        rec = store.get(path.stem)
        img = load_bgr(path)
        blob, scale = caffe_blob(img, det.pixel_mean_bgr, det.min_size, det.max_size)
        with torch.no_grad():
            res4 = model.backbone(torch.from_numpy(blob[None]))
            fmap = model.roi_heads.res5(in_layout_of(res4, model.roi_heads.res5))[0]
        h, w = fmap.shape[1:]
        want_feats, want_boxes = [], []
        for i in range(g):  # adaptive average pooling's cells, by hand: [floor(i n / g), ceil((i + 1) n / g))
            y0, y1 = (i * h) // g, -(-((i + 1) * h) // g)
            for j in range(g):
                x0, x1 = (j * w) // g, -(-((j + 1) * w) // g)
                want_feats.append(fmap[:, y0:y1, x0:x1].mean(dim=(1, 2)).numpy())
                # the resized image's border is the original's (its size was rounded)
                edge = [x0 * 16, y0 * 16, x1 * 16, y1 * 16]
                limit = [blob.shape[2], blob.shape[1]] * 2
                full = [img.shape[1], img.shape[0]] * 2
                want_boxes.append([o if e >= m else e / scale for e, m, o in zip(edge, limit, full)])
        np.testing.assert_allclose(rec.features, np.stack(want_feats), rtol=1e-5, atol=1e-6)
        boxes = np.clip(np.array(want_boxes), 0, [img.shape[1], img.shape[0]] * 2)
        np.testing.assert_allclose(rec.boxes, boxes, rtol=1e-6)
        assert rec.boxes[0, :2].tolist() == [0, 0] and rec.boxes[-1, 2:].tolist() == [img.shape[1], img.shape[0]]
        assert (rec.objects_id == NO_LABEL).all() and (rec.attrs_id == NO_LABEL).all()
        assert (rec.objects_conf == 0).all() and (rec.attrs_conf == 0).all()
    # a second run adds nothing; a run with another grid into the same store is refused
    again = _extract("--out", tmp_path / "s", *DETECTOR, "--backbone", "grid", "--grid", g, "--dtype", "float32")
    assert again.exit_code == 0 and "already in the store" in again.output
    after = FeatureStore(tmp_path / "s")
    assert len(after) == len(_paths()) and len(after.manifest["shards"]) == 1
    assert store_backbone(after.manifest) == info  # a run that extracted nothing keeps the recorded backbone
    other = _extract("--out", tmp_path / "s", *DETECTOR, "--backbone", "grid", "--grid", 3, "--dtype", "float32")
    assert other.exit_code != 0


def _boxes_file(tmp_path, skip: int = 2):
    """Boxes for all but the last `skip` fixture images, 1..8 of them (the count varies per image)."""
    lines, given = [], {}
    for k, path in enumerate(_paths()[:-skip]):
        h, w = cv2.imread(str(path)).shape[:2]
        boxes = [[0, 0, w, h], [10.5, 20.25, w / 2, h / 3]] + [[3 * i, 4 * i, 3 * i + 40.5, 4 * i + 33] for i in range(k)]
        boxes = boxes[:max(1, k)]
        given[path.stem] = np.array(boxes, np.float32)
        lines.append(json.dumps({"img_id": path.stem, "boxes": boxes}))
    (tmp_path / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "boxes.jsonl", given


def test_given_boxes_come_back_as_given_with_the_detectors_pooling(tmp_path):
    file, given = _boxes_file(tmp_path)
    result = _extract("--out", tmp_path / "s", *DETECTOR, "--boxes-file", file, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    store = FeatureStore(tmp_path / "s")
    info = store_backbone(store.manifest)
    assert info.name == "butd" and info.labels and info.given_boxes and info.num_boxes == max(map(len, given.values()))
    assert info.boxes_file == str(file) and len(info.boxes_sha256) == 64
    assert sorted(store.ids()) == sorted(given)
    failed = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["img_id"] for f in failed) == [p.stem for p in _paths()[-2:]]
    assert all("no boxes" in f["reason"] for f in failed)
    model, det = _tiny_detector(), detector_tiny()
    for img_id, boxes in given.items():
        rec = store.get(img_id)
        assert rec.num_boxes == len(boxes)
        np.testing.assert_array_equal(rec.boxes, boxes)
        blob, scale = caffe_blob(load_bgr(IMAGES / f"{img_id}.jpg"), det.pixel_mean_bgr, det.min_size, det.max_size)
        with torch.no_grad():  # torchvision's ROIPool at the scaled boxes, res5, the mean: the detector's pooling
            res4 = model.backbone(torch.from_numpy(blob[None]))
            rois = torch.cat([torch.zeros(len(boxes), 1), torch.from_numpy(boxes) * scale], 1)
            pooled = roi_pool(res4, rois, det.pooler_resolution, 1 / det.stride)
            feats = model.roi_heads.res5(pooled).mean(dim=(2, 3))
            cls = F.softmax(model.roi_heads.box_predictor(feats)[0], dim=1)
        np.testing.assert_allclose(rec.features, feats.numpy(), rtol=1e-5, atol=1e-6)
        conf, ids = cls[:, :-1].max(dim=1)  # detectron2's layout: background last
        np.testing.assert_array_equal(rec.objects_id, ids.numpy())
        np.testing.assert_allclose(rec.objects_conf, conf.numpy(), rtol=1e-5)
    # resumed: nothing is added twice, the two images without boxes fail again
    again = _extract("--out", tmp_path / "s", *DETECTOR, "--boxes-file", file, "--dtype", "float32")
    assert again.exit_code == 0 and "extracted 0 images" in again.output and len(FeatureStore(tmp_path / "s")) == 8


@pytest.mark.parametrize("line, says", [
    ('{"img_id": "a", "boxes": [[0, 0, 10]]}', "field 'boxes'"),
    ('{"img_id": "a", "boxes": [[5, 0, 4, 10]]}', "x2 > x1"),
    ('{"boxes": [[0, 0, 1, 1]]}', "field 'img_id'"),
    ("not json", "not JSON"),
])
def test_bad_boxes_lines_are_one_line_errors_naming_file_and_line(tmp_path, line, says):
    file = tmp_path / "b.jsonl"
    file.write_text('{"img_id": "x", "boxes": [[0, 0, 1, 1]]}\n' + line + "\n")
    result = _extract("--out", tmp_path / "s", *DETECTOR, "--boxes-file", file)
    assert result.exit_code != 0 and f"{file}:2" in result.output and says in result.output
    assert "Traceback" not in result.output


def test_given_box_outside_its_image_is_a_failure(tmp_path):
    path = _paths()[0]
    h, w = cv2.imread(str(path)).shape[:2]
    file = tmp_path / "b.jsonl"
    file.write_text(json.dumps({"img_id": path.stem, "boxes": [[0, 0, w + 5, h]]}) + "\n")
    result = _extract("--out", tmp_path / "s", *DETECTOR, "--boxes-file", file)
    assert result.exit_code != 0  # no image could be used
    reasons = (tmp_path / "s" / "failures.jsonl").read_text()
    assert "lies outside" in reasons


def _tiny_vit():
    import timm

    torch.manual_seed(3)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                             img_size=64).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_features_equal_forward_features_of_its_preprocessing(tmp_path, suffix):
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    model = _tiny_vit()
    weights = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(weights))
    else:
        torch.save(model.state_dict(), weights)
    for dtype in ("float32", "float16"):
        result = _extract("--out", tmp_path / dtype, *TINY_VIT, "--backbone-weights", weights, "--dtype", dtype,
                          "--batch-size", 1)
        assert result.exit_code == 0, result.output
    store, half = FeatureStore(tmp_path / "float32"), FeatureStore(tmp_path / "float16")
    info = store_backbone(store.manifest)
    assert (info.name, info.model, info.num_boxes, info.feature_dim, info.labels) == \
        ("timm", "vit_tiny_patch16_224", 16, 32, False)
    assert info.weights == str(weights) and info.model_args["depth"] == 2 and info.input_size == (64, 64)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, 64, 64)}, model=model))
    for path in _paths():
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        with torch.no_grad():
            want = model.forward_features(transform(Image.fromarray(rgb))[None])[0, model.num_prefix_tokens:].numpy()
        rec = store.get(path.stem)
        np.testing.assert_array_equal(rec.features, want)
        np.testing.assert_array_equal(half.get(path.stem).features, want.astype(np.float16))
        # patch boxes: short side to int(64 / 0.9) = 71 pixels, centre crop 64, 4 x 4 patches of 16
        h, w = rgb.shape[:2]
        s = 71 / min(h, w)
        rh, rw = (71, int(71 * w / h)) if h <= w else (int(71 * h / w), 71)
        sx, sy = rw / w, rh / h
        left, top = round((rw - 64) / 2), round((rh - 64) / 2)
        assert s > 0
        np.testing.assert_allclose(rec.boxes[0], [left / sx, top / sy, (left + 16) / sx, (top + 16) / sy], rtol=1e-5)
        np.testing.assert_allclose(rec.boxes[-1], [(left + 48) / sx, (top + 48) / sy, (left + 64) / sx,
                                                   (top + 64) / sy], rtol=1e-5)
        assert (rec.objects_id == NO_LABEL).all()


def test_timm_batches_agree_and_a_second_run_adds_nothing(tmp_path):
    for bs in (1, 4):
        result = _extract("--out", tmp_path / f"b{bs}", *TINY_VIT, "--backbone-weights", "random", "--batch-size", bs,
                          "--dtype", "float32")
        assert result.exit_code == 0, result.output
    one, four = FeatureStore(tmp_path / "b1"), FeatureStore(tmp_path / "b4")
    for img_id in one.ids():
        np.testing.assert_allclose(one.get(img_id).features, four.get(img_id).features, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(one.get(img_id).boxes, four.get(img_id).boxes)
    again = _extract("--out", tmp_path / "b4", *TINY_VIT, "--backbone-weights", "random", "--dtype", "float32")
    assert again.exit_code == 0 and "already in the store" in again.output and len(FeatureStore(tmp_path / "b4")) == 10


def _hub_extract(tmp_path, out, *weights):
    """`lxm extract` in a child process offline (HF_HUB_OFFLINE=1) over the Hugging Face cache `tmp_path/hub`: the
    real `hf_hub_download` resolves a Hub id from the cache as it does after a download (none can happen here)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, "-m", "lxm.cli", "extract", "--images", str(IMAGES), "--out", str(out),
                           *TINY_VIT, *weights, "--dtype", "float32"], env=env, capture_output=True, text=True)


def _cache_repo(hub, repo: str, state_dict) -> None:
    """A Hub repository in huggingface_hub's cache layout (models--org--name/{refs/main, snapshots/<commit>/})."""
    from safetensors.torch import save_file

    folder = hub / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    save_file(state_dict, str(folder / "snapshots" / commit / "model.safetensors"))


def test_timm_hub_weights_by_id_and_by_the_models_own_name_from_the_hub_cache(tmp_path):
    model = _tiny_vit()
    want = {}
    # nothing cached: one line naming the repository and what to do offline
    missing = _hub_extract(tmp_path, tmp_path / "none", "--backbone-weights", "someone/vit-tiny-test")
    assert missing.returncode == 1
    assert "could not fetch 'someone/vit-tiny-test' from the Hugging Face Hub" in missing.stderr
    assert "pass the file with --backbone-weights" in missing.stderr and "Traceback" not in missing.stderr
    # a Hub id (--backbone-weights org/name), and no --backbone-weights: the model name's own pretrained tag's repo
    own = model.pretrained_cfg["hf_hub_id"]  # timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k
    assert own.startswith("timm/vit_tiny_patch16_224")
    _cache_repo(tmp_path / "hub", "someone/vit-tiny-test", model.state_dict())
    _cache_repo(tmp_path / "hub", own, model.state_dict())
    for name, weights in (("by-id", ["--backbone-weights", "someone/vit-tiny-test"]), ("own", [])):
        result = _hub_extract(tmp_path, tmp_path / name, *weights)
        assert result.returncode == 0, result.stderr
        store = FeatureStore(tmp_path / name)
        info = store_backbone(store.manifest)
        assert info.weights.endswith("/model.safetensors") and str(tmp_path / "hub") in info.weights
        assert info.weights_sha256 is not None and len(info.weights_sha256) == 64
        want[name] = {img_id: store.get(img_id).features for img_id in store.ids()}
    # the same weights: the same features, equal to those of the local file
    local = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(local))
    assert _extract("--out", tmp_path / "local", *TINY_VIT, "--backbone-weights", local,
                    "--dtype", "float32").exit_code == 0
    store = FeatureStore(tmp_path / "local")
    for img_id in store.ids():
        np.testing.assert_array_equal(want["by-id"][img_id], store.get(img_id).features)
        np.testing.assert_array_equal(want["own"][img_id], store.get(img_id).features)


def test_timm_convnet_feature_map_cells(tmp_path):
    result = _extract("--out", tmp_path / "s", "--backbone", "timm:resnet18", "--backbone-weights", "random",
                      "--timm-arg", "layers=[1,1,1,1]")
    assert result.exit_code == 0, result.output
    store = FeatureStore(tmp_path / "s")
    info = store_backbone(store.manifest)
    assert (info.num_boxes, info.feature_dim, info.input_size) == (49, 512, (224, 224))
    rec = store.at(0)
    widths = rec.boxes[:, 2] - rec.boxes[:, 0]
    assert np.allclose(widths, widths[0]) and rec.boxes[:7, 1].tolist() == [rec.boxes[0, 1]] * 7  # a 7 x 7 grid


def test_cli_refuses_mixed_options(tmp_path):
    for args, says in ((["--backbone", "grid", "--boxes", 10, *DETECTOR], "--boxes"),
                       (["--backbone", "vgg", *DETECTOR], "unknown --backbone"),
                       ([*TINY_VIT, "--weights", "random"], "--backbone-weights"),
                       (["--backbone", "grid"], "--weights is required"),
                       (["--backbone", "timm:no_such_model_xyz", "--backbone-weights", "random"], "timm cannot")):
        result = _extract("--out", tmp_path / "s", *args)
        assert result.exit_code != 0 and says in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_show_and_inspect_work_for_label_less_stores(tmp_path):
    assert _extract("--out", tmp_path / "s", *DETECTOR, "--backbone", "grid", "--grid", 3).exit_code == 0
    img = _paths()[0]
    out = tmp_path / "cells.png"
    result = _cli("show", tmp_path / "s", img.stem, "--image", img, "--out", out)
    assert result.exit_code == 0, result.output
    picture = cv2.imread(str(out))
    assert picture is not None and picture.shape[0] >= cv2.imread(str(img)).shape[0]
    result = _cli("inspect", tmp_path / "s")
    assert result.exit_code == 0 and "backbone: grid 3x3 of tiny" in result.output and "no labels" in result.output


def _record(img_id: str, k: int, d: int = 8, labels: bool = True) -> ImageFeatures:
    rng = np.random.default_rng(k)
    return ImageFeatures(img_id=img_id, img_h=100, img_w=120,
                         objects_id=(np.arange(k) if labels else np.full(k, NO_LABEL)).astype(np.int64),
                         objects_conf=rng.random(k, dtype=np.float32), attrs_id=np.arange(k, dtype=np.int64),
                         attrs_conf=rng.random(k, dtype=np.float32),
                         boxes=np.tile(np.array([1, 2, 50, 60], np.float32), (k, 1)) + np.arange(k)[:, None],
                         features=rng.random((k, d), dtype=np.float32))


def test_store_holds_up_to_n_boxes_and_readers_return_only_the_real_ones(tmp_path):
    recs = [_record("a", 5), _record("b", 2), _record("c", 1)]
    backbone = {"name": "butd", "boxes_file": "/x.jsonl", "boxes_sha256": "0" * 64, "labels": True}
    with FeatureStoreWriter(tmp_path / "s", num_boxes=5, feature_dim=8, dtype="float32", backbone=backbone) as w:
        for rec in recs:
            w.add(rec)
        with pytest.raises(Exception, match="1 to 5 boxes"):
            w.add(_record("d", 6))
    store = FeatureStore(tmp_path / "s")
    assert store_backbone(store.manifest).given_boxes
    for rec in recs:
        got = store.get(rec.img_id)
        assert got.num_boxes == rec.num_boxes
        for name in ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes", "features"):
            np.testing.assert_array_equal(getattr(got, name), getattr(rec, name))
    # HDF5 keeps each record's count (and the backbone); TSV rows carry their own num_boxes
    assert _cli("export", "h5", tmp_path / "s", tmp_path / "f.h5").exit_code == 0
    assert [r.num_boxes for r in read_h5(tmp_path / "f.h5")] == [5, 2, 1]
    assert _cli("convert", "h5", tmp_path / "f.h5", tmp_path / "s2").exit_code == 0
    back = FeatureStore(tmp_path / "s2")
    assert back.get("b").num_boxes == 2 and store_backbone(back.manifest).given_boxes
    result = _cli("export", "tsv", tmp_path / "s", tmp_path / "f.tsv")
    assert result.exit_code == 0 and "given boxes" in result.output
    rows = list(read_tsv(tmp_path / "f.tsv"))
    assert [r.num_boxes for r in rows] == [5, 2, 1]
    np.testing.assert_array_equal(rows[1].features, recs[1].features)


def test_label_less_tsv_export_says_so_and_keeps_minus_one(tmp_path):
    with FeatureStoreWriter(tmp_path / "s", num_boxes=4, feature_dim=8, dtype="float32",
                            backbone={"name": "grid", "grid": 2, "labels": False, "detector": "tiny"}) as w:
        w.add(_record("a", 4, labels=False))
    result = _cli("export", "tsv", tmp_path / "s", tmp_path / "f.tsv")
    assert result.exit_code == 0 and "no labels" in result.output
    assert (next(read_tsv(tmp_path / "f.tsv")).objects_id == -1).all()


def test_old_manifests_read_as_butd_and_writers_of_another_backbone_are_refused(tmp_path):
    with FeatureStoreWriter(tmp_path / "s", num_boxes=4, feature_dim=8, dtype="float32",
                            metadata={"weights": "w.pkl", "weights_sha256": "ab" * 32}) as w:
        w.add(_record("a", 4))
    manifest = FeatureStore(tmp_path / "s").manifest
    assert "backbone" not in manifest  # as every store written before backends
    info = store_backbone(manifest)
    assert (info.name, info.labels, info.num_boxes, info.weights, info.given_boxes) == ("butd", True, 4, "w.pkl", False)
    butd = {"name": "butd", "labels": True, "detector": "vg-r101"}
    FeatureStoreWriter(tmp_path / "s", num_boxes=4, feature_dim=8, dtype="float32", backbone=butd).close()
    with pytest.raises(StoreError, match="backbone 'butd'.*'grid'"):
        FeatureStoreWriter(tmp_path / "s", num_boxes=4, feature_dim=8, dtype="float32",
                           backbone={"name": "grid", "grid": 2, "labels": False})


def test_lxm_ask_computes_a_timm_backbones_features_in_memory_as_lxm_extract_stores_them(tmp_path):
    """`lxm ask` on raw images with a run whose stores hold timm patches (issue 31): the in-memory features equal
    the float32 store's rows, and the backbone is taken from the run's store record unless an option names one."""
    from lxm.cli.ask import backbone_choice
    from lxm.infer.detect import Detector, detector_config

    out = tmp_path / "vit"
    result = _extract("--out", out, "--backbone-weights", "random", "--dtype", "float32", *TINY_VIT[:1],
                      *TINY_VIT[1:])
    assert result.exit_code == 0, result.output
    store = FeatureStore(out)
    recorded = store_backbone(store.manifest)
    chosen = backbone_choice(None, None, None, None, recorded, "vg-r101")  # nothing asked: the run's record
    assert chosen["backbone"] == "timm:vit_tiny_patch16_224" and (chosen["backbone_weights"], chosen["seed"]) == (
        "random", 0)
    assert chosen["timm_args"] == {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}
    assert backbone_choice("butd", None, None, None, recorded, "vg-r101") == {"backbone": "butd"}
    source = Detector(detector_config(None, engine="torch", **chosen))
    assert source.info.feature_dim == store.feature_dim and "RANDOM" in source.describe()
    for rec in source.records(_paths()):
        stored = store.get(rec.img_id)
        np.testing.assert_array_equal(rec.features, stored.features)
        np.testing.assert_array_equal(rec.boxes, stored.boxes)
        assert (rec.objects_id == NO_LABEL).all()
