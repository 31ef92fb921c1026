"""The `lxm` command line: only working commands are listed, each explains itself."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import REPO
from lxm.cli import app


def _leaf_commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a command group (typer has its own group class)
            yield from _leaf_commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


def test_help_lists_only_working_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    root = typer.main.get_command(app)
    # Stages land one issue at a time; a command is registered only once it works (no placeholders).
    assert set(root.commands) == {"convert-checkpoint", "convert", "export", "extract", "inspect", "show",
                                  "build-corpus", "pretrain", "finetune", "predict", "plot", "quickstart", "evaluate",
                                  "check-submission", "ask", "gallery"}
    leaves = set(_leaf_commands(root))
    assert leaves == {("convert-checkpoint",), ("convert", "tsv"), ("convert", "h5"), ("export", "tsv"), ("export", "h5"),
                      ("extract",), ("inspect",), ("show",), ("build-corpus",), ("pretrain",), ("finetune",),
                      ("predict",), ("plot",), ("quickstart",), ("ask",), ("gallery",),
                      ("evaluate", "vqa"), ("evaluate", "gqa"), ("evaluate", "nlvr2"), ("evaluate", "qa"),
                      ("evaluate", "classify"), ("check-submission",)}
    for name in root.commands:
        assert name in result.output
    for path in leaves:
        sub = CliRunner().invoke(app, [*path, "--help"])
        assert sub.exit_code == 0 and "Example" in sub.output, path


def test_help_lists_the_commands_in_pipeline_order():
    result = CliRunner().invoke(app, ["--help"], terminal_width=120)
    listed = [m.group(1) for m in re.finditer(r"^[│|] ([a-z][a-z0-9-]*) ", result.output, re.MULTILINE)]
    assert listed == ["quickstart", "extract", "convert", "export", "inspect", "show", "build-corpus", "pretrain",
                      "finetune", "predict", "evaluate", "check-submission", "ask", "gallery", "plot",
                      "convert-checkpoint"], result.output


def test_convert_checkpoint_help_explains_formats():
    result = CliRunner().invoke(app, ["convert-checkpoint", "--help"])
    assert result.exit_code == 0
    for word in ("original", "hf", "lxm", "Example"):
        assert word in result.output


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "lxm.cli", "--help"], capture_output=True, text=True, check=True)
    assert "convert-checkpoint" in out.stdout


@pytest.mark.parametrize("modules, absent", [
    ("lxm.model", ("transformers", "typer", "rich", "lxm.train", "lxm.extract", "lxm.corpus", "lxm.eval", "lxm.cli")),
    ("lxm.features, lxm.features.tsv, lxm.features.h5", ("torch", "lxm.train", "lxm.extract", "lxm.cli")),
    ("lxm.eval", ("torch", "typer", "lxm.train", "lxm.cli")),
    # the synthetic world the quickstart and the tests' worlds build on, and the report that only reads files
    ("lxm.demo.world", ("torch", "typer", "lxm.train", "lxm.model", "lxm.features", "lxm.corpus", "lxm.cli")),
    ("lxm.demo.report", ("torch", "typer", "lxm.model", "lxm.extract", "lxm.cli")),
], ids=["model", "features", "eval", "demo-world", "demo-report"])
def test_library_imports_without_the_training_stack(modules, absent):
    code = (f"import sys, {modules}; bad = [m for m in {absent!r} if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"importing {modules} loads {out.stdout.strip()} {out.stderr[-500:]}"


# package (folder under lxm/) -> what none of its modules may import, even lazily inside a function
IMPORT_RULES = {
    "model": ("lxm.train", "lxm.extract", "lxm.corpus", "lxm.cli", "lxm.eval"),
    "features": ("lxm.train", "lxm.extract", "lxm.cli"),
    "extract": ("lxm.train", "lxm.model", "lxm.corpus", "lxm.eval", "lxm.cli"),
    "eval": ("torch",),
    # the corpus is built and read without torch, the model or any stage that consumes it
    "corpus": ("torch", "lxm.model", "lxm.train", "lxm.extract", "lxm.eval", "lxm.infer", "lxm.gallery", "lxm.demo"),
    # the recipes use finished runs through lxm.infer, never the programs built on them
    "train": ("lxm.extract", "lxm.gallery", "lxm.demo"),
    # using runs never needs the training recipes (the finetuner imports lxm.infer.runs, not the reverse) nor the
    # corpus builder; it reads answer tables through the corpus layout's reader (lxm.corpus.layout)
    "infer": ("lxm.train.finetune", "lxm.train.pretrain", "lxm.train.step", "lxm.train.optim", "lxm.gallery",
              "lxm.corpus.build", "lxm.corpus.jsonstream", "lxm.corpus.answers"),
    "gallery": ("lxm.train.finetune", "lxm.train.pretrain", "lxm.train.step", "lxm.train.optim", "lxm.corpus"),
    # the quickstart's world and report read and write files: no model, detector or recipe
    "demo": ("torch", "lxm.model", "lxm.extract", "lxm.corpus", "lxm.infer", "lxm.gallery", "lxm.train.finetune",
             "lxm.train.pretrain", "lxm.train.step", "lxm.train.optim"),
}


def _imported(path: Path) -> set[str]:
    """Every module an lxm source file imports, at the top or inside functions (`from lxm import cli` -> lxm.cli)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _breaks(names: set[str], forbidden) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


