"""A statistics window across micro-batches: the current (A, n) plus a decayed, detached past.

With the reduced per-domain statistics S_m = (A_m, n_m) of micro-batch m (after the all-reduce,
so identical on every rank of the scope's group) and the decay λ ∈ [0, 1):

    H_0 = 0,        H_{m+1} = λ · (H_m + stopgrad(S_m))
    loss of m on    (A_m + H_m^A,  n_m + H_m^n)

so micro-batch m - k enters with weight λ^k (k ≥ 1), without gradient; the domain means
p̄_j = A_j / n_j become means over about 1 / (1 - λ) micro-batches of segments while the
gradient stays the current micro-batch's. λ = 0 is the plain per-micro-batch statistics.
Micro-batches, not optimizer steps: the window spans a fixed number of segments whatever the
gradient accumulation. The state is one packed vector ``[D·E + D]`` (A row-major, then n), the
layout of the all-reduce (:mod:`megatron_edl.distributed`), so a router keeps it in one buffer.

Shape legend: D domains, E experts, X = D·E + D packed statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MIN_SEQUENCES_PER_DOMAIN", "sequences_per_domain", "window_combine"]

MIN_SEQUENCES_PER_DOMAIN = 4
"""Fewer sequences per domain than this in the statistics of one loss evaluation, and p̄_j is the
routing of a few documents: the launcher warns."""


def sequences_per_domain(*, sequences: int, num_domains: int, decay: float) -> float:
    """Sequences per domain in the statistics of one loss evaluation, for balanced domains.

        sequences / (D · (1 - λ))

    with ``sequences`` the sequences one micro-batch step contributes (micro-batch size times
    the data-parallel size for the global scope; times the micro-batches of a global batch with
    accumulation) and 1 / (1 - λ) the window's length in micro-batches. Each sequence holds at
    least one segment, so this is a lower bound on segments per domain when every domain is as
    frequent as the others.

    Args:
        sequences: Sequences of one micro-batch step in the statistics.
        num_domains: D.
        decay: λ (0 without the window).

    Returns:
        The estimate.
    """
    return sequences / (num_domains * (1.0 - decay))


def window_combine(
    *, sums_DE: Tensor, counts_D: Tensor, past_X: Tensor, decay: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The statistics micro-batch m's loss uses, and the next state (module docstring).

    Args:
        sums_DE: A_m, reduced, shape ``(D, E)``; may require grad.
        counts_D: n_m, reduced, shape ``(D,)``.
        past_X: H_m, packed ``[D·E + D]``; not modified.
        decay: λ in [0, 1).

    Returns:
        ``(A_m + H_m^A, n_m + H_m^n, H_{m+1})``; gradient flows to ``sums_DE`` only, and the
        new state is detached.

    Raises:
        ValueError: On a ``decay`` outside [0, 1) or a state of the wrong size.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"window decay must be in [0, 1), got {decay!r}")
    num_domains, num_experts = sums_DE.shape
    if past_X.shape != (num_domains * num_experts + num_domains,):
        raise ValueError(
            f"window state of shape {tuple(past_X.shape)} does not fit D={num_domains}, "
            f"E={num_experts} (expected ({num_domains * num_experts + num_domains},))"
        )
    past_DE = past_X[: num_domains * num_experts].view(num_domains, num_experts)
    past_D = past_X[num_domains * num_experts :]
    with torch.no_grad():
        now_X = torch.cat([sums_DE.detach().reshape(-1), counts_D.detach().reshape(-1)])
        next_X = decay * (past_X + now_X.to(past_X.dtype))
    return sums_DE + past_DE.to(sums_DE.dtype), counts_D + past_D.to(counts_D.dtype), next_X
