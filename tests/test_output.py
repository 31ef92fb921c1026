"""The library logs, the program prints: library calls write nothing to stdout/stderr (a notebook gets no stray
output), and `lxm` shows each report once, with or without -v (logging carries the library's messages)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import FIXTURE
from lxm.cli import app
from lxm.extract.detector import GeneralizedRCNN, detector_tiny
from lxm.extract.weights import load_detector_weights, save_pickle_weights
from lxm.model import LxmertForPreTraining, lxmert_tiny, save_lxm
from synthetic import serve_folder

IMAGES = FIXTURE / "images"


def _served_weights(tmp_path):
    """A tiny detector's weights in the airsplay pickle layout, in a folder to serve: (detector, folder, size)."""
    served = tmp_path / "srv"
    served.mkdir()
    src = GeneralizedRCNN(detector_tiny())
    src.init_random(3)
    save_pickle_weights(src, served / "w.pkl")
    return src, served, (served / "w.pkl").stat().st_size


def test_weights_download_writes_nothing_and_reports_progress(tmp_path, monkeypatch, capfd, caplog):
    src, served, size = _served_weights(tmp_path)
    monkeypatch.setenv("LXM_CACHE", str(tmp_path / "cache"))
    server, root = serve_folder(served)
    try:
        url = f"{root}/w.pkl"
        seen: list[tuple[int, int]] = []
        with caplog.at_level(logging.INFO, logger="lxm.extract.weights"):
            report = load_detector_weights(GeneralizedRCNN(detector_tiny()), url, on_bytes=lambda *a: seen.append(a))
        (tmp_path / "cache" / "w.pkl").unlink()
        load_detector_weights(GeneralizedRCNN(detector_tiny()), url)  # no callback: still silent
    finally:
        server.shutdown()
    assert capfd.readouterr() == ("", "")
    assert seen and seen[-1] == (size, size) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert f"downloading {url}" in caplog.text and "downloaded" in caplog.text
    assert report.loaded == len(src.state_dict())


@pytest.mark.parametrize("flags", [[], ["-v"]], ids=["quiet", "verbose"])
def test_cli_shows_the_coverage_report_once(tmp_path, flags):
    save_lxm(LxmertForPreTraining(lxmert_tiny()), tmp_path / "m")
    out = subprocess.run([sys.executable, "-m", "lxm.cli", *flags, "convert-checkpoint", str(tmp_path / "m"),
                          str(tmp_path / "o.pth"), "--to", "original"], capture_output=True, text=True, check=True)
    assert out.stderr.count("lxm: loaded ") == 1, out.stderr
    assert f"from {tmp_path / 'm'}" in out.stderr and "wrote original checkpoint" in out.stderr
    assert out.stdout == ""


def test_cli_extract_shows_a_url_download_on_its_progress_bar(tmp_path, monkeypatch):
    _, served, _ = _served_weights(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(IMAGES.glob("*.jpg"))[:2]:
        (images / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("LXM_CACHE", str(tmp_path / "cache"))
    server, root = serve_folder(served)
    try:
        result = CliRunner().invoke(app, ["extract", "--images", str(images), "--out", str(tmp_path / "s"),
                                          "--weights", f"{root}/w.pkl", "--detector", "tiny", "--boxes", "10",
                                          "--engine", "torch"])
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    assert "download w.pkl (MiB)" in result.output and "extracted 2 images" in result.output
    assert (tmp_path / "cache" / "w.pkl").read_bytes() == (served / "w.pkl").read_bytes()
