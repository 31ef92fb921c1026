"""Several writers into one feature store at once: `lxm extract` processes, with or without --shard, and the
FeatureStoreWriter rules that make them safe (reserved shard names, claims, dead-writer clean-up, one index)."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from collections import deque

import cv2
import numpy as np
import pytest

from lxm.features.records import ImageFeatures
from lxm.features.store import LOCK, FeatureStore, FeatureStoreWriter

pytestmark = pytest.mark.e2e  # whole recipes through the lxm CLI (README: Tests)

N, D = 2, 4


def _rec(img_id: str) -> ImageFeatures:
    return ImageFeatures(img_id=img_id, img_h=10, img_w=10, objects_id=np.zeros(N, np.int64),
                         objects_conf=np.ones(N, np.float32), attrs_id=np.zeros(N, np.int64),
                         attrs_conf=np.ones(N, np.float32), boxes=np.tile(np.float32([0, 0, 5, 5]), (N, 1)),
                         features=np.full((N, D), len(img_id), np.float32))


def _writer(root, **kw) -> FeatureStoreWriter:
    return FeatureStoreWriter(root, num_boxes=N, feature_dim=D, dtype="float32", rows_per_shard=1, **kw)


def test_writers_sharing_a_prefix_never_overwrite_each_others_shards(tmp_path):
    a, b = _writer(tmp_path / "s"), _writer(tmp_path / "s")
    for i in range(3):
        a.add(_rec(f"a{i}"))
        b.add(_rec(f"b{i}"))
    a.close()
    b.close()
    assert sorted(FeatureStore(tmp_path / "s").ids()) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert sorted(p.name for p in (tmp_path / "s").glob("part-*.arrow")) == [f"part-{i:05d}.arrow" for i in range(6)]


def test_claims_split_the_work_and_lapse_with_their_writer(tmp_path):
    ids = [f"img{i}" for i in range(8)]
    a, b = _writer(tmp_path / "s"), _writer(tmp_path / "s")
    queue_a, queue_b = deque(ids), deque(ids)
    assert a.claim(queue_a, 3) == ids[:3]
    assert b.claim(queue_b, 3) == ids[3:6]  # a holds the first three
    a.add(_rec("img0"))
    a.close()  # img0 stored; img1 and img2 released
    done_by_b = ids[3:6]
    while claimed := b.claim(queue_b, 3):
        done_by_b += claimed
    assert sorted(done_by_b) == ids[1:]  # everything but what a stored, each once

    c, d = _writer(tmp_path / "t"), _writer(tmp_path / "t")
    assert c.claim(deque(["x"]), 1) == ["x"]
    assert d.claim(deque(["x"]), 1) == []  # a live writer holds it
    del c  # dies without closing: its flock goes with it, as with SIGKILL
    assert d.claim(deque(["x"]), 1) == ["x"]


def test_temporary_files_are_removed_only_when_their_writer_is_dead(tmp_path):
    root = tmp_path / "s"
    a = _writer(root)
    live = root / f".part-00007.arrow.tmp-{a.id}"  # a shard a live writer is writing
    live.write_bytes(b"half a shard")
    dead = root / ".part-00008.arrow.tmp-12345-0badf00d"  # a killed writer's
    legacy = root / ".part-00009.arrow.tmp-4242"  # a killed writer's, from before writer ids
    dead.write_bytes(b"x")
    legacy.write_bytes(b"x")
    b = _writer(root)
    assert live.exists() and not dead.exists() and not legacy.exists()
    b.add(_rec("y"))  # rows_per_shard=1: a shard now, named after a's reservation
    assert (root / "part-00008.arrow").exists()
    del a
    b.close()
    _writer(root).close()
    assert not live.exists()
    assert not [p for p in os.listdir(root) if p.startswith(".")]


def test_an_image_two_writers_both_stored_is_indexed_once(tmp_path, caplog):
    a, b = _writer(tmp_path / "s"), _writer(tmp_path / "s")  # neither claims: both store "x"
    a.add(_rec("x"))
    b.add(_rec("x"))
    b.add(_rec("y"))
    a.close()
    b.close()
    store = FeatureStore(tmp_path / "s")
    assert sorted(store.ids()) == ["x", "y"] and len(store) == 2
    assert any("repeat an image" in r.getMessage() for r in caplog.records)


def test_a_reader_sees_manifest_and_index_of_one_moment(tmp_path):
    root = tmp_path / "s"
    with _writer(root) as w:
        w.add(_rec("x0"))
        w.add(_rec("x1"))
    reader = FeatureStore(root)  # manifest read now, the index only on first use
    with _writer(root, prefix="early") as w:  # its shard sorts first: every shard position moves
        w.add(_rec("y00"))
    assert sorted(reader.ids()) == ["x0", "x1", "y00"] and len(reader) == 3
    for img_id in reader.ids():
        assert reader.get(img_id).img_id == img_id


def _open_fds(pid: int) -> set[str]:
    try:
        return {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return set()


BACKBONES = {  # the detector's regions, and a visual backend (issue 31) through the same claims and shards
    "butd": ["--weights", "random", "--detector", "tiny", "--boxes", "10"],
    "timm": ["--backbone", "timm:vit_tiny_patch16_224", "--backbone-weights", "random", "--timm-arg", "depth=2",
             "--timm-arg", "embed_dim=32", "--timm-arg", "num_heads=2", "--timm-arg", "img_size=64"],
}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="watches /proc to start both writers together")
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_two_extract_processes_into_one_store_lose_and_duplicate_nothing(tmp_path, backbone):
    imgs, out = tmp_path / "imgs", tmp_path / "s"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        cv2.imwrite(str(imgs / f"img{i:02d}.png"), rng.integers(0, 255, (48 + i, 64, 3), dtype=np.uint8))
    out.mkdir()
    base = [sys.executable, "-m", "lxm.cli", "extract", "--images", str(imgs), "--out", str(out),
            *BACKBONES[backbone], "--batch-size", "1", "--rows-per-shard", "2"]
    # Hold the store's LOCK while both start, so both list the images and see an empty store before either writes:
    # the worst case (unlocked, they wrote the same shard names and lost images). One takes every image, the other
    # (--shard 1/2) only the odd ones: they compete for those.
    lock = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd in (base, [*base, "--shard", "1/2"])]
    deadline = time.time() + 120
    while time.time() < deadline and not all(str(out / LOCK) in _open_fds(p.pid) for p in procs):
        time.sleep(0.02)
    waiting = [str(out / LOCK) in _open_fds(p.pid) for p in procs]
    os.close(lock)
    reads = 0
    while any(p.poll() is None for p in procs):  # readers meanwhile see a consistent store
        if (out / "manifest.json").exists():
            store = FeatureStore(out)
            ids = store.ids()
            assert len(ids) == len(set(ids)) == len(store)
            assert [store.get(i).img_id for i in ids[-3:]] == ids[-3:]
            reads += 1
        time.sleep(0.01)
    errs = [p.stderr.read() for p in procs]
    assert all(waiting), "both writers should have waited at the store's LOCK"
    assert [p.returncode for p in procs] == [0, 0], errs
    ids = FeatureStore(out).ids()
    assert sorted(ids) == [f"img{i:02d}" for i in range(20)] and len(ids) == 20
    extracted = [int(re.search(r"extracted (\d+) images", e).group(1)) for e in errs]
    assert sum(extracted) == 20 and min(extracted) > 0, extracted  # the work was split, none done twice
    assert [e.count("meaningless") for e in errs] == [1, 1]  # the random-weights warning, once per run
    assert (out / "failures.jsonl").read_text() == ""
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no claims, no temporary shard left
