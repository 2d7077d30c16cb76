"""The loss registry (megatron_edl.integration.losses.registry), and a new router loss added
through it alone.

The toy z-loss of ``toy_zloss.py`` (one module, one config branch, one entry) is registered in
a gloo run (2 data-parallel ranks, each routing its own tokens) and must, with router.py, spec.py
and pretrain_gpt.py untouched:

* **train**: its gradient reach the router weight, after Megatron's reduction (DDP average over
  DP) equal to ``coeff * grad_W L_z`` of one process over both ranks' tokens (float64 autograd
  in the parent), and nothing else reach it (no load balancing, no Megatron z-loss);
* **log**: the launcher's registration (``register_run_metrics``) list its metric for Megatron's
  log line, and its recorded value equal the reference loss;
* **checkpoint**: add no key, so the router's state dict equals the stock ``TopKRouter``'s and
  loads into it (and back) strictly.

Without the entry, the same run shows none of it (asserted too).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_edl.config import (
    EDLConfig,
    EDLRunConfig,
    LabelsConfig,
    OrthogonalityConfig,
    VarianceConfig,
)
from megatron_edl.integration.losses import registry
from megatron_edl.integration.losses.edl import EDL_METRICS
from tests.helpers.distributed import run_distributed
from tests.unit.integration.losses import toy_zloss

NUM_EXPERTS, HIDDEN, TOPK = 4, 8, 2
SEQ, MBS = 4, 2  # tokens per rank: SEQ * MBS
COEFF = 0.3


def _data(world_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "weight_EH": 0.5 * torch.randn(NUM_EXPERTS, HIDDEN, generator=gen),
        "hidden_SBH": torch.randn(SEQ, MBS * world_size, HIDDEN, generator=gen),
    }


def _reference(data: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    """L_z of every token and ``coeff * grad_W L_z``, one process, float64."""
    w_EH = data["weight_EH"].double().requires_grad_(True)
    logits_TE = data["hidden_SBH"].double().reshape(-1, HIDDEN) @ w_EH.T
    loss = (torch.logsumexp(logits_TE, dim=-1) ** 2).mean()
    (grad_EH,) = torch.autograd.grad(COEFF * loss, w_EH)
    return loss.item(), grad_EH


def _worker(rank: int, world_size: int, data: dict[str, torch.Tensor], register: bool):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import moe_logging
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_edl import cpu
    from megatron_edl.integration.spec import with_aux_loss_router

    cpu.apply()
    if register:  # the whole of the wiring: one registry entry
        registry.register(toy_zloss.ENTRY)
    parallel_state.initialize_model_parallel()
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        add_bias_linear=False,
    )
    run = toy_zloss.RunConfigWithZLoss(zloss=toy_zloss.ZLossConfig(coeff=COEFF))
    out: dict[str, Any] = {"registered": registry.register_run_metrics(run)}
    out["log_names"] = list(moe_logging.get_moe_metrics_tracker().aux_loss_metric_names)

    spec = with_aux_loss_router(get_gpt_layer_local_spec(num_experts=NUM_EXPERTS), run)
    builder = spec.submodules.mlp.keywords["submodules"].router
    pg = ProcessGroupCollection.use_mpu_process_groups()
    router = builder(config=config, pg_collection=pg)
    router.set_layer_number(1)
    stock = TopKRouter(config=config, pg_collection=pg)
    with torch.no_grad():
        router.weight.copy_(data["weight_EH"])
    out["terms"] = list(router.aux_terms)

    # Train: one forward/backward of this rank's samples, Megatron's reduction by hand.
    hidden_sBH = data["hidden_SBH"][:, rank * MBS : (rank + 1) * MBS].contiguous()
    moe_logging.destroy_moe_metrics_tracker()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))  # cp / num_microbatches
    router.train()
    probs, _ = router(hidden_sBH)
    (probs * 0).sum().backward()
    grad_EH = router.weight.grad
    grad_EH = torch.zeros_like(router.weight) if grad_EH is None else grad_EH.detach().clone()
    dist.all_reduce(grad_EH)
    out["grad_EH"] = (grad_EH / world_size).double().tolist()  # DDP average

    # Log: the recorded metric of layer 1.
    entry = moe_logging.get_moe_metrics_tracker().metrics.get(toy_zloss.METRIC)
    out["recorded"] = None if entry is None else entry.values[0].item()

    # Checkpoint: the stock router's keys, strict loads both ways.
    out["keys"] = sorted(router.state_dict())
    out["stock_keys"] = sorted(stock.state_dict())
    stock.load_state_dict(router.state_dict(), strict=True)
    router.load_state_dict(stock.state_dict(), strict=True)
    out["round_trip"] = torch.equal(router.weight, stock.weight)
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["registered", "not-registered"])
def toy_run(request) -> tuple[bool, list[dict[str, Any]], tuple[float, torch.Tensor]]:
    data = _data(world_size=2)
    results = run_distributed(_worker, 2, data, request.param, timeout_s=120)
    return request.param, results, _reference(data)


def test_a_registered_toy_loss_trains_logs_and_checkpoints(toy_run):
    registered, results, (want_loss, want_grad_EH) = toy_run
    assert want_grad_EH.abs().max() > 1e-3
    for r in results:
        assert r["keys"] == r["stock_keys"] and r["round_trip"]
        got_EH = torch.tensor(r["grad_EH"], dtype=torch.float64)
        if not registered:  # the control: no entry, no term, no gradient, no metric
            assert r["terms"] == [] and r["registered"] == ()
            assert r["recorded"] is None and got_EH.abs().max() == 0
            continue
        assert r["terms"] == ["toy_zloss"]
        assert r["registered"] == (toy_zloss.METRIC,)
        assert toy_zloss.METRIC in r["log_names"]
        assert r["recorded"] == pytest.approx(want_loss, rel=1e-5)
        torch.testing.assert_close(got_EH, want_grad_EH, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The registry itself
# ---------------------------------------------------------------------------------------------


def test_the_built_in_losses_in_the_order_the_router_applies_them():
    assert list(registry.LOSSES) == ["edl", "variance", "orthogonality"]
    assert [e.hook for e in registry.entries()] == ["router", "router", "layer"]
    assert [e.config_field for e in registry.entries()] == ["edl", "variance", "orthogonality"]
    assert registry.entries(registry.Hook.LAYER) == (registry.ORTHOGONALITY,)


def test_metric_names_of_the_losses_that_are_on():
    assert registry.metric_names(EDLRunConfig()) == ()
    both = EDLRunConfig(
        variance=VarianceConfig(coeff=0.1), orthogonality=OrthogonalityConfig(coeff=0.2)
    )
    assert registry.metric_names(both) == (
        "variance_loss",
        "weighted_variance_loss",
        "ortho_loss",
        "weighted_ortho_loss",
    )
    labels = LabelsConfig(num_domains=2)
    assert registry.metric_names(EDLRunConfig(labels=labels)) == ()  # EDL's coefficient is 0
    edl = EDLRunConfig(labels=labels, edl=EDLConfig(coeff=0.1))
    assert registry.metric_names(edl) == EDL_METRICS
    assert registry.moe_layer_class(both) is registry.ORTHOGONALITY.moe_layer
    assert registry.moe_layer_class(edl) is None


def test_an_entry_is_checked_and_registered_once(monkeypatch):
    monkeypatch.setattr(registry, "LOSSES", dict(registry.LOSSES))
    registry.register(toy_zloss.ENTRY)
    with pytest.raises(ValueError, match="loss 'toy_zloss' registered twice"):
        registry.register(toy_zloss.ENTRY)
    with pytest.raises(ValueError, match="has no branch 'zloss'"):
        registry.metric_names(EDLRunConfig())  # a run config without the branch
    run = toy_zloss.RunConfigWithZLoss(zloss=toy_zloss.ZLossConfig(coeff=1.0))
    assert registry.metric_names(run) == (toy_zloss.METRIC,)
    with pytest.raises(ValueError, match="a layer hook needs moe_layer"):
        registry.LossEntry(
            name="x", config_field="x", hook="layer", build=lambda run, ctx: None, metric_names=()
        )
    with pytest.raises(ValueError, match="a router hook takes no moe_layer"):
        registry.LossEntry(
            name="x",
            config_field="x",
            hook="router",
            build=lambda run, ctx: None,
            metric_names=(),
            moe_layer=object,
        )
