"""Expert-specialization metrics of one MoE layer from its per-domain routing sums.

Specification: ``docs/method.md`` section 4. Inputs are the sums of
:class:`megatron_edl.analysis.routing_stats.RoutingStats` for one layer: top-k counts c[d, e],
dense probability sums P[d, e], token counts N_d, entropy sums S_d, and the unlabelled tokens'
sums. The divergence, mutual-information and entropy formulas are those of the EDL loss
(:mod:`megatron_edl.core.edl`, called here on float64 tensors), so a report's numbers and the
training log's ``edl_jsd``/``edl_mi`` are the same functions (with token weights here).

Definitions (domains with N_d > 0 are *present*; absent ones give NaN entries)::

    load_hard[d, e]  = c[d, e] / Σ_e' c[d, e']     share of d's top-k assignments going to e
                                                   (= c / (k N_d) when no token is dropped)
    load_dense[d, e] = P[d, e] / N_d               mean dense routing probability p̄_d
    jsd[d, d']       = JSD(load_dense[d] ‖ load_dense[d']) (natural log, <= ln 2);
                       jsd_hard: the same on load_hard.  jsd_mean: mean over present pairs
    mi               = I(D; E) = H(Σ_d w_d p̄_d) − Σ_d w_d H(p̄_d),  w_d = N_d / Σ N
                       (<= min(ln D, ln E); ln D for equal-weight domains on disjoint experts);
                       mi_hard: the same on load_hard
    token_entropy[d] = S_d / (N_d ln E)            mean per-token routing entropy, normalised
    domain_entropy[d]= H(p̄_d) / ln E               per-domain marginal entropy, normalised
    balance          over every token's assignments (domains and unlabelled):
                       load_e = Σ_d c[d, e] + c_unlabelled[e],  max/mean, CV = std/mean
                       (population std), min/max, dead experts = #{e: load_e = 0}
    jaccard[d, d']   = |T_d ∩ T_d'| / |T_d ∪ T_d'|, T_d = the m experts with the largest
                       load_hard[d] (ties: lower expert index first); jaccard_mean over pairs
    expert_mix[d, e] = load_hard[d, e] / Σ_d' load_hard[d', e]   (present domains only)
                       each expert's load share across domains, normalised by the domains'
                       sizes: the ternary-plot coordinates (NaN for an expert no domain uses)

Shape legend: D domains, E experts.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from megatron_edl.analysis.routing_stats import RoutingStats
from megatron_edl.core import edl

__all__ = [
    "LayerMetrics",
    "LoadBalance",
    "SCALAR_METRICS",
    "expert_mix",
    "jsd_matrix",
    "layer_metrics",
    "load_balance",
    "mean_over_pairs",
    "mutual_information",
    "normalised_entropy",
    "row_shares",
    "stats_metrics",
    "top_m_jaccard",
]


def _torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


def row_shares(sums_DE: np.ndarray) -> np.ndarray:
    """Each row divided by its sum; NaN rows where the sum is 0.

    Args:
        sums_DE: Non-negative sums, shape ``(D, E)``.

    Returns:
        Rows that sum to 1 (or NaN), shape ``(D, E)``.
    """
    totals_D = sums_DE.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals_D[:, None] > 0, sums_DE / totals_D[:, None], np.nan)


def mean_over_pairs(matrix_DD: np.ndarray) -> float:
    """Mean of the finite entries above the diagonal (NaN when there are none).

    Args:
        matrix_DD: A symmetric pairwise matrix with NaN for absent domains.

    Returns:
        The mean over unordered pairs of present domains.
    """
    upper = matrix_DD[np.triu_indices(matrix_DD.shape[0], k=1)]
    upper = upper[np.isfinite(upper)]
    return float(upper.mean()) if upper.size else math.nan


def jsd_matrix(dists_DE: np.ndarray) -> np.ndarray:
    """Pairwise Jensen-Shannon divergences (nats) of the rows, NaN for NaN (absent) rows.

    Uses :func:`megatron_edl.core.edl.pairwise_jsd` (float64).

    Args:
        dists_DE: Rows that are distributions over E, or all-NaN rows, shape ``(D, E)``.

    Returns:
        ``jsd_DD``, symmetric, zero diagonal for present rows.
    """
    present_D = np.all(np.isfinite(dists_DE), axis=1)
    safe_DE = np.where(present_D[:, None], dists_DE, 0.0)
    jsd_DD = edl.pairwise_jsd(dists_DE=_torch(safe_DE)).numpy()
    both_DD = present_D[:, None] & present_D[None, :]
    return np.where(both_DD, jsd_DD, np.nan)


def mutual_information(dists_DE: np.ndarray, weights_D: np.ndarray) -> float:
    """I(D; E) in nats for domain distributions ``dists_DE`` with domain weights ``weights_D``.

    Uses :func:`megatron_edl.core.edl.mutual_information` (float64) with A = w_d · dists_d and
    n = w_d, so that p̄_d = dists_d and the domain weights are w_d / Σ w.

    Args:
        dists_DE: Rows that are distributions over E (NaN rows are ignored), shape ``(D, E)``.
        weights_D: Non-negative domain weights (token counts), shape ``(D,)``.

    Returns:
        The mutual information (0 with fewer than two present domains).
    """
    present_D = np.all(np.isfinite(dists_DE), axis=1) & (weights_D > 0)
    weights_D = np.where(present_D, weights_D, 0.0)
    sums_DE = np.where(present_D[:, None], dists_DE, 0.0) * weights_D[:, None]
    value = edl.mutual_information(sums_DE=_torch(sums_DE), counts_D=_torch(weights_D))
    return float(value)


def normalised_entropy(dists_DE: np.ndarray) -> np.ndarray:
    """H(row) / ln E per row (NaN for NaN rows); :func:`megatron_edl.core.edl.domain_entropy`.

    Args:
        dists_DE: Rows that are distributions over E (or NaN), shape ``(D, E)``.

    Returns:
        ``entropy_D`` in [0, 1] (NaN for absent rows; 0 when E = 1).
    """
    present_D = np.all(np.isfinite(dists_DE), axis=1)
    safe_DE = np.where(present_D[:, None], dists_DE, 0.0)
    entropy_D = edl.domain_entropy(
        sums_DE=_torch(safe_DE), counts_D=_torch(present_D.astype(np.float64))
    ).numpy()
    num_experts = dists_DE.shape[1]
    return entropy_D / math.log(num_experts) if num_experts > 1 else np.zeros_like(entropy_D)


@dataclasses.dataclass(frozen=True)
class LoadBalance:
    """Balance of the experts' loads (top-k assignments of every token) in one layer."""

    max_over_mean: float
    """max_e load_e / mean_e load_e ("MaxVio" + 1); 1 = perfectly balanced."""
    cv: float
    """Coefficient of variation std_e / mean_e (population std); 0 = perfectly balanced."""
    min_over_max: float
    """min_e load_e / max_e load_e."""
    dead_experts: int
    """Experts with no assignment at all."""


