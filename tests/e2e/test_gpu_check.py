"""The rehearsal of ``make gpu-check`` (``tools/gpu_check.py --dry-run``) on CPU.

Every step's real command runs at a tiny size with the GPU run's flags: the GPU tests (they
skip), the kernel count, the router and MoE-layer benchmarks, and Megatron's training loop
through the launcher's ``--cpu`` with the check's model flags. A flag Megatron refuses fails
the rehearsal (two planted ones below), so it fails here and not on the first GPU.

The slow test also builds the wheel folder (``make gpu-wheelhouse``, from PyPI or pip's cache)
and rehearses with it installed into an environment that holds only torch and its dependencies.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu_check.py"
CPU_STEPS = [
    "install",
    "tests",
    "kernels",
    "router",
    "moe_layer",
    "training_small",
    "training_large",
]


def _gpu_check():
    name = "_tools_gpu_check"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def _rehearse(out: Path, *extra: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _check_results(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True and results["device"] == "cpu"
    records = {r["step"]: r for r in results["steps"]}
    assert list(records) == CPU_STEPS  # no TE here: no training_te
    assert all(r["returncode"] == 0 for r in records.values()), records
    for name in CPU_STEPS[2:]:
        assert "--device cpu" in records[name]["command"], name
    # The two local-spec sizes are the same command at the tiny size: run once.
    assert records["training_large"]["same_as"] == "training_small"
    assert "skipped" in (out / "tests.log").read_text()  # collected, then skipped on CPU
    (train,) = [rows for t, rows in records["training_small"]["tables"].items() if "ms" in t]
    assert [row["config"] for row in train] == ["baseline", "edl"]
    assert all(row["peak allocated (MiB), max over runs"] == "0" for row in train)  # CPU
    assert "--no-masked-softmax-fusion" in records["training_small"]["command"]
    report = (out / "results.md").read_text()
    assert "no all-reduce of EDL's per-domain statistics; no NCCL" in report
    assert "| large | 631,452,672 |" in report
    return results


@pytest.mark.parametrize(
    ("plant", "refusal"),
    [
        # A flag Megatron refuses: fp16 with the check's bf16 (its validate_args asserts).
        (lambda flags: [*flags, "--fp16"], "assert not args.bf16"),
        # A derived flag left out: the bf16 softmax needs apex's kernel on CPU as on a GPU.
        (
            lambda flags: [f for f in flags if f != "--no-masked-softmax-fusion"],
            "scaled_masked_softmax_cuda",
        ),
    ],
    ids=["megatron-refuses-fp16-with-bf16", "masked-softmax-fusion-without-apex"],
)
def test_a_planted_bad_flag_fails_the_rehearsal(tmp_path, monkeypatch, plant, refusal):
    gpu_check = _gpu_check()
    derive = gpu_check.model_flags
    monkeypatch.setattr(gpu_check, "model_flags", lambda *a, **k: plant(derive(*a, **k)))
    out = tmp_path / "results"
    rc = gpu_check.main(["--dry-run", "--no-install", "--out", str(out), "--steps",
                         "training_small"])  # fmt: skip
    assert rc == 1
    log = (out / "training_small.log").read_text()
    assert refusal in log, log[-3000:]
    (record,) = [r for r in json.loads((out / "results.json").read_text())["steps"]
                 if r["step"] == "training_small"]  # fmt: skip
    assert record["returncode"] != 0


@pytest.mark.slow
def test_wheelhouse_builds_and_the_rehearsal_runs_every_step_with_it(tmp_path):
    max_mib = runpy.run_path(str(SCRIPT))["MAX_WHEELHOUSE_MIB"]  # the script, not run as main
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    wheelhouse = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, str(SCRIPT), "--build-wheelhouse", str(wheelhouse)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    wheels = list(wheelhouse.glob("*.whl"))
    assert sum(w.stat().st_size for w in wheels) <= max_mib * 2**20
    assert any(w.name.startswith("megatron_core-") for w in wheels)

    out = tmp_path / "results"
    proc = _rehearse(out, "--wheelhouse", str(wheelhouse), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr + _logs(out)
    results = _check_results(out)  # every step ran on CPU (the planted tests: --no-install)
    assert results["steps"][0]["command"].startswith("pip install --no-index --no-deps")
    assert "training_te" in results["te_pair"] or "does not import" in results["te_pair"]


def test_missing_wheelhouse_is_named(tmp_path):
    proc = _rehearse(tmp_path / "out", "--wheelhouse", str(tmp_path / "none"), timeout=60)
    assert proc.returncode != 0
    assert f"no wheels in {tmp_path / 'none'}" in proc.stderr
    assert "make gpu-wheelhouse" in proc.stderr


def _logs(out: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))
