"""The fast paths of the EDL math and data code against their straightforward definitions.

``domain_sums`` and ``pairwise_jsd`` run their backward through custom autograd functions (one
``embedding_bag`` instead of gather-then-multiply; the analytic JSD derivative instead of the
graph of ~15 elementwise ops) for speed (docs/BENCHMARKS.md). Here the straightforward autograd
formulas they replace are the references: same forward values, same gradients, including the
conventions at exact zeros (0 log 0 = 0) and for absent domains. ``sample_token_labels`` works
on segments and expands with ``np.repeat`` (no masks over the tokens, it runs once per sample in
the data loader); its reference labels one token at a time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_edl.core.edl import domain_sums, edl_loss, pairwise_jsd
from megatron_edl.core.segments import sample_token_labels


def _reference_jsd(dists_DE: torch.Tensor) -> torch.Tensor:
    """``pairwise_jsd`` as a plain autograd graph (the formula of its docstring)."""
    p_D1E, q_1DE = dists_DE[:, None, :], dists_DE[None, :, :]
    s_DDE = p_D1E + q_1DE
    safe_s_DDE = torch.where(s_DDE > 0, s_DDE, 1.0)
    delta_DDE = (p_D1E - q_1DE) / safe_s_DDE
    near_DDE = delta_DDE.abs() < 0.5
    ratio_DDE = torch.where(p_D1E > 0, 2.0 * p_D1E / safe_s_DDE, 1.0)
    log_ratio_DDE = torch.where(
        near_DDE, torch.log1p(torch.where(near_DDE, delta_DDE, 0.0)), torch.log(ratio_DDE)
    )
    kl_DD = (p_D1E * log_ratio_DDE).sum(dim=-1)
    return (0.5 * (kl_DD + kl_DD.T)).clamp_min(0.0)


def _reference_sums(probs_TE, ids_T, w_T, num_domains):
    labelled_T = ids_T >= 0
    w_T = torch.where(labelled_T, w_T, 0.0)
    index_T = torch.where(labelled_T, ids_T, 0)
    sums_DE = torch.zeros(num_domains, probs_TE.shape[1], dtype=probs_TE.dtype)
    return sums_DE.index_add(0, index_T, probs_TE * w_T[:, None])


def _distributions(gen: torch.Generator, num_rows: int, num_experts: int, zeros: float):
    """Rows of a softmax with a fraction ``zeros`` of exact zeros; row 0 all zero (absent)."""
    dists_DE = torch.softmax(3 * torch.randn(num_rows, num_experts, generator=gen), -1)
    dists_DE = torch.where(torch.rand(dists_DE.shape, generator=gen) < zeros, 0.0, dists_DE)
    dists_DE = dists_DE / dists_DE.sum(-1, keepdim=True).clamp_min(1e-30)
    dists_DE[0] = 0.0
    return dists_DE.double()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_rows=st.integers(2, 7),
    num_experts=st.integers(1, 9),
    zeros=st.sampled_from([0.0, 0.3, 0.7]),
)
def test_jsd_value_and_gradient_match_the_autograd_formula(seed, num_rows, num_experts, zeros):
    gen = torch.Generator().manual_seed(seed)
    dists_DE = _distributions(gen, num_rows, num_experts, zeros)
    grad_DD = torch.randn(num_rows, num_rows, generator=gen, dtype=torch.float64)
    results = []
    for fn in (pairwise_jsd, lambda dists_DE: _reference_jsd(dists_DE)):
        leaf_DE = dists_DE.clone().requires_grad_()
        jsd_DD = fn(dists_DE=leaf_DE)
        jsd_DD.backward(grad_DD)
        results.append((jsd_DD.detach(), leaf_DE.grad))
    (jsd, grad), (ref_jsd, ref_grad) = results
    assert torch.equal(jsd, ref_jsd)  # same formula, same operations: bitwise
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(grad).all()


def test_jsd_gradient_at_exact_zeros_is_the_autograd_convention():
    """P_e = 0 < Q_e: -1/2 per unit of upstream gradient (from the Q-side term), not 0 and not
    -inf; P_e = Q_e = 0: 0. Hand-computed for two rows."""
    dists_DE = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    jsd_DD = pairwise_jsd(dists_DE=dists_DE)
    jsd_DD[0, 1].backward()
    # d JSD / d P_e = 1/2 log(P_e / M_e) for P_e > 0; M = (0.25, 0.75, 0).
    expected_P = [-0.5, 0.5 * torch.log(torch.tensor(1.0 / 0.75)).item(), 0.0]
    expected_Q = [
        0.5 * torch.log(torch.tensor(2.0)).item(),
        0.5 * torch.log(torch.tensor(0.5 / 0.75)).item(),
        0.0,
    ]
    torch.testing.assert_close(dists_DE.grad, torch.tensor([expected_P, expected_Q]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_domain_sums_value_and_gradient_match_index_add_autograd(dtype):
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_experts, num_domains = 50, 6, 4
    probs_TE = torch.softmax(torch.randn(num_tokens, num_experts, generator=gen), -1).to(dtype)
    ids_T = torch.randint(-1, num_domains, (num_tokens,), generator=gen)
    w_T = torch.rand(num_tokens, generator=gen, dtype=dtype)
    grad_DE = torch.randn(num_domains, num_experts, generator=gen, dtype=dtype)
    results = []
    for fast in (True, False):
        leaf_TE = probs_TE.clone().requires_grad_()
        if fast:
            sums_DE, _ = domain_sums(
                probs_TE=leaf_TE, domain_ids_T=ids_T, weights_T=w_T, num_domains=num_domains
            )
        else:
            sums_DE = _reference_sums(leaf_TE, ids_T, w_T, num_domains)
        sums_DE.backward(grad_DE)
        results.append((sums_DE.detach(), leaf_TE.grad))
    (sums, grad), (ref_sums, ref_grad) = results
    assert torch.equal(sums, ref_sums)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    assert torch.all(grad[ids_T < 0] == 0)


def test_loss_gradient_with_an_absent_domain_matches_the_reference():
    """End to end through edl_loss: domain 2 absent, some exact zeros in the means."""
    gen = torch.Generator().manual_seed(5)
    sums_DE = _distributions(gen, 4, 5, 0.3)[[1, 2, 0, 3]] * 7.0
    counts_D = torch.tensor([7.0, 7.0, 0.0, 7.0], dtype=torch.float64)
    grads = []
    for jsd_fn in (None, _reference_jsd):
        leaf_DE = sums_DE.clone().requires_grad_()
        if jsd_fn is None:
            loss = edl_loss(sums_DE=leaf_DE, counts_D=counts_D).loss
        else:
            means_DE = leaf_DE / torch.where(counts_D > 0, counts_D, 1.0)[:, None]
            jsd_DD = jsd_fn(means_DE)
            pairs_DD = torch.ones(4, 4, dtype=torch.bool).triu(1)
            pairs_DD[2, :] = pairs_DD[:, 2] = False
            loss = torch.where(pairs_DD, -torch.log(jsd_DD + 1e-6), 0.0).sum() / pairs_DD.sum()
        loss.backward()
        grads.append(leaf_DE.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    assert torch.all(grads[0][2] == 0)


def _reference_token_labels(domains, lengths, num_tokens, aggregation):
    """One token at a time: the definition of ``sample_token_labels``."""
    ids, seg = [], []
    for k, (domain, length) in enumerate(zip(domains, lengths, strict=True)):
        ids += [domain] * length
        seg += [k] * length
    ids, seg = ids[:num_tokens], seg[:num_tokens]
    ids += [-1] * (num_tokens - len(ids))
    seg += [-1] * (num_tokens - len(seg))
    weights = [0.0] * num_tokens
    labelled = [i for i in range(num_tokens) if ids[i] >= 0]
    if aggregation == "segment":
        for i in labelled:
            weights[i] = 1.0 / seg.count(seg[i])
    elif aggregation == "token":
        for i in labelled:
            weights[i] = 1.0
    elif labelled:
        counts = {d: sum(ids[i] == d for i in labelled) for d in {ids[i] for i in labelled}}
        best = min(counts, key=lambda d: (-counts[d], d))
        for i in labelled:
            ids[i], weights[i] = best, 1.0 / len(labelled)
    return np.array(ids, dtype=np.int64), np.array(weights, dtype=np.float32)


@settings(max_examples=300, deadline=None)
@given(
    segments=st.lists(st.tuples(st.integers(-1, 4), st.integers(0, 12)), max_size=8),
    num_tokens=st.integers(1, 40),
    aggregation=st.sampled_from(["segment", "token", "sample"]),
)
def test_sample_token_labels_match_the_token_by_token_definition(segments, num_tokens, aggregation):
    domains = [d for d, _ in segments]
    lengths = [n for _, n in segments]
    ids_S, weights_S = sample_token_labels(
        segment_domains_K=domains,
        segment_lengths_K=lengths,
        num_tokens=num_tokens,
        aggregation=aggregation,
    )
    ref_ids_S, ref_weights_S = _reference_token_labels(domains, lengths, num_tokens, aggregation)
    assert ids_S.dtype == np.int64 and weights_S.dtype == np.float32
    np.testing.assert_array_equal(ids_S, ref_ids_S)
    np.testing.assert_array_equal(weights_S, ref_weights_S)