def load_balance(load_E: np.ndarray) -> LoadBalance:
    """Balance statistics of per-expert loads.

    Args:
        load_E: Assignments per expert (counts), shape ``(E,)``.

    Returns:
        The statistics (NaN ratios when every load is 0).
    """
    load_E = np.asarray(load_E, dtype=np.float64)
    mean = load_E.mean()
    top = load_E.max()
    if mean <= 0:
        return LoadBalance(math.nan, math.nan, math.nan, int(load_E.size))
    return LoadBalance(
        max_over_mean=float(top / mean),
        cv=float(load_E.std() / mean),
        min_over_max=float(load_E.min() / top),
        dead_experts=int(np.count_nonzero(load_E == 0)),
    )


def top_m_jaccard(shares_DE: np.ndarray, m: int) -> np.ndarray:
    """Jaccard overlap of the domains' top-m expert sets.

    Args:
        shares_DE: Per-domain expert shares (NaN rows: absent domains), shape ``(D, E)``.
        m: Size of each domain's expert set, 1 <= m <= E.

    Returns:
        ``jaccard_DD`` (1 on the diagonal of present domains, NaN for absent ones).

    Raises:
        ValueError: If ``m`` is out of range.
    """
    num_domains, num_experts = shares_DE.shape
    if not 1 <= m <= num_experts:
        raise ValueError(f"top-m needs 1 <= m <= E={num_experts}, got m={m}")
    present_D = np.all(np.isfinite(shares_DE), axis=1)
    sets_DE = np.zeros((num_domains, num_experts), dtype=bool)
    for d in np.flatnonzero(present_D):
        top = np.argsort(-shares_DE[d], kind="stable")[:m]  # ties: lower expert index first
        sets_DE[d, top] = True
    inter_DD = sets_DE.astype(np.int64) @ sets_DE.T.astype(np.int64)
    union_DD = 2 * m - inter_DD
    jaccard_DD = inter_DD / union_DD
    both_DD = present_D[:, None] & present_D[None, :]
    return np.where(both_DD, jaccard_DD, np.nan)


