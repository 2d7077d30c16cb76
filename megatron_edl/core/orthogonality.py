"""The orthogonality loss of *Advancing Expert Specialization for Better MoE* (arXiv
2505.22323), and the grouping of Megatron's permuted expert rows by token that it needs.

The loss on expert outputs (experts that process tokens differently; docs/method.md section 3),
pure math for one MoE layer: it never communicates and imports neither ``megatron`` nor
``torch.distributed``. What crosses ranks is a *sum over tokens*::

    permuted expert outputs rows_RH --group_rows_by_token--> outputs_TKH
        --orthogonality_sums--> (loss_sum, count) --all-reduce-->
        --orthogonality_loss_from_sums--> L_o

Definition (w_t in {0, 1} marks the tokens that count, N = Σ_t w_t; x_t1..x_tk the raw outputs,
before gate weighting, of token t's k selected experts):

    L_t = Σ_i Σ_{j≠i} ⟨x_ti, x_tj⟩² / (⟨x_tj, x_tj⟩ + ε),   L_o = (1/N) Σ_t w_t L_t

with N = 0 the loss is 0 and still part of the graph.

Grouping by token: Megatron's token permutation lays the rows of the expert computation out
expert-major (all tokens of expert 0 in ascending token order, then expert 1, ...). A token's k
rows are therefore scattered, not consecutive: ``permuted_row_tokens`` and ``token_slots`` give
every row its token and its slot (the rank of the expert among the token's selected experts), and
``group_rows_by_token`` gathers the k rows of each token into ``outputs_TKH``.

Columns (the ``flex`` dispatcher): there a token carries a list of C = tp * k expanded expert
ids (every expert once per expert-TP rank, -1 for a dropped pair), and each list entry (column)
comes back to the token as its own row. ``row_columns`` finds the column of a permuted row in
its token's list; ``merge_columns`` sums the columns that hold the same expert (expert-TP partial
outputs) into one slot per expert.

Precision: the math runs in at least fp32 (fp64 stays fp64, for ``gradcheck``).

Shape legend (suffixes of tensor names):
    T  tokens (of the local shard)
    K  slots: a token's selected experts (k = top-k)
    E  routed experts
    R  rows of the permuted expert computation (one per selected (token, expert) pair)
    C  columns of a token's expanded expert list (flex dispatcher: tp * k)
    H  hidden size
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "group_rows_by_token",
    "merge_columns",
    "orthogonality_loss",
    "orthogonality_loss_from_sums",
    "orthogonality_per_token",
    "orthogonality_sums",
    "permuted_row_tokens",
    "row_columns",
    "token_slots",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp32, or fp64 when the input is fp64."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------
# Orthogonality loss
# ---------------------------------------------------------------------------------------------


def orthogonality_per_token(
    *, outputs_TKH: Tensor, eps: float, valid_TK: Tensor | None = None
) -> Tensor:
    """L_t = Σ_i Σ_{j≠i} ⟨x_ti, x_tj⟩² / (⟨x_tj, x_tj⟩ + ε) for every token.

    Each term is the squared length of x_i's projection onto x_j times |x_j|² / (|x_j|² + ε),
    i.e. |x_i|² cos²(x_i, x_j) for ε → 0: zero for orthogonal outputs, and it does not
    shrink when the outputs are merely scaled down.

    Args:
        outputs_TKH: Raw expert outputs of each token's k selected experts, shape
            ``(T, K, H)``. May require grad.
        eps: ε > 0 in the denominator.
        valid_TK: Optional bool mask of the slots that hold an output (a dropped token has fewer
            than k); invalid slots take no part.

    Returns:
        ``loss_T``, shape ``(T,)``, fp32 (fp64 for fp64 outputs).

    Raises:
        ValueError: On ``eps <= 0`` or bad shapes.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if outputs_TKH.ndim != 3:
        raise ValueError(f"outputs_TKH must have shape (T, K, H), got {tuple(outputs_TKH.shape)}")
    x_TKH = outputs_TKH.to(_compute_dtype(outputs_TKH.dtype))
    num_tokens, num_slots, _ = x_TKH.shape
    if valid_TK is not None:
        if valid_TK.shape != (num_tokens, num_slots):
            raise ValueError(
                f"valid_TK must have shape ({num_tokens}, {num_slots}), got {tuple(valid_TK.shape)}"
            )
        x_TKH = x_TKH * valid_TK[..., None].to(x_TKH.dtype)
    gram_TKK = x_TKH @ x_TKH.transpose(1, 2)  # [t, i, j] = <x_ti, x_tj>
    norms_TK = torch.diagonal(gram_TKK, dim1=1, dim2=2)  # [t, j] = <x_tj, x_tj>
    off_diagonal_KK = ~torch.eye(num_slots, dtype=torch.bool, device=x_TKH.device)
    terms_TKK = gram_TKK.square() / (norms_TK[:, None, :] + eps)
    return (terms_TKK * off_diagonal_KK).sum(dim=(1, 2))


