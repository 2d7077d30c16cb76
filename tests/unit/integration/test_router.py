"""``AuxLossTopKRouter`` (EDL in Megatron's real router) on gloo (CPU), against single-process
references.

Every scenario builds a real ``AuxLossTopKRouter`` (megatron-core 0.19.2 ``TopKRouter`` + EDL)
under
``parallel_state.initialize_model_parallel`` for one layout, feeds each rank the tokens it would
see in Megatron (DP: its samples; CP: its zig-zag share of the sequence; TP with sequence
parallel: rows ``[r*s/tp, (r+1)*s/tp)`` of the ``[s, b, h]`` layout, labels sliced by
``router_labels``), runs forward and ``(probs * 0).sum().backward()`` (so only the EDL term the
``MoEAuxLossAutoScaler`` carries reaches the router weight: no load balancing, no z-loss), with the
aux-loss scale the schedule sets (``cp / num_microbatches``, or 1 with
``calculate_per_token_loss``), and then emulates Megatron's gradient reduction of the router
weight by hand: SUM over TP when the parameter is tagged ``sequence_parallel``
(``finalize_model_grads``), then over DP x CP either AVERAGE (DDP) or, per-token, SUM and divide
by the global token count.

Expected values (method.md section 2, "Gradient scale") are computed in the parent process with
the pure math of ``megatron_edl.core.edl`` on the concatenated, unsharded tokens, in float64:

    global scope: reduced grad = coeff / nmb * sum_mb grad_W L_ED(all ranks' tokens of mb)
    local scope:  reduced grad = coeff / nmb * sum_mb mean_dp grad_W L_ED(replica dp's tokens)

and every rank's recorded ``edl_loss`` equals the loss of its scope's tokens.

To keep the file fast, all scenarios of one world size run in one spawn (a module-scoped lazy
fixture); workers only record what they see and the tests assert on it, so each scenario still
passes or fails on its own. Workers return plain Python values.

Shape legend: B samples, S sequence, s local sequence, H hidden, E experts, D domains, T tokens.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from megatron_edl.core.edl import domain_sums, edl_loss, routing_probs
from tests.helpers.distributed import count_all_reduce, run_distributed

NUM_EXPERTS = 8
NUM_DOMAINS = 4
HIDDEN = 16
TOPK = 2
SEQ = 8  # divisible by 2 * cp * tp for every layout below
MBS = 2  # samples per DP replica per micro-batch
COEFF = 0.3  # != 1, so a missing coefficient shows
PACKED_NUMEL = NUM_DOMAINS * NUM_EXPERTS + NUM_DOMAINS
TIMEOUT_S = 90
RTOL = 1e-5

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def make_batch(gen: torch.Generator, dp: int, ignored_replicas: tuple[int, ...] = ()) -> dict:
    """One global micro-batch ``[dp * MBS, SEQ]``: packed segments with domain-dependent hidden
    states (so the domain means differ and the loss is well conditioned), segment weights 1/T_s
    computed on the unsharded samples, some unlabelled (-1) segments."""
    num_samples = dp * MBS
    ids_BS = torch.empty(num_samples, SEQ, dtype=torch.int64)
    w_BS = torch.empty(num_samples, SEQ, dtype=torch.float32)
    for b in range(num_samples):
        pos = 0
        while pos < SEQ:
            length = min(int(torch.randint(1, 5, (1,), generator=gen)), SEQ - pos)
            ids_BS[b, pos : pos + length] = int(torch.randint(-1, NUM_DOMAINS, (1,), generator=gen))
            w_BS[b, pos : pos + length] = 1.0 / length
            pos += length
    for d in ignored_replicas:
        ids_BS[d * MBS : (d + 1) * MBS] = -1
    means_DH = 1.5 * torch.randn(NUM_DOMAINS, HIDDEN, generator=gen)
    hidden_BSH = torch.randn(num_samples, SEQ, HIDDEN, generator=gen)
    hidden_BSH += torch.where((ids_BS >= 0)[..., None], means_DH[ids_BS.clamp_min(0)], 0.0)
    return {"hidden_BSH": hidden_BSH, "ids_BS": ids_BS, "w_BS": w_BS}


def make_weight(gen: torch.Generator) -> torch.Tensor:
    return 0.3 * torch.randn(NUM_EXPERTS, HIDDEN, generator=gen)


def _training_job(
    layout: tuple[int, int, int],
    scope: str,
    seed: int,
    *,
    per_token: bool = False,
    accumulate: bool = False,
    window_decay: float = 0.0,
    schedule: tuple[int, ...] = (1,),
    ignored_replicas: tuple[int, ...] = (),
) -> dict[str, Any]:
    """``schedule``: the number of micro-batches of each global batch, in order."""
    gen = torch.Generator().manual_seed(seed)
    dp = layout[2]
    return {
        "kind": "training",
        "layout": layout,
        "scope": scope,
        "per_token": per_token,
        "accumulate": accumulate,
        "window_decay": window_decay,
        "schedule": schedule,
        "weight_EH": make_weight(gen),
        "batches": [make_batch(gen, dp, ignored_replicas) for _ in range(sum(schedule))],
    }


def _recompute_job(seed: int) -> dict[str, Any]:
    """Two micro-batches with the SAME hidden states and DIFFERENT labels."""
    gen = torch.Generator().manual_seed(seed)
    weight_EH = make_weight(gen)
    first = make_batch(gen, 2)
    other = make_batch(gen, 2)
    second = {**other, "hidden_BSH": first["hidden_BSH"].clone()}
    return {
        "kind": "recompute",
        "layout": (1, 1, 2),
        "scope": "global",
        "per_token": False,
        "accumulate": False,
        "schedule": (2,),
        "weight_EH": weight_EH,
        "batches": [first, second],
    }


def _simple_job(kind: str, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "kind": kind,
        "layout": (1, 1, 2),
        "scope": "global",
        "weight_EH": make_weight(gen),
        "batches": [make_batch(gen, 2)],
    }


JOBS: dict[int, dict[str, dict[str, Any]]] = {
    2: {
        "tp2-sp-global": _training_job((2, 1, 1), "global", 1),
        "cp2-global": _training_job((1, 2, 1), "global", 2),
        "cp2-global-per-token": _training_job((1, 2, 1), "global", 3, per_token=True),
        "dp2-global": _training_job((1, 1, 2), "global", 4),
        "dp2-local": _training_job((1, 1, 2), "local", 5),
        "dp2-global-per-token": _training_job((1, 1, 2), "global", 6, per_token=True),
        "dp2-global-rank1-unlabelled": _training_job((1, 1, 2), "global", 7, ignored_replicas=(1,)),
        "dp2-local-rank1-unlabelled": _training_job((1, 1, 2), "local", 8, ignored_replicas=(1,)),
        "dp2-accumulate": _training_job((1, 1, 2), "global", 9, accumulate=True, schedule=(2, 2)),
        "dp2-no-accumulate": _training_job(
            (1, 1, 2), "global", 9, accumulate=False, schedule=(2, 2)
        ),
        # Batch-size ramp-up: the number of micro-batches changes between global batches.
        "dp2-accumulate-rampup": _training_job(
            (1, 1, 2), "global", 13, accumulate=True, schedule=(2, 3)
        ),
        "dp2-window": _training_job((1, 1, 2), "global", 14, window_decay=0.5, schedule=(2, 2)),
        "cp2-window-per-token": _training_job(
            (1, 2, 1), "global", 15, per_token=True, window_decay=0.7, schedule=(1, 2)
        ),
        "dp2-recompute": _recompute_job(10),
        "dp2-collectives": _simple_job("collectives", 11),
        "dp2-errors": _simple_job("errors", 12),
    },
    4: {
        "tp2xdp2-global": _training_job((2, 1, 2), "global", 21),
        "tp2xdp2-local": _training_job((2, 1, 2), "local", 22),
        "cp2xdp2-global": _training_job((1, 2, 2), "global", 23),
        "cp2xdp2-local": _training_job((1, 2, 2), "local", 24),
        "cp2xdp2-global-per-token": _training_job((1, 2, 2), "global", 25, per_token=True),
        "tp2xcp2-global-accumulate": _training_job(
            (2, 2, 1), "global", 26, accumulate=True, schedule=(2,)
        ),
        "tp2xdp2-window": _training_job((2, 1, 2), "global", 27, window_decay=0.6, schedule=(2, 1)),
    },
}

# ---------------------------------------------------------------------------------------------
# Single-process reference (parent)
# ---------------------------------------------------------------------------------------------


def reference_loss_and_grad(
    weight_EH: torch.Tensor,
    pieces: list[tuple[dict, slice, bool] | tuple[dict, slice, bool, float]],
    score_function: str = "softmax",
) -> tuple[float, torch.Tensor]:
    """L_ED and grad_W L_ED of one process over the concatenated tokens of ``pieces``.

    Each piece is ``(batch, sample rows, detached[, scale])``; detached pieces enter as constants
    (the earlier micro-batches of an accumulated global batch, or of the window, whose token
    weights are scaled by λ^k). float64.
    """
    w_EH = weight_EH.double().clone().requires_grad_(True)
    probs, ids, weights = [], [], []
    for batch, rows, detached, *scale in pieces:
        hidden_TH = batch["hidden_BSH"][rows].reshape(-1, HIDDEN).double()
        logits_TE = hidden_TH @ (w_EH.detach() if detached else w_EH).T
        probs.append(routing_probs(logits_TE=logits_TE, score_function=score_function))
        ids.append(batch["ids_BS"][rows].reshape(-1))
        weights.append(batch["w_BS"][rows].reshape(-1).double() * (scale[0] if scale else 1.0))
    sums_DE, counts_D = domain_sums(
        probs_TE=torch.cat(probs),
        domain_ids_T=torch.cat(ids),
        weights_T=torch.cat(weights),
        num_domains=NUM_DOMAINS,
    )
    loss = edl_loss(sums_DE=sums_DE, counts_D=counts_D).loss
    loss.backward()
    return loss.item(), w_EH.grad


def _expected(job: dict[str, Any]) -> tuple[list[list[float]], list[torch.Tensor]]:
    """Per scope group (one for global, one per DP replica for local): the loss of every forward;
    and per global batch the expected reduced router-weight gradient."""
    dp, batches = job["layout"][2], job["batches"]
    if job["scope"] == "global":
        groups = [slice(0, dp * MBS)]
    else:
        groups = [slice(d * MBS, (d + 1) * MBS) for d in range(dp)]
    losses: list[list[float]] = [[] for _ in groups]
    grads = []
    first = 0
    for nmb in job["schedule"]:
        total_EH = torch.zeros(NUM_EXPERTS, HIDDEN, dtype=torch.float64)
        for g, rows in enumerate(groups):
            for i in range(first, first + nmb):
                earlier = range(first, i) if job["accumulate"] else range(0)
                pieces = [(batches[j], rows, True) for j in earlier] + [(batches[i], rows, False)]
                if job.get("window_decay", 0.0) > 0:  # every earlier micro-batch, weight λ^k
                    decay = job["window_decay"]
                    pieces = [(batches[j], rows, True, decay ** (i - j)) for j in range(i)]
                    pieces.append((batches[i], rows, False))
                loss, grad_EH = reference_loss_and_grad(job["weight_EH"], pieces)
                losses[g].append(loss)
                total_EH += grad_EH / len(groups)
        grads.append(COEFF / nmb * total_EH)
        first += nmb
    return losses, grads


# ---------------------------------------------------------------------------------------------
# Workers (module level, so the spawned children can import them)
# ---------------------------------------------------------------------------------------------


def _setup_layout(layout: tuple[int, int, int]) -> None:
    from megatron.core import parallel_state

    tp, cp, _ = layout
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        create_gloo_process_groups=False,
    )


def _coords() -> tuple[int, int, int]:
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_context_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )


def _set_num_microbatches(nmb: int, dp: int) -> None:
    from megatron.core import num_microbatches_calculator as nmbc

    nmbc.destroy_num_microbatches_calculator()
    nmbc.init_num_microbatches_calculator(
        0, None, global_batch_size=nmb * MBS * dp, micro_batch_size=MBS, data_parallel_size=dp
    )
    assert nmbc.get_num_microbatches() == nmb


def make_router(job: dict[str, Any], config_overrides: dict | None = None, **edl_overrides):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_edl.config import EDLConfig, EDLRunConfig, LabelsConfig
    from megatron_edl.integration.router import AuxLossTopKRouter

    tp, cp, _ = job["layout"]
    config_kwargs = {
        "num_layers": 2,
        "hidden_size": HIDDEN,
        "num_attention_heads": 4,
        "num_moe_experts": NUM_EXPERTS,
        "moe_router_topk": TOPK,
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_z_loss_coeff": None,
        "tensor_model_parallel_size": tp,
        "context_parallel_size": cp,
        "sequence_parallel": tp > 1,
        "calculate_per_token_loss": job.get("per_token", False),
        "use_cpu_initialization": True,
        "params_dtype": torch.float32,
        "add_bias_linear": False,  # MoE bias needs expert TP = 1; the router has no bias anyway
    }
    config = TransformerConfig(**{**config_kwargs, **(config_overrides or {})})
    edl_kwargs = {
        "coeff": COEFF,
        "scope": job["scope"],
        "accumulate": job.get("accumulate", False),
        "window_decay": job.get("window_decay", 0.0),
        **edl_overrides,
    }
    router = AuxLossTopKRouter(
        config=config,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        run_config=EDLRunConfig(
            labels=LabelsConfig(num_domains=NUM_DOMAINS), edl=EDLConfig(**edl_kwargs)
        ),
    )
    router.set_layer_number(1)
    with torch.no_grad():
        router.weight.copy_(job["weight_EH"])
    router.train()
    return router


def _cp_positions(cp_rank: int, cp: int) -> torch.Tensor:
    """Megatron's zig-zag CP split: chunks ``cp_rank`` and ``2*cp - 1 - cp_rank`` of 2*cp."""
    chunk = SEQ // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat([first, second])