def expert_mix(shares_DE: np.ndarray) -> np.ndarray:
    """Each expert's load share across the (present) domains: the ternary coordinates.

    Args:
        shares_DE: Per-domain expert shares (rows normalised by the domain's own size, so a
            large domain does not pull every expert towards it); NaN rows are left out.

    Returns:
        ``mix_DE``: columns summing to 1 over present domains (0 for absent domains); NaN
        columns for experts no present domain uses.
    """
    present_D = np.all(np.isfinite(shares_DE), axis=1)
    safe_DE = np.where(present_D[:, None], shares_DE, 0.0)
    totals_E = safe_DE.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals_E[None, :] > 0, safe_DE / totals_E[None, :], np.nan)


@dataclasses.dataclass(frozen=True)
class LayerMetrics:
    """Every metric of one layer at one step (definitions: module docstring)."""

    layer: int
    tokens_D: np.ndarray
    present_D: np.ndarray
    load_hard_DE: np.ndarray
    load_dense_DE: np.ndarray
    jsd_DD: np.ndarray
    jsd_mean: float
    jsd_hard_DD: np.ndarray
    jsd_hard_mean: float
    mi: float
    mi_hard: float
    token_entropy_D: np.ndarray
    token_entropy: float
    """Mean normalised per-token entropy over every labelled token."""
    domain_entropy_D: np.ndarray
    domain_entropy_hard_D: np.ndarray
    balance: LoadBalance
    top_m: int
    jaccard_DD: np.ndarray
    jaccard_mean: float
    expert_mix_DE: np.ndarray
    lm_loss_D: np.ndarray | None

    def scalars(self) -> dict[str, float]:
        """The one-number metrics, by the names of ``SCALAR_METRICS``."""
        return {
            "tokens": float(self.tokens_D.sum()),
            "domains_present": float(self.present_D.sum()),
            "mi": self.mi,
            "mi_hard": self.mi_hard,
            "jsd_mean": self.jsd_mean,
            "jsd_hard_mean": self.jsd_hard_mean,
            "token_entropy": self.token_entropy,
            "domain_entropy_mean": _nanmean(self.domain_entropy_D),
            "balance_max_over_mean": self.balance.max_over_mean,
            "balance_cv": self.balance.cv,
            "balance_min_over_max": self.balance.min_over_max,
            "dead_experts": float(self.balance.dead_experts),
            "jaccard_mean": self.jaccard_mean,
        }


