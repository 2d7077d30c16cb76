"""Expert Divergence Loss (EDL): the pure math, for one MoE layer.

Paper: Li et al., *Expert Divergence Learning for MoE-based Language Models*, ICLR 2026,
arXiv 2603.00054 (no public code). The specification, including the decisions taken where the
paper is silent, is ``docs/method.md`` section 2 (loss) and section 4 (metrics).

Pipeline (every step is a free function, keyword-only tensor arguments)::

    logits_TE --routing_probs--> probs_TE --domain_sums--> (sums_DE, counts_D)   [per rank]
        --all-reduce(SUM), done by the caller-->                               [scope of stats]
        (sums_DE, counts_D) --edl_loss--> loss, mean_jsd, ...
                            --mutual_information / domain_entropy--> diagnostics (detached)

Everything that crosses ranks is a *sum over tokens*, so one SUM all-reduce of ``sums_DE`` and
``counts_D`` is all the distribution this module needs; it never talks to other processes itself.

Precision: all math runs in at least fp32 (bf16/fp16 inputs are cast up; fp64 stays fp64 so that
``torch.autograd.gradcheck`` can run through the whole pipeline). Outputs are fp32 or fp64.

Deviations from the paper: p_t is the dense distribution over all experts (before top-k) of the
router's own score function, normalised: the softmax for softmax routers, sigmoid scores divided by
their sum for sigmoid routers (``routing_probs``; the plain softmax stays available); a linear
form ``-mean JSD`` is offered next to the paper's ``-log(JSD + eps)``; zero entries of a domain
mean use the convention 0 log 0 = 0 with a zero (finite) gradient, where the exact one-sided
derivative would be infinite.

Shape legend (suffixes of tensor names):
    T  tokens (of the local shard)
    E  routed experts
    D  domains (labels 0..D-1; label -1 means "no label")
    B  samples (rows of a micro-batch)
    S  sequence positions of one unsharded sample
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from megatron_edl.core.options import EDLForm

__all__ = [
    "EDLLossOutput",
    "IGNORE_DOMAIN",
    "domain_entropy",
    "domain_means",
    "domain_sums",
    "edl_loss",
    "mutual_information",
    "pairwise_jsd",
    "SCORE_FUNCTIONS",
    "routing_probs",
    "segment_weights_from_ids",
]

IGNORE_DOMAIN = -1
"""Domain id of tokens that take no part in EDL (padding, unlabelled text)."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp32, or fp64 when the input is fp64."""
    return torch.promote_types(dtype, torch.float32)


def _xlogy(x: Tensor, y: Tensor) -> Tensor:
    """Elementwise ``x * log(y)`` with ``0 * log(anything) = 0`` and finite gradients there.

    Where ``x == 0`` the ``y`` seen by the log is replaced by 1, so neither the forward (0 * -inf)
    nor the backward (0 / 0 from d log(y) / dy at y = 0) can produce NaN. Unlike
    ``torch.xlogy``, whose gradient w.r.t. ``y`` is NaN at ``x = y = 0``, this stays finite, and
    ``d/dx [x log x]`` at ``x = 0`` comes out as 0.

    Args:
        x: Non-negative factor.
        y: Argument of the log; must be positive wherever ``x > 0``.

    Returns:
        ``x * log(y)`` with the 0 log 0 = 0 convention, broadcast shape of ``x`` and ``y``.
    """
    return x * torch.log(torch.where(x > 0, y, 1.0))


