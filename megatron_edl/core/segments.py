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
    # The K segments are few (a handful per sample): plain Python on lists, then one np.repeat
    # per output to expand them to the S tokens. This runs once per sample in the data loader,
    # where a numpy call costs about a microsecond whatever its size; Megatron's own sample
    # assembly loops over the same segments in Python.
    domains_K = _as_list(segment_domains_K, "segment_domains_K")
    lengths_K = _as_list(segment_lengths_K, "segment_lengths_K")
    if len(domains_K) != len(lengths_K):
        raise ValueError(
            f"segment_domains_K ({len(domains_K)},) and segment_lengths_K ({len(lengths_K)},) "
            "must be 1-D of equal length"
        )
    if min(lengths_K, default=0) < 0:
        raise ValueError(f"segment lengths must be >= 0, got {lengths_K}")

    # Cut the segments to the first num_tokens tokens; pad with an unlabelled one.
    kept_K, covered = [], 0
    for length in lengths_K:
        kept = min(length, num_tokens - covered)
        kept_K.append(kept)
        covered += kept
    if covered < num_tokens:  # a padded sample: the rest is unlabelled
        domains_K.append(-1)
        kept_K.append(num_tokens - covered)

    if aggregation == "segment":
        segment_w_K = [
            1.0 / k if d >= 0 and k > 0 else 0.0 for d, k in zip(domains_K, kept_K, strict=True)
        ]
    elif aggregation == "token":
        segment_w_K = [1.0 if d >= 0 else 0.0 for d in domains_K]
    else:  # sample: the domain holding most labelled tokens (ties: the smallest id)
        tokens_per_domain: dict[int, int] = {}
        for d, k in zip(domains_K, kept_K, strict=True):
            if d >= 0 and k > 0:
                tokens_per_domain[d] = tokens_per_domain.get(d, 0) + k
        num_labelled = sum(tokens_per_domain.values())
        if num_labelled:
            best = min(tokens_per_domain, key=lambda d: (-tokens_per_domain[d], d))
            domains_K = [best if d >= 0 else d for d in domains_K]
        segment_w_K = [1.0 / max(num_labelled, 1) if d >= 0 else 0.0 for d in domains_K]

    domain_ids_S = np.repeat(np.array(domains_K, dtype=np.int64), kept_K)
    weights_S = np.repeat(np.array(segment_w_K, dtype=np.float32), kept_K)
    return domain_ids_S, weights_S


def _as_list(values: Sequence[int] | np.ndarray, name: str) -> list[int]:
    """``values`` as a list of Python ints; ``ValueError`` unless one-dimensional."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"{name} must be 1-D of equal length, got shape {values.shape}")
        return values.tolist()
    return [int(v) for v in values]
