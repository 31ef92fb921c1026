"""`lxm extract` with the torch engine on a tiny random-weight detector: store contents, batching, bad images,
crash safety, sharding, weight loading and the Caffe preprocessing conventions."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import SHARED
from lxm.cli import app
from lxm.extract.detector import GeneralizedRCNN, detector_tiny
from lxm.extract.images import caffe_blob, caffe_scale
from lxm.extract.detector import DetectorOutput
from lxm.extract.pipeline import ExtractConfig, extract, image_records
from lxm.extract.select import select_lxmert_batch
from lxm.extract.weights import WeightsError, download, load_detector_weights, save_pickle_weights
from lxm.integrity import sha256_file
from lxm.features.store import FeatureStore
from synthetic import serve_folder

IMAGES = SHARED / "fixtures" / "butd-coco-sample" / "images"
# --engine torch: the default, auto, would take detectron2 where the tests find it (tests/test_engines.py)
TINY = ["--weights", "random", "--detector", "tiny", "--boxes", "10", "--engine", "torch"]


def _extract(*args):
    return CliRunner().invoke(app, ["extract", *[str(a) for a in args]])


def test_extracts_every_fixture_image_into_a_valid_store(tmp_path, caplog):
    result = _extract("--images", IMAGES, "--out", tmp_path / "s", *TINY)
    assert result.exit_code == 0, result.output
    said = result.output.splitlines() + [r.getMessage() for r in caplog.records]
    assert len([line for line in said if "meaningless" in line]) == 1  # the random-weights warning, once
    store = FeatureStore(tmp_path / "s")
    assert sorted(store.ids()) == sorted(p.stem for p in IMAGES.glob("*.jpg"))
    assert store.manifest["extractor"]["random_weights"] is True
    assert store.manifest["extractor"]["mode"] == "lxmert" and store.num_boxes == 10
    for img_id in store.ids():
        rec = store.get(img_id)
        h, w = cv2.imread(str(IMAGES / f"{img_id}.jpg")).shape[:2]
        assert (rec.img_h, rec.img_w) == (h, w)
        assert rec.normalized_boxes().max() <= 1.0 and np.isfinite(rec.features.astype(np.float32)).all()
        assert len({tuple(b) for b in rec.boxes.tolist()}) == 10  # distinct proposals


def test_batched_equals_single_image_results(tmp_path):
    """README: a store's rows are bit-identical whatever --batch-size (each image runs through the detector on its
    own; a shared backbone pass of equal-size images moved the tiny detector's features by an fp16 ulp)."""
    det = detector_tiny()
    sizes = [tuple(round(v * caffe_scale(*im.shape[:2], det.min_size, det.max_size)) for v in im.shape[:2])
             for im in (cv2.imread(str(p)) for p in sorted(IMAGES.glob("*.jpg")))]
    assert len(set(sizes)) < len(sizes)  # one batch of all holds images of one size: the case that differed
    for bs in (1, len(sizes)):
        assert _extract("--images", IMAGES, "--out", tmp_path / f"b{bs}", "--batch-size", bs, "--dtype", "float32",
                        *TINY).exit_code == 0
    one, four = FeatureStore(tmp_path / "b1"), FeatureStore(tmp_path / f"b{len(sizes)}")
    assert one.ids() == four.ids()
    for img_id in one.ids():
        a, b = one.get(img_id), four.get(img_id)
        for name in ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes", "features"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{img_id} {name}")


