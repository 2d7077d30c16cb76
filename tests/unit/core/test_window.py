"""The statistics window across micro-batches (--moe-edl-window-decay): hand values, config,
checkpoints and exact resume through Megatron's loop. Layout equivalence:
tests/unit/integration/test_router.py (``test_window_matches_single_process_reference``)."""

from __future__ import annotations

import pytest
import torch

from megatron_edl.config import EDLConfig, EDLConfigError
from megatron_edl.core.window import window_combine
from tests.helpers.megatron_runs import LAYOUTS, TINY_MOE_GPT, run_pretrain


def test_window_by_hand():
    # D = 1, E = 2, λ = 0.5. Micro-batch 1: A = [1, 3], n = 2; micro-batch 2: A = [2, 2], n = 1.
    past_X = torch.zeros(3)
    a1 = torch.tensor([[1.0, 3.0]], requires_grad=True)
    sums, counts, past_X = window_combine(
        sums_DE=a1, counts_D=torch.tensor([2.0]), past_X=past_X, decay=0.5
    )
    assert sums.tolist() == [[1.0, 3.0]] and counts.tolist() == [2.0]  # nothing before
    assert past_X.tolist() == [0.5, 1.5, 1.0]  # 0.5 * (0 + [1, 3, 2])
    a2 = torch.tensor([[2.0, 2.0]], requires_grad=True)
    sums, counts, past_X = window_combine(
        sums_DE=a2, counts_D=torch.tensor([1.0]), past_X=past_X, decay=0.5
    )
    assert sums.tolist() == [[2.5, 3.5]] and counts.tolist() == [2.0]
    assert past_X.tolist() == [1.25, 1.75, 1.0]  # 0.5 * ([0.5, 1.5, 1] + [2, 2, 1])
    sums.sum().backward()  # the gradient reaches the current micro-batch only
    assert a2.grad.tolist() == [[1.0, 1.0]] and a1.grad is None
    assert not past_X.requires_grad


def test_zero_decay_is_the_plain_statistics():
    sums_DE = torch.rand(3, 4)
    counts_D = torch.rand(3)
    got_DE, got_D, next_X = window_combine(
        sums_DE=sums_DE, counts_D=counts_D, past_X=torch.zeros(15), decay=0.0
    )
    assert torch.equal(got_DE, sums_DE) and torch.equal(got_D, counts_D)
    assert not next_X.any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window_decay": 1.0}, "--moe-edl-window-decay must be in [0, 1), got 1.0"),
        ({"window_decay": -0.1}, "--moe-edl-window-decay must be in [0, 1), got -0.1"),
        ({"window_decay": 0.5, "accumulate": True}, "are exclusive"),
        ({"window_decay": 0.5, "scope": "local"}, "needs --moe-edl-scope global"),
    ],
)
def test_bad_window_settings_name_the_flag(kwargs, message):
    with pytest.raises(EDLConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        EDLConfig(coeff=0.1, **kwargs)
    with pytest.raises(ValueError, match="state of shape"):
        window_combine(
            sums_DE=torch.zeros(2, 3), counts_D=torch.zeros(2), past_X=torch.zeros(5), decay=0.5
        )


SCHEDULE = ["--train-iters", "6", "--lr-decay-iters", "6", *LAYOUTS["ep2_alltoall"]]
EDL_WINDOW = [
    "--moe-edl-coeff", "0.5", "--moe-edl-mock-domains", "3", "--moe-edl-window-decay", "0.8",
]  # fmt: skip
WINDOW = [*EDL_WINDOW, *SCHEDULE]


@pytest.mark.slow
def test_window_state_is_checkpointed_and_resumes_exactly(tmp_path):
    """Save at step 3, resume: steps 4-6 equal the uninterrupted run's (the window's state is in
    the checkpoint: resuming with an empty window would change step 4's EDL loss). A stock run
    loads the window checkpoint; a window run from a checkpoint without the state is refused in
    one line unless Megatron's --dist-ckpt-strictness log_unexpected is given."""
    reference = run_pretrain(2, [*TINY_MOE_GPT, *WINDOW])
    assert sorted(reference.iterations) == list(range(1, 7)), reference.describe()
    ckpt = tmp_path / "ckpt"
    save = ["--save", str(ckpt), "--save-interval", "3", "--exit-interval", "3"]
    first = run_pretrain(2, [*TINY_MOE_GPT, *WINDOW, *save])
    assert sorted(first.iterations) == [1, 2, 3], first.describe()
    load = ["--load", str(ckpt), "--no-load-rng"]  # no CUDA RNG state on CPU (docs/cpu-mode.md)
    resumed = run_pretrain(2, [*TINY_MOE_GPT, *WINDOW, *load])
    assert sorted(resumed.iterations) == [4, 5, 6], resumed.describe()
    for step in (4, 5, 6):
        got, ref = resumed.iterations[step], reference.iterations[step]
        assert got["grad norm"] == ref["grad norm"], (step, got, ref)
    for step in (4, 6):  # step 5: Megatron's log averages two iterations after a resume
        for name in ("lm loss", "edl_loss", "edl_min_segments"):
            got, ref = resumed.iterations[step][name], reference.iterations[step][name]
            assert got == pytest.approx(ref, rel=1e-6), (step, name, got, ref)
    assert reference.iterations[4]["edl_min_segments"] > reference.iterations[1]["edl_min_segments"]

    stock_flags = SCHEDULE  # no megatron-edl flag: stock router, stock data
    finetune = ["--load", str(ckpt), "--finetune", "--no-load-optim", "--no-load-rng"]
    stock = run_pretrain(2, [*TINY_MOE_GPT, *stock_flags, *finetune, "--train-iters", "1"])
    assert stock.returncode == 0 and 1 in stock.iterations, stock.describe()

    stock_ckpt = tmp_path / "stock"
    stock_save = ["--save", str(stock_ckpt), "--save-interval", "1", "--train-iters", "1"]
    stock = run_pretrain(2, [*TINY_MOE_GPT, *stock_flags, *stock_save])
    assert stock.returncode == 0, stock.describe()
    from_stock = [*TINY_MOE_GPT, *WINDOW, "--load", str(stock_ckpt), "--finetune", "--no-load-rng"]
    refused = run_pretrain(2, from_stock)
    assert refused.returncode != 0 and "--dist-ckpt-strictness log_unexpected" in refused.log
    assert not refused.iterations, refused.describe()
    loaded = run_pretrain(2, [*from_stock, "--dist-ckpt-strictness", "log_unexpected"])
    assert loaded.returncode == 0 and 6 in loaded.iterations, loaded.describe()
