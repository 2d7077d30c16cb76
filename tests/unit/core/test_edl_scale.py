"""The EDL loss with many domains: the present-rows, row-blocked pairwise JSD equals the dense form.

Above ``PAIRWISE_BLOCK_ELEMENTS`` (``D * D * E``) ``edl_loss`` keeps only the present domains
and ``pairwise_jsd`` works in row blocks, so memory follows the domains present, not the
largest id (issue 26, item 12). ``block_elements=1`` forces that path on small inputs, where the
dense form (the first version's, ``tests/unit/core/test_edl.py``) is the reference: the same
values and gradients. One test runs 1,000 labels with a few hundred present and bounds the peak
memory of a fresh process (docs/BENCHMARKS.md section 2).

Shape legend: D domains, M present domains, E experts.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_edl.core.edl import PAIRWISE_BLOCK_ELEMENTS, edl_loss, pairwise_jsd

PROPS = settings(deadline=None, max_examples=40)
LN2 = math.log(2.0)


def _statistics(seed: int, num_domains: int, num_experts: int, present: list[bool], zeros: float):
    """Random (sums_DE, counts_D) in fp64: absent rows zero, some entries exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    sums_DE = torch.rand(num_domains, num_experts, generator=gen, dtype=torch.float64)
    sums_DE[torch.rand(num_domains, num_experts, generator=gen) < zeros] = 0.0
    counts_D = torch.rand(num_domains, generator=gen, dtype=torch.float64) + 0.5
    present_D = torch.tensor(present)
    counts_D = torch.where(present_D, counts_D, 0.0)
    sums_DE = torch.where(present_D[:, None], sums_DE, 0.0)
    return sums_DE, counts_D


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    num_domains=st.integers(1, 9),
    num_experts=st.integers(1, 6),
    zeros=st.sampled_from([0.0, 0.3, 0.7]),
    block_elements=st.integers(1, 60),
)
def test_row_blocks_give_the_one_pass_values_and_gradients(
    seed, num_domains, num_experts, zeros, block_elements
):
    sums_DE, _ = _statistics(seed, num_domains, num_experts, [True] * num_domains, zeros)
    sums_DE[:, 0] += 1e-3  # no all-zero row
    dists_DE = sums_DE / sums_DE.sum(-1, keepdim=True)
    dense_DE = dists_DE.clone().requires_grad_(True)
    blocked_DE = dists_DE.clone().requires_grad_(True)
    dense_DD = pairwise_jsd(dists_DE=dense_DE)
    blocked_DD = pairwise_jsd(dists_DE=blocked_DE, block_elements=block_elements)
    torch.testing.assert_close(blocked_DD, dense_DD, rtol=1e-13, atol=1e-15)
    upstream_DD = torch.rand(num_domains, num_domains, dtype=torch.float64)
    (grad_dense,) = torch.autograd.grad(dense_DD, dense_DE, upstream_DD)
    (grad_blocked,) = torch.autograd.grad(blocked_DD, blocked_DE, upstream_DD)
    torch.testing.assert_close(grad_blocked, grad_dense, rtol=1e-12, atol=1e-14)


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    present=st.lists(st.booleans(), min_size=1, max_size=10),
    num_experts=st.integers(1, 6),
    zeros=st.sampled_from([0.0, 0.5]),
    form=st.sampled_from(["log", "linear"]),
)
def test_present_rows_path_equals_the_dense_form(seed, present, num_experts, zeros, form):
    sums_DE, counts_D = _statistics(seed, len(present), num_experts, present, zeros)
    dense_DE = sums_DE.clone().requires_grad_(True)
    rows_DE = sums_DE.clone().requires_grad_(True)
    dense = edl_loss(sums_DE=dense_DE, counts_D=counts_D, form=form)
    rows = edl_loss(sums_DE=rows_DE, counts_D=counts_D, form=form, block_elements=1)
    torch.testing.assert_close(rows.loss, dense.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rows.mean_jsd, dense.mean_jsd, rtol=1e-12, atol=1e-14)
    assert int(rows.num_present) == int(dense.num_present) == sum(present)
    torch.testing.assert_close(rows.jsd_DD, dense.jsd_DD, rtol=1e-12, atol=1e-14, equal_nan=True)
    (grad_dense,) = torch.autograd.grad(dense.loss, dense_DE)
    (grad_rows,) = torch.autograd.grad(rows.loss, rows_DE)
    torch.testing.assert_close(grad_rows, grad_dense, rtol=1e-10, atol=1e-12)
    assert rows.loss.requires_grad  # M < 2: still a function of the sums (gradient zero)


