"""Megatron's real training loop (``megatron.training.pretrain``) on CPU through our launcher.

Every test asserts the iteration count and losses parsed from Megatron's own log lines.
"""

from __future__ import annotations

import math

import pytest

from tests.helpers.megatron_runs import LAYOUTS, TINY_MOE_GPT, RunResult, run_pretrain

pytestmark = pytest.mark.slow

TRAIN_ITERS = 10


def _assert_trained(result: RunResult, iters: int) -> None:
    assert result.returncode == 0, result.describe()
    assert sorted(result.iterations) == list(range(1, iters + 1)), result.describe()
    losses = result.losses()
    assert all(math.isfinite(x) for x in losses), losses
    assert "load_balancing_loss" in result.iterations[1], result.iterations[1]


@pytest.mark.parametrize("nproc,layout", [(1, "dp1"), *((2, name) for name in LAYOUTS)])
def test_pretrain_runs_and_learns(nproc, layout):
    """DP=1 and DP=2 are started by torchrun, as a user starts them; the other layouts, like
    the rest of the suite, fork their ranks (tests/helpers/launch_ranks.py)."""
    flags = [*TINY_MOE_GPT, "--train-iters", str(TRAIN_ITERS), *LAYOUTS.get(layout, [])]
    launcher = "torchrun" if layout in ("dp1", "dp2") else "fork"
    result = run_pretrain(nproc, flags, launcher=launcher)
    _assert_trained(result, TRAIN_ITERS)
    losses = result.losses()
    # Mock data is learnable (the sequences are arange patterns): the loss must fall.
    assert losses[-1] < losses[0] - 0.05, losses


# Layouts compared against the single-process run, all from one single-process checkpoint.
EQUIVALENCE_LAYOUTS = {
    "dp2": LAYOUTS["dp2"],
    "ep2_alltoall": LAYOUTS["ep2_alltoall"],
    "tp2_sp": LAYOUTS["tp2_sp"],
    "tp2_sp_ep2": [
        *LAYOUTS["tp2_sp"],
        *LAYOUTS["ep2_alltoall"],
        "--expert-tensor-parallel-size",
        "1",
    ],
    "pp2": LAYOUTS["pp2"],
}
EQUIV_ITERS = 3


@pytest.fixture(scope="module")
def single_process_checkpoint(tmp_path_factory):
    """A TP1/EP1/PP1 checkpoint after 3 iterations (torch_dist: reshards on load)."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    flags = [*TINY_MOE_GPT, "--train-iters", "3", "--save", str(ckpt), "--save-interval", "3"]
    result = run_pretrain(1, flags)
    _assert_trained(result, 3)
    return ckpt


def _finetune_from(ckpt, nproc: int, extra: list[str]) -> RunResult:
    flags = [
        *TINY_MOE_GPT,
        "--train-iters",
        str(EQUIV_ITERS),
        "--load",
        str(ckpt),
        "--finetune",
        "--no-load-optim",
        "--no-load-rng",
        *extra,
    ]
    result = run_pretrain(nproc, flags)
    _assert_trained(result, EQUIV_ITERS)
    return result


@pytest.fixture(scope="module")
def single_process_reference(single_process_checkpoint):
    return _finetune_from(single_process_checkpoint, 1, [])


@pytest.mark.parametrize("layout", list(EQUIVALENCE_LAYOUTS))
def test_layout_equivalence(layout, single_process_checkpoint, single_process_reference):
    """Same weights, same samples: every layout gives the single-process losses.

    Covers forward, backward, Megatron's gradient reduction, the optimizer step and the aux-loss
    scaling across TP/EP/PP (3 steps, each depending on the previous update).
    """
    extra = EQUIVALENCE_LAYOUTS[layout]
    result = _finetune_from(single_process_checkpoint, 2, extra)
    for name in ("lm loss", "load_balancing_loss"):
        ref = single_process_reference.losses(name)
        got = result.losses(name)
        # Megatron prints 7 significant digits; fp32 reductions in another order differ ~1e-7.
        assert got == pytest.approx(ref, rel=2e-6), (name, layout, got, ref)


def test_checkpoint_resume_with_edl_matches_uninterrupted(tmp_path):
    """Save at step 3, resume: steps 4-6 give the losses of a run that never stopped.

    With the EDL loss on (accumulated over the global batch's micro-batches): EDL keeps no state
    across iterations, so nothing beyond Megatron's own checkpoint is needed.
    """
    schedule = [
        "--train-iters", "6", "--lr-decay-iters", "6",
        "--moe-edl-coeff", "0.5", "--moe-edl-mock-domains", "3", "--moe-edl-accumulate",
    ]  # fmt: skip
    reference = run_pretrain(2, [*TINY_MOE_GPT, *schedule, *LAYOUTS["ep2_alltoall"]])
    _assert_trained(reference, 6)

    ckpt = tmp_path / "ckpt"
    first = run_pretrain(
        2,
        [
            *TINY_MOE_GPT,
            *schedule,
            *LAYOUTS["ep2_alltoall"],
            "--save",
            str(ckpt),
            "--save-interval",
            "3",
            "--exit-interval",
            "3",
        ],
    )
    assert sorted(first.iterations) == [1, 2, 3], first.describe()
    # The CUDA RNG tracker is empty on CPU: without --no-load-rng Megatron prints "Unable to
    # load rng state" and exits with code 0 (docs/cpu-mode.md).
    resumed = run_pretrain(
        2,
        [*TINY_MOE_GPT, *schedule, *LAYOUTS["ep2_alltoall"], "--load", str(ckpt), "--no-load-rng"],
    )
    assert resumed.returncode == 0, resumed.describe()
    assert sorted(resumed.iterations) == [4, 5, 6], resumed.describe()
    for step in (4, 5, 6):
        got, ref = resumed.iterations[step], reference.iterations[step]
        assert got["grad norm"] == ref["grad norm"], (step, got, ref)
    for step in (4, 6):
        for name in ("lm loss", "edl_loss"):
            got, ref = resumed.iterations[step][name], reference.iterations[step][name]
            assert got == pytest.approx(ref, rel=1e-6), (step, name, got, ref)
    # Megatron's log line for the second iteration after a resume reports the mean of the first
    # two (its loss accumulator is not reset after the first log): the training itself is
    # unaffected (grad norms and step 6 match), the quirk is Megatron's, GPU runs included.
    mean_4_5 = (reference.iterations[4]["lm loss"] + reference.iterations[5]["lm loss"]) / 2
    assert resumed.iterations[5]["lm loss"] == pytest.approx(mean_4_5, rel=1e-6)
