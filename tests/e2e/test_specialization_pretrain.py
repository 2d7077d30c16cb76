"""The variance and orthogonality losses through Megatron's real training loop on CPU.

One run (2 processes, EP=2 with the alltoall dispatcher) with EDL, the variance loss and the
orthogonality loss all on, auto-calibrated: the launcher installs the router and the MoE layer
through the layer spec, the metrics reach Megatron's iteration log line, every loss is finite.
Their gradients are proven at layer level (``tests/unit/integration/losses/test_orthogonality.py``).
"""

from __future__ import annotations

import math

import pytest

from tests.helpers.megatron_runs import LAYOUTS, TINY_MOE_GPT, run_pretrain

pytestmark = pytest.mark.slow

STEPS = 3
FLAGS = [
    *TINY_MOE_GPT, *LAYOUTS["ep2_alltoall"], "--train-iters", str(STEPS),
    "--moe-edl-coeff", "0.1", "--moe-edl-mock-domains", "3",
    "--moe-variance-loss-coeff", "0.1", "--moe-variance-loss-axis", "tokens",
    "--moe-ortho-loss-coeff", "0.01", "--moe-specialization-auto-calibrate",
]  # fmt: skip


def test_all_three_losses_in_one_run():
    result = run_pretrain(2, FLAGS)
    assert result.returncode == 0, result.describe()
    assert sorted(result.iterations) == list(range(1, STEPS + 1)), result.describe()
    for step, metrics in result.iterations.items():
        for name in ("lm loss", "load_balancing_loss", "edl_loss", "variance_loss", "ortho_loss"):
            assert name in metrics and math.isfinite(metrics[name]), (step, name, metrics)
        assert metrics["variance_loss"] > 0  # logged as Var = -L_v
        assert metrics["ortho_loss"] > 0  # random experts are not orthogonal
