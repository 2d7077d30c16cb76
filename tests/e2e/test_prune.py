"""megatron-edl-prune end to end on a trained tiny MoE: m = E is the probe's evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_edl.benchmarks.runs import parse_validations
from tests.helpers.megatron_runs import LAYOUTS, TINY_MOE_GPT, run_pretrain, with_flag_values

pytestmark = pytest.mark.slow

DOMAINS = ("domain0", "domain1", "domain2")


def test_prune_full_model_equals_the_probe_and_curves_are_written(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "prune"
    flags = [
        *TINY_MOE_GPT, "--moe-edl-mock-domains", "3", "--train-iters", "3",
        "--save", str(ckpt), "--save-interval", "3", *LAYOUTS["ep2_alltoall"],
    ]  # fmt: skip
    trained = run_pretrain(2, flags)
    assert trained.returncode == 0, trained.describe()
    probe_flags = [
        *with_flag_values(TINY_MOE_GPT, eval_iters="2", split="50,50,0"),
        "--moe-edl-mock-domains", "3", "--moe-edl-eval-per-domain", "--load", str(ckpt),
    ]  # fmt: skip
    command = [sys.executable, "-m", "megatron_edl.prune", "--out", str(out), "--seed", "3"]
    result = subprocess.run(
        [*command, "--", "--cpu", *probe_flags], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "prune.json").read_text())
    # The calibration pass is the probe on the same (mock) batches: its printed per-domain
    # losses are the masked evaluation's full-model entry.
    printed = parse_validations((out / "calibration.log").read_text())[0]
    for name in DOMAINS:
        assert summary["full"]["lm_loss_per_domain"][name] == pytest.approx(
            printed[f"lm loss/{name}"], rel=1e-5
        )
    assert [r["name"] for r in summary["results"]] == [
        "full-m4",
        "domain-m2",
        "global-m2",
        "random-m2",
    ]  # fmt: skip  (TINY_MOE_GPT: 4 experts, top-2: m = 4, 2)
    for ranking in ("domain", "global", "random"):
        (point,) = summary["curves"][ranking]
        assert point["keep"] == 2 and point["mean_increase"] is not None
    assert (out / "prune.png").stat().st_size > 0 and "| 2 |" in (out / "prune.md").read_text()

    bad = subprocess.run(
        [*command, "--keep", "1", "--", "--cpu", *probe_flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --keep 1: below the router's top-k (2)"]
