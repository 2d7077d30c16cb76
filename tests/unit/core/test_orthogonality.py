"""Tests of ``megatron_edl.core.orthogonality``: the orthogonality loss and the grouping of
Megatron's expert-major rows by token.

Hand-computed values on tiny tensors, float64 gradchecks, the sharding additivity of the sums
(what makes one all-reduce enough), and the grouping by token and by column (flex dispatcher).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_edl.core.orthogonality import (
    group_rows_by_token,
    merge_columns,
    orthogonality_loss,
    orthogonality_loss_from_sums,
    orthogonality_per_token,
    orthogonality_sums,
    permuted_row_tokens,
    row_columns,
    token_slots,
)

EPS = 1e-6

# ---------------------------------------------------------------------------------------------
# Orthogonality: hand-computed values
# ---------------------------------------------------------------------------------------------


def test_orthogonal_outputs_give_zero() -> None:
    outputs_TKH = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    assert orthogonality_per_token(outputs_TKH=outputs_TKH, eps=EPS).tolist() == [0.0]


def test_parallel_outputs_give_the_expected_value() -> None:
    # x1 = (1, 0), x2 = (2, 0): <x1,x2> = 2, |x1|^2 = 1, |x2|^2 = 4
    # L = 2^2 / (4 + eps) + 2^2 / (1 + eps)  (-> 1 + 4 = 5 for eps -> 0)
    outputs_TKH = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]], dtype=torch.float64)
    (got,) = orthogonality_per_token(outputs_TKH=outputs_TKH, eps=EPS).tolist()
    assert got == pytest.approx(4 / (4 + EPS) + 4 / (1 + EPS), rel=1e-12)
    assert got == pytest.approx(5.0, rel=1e-5)


def test_three_outputs_and_the_mean_over_tokens() -> None:
    # Token 0: x1 = (1, 1), x2 = (1, 0), x3 = (0, 3):
    #   <x1,x2> = 1, <x1,x3> = 3, <x2,x3> = 0; |x1|^2 = 2, |x2|^2 = 1, |x3|^2 = 9
    #   L = 1/|x2|^2 + 9/|x3|^2 (i = 1) + 1/|x1|^2 (i = 2) + 9/|x1|^2 (i = 3) = 1 + 1 + .5 + 4.5
    # Token 1: parallel (1, 0) and (-1, 0), third slot empty (a dropped pair): 1 + 1 = 2
    outputs_TKH = torch.tensor(
        [[[1.0, 1.0], [1.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]]],
        dtype=torch.float64,
    )
    valid_TK = torch.tensor([[True, True, True], [True, True, False]])
    loss_T = orthogonality_per_token(outputs_TKH=outputs_TKH, eps=1e-12, valid_TK=valid_TK)
    torch.testing.assert_close(loss_T, torch.tensor([7.0, 2.0], dtype=torch.float64))
    loss = orthogonality_loss(outputs_TKH=outputs_TKH, eps=1e-12, valid_TK=valid_TK)
    assert loss.item() == pytest.approx(4.5, rel=1e-9)


def test_loss_is_scale_covariant_and_not_symmetric_in_the_denominator() -> None:
    """Scaling every output by a scales L by a^2; eps only matters near zero vectors."""
    gen = torch.Generator().manual_seed(0)
    x_TKH = torch.randn(5, 3, 7, generator=gen, dtype=torch.float64)
    base = orthogonality_per_token(outputs_TKH=x_TKH, eps=1e-12)
    scaled = orthogonality_per_token(outputs_TKH=3.0 * x_TKH, eps=1e-12)
    torch.testing.assert_close(scaled, 9.0 * base)


def test_zero_vectors_and_empty_input_are_safe() -> None:
    x_TKH = torch.zeros(2, 2, 3, requires_grad=True)
    loss = orthogonality_loss(outputs_TKH=x_TKH, eps=EPS)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x_TKH.grad).all()
    empty = orthogonality_sums(outputs_TKH=torch.zeros(0, 2, 3), eps=EPS)
    assert orthogonality_loss_from_sums(*empty).item() == 0.0


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        orthogonality_per_token(outputs_TKH=torch.zeros(1, 2, 3), eps=0.0)
    with pytest.raises(ValueError, match=r"\(T, K, H\)"):
        orthogonality_per_token(outputs_TKH=torch.zeros(2, 3), eps=EPS)


def test_orthogonality_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    x_TKH = torch.randn(3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    valid_TK = torch.tensor([[True, True, True], [True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(
        lambda x: orthogonality_loss(outputs_TKH=x, eps=1e-3, valid_TK=valid_TK), (x_TKH,)
    )


# ---------------------------------------------------------------------------------------------
# Sharding: the sums are additive, so one all-reduce of them gives the single-process loss
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(num_tokens=st.integers(1, 10), cut=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_orthogonality_sums_of_shards_give_the_whole_loss(num_tokens, cut, seed):
    gen = torch.Generator().manual_seed(seed)
    x_TKH = torch.randn(num_tokens, 3, 4, generator=gen, dtype=torch.float64)
    split = int(cut * num_tokens)
    shards = [
        orthogonality_sums(outputs_TKH=x_TKH[sl], eps=EPS)
        for sl in (slice(0, split), slice(split, None))
    ]
    summed = [a + b for a, b in zip(*shards, strict=True)]
    whole = orthogonality_loss(outputs_TKH=x_TKH, eps=EPS)
    assert orthogonality_loss_from_sums(*summed).item() == pytest.approx(whole.item(), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Grouping Megatron's expert-major rows by token
# ---------------------------------------------------------------------------------------------

# Token 0 -> experts {0, 2}, token 1 -> {0, 1}, token 2 -> {1, 2}
ROUTING_MAP_TE = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)


def test_rows_are_expert_major_like_megatrons_permute() -> None:
    from megatron.core.transformer.moe.moe_utils import permute

    token_R, expert_R = permuted_row_tokens(routing_map_TE=ROUTING_MAP_TE)
    assert token_R.tolist() == [0, 1, 1, 2, 0, 2]
    assert expert_R.tolist() == [0, 0, 1, 1, 2, 2]
    gen = torch.Generator().manual_seed(3)
    routing_map_TE = torch.rand(9, 5, generator=gen) > 0.5
    hidden_TH = torch.randn(9, 4, generator=gen)
    permuted_RH, _, sorted_indices_R, _, _ = permute(
        hidden_TH, routing_map_TE, num_out_tokens=int(routing_map_TE.sum())
    )
    token_R, _ = permuted_row_tokens(routing_map_TE=routing_map_TE)
    assert torch.equal(token_R, sorted_indices_R)
    assert torch.equal(permuted_RH, hidden_TH[token_R])


def test_token_slots() -> None:
    slot_TE = token_slots(selected_TE=ROUTING_MAP_TE)
    assert [[slot_TE[t, e].item() for e in range(3) if ROUTING_MAP_TE[t, e]] for t in range(3)] == [
        [0, 1],
        [0, 1],
        [0, 1],
    ]


def _outputs_by_pair() -> dict[tuple[int, int], torch.Tensor]:
    """(token, expert) -> raw output, chosen so that each token's two outputs are orthogonal
    while the outputs of one expert for different tokens are parallel."""
    return {
        (0, 0): torch.tensor([1.0, 0.0]),
        (0, 2): torch.tensor([0.0, 2.0]),
        (1, 0): torch.tensor([3.0, 0.0]),
        (1, 1): torch.tensor([0.0, 1.0]),
        (2, 1): torch.tensor([0.0, 4.0]),
        (2, 2): torch.tensor([5.0, 0.0]),
    }


def test_grouping_by_token_not_by_expert() -> None:
    """The rows of one token are scattered in the expert-major layout: grouping consecutive rows
    (which belong to one expert) gives a different, wrong loss."""
    pairs = _outputs_by_pair()
    token_R, expert_R = permuted_row_tokens(routing_map_TE=ROUTING_MAP_TE)
    rows_RH = torch.stack(
        [pairs[(t, e)] for t, e in zip(token_R.tolist(), expert_R.tolist(), strict=True)]
    )
    slot_R = token_slots(selected_TE=ROUTING_MAP_TE)[token_R, expert_R]
    outputs_TKH, valid_TK = group_rows_by_token(
        rows_RH=rows_RH, token_R=token_R, slot_R=slot_R, num_tokens=3, num_slots=2
    )
    assert valid_TK.all()
    expected_TKH = torch.stack(
        [torch.stack([pairs[(t, e)] for e in range(3) if ROUTING_MAP_TE[t, e]]) for t in range(3)]
    )
    assert torch.equal(outputs_TKH, expected_TKH)
    by_token = orthogonality_loss(outputs_TKH=outputs_TKH, eps=EPS)
    by_expert = orthogonality_loss(outputs_TKH=rows_RH.view(3, 2, 2), eps=EPS)
    assert by_token.item() == 0.0  # each token's outputs are orthogonal
    assert by_expert.item() > 1.0  # one expert's outputs are parallel


def test_grouping_skips_invalid_rows_and_is_differentiable() -> None:
    rows_RH = torch.arange(12.0).view(6, 2).requires_grad_(True)
    token_R = torch.tensor([0, 1, 1, 2, 0, 2])
    slot_R = torch.tensor([0, 0, 1, 0, 1, 1])
    valid_R = torch.tensor([True, True, True, False, True, True])
    outputs_TKH, valid_TK = group_rows_by_token(
        rows_RH=rows_RH, token_R=token_R, slot_R=slot_R, num_tokens=3, num_slots=2,
        valid_R=valid_R,
    )  # fmt: skip
    assert valid_TK.tolist() == [[True, True], [True, True], [False, True]]
    assert outputs_TKH[2, 0].tolist() == [0.0, 0.0]
    (outputs_TKH * torch.arange(1.0, 13.0).view(3, 2, 2)).sum().backward()
    assert rows_RH.grad[3].tolist() == [0.0, 0.0]
    assert rows_RH.grad[0].tolist() == [1.0, 2.0]  # row 0 -> token 0, slot 0
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 2\)"):
        group_rows_by_token(
            rows_RH=rows_RH, token_R=token_R, slot_R=slot_R + 1, num_tokens=3, num_slots=2
        )


# ---------------------------------------------------------------------------------------------
# Columns of an expanded expert list (flex dispatcher)
# ---------------------------------------------------------------------------------------------


def test_row_columns_finds_the_column_of_each_row() -> None:
    # Received tokens' lists (local expert ids, -1 elsewhere), as DeepEP hands them over.
    indices_TC = torch.tensor([[0, -1, 1, -1], [-1, 1, -1, -1], [1, 0, -1, -1]])
    token_R = torch.tensor([0, 2, 0, 1, 2, 1])
    expert_R = torch.tensor([0, 0, 1, 1, 1, 0])  # the last: a padding row, named by no column
    column_R, found_R = row_columns(indices_TC=indices_TC, token_R=token_R, expert_R=expert_R)
    assert found_R.tolist() == [True, True, True, True, True, False]
    assert column_R[found_R].tolist() == [0, 1, 2, 1, 0]
    with pytest.raises(ValueError, match="indices_TC must have shape"):
        row_columns(indices_TC=indices_TC[0], token_R=token_R, expert_R=expert_R)


def test_merge_columns_sums_the_copies_of_one_expert() -> None:
    # Token 0: columns hold experts 5, 5, 2, 2 (two expert-TP copies each) -> slots (5, 2).
    # Token 1: 3, 7, 3, and an invalid column (-1) -> slots (3, 7); the invalid one is dropped.
    # Token 2: expert 4 twice, then two columns with p = 0 (invalid) -> slot 0 only.
    expert_TC = torch.tensor([[5, 5, 2, 2], [3, 7, 3, -1], [4, 4, 1, 6]])
    valid_TC = torch.tensor([[True] * 4, [True, True, True, False], [True, True, False, False]])
    columns_TCH = torch.arange(1.0, 25.0).view(3, 4, 2).requires_grad_(True)
    outputs_TKH, valid_TK = merge_columns(
        columns_TCH=columns_TCH, expert_TC=expert_TC, valid_TC=valid_TC, num_slots=2
    )
    assert valid_TK.tolist() == [[True, True], [True, True], [True, False]]
    c = columns_TCH.detach()
    expected_TKH = torch.stack(
        [
            torch.stack([c[0, 0] + c[0, 1], c[0, 2] + c[0, 3]]),
            torch.stack([c[1, 0] + c[1, 2], c[1, 1]]),
            torch.stack([c[2, 0] + c[2, 1], torch.zeros(2)]),
        ]
    )
    assert torch.equal(outputs_TKH, expected_TKH)
    outputs_TKH.sum().backward()
    assert columns_TCH.grad[:, :, 0].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="3 distinct experts, more than num_slots = 2"):
        merge_columns(
            columns_TCH=columns_TCH,
            expert_TC=torch.tensor([[5, 6, 7, 7]] * 3),
            valid_TC=torch.ones(3, 4, dtype=torch.bool),
            num_slots=2,
        )


def test_no_megatron_or_distributed_import() -> None:
    import ast
    import inspect

    import megatron_edl.core.orthogonality as module

    tree = ast.parse(inspect.getsource(module))
    names = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ] + [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not any(n.startswith(("megatron", "torch.distributed")) for n in names), names
