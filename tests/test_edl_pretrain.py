"""EDL through Megatron's real training loop on CPU: gradients proven by layout equivalence.

From one single-process checkpoint, 3 training steps with the EDL loss on (the EDL gradient moves
the weights at every step) give the same LM and EDL losses under every parallel layout as a
single-process run on the same global micro-batch, which is what method.md's gradient-scale rule
demands. The load-balancing loss is off here so that only EDL's gradient scale is under test
(its own scale across layouts is covered in test_pretrain_cpu.py).
"""

from __future__ import annotations

import pytest

from tests.megatron_runs import LAYOUTS, TINY_MOE_GPT, RunResult, run_pretrain

pytestmark = pytest.mark.slow

EDL = [
    "--moe-edl-coeff", "0.5", "--moe-edl-mock-domains", "3",
    "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0",
]  # fmt: skip
STEPS = 3


def _assert_trained(result: RunResult, iters: int) -> None:
    assert result.returncode == 0, result.describe()
    assert sorted(result.iterations) == list(range(1, iters + 1)), result.describe()


@pytest.fixture(scope="module")
def edl_checkpoint(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("edl_ckpt")
    result = run_pretrain(
        1, [*TINY_MOE_GPT, *EDL, "--train-iters", "3", "--save", str(ckpt), "--save-interval", "3"]
    )
    _assert_trained(result, 3)
    return ckpt


def _from_checkpoint(ckpt, nproc: int, extra: list[str]) -> RunResult:
    flags = [
        *TINY_MOE_GPT, *EDL, "--train-iters", str(STEPS),
        "--load", str(ckpt), "--finetune", "--no-load-optim", "--no-load-rng", *extra,
    ]  # fmt: skip
    result = run_pretrain(nproc, flags)
    _assert_trained(result, STEPS)
    return result


@pytest.fixture(scope="module")
def reference(edl_checkpoint):
    """Single process; the key is the micro-batch size: the tokens one EDL statistic covers."""
    return {
        mbs: _from_checkpoint(edl_checkpoint, 1, ["--micro-batch-size", str(mbs)]) for mbs in (2, 4)
    }


# (layout flags, scope, micro-batch size of the equivalent single-process run).
# Global scope on DP=2 reduces the statistics over both replicas' micro-batches (4 samples);
# local scope keeps one replica's (2 samples), like two micro-batches of one process.
CASES = {
    "dp2_global": (LAYOUTS["dp2"], "global", 4),
    "dp2_local": (LAYOUTS["dp2"], "local", 2),
    "ep2_alltoall_global": (LAYOUTS["ep2_alltoall"], "global", 4),
    "tp2_sp_global": (LAYOUTS["tp2_sp"], "global", 2),
    "tp2_sp_ep2_global": (
        [*LAYOUTS["tp2_sp"], *LAYOUTS["ep2_alltoall"], "--expert-tensor-parallel-size", "1"],
        "global",
        2,
    ),
    "pp2_global": (LAYOUTS["pp2"], "global", 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edl_layout_equivalence(case, edl_checkpoint, reference):
    extra, scope, ref_mbs = CASES[case]
    result = _from_checkpoint(edl_checkpoint, 2, [*extra, "--moe-edl-scope", scope])
    # The reference ran with the default (global) scope: on one process both scopes are the same.
    ref = reference[ref_mbs]
    for name in ("lm loss", "edl_loss"):
        got, want = result.losses(name), ref.losses(name)
        assert got == pytest.approx(want, rel=5e-6), (case, name, got, want)


def test_edl_is_logged_and_raises_divergence():
    """EDL's metrics reach Megatron's log line, and the loss makes routing more domain-specific.

    ``edl_loss`` (log form: mean over domain pairs of -log(JSD + eps)) is reported by both runs;
    a lower value is a higher divergence. The baseline's coefficient is 1e-9: its EDL gradient is
    negligible, but the router still computes and logs the statistics.
    """
    flags = [*TINY_MOE_GPT, "--train-iters", "50", "--moe-edl-mock-domains", "3"]
    edl = run_pretrain(2, [*flags, "--moe-edl-coeff", "0.3"])
    base = run_pretrain(2, [*flags, "--moe-edl-coeff", "1e-9"])
    for run in (edl, base):
        _assert_trained(run, 50)
        for name in ("edl_loss", "edl_jsd", "edl_mi", "edl_domains", "load_balancing_loss"):
            assert name in run.iterations[50], (name, run.iterations[50])
        assert run.iterations[50]["edl_domains"] == 3.0
    first = edl.iterations[1]["edl_loss"]
    assert base.iterations[1]["edl_loss"] == pytest.approx(first, rel=1e-4)  # same start
    edl_end = sum(edl.iterations[i]["edl_loss"] for i in range(41, 51)) / 10
    base_end = sum(base.iterations[i]["edl_loss"] for i in range(41, 51)) / 10
    assert edl_end < base_end - 0.5, (edl_end, base_end)
    assert edl.iterations[50]["edl_jsd"] > base.iterations[50]["edl_jsd"]
