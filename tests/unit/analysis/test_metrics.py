"""Specialization metrics and the routing-statistics format on hand-built distributions.

Shape legend: L layers, D domains, E experts.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_edl.analysis import metrics
from megatron_edl.analysis.routing_stats import (
    FORMAT_VERSION,
    RoutingStats,
    group_domains,
    load_run,
    merge_parts,
    read_stats,
    sum_steps,
    write_stats,
)
from megatron_edl.config import EDLConfigError
from tests.helpers.routing_stats_helpers import specialised_loads, stats_from_loads

LN2 = math.log(2)

# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------


def test_identical_domains_have_zero_divergence() -> None:
    loads_LDE = np.tile([[0.1, 0.2, 0.3, 0.4]], (1, 3, 1))
    m = metrics.layer_metrics(stats_from_loads(loads_LDE, [[10, 20, 30]]), 1)
    assert m.mi == pytest.approx(0, abs=1e-12)
    assert m.mi_hard == pytest.approx(0, abs=1e-12)
    assert m.jsd_mean == pytest.approx(0, abs=1e-12)
    np.testing.assert_allclose(m.jsd_DD, 0, atol=1e-12)
    np.testing.assert_array_equal(m.jaccard_DD, 1.0)  # same top-2 {3, 2} everywhere
    assert m.jaccard_mean == 1.0


@pytest.mark.parametrize("num_domains", [2, 3, 4])
def test_disjoint_experts_equal_weights_give_ln_d(num_domains: int) -> None:
    loads_LDE = specialised_loads(1, num_domains, 2 * num_domains, strength=1.0)
    stats = stats_from_loads(loads_LDE, [[50.0] * num_domains])
    m = metrics.layer_metrics(stats, 1)
    assert m.mi == pytest.approx(math.log(num_domains), rel=1e-12)
    assert m.mi_hard == pytest.approx(math.log(num_domains), rel=1e-12)
    off_diagonal = ~np.eye(num_domains, dtype=bool)
    np.testing.assert_allclose(m.jsd_DD[off_diagonal], LN2, rtol=1e-12)
    assert m.jsd_mean == pytest.approx(LN2)
    np.testing.assert_array_equal(m.jaccard_DD[off_diagonal], 0.0)
    # Each domain spreads over 2 of 2D experts: H = ln 2, normalised ln 2 / ln 2D.
    np.testing.assert_allclose(m.domain_entropy_D, LN2 / math.log(2 * num_domains))
    # Every expert serves one domain: its mix is one-hot.
    np.testing.assert_allclose(m.expert_mix_DE.max(axis=0), 1.0)


def test_disjoint_experts_unequal_weights_give_domain_entropy() -> None:
    loads_LDE = specialised_loads(1, 2, 4, strength=1.0)
    m = metrics.layer_metrics(stats_from_loads(loads_LDE, [[10.0, 30.0]]), 1)
    w = np.array([0.25, 0.75])
    assert m.mi == pytest.approx(float(-(w * np.log(w)).sum()), rel=1e-12)


def test_hand_computed_jsd_and_shares() -> None:
    # P = (1, 0), Q = (1/2, 1/2): M = (3/4, 1/4);
    # JSD = 1/2 [ln(4/3)] + 1/2 [1/2 ln(2/3) + 1/2 ln 2] = 1/2 ln(4/3) + 1/4 ln(4/3).
    loads_LDE = np.array([[[1.0, 0.0], [0.5, 0.5]]])
    m = metrics.layer_metrics(stats_from_loads(loads_LDE, [[4, 4]], topk=1), 1)
    assert m.jsd_DD[0, 1] == pytest.approx(0.75 * math.log(4 / 3), rel=1e-12)
    np.testing.assert_allclose(m.load_hard_DE, loads_LDE[0])
    np.testing.assert_allclose(m.load_dense_DE, loads_LDE[0])


def test_jaccard_of_top_m_sets() -> None:
    # Top-2 sets: d0 {0, 1}, d1 {1, 2}, d2 {3, 0}: J(0,1) = 1/3, J(0,2) = 1/3, J(1,2) = 0.
    shares_DE = np.array([[0.5, 0.4, 0.1, 0.0], [0.0, 0.5, 0.4, 0.1], [0.3, 0.1, 0.1, 0.5]])
    jaccard_DD = metrics.top_m_jaccard(shares_DE, 2)
    np.testing.assert_allclose(
        jaccard_DD, [[1, 1 / 3, 1 / 3], [1 / 3, 1, 0], [1 / 3, 0, 1]], rtol=1e-12
    )
    assert metrics.mean_over_pairs(jaccard_DD) == pytest.approx(2 / 9)
    # m = 1: {0}, {1}, {3}; m = E: everything overlaps fully.
    np.testing.assert_array_equal(metrics.top_m_jaccard(shares_DE, 1), np.eye(3))
    np.testing.assert_array_equal(metrics.top_m_jaccard(shares_DE, 4), np.ones((3, 3)))
    # Ties go to the lower expert index: {0, 1} for both.
    assert metrics.top_m_jaccard(np.full((2, 4), 0.25), 2)[0, 1] == 1.0
    with pytest.raises(ValueError, match="m=5"):
        metrics.top_m_jaccard(shares_DE, 5)


def test_load_balance() -> None:
    balanced = metrics.load_balance(np.array([2.0, 2, 2, 2]))
    assert (balanced.max_over_mean, balanced.cv, balanced.min_over_max) == (1.0, 0.0, 1.0)
    assert balanced.dead_experts == 0
    skewed = metrics.load_balance(np.array([4.0, 0, 2, 2]))
    assert skewed.max_over_mean == 2.0
    assert skewed.cv == pytest.approx(math.sqrt(2) / 2)  # std sqrt((4+4+0+0)/4), mean 2
    assert skewed.min_over_max == 0.0
    assert skewed.dead_experts == 1
    assert math.isnan(metrics.load_balance(np.zeros(3)).cv)


def test_balance_counts_unlabelled_tokens() -> None:
    # Labelled tokens use experts 0-1 only; unlabelled ones spread uniformly over 4 experts.
    loads_LDE = np.array([[[0.5, 0.5, 0.0, 0.0]]])
    labelled = metrics.layer_metrics(stats_from_loads(loads_LDE, [[8]], topk=1), 1)
    assert labelled.balance.dead_experts == 2
    both = metrics.layer_metrics(stats_from_loads(loads_LDE, [[8]], topk=1, unlabelled_tokens=8), 1)
    # loads (4+2, 4+2, 2, 2): mean 4, max 6.
    assert both.balance.dead_experts == 0
    assert both.balance.max_over_mean == pytest.approx(1.5)


def test_entropies() -> None:
    loads_LDE = np.array([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]])
    m = metrics.layer_metrics(
        stats_from_loads(loads_LDE, [[3, 1]], entropy_per_token=math.log(4) / 2), 1
    )
    np.testing.assert_allclose(m.domain_entropy_D, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(m.token_entropy_D, [0.5, 0.5])
    assert m.token_entropy == pytest.approx(0.5)


def test_absent_domains_are_nan_and_left_out() -> None:
    loads_LDE = specialised_loads(1, 3, 6, strength=1.0)
    m = metrics.layer_metrics(stats_from_loads(loads_LDE, [[10, 0, 10]]), 1)
    assert m.present_D.tolist() == [True, False, True]
    assert np.isnan(m.load_hard_DE[1]).all() and np.isnan(m.jsd_DD[1]).all()
    assert np.isnan(m.domain_entropy_D[1]) and np.isnan(m.jaccard_DD[:, 1]).all()
    assert m.jsd_mean == pytest.approx(LN2)  # the one present pair
    assert m.mi == pytest.approx(LN2)  # two present domains of equal weight
    np.testing.assert_array_equal(m.expert_mix_DE[1, [0, 1, 4, 5]], 0.0)
    assert np.isnan(m.expert_mix_DE[:, 2:4]).all()  # the absent domain's experts: unused


def test_expert_mix_normalises_by_domain_size() -> None:
    # Expert 0 takes half of each domain's load although domain 1 is 9x larger: mix (1/2, 1/2).
    loads_LDE = np.array([[[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]]])
    m = metrics.layer_metrics(stats_from_loads(loads_LDE, [[10, 90]], topk=1), 1)
    np.testing.assert_allclose(m.expert_mix_DE[:, 0], [0.5, 0.5])
    np.testing.assert_allclose(m.expert_mix_DE[:, 1], [1.0, 0.0])
    np.testing.assert_allclose(m.expert_mix_DE[:, 2], [0.0, 1.0])


def test_per_domain_lm_loss() -> None:
    stats = stats_from_loads(
        specialised_loads(1, 2, 4, 0.5), [[4, 2]], lm_loss_D=np.array([2.0, 3.0]), source="probe"
    )
    np.testing.assert_allclose(metrics.layer_metrics(stats, 1).lm_loss_D, [2.0, 3.0])


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda d: st.tuples(
            st.just(d),
            st.integers(2, 6),
            st.integers(0, 2**31 - 1),
        )
    )
)
def test_bounds_and_grouping_cannot_raise_mi(case) -> None:
    num_domains, num_experts, seed = case
    rng = np.random.default_rng(seed)
    loads_LDE = rng.dirichlet(np.full(num_experts, 0.3), size=(1, num_domains))
    tokens_LD = rng.integers(1, 100, size=(1, num_domains)).astype(float)
    stats = stats_from_loads(loads_LDE, tokens_LD, topk=1)
    m = metrics.layer_metrics(stats, 1)
    assert -1e-12 <= m.mi <= min(math.log(num_domains), math.log(num_experts)) + 1e-9
    finite = m.jsd_DD[np.isfinite(m.jsd_DD)]
    assert np.all(finite >= 0) and np.all(finite <= LN2 + 1e-12)
    assert np.all((m.jaccard_DD >= 0) & (m.jaccard_DD <= 1))
    np.testing.assert_allclose(m.expert_mix_DE.sum(axis=0)[np.isfinite(m.expert_mix_DE[0])], 1)
    # Merging domains 0 and 1 is a function of the domain: I(D'; E) <= I(D; E).
    coarse = ["a", "a", *[f"c{d}" for d in range(2, num_domains)]]
    label_map = {
        "domains": sorted(set(coarse)),
        "map": {f"d{d}": c for d, c in enumerate(coarse)},
    }
    grouped = metrics.layer_metrics(group_domains(stats, label_map), 1)
    assert grouped.mi <= m.mi + 1e-9


# ---------------------------------------------------------------------------------------------
# Format, merging, grouping
# ---------------------------------------------------------------------------------------------


def _assert_same(a: RoutingStats, b: RoutingStats) -> None:
    assert (a.step, a.source, a.layers, a.domains, a.num_experts, a.topk) == (
        b.step, b.source, b.layers, b.domains, b.num_experts, b.topk,
    )  # fmt: skip
    assert a.arrays().keys() == b.arrays().keys()
    for name, array in a.arrays().items():
        np.testing.assert_array_equal(array, b.arrays()[name], err_msg=name)


def test_round_trip_and_parts(tmp_path) -> None:
    whole = stats_from_loads(
        specialised_loads(3, 2, 4, 0.7), np.arange(1, 7).reshape(3, 2), layers=(2, 4, 6)
    )
    path = write_stats(whole, tmp_path / "one")
    meta = json.loads(path.read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["layers"] == [2, 4, 6] and meta["domains"] == ["d0", "d1"]
    assert set(meta["arrays"]) == set(whole.arrays())
    _assert_same(read_stats(path), whole)
    # Pipeline stages write their own layers; the reader joins them.
    write_stats(whole.select_layers([6]), tmp_path / "parts", part="l006")
    write_stats(whole.select_layers([2, 4]), tmp_path / "parts", part="l002")
    (tmp_path / "parts" / "unrelated.json").write_text('{"x": 1}')
    (loaded,) = load_run(tmp_path / "parts")
    _assert_same(loaded, whole)
    with pytest.raises(ValueError, match="share layers"):
        merge_parts([whole, whole])


def test_reader_refuses_other_versions_and_bad_shapes(tmp_path) -> None:
    stats = stats_from_loads(specialised_loads(1, 2, 4, 0.5), [[1, 2]])
    path = write_stats(stats, tmp_path)
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        read_stats(path)
    path.write_text(json.dumps({**meta, "num_experts": 5}))
    with pytest.raises(ValueError, match="topk_counts_LDE must have shape"):
        read_stats(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no megatron-edl-routing-stats dumps"):
        load_run(tmp_path / "empty")
    with pytest.raises(ValueError, match="no such file"):
        load_run(tmp_path / "missing")


def test_sum_steps_adds_intervals() -> None:
    a = stats_from_loads(specialised_loads(1, 2, 4, 1.0), [[10, 10]], step=10)
    b = stats_from_loads(specialised_loads(1, 2, 4, 0.0), [[10, 10]], step=20)
    total = sum_steps([a, b])
    assert total.step == 20 and total.num_iterations == 10
    np.testing.assert_array_equal(total.tokens_LD, [[20, 20]])
    # Half specialised, half uniform: the mean shares are the average.
    np.testing.assert_allclose(
        metrics.layer_metrics(total, 1).load_dense_DE, specialised_loads(1, 2, 4, 0.5)[0]
    )


def test_group_domains_with_a_training_label_map(tmp_path) -> None:
    names = ("en/news", "en/sports", "zh/news", "math", "en/ads")
    loads_LDE = np.random.default_rng(0).dirichlet(np.ones(6), size=(2, 5))
    tokens_LD = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]], dtype=float)
    stats = stats_from_loads(loads_LDE, tokens_LD, domains=names)
    yaml_path = tmp_path / "coarse.yaml"
    yaml_path.write_text(
        "domains: [english, chinese, math]\n"
        "map:\n  'en/*': english\n  'zh/*': chinese\n  math: math\n  en/ads: null\n"
    )
    grouped = group_domains(stats, yaml_path)
    assert grouped.domains == ("english", "chinese", "math")
    np.testing.assert_array_equal(grouped.tokens_LD, [[3, 3, 4], [9, 3, 2]])
    np.testing.assert_allclose(
        grouped.prob_sums_LDE[:, 0], stats.prob_sums_LDE[:, 0] + stats.prob_sums_LDE[:, 1]
    )
    # The ignored label's tokens join the unlabelled ones (they still load the experts).
    np.testing.assert_array_equal(grouped.unlabelled_tokens_L, [5, 1])
    np.testing.assert_allclose(
        grouped.unlabelled_topk_counts_LE.sum() + grouped.topk_counts_LDE.sum(),
        stats.topk_counts_LDE.sum(),
    )
    with pytest.raises(EDLConfigError, match="math"):
        group_domains(stats, {"domains": ["english"], "map": {"en/*": "english"}})