def test_present_rows_path_hand_values():
    # Domains 0 and 3 are present and disjoint (JSD = ln 2), 1 and 2 are absent: one pair.
    sums_DE = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    counts_D = torch.tensor([2.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    for block_elements in (1, PAIRWISE_BLOCK_ELEMENTS):
        out = edl_loss(sums_DE=sums_DE, counts_D=counts_D, block_elements=block_elements)
        assert out.loss.item() == pytest.approx(-math.log(LN2 + 1e-6), rel=1e-12)
        assert out.mean_jsd.item() == pytest.approx(LN2, rel=1e-12)
        assert int(out.num_present) == 2
        assert out.jsd_DD[0, 3].item() == pytest.approx(LN2, rel=1e-12)
        assert out.jsd_DD[1].isnan().all() and out.jsd_DD[:, 2].isnan().all()
    out = edl_loss(sums_DE=sums_DE, counts_D=counts_D, block_elements=1, with_matrix=False)
    assert out.jsd_DD is None and out.loss.item() == pytest.approx(-math.log(LN2 + 1e-6))


def test_a_thousand_labels_a_few_hundred_present():
    num_domains, num_experts, num_present = 1000, 16, 300
    assert num_domains**2 * num_experts > PAIRWISE_BLOCK_ELEMENTS  # the present-rows path
    gen = torch.Generator().manual_seed(0)
    present_M = torch.randperm(num_domains, generator=gen)[:num_present].sort().values
    sums_DE = torch.zeros(num_domains, num_experts, dtype=torch.float64)
    sums_DE[present_M] = torch.rand(num_present, num_experts, generator=gen, dtype=torch.float64)
    counts_D = torch.zeros(num_domains, dtype=torch.float64)
    counts_D[present_M] = torch.rand(num_present, generator=gen, dtype=torch.float64) + 1.0
    sums_DE.requires_grad_(True)
    out = edl_loss(sums_DE=sums_DE, counts_D=counts_D)
    (grad_DE,) = torch.autograd.grad(out.loss, sums_DE)
    # Reference: the dense form on the present domains alone (300^2 x 16 is below the limit).
    compact_ME = sums_DE.detach()[present_M].clone().requires_grad_(True)
    ref = edl_loss(sums_DE=compact_ME, counts_D=counts_D[present_M])
    (grad_ME,) = torch.autograd.grad(ref.loss, compact_ME)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.mean_jsd, ref.mean_jsd, rtol=1e-12, atol=0)
    assert int(out.num_present) == num_present
    torch.testing.assert_close(grad_DE[present_M], grad_ME, rtol=1e-10, atol=1e-15)
    absent_D = torch.ones(num_domains, dtype=torch.bool)
    absent_D[present_M] = False
    assert (grad_DE[absent_D] == 0).all()


def test_a_thousand_labels_peak_memory_follows_the_present_domains():
    from megatron_edl.benchmarks.edl_memory import peak_memory

    point = peak_memory(1000, 64, 300, timeout_s=240)
    assert point.present == 300 and math.isfinite(point.loss)
    # The first version formed about five fp32 (D, D, E) tensors of 244 MiB each (1.2 GiB
    # measured); the present-rows, row-blocked form stays near 50 MiB.
    assert point.peak_mib < point.dense_mib / 2, point
