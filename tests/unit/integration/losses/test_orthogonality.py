"""Variance and orthogonality losses in Megatron's real MoE layer, on gloo, against references.

Every scenario builds the MoE layer of Megatron's local GPT layer spec after
``with_aux_loss_router(spec, EDLRunConfig(variance=..., orthogonality=...))`` (no labels, so no
EDL term; the layer is an ``OrthogonalityMoELayer``), loads the same full weights (router,
and every expert's fc1/fc2, sharded by EP and expert TP as Megatron shards them), feeds each rank
the tokens it would see (DP: its samples; TP with sequence parallel: its rows of ``[s, b, h]``)
and runs forward and ``(output * 0).sum().backward()``, so only what ``MoEAuxLossAutoScaler``
carries (the two losses) reaches the weights. Megatron's gradient reduction is emulated by hand:
router weight: SUM over TP (sequence-parallel parameter), then AVERAGE over DP x CP (DDP);
expert weights: SUM over the expert-data-parallel group times 1 / (dp * cp) (DDP's expert
scaling).

The reference is one process's result from first principles, computed inside the same spawn
with TP = EP = 1 (every rank holds every expert; pure torch, no collective): each selected expert
called on each token of the whole global batch alone (its raw output, gate 1), the per-token
orthogonality loss of ``megatron_edl.core.orthogonality`` over those, the variance over the
router's probabilities, and autograd. Every layout (DP=2, EP=2 with the three dispatchers, TP=2
with sequence parallelism and the three dispatchers; two of them auto-calibrated) must reproduce
its losses and gradients, which proves the grouping by token, the raw outputs recovered as y / p,
the reductions and the gradient scale together.

The ``flex`` dispatcher runs with its DeepEP backend, whose fused dispatch and combine are
emulated with gloo collectives (``tests/helpers/deepep_emulation.py``; DeepEP itself needs GPUs).
``tests/unit/integration/losses/test_orthogonality_flex.py`` checks the emulation against the
alltoall dispatcher.

Also checked: the layer output is bit-identical to the stock ``MoELayer``'s (forward equality),
one packed all-reduce per loss, the orthogonality gradient reaches the experts but not the
router, nothing is computed (no collective) under ``torch.no_grad`` or in eval mode,
auto-calibration gives the same weight on every rank, and the weighted metrics
(``weighted_variance_loss``, ``weighted_ortho_loss``) are the weight in use times the raw ones.

Shape legend: S sequence, B samples, H hidden, F expert FFN, E experts, T tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers.distributed import count_all_reduce, run_distributed

NUM_EXPERTS, TOPK, HIDDEN, FFN = 4, 2, 8, 12
SEQ, GLOBAL_BATCH = 4, 4
VARIANCE_COEFF, ORTHO_COEFF = 0.7, 0.3  # != 1, so a lost coefficient shows
TIMEOUT_S = 120
RTOL = 2e-5

# name -> (tp, ep, dispatcher, variance axis, auto-calibrate)
LAYOUTS: dict[str, tuple[int, int, str, str, bool]] = {
    "dp2-allgather": (1, 1, "allgather", "tokens", False),
    "ep2-allgather": (1, 2, "allgather", "experts", False),
    "ep2-alltoall": (1, 2, "alltoall", "tokens", True),
    "tp2sp-allgather": (2, 1, "allgather", "tokens", False),
    "tp2sp-alltoall": (2, 1, "alltoall", "experts", False),
    "ep2-flex": (1, 2, "flex", "experts", False),
    "tp2sp-flex": (2, 1, "flex", "tokens", True),
}
# The layout of the gradient-direction and no-grad checks (flex needs tp * ep > 1).
SMALLEST_LAYOUT = {"allgather": (1, 1), "alltoall": (1, 1), "flex": (1, 2)}
# The first-principles references the layouts are compared with: (axis, calibrate).
REFERENCES = sorted({(a, c) for _, _, _, a, c in LAYOUTS.values()})
TARGETS = {"variance_loss": 1e-3, "ortho_loss": 1e-4}  # the calibration defaults


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "router_EH": 0.5 * torch.randn(NUM_EXPERTS, HIDDEN, generator=gen),
        "fc1_EFH": 0.4 * torch.randn(NUM_EXPERTS, FFN, HIDDEN, generator=gen),
        "fc2_EHF": 0.4 * torch.randn(NUM_EXPERTS, HIDDEN, FFN, generator=gen),
        "hidden_SBH": torch.randn(SEQ, GLOBAL_BATCH, HIDDEN, generator=gen),
    }


DATA = _data()

# ---------------------------------------------------------------------------------------------
# Workers (module level, so the spawned children can import them)
# ---------------------------------------------------------------------------------------------


def build(
    tp: int,
    ep: int,
    dispatcher: str,
    axis: str,
    calibrate: bool,
    *,
    stock=False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The MoE layer of the local GPT spec (with the losses unless ``stock``), weights loaded
    (then moved to ``device`` and ``dtype``; the GPU tests of test_orthogonality_flex.py)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_edl.config import EDLRunConfig, OrthogonalityConfig, VarianceConfig
    from megatron_edl.integration.spec import with_aux_loss_router

    config = TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_moe_experts=NUM_EXPERTS,
        moe_ffn_hidden_size=FFN,
        moe_router_topk=TOPK,
        moe_token_dispatcher_type=dispatcher,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1,
        use_cpu_initialization=True,
        add_bias_linear=False,
        params_dtype=torch.float32,
    )
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS)
    if not stock:
        run = EDLRunConfig(
            variance=VarianceConfig(coeff=VARIANCE_COEFF, axis=axis, auto_calibrate=calibrate),
            orthogonality=OrthogonalityConfig(coeff=ORTHO_COEFF, auto_calibrate=calibrate),
        )
        spec = with_aux_loss_router(spec, run)
    layer = spec.submodules.mlp(
        config=config,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        is_mtp_layer=False,
    )
    layer.set_layer_number(1)
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    first_expert = ps.get_expert_model_parallel_rank() * (NUM_EXPERTS // ep)
    rows = slice(etp_rank * FFN // etp, (etp_rank + 1) * FFN // etp)
    with torch.no_grad():
        layer.router.weight.copy_(DATA["router_EH"])
        for local, expert in enumerate(layer.experts.local_experts):
            expert.linear_fc1.weight.copy_(DATA["fc1_EFH"][first_expert + local][rows])
            expert.linear_fc2.weight.copy_(DATA["fc2_EHF"][first_expert + local][:, rows])
    layer.to(device=device, dtype=dtype)
    layer.train()
    return layer, first_expert, rows


def local_hidden(tp: int) -> torch.Tensor:
    """This rank's MoE input: its DP replica's samples, its sequence-parallel rows."""
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    per_replica = GLOBAL_BATCH // dp
    hidden_sBH = DATA["hidden_SBH"][:, dp_rank * per_replica : (dp_rank + 1) * per_replica]
    hidden_sBH = hidden_sBH[tp_rank * SEQ // tp : (tp_rank + 1) * SEQ // tp]
    return hidden_sBH.contiguous()


def take_metrics() -> dict[str, float]:
    from megatron.core.transformer.moe import moe_logging

    metrics = moe_logging.get_moe_metrics_tracker().metrics
    out = {name: entry.values[0].item() for name, entry in metrics.items()}
    moe_logging.destroy_moe_metrics_tracker()
    return out


def reduced_grads(layer, first_expert: int, rows: slice) -> dict[str, Any]:
    """Router and expert gradients after Megatron's reduction (see the module docstring)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    def grad(param):
        return torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()

    router_EH = grad(layer.router.weight)
    if ps.get_tensor_model_parallel_world_size() > 1 and layer.router.weight.sequence_parallel:
        dist.all_reduce(router_EH, group=ps.get_tensor_model_parallel_group())
    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    dist.all_reduce(router_EH, group=dp_cp)
    router_EH /= dp_cp.size()
    experts = []
    for local, expert in enumerate(layer.experts.local_experts):
        pieces = []
        for param in (expert.linear_fc1.weight, expert.linear_fc2.weight):
            g = grad(param)
            dist.all_reduce(g, group=ps.get_expert_data_parallel_group())
            pieces.append(g / dp_cp.size())
        experts.append((first_expert + local, rows, *pieces))
    return {"router_EH": router_EH, "experts": experts}


