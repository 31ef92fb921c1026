"""Feature store and TSV interop on the real LXMERT sample rows (../shared/fixtures/butd-coco-sample)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from conftest import SHARED
from lxm.cli import app
from lxm.features.records import ImageFeatures, RecordError
from lxm.features.store import FeatureStore, FeatureStoreWriter, StoreError
from lxm.features.tsv import format_row, read_tsv, write_tsv

SAMPLE = SHARED / "fixtures" / "butd-coco-sample" / "train2014_obj36.tsv"


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def sample_rows():
    if not SAMPLE.exists():
        pytest.fail(f"shared fixture missing: {SAMPLE}")
    return list(read_tsv(SAMPLE))


def test_reader_decodes_the_released_rows(sample_rows):
    assert len(sample_rows) == 10
    rec = sample_rows[0]
    assert rec.img_id == "COCO_train2014_000000132417" and (rec.img_h, rec.img_w) == (333, 500)
    assert rec.num_boxes == 36 and rec.features.shape == (36, 2048) and rec.features.dtype == np.float32
    assert rec.objects_id.dtype == np.int64 and 0 <= rec.objects_id.min() and rec.objects_id.max() < 1600
    assert rec.attrs_id.max() < 400
    assert (rec.features >= 0).all()  # ReLU outputs, mean-pooled
    nb = rec.normalized_boxes()
    assert nb.min() >= 0 and nb.max() <= 1


def test_float32_store_round_trips_the_tsv_byte_for_byte(tmp_path):
    assert _cli("convert", "tsv", SAMPLE, tmp_path / "s", "--dtype", "float32", "--rows-per-shard", 3).exit_code == 0
    result = _cli("export", "tsv", tmp_path / "s", tmp_path / "out.tsv")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.tsv").read_bytes() == SAMPLE.read_bytes()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["num_images"] == 10 and manifest["dtype"] == "float32" and len(manifest["shards"]) == 4


def test_float16_store_keeps_everything_but_feature_precision(tmp_path, sample_rows):
    assert _cli("convert", "tsv", SAMPLE, tmp_path / "s").exit_code == 0
    store = FeatureStore(tmp_path / "s")
    assert store.dtype == "float16" and len(store) == 10
    for ref in sample_rows:
        got = store.get(ref.img_id)
        assert got.features.dtype == np.float16
        np.testing.assert_allclose(got.features.astype(np.float32), ref.features, rtol=1e-3, atol=1e-3)
        for name in ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes"):
            np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))
        assert (got.img_h, got.img_w) == (ref.img_h, ref.img_w)


def test_first_ids_are_written_first(tmp_path, sample_rows):
    _cli("convert", "tsv", SAMPLE, tmp_path / "s", "--dtype", "float32")
    head = [sample_rows[7].img_id, sample_rows[2].img_id]
    (tmp_path / "minival.json").write_text(json.dumps([{"img_id": i, "sentf": {}} for i in head]))
    assert _cli("export", "tsv", tmp_path / "s", tmp_path / "o.tsv", "--first-ids", tmp_path / "minival.json"
                ).exit_code == 0
    ids = [r.img_id for r in read_tsv(tmp_path / "o.tsv")]
    assert ids[:2] == head and sorted(ids) == sorted(r.img_id for r in sample_rows)
    (tmp_path / "bad.json").write_text(json.dumps(["COCO_nope"]))
    result = _cli("export", "tsv", tmp_path / "s", tmp_path / "o2.tsv", "--first-ids", tmp_path / "bad.json")
    assert result.exit_code == 1 and "COCO_nope" in result.output and not (tmp_path / "o2.tsv").exists()


def test_plain_pyarrow_and_hf_datasets_open_shards_unchanged(tmp_path, sample_rows):
    _cli("convert", "tsv", SAMPLE, tmp_path / "s", "--rows-per-shard", 6)
    shard = tmp_path / "s" / "part-00000.arrow"
    table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
    assert table.column_names == ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                                  "num_boxes", "boxes", "features"]
    assert table.num_rows == 6 and table.column("img_id")[0].as_py() == sample_rows[0].img_id
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_file(str(shard))
    assert len(ds) == 6
    row = ds.with_format("numpy")[1]
    np.testing.assert_array_equal(row["boxes"], sample_rows[1].boxes)


def _read_feature_sum(args):
    store, img_id = args
    return float(store.get(img_id).features.astype(np.float32).sum())


def test_store_pickles_only_its_path_and_works_in_worker_processes(tmp_path, sample_rows):
    _cli("convert", "tsv", SAMPLE, tmp_path / "s")
    store = FeatureStore(tmp_path / "s")
    store.get(sample_rows[0].img_id)  # memory maps opened in the parent
    assert len(pickle.dumps(store)) < 500
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        sums = pool.map(_read_feature_sum, [(store, r.img_id) for r in sample_rows])
    expected = [float(store.get(r.img_id).features.astype(np.float32).sum()) for r in sample_rows]
    assert sums == expected


def test_interrupted_writer_resumes_and_stores_every_image_once(tmp_path, sample_rows):
    writer = FeatureStoreWriter(tmp_path / "s", num_boxes=36, feature_dim=2048, dtype="float32", rows_per_shard=2)
    for rec in sample_rows[:5]:
        writer.add(rec)  # two shards complete, one image still buffered: a "crash" now loses only that one
    del writer
    with pytest.raises(StoreError, match="re-run the same command to resume"):
        FeatureStore(tmp_path / "s")
    result = _cli("convert", "tsv", SAMPLE, tmp_path / "s", "--dtype", "float32", "--rows-per-shard", 2)
    assert result.exit_code == 0 and "(4 already present)" in result.output
    store = FeatureStore(tmp_path / "s")
    assert sorted(store.ids()) == sorted(r.img_id for r in sample_rows)


def _synthetic_tsv(path, rows: int, dim: int = 16):
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for i in range(rows):
            rec = ImageFeatures(img_id=f"img{i:06d}", img_h=100, img_w=200,
                                objects_id=rng.integers(0, 1600, 36), objects_conf=rng.random(36, np.float32),
                                attrs_id=rng.integers(0, 400, 36), attrs_conf=rng.random(36, np.float32),
                                boxes=np.tile(np.array([1, 2, 50, 60], np.float32), (36, 1)),
                                features=rng.random((36, dim), np.float32))
            f.write(format_row(rec) + b"\r\n")


@pytest.mark.e2e
def test_sigkill_mid_conversion_then_rerun_stores_each_image_exactly_once(tmp_path):
    src, dst = tmp_path / "big.tsv", tmp_path / "s"
    _synthetic_tsv(src, 20000)
    cmd = [sys.executable, "-m", "lxm.cli", "convert", "tsv", str(src), str(dst), "--rows-per-shard", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(dst.glob("part-*.arrow"))) < 2:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(dst.glob("part-*.arrow")))
    assert 2 <= finished < 100, "the kill should land mid-run"
    assert not (dst / "manifest.json").exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = FeatureStore(dst)
    ids = store.ids()
    assert len(ids) == 20000 and len(set(ids)) == 20000
    assert not [p for p in os.listdir(dst) if p.startswith(".")]  # the killed run's temp shard was cleared


def test_malformed_rows_name_file_line_and_field(tmp_path):
    lines = SAMPLE.read_bytes().split(b"\r\n")
    fields = lines[1].split(b"\t")
    fields[4] = base64.b64encode(b"\x00" * 12)  # 3 floats for 36 boxes
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(lines[0] + b"\r\n" + b"\t".join(fields) + b"\r\n")
    with pytest.raises(RecordError, match=r"bad\.tsv:2: field 'objects_conf' has 3 values, num_boxes is 36"):
        list(read_tsv(bad))
    result = _cli("convert", "tsv", bad, tmp_path / "s")
    assert result.exit_code == 0 and "1 line could not be converted" in result.output
    (reason,) = [json.loads(line)["reason"] for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert "bad.tsv:2: field 'objects_conf' has 3 values, num_boxes is 36" in reason
    (tmp_path / "short.tsv").write_bytes(b"a\tb\r\n")
    with pytest.raises(RecordError, match=r"short\.tsv:1: expected 10 tab-separated fields, found 2"):
        list(read_tsv(tmp_path / "short.tsv"))
    result = _cli("convert", "tsv", tmp_path / "short.tsv", tmp_path / "s2")  # nothing convertible: an error
    assert result.exit_code == 1 and "short.tsv: no line can be converted (line 1: expected 10" in result.output


def _sample_lines() -> list[bytes]:
    return SAMPLE.read_bytes().split(b"\r\n")[:-1]


def _set_field(line: bytes, name: str, value: bytes) -> bytes:
    from lxm.features.records import FIELDS

    fields = line.split(b"\t")
    fields[FIELDS.index(name)] = value
    return b"\t".join(fields)


def _failures(store) -> list[dict]:
    path = store / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_bad_lines_go_to_failures_and_every_other_row_converts(tmp_path, sample_rows):
    lines = _sample_lines()
    r = sample_rows[7]
    forty = ImageFeatures(r.img_id, r.img_h, r.img_w, *(np.concatenate([a, a[:4]]) for a in (
        r.objects_id, r.objects_conf, r.attrs_id, r.attrs_conf, r.boxes, r.features)))  # valid, but 40 boxes > 36
    bad = {
        1: (b"\t".join(lines[0].split(b"\t")[:9]), "expected 10 tab-separated fields, found 9"),  # first line
        4: (_set_field(lines[3], "boxes", b"@@not-base64@@"), "field 'boxes': invalid base64"),
        6: (_set_field(lines[5], "num_boxes", b"35"), "field 'objects_id' has 36 values, num_boxes is 35"),
        8: (format_row(forty), "field 'num_boxes' is 40; this store holds up to 36 boxes per image (convert with "
                               "--max-boxes 40 or more)"),
        11: (lines[2], f"field 'img_id' {sample_rows[2].img_id!r} repeats line 3"),
    }
    src = tmp_path / "bad.tsv"
    src.write_bytes(b"".join((bad[i][0] if i in bad else lines[i - 1]) + b"\r\n" for i in range(1, 12)))
    dst = tmp_path / "s"
    dst.mkdir()
    other = {"image": "/data/images/x.jpg", "img_id": "x", "reason": "cannot decode image"}  # lxm extract's record
    (dst / "failures.jsonl").write_text(json.dumps(other) + "\n")
    result = _cli("convert", "tsv", src, dst, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "5 lines could not be converted" in result.output
    good = [sample_rows[i - 1] for i in range(1, 11) if i not in bad]
    store = FeatureStore(dst)
    assert store.ids() == [rec.img_id for rec in good]
    for rec in good:
        np.testing.assert_array_equal(store.get(rec.img_id).features, rec.features)
    failures = _failures(dst)
    assert failures[0] == other  # another source's records are kept
    assert [f["image"] for f in failures[1:]] == [f"{src.resolve()}:{i}" for i in bad]
    assert [f["img_id"] for f in failures[1:]] == [sample_rows[i - 1].img_id for i in (1, 4, 6, 8)] + [
        sample_rows[2].img_id]
    for f, (i, (_, message)) in zip(failures[1:], bad.items()):
        assert f"bad.tsv:{i}: {message}" in f["reason"]
    # a re-run meets the same bad lines again and records each once
    again = _cli("convert", "tsv", src, dst, "--dtype", "float32")
    assert again.exit_code == 0 and "(6 already present)" in again.output
    assert _failures(dst) == failures
    # a line mended since is stored, and its record goes
    src.write_bytes(src.read_bytes().replace(bad[4][0], lines[3]))
    assert _cli("convert", "tsv", src, dst, "--dtype", "float32").exit_code == 0
    assert sample_rows[3].img_id in FeatureStore(dst)
    assert [f["image"] for f in _failures(dst)[1:]] == [f"{src.resolve()}:{i}" for i in bad if i != 4]


def _cut(rec: ImageFeatures, k: int) -> ImageFeatures:
    return ImageFeatures(rec.img_id, rec.img_h, rec.img_w, rec.objects_id[:k], rec.objects_conf[:k], rec.attrs_id[:k],
                         rec.attrs_conf[:k], rec.boxes[:k], rec.features[:k])


def test_ragged_tsv_converts_to_a_store_of_up_to_n_boxes_and_exports_back_byte_for_byte(tmp_path, sample_rows):
    # rows of 36, 10, 20 and 36 boxes (bottom-up-attention's adaptive 10-100 box files; lxm's given-box exports)
    rows = [_cut(sample_rows[0], 36), _cut(sample_rows[1], 10), _cut(sample_rows[2], 20), _cut(sample_rows[3], 36)]
    src = tmp_path / "ragged.tsv"
    assert write_tsv(rows, src) == 4
    result = _cli("convert", "tsv", src, tmp_path / "s", "--dtype", "float32")  # N = the first row's 36
    assert result.exit_code == 0 and "stored 4 images" in result.output, result.output
    store = FeatureStore(tmp_path / "s")
    assert store.num_boxes == 36 and [store.get(r.img_id).num_boxes for r in rows] == [36, 10, 20, 36]
    for rec in rows:
        got = store.get(rec.img_id)
        np.testing.assert_array_equal(got.features, rec.features)
        np.testing.assert_array_equal(got.boxes, rec.boxes)
        np.testing.assert_array_equal(got.objects_id, rec.objects_id)
    assert _cli("export", "tsv", tmp_path / "s", tmp_path / "back.tsv").exit_code == 0
    assert (tmp_path / "back.tsv").read_bytes() == src.read_bytes()

    # a first row of fewer boxes than a later one: that row fails naming the option; --max-boxes takes it
    small_first = [rows[2], rows[0], rows[1]]  # 20, 36, 10 boxes
    write_tsv(small_first, src)
    result = _cli("convert", "tsv", src, tmp_path / "t", "--dtype", "float32")
    assert result.exit_code == 0 and "1 line could not be converted" in result.output
    (failure,) = _failures(tmp_path / "t")
    assert failure["img_id"] == rows[0].img_id
    assert ("ragged.tsv:2: field 'num_boxes' is 36; this store holds up to 20 boxes per image (convert with "
            "--max-boxes 36 or more)") in failure["reason"]
    assert [r.num_boxes for r in FeatureStore(tmp_path / "t")] == [20, 10]
    result = _cli("convert", "tsv", src, tmp_path / "u", "--dtype", "float32", "--max-boxes", "36")
    assert result.exit_code == 0 and "stored 3 images" in result.output and not _failures(tmp_path / "u")
    assert FeatureStore(tmp_path / "u").num_boxes == 36
    # a resume without the option keeps the store's N (36), so nothing fails and nothing is added twice
    result = _cli("convert", "tsv", src, tmp_path / "u", "--dtype", "float32")
    assert result.exit_code == 0 and "(3 already present)" in result.output, result.output
    assert len(FeatureStore(tmp_path / "u")) == 3


def test_resume_skips_stored_rows_without_decoding_them(tmp_path, sample_rows):
    writer = FeatureStoreWriter(tmp_path / "s", num_boxes=36, feature_dim=2048, dtype="float32", rows_per_shard=2)
    for rec in sample_rows[:5]:
        writer.add(rec)  # two shards complete, the fifth image buffered: what a kill leaves behind
    del writer
    # the stored rows' lines are undecodable now: a resume that decoded them would fail on each
    lines = [_set_field(line, "features", b"!" * 8) if i < 4 else line for i, line in enumerate(_sample_lines())]
    src = tmp_path / "resume.tsv"
    src.write_bytes(b"".join(line + b"\r\n" for line in lines))
    result = _cli("convert", "tsv", src, tmp_path / "s", "--dtype", "float32", "--rows-per-shard", 2)
    assert result.exit_code == 0, result.output
    assert "(4 already present)" in result.output and "could not be converted" not in result.output
    assert _failures(tmp_path / "s") == []
    store = FeatureStore(tmp_path / "s")
    assert sorted(store.ids()) == sorted(r.img_id for r in sample_rows)
    for rec in sample_rows:
        np.testing.assert_array_equal(store.get(rec.img_id).features, rec.features)


def test_writer_rejects_wrong_shapes_and_duplicates(tmp_path, sample_rows):
    writer = FeatureStoreWriter(tmp_path / "s", num_boxes=36, feature_dim=2048)
    writer.add(sample_rows[0])
    with pytest.raises(RecordError, match="already in the store"):
        writer.add(sample_rows[0])
    r = sample_rows[1]
    narrow = ImageFeatures(r.img_id, r.img_h, r.img_w, r.objects_id, r.objects_conf, r.attrs_id, r.attrs_conf,
                           r.boxes, r.features[:, :100])
    with pytest.raises(RecordError, match="1 to 36 boxes x 2048"):  # fewer boxes are fine (tests/test_backends.py)
        writer.add(narrow)
    writer.close()
    with pytest.raises(StoreError, match="dtype='float16' \\(requested 'float32'\\)"):
        FeatureStoreWriter(tmp_path / "s", num_boxes=36, feature_dim=2048, dtype="float32")


def test_boxes_outside_the_image_are_named():
    rec = ImageFeatures("x", 10, 10, np.zeros(1, np.int64), np.zeros(1, np.float32), np.zeros(1, np.int64),
                        np.zeros(1, np.float32), np.array([[0, 0, 12, 5]], np.float32), np.zeros((1, 4), np.float32))
    with pytest.raises(RecordError, match="image 'x': field 'boxes' lies outside"):
        rec.normalized_boxes()


def test_inspect_prints_counts(tmp_path):
    _cli("convert", "tsv", SAMPLE, tmp_path / "s")
    result = _cli("inspect", tmp_path / "s")
    assert result.exit_code == 0
    assert "10 images x 36 boxes x 2048 features (float16)" in result.output
    assert _cli("inspect", tmp_path / "nope").exit_code == 1


def test_write_tsv_is_atomic(tmp_path, sample_rows):
    def broken():
        yield sample_rows[0]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_tsv(broken(), tmp_path / "o.tsv")
    assert list(tmp_path.iterdir()) == []


def test_hdf5_export_and_import_round_trip(tmp_path, sample_rows):
    _cli("convert", "tsv", SAMPLE, tmp_path / "s", "--dtype", "float32")
    assert _cli("export", "h5", tmp_path / "s", tmp_path / "f.h5").exit_code == 0
    import h5py

    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert f["features"].shape == (10, 36, 2048) and f.attrs["format"] == "lxm-features-h5"
    assert _cli("convert", "h5", tmp_path / "f.h5", tmp_path / "s2").exit_code == 0
    assert _cli("export", "tsv", tmp_path / "s2", tmp_path / "back.tsv").exit_code == 0
    assert (tmp_path / "back.tsv").read_bytes() == SAMPLE.read_bytes()


def test_show_draws_the_boxes_with_vocabulary_names(tmp_path, sample_rows):
    import cv2

    _cli("convert", "tsv", SAMPLE, tmp_path / "s")
    rec = sample_rows[0]
    image = SHARED / "fixtures" / "butd-coco-sample" / "images" / f"{rec.img_id}.jpg"
    result = _cli("show", tmp_path / "s", rec.img_id, "--image", image, "--out", tmp_path / "b.png",
                  "--vocab", SHARED / "fixtures" / "butd-coco-sample" / "vocab", "--top", 5)
    assert result.exit_code == 0, result.output
    drawn, orig = cv2.imread(str(tmp_path / "b.png")), cv2.imread(str(image))
    assert drawn.shape == (round(orig.shape[0] * 800 / orig.shape[1]), 800, 3)  # upscaled so labels read
    orig = cv2.resize(orig, drawn.shape[1::-1], interpolation=cv2.INTER_CUBIC)
    assert np.abs(drawn.astype(int) - orig.astype(int)).sum(axis=2).astype(bool).mean() > 0.005
    from lxm.extract.draw import load_vocab

    names = load_vocab(SHARED / "fixtures" / "butd-coco-sample" / "vocab" / "objects_vocab.txt")
    assert len(names) == 1600 and "," not in "".join(names)
    wrong = _cli("show", tmp_path / "s", "COCO_nope", "--image", image, "--out", tmp_path / "c.png")
    assert wrong.exit_code == 1 and "COCO_nope" in wrong.output