def test_import_rules_hold_in_the_source():
    """The layers of the layout (README): the model below everything, the features below the stages, evaluation
    without torch, no library module importing the program, and the command modules sharing only cli.common (so
    the CLI package has no import cycle)."""
    root = REPO / "lxm"
    files = sorted(root.rglob("*.py"))
    assert len(files) > 40 and (root / "cli" / "__init__.py") in files
    broken = []
    for path in files:
        rel = path.relative_to(root)
        names = _imported(path)
        forbidden = list(IMPORT_RULES.get(rel.parts[0], ())) if len(rel.parts) > 1 else []
        if rel.parts[0] != "cli":
            forbidden.append("lxm.cli")
        elif rel.name not in ("__init__.py", "__main__.py"):
            names = {n for n in names if n != "lxm.cli.common" and not n.startswith("lxm.cli.common.")}
            forbidden.append("lxm.cli")
        broken += [f"{rel}: {name}" for name in _breaks(names, forbidden)]
    assert not broken, broken


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))  # __version__ is public


def _private_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from lxm.X import _name` / `import lxm.X._y` in a file (the top or inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("lxm"):
            found += [(node.module, a.name) for a in node.names if _private(a.name)]
            found += [(node.module, part) for part in node.module.split(".") if _private(part)]
        elif isinstance(node, ast.Import):
            found += [(a.name, part) for a in node.names if a.name.startswith("lxm.")
                      for part in a.name.split(".") if _private(part)]
    return found


def test_no_private_name_crosses_packages():
    """A `_name` is its package's own: another package of lxm, or a benchmark script, that needs it gets a public
    name in the package that owns it (style §11, "no `_private` names cross packages")."""
    root = REPO / "lxm"
    crossing = []
    for path in sorted(root.rglob("*.py")) + sorted((REPO / "benchmarks").glob("*.py")):
        rel = path.relative_to(REPO)
        own = rel.parts[1] if rel.parts[0] == "lxm" and len(rel.parts) > 2 else None
        for module, name in _private_imports(path):
            owner = module.split(".")[1] if module.count(".") >= 1 else None
            if owner != own:
                crossing.append(f"{rel}: from {module} import {name}")
    assert not crossing, crossing


def test_no_test_module_imports_another():
    """Shared worlds, fixtures and helpers live in conftest.py and synthetic.py (style §11, "shared worlds live in
    conftest, not imported from other test modules"): a test module that imports a `test_*` module runs that
    module's top level and couples the two; pytest would also collect its imported fixtures twice."""
    tests = REPO / "tests"
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found += [f"{path.name}:{node.lineno}: {name}" for name in names if name.split(".")[0].startswith("test_")]
    assert not found, found
