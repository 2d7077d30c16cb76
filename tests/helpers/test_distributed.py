"""The gloo test runner itself: results come back, failures and hangs are reported."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import DistributedTestError, run_distributed


def _all_reduce_rank(rank: int, world_size: int, expected: torch.Tensor) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    torch.testing.assert_close(t, expected)
    return t.item()


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 would wait forever for rank 1


def _hang_on_rank_zero(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.barrier()  # rank 1 never enters the collective


def test_results_come_back_per_rank():
    assert run_distributed(_all_reduce_rank, 2, torch.tensor([3.0])) == [3.0, 3.0]


def test_wrong_expectation_fails_with_traceback():
    with pytest.raises(DistributedTestError, match="(?s)rank 0.*AssertionError"):
        run_distributed(_all_reduce_rank, 2, torch.tensor([4.0]))


def test_exception_on_one_rank_is_reported_not_hung():
    with pytest.raises(DistributedTestError, match="(?s)rank 1.*deliberate failure"):
        run_distributed(_fail_on_rank_one, 2, timeout_s=60)


def test_hang_is_killed_after_timeout():
    with pytest.raises(DistributedTestError, match="did not report|rank 0"):
        run_distributed(_hang_on_rank_zero, 2, timeout_s=15)
