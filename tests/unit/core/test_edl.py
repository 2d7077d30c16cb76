"""Unit tests of the pure EDL math in ``megatron_edl.core.edl`` (CPU, no process group).

References are computed independently of the implementation: plain Python loops in float64
(``math.log``, explicit KL sums), or values worked out by hand in the comments.

Shape legend: T tokens, E experts, D domains, B samples, S positions.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_edl.core.edl import (
    EDLLossOutput,
    domain_entropy,
    domain_means,
    domain_sums,
    edl_loss,
    mutual_information,
    pairwise_jsd,
    routing_probs,
    segment_weights_from_ids,
)

LN2 = math.log(2.0)
PROPS = settings(deadline=None, max_examples=50)


# ---------------------------------------------------------------------------------------------
# Independent references (float64, Python loops)
# ---------------------------------------------------------------------------------------------


def _ref_kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) with 0 log 0 = 0."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _ref_jsd(p: list[float], q: list[float]) -> float:
    """1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, with P/M written as 2p / (p + q)."""
    total = 0.0
    for pi, qi in zip(p, q, strict=True):
        for x in (pi, qi):
            if x > 0:
                total += 0.5 * x * math.log(2 * x / (pi + qi))
    return total


def _ref_domain_sums(probs, ids, weights, num_domains, num_experts):
    sums = [[0.0] * num_experts for _ in range(num_domains)]
    counts = [0.0] * num_domains
    for p_t, d_t, w_t in zip(probs, ids, weights, strict=True):
        if d_t < 0:
            continue
        counts[d_t] += w_t
        for e in range(num_experts):
            sums[d_t][e] += w_t * p_t[e]
    return sums, counts


def _ref_loss(means: list[list[float]], form: str, eps: float) -> float:
    """Pair average over the given (present) domain means."""
    terms = []
    for j in range(len(means)):
        for k in range(j + 1, len(means)):
            jsd = _ref_jsd(means[j], means[k])
            terms.append(-math.log(jsd + eps) if form == "log" else -jsd)
    return sum(terms) / len(terms) if terms else 0.0


def _ref_mutual_information(means: list[list[float]], weights: list[float]) -> float:
    """I(E;D) = Σ_j w_j KL(p̄_j || p̄): the KL form, not the entropy difference of the code."""
    total = sum(weights)
    w = [x / total for x in weights]
    num_experts = len(means[0])
    pbar = [sum(w[j] * means[j][e] for j in range(len(means))) for e in range(num_experts)]
    return sum(w[j] * _ref_kl(means[j], pbar) for j in range(len(means)))


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def _distributions(draw, min_rows=1, max_rows=5, min_cols=2, max_cols=6, zeros=True):
    """Rows of probability distributions, some with exact zeros."""
    rows = draw(st.integers(min_rows, max_rows))
    cols = draw(st.integers(min_cols, max_cols))
    out = []
    for _ in range(rows):
        lo = 0.0 if zeros else 0.05
        raw = draw(st.lists(st.floats(lo, 1.0), min_size=cols, max_size=cols))
        # Tiny entries (down to subnormals) as exact zeros: the float64 references would
        # otherwise divide by a mixture that underflowed to 0.
        raw = [0.0 if x < 1e-12 else x for x in raw]
        if zeros and draw(st.booleans()):
            raw[draw(st.integers(0, cols - 1))] = 0.0
        if sum(raw) == 0.0:
            raw[0] = 1.0
        total = sum(raw)
        out.append([x / total for x in raw])
    return out


@st.composite
def _token_batch(draw, max_tokens=24):
    """(probs_TE, domain_ids_T, weights_T, num_domains) as float64 tensors / int64 ids."""
    num_tokens = draw(st.integers(0, max_tokens))
    num_experts = draw(st.integers(1, 5))
    num_domains = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    probs_TE = torch.softmax(3 * torch.randn(num_tokens, num_experts, generator=gen), dim=-1)
    probs_TE = probs_TE.double()
    ids_T = torch.randint(-1, num_domains, (num_tokens,), generator=gen)
    weights_T = torch.rand(num_tokens, generator=gen, dtype=torch.float64) + 0.1
    return probs_TE, ids_T, weights_T, num_domains


# ---------------------------------------------------------------------------------------------
# routing_probs
# ---------------------------------------------------------------------------------------------


def test_routing_probs_is_fp32_softmax_for_low_precision_logits():
    logits_TE = torch.tensor([[0.0, math.log(3.0)], [5.0, 5.0]], dtype=torch.bfloat16)
    probs_TE = routing_probs(logits_TE=logits_TE)
    assert probs_TE.dtype == torch.float32
    # softmax([0, ln 3]) = [1/4, 3/4] (ln 3 rounds in bf16, hence the tolerance); equal -> 1/2.
    expected = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    torch.testing.assert_close(probs_TE, expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(probs_TE.sum(-1), torch.ones(2))


def test_routing_probs_keeps_fp64():
    assert routing_probs(logits_TE=torch.zeros(2, 3, dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# pairwise_jsd
# ---------------------------------------------------------------------------------------------


def test_jsd_of_disjoint_distributions_is_ln2():
    jsd_DD = pairwise_jsd(dists_DE=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(jsd_DD, torch.tensor([[0.0, LN2], [LN2, 0.0]]))


def test_jsd_hand_computed_value():
    # P = [1/2, 1/2], Q = [1, 0]  ->  M = [3/4, 1/4]
    # KL(P||M) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    # KL(Q||M) = 1 ln(1/(3/4)) + 0 = ln(4/3)
    # JSD = 1/2 (1/2 ln(4/3) + ln(4/3)) = 3/4 ln(4/3) = 0.215761...
    expected = 0.75 * math.log(4.0 / 3.0)
    jsd_DD = pairwise_jsd(dists_DE=torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64))
    assert jsd_DD[0, 1].item() == pytest.approx(expected, rel=1e-12)
    assert jsd_DD[1, 0].item() == pytest.approx(expected, rel=1e-12)


def test_jsd_is_accurate_in_fp32_for_nearly_equal_distributions():
    # At initialisation the domain means are nearly equal; their JSD (~1e-9 here) must not be
    # drowned by rounding, since the loss compares it with eps = 1e-6. In fp32, a difference
    # of entropies is off by ~1e-7 and sum(p * log(p / m)) by ~1e-8 here.
    base = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)
    bump = 1e-4 * torch.sin(torch.arange(64, dtype=torch.float64))
    q = base.double() * (1 + bump)
    dists_DE = torch.stack([base.double(), q / q.sum()]).float()
    ref = _ref_jsd(*dists_DE.double().tolist())  # float64 reference on the same fp32 inputs
    assert 1e-10 < ref < 1e-8
    got = pairwise_jsd(dists_DE=dists_DE)[0, 1].item()
    assert got == pytest.approx(ref, rel=1e-3)


@PROPS
@given(_distributions(min_rows=2))
def test_jsd_matches_reference_symmetric_and_bounded(rows):
    dists_DE = torch.tensor(rows, dtype=torch.float64)
    jsd_DD = pairwise_jsd(dists_DE=dists_DE)
    torch.testing.assert_close(jsd_DD, jsd_DD.T, rtol=0, atol=0)
    assert torch.all(jsd_DD >= 0)
    assert torch.all(jsd_DD <= LN2 + 1e-12)
    torch.testing.assert_close(jsd_DD.diagonal(), torch.zeros(len(rows), dtype=torch.float64))
    for j in range(len(rows)):
        for k in range(len(rows)):
            assert jsd_DD[j, k].item() == pytest.approx(
                _ref_jsd(rows[j], rows[k]), rel=1e-9, abs=1e-12
            )


def test_jsd_with_a_tiny_entry_against_a_large_one_in_fp32():
    # delta = (1e-8 - 1) / (1e-8 + 1) rounds to -1 in fp32, where log1p(delta) = -inf; the
    # tiny entry must still contribute ~0, not -inf or NaN. Reference: P=[1, 0], Q=[0, 1] -> ln 2
    # up to O(1e-8 * log 1e-8).
    dists_DE = torch.tensor([[1.0, 1e-8], [0.0, 1.0]], requires_grad=True)
    jsd_DD = pairwise_jsd(dists_DE=dists_DE)
    assert jsd_DD[0, 1].item() == pytest.approx(LN2, abs=1e-6)
    assert jsd_DD[1, 0].item() == pytest.approx(LN2, abs=1e-6)
    jsd_DD[0, 1].backward()
    assert torch.isfinite(dists_DE.grad).all()


def test_jsd_gradient_is_finite_where_both_distributions_are_zero():
    # Expert 2 is zero in both rows (M = 0 there), expert 1 is zero in one row only.
    dists_DE = torch.tensor([[0.5, 0.5, 0.0], [0.7, 0.0, 0.0]], requires_grad=True)
    jsd_DD = pairwise_jsd(dists_DE=dists_DE)
    jsd_DD[0, 1].backward()
    assert torch.isfinite(jsd_DD).all()
    assert torch.isfinite(dists_DE.grad).all()


# ---------------------------------------------------------------------------------------------
# domain_sums
# ---------------------------------------------------------------------------------------------


@PROPS
@given(_token_batch())
def test_domain_sums_matches_naive_loop(batch):
    probs_TE, ids_T, weights_T, num_domains = batch
    sums_DE, counts_D = domain_sums(
        probs_TE=probs_TE, domain_ids_T=ids_T, weights_T=weights_T, num_domains=num_domains
    )
    ref_sums, ref_counts = _ref_domain_sums(
        probs_TE.tolist(), ids_T.tolist(), weights_T.tolist(), num_domains, probs_TE.shape[1]
    )
    assert sums_DE.shape == (num_domains, probs_TE.shape[1])
    torch.testing.assert_close(sums_DE, torch.tensor(ref_sums, dtype=torch.float64))
    torch.testing.assert_close(counts_D, torch.tensor(ref_counts, dtype=torch.float64))


def test_domain_sums_token_mode_counts_tokens():
    probs_TE = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5], [1.0, 0.0]])
    ids_T = torch.tensor([1, -1, 1, 0])
    sums_DE, counts_D = domain_sums(probs_TE=probs_TE, domain_ids_T=ids_T, num_domains=3)
    torch.testing.assert_close(counts_D, torch.tensor([1.0, 2.0, 0.0]))
    torch.testing.assert_close(sums_DE, torch.tensor([[1.0, 0.0], [0.7, 1.3], [0.0, 0.0]]))


def test_domain_sums_ignores_label_minus_one_even_with_nan_weight_or_probs():
    probs_TE = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    ids_T = torch.tensor([0, -1])
    weights_T = torch.tensor([2.0, 5.0])
    base = domain_sums(probs_TE=probs_TE, domain_ids_T=ids_T, weights_T=weights_T, num_domains=2)
    # Change everything about the ignored token: results must not move.
    weights_T2 = torch.tensor([2.0, math.nan])
    probs_TE2 = torch.tensor([[0.3, 0.7], [0.0, 1.0]])
    other = domain_sums(probs_TE=probs_TE2, domain_ids_T=ids_T, weights_T=weights_T2, num_domains=2)
    torch.testing.assert_close(base, other)
    torch.testing.assert_close(base[1], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(base[0], torch.tensor([[0.6, 1.4], [0.0, 0.0]]))


def test_domain_sums_accumulates_in_fp32_and_is_differentiable():
    logits_TE = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    probs_TE = logits_TE.softmax(-1)  # stays bf16: domain_sums must cast up itself
    ids_T = torch.tensor([0, 0, 1, 1, -1, 2])
    sums_DE, counts_D = domain_sums(probs_TE=probs_TE, domain_ids_T=ids_T, num_domains=3)
    assert sums_DE.dtype == torch.float32 and counts_D.dtype == torch.float32
    (sums_DE * torch.arange(12.0).view(3, 4)).sum().backward()
    assert logits_TE.grad is not None
    assert logits_TE.grad[:4].abs().sum() > 0  # labelled tokens get gradient
    assert torch.all(logits_TE.grad[4] == 0)  # the ignored token does not


@pytest.mark.parametrize("bad_id", [3, 7, -2])
def test_domain_sums_rejects_out_of_range_ids_naming_the_value(bad_id):
    ids_T = torch.tensor([0, bad_id, 1])
    with pytest.raises(ValueError, match=rf"domain id {bad_id}\b.*num_domains=3"):
        domain_sums(probs_TE=torch.full((3, 2), 0.5), domain_ids_T=ids_T, num_domains=3)


def test_domain_sums_validate_false_skips_the_range_check_only():
    probs_TE = torch.full((3, 2), 0.5)
    ids_T = torch.tensor([0, 2, -1])
    checked = domain_sums(probs_TE=probs_TE, domain_ids_T=ids_T, num_domains=3)
    unchecked = domain_sums(probs_TE=probs_TE, domain_ids_T=ids_T, num_domains=3, validate=False)
    torch.testing.assert_close(checked, unchecked)
    with pytest.raises(ValueError, match=r"\(2,\)"):  # shape checks still run
        domain_sums(probs_TE=probs_TE[:2], domain_ids_T=ids_T, num_domains=3, validate=False)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"domain_ids_T": torch.tensor([0, 1])}, r"domain_ids_T must have shape \(3,\)"),
        ({"weights_T": torch.ones(4)}, r"weights_T must have shape \(3,\).*\(4,\)"),
        ({"domain_ids_T": torch.tensor([0.0, 1.0, 1.0])}, r"integer tensor.*float32"),
        ({"num_domains": 0}, r"num_domains must be >= 1, got 0"),
        ({"probs_TE": torch.ones(3)}, r"probs_TE must be 2-D.*\(3,\)"),
    ],
)
def test_domain_sums_rejects_bad_arguments(kwargs, pattern):
    args = {
        "probs_TE": torch.full((3, 2), 0.5),
        "domain_ids_T": torch.tensor([0, 1, -1]),
        "num_domains": 2,
    } | kwargs
    with pytest.raises(ValueError, match=pattern):
        domain_sums(**args)


@PROPS
@given(_token_batch(), st.lists(st.integers(0, 24), max_size=4))
def test_domain_sums_of_shards_add_up_to_the_whole(batch, cuts):
    # One SUM all-reduce suffices because the statistics are sums over tokens: any split of the
    # tokens into shards (TP-SP, CP, DP ranks) gives the same total.
    probs_TE, ids_T, weights_T, num_domains = batch
    num_tokens = probs_TE.shape[0]
    bounds = sorted({0, num_tokens, *(min(c, num_tokens) for c in cuts)})
    whole = domain_sums(
        probs_TE=probs_TE, domain_ids_T=ids_T, weights_T=weights_T, num_domains=num_domains
    )
    total_sums = torch.zeros_like(whole[0])
    total_counts = torch.zeros_like(whole[1])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = domain_sums(
            probs_TE=probs_TE[lo:hi],
            domain_ids_T=ids_T[lo:hi],
            weights_T=weights_T[lo:hi],
            num_domains=num_domains,
        )
        total_sums += part[0]
        total_counts += part[1]
    torch.testing.assert_close(total_sums, whole[0])
    torch.testing.assert_close(total_counts, whole[1])


# ---------------------------------------------------------------------------------------------
# segment weights
# ---------------------------------------------------------------------------------------------


def test_segment_weights_hand_examples():
    ids_BS = torch.tensor([[0, 0, 0, 1, 1, 2], [4, 4, 9, 4, 4, 4]])
    expected = torch.tensor(
        [
            [1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2, 1.0],
            # maximal runs: a repeated id after a break starts a new segment
            [1 / 2, 1 / 2, 1.0, 1 / 3, 1 / 3, 1 / 3],
        ]
    )
    torch.testing.assert_close(segment_weights_from_ids(segment_ids_BS=ids_BS), expected)


def test_segment_weights_runs_do_not_cross_rows():
    ids_BS = torch.full((3, 2), 5)
    torch.testing.assert_close(
        segment_weights_from_ids(segment_ids_BS=ids_BS), torch.full((3, 2), 0.5)
    )


def test_segment_weights_rejects_bad_input():
    with pytest.raises(ValueError, match=r"2-D.*\(4,\)"):
        segment_weights_from_ids(segment_ids_BS=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer.*float32"):
        segment_weights_from_ids(segment_ids_BS=torch.zeros(2, 4))


@st.composite
def _packed_samples(draw):
    """Packed rows of segments: [(domain, length), ...] per row, domain -1 for padding."""
    num_domains = draw(st.integers(1, 3))
    rows = draw(
        st.lists(
            st.lists(
                st.tuples(st.integers(-1, num_domains - 1), st.integers(1, 5)),
                min_size=1,
                max_size=4,
            ),
            min_size=1,
            max_size=3,
        )
    )
    seq_len = max(sum(length for _, length in row) for row in rows)
    # Pad every row to seq_len with an ignored segment.
    padded = []
    for row in rows:
        used = sum(n for _, n in row)
        padded.append(row + [(-1, seq_len - used)] if used < seq_len else row)
    seed = draw(st.integers(0, 2**31 - 1))
    return padded, seq_len, num_domains, seed


@PROPS
@given(_packed_samples())
def test_segment_weighted_domain_mean_is_mean_of_segment_means(sample):
    rows, seq_len, num_domains, seed = sample
    num_experts = 3
    gen = torch.Generator().manual_seed(seed)
    probs_BSE = torch.softmax(torch.randn(len(rows), seq_len, num_experts, generator=gen), -1)
    probs_BSE = probs_BSE.double()
    segment_ids, domain_ids = [], []
    for row in rows:
        # Alternate ids 0/1 per segment so that neighbouring segments differ.
        segment_ids.append([s % 2 for s, (_, n) in enumerate(row) for _ in range(n)])
        domain_ids.append([d for d, n in row for _ in range(n)])
    weights_BS = segment_weights_from_ids(segment_ids_BS=torch.tensor(segment_ids))
    sums_DE, counts_D = domain_sums(
        probs_TE=probs_BSE.view(-1, num_experts),
        domain_ids_T=torch.tensor(domain_ids).view(-1),
        weights_T=weights_BS.view(-1),
        num_domains=num_domains,
    )
    means_DE, present_D = domain_means(sums_DE=sums_DE, counts_D=counts_D)

    # The paper's definition, naively: mean over each segment, then mean over the segments.
    segment_means: dict[int, list[list[float]]] = {j: [] for j in range(num_domains)}
    for b, row in enumerate(rows):
        start = 0
        for d, n in row:
            if d >= 0:
                seg = probs_BSE[b, start : start + n].tolist()
                segment_means[d].append([sum(col) / n for col in zip(*seg, strict=True)])
            start += n
    for j in range(num_domains):
        assert counts_D[j].item() == pytest.approx(len(segment_means[j]), rel=1e-6)
        assert bool(present_D[j]) == bool(segment_means[j])
        if segment_means[j]:
            ref = [sum(col) / len(segment_means[j]) for col in zip(*segment_means[j], strict=True)]
            torch.testing.assert_close(
                means_DE[j], torch.tensor(ref, dtype=means_DE.dtype), rtol=1e-5, atol=1e-6
            )
        else:
            assert torch.all(means_DE[j] == 0)


# ---------------------------------------------------------------------------------------------
# edl_loss
# ---------------------------------------------------------------------------------------------


def _stats(means: list[list[float]], counts: list[float], dtype=torch.float64):
    counts_D = torch.tensor(counts, dtype=dtype)
    sums_DE = torch.tensor(means, dtype=dtype) * counts_D[:, None]
    return sums_DE, counts_D


@pytest.mark.parametrize("form", ["log", "linear"])
def test_loss_matches_reference_and_skips_absent_domains(form):
    means = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.25, 0.25, 0.5]]
    # Domain 2 is absent; the garbage in its sums row must not matter.
    sums_DE, counts_D = _stats(means, [2.0, 5.0, 0.0, 1.5])
    sums_DE[2] = torch.tensor([9.0, 0.0, 3.0], dtype=torch.float64)
    out = edl_loss(sums_DE=sums_DE, counts_D=counts_D, form=form)
    assert isinstance(out, EDLLossOutput)
    present = [means[0], means[1], means[3]]
    assert out.loss.item() == pytest.approx(_ref_loss(present, form, 1e-6), rel=1e-10)
    ref_mean_jsd = (
        _ref_jsd(means[0], means[1]) + _ref_jsd(means[0], means[3]) + _ref_jsd(means[1], means[3])
    ) / 3
    assert out.mean_jsd.item() == pytest.approx(ref_mean_jsd, rel=1e-10)
    assert out.num_present.item() == 3
    assert not out.mean_jsd.requires_grad and not out.jsd_DD.requires_grad
    assert torch.isnan(out.jsd_DD[2]).all() and torch.isnan(out.jsd_DD[:, 2]).all()
    assert out.jsd_DD[0, 1].item() == pytest.approx(_ref_jsd(means[0], means[1]), rel=1e-10)


def test_identical_domains_give_zero_jsd_and_log_loss_minus_log_eps():
    sums_DE, counts_D = _stats([[0.2, 0.3, 0.5]] * 3, [1.0, 4.0, 2.0])
    out_log = edl_loss(sums_DE=sums_DE, counts_D=counts_D, form="log", eps=1e-6)
    out_lin = edl_loss(sums_DE=sums_DE, counts_D=counts_D, form="linear")
    assert out_log.mean_jsd.item() == pytest.approx(0.0, abs=1e-15)
    assert out_log.loss.item() == pytest.approx(-math.log(1e-6), rel=1e-9)
    assert out_lin.loss.item() == pytest.approx(0.0, abs=1e-15)


def test_fully_separated_domains_reach_the_minimum():
    sums_DE, counts_D = _stats([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [1, 1, 1])
    out_log = edl_loss(sums_DE=sums_DE, counts_D=counts_D, form="log", eps=1e-6)
    out_lin = edl_loss(sums_DE=sums_DE, counts_D=counts_D, form="linear")
    assert out_log.loss.item() == pytest.approx(-math.log(LN2 + 1e-6), rel=1e-12)
    assert out_lin.loss.item() == pytest.approx(-LN2, rel=1e-12)


@pytest.mark.parametrize("form", ["log", "linear"])
def test_a_gradient_step_separates_the_domains(form):
    gen = torch.Generator().manual_seed(1)
    ids_T = torch.arange(12) % 3

    def run(logits_TE):
        sums_DE, counts_D = domain_sums(
            probs_TE=routing_probs(logits_TE=logits_TE), domain_ids_T=ids_T, num_domains=3
        )
        return edl_loss(sums_DE=sums_DE, counts_D=counts_D, form=form)

    logits_TE = (0.1 * torch.randn(12, 4, generator=gen)).requires_grad_()
    before = run(logits_TE)
    before.loss.backward()
    with torch.no_grad():
        after = run(logits_TE - 0.1 * logits_TE.grad / logits_TE.grad.norm())
    assert after.loss < before.loss
    assert after.mean_jsd > before.mean_jsd


@pytest.mark.parametrize("form", ["log", "linear"])
@pytest.mark.parametrize("ids", [[-1, -1, -1, -1], [2, 2, -1, 2], []])
def test_fewer_than_two_domains_give_zero_loss_that_still_backpropagates(form, ids):
    probs_TE = torch.softmax(torch.randn(len(ids), 3), -1).requires_grad_()
    sums_DE, counts_D = domain_sums(
        probs_TE=probs_TE, domain_ids_T=torch.tensor(ids, dtype=torch.long), num_domains=4
    )
    out = edl_loss(sums_DE=sums_DE, counts_D=counts_D, form=form)
    assert out.loss.item() == 0.0
    assert out.mean_jsd.item() == 0.0
    assert out.num_present.item() == len(set(ids) - {-1})
    assert out.loss.grad_fn is not None  # part of the graph on every rank
    out.loss.backward()
    assert probs_TE.grad is not None
    assert torch.all(probs_TE.grad == 0)


@pytest.mark.parametrize("form", ["log", "linear"])
def test_gradcheck_through_the_whole_pipeline(form):
    gen = torch.Generator().manual_seed(0)
    logits_TE = (2 * torch.randn(10, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    ids_T = torch.tensor([0, 0, 1, 1, 1, 3, 3, -1, 0, 3])  # domain 2 absent, one ignored token
    weights_T = torch.rand(10, generator=gen, dtype=torch.float64) + 0.5

    def fn(logits):
        sums_DE, counts_D = domain_sums(
            probs_TE=routing_probs(logits_TE=logits),
            domain_ids_T=ids_T,
            weights_T=weights_T,
            num_domains=4,
        )
        return edl_loss(sums_DE=sums_DE, counts_D=counts_D, form=form).loss

    assert fn(logits_TE).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (logits_TE,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("form", ["log", "linear"])
def test_exact_zeros_in_domain_means_keep_loss_and_gradient_finite(form):
    # fp32 softmax underflows to exact 0 for a logit gap of 1e4: domain 0 never uses experts
    # 2, 3; domain 1 never uses 0, 3; so expert 3 is zero in both means (M = 0 there).
    big = 1e4
    logits_TE = torch.tensor(
        [[0.0, 0.5, -big, -big], [0.3, 0.0, -big, -big], [-big, 0.0, 1.0, -big]],
        requires_grad=True,
    )
    ids_T = torch.tensor([0, 0, 1])
    probs_TE = routing_probs(logits_TE=logits_TE)
    sums_DE, counts_D = domain_sums(probs_TE=probs_TE, domain_ids_T=ids_T, num_domains=2)
    assert (sums_DE == 0).sum() == 4  # the zeros this test is about are really there
    out = edl_loss(sums_DE=sums_DE, counts_D=counts_D, form=form)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logits_TE.grad).all()
    assert logits_TE.grad.abs().sum() > 0


@pytest.mark.parametrize("form", ["log", "linear"])
def test_exact_zero_probs_as_leaf_give_finite_gradients(form):
    probs_TE = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    sums_DE, counts_D = domain_sums(
        probs_TE=probs_TE, domain_ids_T=torch.tensor([0, 1, 2]), num_domains=3
    )
    out = edl_loss(sums_DE=sums_DE, counts_D=counts_D, form=form)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(probs_TE.grad).all()


@pytest.mark.parametrize("form", ["log", "linear"])
def test_bf16_inputs_give_fp32_finite_outputs(form):
    logits_TE = torch.randn(16, 8, dtype=torch.bfloat16, requires_grad=True)
    ids_T = torch.arange(16) % 4
    sums_DE, counts_D = domain_sums(
        probs_TE=routing_probs(logits_TE=logits_TE), domain_ids_T=ids_T, num_domains=4
    )
    out = edl_loss(sums_DE=sums_DE.bfloat16(), counts_D=counts_D.bfloat16(), form=form)
    assert out.loss.dtype == torch.float32 and out.mean_jsd.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(out.mean_jsd)
    out.loss.backward()
    assert logits_TE.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits_TE.grad).all()
    mi = mutual_information(sums_DE=sums_DE.bfloat16(), counts_D=counts_D.bfloat16())
    assert mi.dtype == torch.float32 and torch.isfinite(mi)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"form": "quadratic"}, r"form must be 'log' or 'linear', got 'quadratic'"),
        ({"eps": 0.0}, r"eps must be > 0.*got 0.0"),
        ({"eps": -1e-3}, r"got -0.001"),
        ({"counts_D": torch.ones(3)}, r"\(2, 3\) and \(3,\)"),
    ],
)
def test_edl_loss_rejects_bad_arguments(kwargs, pattern):
    args = {"sums_DE": torch.ones(2, 3), "counts_D": torch.ones(2)} | kwargs
    with pytest.raises(ValueError, match=pattern):
        edl_loss(**args)


def test_linear_form_accepts_eps_zero():
    out = edl_loss(sums_DE=torch.eye(2), counts_D=torch.ones(2), form="linear", eps=0.0)
    assert out.loss.item() == pytest.approx(-LN2, rel=1e-6)


@PROPS
@given(_distributions(min_rows=1, max_rows=5), st.sampled_from(["log", "linear"]))
def test_loss_property_matches_reference(rows, form):
    gen = torch.Generator().manual_seed(len(rows))
    counts = (torch.rand(len(rows), generator=gen, dtype=torch.float64) * 3).tolist()
    counts[0] = 0.0  # always one absent domain
    sums_DE, counts_D = _stats(rows, counts)
    out = edl_loss(sums_DE=sums_DE, counts_D=counts_D, form=form)
    present = [row for row, n in zip(rows, counts, strict=True) if n > 0]
    assert out.loss.item() == pytest.approx(_ref_loss(present, form, 1e-6), rel=1e-9, abs=1e-12)
    assert out.num_present.item() == len(present)
    if len(present) < 2:
        assert out.loss.item() == 0.0
    elif form == "linear":
        assert -LN2 - 1e-12 <= out.loss.item() <= 0.0
    else:
        assert -math.log(LN2 + 1e-6) - 1e-9 <= out.loss.item() <= -math.log(1e-6) + 1e-9


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def test_mutual_information_of_identical_domains_is_zero():
    sums_DE, counts_D = _stats([[0.1, 0.6, 0.3]] * 4, [1.0, 2.0, 3.0, 0.0])
    assert mutual_information(sums_DE=sums_DE, counts_D=counts_D).item() == pytest.approx(
        0.0, abs=1e-12
    )


@pytest.mark.parametrize("num_experts", [3, 5])
def test_mutual_information_of_separated_domains_is_ln_d(num_experts):
    # Domain j routes only to expert j, equal counts: I(E;D) = H(D) = ln D.
    num_domains = 3
    means = torch.eye(num_domains, num_experts, dtype=torch.float64).tolist()
    sums_DE, counts_D = _stats(means, [2.0] * num_domains)
    mi = mutual_information(sums_DE=sums_DE, counts_D=counts_D)
    assert mi.item() == pytest.approx(math.log(num_domains), rel=1e-12)


def test_mutual_information_hand_value_with_unequal_counts():
    # w = [1/4, 3/4]; pbar_0 = [1, 0], pbar_1 = [0, 1] -> pbar = [1/4, 3/4]
    # I = H(pbar) - 0 = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335...
    sums_DE, counts_D = _stats([[1.0, 0.0], [0.0, 1.0]], [1.0, 3.0])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert mutual_information(sums_DE=sums_DE, counts_D=counts_D).item() == pytest.approx(
        expected, rel=1e-12
    )


def test_mutual_information_with_no_domain_present_is_zero():
    mi = mutual_information(sums_DE=torch.zeros(3, 4), counts_D=torch.zeros(3))
    assert mi.item() == 0.0


@PROPS
@given(_distributions(min_rows=1, max_rows=5, max_cols=5))
def test_mutual_information_matches_reference_and_bounds(rows):
    gen = torch.Generator().manual_seed(len(rows) * 7 + len(rows[0]))
    counts = (torch.rand(len(rows), generator=gen, dtype=torch.float64) + 0.1).tolist()
    sums_DE, counts_D = _stats(rows, counts)
    sums_DE.requires_grad_()
    mi = mutual_information(sums_DE=sums_DE, counts_D=counts_D)
    assert not mi.requires_grad
    assert mi.item() == pytest.approx(_ref_mutual_information(rows, counts), rel=1e-9, abs=1e-12)
    bound = min(math.log(len(rows[0])), math.log(len(rows)))
    assert 0.0 <= mi.item() <= bound + 1e-12


def test_domain_entropy_values_and_absent_domains():
    sums_DE, counts_D = _stats(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.0, 1.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.1, 0.2, 0.3, 0.4],
        ],
        [2.0, 1.0, 3.0, 0.0],
    )
    sums_DE.requires_grad_()
    entropy_D = domain_entropy(sums_DE=sums_DE, counts_D=counts_D)
    assert not entropy_D.requires_grad
    torch.testing.assert_close(
        entropy_D[:3], torch.tensor([math.log(4), 0.0, LN2], dtype=torch.float64)
    )
    assert torch.isnan(entropy_D[3])
