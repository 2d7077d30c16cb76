"""``make gpu-wheelhouse`` and the dry run of ``make gpu-check`` (tools/gpu_check.py), on CPU.

Builds the wheel folder from PyPI (or pip's cache) into a temporary directory, then runs the dry
run: the wheels install with ``--no-index --no-deps`` into an environment holding only torch and
its dependencies, and from there every step's script imports and the GPU tests collect. So the
GPU check cannot rot while no GPU is around.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu_check.py"


@pytest.mark.slow
def test_wheelhouse_builds_and_the_dry_run_passes(tmp_path):
    max_mib = runpy.run_path(str(SCRIPT))["MAX_WHEELHOUSE_MIB"]  # the script, not run as main
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    wheelhouse = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, str(SCRIPT), "--build-wheelhouse", str(wheelhouse)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    wheels = list(wheelhouse.glob("*.whl"))
    assert sum(w.stat().st_size for w in wheels) <= max_mib * 2**20
    assert any(w.name.startswith("megatron_core-") for w in wheels)

    out = tmp_path / "results"
    dry = subprocess.run(
        [sys.executable, str(SCRIPT), "--wheelhouse", str(wheelhouse), "--dry-run",
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stdout + dry.stderr + _logs(out)
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True
    names = [r["step"] for r in results["steps"]]
    assert names == ["install", "tests", "kernels", "router", "moe_layer", "training"]
    assert all(r["returncode"] == 0 for r in results["steps"])
    # The GPU tests were collected (not an empty selection), from the check's environment.
    assert "collected" in (out / "tests.log").read_text()
    assert "| training |" in (out / "results.md").read_text()


def test_missing_wheelhouse_is_named(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--wheelhouse", str(tmp_path / "none"), "--dry-run",
         "--out", str(tmp_path / "out")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"no wheels in {tmp_path / 'none'}" in proc.stderr
    assert "make gpu-wheelhouse" in proc.stderr


def _logs(out: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))