SCALAR_METRICS: dict[str, str] = {
    "tokens": "labelled tokens",
    "domains_present": "domains with tokens",
    "mi": "I(D;E), dense probabilities (nats)",
    "mi_hard": "I(D;E), top-k assignments (nats)",
    "jsd_mean": "mean pairwise JSD, dense (nats)",
    "jsd_hard_mean": "mean pairwise JSD, top-k (nats)",
    "token_entropy": "per-token routing entropy / ln E",
    "domain_entropy_mean": "mean over domains of H(p̄_d) / ln E",
    "balance_max_over_mean": "max/mean expert load",
    "balance_cv": "coefficient of variation of expert load",
    "balance_min_over_max": "min/max expert load",
    "dead_experts": "experts without assignments",
    "jaccard_mean": "mean top-m Jaccard between domains",
}
"""Name -> description of the scalars of ``LayerMetrics.scalars``, in table order."""


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def layer_metrics(stats: RoutingStats, layer: int, *, top_m: int | None = None) -> LayerMetrics:
    """Every metric of one layer of a dump.

    Args:
        stats: The dump.
        layer: A layer number of ``stats.layers``.
        top_m: Size of the expert sets of the Jaccard overlap; default k (``stats.topk``).

    Returns:
        The layer's metrics.

    Raises:
        ValueError: If the layer is not in the dump or ``top_m`` is out of range.
    """
    if layer not in stats.layers:
        raise ValueError(f"layer {layer} not in the statistics (layers {stats.layers})")
    i = stats.layers.index(layer)
    tokens_D = stats.tokens_LD[i]
    present_D = tokens_D > 0
    counts_DE = np.where(present_D[:, None], stats.topk_counts_LDE[i], np.nan)
    load_hard_DE = row_shares(np.nan_to_num(counts_DE))
    load_hard_DE[~present_D] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        load_dense_DE = np.where(
            present_D[:, None], stats.prob_sums_LDE[i] / tokens_D[:, None], np.nan
        )
        token_entropy_D = np.where(present_D, stats.entropy_sums_LD[i] / tokens_D, np.nan)
    log_e = math.log(stats.num_experts) if stats.num_experts > 1 else 1.0
    token_entropy_D = token_entropy_D / log_e
    total_tokens = tokens_D.sum()
    token_entropy = (
        float(stats.entropy_sums_LD[i].sum() / total_tokens / log_e) if total_tokens else math.nan
    )
    jsd_DD = jsd_matrix(load_dense_DE)
    jsd_hard_DD = jsd_matrix(load_hard_DE)
    load_E = stats.topk_counts_LDE[i].sum(axis=0) + stats.unlabelled_topk_counts_LE[i]
    m = stats.topk if top_m is None else top_m
    jaccard_DD = top_m_jaccard(load_hard_DE, m)
    lm_loss_D = None
    if stats.lm_loss_sums_D is not None and stats.lm_loss_tokens_D is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            lm_loss_D = np.where(
                stats.lm_loss_tokens_D > 0, stats.lm_loss_sums_D / stats.lm_loss_tokens_D, np.nan
            )
    return LayerMetrics(
        layer=layer,
        tokens_D=tokens_D.copy(),
        present_D=present_D,
        load_hard_DE=load_hard_DE,
        load_dense_DE=load_dense_DE,
        jsd_DD=jsd_DD,
        jsd_mean=mean_over_pairs(jsd_DD),
        jsd_hard_DD=jsd_hard_DD,
        jsd_hard_mean=mean_over_pairs(jsd_hard_DD),
        mi=mutual_information(load_dense_DE, tokens_D),
        mi_hard=mutual_information(load_hard_DE, tokens_D),
        token_entropy_D=token_entropy_D,
        token_entropy=token_entropy,
        domain_entropy_D=normalised_entropy(load_dense_DE),
        domain_entropy_hard_D=normalised_entropy(load_hard_DE),
        balance=load_balance(load_E),
        top_m=m,
        jaccard_DD=jaccard_DD,
        jaccard_mean=mean_over_pairs(jaccard_DD),
        expert_mix_DE=expert_mix(load_hard_DE),
        lm_loss_D=lm_loss_D,
    )


def stats_metrics(stats: RoutingStats, *, top_m: int | None = None) -> list[LayerMetrics]:
    """:func:`layer_metrics` of every layer of a dump, in layer order.

    Args:
        stats: The dump.
        top_m: Size of the Jaccard expert sets; default k.

    Returns:
        One ``LayerMetrics`` per layer.
    """
    return [layer_metrics(stats, layer, top_m=top_m) for layer in stats.layers]
