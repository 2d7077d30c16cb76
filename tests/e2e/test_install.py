"""The declared requirements install into NGC containers and into the pinned CPU stack.

``requirements.txt`` (the package's dependencies) holds ranges; ``constraints.txt`` the exact
CPU stack ``make`` installs. NGC PyTorch containers carry torch builds with versions like
``2.13.0a0+8145d630e8.nv26.06``: pip must accept the container's torch as it is, never replace it.
The install under the image's own ``PIP_CONSTRAINT`` is ``tests/e2e/test_install_ngc.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]

# torch versions of NGC PyTorch containers (pre-release + local label), and a plain release.
NGC_TORCH = [
    "2.13.0a0+8145d630e8.nv26.06",  # 26.06, Megatron-LM core_v0.19.0's docker/.ngc_version.dev
    "2.8.0a0+5228986c39.nv25.06",
    "2.9.0a0+50eac811a6.nv25.09",
    "2.10.0a0+b4e4ee81d3.nv25.12",
]
# torch of the NGC PyTorch tags around torch 2.6 (NVIDIA's release notes and its PyTorch-for-
# Jetson compatibility table; the ".nvYY.MM" label omitted): the earliest tag whose torch
# satisfies torch>=2.6 under PEP 440 is 25.02 (2.7.0a0 > 2.6; 2.6.0a0 < 2.6).
NGC_TORCH_BY_TAG = {
    "24.12": "2.6.0a0+df5bbc09d1",
    "25.01": "2.6.0a0+ecf3bae40a",
    "25.02": "2.7.0a0+6c54963f75",
    "25.03": "2.7.0a0+7c8ec84dab",
}
EARLIEST_NGC_TAG = "25.02"
PIN_STYLE = "torch==2.11.0"  # the pin requirements.txt had, which no NGC build satisfies


def _requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def _pins() -> dict[str, Version]:
    return {r.name.lower(): Version(str(r.specifier).removeprefix("==")) for r in _pinned()}


def _pinned() -> list[Requirement]:
    return _requirements(ROOT / "constraints.txt")


def _declared() -> list[Requirement]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = [Requirement(r) for r in extras["optional-dependencies"]["gpu"]]
    return _requirements(ROOT / "requirements.txt") + gpu


def test_requirements_are_ranges_with_the_bounds_we_rely_on():
    by_name = {r.name.lower(): r for r in _requirements(ROOT / "requirements.txt")}
    assert all(s.operator != "==" for r in by_name.values() for s in r.specifier), by_name
    assert by_name["megatron-core"].specifier.contains("0.19.2")
    assert not by_name["megatron-core"].specifier.contains("0.20.0")
    assert not by_name["torch"].specifier.contains("2.5.1")  # megatron-core 0.19 needs >= 2.6
    assert "triton" not in by_name  # NGC ships its own build
    for extra in _declared():
        if extra.name.startswith("transformer-engine"):
            assert extra.specifier and not extra.specifier.contains("2.5.0")


@pytest.mark.parametrize("version", NGC_TORCH)
def test_declared_torch_accepts_ngc_builds(version):
    for requirement in _declared():
        if requirement.name == "torch":
            assert requirement.specifier.contains(version, prereleases=True), requirement
    assert not Requirement(PIN_STYLE).specifier.contains(version, prereleases=True)


def test_the_earliest_ngc_tag_whose_torch_satisfies_the_requirements():
    torch = [r for r in _declared() if r.name == "torch"]
    assert torch
    fits = [
        tag for tag, version in NGC_TORCH_BY_TAG.items()
        if all(r.specifier.contains(version, prereleases=True) for r in torch)
    ]  # fmt: skip
    assert min(fits) == EARLIEST_NGC_TAG, fits
    assert "25.01" not in fits  # 2.6.0a0+ecf3bae40a is a pre-release of 2.6: below torch>=2.6


def test_pinned_stack_satisfies_the_declared_ranges():
    pins = _pins()
    for requirement in _requirements(ROOT / "requirements.txt"):
        pinned = pins.get(requirement.name.lower())
        assert pinned is not None, f"{requirement.name} has no pin in constraints.txt"
        assert requirement.specifier.contains(pinned, prereleases=True), (requirement, pinned)


def _fake_dist(site: Path, name: str, version: str) -> None:
    """An installed distribution as pip sees it: a .dist-info with METADATA (no code)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def _dry_run(venv: Path, *requirements: str) -> subprocess.CompletedProcess:
    python = venv / "bin" / "python"
    return subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--no-index", "--quiet",
         "--report", "-", *requirements],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PIP_NO_INPUT": "1"},
    )  # fmt: skip


def test_pip_keeps_an_ngc_torch_in_place(tmp_path):
    """A real pip, offline, in an environment whose torch is an NGC build: the declared torch
    requirement is already satisfied (nothing to install); the old exact pin would need a new
    torch (and fails offline)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    _fake_dist(site, "torch", NGC_TORCH[0])
    torch_requirement = next(str(r) for r in _declared() if r.name == "torch")
    kept = _dry_run(venv, torch_requirement)
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["install"] == []
    replaced = _dry_run(venv, PIN_STYLE)
    assert replaced.returncode != 0 and "torch" in replaced.stderr