def _entropy(p_xE: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last axis: H(p) = -Σ_e p_e log p_e, with 0 log 0 = 0.

    Args:
        p_xE: Distributions over experts, any leading shape ``x``.

    Returns:
        Entropies, shape ``x``.
    """
    return -_xlogy(p_xE, p_xE).sum(dim=-1)


SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
"""Router score functions (Megatron's ``--moe-router-score-function`` choices) whose normalised
scores :func:`routing_probs` computes."""


def routing_probs(*, logits_TE: Tensor, score_function: str = "softmax") -> Tensor:
    """Dense routing distribution p_t over all E experts, before top-k: the normalised scores.

    - ``softmax``: p_t = softmax(z_t);
    - ``sigmoid``: p_t[e] = σ(z_t[e]) / (Σ_e' σ(z_t[e']) + 1e-20);
    - ``sqrtsoftplus``: p_t[e] = sqrt(softplus(z_t[e])) / (Σ_e' sqrt(softplus(z_t[e'])) + 1e-20).

    The normalisations are those of Megatron's ``compute_routing_scores_for_aux_loss`` (the
    scores its load-balancing loss sees), so for a sigmoid router EDL acts on the scores the
    router ranks its experts by, not on a softmax it never routes with (docs/method.md, "Score
    function"). Computed in fp32 whatever the dtype of the logits (fp64 stays fp64).

    Args:
        logits_TE: Router logits z_t, shape ``(T, E)`` (any leading shape works), local tokens.
        score_function: One of :data:`SCORE_FUNCTIONS`.

    Returns:
        ``probs_TE``: p_t, same shape as the logits, fp32 (fp64 for fp64 logits); rows sum to 1.

    Raises:
        ValueError: On an unknown ``score_function``.
    """
    dtype = _compute_dtype(logits_TE.dtype)
    if score_function == "softmax":
        return torch.softmax(logits_TE, dim=-1, dtype=dtype)
    if score_function == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE.to(dtype))
    elif score_function == "sqrtsoftplus":
        scores_TE = torch.nn.functional.softplus(logits_TE.to(dtype)).sqrt()
    else:
        raise ValueError(
            f"unknown router score function {score_function!r}; choose from {SCORE_FUNCTIONS}"
        )
    return scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)


def segment_weights_from_ids(*, segment_ids_BS: Tensor) -> Tensor:
    """Per-token weights w_t = 1 / T_s(t) that make every segment weigh the same.

    A *segment* is a maximal run of equal ids inside one row: ``[[7, 7, 3, 7]]`` holds three
    segments of lengths 2, 1 and 1 (runs never continue into the next row). With these weights
    ``domain_sums`` gives n_j = number of segments of domain j and A_j / n_j = mean over those
    segments of the segment mean of p_t, which is the paper's token -> sequence -> domain average.

    Must be called on the *unsharded* sample (before context-parallel / sequence-parallel
    slicing), because T_s is the full segment length; slice the weights like the tokens afterwards.
    Padding may form its own segment: give it domain id -1 and it is ignored whatever its weight.

    The other aggregation modes of method.md need no helper: ``token`` is w_t = 1 (pass
    ``weights_T=None`` to ``domain_sums``), and ``sample`` (one label per sample, every sample
    weighs the same) is this function with one segment id per row.

    Cost: O(B*S), no host synchronisation (scatter into a buffer of B*S possible runs).

    Args:
        segment_ids_BS: Integer segment (document) ids of each token, shape ``(B, S)``. Only
            changes of id between neighbouring positions matter, not the values.

    Returns:
        ``weights_BS``: fp32 weights 1 / T_s(t), shape ``(B, S)``.

    Raises:
        ValueError: If ``segment_ids_BS`` is not 2-D or not of an integer dtype.
    """
    if segment_ids_BS.ndim != 2:
        raise ValueError(
            f"segment_ids_BS must be 2-D (B, S), got shape {tuple(segment_ids_BS.shape)}"
        )
    if segment_ids_BS.is_floating_point() or segment_ids_BS.is_complex():
        raise ValueError(f"segment_ids_BS must be an integer tensor, got {segment_ids_BS.dtype}")
    device = segment_ids_BS.device
    starts_BS = torch.ones(segment_ids_BS.shape, dtype=torch.bool, device=device)
    starts_BS[:, 1:] = segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]
    # Every row starts a run, so a flat cumsum numbers the runs of all rows uniquely.
    run_N = torch.cumsum(starts_BS.flatten().long(), dim=0) - 1
    lengths_N = torch.zeros(run_N.numel(), dtype=torch.long, device=device)
    lengths_N.scatter_add_(0, run_N, torch.ones_like(run_N))
    return (1.0 / lengths_N[run_N].float()).view(segment_ids_BS.shape)


def domain_sums(
    *,
    probs_TE: Tensor,
    domain_ids_T: Tensor,
    weights_T: Tensor | None = None,
    num_domains: int,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Weighted routing mass and weight per domain: the only statistics that cross ranks.

        A_j = Σ_t w_t · 1[d_t = j] · p_t   ∈ R^E     (sums_DE[j])
        n_j = Σ_t w_t · 1[d_t = j]                    (counts_D[j])

    Tokens with d_t = -1 are ignored. Both are sums over tokens, so for tokens split across ranks
    (TP sequence parallel, CP, DP) A = Σ_ranks A^(rank) and n = Σ_ranks n^(rank): one SUM
    all-reduce of the results over the statistics scope gives the global values (done by the
    caller; this module does no communication). Accumulation is in fp32 (fp64 for fp64 probs),
    by ``index_add`` (no one-hot ``(T, D)`` matrix), and differentiable w.r.t. ``probs_TE``.

    Args:
        probs_TE: Dense routing distributions p_t of the local tokens, shape ``(T, E)``.
        domain_ids_T: Integer domain labels d_t of the local tokens, in [-1, num_domains),
            shape ``(T,)``.
        weights_T: Non-negative token weights w_t, shape ``(T,)``, computed on the unsharded
            sample (see ``segment_weights_from_ids``). ``None`` means w_t = 1 (``token`` mode).
        num_domains: D, the size of the label vocabulary (>= 1).
        validate: Check that every id lies in [-1, num_domains). Costs one min/max reduction
            over the T ids plus a device-to-host sync; pass ``False`` on the hot path once the
            data pipeline is trusted (an out-of-range id then fails inside ``index_add`` or, on
            CUDA, may fail asynchronously). Shape and dtype checks are free and always run.

    Returns:
        ``(sums_DE, counts_D)``: A of shape ``(D, E)`` and n of shape ``(D,)``, fp32 (fp64 for
        fp64 probs).

    Raises:
        ValueError: On inconsistent shapes, a non-integer ``domain_ids_T``, ``num_domains < 1``,
            or (with ``validate``) an id outside [-1, num_domains); the message names the value.
    """
    if num_domains < 1:
        raise ValueError(f"num_domains must be >= 1, got {num_domains}")
    if probs_TE.ndim != 2:
        raise ValueError(f"probs_TE must be 2-D (T, E), got shape {tuple(probs_TE.shape)}")
    num_tokens = probs_TE.shape[0]
    if domain_ids_T.shape != (num_tokens,):
        raise ValueError(
            f"domain_ids_T must have shape ({num_tokens},) to match probs_TE "
            f"{tuple(probs_TE.shape)}, got {tuple(domain_ids_T.shape)}"
        )
    if domain_ids_T.is_floating_point() or domain_ids_T.is_complex():
        raise ValueError(f"domain_ids_T must be an integer tensor, got {domain_ids_T.dtype}")
    if weights_T is not None and weights_T.shape != (num_tokens,):
        raise ValueError(
            f"weights_T must have shape ({num_tokens},) to match probs_TE "
            f"{tuple(probs_TE.shape)}, got {tuple(weights_T.shape)}"
        )
    if validate and num_tokens > 0:
        lo, hi = (int(v) for v in torch.aminmax(domain_ids_T))
        if lo < IGNORE_DOMAIN:
            raise ValueError(
                f"domain id {lo} out of range: ids must lie in [-1, num_domains={num_domains})"
            )
        if hi >= num_domains:
            raise ValueError(
                f"domain id {hi} out of range: ids must lie in [-1, num_domains={num_domains})"
            )

    dtype = _compute_dtype(probs_TE.dtype)
    labelled_T = domain_ids_T >= 0
    if weights_T is None:
        w_T = labelled_T.to(dtype)
    else:
        # where(), not multiplication, so that a NaN weight on an ignored token cannot leak in.
        w_T = torch.where(labelled_T, weights_T.to(dtype), 0.0)
    # Ignored tokens (ids < 0) are sent to domain 0 with weight 0: no host sync to drop them.
    index_T = domain_ids_T.clamp_min(0).long()
    if torch.compiler.is_compiling():
        # Under torch.compile (megatron_edl.core.edl_fused) the plain formula: inductor fuses its
        # autograd backward (gather g[index_t], times w_t) with the softmax backward into one
        # kernel, and the embedding_bag backward of WeightedIndexAdd compiles to a zero
        # gradient in torch 2.11 (tests/unit/core/test_edl_fused.py checks the gradients).
        weighted_TE = probs_TE.to(dtype) * w_T[:, None]
        sums_DE = torch.zeros(num_domains, probs_TE.shape[1], dtype=dtype, device=probs_TE.device)
        sums_DE = sums_DE.index_add(0, index_T, weighted_TE)
    else:
        sums_DE = WeightedIndexAdd.apply(probs_TE.to(dtype), index_T, w_T, num_domains)
    counts_D = torch.zeros(num_domains, dtype=dtype, device=probs_TE.device)
    counts_D = counts_D.index_add(0, index_T, w_T)
    return sums_DE, counts_D


class WeightedIndexAdd(torch.autograd.Function):
    """``out[j] = Σ_t w_t 1[index_t = j] x_t``; one-pass backward ``g_x[t] = w_t g[index_t]``.

    The same values as ``zeros(D, E).index_add(0, index_T, x_TE * w_T[:, None])`` under
    autograd, whose backward materialises the gathered ``g[index_t]`` and then multiplies it by
    w_t (two passes over a (T, E) tensor). Here one ``embedding_bag`` (bags of one row,
    per-sample weights w_t) writes ``w_t g[index_t]`` directly: the backward of ``domain_sums``
    is one (T, E) write, which matters because it runs on every MoE layer and micro-batch.
    Gradients flow to ``x_TE`` only (index and weights are data).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_TE: Tensor,
        index_T: Tensor,
        w_T: Tensor,
        num_rows: int,
    ) -> Tensor:
        ctx.save_for_backward(index_T, w_T)
        out_DE = torch.zeros(num_rows, x_TE.shape[1], dtype=x_TE.dtype, device=x_TE.device)
        return out_DE.index_add_(0, index_T, x_TE * w_T[:, None])

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_DE: Tensor
    ) -> tuple[Tensor, None, None, None]:
        index_T, w_T = ctx.saved_tensors
        grad_TE = torch.nn.functional.embedding_bag(
            index_T[:, None], grad_DE, per_sample_weights=w_T[:, None], mode="sum"
        )
        return grad_TE, None, None, None


def domain_means(*, sums_DE: Tensor, counts_D: Tensor) -> tuple[Tensor, Tensor]:
    """Domain means p̄_j = A_j / n_j and the mask of present domains (n_j > 0).

    Args:
        sums_DE: A, shape ``(D, E)``, at the scope of the statistics (after any all-reduce).
        counts_D: n, shape ``(D,)``, same scope.

    Returns:
        ``(means_DE, present_D)``: p̄ in at least fp32, with all-zero rows for absent domains
        (a safe placeholder, never NaN, so masked-out entries keep finite gradients), and the
        boolean mask n_j > 0.

    Raises:
        ValueError: If the shapes are not ``(D, E)`` and ``(D,)``.
    """
    if sums_DE.ndim != 2 or counts_D.shape != sums_DE.shape[:1]:
        raise ValueError(
            f"expected sums_DE of shape (D, E) and counts_D of shape (D,), got "
            f"{tuple(sums_DE.shape)} and {tuple(counts_D.shape)}"
        )
    dtype = _compute_dtype(sums_DE.dtype)
    counts_D = counts_D.to(dtype)
    present_D = counts_D > 0
    safe_counts_D = torch.where(present_D, counts_D, 1.0)
    means_DE = sums_DE.to(dtype) / safe_counts_D[:, None]
    return means_DE, present_D


PAIRWISE_BLOCK_ELEMENTS = 1 << 21
"""Largest ``(rows, D, E)`` block of intermediates the pairwise JSD forms at once (elements).

Below it (``D * D * E <=`` this: D = 49 with E up to 873, D = 3 with any usual E) the pairwise
JSD is one pass over the whole ``(D, D, E)`` stack, its analytic backward saved, and
:func:`edl_loss` takes every row: no host sync, the first version's code path. Above it,
:func:`edl_loss` keeps only the present domains (one host sync to learn M) and
:func:`pairwise_jsd` runs in blocks of rows, recomputing each block in the backward, so no
intermediate exceeds this many elements: memory O(M * M + this) instead of O(D * D * E)
(docs/BENCHMARKS.md section 2, "Peak memory with many domains"). About 8 MiB per fp32 block
tensor."""


def pairwise_jsd(*, dists_DE: Tensor, block_elements: int = PAIRWISE_BLOCK_ELEMENTS) -> Tensor:
    """Jensen-Shannon divergence between every pair of rows.

        JSD(P‖Q) = ½ KL(P‖M) + ½ KL(Q‖M),   M = (P + Q) / 2,   natural log,   0 <= JSD <= ln 2

    Evaluated as KL(P‖M) = Σ_e P_e log(P_e / M_e) with log(P_e / M_e) = log1p(δ_e),
    δ_e = (P_e - Q_e) / (P_e + Q_e), wherever |δ_e| < 1/2, and log(2 P_e / (P_e + Q_e)) elsewhere
    (there the log is far from 0 and 1 + δ_e could round to 0). δ carries a *relative* rounding
    error, so for close distributions the JSD's absolute error scales with the divergence itself
    (about eps_fp32 · |δ|). This matters because at initialisation the domain means are nearly
    equal and the loss compares JSD with eps = 1e-6: log(P/M) alone, or
    H(M) - (H(P) + H(Q)) / 2, would carry an absolute fp32 error of about 1e-8 to 1e-7.
    Entries with P_e = 0 contribute 0 (0 log 0 = 0) with a finite gradient, also where
    P_e = Q_e = 0; every branch a ``where`` discards is kept finite so no NaN reaches the
    backward. Uses KL(Q_k‖M_jk) = K[k, j], so only one ``(D, D, E)`` stack of intermediates is
    formed, in blocks of rows of at most ``block_elements`` elements (the same values: every
    block runs the same elementwise formula on its rows).

    Args:
        dists_DE: Rows that are probability distributions over E, shape ``(D, E)``.
        block_elements: Largest ``(rows, D, E)`` block formed at once
            (:data:`PAIRWISE_BLOCK_ELEMENTS`); at least one row per block.

    Returns:
        ``jsd_DD``: symmetric matrix of JSD values (zero diagonal), shape ``(D, D)``, in at least
        fp32, clamped at 0 against rounding.
    """
    p_DE = dists_DE.to(_compute_dtype(dists_DE.dtype))
    num_rows, num_experts = p_DE.shape
    block_rows = max(1, block_elements // max(1, num_rows * num_experts))
    return _PairwiseJSD.apply(p_DE, block_rows)


def _jsd_kernel(p_safe_cE: Tensor, positive_f_cE: Tensor, p_DE: Tensor, positive_f_DE: Tensor):
    """Rows ``c`` of the derivative kernel of the pairwise JSD, shape ``(c, D, E)``.

    ``kernel[j, k, e]`` = log(P_je / M_jke) where P_je > 0 (log1p(δ) near, log(2P / s) far),
    -1 where P_je = 0 < Q_ke, 0 where both are 0; P = row j (of the block), Q = row k.
    """
    # Branches are selected with torch.lerp and 0/1 weights, which is exact (w = 0 gives
    # a + 0 * (b - a) = a, w = 1 gives b - (b - a) * 0 = b) and, unlike torch.where on CPU,
    # costs no branch misprediction when the mask is irregular (3-20x faster). It needs both
    # branches finite everywhere, hence the clamps below, which change nothing where a branch
    # is selected.
    p_safe_c1E = p_safe_cE[:, None, :]
    q_1DE = p_DE[None, :, :]  # pair (j, k): P = row j, Q = row k
    s_cDE = p_safe_c1E + q_1DE
    delta_cDE = (p_safe_c1E - q_1DE).div_(s_cDE)
    near_cDE = (delta_cDE.abs() < 0.5).to(p_DE.dtype)
    # Near: log1p(delta) (clamped: unchanged where |delta| < 1/2, finite elsewhere).
    # Far: log(2P / s), finite since P >= tiny.
    log_ratio_cDE = torch.lerp(
        (2.0 * p_safe_c1E).div(s_cDE).log_(), delta_cDE.clamp_min_(-0.5).log1p_(), near_cDE
    )
    # Derivative kernel of the forward formula (class docstring): log(P/M) where P > 0,
    # -1 where P = 0 < Q, 0 where P = Q = 0. Where P = 0 it multiplies P = 0 in the forward, so
    # K[j, k] = Σ_e P_e kernel_e = KL(P_j || M_jk) with 0 log 0 = 0.
    return torch.lerp(-positive_f_DE[None, :, :], log_ratio_cDE, positive_f_cE[:, None, :])


class _PairwiseJSD(torch.autograd.Function):
    """``pairwise_jsd`` with its analytic backward (one ``(D, D, E)`` tensor saved, not ~15).

    Forward: as described in ``pairwise_jsd``. Backward: for distributions P = row j, Q = row k
    and M = (P + Q) / 2, the derivative of JSD(P‖Q) w.r.t. P_e is ½ log(P_e / M_e) (the terms
    from M cancel), so with ``log_ratio[j, k] = log(P_j / M_jk)`` (already computed in the
    forward) and upstream gradient G of the symmetric output:

        ∂L/∂P_j = Σ_k (G[j, k] + G[k, j]) · ½ log_ratio[j, k]        (one batched matmul)

    These are the values the autograd graph of the forward formula would give, including its
    conventions where entries are zero: for P_e = 0 < Q_e, log_ratio is 0 by the 0 log 0 = 0
    convention and the graph's derivative is -½ (from the Q-side term), for P_e = Q_e = 0 it
    is 0; and G is masked where the ``clamp_min(0)`` clamped (pre-clamp value < 0), as
    ``clamp_min``'s own backward does. With one block (``block_rows >= D``) the kernel is saved;
    with several, only P is, and the backward recomputes each block's kernel (twice the
    arithmetic, memory bounded by one block). Not differentiable twice.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, p_DE: Tensor, block_rows: int) -> Tensor:
        dtype = p_DE.dtype
        positive_DE = p_DE > 0
        # P with zeros replaced by the smallest normal number: keeps the logs finite; where
        # P = 0 the kernel takes another value anyway (_jsd_kernel).
        p_safe_DE = torch.where(positive_DE, p_DE, torch.finfo(dtype).tiny)
        positive_f_DE = positive_DE.to(dtype)
        num_rows = p_DE.shape[0]
        if block_rows >= num_rows:
            kernel_DDE = _jsd_kernel(p_safe_DE, positive_f_DE, p_DE, positive_f_DE)
            kl_DD = (p_DE[:, None, :] * kernel_DDE).sum(dim=-1)  # K[j, k] = KL(P_j || M_jk)
            saved = (kernel_DDE,)
        else:
            blocks = []
            for start in range(0, num_rows, block_rows):
                rows = slice(start, start + block_rows)
                kernel_cDE = _jsd_kernel(p_safe_DE[rows], positive_f_DE[rows], p_DE, positive_f_DE)
                blocks.append((p_DE[rows, None, :] * kernel_cDE).sum(dim=-1))
                del kernel_cDE
            kl_DD = torch.cat(blocks)
            saved = (p_safe_DE, positive_f_DE, p_DE)
        raw_DD = 0.5 * (kl_DD + kl_DD.T)
        ctx.block_rows = block_rows
        ctx.save_for_backward(raw_DD >= 0, *saved)
        return raw_DD.clamp_min(0.0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_DD: Tensor) -> tuple[Tensor, None]:
        unclamped_DD, *saved = ctx.saved_tensors
        g_DD = torch.where(unclamped_DD, grad_DD, 0.0)
        g_DD = 0.5 * (g_DD + g_DD.T)
        if len(saved) == 1:
            (kernel_DDE,) = saved
            return torch.bmm(g_DD[:, None, :], kernel_DDE).squeeze(1), None
        p_safe_DE, positive_f_DE, p_DE = saved
        block_rows = ctx.block_rows
        blocks = []
        for start in range(0, p_DE.shape[0], block_rows):
            rows = slice(start, start + block_rows)
            kernel_cDE = _jsd_kernel(p_safe_DE[rows], positive_f_DE[rows], p_DE, positive_f_DE)
            blocks.append(torch.bmm(g_DD[rows, None, :], kernel_cDE).squeeze(1))
            del kernel_cDE
        return torch.cat(blocks), None