def _bad_images(folder):
    folder.mkdir()
    src = cv2.imread(str(next(IMAGES.glob("*.jpg"))))
    (folder / "zero.jpg").write_bytes(b"")
    data = (IMAGES / next(IMAGES.glob("*.jpg")).name).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "text.png").write_text("not an image")
    cv2.imwrite(str(folder / "gray.png"), cv2.cvtColor(src, cv2.COLOR_BGR2GRAY))
    Image.fromarray(src[:, :, ::-1]).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(src[:, :, ::-1]).convert("RGBA").save(folder / "rgba.png")
    cv2.imwrite(str(folder / "deep16.png"), src.astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "tiny1x1.png"), src[:1, :1])
    cv2.imwrite(str(folder / "large.jpg"), cv2.resize(src, (4000, 3000)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    Image.fromarray(np.full((100, 200, 3), 128, np.uint8)).save(folder / "exif.jpg", exif=exif)


def test_bad_images_never_stop_the_run(tmp_path):
    _bad_images(tmp_path / "imgs")
    result = _extract("--images", tmp_path / "imgs", "--out", tmp_path / "s", *TINY)
    assert result.exit_code == 0, result.output
    failures = [line for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    failed = {json.loads(line)["img_id"]: json.loads(line)["reason"] for line in failures}
    assert "zero" in failed and "empty file" in failed["zero"]
    assert "text" in failed and "not a decodable image" in failed["text"]
    store = FeatureStore(tmp_path / "s")
    for ok in ("gray", "cmyk", "rgba", "deep16", "tiny1x1", "large", "exif"):
        assert ok in store, (ok, failed.get(ok))
    assert ("truncated" in store) != ("truncated" in failed)  # decoded partially or recorded, never fatal
    exif = store.get("exif")
    assert (exif.img_h, exif.img_w) == (200, 100)  # EXIF orientation applied, as cv2.imread does
    assert f"{len(failed)} failed" in result.output


def test_nothing_extracted_gives_a_nonzero_exit(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"")
    result = _extract("--images", tmp_path / "imgs", "--out", tmp_path / "s", *TINY)
    assert result.exit_code == 1
    assert "none of its 1 images could be used" in result.output and "failures.jsonl" in result.output


def _vg_layout(root, sources):
    """The README's Visual Genome layout: images two folders down, plus things that are not images."""
    for i, src in enumerate(sources):
        sub = root / "vg" / ("VG_100K" if i % 2 else "VG_100K_2")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, sub / f"{100 + i}.jpg")
    (root / "vg" / "image_data.json").write_text("[]")
    hidden = root / "vg" / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(sources[0], hidden / "100-checkpoint.jpg")
    (root / "vg" / "VG_100K" / "._101.jpg").write_bytes(b"\0\5\0\7")  # macOS resource fork
    return sorted(f"{100 + i}" for i in range(len(sources)))


def test_images_in_subfolders_are_found(tmp_path):
    expected = _vg_layout(tmp_path / "data", sorted(IMAGES.glob("*.jpg"))[:4])
    result = _extract("--images", tmp_path / "data" / "vg", "--out", tmp_path / "s", *TINY)
    assert result.exit_code == 0, result.output
    assert sorted(FeatureStore(tmp_path / "s").ids()) == expected
    assert (tmp_path / "s" / "failures.jsonl").read_text() == ""  # hidden files were not taken for images


def test_two_images_with_one_img_id_is_an_error_naming_both(tmp_path):
    _vg_layout(tmp_path / "data", sorted(IMAGES.glob("*.jpg"))[:4])
    shutil.copy(next(IMAGES.glob("*.jpg")), tmp_path / "data" / "vg" / "VG_100K_2" / "101.png")
    result = _extract("--images", tmp_path / "data" / "vg", "--out", tmp_path / "s", *TINY)
    assert result.exit_code == 1
    assert "'101'" in result.output and "VG_100K/101.jpg" in result.output and "VG_100K_2/101.png" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_a_folder_without_images_exits_nonzero_saying_why(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "sub" / "notes.txt").write_text("no images here")
    result = _extract("--images", tmp_path / "imgs", "--out", tmp_path / "s", *TINY)
    assert result.exit_code == 1
    assert "no images found" in result.output and "subfolders" in result.output and str(tmp_path / "imgs") in result.output


def test_a_folder_already_extracted_exits_zero_saying_all_are_done(tmp_path):
    assert _extract("--images", IMAGES, "--out", tmp_path / "s", *TINY).exit_code == 0
    result = _extract("--images", IMAGES, "--out", tmp_path / "s", *TINY)
    assert result.exit_code == 0, result.output
    assert "all 10 images are already in the store" in result.output


def _failure_records(store_dir):
    return [json.loads(line) for line in (store_dir / "failures.jsonl").read_text().splitlines()]


def test_rerun_keeps_one_failure_record_per_image(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for src in sorted(IMAGES.glob("*.jpg"))[:2]:
        shutil.copy(src, imgs / src.name)
    (imgs / "zero.jpg").write_bytes(b"")
    (imgs / "text.png").write_text("not an image")
    for _ in range(3):
        assert _extract("--images", imgs, "--out", tmp_path / "s", *TINY).exit_code == 0
    records = _failure_records(tmp_path / "s")
    assert sorted(r["img_id"] for r in records) == ["text", "zero"]
    assert "empty file" in next(r["reason"] for r in records if r["img_id"] == "zero")
    shutil.copy(next(IMAGES.glob("*.jpg")), imgs / "text.png")  # mended: extracted next time, its record goes
    assert _extract("--images", imgs, "--out", tmp_path / "s", *TINY).exit_code == 0
    assert [r["img_id"] for r in _failure_records(tmp_path / "s")] == ["zero"]
    assert "text" in FeatureStore(tmp_path / "s")


def test_progress_reports_the_total_and_rate_from_the_start(tmp_path):
    events = []
    cfg = ExtractConfig(images=str(IMAGES), out=str(tmp_path / "s"), weights="random", detector="tiny", num_boxes=10,
                        batch_size=3)
    summary = extract(cfg, on_progress=lambda done, total, per_s: events.append(("progress", done, total, per_s)),
                      on_weights=lambda line: events.append(("weights", line)))
    assert events[0] == ("progress", 0, 10, 0.0)  # the total is known before the weights load
    assert events[1][0] == "weights" and "random(seed=0)" in events[1][1]
    steps = [e for e in events if e[0] == "progress"][1:]
    # per image, not per batch: with the full detector a batch takes minutes (issue 27: a log got nothing for 16 min)
    assert [e[1] for e in steps] == list(range(1, 11)) and all(e[2] == 10 and e[3] > 0 for e in steps)
    assert summary["extracted"] == 10
    result = _extract("--images", IMAGES, "--out", tmp_path / "s2", *TINY)
    assert result.exit_code == 0 and "img/s" in result.output and "10/10" in result.output


def test_images_are_decoded_ahead_and_selected_behind_in_threads_with_the_same_results(tmp_path, monkeypatch):
    import lxm.extract.pipeline as pipeline

    folder = tmp_path / "imgs"
    _bad_images(folder)
    for src in sorted(IMAGES.glob("*.jpg"))[:4]:
        shutil.copy(src, folder / src.name)
    decoded_in = []
    real_load = pipeline.load_bgr

    def recording_load(path, **limits):  # the real decoder, noting which thread runs it
        decoded_in.append(threading.current_thread().name)
        return real_load(path, **limits)

    selected_in = []
    real_select = pipeline.select_boxes

    def recording_select(outs, mode, num_boxes):  # the real selection, noting its thread and batch size
        selected_in.append((threading.current_thread().name, len(outs)))
        return real_select(outs, mode, num_boxes)

    monkeypatch.setattr(pipeline, "load_bgr", recording_load)
    monkeypatch.setattr(pipeline, "select_boxes", recording_select)
    main = threading.current_thread().name
    stores = {}
    for threaded in (True, False):  # decoding ahead and selection behind the detector (GPU default), or in line
        decoded_in.clear()
        selected_in.clear()
        out = tmp_path / f"threaded-{threaded}"
        summary = extract(ExtractConfig(images=str(folder), out=str(out), weights="random", detector="tiny",
                                        num_boxes=10, batch_size=3, engine="torch", prefetch=threaded,
                                        overlap=threaded))
        assert summary["extracted"] + summary["failed"] == summary["images"]
        threads = set(decoded_in)
        assert threads == ({"lxm-decode_0"} if threaded else {main}), threads
        assert {t for t, _ in selected_in} == ({"lxm-select_0"} if threaded else {main}), selected_in
        assert sum(n for _, n in selected_in) == summary["extracted"] and max(n for _, n in selected_in) > 1
        stores[threaded] = (FeatureStore(out), _failure_records(out))
    (on, fail_on), (off, fail_off) = stores[True], stores[False]
    assert sorted(on.ids()) == sorted(off.ids()) and len(on) >= 10
    assert {r["img_id"]: r["reason"] for r in fail_on} == {r["img_id"]: r["reason"] for r in fail_off}
    for img_id in on.ids():
        a, b = on.get(img_id), off.get(img_id)
        for field in ("features", "boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_shards_split_the_images_disjointly(tmp_path):
    for part in ("0/2", "1/2"):
        assert _extract("--images", IMAGES, "--out", tmp_path / "s", "--shard", part, *TINY).exit_code == 0
    store = FeatureStore(tmp_path / "s")
    assert sorted(store.ids()) == sorted(p.stem for p in IMAGES.glob("*.jpg"))
    files = sorted(s["file"] for s in store.manifest["shards"])
    assert files == ["part-r000of002-00000.arrow", "part-r001of002-00000.arrow"]


@pytest.mark.e2e
def test_sigkill_mid_extraction_then_rerun_stores_each_image_exactly_once(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    sources = sorted(IMAGES.glob("*.jpg"))
    for i in range(40):
        shutil.copy(sources[i % len(sources)], imgs / f"img{i:03d}.jpg")
    cmd = [sys.executable, "-m", "lxm.cli", "extract", "--images", str(imgs), "--out", str(tmp_path / "s"),
           "--rows-per-shard", "2", "--batch-size", "2", *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "s").glob("part-*.arrow"))) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list((tmp_path / "s").glob("part-*.arrow"))) < 20
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ids = FeatureStore(tmp_path / "s").ids()
    assert len(ids) == 40 and len(set(ids)) == 40


def test_channel_order_is_bgr_and_mean_is_caffes():
    red = np.zeros((40, 60, 3), np.uint8)
    red[..., 2] = 255  # BGR: red is the last channel, as cv2 decodes it
    blob, scale = caffe_blob(red, (102.9801, 115.9465, 122.7717), 600, 1000)
    assert scale == 15.0 and blob.shape == (3, 600, 900)
    np.testing.assert_allclose(blob[:, 300, 450], [-102.9801, -115.9465, 255 - 122.7717], rtol=1e-5)


def test_caffe_scale_rule():
    assert caffe_scale(480, 640, 600, 1000) == 1.25
    assert caffe_scale(100, 2000, 600, 1000) == 0.5  # 600/100 would make the long side 12000


def test_pickle_weights_round_trip_and_strict_checks(tmp_path):
    src = GeneralizedRCNN(detector_tiny())
    src.init_random(3)
    save_pickle_weights(src, tmp_path / "w.pkl")
    dst = GeneralizedRCNN(detector_tiny())
    report = load_detector_weights(dst, str(tmp_path / "w.pkl"))
    assert report.sha256 == sha256_file(tmp_path / "w.pkl") and report.loaded == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    sd = {k: v.numpy() for k, v in src.state_dict().items()}
    sd["roi_heads.box_predictor.cls_score.weight"] = np.zeros((5, 5), np.float32)
    sd["backbone.res9.weight"] = np.zeros(1, np.float32)
    del sd["backbone.stem.conv1.weight"]
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"model": sd}))
    with pytest.raises(WeightsError) as err:
        load_detector_weights(GeneralizedRCNN(detector_tiny()), str(tmp_path / "bad.pkl"))
    msg = str(err.value)
    assert "missing (1): backbone.stem.conv1.weight" in msg and "unexpected (1): backbone.res9.weight" in msg
    assert "roi_heads.box_predictor.cls_score.weight file (5, 5)" in msg


