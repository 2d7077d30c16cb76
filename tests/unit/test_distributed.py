"""Tests of ``megatron_edl.distributed``: the stats all-reduce, the loss scale, the accumulator.

The distributed tests run on gloo (CPU) through ``tests.helpers.distributed.run_distributed``. Every
scenario is checked against a single-process reference computed in the parent with the pure math
of ``megatron_edl.core.edl`` on the *unsharded* data (float64, so tolerances are tight). The
workers emulate Megatron's gradient reduction of the router weight by hand: SUM over TP (the
sequence-parallel rule of ``finalize_model_grads``), then AVERAGE over DP x CP (DDP).

To keep the file fast (one spawn costs seconds), all scenarios of one world size run in one
spawn (a module-scoped fixture); the workers only record what they see and the parametrized
tests assert on it, so each scenario still passes or fails on its own.

Rank layout (Megatron's order, TP fastest): rank = (dp_rank * cp + cp_rank) * tp + tp_rank.
Tokens are split into ``world`` contiguous chunks, chunk ``rank`` on rank ``rank``, so DP
replica ``dp_rank`` holds one contiguous block of ``tp * cp`` chunks.

Shape legend: T tokens, E experts, D domains, H hidden size, N packed buffer.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from megatron_edl.core.edl import domain_sums, edl_loss, routing_probs
from megatron_edl.distributed import (
    DomainStatsAccumulator,
    all_reduce_domain_stats,
    edl_loss_scale,
)
from tests.helpers.distributed import run_distributed

NUM_EXPERTS = 6
NUM_DOMAINS = 5
HIDDEN = 4
TOKENS_PER_RANK = 12
PACKED_NUMEL = NUM_DOMAINS * NUM_EXPERTS + NUM_DOMAINS
TIMEOUT_S = 60
CONVENTIONS = ("plain", "megatron")

# ---------------------------------------------------------------------------------------------
# Scenarios: name -> (layout (tp, cp, dp), scope, seed, ranks whose tokens are all ignored)
# ---------------------------------------------------------------------------------------------

SCENARIOS: dict[int, dict[str, tuple[tuple[int, int, int], str, int, tuple[int, ...]]]] = {
    2: {
        "global-dp2": ((1, 1, 2), "global", 1, ()),
        "local-dp2": ((1, 1, 2), "local", 2, ()),
        "global-dp2-rank1-ignored": ((1, 1, 2), "global", 3, (1,)),
    },
    4: {
        "global-dp4": ((1, 1, 4), "global", 4, ()),
        "global-tp2xdp2": ((2, 1, 2), "global", 5, ()),
        "global-dp2xcp2": ((1, 2, 2), "global", 6, ()),
        "global-tp2xcp2": ((2, 2, 1), "global", 7, ()),
        "local-dp4": ((1, 1, 4), "local", 8, ()),
        "local-tp2xdp2": ((2, 1, 2), "local", 9, ()),
        "local-dp2xcp2": ((1, 2, 2), "local", 10, ()),
        "local-dp2xcp2-rank3-ignored": ((1, 2, 2), "local", 11, (3,)),
    },
}


# ---------------------------------------------------------------------------------------------
# Data and single-process reference
# ---------------------------------------------------------------------------------------------


def _make_data(world: int, seed: int, ignored_ranks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Random float64 router weight, hidden states, domain ids (some -1) and token weights."""
    num_tokens = world * TOKENS_PER_RANK
    gen = torch.Generator().manual_seed(seed)
    weight_EH = torch.randn(NUM_EXPERTS, HIDDEN, generator=gen, dtype=torch.float64)
    hidden_TH = torch.randn(num_tokens, HIDDEN, generator=gen, dtype=torch.float64)
    ids_T = torch.randint(-1, NUM_DOMAINS, (num_tokens,), generator=gen)
    # Weights 1 / T_s as segment weights would give, for segments of random length 1..4.
    w_T = 1.0 / torch.randint(1, 5, (num_tokens,), generator=gen).double()
    for rank in ignored_ranks:
        ids_T[rank * TOKENS_PER_RANK : (rank + 1) * TOKENS_PER_RANK] = -1
    return {"weight_EH": weight_EH, "hidden_TH": hidden_TH, "ids_T": ids_T, "w_T": w_T}