def _train_step(layer, hidden_sBH) -> tuple[torch.Tensor, list[int]]:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    with count_all_reduce() as calls:
        output, _ = layer(hidden_sBH)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))  # cp / num_microbatches
    (output * 0).sum().backward()
    return output.detach(), calls


def setup_layout(tp: int, ep: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        create_gloo_process_groups=False,
    )
    model_parallel_cuda_manual_seed(1)


def run_layout(
    tp: int,
    ep: int,
    dispatcher: str,
    axis: str,
    calibrate: bool,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    setup_layout(tp, ep)
    hidden_sBH = local_hidden(tp).to(device=device, dtype=dtype)
    on = {"device": device, "dtype": dtype}
    stock, _, _ = build(tp, ep, dispatcher, axis, calibrate, stock=True, **on)
    with torch.no_grad():
        stock_output, _ = stock(hidden_sBH)
    take_metrics()
    layer, first_expert, rows = build(tp, ep, dispatcher, axis, calibrate, **on)
    output, calls = _train_step(layer, hidden_sBH)
    return {
        "metrics": take_metrics(),
        "calls": calls,
        "output_equal": torch.equal(output, stock_output),
        "weights": (layer.router.aux_terms["variance"].weight, layer.orthogonality.term.weight),
        **reduced_grads(layer, first_expert, rows),
    }


def first_principles(layer, axis: str, calibrate: bool) -> dict[str, Any]:
    """Losses and gradients of the whole batch from each expert called on each token alone (its
    raw output, gate 1) and from the router's probabilities: pure torch, no collective."""
    from megatron_edl.core.orthogonality import orthogonality_loss as ortho
    from megatron_edl.core.variance import variance_loss as var

    hidden_sBH = DATA["hidden_SBH"].to(device=layer.router.weight.device)
    hidden_TH = hidden_sBH.reshape(-1, HIDDEN)
    layer.zero_grad(set_to_none=True)
    router, experts = layer.router, layer.experts.local_experts
    router.eval()  # routing without the attached losses
    probs_TE, routing_map_TE = router(hidden_sBH)
    router.train()
    scores_TE = probs_TE if axis == "tokens" else torch.softmax(hidden_TH @ router.weight.T, -1)
    v_loss = var(scores_TE=scores_TE, axis=axis)

    def raw(t: int, e: int) -> torch.Tensor:
        return experts[e](hidden_TH[t : t + 1], torch.ones(1, device=hidden_TH.device))[0][0]

    num_tokens = hidden_TH.shape[0]
    pairs_by_token = [
        [e for e in range(NUM_EXPERTS) if routing_map_TE[t, e]] for t in range(num_tokens)
    ]
    raw_TKH = torch.stack(
        [torch.stack([raw(t, e) for e in es]) for t, es in enumerate(pairs_by_token)]
    )
    o_loss = ortho(outputs_TKH=raw_TKH, eps=1e-6)
    # The released code's grouping: consecutive rows of the expert-major layout.
    rows_RH = torch.stack(
        [raw(t, e) for e in range(NUM_EXPERTS) for t in range(num_tokens) if routing_map_TE[t, e]]
    )
    by_expert = ortho(outputs_TKH=rows_RH.detach().view(-1, TOPK, HIDDEN), eps=1e-6).item()
    weights = (VARIANCE_COEFF, ORTHO_COEFF)
    if calibrate:
        weights = (
            TARGETS["variance_loss"] / abs(v_loss.item()),
            TARGETS["ortho_loss"] / o_loss.item(),
        )
    (weights[0] * v_loss + weights[1] * o_loss).backward()
    return {
        # The variance metric is Var = -L_v (Megatron's log line hides negative losses).
        "metrics": {"variance_loss": -v_loss.item(), "ortho_loss": o_loss.item()},
        "ortho_by_expert": by_expert,
        "weights": weights,
        "router_EH": router.weight.grad.clone(),
        "experts": [
            (e, slice(0, FFN), x.linear_fc1.weight.grad.clone(), x.linear_fc2.weight.grad.clone())
            for e, x in enumerate(experts)
        ],
    }


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    """Every layout; then, with TP = EP = 1 (every rank holds every expert), the first-principles
    references; then, per dispatcher, the router gradient of the orthogonality loss alone and
    no-grad and eval forwards."""
    from megatron_edl import cpu
    from tests.helpers import deepep_emulation

    cpu.apply()
    deepep_emulation.install()
    out: dict[str, Any] = {name: run_layout(*layout) for name, layout in LAYOUTS.items()}
    setup_layout(1, 1)
    for axis, calibrate in REFERENCES:
        layer, _, _ = build(1, 1, "allgather", axis, False)
        out[("first-principles", axis, calibrate)] = first_principles(layer, axis, calibrate)
    for dispatcher, (tp, ep) in SMALLEST_LAYOUT.items():
        setup_layout(tp, ep)
        hidden_sBH = local_hidden(tp)
        layer, first_expert, rows = build(tp, ep, dispatcher, "tokens", False)
        del layer.router.aux_terms["variance"]  # orthogonality alone
        _train_step(layer, hidden_sBH)
        take_metrics()
        grads = reduced_grads(layer, first_expert, rows)
        out[("ortho-alone", dispatcher)] = (
            grads["router_EH"].abs().max().item(),
            grads["experts"][0][2].abs().max().item(),
        )
        for mode in ("no-grad", "eval"):
            layer.train(mode != "eval")
            with torch.set_grad_enabled(mode != "no-grad"), count_all_reduce() as calls:
                layer(hidden_sBH)
            out[(mode, dispatcher)] = (calls, take_metrics())
    return out


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    """Rank -> results of ``_worker`` (one spawn for the whole module)."""
    return run_distributed(_worker, 2, timeout_s=TIMEOUT_S)


def full_expert_grads(experts) -> tuple[torch.Tensor, torch.Tensor]:
    fc1_EFH = torch.full((NUM_EXPERTS, FFN, HIDDEN), float("nan"))
    fc2_EHF = torch.full((NUM_EXPERTS, HIDDEN, FFN), float("nan"))
    for e, rows, fc1, fc2 in experts:
        fc1_EFH[e, rows] = fc1
        fc2_EHF[e, :, rows] = fc2
    return fc1_EFH, fc2_EHF


def _assert_close(got, want, what: str) -> None:
    if isinstance(want, torch.Tensor):
        atol = RTOL * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        assert got == pytest.approx(want, rel=RTOL), what


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sharded_layer_matches_first_principles(name, results):
    """Recorded losses and reduced router/expert gradients of every rank equal one process's,
    computed from each expert's raw output on each token (grouped by token, no y / p)."""
    _, _, _, axis, calibrate = LAYOUTS[name]
    want = results[0][("first-principles", axis, calibrate)]
    want_fc1, want_fc2 = full_expert_grads(want["experts"])
    assert want_fc1.abs().max() > 1e-6 and want["router_EH"].abs().max() > 1e-6
    per_rank = [r[name] for r in results]
    for result in per_rank:
        for metric in ("variance_loss", "ortho_loss"):
            _assert_close(result["metrics"][metric], want["metrics"][metric], f"{name}: {metric}")
        _assert_close(result["router_EH"], want["router_EH"], f"{name}: router grad")
    fc1, fc2 = full_expert_grads([e for result in per_rank for e in result["experts"]])
    _assert_close(fc1, want_fc1, f"{name}: expert fc1 grads")
    _assert_close(fc2, want_fc2, f"{name}: expert fc2 grads")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layer_output_is_unchanged(name, results):
    """Bit-identical to the stock MoELayer's output with the same weights."""
    assert all(r[name]["output_equal"] for r in results)


def test_one_packed_all_reduce_per_loss(results):
    """Variance: 2E + 1 (tokens) or 2 (experts) numbers; orthogonality: 2; calibration: 1."""
    for name, (_, _, _, axis, calibrate) in LAYOUTS.items():
        variance = 2 * NUM_EXPERTS + 1 if axis == "tokens" else 2
        expected = [variance, 1, 2, 1] if calibrate else [variance, 2]
        for r in results:
            assert r[name]["calls"] == expected, name


@pytest.mark.parametrize("dispatcher", list(SMALLEST_LAYOUT))
def test_orthogonality_reaches_the_experts_not_the_router(dispatcher, results):
    router_grad, expert_grad = results[0][("ortho-alone", dispatcher)]
    assert expert_grad > 1e-3
    assert router_grad < 1e-5 * expert_grad


@pytest.mark.parametrize("dispatcher", list(SMALLEST_LAYOUT))
def test_nothing_without_grad_or_in_eval(dispatcher, results):
    for mode in ("no-grad", "eval"):
        calls, metrics = results[0][(mode, dispatcher)]
        assert calls == [] and metrics == {}, mode


def test_calibration_is_identical_on_every_rank_and_hits_the_target(results):
    weights = [r["ep2-alltoall"]["weights"] for r in results]
    assert weights[0] == weights[1]
    metrics = results[0]["ep2-alltoall"]["metrics"]
    for weight, metric in zip(weights[0], ("variance_loss", "ortho_loss"), strict=True):
        assert weight * abs(metrics[metric]) == pytest.approx(TARGETS[metric], rel=1e-6)
    assert results[0]["tp2sp-alltoall"]["weights"] == (VARIANCE_COEFF, ORTHO_COEFF)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_weighted_metrics_are_the_weight_in_use_times_the_raw_metric(name, results):
    """``weighted_<m> = weight * m`` with the weight the loss used (the flag's coefficient, or
    the calibrated one): what each term adds to the objective (docs/method.md section 3)."""
    _, _, _, _, calibrate = LAYOUTS[name]
    for r in results:
        metrics, weights = r[name]["metrics"], r[name]["weights"]
        if not calibrate:
            assert weights == (VARIANCE_COEFF, ORTHO_COEFF)
        for weight, metric in zip(weights, ("variance_loss", "ortho_loss"), strict=True):
            assert metrics[metric] > 0, (name, metric)
            assert metrics[f"weighted_{metric}"] == pytest.approx(weight * metrics[metric]), name


def test_grouping_by_expert_would_give_another_value(results):
    """The released code's grouping (consecutive rows of the expert-major layout: one expert's
    outputs for different tokens) gives another loss on this data, so the equalities above tell
    the two groupings apart."""
    for axis, calibrate in REFERENCES:
        ref = results[0][("first-principles", axis, calibrate)]
        by_token, by_expert = ref["metrics"]["ortho_loss"], ref["ortho_by_expert"]
        assert by_token > 0 and abs(by_expert - by_token) > 0.1 * by_token