def rank_inputs(batch: dict, layout: tuple[int, int, int], coords: tuple[int, int, int]):
    """This rank's router input ``[s/tp, b, H]`` and its labels, as Megatron slices them."""
    from megatron_edl.integration.labels import router_labels

    tp, cp, _ = layout
    tp_rank, cp_rank, dp_rank = coords
    rows = slice(dp_rank * MBS, (dp_rank + 1) * MBS)
    positions = _cp_positions(cp_rank, cp)
    hidden_BsH = batch["hidden_BSH"][rows][:, positions]
    hidden_sBH = hidden_BsH.transpose(0, 1)
    if tp > 1:
        s = hidden_sBH.shape[0]
        hidden_sBH = hidden_sBH[tp_rank * s // tp : (tp_rank + 1) * s // tp]
    labels = router_labels(
        batch["ids_BS"][rows][:, positions],
        batch["w_BS"][rows][:, positions],
        sequence_parallel=tp > 1,
        tp_rank=tp_rank,
        tp_size=tp,
    )
    return hidden_sBH.contiguous(), labels


def take_edl_loss() -> float | None:
    """The ``edl_loss`` the router recorded since the last call (None if none), then clear."""
    from megatron.core.transformer.moe import moe_logging

    entry = moe_logging.get_moe_metrics_tracker().metrics.get("edl_loss")
    moe_logging.destroy_moe_metrics_tracker()
    return None if entry is None else entry.values[0].item()


def _set_aux_loss_scale(job: dict[str, Any], nmb: int) -> None:
    """What Megatron's schedule sets after each forward (non per-token: cp / nmb)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    cp = job["layout"][1]
    scale = 1.0 if job.get("per_token", False) else cp / nmb
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale))


def _reduce_grad(router, job: dict[str, Any], lm_tokens: int) -> list[list[float]]:
    """Megatron's reduction of the router-weight gradient (finalize_model_grads + DDP).

    Returned as nested lists: tensors sent back through the runner's queue are shared by file
    descriptor and can fail to arrive once the worker has exited.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp, cp, dp = job["layout"]
    grad_EH = router.weight.grad
    grad_EH = torch.zeros_like(router.weight) if grad_EH is None else grad_EH.detach().clone()
    if (
        tp > 1
        and router.config.sequence_parallel
        and getattr(router.weight, "sequence_parallel", False)
    ):
        dist.all_reduce(grad_EH, group=parallel_state.get_tensor_model_parallel_group())
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    assert dp_cp_group.size() == dp * cp
    dist.all_reduce(grad_EH, group=dp_cp_group)
    if job.get("per_token", False):
        # DDP sums; finalize_model_grads divides by the global number of LM-loss tokens.
        num_tokens = torch.tensor(float(lm_tokens))
        dist.all_reduce(num_tokens, group=dp_cp_group)
        grad_EH /= num_tokens
    else:
        grad_EH /= dp * cp  # DDP average over DP x CP
    router.weight.grad = None
    return grad_EH.double().tolist()


def _run_training(job: dict[str, Any]) -> dict[str, Any]:
    """Forward/backward every micro-batch; reduce the gradient at each global-batch end."""
    from megatron_edl.integration.labels import push_labels

    coords = _coords()
    router = make_router(job)
    out: dict[str, Any] = {"losses": [], "fwd_calls": [], "bwd_calls": [], "grads": []}
    batches = iter(job["batches"])
    for nmb in job["schedule"]:
        _set_num_microbatches(nmb, job["layout"][2])  # Megatron: update_num_microbatches
        lm_tokens = 0  # tokens of this rank's (CP-local) LM loss, for the per-token divisor
        for _ in range(nmb):
            hidden_sBH, labels = rank_inputs(next(batches), job["layout"], coords)
            push_labels(router, labels)
            with count_all_reduce() as calls:
                probs, _ = router(hidden_sBH)
            out["fwd_calls"].append(calls)
            out["losses"].append(take_edl_loss())
            _set_aux_loss_scale(job, nmb)
            with count_all_reduce() as calls:
                (probs * 0).sum().backward()
            out["bwd_calls"].append(calls)
            lm_tokens += MBS * SEQ // job["layout"][1]
        out["grads"].append(_reduce_grad(router, job, lm_tokens))
    return out


def _run_recompute(job: dict[str, Any]) -> dict[str, Any]:
    """Activation-recompute order: push 1, 2; no-grad forwards 1, 2; grad forwards 1, 2."""
    from megatron_edl.integration.labels import push_labels

    coords = _coords()
    router = make_router(job)
    (nmb,) = job["schedule"]
    _set_num_microbatches(nmb, job["layout"][2])
    inputs = [rank_inputs(batch, job["layout"], coords) for batch in job["batches"]]
    for _, labels in inputs:
        push_labels(router, labels)
    out: dict[str, Any] = {"nograd_calls": [], "nograd_losses": [], "losses": [], "fwd_calls": []}
    for hidden_sBH, _ in inputs:  # first pass of a checkpointed forward
        with torch.no_grad(), count_all_reduce() as calls:
            router(hidden_sBH)
        out["nograd_calls"].append(calls)
        out["nograd_losses"].append(take_edl_loss())
    for hidden_sBH, _ in inputs:  # the recompute, in backward order = micro-batch order
        with count_all_reduce() as calls:
            probs, _ = router(hidden_sBH)
        out["fwd_calls"].append(calls)
        out["losses"].append(take_edl_loss())
        _set_aux_loss_scale(job, nmb)
        (probs * 0).sum().backward()
    out["grads"] = [_reduce_grad(router, job, 0)]
    return out


def _run_collectives(job: dict[str, Any]) -> dict[str, Any]:
    """All-reduce counts of one forward in each situation where EDL must (not) communicate."""
    from megatron_edl.integration.labels import push_labels

    coords = _coords()
    _set_num_microbatches(1, job["layout"][2])
    hidden_sBH, labels = rank_inputs(job["batches"][0], job["layout"], coords)
    out: dict[str, Any] = {}

    def forward(router, name, *, grad=True):
        with torch.set_grad_enabled(grad), count_all_reduce() as calls:
            probs, _ = router(hidden_sBH)
        out[name] = calls
        out[f"{name}-loss"] = take_edl_loss()
        return probs

    router = make_router(job)
    push_labels(router, labels)
    forward(router, "no-grad", grad=False)  # must neither communicate nor consume the labels
    router.eval()
    forward(router, "eval")  # grad enabled but eval mode: nothing either
    router.train()
    probs = forward(router, "enabled")  # consumes the labels pushed above
    with count_all_reduce() as calls:
        (probs * 0).sum().backward()
    out["enabled-backward"] = calls
    with count_all_reduce() as calls:  # the enabled forward consumed the one entry
        try:
            router(hidden_sBH)
        except RuntimeError as err:
            out["enabled-again-error"] = str(err)
    out["enabled-again"] = calls

    disabled = make_router(job, layers=(2,))  # EDL on layer 2 only; this router is layer 1
    out["disabled-active"] = bool(disabled.active_terms(grad_enabled=True))
    push_labels(disabled, labels)  # must not queue anything for an inactive router
    probs = forward(disabled, "disabled-layer")
    (probs * 0).sum().backward()
    grad = disabled.weight.grad
    out["disabled-grad-max"] = 0.0 if grad is None else grad.abs().max().item()

    zero_coeff = make_router(job, coeff=0.0)
    push_labels(zero_coeff, labels)
    forward(zero_coeff, "zero-coeff")
    return out


def _run_errors(job: dict[str, Any]) -> dict[str, Any]:
    """Errors are raised on every rank, before any collective (so no rank is left hanging)."""
    from megatron_edl.integration.labels import DomainLabels

    coords = _coords()
    _set_num_microbatches(1, job["layout"][2])
    hidden_sBH, labels = rank_inputs(job["batches"][0], job["layout"], coords)
    out: dict[str, Any] = {"num_tokens": labels.domain_ids_T.numel()}

    router = make_router(job)
    with count_all_reduce() as calls:
        try:
            router(hidden_sBH)
        except RuntimeError as err:
            out["no-labels"] = str(err)
    out["no-labels-calls"] = calls

    router = make_router(job)
    short = DomainLabels(labels.domain_ids_T[:-1], labels.weights_T[:-1])
    router.push_labels(short)
    with count_all_reduce() as calls:
        try:
            router(hidden_sBH)
        except ValueError as err:
            out["wrong-count"] = str(err)
    out["wrong-count-calls"] = calls
    return out


RUNNERS = {
    "training": _run_training,
    "recompute": _run_recompute,
    "collectives": _run_collectives,
    "errors": _run_errors,
}


def _world_worker(rank: int, world_size: int, jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from megatron_edl import cpu

    cpu.apply()
    results: dict[str, Any] = {}
    # Group scenarios by layout so each layout initialises model parallelism once.
    for layout in dict.fromkeys(job["layout"] for job in jobs.values()):
        _setup_layout(layout)
        for name, job in jobs.items():
            if job["layout"] == layout:
                results[name] = {"coords": _coords(), **RUNNERS[job["kind"]](job)}
    return results


# ---------------------------------------------------------------------------------------------
# Fixture: one spawn per world size
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_results():
    """world size -> per-rank results; computed lazily, once per world size."""

    class _Lazy(dict):
        def __missing__(self, world: int):
            self[world] = run_distributed(_world_worker, world, JOBS[world], timeout_s=TIMEOUT_S)
            return self[world]

    return _Lazy()


def _results(world_results, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    world = next(w for w, jobs in JOBS.items() if name in jobs)
    return JOBS[world][name], [r[name] for r in world_results[world]]


def _check_layout(job: dict[str, Any], per_rank: list[dict[str, Any]]) -> None:
    tp, cp, dp = job["layout"]
    coords = sorted(r["coords"] for r in per_rank)
    assert coords == sorted((t, c, d) for t in range(tp) for c in range(cp) for d in range(dp))


def _assert_close(got: float | torch.Tensor, want: float | torch.Tensor, what: str) -> None:
    if isinstance(want, torch.Tensor):
        atol = RTOL * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        assert got == pytest.approx(want, rel=RTOL, abs=1e-7), what


def _check_against_reference(job: dict[str, Any], per_rank: list[dict[str, Any]]) -> None:
    _check_layout(job, per_rank)
    losses, grads = _expected(job)
    for result in per_rank:
        rank_losses = losses[0 if job["scope"] == "global" else result["coords"][2]]
        assert len(result["losses"]) == len(rank_losses)
        for i, (got, want) in enumerate(zip(result["losses"], rank_losses, strict=True)):
            _assert_close(got, want, f"coords {result['coords']}, forward {i}: loss")
        assert len(result["grads"]) == len(grads)
        for i, (got, want) in enumerate(zip(result["grads"], grads, strict=True)):
            got = torch.tensor(got, dtype=torch.float64)
            _assert_close(got, want, f"coords {result['coords']}, global batch {i}: grad")


# ---------------------------------------------------------------------------------------------
# 1-2. Layout equivalence (and the per-token variant)
# ---------------------------------------------------------------------------------------------

EQUIVALENCE = [
    "tp2-sp-global",
    "cp2-global",
    "dp2-global",
    "dp2-local",
    "tp2xdp2-global",
    "tp2xdp2-local",
    "cp2xdp2-global",
    "cp2xdp2-local",
]


@pytest.mark.parametrize("name", EQUIVALENCE)
def test_router_matches_single_process_reference(name, world_results):
    job, per_rank = _results(world_results, name)
    _check_against_reference(job, per_rank)


@pytest.mark.parametrize("name", ["dp2-window", "cp2-window-per-token", "tp2xdp2-window"])
def test_window_matches_single_process_reference(name, world_results):
    """The statistics window (--moe-edl-window-decay): every forward's loss is the reference's on
    the current micro-batch plus the λ^k-weighted detached earlier ones (across global batches),
    and the gradients match one process's, under DP, CP (per-token loss) and TP+SP x DP."""
    job, per_rank = _results(world_results, name)
    _check_against_reference(job, per_rank)


def test_window_reference_discriminates():
    """The window's reference differs from the plain one (so the window test can fail)."""
    job = JOBS[2]["dp2-window"]
    plain = {**job, "window_decay": 0.0}
    (window_losses,), window_grads = _expected(job)
    (plain_losses,), plain_grads = _expected(plain)
    assert window_losses[0] == pytest.approx(plain_losses[0])  # no history yet
    assert all(abs(w - p) > 1e-4 for w, p in zip(window_losses[1:], plain_losses[1:], strict=True))
    assert not torch.allclose(window_grads[-1], plain_grads[-1], rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "name", ["cp2-global-per-token", "dp2-global-per-token", "cp2xdp2-global-per-token"]
)
def test_per_token_loss_matches_single_process_reference(name, world_results):
    """``calculate_per_token_loss``: aux scale 1, DDP sums, grads divided by the token count."""
    job, per_rank = _results(world_results, name)
    _check_against_reference(job, per_rank)


def test_every_training_forward_is_one_packed_all_reduce(world_results):
    """3. Exactly one all-reduce of D*E + D numbers per EDL forward, none in the backward
    (and none at all over a one-rank statistics group: nothing to sum)."""
    for world, jobs in JOBS.items():
        for name, job in jobs.items():
            if job["kind"] != "training":
                continue
            tp, cp, dp = job["layout"]
            group_size = tp * cp * (dp if job["scope"] == "global" else 1)
            expected = [[PACKED_NUMEL] if group_size > 1 else []] * len(job["batches"])
            for result in world_results[world]:
                rank_results = result[name]
                assert rank_results["fwd_calls"] == expected, name
                assert rank_results["bwd_calls"] == [[]] * len(job["batches"]), name


# ---------------------------------------------------------------------------------------------
# 3. Collectives: one when EDL runs, none otherwise
# ---------------------------------------------------------------------------------------------


def test_collectives_only_when_edl_runs(world_results):
    _, per_rank = _results(world_results, "dp2-collectives")
    for result in per_rank:
        assert result["enabled"] == [PACKED_NUMEL]
        assert result["enabled-loss"] is not None
        assert result["enabled-backward"] == []
        assert result["no-grad"] == [] and result["no-grad-loss"] is None
        assert result["eval"] == [] and result["eval-loss"] is None
        assert result["disabled-active"] is False
        assert result["disabled-layer"] == [] and result["disabled-layer-loss"] is None
        assert result["disabled-grad-max"] == 0.0
        assert result["zero-coeff"] == [] and result["zero-coeff-loss"] is None


def test_no_grad_and_eval_forwards_consume_no_labels(world_results):
    """One push, then a no-grad and an eval forward: the grad forward still finds the labels
    (and gets the right loss); the one after it finds none."""
    job, per_rank = _results(world_results, "dp2-collectives")
    expected_loss, _ = reference_loss_and_grad(
        job["weight_EH"], [(job["batches"][0], slice(None), False)]
    )
    for result in per_rank:
        _assert_close(result["enabled-loss"], expected_loss, "enabled forward loss")
        assert "no domain labels" in result["enabled-again-error"]
        assert result["enabled-again"] == []


# ---------------------------------------------------------------------------------------------
# 4. Micro-batch accumulation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["dp2-accumulate", "dp2-no-accumulate", "tp2xcp2-global-accumulate"]
)
def test_micro_batches_accumulate_or_not(name, world_results):
    """accumulate: micro-batch 2 sees micro-batches 1 (detached) and 2, and the accumulator
    restarts at the next global batch; no accumulate: each micro-batch sees only its own."""
    job, per_rank = _results(world_results, name)
    _check_against_reference(job, per_rank)


def test_accumulation_references_discriminate():
    """The accumulated and non-accumulated references differ exactly where they should."""
    acc_losses, acc_grads = _expected(JOBS[2]["dp2-accumulate"])
    own_losses, own_grads = _expected(JOBS[2]["dp2-no-accumulate"])
    (acc,), (own,) = acc_losses, own_losses
    # First micro-batch of each global batch: identical (the reset), second: different.
    assert acc[0] == pytest.approx(own[0], rel=1e-12)
    assert acc[2] == pytest.approx(own[2], rel=1e-12)
    assert abs(acc[1] - own[1]) > 1e-3 * abs(own[1])
    assert abs(acc[3] - own[3]) > 1e-3 * abs(own[3])
    # Without the reset micro-batch 3 would see micro-batches 1, 2 too.
    batches = JOBS[2]["dp2-accumulate"]["batches"]
    weight_EH = JOBS[2]["dp2-accumulate"]["weight_EH"]
    no_reset, _ = reference_loss_and_grad(
        weight_EH,
        [(batches[0], slice(None), True), (batches[1], slice(None), True)]
        + [(batches[2], slice(None), False)],
    )
    assert abs(no_reset - acc[2]) > 1e-3 * abs(acc[2])
    assert not torch.allclose(acc_grads[0], own_grads[0], rtol=1e-3, atol=0)


def test_accumulator_resets_when_the_number_of_micro_batches_changes(world_results):
    job, per_rank = _results(world_results, "dp2-accumulate-rampup")
    _check_against_reference(job, per_rank)


# ---------------------------------------------------------------------------------------------
# 5. Errors and unlabelled ranks
# ---------------------------------------------------------------------------------------------


def test_missing_labels_raise_runtime_error(world_results):
    _, per_rank = _results(world_results, "dp2-errors")
    for result in per_rank:
        assert "no domain labels" in result.get("no-labels", "<no RuntimeError>")
        assert result["no-labels-calls"] == []


def test_wrong_label_count_raises_value_error_naming_the_counts(world_results):
    _, per_rank = _results(world_results, "dp2-errors")
    for result in per_rank:
        message = result.get("wrong-count", "<no ValueError>")
        tokens = result["num_tokens"]
        assert re.search(rf"\b{tokens}\b", message), message
        assert re.search(rf"\b{tokens - 1}\b", message), message
        assert result["wrong-count-calls"] == []


@pytest.mark.parametrize("name", ["dp2-global-rank1-unlabelled", "dp2-local-rank1-unlabelled"])
def test_rank_with_only_unlabelled_tokens(name, world_results):
    """Rank 1's tokens are all -1: it still takes part (no hang) and rank 0's result is right."""
    job, per_rank = _results(world_results, name)
    assert (job["batches"][0]["ids_BS"][MBS:] == -1).all()
    assert len(set(job["batches"][0]["ids_BS"][:MBS].flatten().tolist()) - {-1}) >= 2
    _check_against_reference(job, per_rank)
    if job["scope"] == "local":
        assert next(r for r in per_rank if r["coords"][2] == 1)["losses"] == [0.0]


# ---------------------------------------------------------------------------------------------
# 6. Recompute ordering
# ---------------------------------------------------------------------------------------------


def test_recompute_consumes_labels_in_micro_batch_order(world_results):
    job, per_rank = _results(world_results, "dp2-recompute")
    for result in per_rank:
        assert result["nograd_calls"] == [[], []]
        assert result["nograd_losses"] == [None, None]
        assert result["fwd_calls"] == [[PACKED_NUMEL], [PACKED_NUMEL]]
    _check_against_reference(job, per_rank)
    # Same hidden states, different labels: a swap of the labels would change both losses.
    first, second = job["batches"]
    own = [
        reference_loss_and_grad(job["weight_EH"], [(b, slice(None), False)])[0]
        for b in (first, second)
    ]
    swapped = [
        reference_loss_and_grad(
            job["weight_EH"],
            [({**b, "ids_BS": o["ids_BS"], "w_BS": o["w_BS"]}, slice(None), False)],
        )[0]
        for b, o in ((first, second), (second, first))
    ]
    assert abs(own[0] - own[1]) > 1e-3 * abs(own[0])
    assert abs(own[0] - swapped[0]) > 1e-3 * abs(own[0])


# ---------------------------------------------------------------------------------------------
# The references discriminate between the scopes and scales the tests tell apart
# ---------------------------------------------------------------------------------------------


def test_references_discriminate():
    for world, jobs in JOBS.items():
        for name, job in jobs.items():
            if job["kind"] not in ("training", "recompute"):
                continue
            losses, grads = _expected(job)
            assert all(grad.abs().max() > 1e-4 for grad in grads), name
            for batch in job["batches"]:
                labelled = set(batch["ids_BS"].flatten().tolist()) - {-1}
                assert len(labelled) >= 2, (world, name)
    for global_name, local_name in (
        ("dp2-global", "dp2-local"),
        ("cp2xdp2-global", "cp2xdp2-local"),
    ):
        world = 2 if global_name in JOBS[2] else 4
        local_job = {**JOBS[world][local_name]}
        global_job = {**local_job, "scope": "global"}
        ((global_loss,),), (global_grad,) = _expected(global_job)
        local_losses, (local_grad,) = _expected(local_job)
        assert len({round(losses[0], 8) for losses in local_losses}) == len(local_losses)
        assert all(abs(losses[0] - global_loss) > 1e-4 for losses in local_losses)
        assert not torch.allclose(global_grad, local_grad, rtol=1e-3, atol=0)


def one_process_job(seed: int) -> tuple[dict[str, Any], dict]:
    """In a one-rank worker: Megatron set up for one process (CPU layer, TP = CP = DP = 1, one
    micro-batch per global batch); a global-scope job and one micro-batch from ``seed``."""
    from megatron_edl import cpu

    cpu.apply()
    _setup_layout((1, 1, 1))
    _set_num_microbatches(1, 1)
    gen = torch.Generator().manual_seed(seed)
    job = {"layout": (1, 1, 1), "scope": "global", "weight_EH": make_weight(gen)}
    return job, make_batch(gen, dp=1)


def forward_backward(router, job: dict[str, Any], batch: dict, *, iteration=None):
    """One training forward of ``router`` on ``batch`` (labels pushed, with the optimizer step
    ``iteration``), then ``(probs * 0).sum().backward()`` at aux-loss scale 1."""
    import dataclasses

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_edl.integration.labels import push_labels

    hidden_sBH, labels = rank_inputs(batch, job["layout"], (0, 0, 0))
    push_labels(router, dataclasses.replace(labels, iteration=iteration))
    probs, routing_map = router(hidden_sBH)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    (probs * 0).sum().backward()
    return probs, routing_map


def _aux_reuse_job(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    """EDL next to Megatron's aux loss: gradients with the reused aux-loss softmax vs EDL's own."""
    import types
    from unittest import mock

    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_edl.core import edl

    job, batch = one_process_job(seed)
    out = {}
    for mode in ("reuse", "own_softmax"):
        router = make_router(job)
        router.config.moe_router_load_balancing_type = "aux_loss"
        router.routing_type = "aux_loss"
        router.config.moe_aux_loss_coeff = 0.01
        if mode == "own_softmax":
            router._apply_aux_loss = types.MethodType(TopKRouter._apply_aux_loss, router)
        with mock.patch.object(edl, "routing_probs", wraps=edl.routing_probs) as own:
            forward_backward(router, job, batch)
        out[mode] = (own.call_count, take_edl_loss(), router.weight.grad.clone())
    return out


def test_edl_reuses_the_aux_loss_softmax_with_the_same_gradient():
    (out,) = run_distributed(_aux_reuse_job, 1, seed=7)
    calls_reuse, loss_reuse, grad_reuse = out["reuse"]
    calls_own, loss_own, grad_own = out["own_softmax"]
    assert (calls_reuse, calls_own) == (0, 1)  # the reused run computed no softmax of its own
    assert loss_reuse == pytest.approx(loss_own, rel=1e-6)
    torch.testing.assert_close(grad_reuse, grad_own, rtol=1e-5, atol=1e-7)
    assert grad_own.abs().max() > 0


def _fused_router_job(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    """The same router call with ``--moe-edl-fused off`` and ``on``: loss, metric, gradient."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_edl import cpu
    from megatron_edl.core import edl_fused
    from megatron_edl.integration.labels import push_labels

    cpu.apply()
    _setup_layout((1, 1, 1))
    _set_num_microbatches(1, 1)
    gen = torch.Generator().manual_seed(seed)
    job = {"layout": (1, 1, 1), "scope": "global", "weight_EH": make_weight(gen)}
    batch = make_batch(gen, dp=1)
    out = {}
    for fused in ("off", "on"):
        router = make_router(job, fused=fused)
        hidden_sBH, labels = rank_inputs(batch, job["layout"], (0, 0, 0))
        push_labels(router, labels)
        probs, _ = router(hidden_sBH)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        (probs * 0).sum().backward()
        path = edl_fused.select_path(router.run_config.edl.fused.compile, probs.device)
        out[fused] = (path.compiled, take_edl_loss(), router.weight.grad.clone())
    return out


def test_fused_router_matches_the_eager_router():
    (out,) = run_distributed(_fused_router_job, 1, seed=7, timeout_s=300)
    compiled_off, loss_off, grad_off = out["off"]
    compiled_on, loss_on, grad_on = out["on"]
    assert (compiled_off, compiled_on) == (False, True)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    torch.testing.assert_close(grad_on, grad_off, rtol=1e-6, atol=1e-6 * grad_off.abs().max())
    assert grad_off.abs().max() > 0
