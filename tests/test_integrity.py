"""Checksums of the files lxm writes (issue 27 item 29): a model file damaged after it was written is refused with
a line naming it, instead of loading and giving other answers."""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import randomize_

from lxm.integrity import IntegrityError, checksummed_path, sidecar, verify_checksum
from lxm.model import CheckpointError, LxmertForPreTraining, load_pretrained, lxmert_tiny
from lxm.model.weights import save_lxm, save_original


def _damage(path, at: int, n: int = 256) -> None:
    """Overwrite n bytes at offset `at` (inside the tensor data: the file still parses)."""
    data = bytearray(path.read_bytes())
    data[at:at + n] = bytes((b ^ 0x5A) for b in data[at:at + n])
    path.write_bytes(bytes(data))


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return randomize_(LxmertForPreTraining(lxmert_tiny()), 3)


def test_a_damaged_model_file_is_refused_naming_it(model, tmp_path):
    out = save_lxm(model, tmp_path / "m")
    weights = out / "model.safetensors"
    # the weights only: config.json is text a user may edit (transformers' id2label), read and checked as JSON
    assert sidecar(weights).exists() and not sidecar(out / "config.json").exists()
    # the sidecar is sha256sum's format, so the file can be checked outside lxm too
    check = subprocess.run(["sha256sum", "-c", sidecar(weights).name], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    load_pretrained(out)  # intact: loads
    _damage(weights, weights.stat().st_size // 2)
    from safetensors.torch import load_file

    assert load_file(str(weights))  # the damage lies inside a tensor: safetensors alone reads it, other values
    with pytest.raises(CheckpointError, match=r"model\.safetensors: damaged after it was written"):
        load_pretrained(out)
    sidecar(weights).unlink()  # a file without a recorded checksum (older lxm, another tool) loads as it is
    load_pretrained(out)


def test_a_damaged_original_format_file_is_refused(model, tmp_path):
    path = save_original(model, tmp_path / "model_LXRT.pth")
    load_pretrained(path)
    _damage(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="model_LXRT.pth: damaged after it was written"):
        load_pretrained(path)


def test_a_checksummed_write_that_fails_leaves_no_checksum_of_the_new_content(tmp_path):
    path = tmp_path / "f.bin"
    with checksummed_path(path) as tmp:
        tmp.write_bytes(b"one")
    assert verify_checksum(path) is True
    with pytest.raises(RuntimeError), checksummed_path(path) as tmp:
        tmp.write_bytes(b"two")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"one" and not sidecar(path).exists()  # old content, unchecked: never a false alarm
    assert verify_checksum(path) is False
    with pytest.raises(IntegrityError, match="no recorded checksum"):
        verify_checksum(path, required=True)
    sidecar(path).write_text("not a checksum\n")
    with pytest.raises(IntegrityError, match=r"f\.bin\.sha256: not a sha256 checksum file"):
        verify_checksum(path)
