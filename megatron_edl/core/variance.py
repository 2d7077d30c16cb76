"""The variance loss of *Advancing Expert Specialization for Better MoE* (arXiv 2505.22323).

The loss on routing scores (more discriminative routing; docs/method.md section 3), pure math for
one MoE layer: it never communicates and imports neither ``megatron`` nor ``torch.distributed``.
What crosses ranks is a *sum over tokens*, returned by :func:`variance_sums` for the caller to
all-reduce (SUM) before :func:`variance_loss_from_sums` turns it into the loss::

    axis "tokens" (the paper's):
        scores_TE --variance_sums--> (sums_E, sumsq_E, count) --all-reduce--> L_v
    axis "experts" (the released code's):
        scores_TE --variance_sums--> (var_sum, count) --all-reduce--> L_v

Definitions (w_t in {0, 1} marks the tokens that count, N = Σ_t w_t):

    tokens axis:   Var_e = (1/N) Σ_t w_t s_te² − ((1/N) Σ_t w_t s_te)²,   L_v = −(1/E) Σ_e Var_e
    experts axis:  v_t = (1/E) Σ_e (p_te − p̄_t)²,  p̄_t = (1/E) Σ_e p_te,  L_v = −(1/N) Σ_t w_t v_t

where s_t is a token's post-top-k score row (zero outside its k experts) and p_t its dense
softmax over all E experts. Decisions (method.md leaves them open): population variances (1/N,
1/E, not 1/(N−1)), so a single token is well defined; the tokens-axis variances are averaged over
experts; with N = 0 the loss is 0 and still part of the graph. The one-pass form E[s²] − E[s]² of
the tokens axis is what makes a single all-reduce possible; scores lie in [0, 1], where fp32
loses nothing that matters to it. The math runs in at least fp32 (fp64 stays fp64, for
``gradcheck``).

Shape legend (suffixes of tensor names): T tokens (of the local shard), E routed experts.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["AXES", "VarianceAxis", "variance_loss", "variance_loss_from_sums", "variance_sums"]

# The values of megatron_edl.config.VarianceAxis, restated: core imports nothing of the package
# outside core (an import-linter contract, pyproject.toml).
VarianceAxis = Literal["tokens", "experts"]
AXES = ("tokens", "experts")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp32, or fp64 when the input is fp64."""
    return torch.promote_types(dtype, torch.float32)


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def _token_weights(valid_T: Tensor | None, num_tokens: int, like: Tensor) -> Tensor:
    """w_t as a float tensor of shape ``(T,)``: 1 for a counted token, 0 otherwise."""
    if valid_T is None:
        return torch.ones(num_tokens, dtype=like.dtype, device=like.device)
    if valid_T.shape != (num_tokens,):
        raise ValueError(f"valid_T must have shape ({num_tokens},), got {tuple(valid_T.shape)}")
    return valid_T.to(like.dtype)


# ---------------------------------------------------------------------------------------------
# Variance loss
# ---------------------------------------------------------------------------------------------


def variance_sums(
    *, scores_TE: Tensor, axis: VarianceAxis, valid_T: Tensor | None = None
) -> tuple[Tensor, ...]:
    """This shard's sums over tokens for the variance loss; all-reduce (SUM) them across shards.

    tokens axis:  ``(sums_E, sumsq_E, count)`` = (Σ_t w_t s_te, Σ_t w_t s_te², Σ_t w_t)
    experts axis: ``(var_sum, count)`` = (Σ_t w_t v_t, Σ_t w_t), v_t the variance across experts

    Args:
        scores_TE: Scores, shape ``(T, E)``: the post-top-k scores for ``tokens``, the dense
            softmax for ``experts``. May require grad.
        axis: ``"tokens"`` (the paper's) or ``"experts"`` (the released code's).
        valid_T: Optional bool mask of the tokens that count (``False``: padding).

    Returns:
        The sums, fp32 (fp64 for fp64 scores); ``count`` carries no gradient.

    Raises:
        ValueError: On an unknown axis or bad shapes.
    """
    _check_axis(axis)
    if scores_TE.ndim != 2:
        raise ValueError(f"scores_TE must have shape (T, E), got {tuple(scores_TE.shape)}")
    scores_TE = scores_TE.to(_compute_dtype(scores_TE.dtype))
    w_T = _token_weights(valid_T, scores_TE.shape[0], scores_TE)
    count = w_T.sum()
    if axis == "tokens":
        weighted_TE = scores_TE * w_T[:, None]
        return weighted_TE.sum(0), (weighted_TE * scores_TE).sum(0), count
    var_T = scores_TE.var(dim=1, correction=0)
    return (var_T * w_T).sum(), count


def variance_loss_from_sums(*sums: Tensor, axis: VarianceAxis) -> Tensor:
    """L_v from the (reduced) output of ``variance_sums``; 0 when no token counts.

    Args:
        *sums: ``(sums_E, sumsq_E, count)`` for ``tokens``, ``(var_sum, count)`` for
            ``experts``.
        axis: The axis ``variance_sums`` used.

    Returns:
        The scalar loss (negative or zero).

    Raises:
        ValueError: On an unknown axis or the wrong number of sums.
    """
    _check_axis(axis)
    expected = 3 if axis == "tokens" else 2
    if len(sums) != expected:
        raise ValueError(f"axis {axis!r} takes {expected} sums, got {len(sums)}")
    count = sums[-1].detach()
    safe_count = count.clamp_min(1.0)  # N = 0: every sum is 0, so is the loss
    if axis == "tokens":
        sums_E, sumsq_E, _ = sums
        mean_E = sums_E / safe_count
        var_E = sumsq_E / safe_count - mean_E * mean_E
        return -var_E.mean()
    var_sum, _ = sums
    return -var_sum / safe_count


def variance_loss(
    *, scores_TE: Tensor, axis: VarianceAxis = "tokens", valid_T: Tensor | None = None
) -> Tensor:
    """L_v of one shard (or one process): ``variance_sums`` then ``variance_loss_from_sums``.

    Args:
        scores_TE: Scores, shape ``(T, E)`` (post-top-k for ``tokens``, dense for ``experts``).
        axis: ``"tokens"`` (default, the paper's) or ``"experts"``.
        valid_T: Optional bool mask of the tokens that count.

    Returns:
        The scalar loss.
    """
    sums = variance_sums(scores_TE=scores_TE, axis=axis, valid_T=valid_T)
    return variance_loss_from_sums(*sums, axis=axis)
