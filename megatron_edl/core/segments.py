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

from megatron_edl.core.options import EDLAggregation

AGGREGATIONS = tuple(aggregation.value for aggregation in EDLAggregation)
"""``segment``, ``token``, ``sample``: the values of ``--moe-edl-aggregation``."""


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


class SampleLabelIndex:
    """The run-length labels of every sample of a GPT dataset, built once from its indices.

    ``sample_token_labels`` does segment arithmetic for one sample at fetch time; this does the
    same arithmetic for all samples at once (numpy, vectorised) from Megatron's sample index, so
    that a fetch is two slices and two ``np.repeat`` calls (:meth:`labels`). The outputs are
    bitwise those of ``sample_token_labels`` for the ``segment`` and ``token`` aggregations
    (``sample`` is not indexed: ``SUPPORTED``).

    Megatron's ``GPTDataset`` packs sample ``j`` (before shuffling) from the document-index
    positions ``b..e`` of ``sample_index[j] = (b, o_b)`` and ``sample_index[j + 1] = (e, o_e)``:

        one document (b = e):  the part  [o_b, o_e + x)                 of document_index[b]
        several:               [o_b, L)  of b,  whole documents b+1..e-1,  [0, o_e + x) of e

    with L the document length and x = 1 if the dataset adds the extra (label) token. Segment
    lengths are cut to the first S tokens, a short sample is padded with an unlabelled segment,
    and weights follow the aggregation (1 / kept tokens for ``segment``, 1 for ``token``, 0 for
    unlabelled or empty segments). Per sample, the rows are its segments and one padding row
    (length 0 when the sample is full). Shape legend: N samples, R rows of all samples.

    Memory: about 20 bytes per row (documents per sample + 1) and 8 per sample.
    """

    SUPPORTED = ("segment", "token")

    def __init__(
        self,
        *,
        sample_index_N2: np.ndarray,
        document_index_M: np.ndarray,
        document_lengths_L: np.ndarray,
        document_domains_M: np.ndarray,
        num_tokens: int,
        extra_token: int,
        aggregation: str,
    ) -> None:
        """Build the index.

        Args:
            sample_index_N2: Megatron's sample index, shape ``(N + 1, 2)``: (document-index
                position, offset) of every sample boundary.
            document_index_M: Megatron's document index (document id per position).
            document_lengths_L: Tokens of every document, by document id.
            document_domains_M: Loss domain of the document at every document-index position
                (-1 = unlabelled).
            num_tokens: S, the tokens the model sees per sample.
            extra_token: 1 if each sample reads one more token (Megatron's
                ``add_extra_token_to_sequence``), else 0.
            aggregation: ``segment`` or ``token``.

        Raises:
            ValueError: On an aggregation outside ``SUPPORTED``.
        """
        if aggregation not in self.SUPPORTED:
            raise ValueError(f"aggregation {aggregation!r} is not indexed; use {self.SUPPORTED}")
        bounds_N2 = np.asarray(sample_index_N2, dtype=np.int64)
        beg_N, beg_off_N = bounds_N2[:-1, 0], bounds_N2[:-1, 1]
        end_N, end_off_N = bounds_N2[1:, 0], bounds_N2[1:, 1]
        parts_N = end_N - beg_N + 1
        num_samples = len(parts_N)
        rows_N = parts_N + 1  # the segments and one padding row
        first_row_N = np.cumsum(rows_N) - rows_N
        num_rows = int(rows_N.sum())

        # Per segment row: its sample, document-index position, offset and length.
        is_pad_R = np.zeros(num_rows, dtype=bool)
        is_pad_R[first_row_N + parts_N] = True
        seg_R = np.flatnonzero(~is_pad_R)
        sample_G = np.repeat(np.arange(num_samples), parts_N)
        pos_G = beg_N[sample_G] + (seg_R - first_row_N[sample_G])
        offset_G = np.where(pos_G == beg_N[sample_G], beg_off_N[sample_G], 0)
        full_G = np.asarray(document_lengths_L, dtype=np.int64)[document_index_M[pos_G]]
        last_G = pos_G == end_N[sample_G]
        length_G = np.where(last_G, end_off_N[sample_G] + extra_token, full_G) - offset_G

        # Cut to the first S tokens: kept = clip(S - tokens before the segment, 0, length).
        first_seg_N = np.cumsum(parts_N) - parts_N
        before_G = np.cumsum(length_G) - length_G
        before_G -= np.repeat(before_G[first_seg_N], parts_N)
        kept_G = np.clip(num_tokens - before_G, 0, length_G)

        kept_R = np.zeros(num_rows, dtype=np.int64)
        kept_R[seg_R] = kept_G
        covered_N = np.add.reduceat(kept_R, first_row_N) if num_rows else kept_R
        kept_R[first_row_N + parts_N] = np.maximum(num_tokens - covered_N, 0)
        domains_R = np.full(num_rows, -1, dtype=np.int64)
        domains_R[seg_R] = np.asarray(document_domains_M, dtype=np.int64)[pos_G]

        labelled_R = domains_R >= 0
        if aggregation == "segment":
            weights_R = np.zeros(num_rows, dtype=np.float64)
            use_R = labelled_R & (kept_R > 0)
            weights_R[use_R] = 1.0 / kept_R[use_R]
        else:
            weights_R = labelled_R.astype(np.float64)
        self.first_row_N1 = np.append(first_row_N, num_rows)
        self.domains_R = domains_R
        self.weights_R = weights_R.astype(np.float32)
        self.kept_R = kept_R

    def labels(self, sample: int) -> tuple[np.ndarray, np.ndarray]:
        """``(domain_ids_S int64, weights_S float32)`` of sample ``sample`` (before shuffling)."""
        a, b = self.first_row_N1[sample], self.first_row_N1[sample + 1]
        kept = self.kept_R[a:b]
        return np.repeat(self.domains_R[a:b], kept), np.repeat(self.weights_R[a:b], kept)
