"""Domain expert pruning: which experts each domain keeps, from its routing mass.

A domain keeps ``m`` of a layer's ``E`` routed experts: the first ``m`` of an order of the
experts. Three orders (docs/method.md section 6):

``domain``
    Each domain's own: descending routing mass ``prob_sums_LDE[l, d]`` of the domain's
    calibration tokens (the dense router probabilities summed over its tokens); a domain with no
    calibration token falls back to the global order.
``global``
    One order for every domain: descending mass summed over the domains.
``random``
    A seeded random permutation per layer and domain (the reference a ranking must beat).

Ties keep the lower expert index first (stable sort), so every order is deterministic.

An export (``megatron-edl-prune --export``) keeps one domain's first ``m`` experts of the
``domain`` order in every layer (:func:`export_experts`), renumbered in ascending original id.

Shape legend: L MoE layers, D domains, E routed experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "RANKINGS",
    "PruningError",
    "domain_order",
    "expert_order",
    "export_experts",
    "global_order",
    "keep_mask",
    "keep_sizes",
    "random_order",
]

RANKINGS = ("domain", "global", "random")


class PruningError(ValueError):
    """A pruning request that cannot be served; the message names the bad value."""


def domain_order(prob_sums_LDE: np.ndarray) -> np.ndarray:
    """Each domain's experts by descending routing mass; empty domains take the global order.

    Args:
        prob_sums_LDE: Σ_t p_t[e] over each domain's calibration tokens, float [L, D, E].

    Returns:
        int64 [L, D, E]: ``order[l, d, i]`` is the i-th expert of domain d in layer l.
    """
    mass_LDE = np.asarray(prob_sums_LDE, dtype=np.float64)
    order_LDE = np.argsort(-mass_LDE, axis=-1, kind="stable")
    empty_LD = mass_LDE.sum(axis=-1) <= 0
    if empty_LD.any():
        order_LDE = np.where(empty_LD[..., None], global_order(mass_LDE), order_LDE)
    return order_LDE


def global_order(prob_sums_LDE: np.ndarray) -> np.ndarray:
    """One order per layer for all domains: descending mass summed over domains, [L, D, E]."""
    mass_LDE = np.asarray(prob_sums_LDE, dtype=np.float64)
    order_LE = np.argsort(-mass_LDE.sum(axis=1), axis=-1, kind="stable")
    return np.broadcast_to(order_LE[:, None, :], mass_LDE.shape).copy()


def random_order(num_layers: int, num_domains: int, num_experts: int, seed: int) -> np.ndarray:
    """A seeded random permutation of the experts per layer and domain, int64 [L, D, E]."""
    rng = np.random.default_rng(seed)
    keys_LDE = rng.random((num_layers, num_domains, num_experts))
    return np.argsort(keys_LDE, axis=-1, kind="stable")


def expert_order(ranking: str, prob_sums_LDE: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """The order of ``ranking`` (one of :data:`RANKINGS`), int64 [L, D, E]."""
    if ranking == "domain":
        return domain_order(prob_sums_LDE)
    if ranking == "global":
        return global_order(prob_sums_LDE)
    if ranking == "random":
        num_layers, num_domains, num_experts = np.shape(prob_sums_LDE)
        return random_order(num_layers, num_domains, num_experts, seed)
    raise PruningError(f"ranking must be one of {list(RANKINGS)}, got {ranking!r}")


def keep_mask(order_LDE: np.ndarray, keep: int) -> np.ndarray:
    """bool [L, D, E]: True for the first ``keep`` experts of each order.

    Raises:
        PruningError: ``keep`` outside 1..E.
    """
    num_experts = order_LDE.shape[-1]
    if not 1 <= keep <= num_experts:
        raise PruningError(f"keep must be between 1 and E = {num_experts}, got {keep}")
    mask_LDE = np.zeros(order_LDE.shape, dtype=bool)
    np.put_along_axis(mask_LDE, order_LDE[..., :keep], True, axis=-1)
    return mask_LDE


def export_experts(order_LDE: np.ndarray, domain: int, keep: int) -> np.ndarray:
    """The experts an export for one domain keeps: the domain's first ``keep`` in each layer.

    They are returned in ascending original id: expert i of the exported layer is
    ``kept_LM[l, i]``. Keeping the original relative order keeps the masked evaluation's
    tie-breaks of top-k and its order of summing a token's expert outputs (docs/method.md
    section 6).

    Args:
        order_LDE: An order of :func:`expert_order`, int [L, D, E].
        domain: The domain's index d.
        keep: M, the experts kept per layer.

    Returns:
        int64 [L, M], every row strictly increasing: the rows of ``keep_mask(order, keep)[:, d]``.

    Raises:
        PruningError: ``domain`` outside 0..D-1 or ``keep`` outside 1..E.
    """
    num_domains = order_LDE.shape[1]
    if not 0 <= domain < num_domains:
        raise PruningError(f"domain index must be between 0 and {num_domains - 1}, got {domain}")
    mask_LE = keep_mask(order_LDE, keep)[:, domain]
    return np.stack([np.flatnonzero(row) for row in mask_LE]).astype(np.int64)


def keep_sizes(
    num_experts: int, topk: int, requested: Sequence[int] | None = None
) -> tuple[int, ...]:
    """The numbers of experts kept per domain: ``requested``, or E, E/2, E/4 and k.

    Args:
        num_experts: E.
        topk: k of the router (a domain must keep at least k experts: top-k routes to k).
        requested: The ``--keep`` list, or ``None`` for the default.

    Returns:
        Distinct sizes, largest first (E first when it is in the list).

    Raises:
        PruningError: a size below k or above E, naming it.
    """
    if requested is None:
        sizes = [num_experts, num_experts // 2, num_experts // 4, topk]
        sizes = [m for m in sizes if m >= topk]
    else:
        sizes = list(requested)
        for m in sizes:
            if m < topk:
                raise PruningError(f"--keep {m}: below the router's top-k ({topk})")
            if m > num_experts:
                raise PruningError(
                    f"--keep {m}: above the model's number of experts ({num_experts})"
                )
    return tuple(sorted(set(sizes), reverse=True))
