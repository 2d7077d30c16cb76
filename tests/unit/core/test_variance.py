"""Tests of ``megatron_edl.core.variance``: the variance loss.

Hand-computed values on tiny tensors, float64 gradchecks and the sharding additivity of the sums
(what makes one all-reduce enough).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_edl.core.variance import variance_loss, variance_loss_from_sums, variance_sums

# ---------------------------------------------------------------------------------------------
# Variance: hand-computed values
# ---------------------------------------------------------------------------------------------

SCORES_TE = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3]], dtype=torch.float64)


def test_variance_across_tokens_hand_computed() -> None:
    # Columns: (0.6, 0) var .09; (0.4, 0.7) var .0225; (0, 0.3) var .0225 -> -mean = -.045
    loss = variance_loss(scores_TE=SCORES_TE, axis="tokens")
    assert loss.item() == pytest.approx(-0.045, rel=1e-12)


def test_variance_across_experts_hand_computed() -> None:
    # (0.5, 0.3, 0.2): mean 1/3, var = ((1/6)^2 + (1/30)^2 + (2/15)^2) / 3 = 7/450; uniform: 0
    probs_TE = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    loss = variance_loss(scores_TE=probs_TE, axis="experts")
    assert loss.item() == pytest.approx(-(7 / 450) / 2, rel=1e-12)


def test_the_two_axes_differ() -> None:
    tokens = variance_loss(scores_TE=SCORES_TE, axis="tokens").item()
    experts = variance_loss(scores_TE=SCORES_TE, axis="experts").item()
    assert abs(tokens - experts) > 1e-3


def test_masked_tokens_do_not_count() -> None:
    padded_TE = torch.cat([SCORES_TE, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
    valid_T = torch.tensor([True, True, False])
    for axis in ("tokens", "experts"):
        masked = variance_loss(scores_TE=padded_TE, axis=axis, valid_T=valid_T)
        plain = variance_loss(scores_TE=SCORES_TE, axis=axis)
        assert masked.item() == pytest.approx(plain.item(), rel=1e-12)
        unmasked = variance_loss(scores_TE=padded_TE, axis=axis)
        assert abs(unmasked.item() - plain.item()) > 1e-3


def test_no_counted_token_gives_zero_in_the_graph() -> None:
    scores_TE = SCORES_TE.clone().requires_grad_(True)
    for axis in ("tokens", "experts"):
        loss = variance_loss(scores_TE=scores_TE, axis=axis, valid_T=torch.zeros(2, dtype=bool))
        loss.backward()
        assert loss.item() == 0.0 and scores_TE.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("axis", ["tokens", "experts"])
def test_variance_gradcheck_float64(axis) -> None:
    gen = torch.Generator().manual_seed(2)
    scores_TE = torch.rand(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    valid_T = torch.tensor([True, True, False, True, True])
    assert torch.autograd.gradcheck(
        lambda s: variance_loss(scores_TE=s, axis=axis, valid_T=valid_T), (scores_TE,)
    )


def test_a_bad_axis_names_the_value() -> None:
    with pytest.raises(ValueError, match="axis must be one of .*, got 'rows'"):
        variance_loss(scores_TE=torch.zeros(2, 3), axis="rows")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Sharding: the sums are additive, so one all-reduce of them gives the single-process loss
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 12),
    num_experts=st.integers(2, 6),
    cut=st.floats(0.0, 1.0),
    axis=st.sampled_from(["tokens", "experts"]),
    seed=st.integers(0, 10_000),
)
def test_variance_sums_of_shards_give_the_whole_loss(num_tokens, num_experts, cut, axis, seed):
    gen = torch.Generator().manual_seed(seed)
    scores_TE = torch.rand(num_tokens, num_experts, generator=gen, dtype=torch.float64)
    valid_T = torch.rand(num_tokens, generator=gen) > 0.2
    split = int(cut * num_tokens)
    shards = [
        variance_sums(scores_TE=scores_TE[sl], axis=axis, valid_T=valid_T[sl])
        for sl in (slice(0, split), slice(split, None))
    ]
    summed = [a + b for a, b in zip(*shards, strict=True)]
    whole = variance_loss(scores_TE=scores_TE, axis=axis, valid_T=valid_T)
    assert variance_loss_from_sums(*summed, axis=axis).item() == pytest.approx(
        whole.item(), rel=1e-9, abs=1e-12
    )


def test_no_megatron_or_distributed_import() -> None:
    import ast
    import inspect

    import megatron_edl.core.variance as module

    tree = ast.parse(inspect.getsource(module))
    names = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ] + [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not any(n.startswith(("megatron", "torch.distributed")) for n in names), names