def orthogonality_sums(
    *, outputs_TKH: Tensor, eps: float, valid_TK: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """This shard's ``(Σ_t L_t, N)``; all-reduce (SUM) them across shards.

    Every token of ``outputs_TKH`` counts in N, also one with fewer than two outputs (its L_t is
    0).

    Args:
        outputs_TKH: Raw expert outputs, shape ``(T, K, H)``.
        eps: ε > 0.
        valid_TK: Optional bool mask of the slots that hold an output.

    Returns:
        ``(loss_sum, count)``; ``count`` carries no gradient.
    """
    loss_T = orthogonality_per_token(outputs_TKH=outputs_TKH, eps=eps, valid_TK=valid_TK)
    return loss_T.sum(), loss_T.new_tensor(float(loss_T.shape[0]))


def orthogonality_loss_from_sums(loss_sum: Tensor, count: Tensor) -> Tensor:
    """L_o = (Σ_t L_t) / N from the (reduced) sums; 0 when N = 0.

    Args:
        loss_sum: Σ_t L_t.
        count: N.

    Returns:
        The scalar loss.
    """
    return loss_sum / count.detach().clamp_min(1.0)


def orthogonality_loss(
    *, outputs_TKH: Tensor, eps: float, valid_TK: Tensor | None = None
) -> Tensor:
    """L_o of one shard (or one process): the mean of ``orthogonality_per_token``.

    Args:
        outputs_TKH: Raw expert outputs, shape ``(T, K, H)``.
        eps: ε > 0.
        valid_TK: Optional bool mask of the slots that hold an output.

    Returns:
        The scalar loss.
    """
    sums = orthogonality_sums(outputs_TKH=outputs_TKH, eps=eps, valid_TK=valid_TK)
    return orthogonality_loss_from_sums(*sums)


# ---------------------------------------------------------------------------------------------
# Grouping the permuted rows by token
# ---------------------------------------------------------------------------------------------


def permuted_row_tokens(*, routing_map_TE: Tensor) -> tuple[Tensor, Tensor]:
    """Token and expert of every row of the expert-major permutation of ``routing_map_TE``.

    The permutation (Megatron's ``permute``, fused or not) orders the selected (token, expert)
    pairs by expert, then by token: row r holds pair ``(token_R[r], expert_R[r])``.

    Args:
        routing_map_TE: Bool routing map, shape ``(T, E)``.

    Returns:
        ``(token_R, expert_R)``, int64, one entry per ``True`` of the map.
    """
    if routing_map_TE.ndim != 2:
        raise ValueError(
            f"routing_map_TE must have shape (T, E), got {tuple(routing_map_TE.shape)}"
        )
    expert_R, token_R = routing_map_TE.bool().T.nonzero(as_tuple=True)
    return token_R, expert_R


def token_slots(*, selected_TE: Tensor) -> Tensor:
    """Slot of every selected (token, expert) pair: the expert's rank among the token's selected.

    ``slot_TE[t, e]`` = number of selected experts of token t with an index below e. Entries
    where ``selected_TE`` is ``False`` are meaningless.

    Args:
        selected_TE: Bool map of the pairs that hold an output, shape ``(T, E)``.

    Returns:
        ``slot_TE``, int64, shape ``(T, E)``.
    """
    return selected_TE.long().cumsum(dim=1) - 1


def group_rows_by_token(
    *,
    rows_RH: Tensor,
    token_R: Tensor,
    slot_R: Tensor,
    num_tokens: int,
    num_slots: int,
    valid_R: Tensor | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Gather permuted rows into one ``(K, H)`` block per token: ``outputs[t, s] = rows[r]``.

    Differentiable with respect to ``rows_RH``. Each valid (token, slot) pair must occur once.
    No host sync: skipped rows are added as zeros (not cut out by a boolean index, which would
    wait for the device to count them).

    Args:
        rows_RH: Rows, shape ``(R, H)``.
        token_R: Token of each row, int64 in ``[0, num_tokens)``.
        slot_R: Slot of each row, int64 in ``[0, num_slots)`` where valid.
        num_tokens: T.
        num_slots: K.
        valid_R: Optional bool mask of the rows to place (others, e.g. padding, are skipped).
        validate: Check the slot range (a device-to-host sync); the training path, whose slots
            come from ``token_slots``, skips it.

    Returns:
        ``(outputs_TKH, valid_TK)``: zeros where no row was placed, and the mask of placed slots.

    Raises:
        ValueError: On a valid slot outside ``[0, num_slots)`` or mismatched lengths.
    """
    if not (rows_RH.shape[0] == token_R.shape[0] == slot_R.shape[0]):
        raise ValueError(
            f"rows_RH, token_R and slot_R must have one entry per row, got "
            f"{rows_RH.shape[0]}, {token_R.shape[0]} and {slot_R.shape[0]}"
        )
    if validate:
        placed_R = slot_R if valid_R is None else slot_R[valid_R]
        if placed_R.numel() and (int(placed_R.min()) < 0 or int(placed_R.max()) >= num_slots):
            raise ValueError(
                f"slots must lie in [0, {num_slots}), got "
                f"[{int(placed_R.min())}, {int(placed_R.max())}]"
            )
    if valid_R is None:
        outputs_TKH = rows_RH.new_zeros(num_tokens, num_slots, rows_RH.shape[1])
        outputs_TKH = outputs_TKH.index_put((token_R, slot_R), rows_RH)
        valid_TK = torch.zeros(num_tokens, num_slots, dtype=torch.bool, device=rows_RH.device)
        valid_TK[token_R, slot_R] = True
        return outputs_TKH, valid_TK
    # A skipped row adds an exact zero to slot 0 of its token (where(), so a NaN in it does not
    # leak in); each valid slot receives one row plus zeros: the same values, in any order.
    slot_R = torch.where(valid_R, slot_R, 0)
    rows_RH = torch.where(valid_R[:, None], rows_RH, 0)
    return _place_rows(rows_RH, token_R, slot_R, valid_R, num_tokens, num_slots)


def _place_rows(
    rows_RH: Tensor,
    token_R: Tensor,
    slot_R: Tensor,
    valid_R: Tensor,
    num_tokens: int,
    num_slots: int,
) -> tuple[Tensor, Tensor]:
    """``outputs[t, s] += rows[r]`` and ``valid[t, s] |= valid[r]`` (skipped rows hold zeros)."""
    outputs_TKH = rows_RH.new_zeros(num_tokens, num_slots, rows_RH.shape[1])
    outputs_TKH = outputs_TKH.index_put((token_R, slot_R), rows_RH, accumulate=True)
    placed_TK = torch.zeros(num_tokens, num_slots, dtype=torch.int32, device=rows_RH.device)
    placed_TK.index_put_((token_R, slot_R), valid_R.to(torch.int32), accumulate=True)
    return outputs_TKH, placed_TK > 0


# ---------------------------------------------------------------------------------------------
# Columns of an expanded expert list (flex dispatcher)
# ---------------------------------------------------------------------------------------------


def row_columns(*, indices_TC: Tensor, token_R: Tensor, expert_R: Tensor) -> tuple[Tensor, Tensor]:
    """Column of every row in its token's expert list: ``indices_TC[token_R[r], column_R[r]] ==
    expert_R[r]``.

    An expert occurs at most once in a token's list (``-1`` marks an empty column), so the column
    is unique when it exists.

    Args:
        indices_TC: Expert id of every column of every token, shape ``(T, C)``; ``-1``: none.
        token_R: Token of each row, int64.
        expert_R: Expert of each row, int64 (same numbering as ``indices_TC``).

    Returns:
        ``(column_R, found_R)``: the column (0 where there is none) and whether there is one (a
        padding row that no column names has none).
    """
    if indices_TC.ndim != 2:
        raise ValueError(f"indices_TC must have shape (T, C), got {tuple(indices_TC.shape)}")
    if token_R.shape != expert_R.shape:
        raise ValueError(
            f"token_R and expert_R must have the same shape, got {tuple(token_R.shape)} and "
            f"{tuple(expert_R.shape)}"
        )
    match_RC = indices_TC[token_R] == expert_R[:, None]
    return match_RC.long().argmax(dim=1), match_RC.any(dim=1)


def merge_columns(
    *,
    columns_TCH: Tensor,
    expert_TC: Tensor,
    valid_TC: Tensor,
    num_slots: int,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Sum the valid columns that hold the same expert into one slot per expert.

    ``outputs[t, s] = Σ_c columns[t, c]`` over the valid columns c of token t whose expert is the
    token's s-th distinct expert (in column order of first occurrence). Differentiable with
    respect to ``columns_TCH``. No host sync (without ``validate``): invalid columns are added as
    zeros, not cut out by a boolean index.

    Args:
        columns_TCH: One row per column, shape ``(T, C, H)``.
        expert_TC: Expert of every column, shape ``(T, C)`` (any value where invalid).
        valid_TC: Bool mask of the columns that hold an output, shape ``(T, C)``.
        num_slots: K, at least the number of distinct valid experts of every token.
        validate: Check that no token has more than K distinct experts (a device-to-host sync).

    Returns:
        ``(outputs_TKH, valid_TK)``: zeros in empty slots, and the mask of filled slots.

    Raises:
        ValueError: On bad shapes, or (``validate``) a token with more than K distinct experts.
    """
    if columns_TCH.ndim != 3 or expert_TC.shape != columns_TCH.shape[:2]:
        raise ValueError(
            f"columns_TCH must have shape (T, C, H) and expert_TC (T, C), got "
            f"{tuple(columns_TCH.shape)} and {tuple(expert_TC.shape)}"
        )
    if valid_TC.shape != expert_TC.shape:
        raise ValueError(
            f"valid_TC must have shape {tuple(expert_TC.shape)}, got {tuple(valid_TC.shape)}"
        )
    num_tokens, num_columns, hidden = columns_TCH.shape
    valid_TC = valid_TC.bool()
    same_TCC = (expert_TC[:, :, None] == expert_TC[:, None, :]) & valid_TC[:, :, None]
    same_TCC = same_TCC & valid_TC[:, None, :]  # [t, c, c']: columns c and c' hold one expert
    earlier_CC = torch.ones(num_columns, num_columns, dtype=torch.bool, device=expert_TC.device)
    earlier_CC = earlier_CC.tril(diagonal=-1)  # [c, c']: c' < c
    first_TC = valid_TC & ~(same_TCC & earlier_CC).any(dim=2)  # first column of its expert
    slot_of_first_TC = first_TC.long().cumsum(dim=1) - 1
    first_column_TC = same_TCC.long().argmax(dim=2)  # the first c' holding c's expert
    slot_TC = slot_of_first_TC.gather(1, first_column_TC)
    if validate and valid_TC.any() and int(slot_TC[valid_TC].max()) >= num_slots:
        raise ValueError(
            f"a token has {int(slot_TC[valid_TC].max()) + 1} distinct experts, more than "
            f"num_slots = {num_slots}"
        )
    token_TC = torch.arange(num_tokens, device=expert_TC.device)[:, None].expand_as(slot_TC)
    slot_TC = torch.where(valid_TC, slot_TC, 0)  # an invalid column adds zeros to slot 0
    columns_TCH = torch.where(valid_TC[:, :, None], columns_TCH, 0)
    return _place_rows(
        columns_TCH.reshape(num_tokens * num_columns, hidden),
        token_TC.reshape(-1),
        slot_TC.reshape(-1),
        valid_TC.reshape(-1),
        num_tokens,
        num_slots,
    )