class EDLLossOutput(NamedTuple):
    """Result of ``edl_loss``.

    Attributes:
        loss: L_ED, differentiable scalar (fp32, or fp64 for fp64 inputs).
        mean_jsd: Mean JSD over the pairs of present domains, detached scalar (0 when M < 2).
        num_present: M, the number of domains with n_j > 0, int64 scalar tensor (no host sync).
        jsd_DD: Detached ``(D, D)`` JSD matrix; NaN in every row/column of an absent domain
            (``None`` from ``edl_loss(with_matrix=False)`` with many domains).
    """

    loss: Tensor
    mean_jsd: Tensor
    num_present: Tensor
    jsd_DD: Tensor | None


def edl_loss(
    *,
    sums_DE: Tensor,
    counts_D: Tensor,
    form: Literal["log", "linear"] = "log",
    eps: float = 1e-6,
    block_elements: int = PAIRWISE_BLOCK_ELEMENTS,
    with_matrix: bool = True,
) -> EDLLossOutput:
    """Expert Divergence Loss of one MoE layer from the (reduced) per-domain statistics.

    With p̄_j = A_j / n_j over the M domains present (n_j > 0) and the C(M, 2) unordered pairs
    j < k of present domains:

        form "log" (paper):  L_ED = (1 / C(M,2)) Σ_{j<k} -log(JSD(p̄_j‖p̄_k) + eps)
        form "linear":       L_ED = -(1 / C(M,2)) Σ_{j<k} JSD(p̄_j‖p̄_k)

    For M < 2 the loss is exactly 0 but still a function of ``sums_DE`` (gradient zero, not
    None), so every rank runs the same backward and no collective is skipped. The pair average is
    a masked sum divided by max(number of pairs, 1): no ``.item()``, no host sync, no branching
    on tensor values (up to the ``block_elements`` limit below).

    Memory (docs/BENCHMARKS.md section 2, "Peak memory with many domains"): with
    ``D * D * E`` at most ``block_elements`` the pairwise JSD runs over all D rows at once,
    absent ones masked out (no host sync). Above it only the M present rows enter the pairwise
    term (one host sync to count them), in row blocks of at most ``block_elements`` elements,
    so the memory grows with the domains present in the statistics, O(M * M + block_elements),
    not with D; the values are those of the dense form up to the order of the pair sum
    (tests/unit/core/test_edl_scale.py), and ``jsd_DD`` is then filled from the M x M values
    (O(D * D), no E factor; skipped with ``with_matrix=False``).

    Levels: ``sums_DE`` and ``counts_D`` come from ``domain_sums`` summed over the statistics
    scope (``global``: the tp_dp_cp group; ``local``: tp_cp), i.e. *after* the all-reduce. The
    gradient flows back through ``sums_DE`` only (n_j carries none: weights are data).

    Args:
        sums_DE: A, shape ``(D, E)``; any float dtype, cast to at least fp32.
        counts_D: n, shape ``(D,)``.
        form: ``"log"`` (paper's) or ``"linear"``.
        eps: eps inside the log of the ``"log"`` form (method.md decision: 1e-6); must be > 0
            for that form, unused by ``"linear"``.
        block_elements: The dense-form limit and block size of the pairwise JSD
            (:data:`PAIRWISE_BLOCK_ELEMENTS`; tests pass 1 to force the present-rows path).
        with_matrix: Return ``jsd_DD``; ``False`` (the router's metrics need none) skips the
            ``(D, D)`` matrix of the present-rows path (``jsd_DD`` is then ``None``), so nothing
            of this call grows with D squared.

    Returns:
        An ``EDLLossOutput`` (loss, detached mean JSD, M, detached JSD matrix).

    Raises:
        ValueError: On an unknown ``form``, ``eps <= 0`` with the log form, or bad shapes.
    """
    if form not in tuple(EDLForm):
        raise ValueError(f"form must be 'log' or 'linear', got {form!r}")
    if form == "log" and not eps > 0:
        raise ValueError(f"eps must be > 0 for the 'log' form, got {eps}")
    means_DE, present_D = domain_means(sums_DE=sums_DE, counts_D=counts_D)
    num_domains, num_experts = means_DE.shape
    if num_domains * num_domains * num_experts > block_elements:
        return _present_rows_loss(means_DE, present_D, form, eps, block_elements, with_matrix)
    jsd_DD = pairwise_jsd(dists_DE=means_DE, block_elements=block_elements)

    both_present_DD = present_D[:, None] & present_D[None, :]
    pairs_DD = both_present_DD.triu(diagonal=1)
    num_pairs = pairs_DD.sum().clamp_min(1).to(jsd_DD.dtype)

    per_pair_DD = -torch.log(jsd_DD + eps) if form == "log" else -jsd_DD
    loss = torch.where(pairs_DD, per_pair_DD, 0.0).sum() / num_pairs

    jsd_detached_DD = jsd_DD.detach()
    mean_jsd = torch.where(pairs_DD, jsd_detached_DD, 0.0).sum() / num_pairs
    jsd_out_DD = torch.where(both_present_DD, jsd_detached_DD, math.nan)
    return EDLLossOutput(
        loss=loss, mean_jsd=mean_jsd, num_present=present_D.sum(), jsd_DD=jsd_out_DD
    )


