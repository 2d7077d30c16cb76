"""Per-token domain ids and EDL weights of one packed training sample (pure numpy).

A packed sample of ``S`` tokens is a concatenation of document parts (*segments*). Given the
domain of each segment's document and the segment lengths, this module gives every token its
domain id and its weight ``w_t`` in the per-domain sums of method.md section 2:

* ``segment`` (default, the paper's): ``w_t = 1 / T_s`` with ``T_s`` the number of tokens of the
  token's segment in this sample, so each segment counts once in ``n_j = sum_t w_t 1[d_t = j]``,
  whatever its length ("mean of segment means").
* ``token``: ``w_t = 1``: every token counts once.
* ``sample``: one label per sample, the domain holding most of its labelled tokens (ties: the
  smallest id); every labelled token gets it with ``w_t = 1 / (labelled tokens)``, so each sample
  counts once.

Weights are computed here, on the full sample, before any context- or sequence-parallel slicing,
so that sharded sums add up to the unsharded ones. Shape legend: ``S`` tokens of the sample,
``K`` segments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AGGREGATIONS = ("segment", "token", "sample")


def sample_token_labels(
    *,
    segment_domains_K: Sequence[int] | np.ndarray,
    segment_lengths_K: Sequence[int] | np.ndarray,
    num_tokens: int,
    aggregation: str = "segment",
) -> tuple[np.ndarray, np.ndarray]:
    """Token domain ids and weights of one sample.

    Args:
        segment_domains_K: Domain id of each segment's document (-1 = unlabelled).
        segment_lengths_K: Tokens of each segment, in order. Their sum may exceed ``num_tokens``
            (Megatron fetches one extra token for the shifted labels; the excess is cut from the
            end) or fall short of it (a padded sample: the rest is unlabelled).
        num_tokens: ``S``, the tokens the model sees for this sample.
        aggregation: ``segment``, ``token`` or ``sample`` (see the module docstring).

    Returns:
        ``(domain_ids_S int64, weights_S float32)``; unlabelled tokens have id -1 and weight 0.

    Raises:
        ValueError: on mismatched lengths, negative lengths or an unknown aggregation.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose from {AGGREGATIONS}")
    domains_K = np.asarray(segment_domains_K, dtype=np.int64)
    lengths_K = np.asarray(segment_lengths_K, dtype=np.int64)
    if domains_K.shape != lengths_K.shape or domains_K.ndim != 1:
        raise ValueError(
            f"segment_domains_K {domains_K.shape} and segment_lengths_K {lengths_K.shape} "
            "must be 1-D of equal length"
        )
    if (lengths_K < 0).any():
        raise ValueError(f"segment lengths must be >= 0, got {lengths_K.tolist()}")

    # Cut the segments to the first num_tokens tokens.
    ends_K = np.minimum(np.cumsum(lengths_K), num_tokens)
    starts_K = np.concatenate([[0], ends_K[:-1]]) if len(ends_K) else ends_K
    kept_K = ends_K - starts_K
    segment_S = np.full(num_tokens, -1, dtype=np.int64)
    segment_S[: int(kept_K.sum())] = np.repeat(np.arange(len(kept_K)), kept_K)

    labelled_S = segment_S >= 0
    domain_ids_S = np.full(num_tokens, -1, dtype=np.int64)
    domain_ids_S[labelled_S] = domains_K[segment_S[labelled_S]]
    labelled_S &= domain_ids_S >= 0

    weights_S = np.zeros(num_tokens, dtype=np.float32)
    if aggregation == "segment":
        weights_S[labelled_S] = 1.0 / kept_K[segment_S[labelled_S]]
    elif aggregation == "token":
        weights_S[labelled_S] = 1.0
    elif labelled_S.any():  # sample
        counts = np.bincount(domain_ids_S[labelled_S])
        domain_ids_S[labelled_S] = int(np.argmax(counts))
        weights_S[labelled_S] = 1.0 / labelled_S.sum()
    return domain_ids_S, weights_S
