"""Expert orders and keep masks of domain expert pruning, on hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_edl.core import pruning


def _mass():
    # 1 layer, 2 domains, 4 experts: domain 0 prefers experts 2 > 0 > 3 > 1, domain 1 1 > 3 > 0 = 2
    return np.array([[[3.0, 0.5, 9.0, 1.0], [0.2, 5.0, 0.2, 4.0]]])


def test_domain_order_by_descending_mass_ties_lower_index_first():
    np.testing.assert_array_equal(pruning.domain_order(_mass()), [[[2, 0, 3, 1], [1, 3, 0, 2]]])


def test_global_order_sums_domains_and_is_shared():
    # sums: 3.2, 5.5, 9.2, 5.0 -> 2, 1, 3, 0 for both domains
    np.testing.assert_array_equal(pruning.global_order(_mass()), [[[2, 1, 3, 0], [2, 1, 3, 0]]])


def test_empty_domain_falls_back_to_the_global_order():
    mass = np.concatenate([_mass(), np.zeros((1, 1, 4))], axis=1)
    np.testing.assert_array_equal(pruning.domain_order(mass)[0, 2], [2, 1, 3, 0])


def test_random_order_is_seeded_and_a_permutation():
    a = pruning.random_order(2, 3, 8, seed=4)
    np.testing.assert_array_equal(a, pruning.random_order(2, 3, 8, seed=4))
    assert not np.array_equal(a, pruning.random_order(2, 3, 8, seed=5))
    np.testing.assert_array_equal(np.sort(a, axis=-1), np.broadcast_to(np.arange(8), a.shape))


def test_keep_mask_takes_the_first_m_of_each_order():
    mask = pruning.keep_mask(pruning.domain_order(_mass()), 2)
    np.testing.assert_array_equal(mask, [[[True, False, True, False], [False, True, False, True]]])
    with pytest.raises(pruning.PruningError, match="between 1 and E = 4, got 5"):
        pruning.keep_mask(pruning.domain_order(_mass()), 5)


def test_keep_sizes_default_and_refusals():
    assert pruning.keep_sizes(8, 2) == (8, 4, 2)
    assert pruning.keep_sizes(32, 2) == (32, 16, 8, 2)
    assert pruning.keep_sizes(64, 4, [4, 16, 16]) == (16, 4)
    with pytest.raises(pruning.PruningError, match="--keep 1: below the router's top-k"):
        pruning.keep_sizes(8, 2, [1])
    with pytest.raises(pruning.PruningError, match="--keep 9: above"):
        pruning.keep_sizes(8, 2, [9])
    with pytest.raises(pruning.PruningError, match="ranking must be one of"):
        pruning.expert_order("best", _mass())


def test_export_experts_keep_the_domains_first_m_in_ascending_id():
    order = pruning.domain_order(_mass())  # domain 0: 2, 0, 3, 1; domain 1: 1, 3, 0, 2
    np.testing.assert_array_equal(pruning.export_experts(order, 0, 2), [[0, 2]])
    np.testing.assert_array_equal(pruning.export_experts(order, 1, 3), [[0, 1, 3]])
    assert pruning.export_experts(order, 1, 3).dtype == np.int64
    with pytest.raises(pruning.PruningError, match="between 0 and 1, got 2"):
        pruning.export_experts(order, 2, 2)
    with pytest.raises(pruning.PruningError, match="between 1 and E = 4, got 0"):
        pruning.export_experts(order, 0, 0)
