"""Feature stores and extraction under faults (issue 27): damaged shards, index and manifest, live writers, hostile
images (huge headers, huge files, symlinks to /), a vocabulary of another detector, and `lxm show --out DIR`."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SHARED
from lxm.cli import app
from lxm.errors import ConfigError
from lxm.extract.images import ImageError, caffe_blob, list_images, load_bgr
from lxm.features.records import ImageFeatures
from lxm.features.store import FeatureStore, FeatureStoreWriter, StoreError

N, D = 2, 4
VG_VOCAB = SHARED / "fixtures" / "butd-coco-sample" / "vocab"  # BUTD's 1600 object / 400 attribute names
TINY = ["--weights", "random", "--detector", "tiny", "--boxes", "10", "--engine", "torch"]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _rec(img_id: str, objects: int = 0) -> ImageFeatures:
    return ImageFeatures(img_id=img_id, img_h=40, img_w=50, objects_id=np.full(N, objects, np.int64),
                         objects_conf=np.ones(N, np.float32), attrs_id=np.zeros(N, np.int64),
                         attrs_conf=np.ones(N, np.float32), boxes=np.tile(np.float32([1, 2, 30, 20]), (N, 1)),
                         features=np.full((N, D), len(img_id), np.float32))


def _store(root: Path, ids=("imgA", "imgB", "imgC"), **kw) -> Path:
    with FeatureStoreWriter(root, num_boxes=N, feature_dim=D, dtype="float32", rows_per_shard=1, **kw) as w:
        for img_id in ids:
            w.add(_rec(img_id, **({"objects": 5} if kw.get("metadata") else {})))
    return root


def _one_line_error(result, *names: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# --- item 29: a checksum per shard, `lxm inspect --verify` --------------------------------------------------------

def test_each_shard_records_its_checksum_and_inspect_verify_finds_a_damaged_one(tmp_path):
    root = _store(tmp_path / "s")
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["shards"]:  # a sidecar (sha256sum format) and the manifest agree with the file
        side = (root / (entry["file"] + ".sha256")).read_text().split()
        assert side == [entry["sha256"], entry["file"]]
    good = _cli("inspect", root, "--verify")
    assert good.exit_code == 0, good.output
    assert "verify: 4 file(s) match" in good.output  # 3 shards and the index
    shard = root / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    at = data.index(np.full(D, len("imgB"), np.float32).tobytes())  # inside the features: the shard still reads
    data[at:at + 4] = np.float32(7.5).tobytes()
    shard.write_bytes(bytes(data))
    assert FeatureStore(root).get("imgB").features[0, 0] == 7.5  # what readers silently used before
    bad = _cli("inspect", root, "--verify")
    assert bad.exit_code == 1
    assert "damaged" in bad.output and shard.name in bad.output and manifest["shards"][0]["file"] not in bad.output


def test_a_store_written_without_checksums_still_reads_and_verify_says_so(tmp_path):
    root = _store(tmp_path / "s")
    for side in root.glob("*.sha256"):
        side.unlink()
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["sha256"]
    del manifest["index_sha256"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert FeatureStore(root).get("imgC").features[0, 0] == 4
    result = _cli("inspect", root, "--verify")
    assert result.exit_code == 0, result.output
    assert "0 file(s) match" in result.output and "4 without a recorded checksum" in result.output


# --- item 30: damaged index and manifest are one line naming the file ---------------------------------------------

def test_invalid_utf8_in_the_index_is_one_line_naming_it(tmp_path):
    root = _store(tmp_path / "s")
    index = root / "index.arrow"
    data = index.read_bytes()
    assert data.count(b"imgB") == 1
    index.write_bytes(data.replace(b"imgB", b"img\xff"))
    _one_line_error(_cli("inspect", root), "index.arrow", "not UTF-8")
    with pytest.raises(StoreError, match="index.arrow"):
        FeatureStore(root).ids()


def test_invalid_utf8_in_a_shard_is_one_line_naming_it(tmp_path):
    root = _store(tmp_path / "s", ids=("imgA",))
    shard = next(root.glob("part-*.arrow"))
    shard.write_bytes(shard.read_bytes().replace(b"imgA", b"img\xff"))
    _one_line_error(_cli("inspect", root), shard.name, "not UTF-8")


def test_a_manifest_listing_no_shards_is_one_line_naming_it(tmp_path):
    root = _store(tmp_path / "s")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"] = []
    (root / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(_cli("inspect", root), "manifest.json", "--repair")
    assert _cli("inspect", root, "--repair").exit_code == 0
    assert FeatureStore(root).ids() == ["imgA", "imgB", "imgC"]


def test_an_index_pointing_past_the_shards_is_one_line_naming_it(tmp_path):
    root = _store(tmp_path / "s")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1] * 3  # rows add up; imgB's row 0 of shard 1 is no longer imgB's
    manifest["shards"][1] = {"file": manifest["shards"][1]["file"], "rows": 0}
    manifest["num_images"] = 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(_cli("inspect", root), "index.arrow")


# --- item 31: a truncated manifest is rebuilt from the shards -----------------------------------------------------

def test_a_truncated_manifest_names_the_repair_and_the_writer_rebuilds_it(tmp_path, caplog):
    root = _store(tmp_path / "s", metadata={"mode": "lxmert"})
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text[: len(text) // 2])
    line = _one_line_error(_cli("inspect", root), "manifest.json", f"lxm inspect --repair {root}")
    assert "re-run the writer" not in line
    repaired = _cli("inspect", root, "--repair")  # what the message says works
    assert repaired.exit_code == 0, repaired.output
    assert FeatureStore(root).ids() == ["imgA", "imgB", "imgC"]
    (root / "manifest.json").write_text(text[: len(text) // 2])
    with FeatureStoreWriter(root, num_boxes=N, feature_dim=D, dtype="float32") as writer:  # was refused
        writer.add(_rec("imgD"))
    store = FeatureStore(root)
    assert store.ids() == ["imgA", "imgB", "imgC", "imgD"] and store.manifest["extractor"] == {}
    assert any("manifest.json" in r.getMessage() and "rebuil" in r.getMessage() for r in caplog.records)


# --- item 34: live writers are said to be running -----------------------------------------------------------------

def test_inspect_says_writers_are_running_while_they_fill_the_store(tmp_path):
    root = tmp_path / "s"
    writer = FeatureStoreWriter(root, num_boxes=N, feature_dim=D, dtype="float32", rows_per_shard=1)
    writer.add(_rec("imgA"))  # a finished shard, no manifest yet
    try:
        line = _one_line_error(_cli("inspect", root), "1 writer is running")
        assert "did not finish" not in line
    finally:
        writer.close()
    _store(root, ids=("imgB",))
    writer = FeatureStoreWriter(root, num_boxes=N, feature_dim=D, dtype="float32")
    try:
        result = _cli("inspect", root)
        assert result.exit_code == 0 and "1 writer is running" in result.output
    finally:
        writer.close()
    assert "running" not in _cli("inspect", root).output
    writer = FeatureStoreWriter(tmp_path / "t", num_boxes=N, feature_dim=D, dtype="float32", rows_per_shard=1)
    writer.add(_rec("imgA"))
    writer._registration.close()  # as a killed writer: its lock is gone  # noqa: SLF001
    assert "did not finish" in _cli("inspect", tmp_path / "t").output


def test_a_folder_link_to_the_root_of_the_file_system_is_not_walked(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "imgs" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "outside.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "imgs" / "root").symlink_to("/")
    (tmp_path / "imgs" / "up").symlink_to(tmp_path)
    (tmp_path / "imgs" / "sub" / "again").symlink_to(tmp_path / "imgs")  # a loop inside the folder
    cv2.imwrite(str(tmp_path / "imgs" / "sub" / "b.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "imgs" / "inside").symlink_to(tmp_path / "imgs" / "sub")  # a link within the folder is followed
    (tmp_path / "elsewhere").mkdir()  # a dataset linked in from another place (another disk) is followed too
    cv2.imwrite(str(tmp_path / "elsewhere" / "c.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "imgs" / "vg").symlink_to(tmp_path / "elsewhere")
    t0 = time.perf_counter()
    found = list_images(tmp_path / "imgs")
    assert time.perf_counter() - t0 < 2
    assert sorted(p.relative_to(tmp_path / "imgs").as_posix() for p in found) == ["a.png", "inside/b.png",
                                                                                  "vg/c.png"]


# --- item 28: image size limits -----------------------------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with one compressed row of data (a few hundred bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1 + 3 * width)))
            + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(30000, 30000))  # 2.7 GB to decode; the file is tiny
    with pytest.raises(ImageError, match="pixels"):
        load_bgr(huge)
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), np.zeros((60, 80, 3), np.uint8))
    assert load_bgr(big).shape == (60, 80, 3)
    with pytest.raises(ImageError, match="80x60 = 4800 pixels, more than the limit of 4000"):
        load_bgr(big, max_pixels=4000)
    monkeypatch.setenv("LXM_MAX_IMAGE_PIXELS", "4000")
    with pytest.raises(ImageError, match="limit of 4000"):
        load_bgr(big)
    monkeypatch.setenv("LXM_MAX_IMAGE_BYTES", "100")
    with pytest.raises(ImageError, match=r"larger than the limit of 100 bytes"):
        load_bgr(big, max_pixels=10**6)


def test_running_out_of_memory_decoding_is_an_image_error(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.zeros((8, 8, 3), np.uint8))

    def no_memory(*_args, **_kwargs):
        raise MemoryError

    img = load_bgr(path)
    monkeypatch.setattr(cv2, "imdecode", no_memory)  # the decoder of a machine with too little memory
    with pytest.raises(ImageError, match="out of memory"):
        load_bgr(path)
    monkeypatch.setattr(cv2, "resize", no_memory)
    with pytest.raises(ImageError, match="out of memory preprocessing its 8x8 pixels"):
        caffe_blob(img, (0, 0, 0), 16, 32)


def test_extract_records_oversized_images_as_failures_and_extracts_the_rest(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(imgs / "ok.png"), rng.integers(0, 255, (96, 128, 3), np.uint8))
    cv2.imwrite(str(imgs / "large.png"), rng.integers(0, 255, (150, 200, 3), np.uint8))
    (imgs / "bomb.png").write_bytes(_png_header(30000, 30000))
    result = CliRunner().invoke(app, ["extract", "--images", str(imgs), "--out", str(tmp_path / "s"), *TINY,
                                      "--max-pixels", "20000"])
    assert result.exit_code == 0, result.output
    failed = {json.loads(line)["img_id"]: json.loads(line)["reason"]
              for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()}
    assert set(failed) == {"large", "bomb"} and "more than the limit of 20000" in failed["large"]
    assert FeatureStore(tmp_path / "s").ids() == ["ok"]


# --- items 10, 16, 13: --device, show --out DIR, a vocabulary of another detector ---------------------------------

def test_extract_refuses_a_device_that_is_not_one_in_one_line(tmp_path):
    _one_line_error(_cli("extract", "--images", tmp_path, "--out", tmp_path / "s", *TINY, "--device", "banana"),
                    "'banana'")
    if not __import__("torch").cuda.is_available():
        _one_line_error(_cli("extract", "--images", tmp_path, "--out", tmp_path / "s", *TINY, "--device", "cuda"),
                        "CUDA is not available")


def _show_world(tmp_path: Path, metadata=None) -> tuple[Path, Path]:
    root = _store(tmp_path / "s", ids=("imgA",), metadata=metadata)
    image = tmp_path / "imgA.png"
    cv2.imwrite(str(image), np.full((40, 50, 3), 200, np.uint8))
    return root, image


def test_show_with_a_directory_as_out_is_one_line(tmp_path):
    root, image = _show_world(tmp_path)
    (tmp_path / "pics").mkdir()
    _one_line_error(_cli("show", root, "imgA", "--image", image, "--out", tmp_path / "pics"), "is a directory",
                    str(tmp_path / "pics"))


def test_show_refuses_the_vocabulary_of_another_detector(tmp_path):
    # a store of the tiny detector (20 classes, 8 attributes: recorded in its manifest), named from BUTD's 1600 / 400
    root, image = _show_world(tmp_path, metadata={"detector": {"num_classes": 20, "num_attrs": 8}})
    line = _one_line_error(_cli("show", root, "imgA", "--image", image, "--out", tmp_path / "b.png",
                                "--vocab", VG_VOCAB), "1600", "20 object classes")
    assert "--vocab" in line
    assert not (tmp_path / "b.png").exists()
    assert _cli("show", root, "imgA", "--image", image, "--out", tmp_path / "b.png").exit_code == 0  # ids
    vg, image = _show_world(tmp_path / "vg", metadata={"detector": {"num_classes": 1600, "num_attrs": 400}})
    assert _cli("show", vg, "imgA", "--image", image, "--out", tmp_path / "c.png", "--vocab", VG_VOCAB).exit_code == 0


def test_fit_names_warns_and_falls_back_to_ids_where_asked(caplog):
    from lxm.extract.draw import detector_classes, fit_names

    objects, attributes = [f"o{i}" for i in range(1600)], [f"a{i}" for i in range(400)]
    manifest = {"extractor": {"detector": {"num_classes": 20, "num_attrs": 8}}}
    assert detector_classes(manifest) == (20, 8) and detector_classes({"extractor": {"source": "tsv"}}) is None
    assert fit_names(objects, attributes, (20, 8), option="--vocab-dir", strict=False) == (None, None)
    assert "--vocab-dir has 1600 object and 400 attribute names" in caplog.text
    assert fit_names(objects, attributes, (1600, 400)) == (objects, attributes)
    assert fit_names(objects, attributes, None) == (objects, attributes)  # unknown detector: ids checked later
    assert os.environ.get("LXM_MAX_IMAGE_PIXELS") is None


def test_the_name_reader_of_ask_and_the_gallery_falls_back_to_ids_for_another_detector(caplog, tmp_path):
    from lxm.extract.detector import detector_tiny, vg_r101
    from lxm.extract.draw import detector_classes, read_names

    assert read_names(VG_VOCAB, detector_classes(detector_tiny())) == (None, None)
    objects, attributes = read_names(VG_VOCAB, detector_classes(vg_r101()))
    assert len(objects) == 1600 and len(attributes) == 400
    assert caplog.text.count("20 object classes and 8 attributes") == 1
    with pytest.raises(ConfigError, match=r"no objects_vocab.txt"):  # a folder without the names: one line
        read_names(tmp_path)