def test_hf_style_torch_file_with_bn_counters_loads(tmp_path):
    src = GeneralizedRCNN(detector_tiny())
    src.init_random(4)
    sd = dict(src.state_dict())
    sd["backbone.stem.conv1.norm.num_batches_tracked"] = torch.tensor(0)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    report = load_detector_weights(GeneralizedRCNN(detector_tiny()), str(tmp_path / "pytorch_model.bin"))
    assert report.ignored == ["backbone.stem.conv1.norm.num_batches_tracked"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {"x": _Exploit()}}))
    with pytest.raises(WeightsError, match="refusing to unpickle posix.system"):
        load_detector_weights(GeneralizedRCNN(detector_tiny()), str(tmp_path / "evil.pkl"))


def test_download_resumes_and_checks_sha256(tmp_path):
    served = tmp_path / "srv"
    served.mkdir()
    payload = os.urandom(300_000)
    (served / "w.pkl").write_bytes(payload)
    server, base = serve_folder(served)
    try:
        url = f"{base}/w.pkl"
        dest = tmp_path / "cache" / "w.pkl"
        dest.parent.mkdir()
        (dest.parent / "w.pkl.part").write_bytes(payload[:100_000])  # an interrupted earlier download
        import hashlib

        digest = hashlib.sha256(payload).hexdigest()
        assert download(url, dest, digest).read_bytes() == payload
        with pytest.raises(WeightsError, match="sha256 mismatch"):
            download(url, tmp_path / "cache" / "other.pkl", "0" * 64)
        assert not (tmp_path / "cache" / "other.pkl").exists()
    finally:
        server.shutdown()