def _present_rows_loss(
    means_DE: Tensor,
    present_D: Tensor,
    form: str,
    eps: float,
    block_elements: int,
    with_matrix: bool,
) -> EDLLossOutput:
    """``edl_loss`` over the M present rows only (many domains: see its "Memory" paragraph)."""
    index_M = present_D.nonzero().squeeze(1)  # the one host sync of this path
    jsd_MM = pairwise_jsd(dists_DE=means_DE[index_M], block_elements=block_elements)
    pairs_MM = torch.ones_like(jsd_MM, dtype=torch.bool).triu(diagonal=1)
    num_pairs = pairs_MM.sum().clamp_min(1).to(jsd_MM.dtype)
    per_pair_MM = -torch.log(jsd_MM + eps) if form == "log" else -jsd_MM
    loss = torch.where(pairs_MM, per_pair_MM, 0.0).sum() / num_pairs
    jsd_detached_MM = jsd_MM.detach()
    mean_jsd = torch.where(pairs_MM, jsd_detached_MM, 0.0).sum() / num_pairs
    jsd_out_DD = None
    if with_matrix:
        num_domains = means_DE.shape[0]
        jsd_out_DD = torch.full(
            (num_domains, num_domains), math.nan, dtype=jsd_MM.dtype, device=jsd_MM.device
        )
        jsd_out_DD[index_M[:, None], index_M[None, :]] = jsd_detached_MM
    return EDLLossOutput(
        loss=loss, mean_jsd=mean_jsd, num_present=present_D.sum(), jsd_DD=jsd_out_DD
    )


