"""The β schedule (delayed start, linear warm-up): hand values, config, router, training loop."""

from __future__ import annotations

import pytest
import torch

from megatron_edl.config import EDLConfig, EDLConfigError
from megatron_edl.core.schedule import edl_coefficient
from tests.helpers.distributed import run_distributed
from tests.helpers.megatron_runs import TINY_MOE_GPT, run_pretrain
from tests.unit.integration.test_router import (
    forward_backward,
    make_router,
    one_process_job,
    take_edl_loss,
)


@pytest.mark.parametrize(
    "iteration, expected",
    [(None, 0.1), (0, 0.0), (9, 0.0), (10, 0.025), (11, 0.05), (13, 0.1), (14, 0.1), (10**6, 0.1)],
)
def test_delayed_start_and_warm_up_by_hand(iteration, expected):
    # s = 10, w = 4: step 10 gets beta / 4, step 13 the full beta.
    got = edl_coefficient(coeff=0.1, iteration=iteration, start_iter=10, warmup_iters=4)
    assert got == pytest.approx(expected)


def test_no_schedule_is_the_full_coefficient():
    assert all(
        edl_coefficient(coeff=0.3, iteration=i, start_iter=0, warmup_iters=0) == 0.3
        for i in range(5)
    )
    cfg = EDLConfig(coeff=0.2, start_iter=2, warmup_iters=2)
    assert [cfg.coefficient_at(i) for i in range(5)] == pytest.approx([0, 0, 0.1, 0.2, 0.2])


@pytest.mark.parametrize(
    "field, flag",
    [("start_iter", "--moe-edl-start-iter"), ("warmup_iters", "--moe-edl-warmup-iters")],
)
def test_negative_schedule_values_name_the_flag(field, flag):
    with pytest.raises(EDLConfigError, match=f"{flag} must be >= 0, got -1"):
        EDLConfig(coeff=0.1, **{field: -1})


def _schedule_job(rank: int, world_size: int, seed: int) -> dict:
    """The same micro-batch at several optimizer steps: the EDL gradient is scaled by beta(i)."""
    job, batch = one_process_job(seed)
    out = {}
    for iteration in (None, 0, 1, 2, 3, 4):
        router = make_router(job, start_iter=1, warmup_iters=3)
        forward_backward(router, job, batch, iteration=iteration)
        out[iteration] = (take_edl_loss(), router.weight.grad.clone())
    return out


def test_router_scales_the_edl_gradient_by_the_schedule():
    (out,) = run_distributed(_schedule_job, 1, seed=5)
    full_loss, full_grad = out[None]
    assert full_grad.abs().max() > 0
    for iteration, factor in [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (4, 1.0)]:
        loss, grad = out[iteration]
        assert loss == pytest.approx(full_loss, rel=1e-6)  # logged with any weight
        torch.testing.assert_close(grad, factor * full_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_training_loop_passes_the_iteration():
    """With --moe-edl-start-iter 2 the first two steps train as without EDL (same grad norms as
    a run with the labels loaded but β = 0), the third differs."""
    flags = [*TINY_MOE_GPT, "--train-iters", "3", "--moe-edl-mock-domains", "3"]
    delayed = run_pretrain(1, [*flags, "--moe-edl-coeff", "0.5", "--moe-edl-start-iter", "2"])
    without = run_pretrain(1, [*flags, "--moe-edl-eval-per-domain"])
    for result in (delayed, without):
        assert sorted(result.iterations) == [1, 2, 3], result.describe()
    assert delayed.iterations[1]["edl_loss"] > 0  # computed and logged during the delay
    for step in (1, 2):
        assert delayed.iterations[step]["grad norm"] == without.iterations[step]["grad norm"]
    assert delayed.iterations[3]["grad norm"] != without.iterations[3]["grad norm"]
