"""Per-domain routing sums of one MoE layer and micro-batch: the telemetry's only computation.

For the local tokens t of one router call, with dense routing distribution p_t = softmax(z_t)
(fp32, over all E experts: :func:`megatron_edl.core.edl.routing_probs`), top-k selection
r_t ∈ {0, 1}^E (the router's ``routing_map``), domain d_t (-1: no label) and validity v_t
(0 for padding), the sums per domain j are

    counts[j, e]  = Σ_t v_t 1[d_t = j] r_t[e]          top-k assignments
    probs[j, e]   = Σ_t v_t 1[d_t = j] p_t[e]          dense probability mass
    entropy[j]    = Σ_t v_t 1[d_t = j] H(p_t)          routing entropy (nats)
    tokens[j]     = Σ_t v_t 1[d_t = j]

with an extra row j = D for the tokens without a label. They are packed in one ``(D+1, 2E+2)``
matrix (columns: counts | probs | entropy | tokens), so statistics of token shards (ranks),
micro-batches and iterations combine by adding matrices, and one SUM all-reduce of a stack of
them reduces every layer of a pipeline stage at once. :func:`unpack_routing_sums` turns such a
stack into the arrays of the dump format (:mod:`megatron_edl.analysis.routing_stats`).

Pure torch: no ``torch.distributed``, no ``megatron``.

Shape legend (suffixes): T tokens, E experts, D domains, X = D + 1 rows (domains, unlabelled),
F = 2E + 2 packed columns, L layers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megatron_edl.core import edl

__all__ = ["num_packed_columns", "routing_sums", "unpack_routing_sums"]


def num_packed_columns(num_experts: int) -> int:
    """F = 2E + 2, the width of the packed matrix."""
    return 2 * num_experts + 2


def routing_sums(
    *,
    logits_TE: Tensor,
    routing_map_TE: Tensor,
    domain_ids_T: Tensor,
    num_domains: int,
    padding_T: Tensor | None = None,
    score_function: str = "softmax",
) -> Tensor:
    """The packed per-domain routing sums of one router call (formulas: module docstring).

    Computed without autograd (the inputs are detached); one softmax, one ``index_add`` and no
    host synchronisation. Accumulate the results in float64 across micro-batches: within one call
    the fp32 counts are exact up to 2^24 tokens.

    Args:
        logits_TE: Router logits z_t of the local tokens, shape ``(T, E)``.
        routing_map_TE: Boolean top-k selection, shape ``(T, E)``.
        domain_ids_T: Integer domain ids in [-1, num_domains), shape ``(T,)``.
        num_domains: D.
        padding_T: Boolean, True for padding tokens (Megatron's ``padding_mask`` convention),
            which are left out; ``None``: no padding.
        score_function: Score function of p_t (:func:`megatron_edl.core.edl.routing_probs`).

    Returns:
        ``sums_XF``: fp32 (fp64 for fp64 logits), shape ``(D + 1, 2E + 2)``.

    Raises:
        ValueError: On inconsistent shapes.
    """
    if logits_TE.ndim != 2 or routing_map_TE.shape != logits_TE.shape:
        raise ValueError(
            f"logits_TE and routing_map_TE must have the same 2-D shape (T, E), got "
            f"{tuple(logits_TE.shape)} and {tuple(routing_map_TE.shape)}"
        )
    with torch.no_grad():
        logits_TE = logits_TE.detach()
        probs_TE = edl.routing_probs(logits_TE=logits_TE, score_function=score_function)
        if score_function == "softmax":
            # H(p) = -Σ p log p = logsumexp(z) - Σ p z: no logarithm of the T x E probabilities.
            z_TE = logits_TE.to(probs_TE.dtype)
            lse_T1 = torch.logsumexp(z_TE, dim=-1, keepdim=True)
            entropy_T1 = (lse_T1 - (probs_TE * z_TE).sum(dim=-1, keepdim=True)).clamp_min(0.0)
        else:  # H(p) = -Σ p log p, with 0 log 0 = 0
            entropy_T1 = -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1, keepdim=True)
        features_TF = torch.cat(
            [routing_map_TE.to(probs_TE.dtype), probs_TE, entropy_T1], dim=1
        )  # F - 1 columns; the token count comes from domain_sums' weights
        unlabelled = torch.full_like(domain_ids_T, num_domains)
        rows_T = torch.where(domain_ids_T >= 0, domain_ids_T, unlabelled)
        valid_T = None if padding_T is None else (~padding_T.reshape(-1)).to(probs_TE.dtype)
        sums_XF, tokens_X = edl.domain_sums(
            probs_TE=features_TF,
            domain_ids_T=rows_T,
            weights_T=valid_T,
            num_domains=num_domains + 1,
            validate=False,  # ids are validated once, in the data pipeline
        )
        return torch.cat([sums_XF, tokens_X[:, None]], dim=1)


def unpack_routing_sums(sums_LXF: np.ndarray, num_experts: int) -> dict[str, np.ndarray]:
    """Split a stack of packed sums into the arrays of the dump format.

    Args:
        sums_LXF: Packed sums of L layers, shape ``(L, D + 1, 2E + 2)``.
        num_experts: E.

    Returns:
        ``topk_counts_LDE``, ``prob_sums_LDE``, ``tokens_LD``, ``entropy_sums_LD`` and the
        ``unlabelled_*`` arrays (float64), as :class:`~megatron_edl.analysis.routing_stats.
        RoutingStats` takes them.

    Raises:
        ValueError: If the shape does not match ``num_experts``.
    """
    sums_LXF = np.asarray(sums_LXF, dtype=np.float64)
    if sums_LXF.ndim != 3 or sums_LXF.shape[2] != num_packed_columns(num_experts):
        raise ValueError(
            f"packed sums must have shape (L, D+1, {num_packed_columns(num_experts)}) for "
            f"{num_experts} experts, got {sums_LXF.shape}"
        )
    e = num_experts
    counts, probs = sums_LXF[..., :e], sums_LXF[..., e : 2 * e]
    entropy, tokens = sums_LXF[..., 2 * e], sums_LXF[..., 2 * e + 1]
    return {
        "topk_counts_LDE": counts[:, :-1],
        "prob_sums_LDE": probs[:, :-1],
        "tokens_LD": tokens[:, :-1],
        "entropy_sums_LD": entropy[:, :-1],
        "unlabelled_topk_counts_LE": counts[:, -1],
        "unlabelled_prob_sums_LE": probs[:, -1],
        "unlabelled_tokens_L": tokens[:, -1],
        "unlabelled_entropy_sums_L": entropy[:, -1],
    }
