"""The import layering of pyproject.toml's [tool.importlinter] holds, and a planted violation of
each kind fails the check (docs/CONTRIBUTING.md "Layout")."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_edl"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def copy_root(tmp_path_factory) -> Path:
    """A copy of the package and pyproject.toml to plant violations in."""
    root = tmp_path_factory.mktemp("layering")
    shutil.copytree(PACKAGE, root / "megatron_edl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_layering_holds():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "module, planted, contract",
    [
        ("core/schedule.py", "import megatron.core", "core is pure math"),
        ("core/schedule.py", "from megatron_edl import config", "core is pure math"),
        ("analysis/metrics.py", "import megatron.core", "Megatron is imported by the glue only"),
        ("data/sidecar.py", "import megatron_edl.data.preprocess", "no import cycles"),
        ("data/readers.py", "from megatron_edl.demo import corpus", "the product imports no demo"),
        ("integration/gpt.py", "from megatron_edl import pretrain_gpt", "the launchers sit on top"),
    ],
)
def test_a_planted_violation_fails(copy_root, module, planted, contract):
    path = copy_root / "megatron_edl" / module
    original = path.read_text()
    path.write_text(original + f"\n{planted}  # planted\n")
    try:
        result = _lint_imports(copy_root)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout
    assert contract in result.stdout


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_core_imports_no_torch_distributed():
    # import-linter sees external packages at top level only, so this part is checked here.
    offenders = {
        str(path.relative_to(ROOT)): name
        for path in sorted((PACKAGE / "core").rglob("*.py"))
        for name in _imports(path)
        if name == "torch.distributed" or name.startswith("torch.distributed.")
    }
    assert not offenders, offenders


def test_the_torch_distributed_check_sees_a_planted_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from torch.distributed import all_reduce\n")
    assert "torch.distributed" in _imports(planted)


def _private_imports(path: Path) -> list[str]:
    """``module.name`` of every private name (``_x``) ``path`` imports from another module of
    ours (``megatron_edl``, ``tests``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        ours = isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
        if ours and node.module.split(".")[0] in ("megatron_edl", "tests"):
            out += [
                f"{node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return out


def test_no_module_imports_a_private_name_of_another():
    offenders = {
        str(path.relative_to(ROOT)): names
        for folder in ("megatron_edl", "tests", "tools")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (names := _private_imports(path))
    }
    assert not offenders, offenders


def test_the_private_import_check_sees_a_planted_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from megatron_edl.demo.stages import _prefix, Context\n")
    assert _private_imports(planted) == ["megatron_edl.demo.stages._prefix"]