def mutual_information(*, sums_DE: Tensor, counts_D: Tensor) -> Tensor:
    """Mutual information I(E; D) between expert and domain (nats), detached.

        w_j = n_j / Σ_k n_k,   p̄ = Σ_j w_j p̄_j,   I(E; D) = H(p̄) - Σ_j w_j H(p̄_j)

    over the present domains (absent ones have w_j = 0). This is D_inter of method.md's
    diversity decomposition: 0 when every domain routes alike, at most min(ln E, ln D), and equal
    to ln D when D domains of equal weight use disjoint experts. With segment weights, w_j is
    the share of segments, not of tokens. Returns 0 when no domain is present; clamped at 0
    against rounding.

    Args:
        sums_DE: A, shape ``(D, E)``, at the scope to report (after any all-reduce).
        counts_D: n, shape ``(D,)``, same scope.

    Returns:
        Scalar tensor, at least fp32, no grad.
    """
    # With N = Σ_j n_j: w_j p̄_j = A_j / N, so p̄ = Σ_j A_j / N and
    # Σ_j w_j H(p̄_j) = -(1/N) Σ_{j,e} A_je log p̄_je: a handful of ops on (D, E), no graph
    # (this runs on every layer and micro-batch for the metrics).
    with torch.no_grad():
        dtype = _compute_dtype(sums_DE.dtype)
        sums_DE, counts_D = sums_DE.to(dtype), counts_D.to(dtype)
        total = counts_D.sum().clamp_min(torch.finfo(dtype).tiny)
        pbar_E = sums_DE.sum(dim=0) / total
        means_DE = sums_DE / torch.where(counts_D > 0, counts_D, 1.0)[:, None]
        mi = torch.xlogy(sums_DE, means_DE).sum() / total - torch.xlogy(pbar_E, pbar_E).sum()
        return mi.clamp_min(0.0)


def domain_entropy(*, sums_DE: Tensor, counts_D: Tensor) -> Tensor:
    """Entropy of each domain's mean routing distribution, H(p̄_j) (nats), detached.

    The per-domain marginal entropy of method.md section 4: ln E for a domain spread evenly
    over all experts, 0 for a domain that always uses one expert. Divide by ln E to normalise.

    Args:
        sums_DE: A, shape ``(D, E)``, at the scope to report (after any all-reduce).
        counts_D: n, shape ``(D,)``, same scope.

    Returns:
        ``entropy_D``: shape ``(D,)``, at least fp32, no grad; NaN for absent domains (n_j = 0)
        so that plots skip them (``entropy_D.isnan()`` recovers the absent mask).
    """
    means_DE, present_D = domain_means(sums_DE=sums_DE.detach(), counts_D=counts_D.detach())
    entropy_D = _entropy(means_DE)
    return torch.where(present_D, entropy_D, math.nan)