def _reference(data: dict[str, torch.Tensor], token_slice: slice) -> tuple[float, torch.Tensor]:
    """Loss and router-weight gradient of one process over the tokens in ``token_slice``."""
    weight_EH = data["weight_EH"].clone().requires_grad_(True)
    logits_TE = data["hidden_TH"][token_slice] @ weight_EH.T
    sums_DE, counts_D = domain_sums(
        probs_TE=routing_probs(logits_TE=logits_TE),
        domain_ids_T=data["ids_T"][token_slice],
        weights_T=data["w_T"][token_slice],
        num_domains=NUM_DOMAINS,
    )
    loss = edl_loss(sums_DE=sums_DE, counts_D=counts_D).loss
    loss.backward()
    return loss.item(), weight_EH.grad


def _expected(
    data: dict[str, torch.Tensor], layout: tuple[int, int, int], scope: str
) -> tuple[list[float], torch.Tensor]:
    """Per-rank expected loss and the expected reduced gradient, from single-process runs.

    ``global``: the loss and gradient of one process on the whole global micro-batch.
    ``local``: each rank sees its DP replica's loss; the gradient is the average over the
    replicas of each replica's single-process gradient.
    """
    tp, cp, dp = layout
    world = tp * cp * dp
    if scope == "global":
        loss, grad_EH = _reference(data, slice(0, world * TOKENS_PER_RANK))
        return [loss] * world, grad_EH
    replica_tokens = tp * cp * TOKENS_PER_RANK
    per_replica = [
        _reference(data, slice(d * replica_tokens, (d + 1) * replica_tokens)) for d in range(dp)
    ]
    losses = [per_replica[rank // (tp * cp)][0] for rank in range(world)]
    grad_EH = torch.stack([grad for _, grad in per_replica]).mean(dim=0)
    return losses, grad_EH


# ---------------------------------------------------------------------------------------------
# Workers (module level, so the spawned children can import them)
# ---------------------------------------------------------------------------------------------


def _groups(rank: int, layout: tuple[int, int, int]) -> dict[str, dist.ProcessGroup]:
    """This rank's tp, dp_cp, tp_cp and tp_dp_cp groups; every rank creates every group."""
    tp, cp, dp = layout
    coords = [(t, c, d) for d in range(dp) for c in range(cp) for t in range(tp)]
    # Per kind of group, a key that is equal for the ranks of one group.
    kinds = {
        "tp": lambda t, c, d: (c, d),
        "dp_cp": lambda t, c, d: t,
        "tp_cp": lambda t, c, d: d,
        "tp_dp_cp": lambda t, c, d: 0,
    }
    mine = {}
    for name, key in kinds.items():
        members: dict[Any, list[int]] = {}
        for t, c, d in coords:
            members.setdefault(key(t, c, d), []).append((d * cp + c) * tp + t)
        for ranks in members.values():  # same order on every rank: new_group is collective
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[name] = group
    return mine


def _run_scenario(
    rank: int,
    layout: tuple[int, int, int],
    scope: str,
    data: dict[str, torch.Tensor],
    groups: dict[str, dist.ProcessGroup],
) -> dict[str, Any]:
    """EDL forward/backward on this rank's shard, then Megatron's reduction of the weight grad.

    Runs twice: ``plain`` (the EDL factor is the only scale, DDP averages) and ``megatron``
    (``cp_in_aux_loss_scale=True`` times the autoscaler's schedule scale loss_scale * cp /
    num_microbatches, here 1 * cp / 1). Returns the all-reduce sizes seen, the loss and the
    reduced gradient of each.
    """
    tp, cp, dp = layout
    stats_group = groups["tp_dp_cp"] if scope == "global" else groups["tp_cp"]
    shard = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    out: dict[str, Any] = {"calls": [], "loss": {}, "grad_EH": {}}
    for convention in CONVENTIONS:
        weight_EH = data["weight_EH"].clone().requires_grad_(True)
        logits_TE = data["hidden_TH"][shard] @ weight_EH.T
        local_sums_DE, local_counts_D = domain_sums(
            probs_TE=routing_probs(logits_TE=logits_TE),
            domain_ids_T=data["ids_T"][shard],
            weights_T=data["w_T"][shard],
            num_domains=NUM_DOMAINS,
        )
        real_all_reduce = dist.all_reduce
        calls: list[int] = []

        def counting_all_reduce(tensor, *args, _real=real_all_reduce, _calls=calls, **kwargs):
            _calls.append(tensor.numel())
            return _real(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        try:
            sums_DE, counts_D = all_reduce_domain_stats(local_sums_DE, local_counts_D, stats_group)
        finally:
            dist.all_reduce = real_all_reduce
        out["calls"].append(calls)

        loss = edl_loss(sums_DE=sums_DE, counts_D=counts_D).loss
        if convention == "plain":
            scale = edl_loss_scale(scope, dp_size=dp, cp_size=cp)
        else:
            scale = edl_loss_scale(scope, dp_size=dp, cp_size=cp, cp_in_aux_loss_scale=True) * cp
        (loss * scale).backward()

        grad_EH = weight_EH.grad
        if tp > 1:  # finalize_model_grads: sequence-parallel params are SUMMED over TP
            dist.all_reduce(grad_EH, op=dist.ReduceOp.SUM, group=groups["tp"])
        dist.all_reduce(grad_EH, op=dist.ReduceOp.SUM, group=groups["dp_cp"])  # DDP: average
        grad_EH /= dp * cp
        out["loss"][convention] = loss.item()
        out["grad_EH"][convention] = grad_EH
    return out


def _packed_buffer_check(rank: int) -> dict[str, Any]:
    """fp32 inputs: record the all-reduce calls, the outputs and the backward of one call."""
    sums_DE = torch.full((3, 2), float(rank + 1), requires_grad=True)
    counts_D = torch.tensor([1.0, 0.0, float(rank)])
    seen: list[tuple[int, torch.dtype, bool]] = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        seen.append((tensor.numel(), tensor.dtype, tensor.is_contiguous()))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        out_sums_DE, out_counts_D = all_reduce_domain_stats(sums_DE, counts_D, dist.group.WORLD)
    finally:
        dist.all_reduce = real_all_reduce
    upstream_DE = torch.arange(6.0).view(3, 2) * (rank + 1)
    dist.all_reduce = None  # a collective in the backward would now raise
    try:
        out_sums_DE.backward(upstream_DE)
    finally:
        dist.all_reduce = real_all_reduce
    return {
        "seen": seen,
        "sums_DE": out_sums_DE.detach(),
        "counts_D": out_counts_D,
        "counts_requires_grad": out_counts_D.requires_grad,
        "input_grad_DE": sums_DE.grad,
        "upstream_DE": upstream_DE,
        "input_after_DE": sums_DE.detach(),
    }


def _scenarios_worker(
    rank: int, world_size: int, scenarios: dict[str, tuple[Any, str, dict[str, torch.Tensor]]]
) -> dict[str, Any]:
    results: dict[str, Any] = {"packed": _packed_buffer_check(rank)}
    groups_by_layout: dict[Any, dict[str, dist.ProcessGroup]] = {}
    for name, (layout, scope, data) in scenarios.items():
        if layout not in groups_by_layout:  # same order on every rank
            groups_by_layout[layout] = _groups(rank, layout)
        results[name] = _run_scenario(rank, layout, scope, data, groups_by_layout[layout])
    return results


# ---------------------------------------------------------------------------------------------
# Fixtures: one spawn per world size
# ---------------------------------------------------------------------------------------------


def _scenario_inputs(world: int) -> dict[str, tuple[Any, str, dict[str, torch.Tensor]]]:
    return {
        name: (layout, scope, _make_data(world, seed, ignored))
        for name, (layout, scope, seed, ignored) in SCENARIOS[world].items()
    }


@pytest.fixture(scope="module")
def world_results() -> dict[int, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """world size -> (scenario inputs, per-rank results); computed lazily, once per world."""
    cache: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}

    class _Lazy(dict):
        def __missing__(self, world: int):
            inputs = _scenario_inputs(world)
            cache[world] = (
                inputs,
                run_distributed(_scenarios_worker, world, inputs, timeout_s=TIMEOUT_S),
            )
            self[world] = cache[world]
            return cache[world]

    return _Lazy()


# ---------------------------------------------------------------------------------------------
# Distributed tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_one_all_reduce_of_one_packed_fp32_buffer(world, world_results):
    _, per_rank = world_results[world]
    for rank, result in enumerate(per_rank):
        packed = result["packed"]
        assert packed["seen"] == [(3 * 2 + 3, torch.float32, True)], (rank, packed["seen"])
        total = float(sum(r + 1 for r in range(world)))
        torch.testing.assert_close(packed["sums_DE"], torch.full((3, 2), total), rtol=0, atol=0)
        expected_counts_D = torch.tensor([float(world), 0.0, float(sum(range(world)))])
        torch.testing.assert_close(packed["counts_D"], expected_counts_D, rtol=0, atol=0)
        assert not packed["counts_requires_grad"]
        # Identity backward: the local input gets the upstream gradient unchanged.
        torch.testing.assert_close(packed["input_grad_DE"], packed["upstream_DE"], rtol=0, atol=0)
        # The all-reduce did not write into the caller's tensor.
        torch.testing.assert_close(packed["input_after_DE"], torch.full((3, 2), float(rank + 1)))


def _check_scenario(world: int, name: str, world_results) -> None:
    inputs, per_rank = world_results[world]
    layout, scope, data = inputs[name]
    expected_losses, expected_grad_EH = _expected(data, layout, scope)
    tp, cp, dp = layout
    group_size = tp * cp * (dp if scope == "global" else 1)
    # One packed all-reduce per call; none over a group of one rank (nothing to sum).
    expected_calls = [[PACKED_NUMEL] if group_size > 1 else []] * len(CONVENTIONS)
    for rank, result in enumerate(per_rank):
        got = result[name]
        assert got["calls"] == expected_calls, (rank, got["calls"])
        for convention in CONVENTIONS:
            assert got["loss"][convention] == pytest.approx(expected_losses[rank], rel=1e-12), (
                rank,
                convention,
            )
            torch.testing.assert_close(
                got["grad_EH"][convention],
                expected_grad_EH,
                rtol=1e-10,
                atol=1e-13,
                msg=lambda m, rank=rank, c=convention: f"rank {rank}, {c}: {m}",
            )


@pytest.mark.parametrize("name", [n for n in SCENARIOS[2] if n.startswith("global")])
def test_global_scope_matches_single_process_2_ranks(name, world_results):
    _check_scenario(2, name, world_results)


@pytest.mark.parametrize("name", [n for n in SCENARIOS[4] if n.startswith("global")])
def test_global_scope_matches_single_process_4_ranks(name, world_results):
    _check_scenario(4, name, world_results)


@pytest.mark.parametrize(
    ("world", "name"),
    [(w, n) for w in SCENARIOS for n in SCENARIOS[w] if n.startswith("local")],
)
def test_local_scope_matches_average_of_replicas(world, name, world_results):
    _check_scenario(world, name, world_results)


def test_expected_values_discriminate():
    """Guards the scenario tests: the references they compare with are not interchangeable.

    Global and local gradients differ, replicas have different losses, and the ignored-rank
    data really has a rank without labelled tokens while other ranks have several domains.
    """
    data = _make_data(4, seed=4, ignored_ranks=())
    _, global_grad_EH = _expected(data, (1, 1, 4), "global")
    local_losses, local_grad_EH = _expected(data, (1, 1, 4), "local")
    assert not torch.allclose(global_grad_EH, local_grad_EH, rtol=1e-3, atol=0)
    assert len(set(local_losses)) == 4
    data = _make_data(2, seed=3, ignored_ranks=(1,))
    assert (data["ids_T"][TOKENS_PER_RANK:] == -1).all()
    assert len(set(data["ids_T"][:TOKENS_PER_RANK].tolist()) - {-1}) >= 2


# ---------------------------------------------------------------------------------------------
# Single-process tests
# ---------------------------------------------------------------------------------------------


def test_no_group_returns_inputs_unchanged():
    sums_DE = torch.rand(3, 4, requires_grad=True)
    counts_D = torch.rand(3)
    out_sums_DE, out_counts_D = all_reduce_domain_stats(sums_DE, counts_D, None)
    assert out_sums_DE is sums_DE and out_counts_D is counts_D


@pytest.mark.parametrize(
    ("sums_shape", "counts_shape"), [((3, 4), (4,)), ((12,), (3,)), ((3, 4), (3, 1))]
)
def test_bad_shapes_are_rejected(sums_shape, counts_shape):
    with pytest.raises(ValueError, match="shape"):
        all_reduce_domain_stats(torch.zeros(sums_shape), torch.zeros(counts_shape), None)


@pytest.mark.parametrize(
    ("scope", "flag", "expected"),
    [("global", False, 12.0), ("local", False, 3.0), ("global", True, 4.0), ("local", True, 1.0)],
)
def test_edl_loss_scale_values(scope, flag, expected):
    assert edl_loss_scale(scope, dp_size=4, cp_size=3, cp_in_aux_loss_scale=flag) == expected


def test_edl_loss_scale_rejects_bad_values():
    with pytest.raises(ValueError, match="'tp_dp_cp'"):
        edl_loss_scale("tp_dp_cp", dp_size=2, cp_size=1)
    with pytest.raises(ValueError, match="dp_size.*0"):
        edl_loss_scale("global", dp_size=0, cp_size=1)
    with pytest.raises(ValueError, match="cp_size.*-1"):
        edl_loss_scale("local", dp_size=1, cp_size=-1)


def _micro_batch(seed: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    probs_TE = torch.softmax(torch.randn(num_tokens, NUM_EXPERTS, generator=gen).double(), -1)
    ids_T = torch.randint(-1, NUM_DOMAINS, (num_tokens,), generator=gen)
    w_T = torch.rand(num_tokens, generator=gen, dtype=torch.float64)
    return probs_TE, ids_T, w_T


def _sums(
    probs_TE: torch.Tensor, ids_T: torch.Tensor, w_T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return domain_sums(
        probs_TE=probs_TE, domain_ids_T=ids_T, weights_T=w_T, num_domains=NUM_DOMAINS
    )


def test_accumulator_second_micro_batch_sees_both_first_detached():
    probs1_TE, ids1_T, w1_T = _micro_batch(1, 10)
    probs2_TE, ids2_T, w2_T = _micro_batch(2, 14)
    probs1_TE.requires_grad_(True)
    probs2_TE.requires_grad_(True)

    acc = DomainStatsAccumulator()
    sums1_DE, counts1_D = _sums(probs1_TE, ids1_T, w1_T)
    first = acc.combine(sums1_DE, counts1_D)
    assert first[0] is sums1_DE and first[1] is counts1_D  # nothing accumulated yet
    acc.update(sums1_DE, counts1_D)
    sums2_DE, counts2_D = _sums(probs2_TE, ids2_T, w2_T)
    total_sums_DE, total_counts_D = acc.combine(sums2_DE, counts2_D)
    loss2 = edl_loss(sums_DE=total_sums_DE, counts_D=total_counts_D).loss
    loss2.backward()
    assert probs1_TE.grad is None  # micro-batch 1 entered detached
    assert acc.num_updates == 1

    # Reference: the loss on the concatenated micro-batches, micro-batch 1 a constant.
    ref_probs2_TE = probs2_TE.detach().clone().requires_grad_(True)
    ref_sums_DE, ref_counts_D = _sums(
        torch.cat([probs1_TE.detach(), ref_probs2_TE]),
        torch.cat([ids1_T, ids2_T]),
        torch.cat([w1_T, w2_T]),
    )
    ref_loss = edl_loss(sums_DE=ref_sums_DE, counts_D=ref_counts_D).loss
    ref_loss.backward()
    torch.testing.assert_close(loss2.detach(), ref_loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(probs2_TE.grad, ref_probs2_TE.grad, rtol=1e-10, atol=1e-14)
    # ... and it is not the gradient of micro-batch 2's loss alone.
    alone_probs2_TE = probs2_TE.detach().clone().requires_grad_(True)
    edl_loss(sums_DE=_sums(alone_probs2_TE, ids2_T, w2_T)[0], counts_D=counts2_D).loss.backward()
    assert not torch.allclose(alone_probs2_TE.grad, probs2_TE.grad, rtol=1e-3, atol=0)


def test_accumulator_state_and_reset():
    probs1_TE, ids1_T, w1_T = _micro_batch(3, 8)
    probs2_TE, ids2_T, w2_T = _micro_batch(4, 8)
    sums1_DE, counts1_D = _sums(probs1_TE.requires_grad_(True), ids1_T, w1_T)
    sums2_DE, counts2_D = _sums(probs2_TE, ids2_T, w2_T)
    acc = DomainStatsAccumulator()
    acc.update(sums1_DE, counts1_D)
    acc.update(sums2_DE, counts2_D)
    past_sums_DE, past_counts_D = acc.combine(
        torch.zeros_like(sums1_DE), torch.zeros_like(counts1_D)
    )
    assert not past_sums_DE.requires_grad  # the stored state holds no graph
    torch.testing.assert_close(past_sums_DE, (sums1_DE + sums2_DE).detach(), rtol=0, atol=0)
    torch.testing.assert_close(past_counts_D, counts1_D + counts2_D, rtol=0, atol=0)
    assert acc.num_updates == 2
    acc.reset()
    assert acc.num_updates == 0
    assert acc.combine(sums2_DE, counts2_D)[0] is sums2_DE
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.zeros(2, 2), torch.zeros(3))
    acc.update(sums2_DE, counts2_D)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        acc.combine(torch.zeros(2, 3), torch.zeros(2))
