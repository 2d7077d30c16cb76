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

    # Cut the segments to the first num_tokens tokens. Everything below works on the K
    # segments and expands to the S tokens with one np.repeat per output (this runs once per
    # sample in the data loader: no boolean masks over S).
    ends_K = np.minimum(np.cumsum(lengths_K), num_tokens)
    kept_K = ends_K.copy()
    kept_K[1:] -= ends_K[:-1]
    labelled_K = (domains_K >= 0) & (kept_K > 0)

    if aggregation == "segment":
        segment_w_K = np.divide(1.0, kept_K, out=np.zeros(len(kept_K)), where=labelled_K)
    elif aggregation == "token":
        segment_w_K = labelled_K.astype(np.float64)
    else:  # sample: the domain holding most labelled tokens (ties: smallest id)
        num_labelled = int(kept_K[labelled_K].sum())
        if num_labelled:
            counts = np.bincount(domains_K[labelled_K], weights=kept_K[labelled_K])
            domains_K = np.where(labelled_K, int(np.argmax(counts)), domains_K)
        segment_w_K = np.where(labelled_K, 1.0 / max(num_labelled, 1), 0.0)

    domain_ids_S = np.repeat(np.where(labelled_K, domains_K, -1), kept_K)
    weights_S = np.repeat(segment_w_K.astype(np.float32), kept_K)
    covered = int(ends_K[-1]) if len(ends_K) else 0
    if covered < num_tokens:  # a padded sample: the rest is unlabelled
        domain_ids_S = np.concatenate([domain_ids_S, np.full(num_tokens - covered, -1)])
        weights_S = np.concatenate([weights_S, np.zeros(num_tokens - covered, np.float32)])
    return domain_ids_S, weights_S