def test_hub_id_offline_says_how_to_proceed(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="pass its path with --weights"):
        load_detector_weights(GeneralizedRCNN(detector_tiny()), "unc-nlp/frcnn-vg-finetuned")


def test_weights_report_is_printed_and_recorded(tmp_path):
    src = GeneralizedRCNN(detector_tiny())
    src.init_random(5)
    save_pickle_weights(src, tmp_path / "w.pkl")
    result = _extract("--images", IMAGES, "--out", tmp_path / "s", "--weights", tmp_path / "w.pkl", "--detector",
                      "tiny", "--boxes", "10")
    assert result.exit_code == 0, result.output
    assert "detector: loaded" in result.output
    meta = FeatureStore(tmp_path / "s").manifest["extractor"]
    assert meta["weights_sha256"] == sha256_file(tmp_path / "w.pkl") and meta["random_weights"] is False


def test_fp32_extraction_on_a_gpu_is_ieee_fp32_not_tf32():
    """The decision, tested without a GPU: on a CUDA device the detector's block runs with TF32 off for cuDNN and
    cuBLAS (torch's cuDNN default allows it) and the flags come back after; on the CPU nothing changes."""
    import torch

    from lxm.extract.pipeline import ieee_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with ieee_fp32(torch.device("cuda", 1)):
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
        with ieee_fp32(torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_a_batch_crosses_to_the_host_in_one_block_with_every_value_exact():
    # the packed float32 block must give back each field as the per-field copies did: features cast to the store's
    # dtype from float32 (incl. fp16 subnormals and rounding ties), ids up to 1599, float32 confidences and boxes
    g = torch.Generator().manual_seed(0)
    outs = []
    for r, (h, w) in ((50, (480, 640)), (41, (333, 500))):
        feats = torch.randn(r, 16, generator=g) * torch.logspace(-8, 4, 16)
        feats[0, :3] = torch.tensor([65504.0, 2.0 ** -25, 1.0 + 2.0 ** -11])  # fp16: largest, subnormal, tie
        cls_prob = torch.softmax(torch.randn(r, 1601, generator=g) * 4, 1)
        attr_prob = torch.softmax(torch.randn(r, 401, generator=g) * 4, 1)
        xy = torch.rand(r, 2, generator=g) * 300
        boxes = torch.cat([xy, xy + torch.rand(r, 2, generator=g) * 150 + 1], 1)
        outs.append(DetectorOutput(boxes, feats, cls_prob, attr_prob, torch.zeros(r, 1600, 4), 1.0, (h, w)))
    sels = select_lxmert_batch([o.proposals for o in outs], [o.cls_prob for o in outs], [o.attr_prob for o in outs],
                               num_boxes=10)
    for dtype in (np.float16, np.float32):
        for rec, out, sel in zip(image_records(["a", "b"], outs, sels, dtype), outs, sels):
            assert (rec.img_h, rec.img_w) == out.image_size and rec.features.dtype == dtype
            np.testing.assert_array_equal(rec.features, out.features[sel.indices].numpy().astype(dtype))
            np.testing.assert_array_equal(rec.boxes, sel.boxes.numpy())
            np.testing.assert_array_equal(rec.objects_id, sel.objects_id.numpy())
            np.testing.assert_array_equal(rec.objects_conf, sel.objects_conf.numpy())
            np.testing.assert_array_equal(rec.attrs_id, sel.attrs_id.numpy())
            np.testing.assert_array_equal(rec.attrs_conf, sel.attrs_conf.numpy())
            assert rec.objects_id.dtype == np.int64 and rec.boxes.dtype == np.float32
