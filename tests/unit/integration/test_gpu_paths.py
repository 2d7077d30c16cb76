"""GPU-only settings reproduced on CPU: host syncs, the label copy, meta-device init, repeated MTP.

- **Host syncs** (``tests/helpers/host_syncs.py`` counts every call that would make the host
  wait for the GPU, forward and backward): the router's EDL and variance paths make none per
  micro-batch in steady state (after the auto-calibration's first step), with and without the
  statistics window or accumulation; the counter finds an ``.item()`` planted in the forward or
  in a backward. The orthogonality hook adds exactly one per MoE layer and micro-batch with each
  dispatcher (the ``nonzero()`` listing the permuted rows' (token, expert) pairs), counted on
  gloo against the stock layer. On a GPU the same router steps run under
  ``torch.cuda.set_sync_debug_mode("error")`` (marked ``gpu``).
- **Labels to the GPU**: staged in pinned memory, copied with ``non_blocking=True``; on CPU
  (no CUDA) left where they are.
- **Megatron-FSDP's meta-device init** (``--use-megatron-fsdp --init-model-with-meta-device``):
  a router built on the meta device and materialised the way Megatron-FSDP does it
  (``to_empty(recurse=False)``, then ``reset_parameters()``) has a zero window, not the
  uninitialised memory ``to_empty`` leaves.
- **Repeated MTP layer** (``--mtp-use-repeated-layer``): one router called N times per forward
  gets one copy of the labels per call, and each call's EDL and variance loss counts 1/N (the
  gradient and the recorded metric are the mean of the N calls), as Megatron's aux loss.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.unit.integration.test_router import (
    COEFF,
    HIDDEN,
    NUM_DOMAINS,
    NUM_EXPERTS,
    TOPK,
    make_batch,
    make_weight,
    one_process_job,
    rank_inputs,
    reference_loss_and_grad,
)

TIMEOUT_S = 180
OUR_CODE = (f"{os.sep}megatron_edl{os.sep}integration{os.sep}", f"{os.sep}megatron_edl{os.sep}core")


def _ours(counter) -> list:
    """The events of megatron-edl's loss code (not Megatron's, not the CPU shim's)."""
    return [e for e in counter.events if any(part in e.where for part in OUR_CODE)]


def _router(config_overrides: dict | None = None, *, is_mtp_layer=False, edl=None, variance=None):
    """An ``AuxLossTopKRouter`` like test_router.py's (one process), with the given losses."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_edl.config import EDLConfig, EDLRunConfig, LabelsConfig, VarianceConfig
    from megatron_edl.integration.router import AuxLossTopKRouter

    config = TransformerConfig(
        **{
            "num_layers": 2,
            "hidden_size": HIDDEN,
            "num_attention_heads": 4,
            "num_moe_experts": NUM_EXPERTS,
            "moe_router_topk": TOPK,
            "moe_router_load_balancing_type": "none",
            "moe_aux_loss_coeff": 0.0,
            "use_cpu_initialization": True,
            "params_dtype": torch.float32,
            "add_bias_linear": False,
            **(config_overrides or {}),
        }
    )
    router = AuxLossTopKRouter(
        config=config,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        is_mtp_layer=is_mtp_layer,
        run_config=EDLRunConfig(
            labels=None if edl is None else LabelsConfig(num_domains=NUM_DOMAINS),
            edl=EDLConfig() if edl is None else EDLConfig(coeff=COEFF, **edl),
            variance=VarianceConfig(**(variance or {})),
        ),
    )
    router.set_layer_number(1)
    router.train()
    return router


def _step(router, hidden_sBH, labels, counter_cls=None):
    """Push the labels, one training forward and backward at aux-loss scale 1; the host syncs."""
    from megatron.core.transformer.moe import moe_logging
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_edl.integration.labels import push_labels

    push_labels(router, labels)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    with counter_cls() as syncs:
        probs, _ = router(hidden_sBH)
        (probs * 0).sum().backward()
    moe_logging.destroy_moe_metrics_tracker()
    return syncs


# ---------------------------------------------------------------------------------------------
# Host syncs of the router (EDL, variance)
# ---------------------------------------------------------------------------------------------

ROUTER_CASES: dict[str, dict[str, Any]] = {
    "edl": {"edl": {}},
    "edl-local-token-weights": {"edl": {"scope": "local"}},
    "edl-window": {"edl": {"window_decay": 0.5}},
    "edl-accumulate": {"edl": {"accumulate": True}},
    "variance-tokens": {"variance": {"coeff": 0.1}},
    "variance-experts-calibrated": {
        "variance": {"coeff": 0.1, "axis": "experts", "auto_calibrate": True}
    },
    "edl-and-variance-calibrated": {
        "edl": {},
        "variance": {"coeff": 0.1, "auto_calibrate": True},
    },
}
STEPS = 3


def _router_syncs_job(rank: int, world_size: int) -> dict[str, Any]:
    from unittest import mock

    from megatron_edl.core import edl as edl_math
    from megatron_edl.integration.losses.edl import EDLTerm
    from tests.helpers.host_syncs import HostSyncCounter

    job, batch = one_process_job(31)
    hidden_sBH, labels = rank_inputs(batch, job["layout"], (0, 0, 0))
    out: dict[str, Any] = {}
    for name, losses in ROUTER_CASES.items():
        router = _router(**losses)
        steps = [_step(router, hidden_sBH, labels, HostSyncCounter) for _ in range(STEPS)]
        out[name] = [[(e.op, e.where) for e in _ours(s)] for s in steps]
        out[f"{name}-all"] = [len(s.events) for s in steps]

    # Planted syncs: one .item() in the forward (EDL's term), one in a backward (EDL's sums).
    real_apply_edl = EDLTerm.apply

    def apply_edl_with_item(self, activation, **routed):
        routed["logits_TE"].sum().item()
        return real_apply_edl(self, activation, **routed)

    real_backward = edl_math.WeightedIndexAdd.backward

    def backward_with_item(ctx, grad_DE):
        grad_DE.sum().item()
        return real_backward(ctx, grad_DE)

    for name, target, attribute, planted in (
        ("planted-forward", EDLTerm, "apply", apply_edl_with_item),
        (
            "planted-backward",
            edl_math.WeightedIndexAdd,
            "backward",
            staticmethod(backward_with_item),
        ),
    ):
        router = _router(edl={})
        _step(router, hidden_sBH, labels, HostSyncCounter)
        with mock.patch.object(target, attribute, planted):
            syncs = _step(router, hidden_sBH, labels, HostSyncCounter)
        out[name] = [(e.op, e.where) for e in syncs.events]  # the plant is in this file
    return out


@pytest.fixture(scope="module")
def router_syncs():
    (out,) = run_distributed(_router_syncs_job, 1, timeout_s=TIMEOUT_S)
    return out


@pytest.mark.parametrize("name", sorted(ROUTER_CASES))
def test_router_losses_make_no_host_sync_in_steady_state(name, router_syncs):
    steps = router_syncs[name]
    calibrated = "calibrated" in name
    for step, events in enumerate(steps):
        if step == 0 and calibrated:
            # The auto-calibration's first forward: the weight, and its log line (rank 0).
            assert [op for op, _ in events] == ["item", "item"], events
            assert all(f"losses{os.sep}base.py" in where for _, where in events), events
        else:
            assert events == [], f"step {step + 1}: {events}"
    # Nothing in Megatron's router either (TopKRouter with these settings syncs nowhere).
    assert router_syncs[f"{name}-all"][1:] == [0] * (STEPS - 1)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_planted_item_on_the_router_path_is_counted(where, router_syncs):
    events = router_syncs[f"planted-{where}"]
    assert [op for op, _ in events] == ["item"], events
    assert "test_gpu_paths.py" in events[0][1]


# ---------------------------------------------------------------------------------------------
# Host syncs of the orthogonality hook, per dispatcher
# ---------------------------------------------------------------------------------------------

DISPATCHERS = {"allgather": (1, 2), "alltoall": (1, 2), "flex": (1, 2), "alltoall-tp2sp": (2, 1)}


def _ortho_syncs_job(rank: int, world_size: int) -> dict[str, Any]:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_edl import cpu
    from tests.helpers import deepep_emulation
    from tests.helpers.host_syncs import HostSyncCounter
    from tests.unit.integration.losses.test_orthogonality import (
        build,
        local_hidden,
        setup_layout,
        take_metrics,
    )

    cpu.apply()
    deepep_emulation.install()
    out: dict[str, Any] = {}
    for name, (tp, ep) in DISPATCHERS.items():
        setup_layout(tp, ep)
        hidden_sBH = local_hidden(tp)
        for stock in (True, False):
            layer, _, _ = build(tp, ep, name.split("-")[0], "tokens", False, stock=stock)
            if not stock:
                del layer.router.aux_terms["variance"]  # the orthogonality loss alone
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
            for _ in range(2):  # the second step is the one counted
                with HostSyncCounter() as syncs:
                    output, _ = layer(hidden_sBH)
                    (output * 0).sum().backward()
                take_metrics()
            out[(name, stock)] = ([(e.op, e.where) for e in _ours(syncs)], len(syncs.events))
    return out


@pytest.fixture(scope="module")
def ortho_syncs():
    return run_distributed(_ortho_syncs_job, 2, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("name", sorted(DISPATCHERS))
def test_orthogonality_adds_one_host_sync_per_layer(name, ortho_syncs):
    """docs/method.md: the one nonzero() of permuted_row_tokens, on every rank."""
    for per_rank in ortho_syncs:
        stock_events, _ = per_rank[(name, True)]
        events, _ = per_rank[(name, False)]
        assert stock_events == []
        assert [op for op, _ in events] == ["nonzero"], events
        assert f"core{os.sep}orthogonality.py" in events[0][1]


# ---------------------------------------------------------------------------------------------
# Labels to the device
# ---------------------------------------------------------------------------------------------


def test_labels_reach_the_gpu_from_pinned_memory_without_blocking(monkeypatch):
    """With CUDA (simulated on CPU: pinning and the device are stand-ins) each label key is
    pinned unless the loader already pinned it, and copied with ``non_blocking=True``."""
    from megatron_edl.integration import labels as edl_labels

    pinned: list[tuple[int, ...]] = []
    copies: list[dict] = []
    real_to = torch.Tensor.to

    def pin_memory(self):
        pinned.append(tuple(self.shape))
        return self.clone()

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device):  # the copy to the device
            copies.append({"device": args[0], "non_blocking": kwargs.get("non_blocking", False)})
            return self.clone()
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    batch = {
        "domain_ids": torch.tensor([[0, 1, -1, 2]]),
        "edl_weights": torch.tensor([[0.5, 0.5, 0.0, 1.0]]),
    }
    out = edl_labels.broadcast_labels_over_tp(
        batch, tp_rank=0, src_rank=0, group=None, micro_batch_size=1, seq_length=4
    )
    assert pinned == [(1, 4), (1, 4)]
    assert copies == [{"device": torch.device("cuda", 0), "non_blocking": True}] * 2
    assert torch.equal(out["domain_ids"], batch["domain_ids"])
    assert torch.equal(out["edl_weights"], batch["edl_weights"])


def test_labels_stay_on_the_cpu_without_cuda(monkeypatch):
    from megatron_edl.integration.labels import broadcast_labels_over_tp, to_device_async

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    ids = torch.tensor([[3, -1]])
    assert to_device_async(ids) is ids
    out = broadcast_labels_over_tp(
        {"domain_ids": ids, "edl_weights": torch.ones(1, 2)},
        tp_rank=0,
        src_rank=0,
        group=None,
        micro_batch_size=1,
        seq_length=2,
    )
    assert out["domain_ids"].device.type == "cpu" and torch.equal(out["domain_ids"], ids)


# ---------------------------------------------------------------------------------------------
# Megatron-FSDP: meta-device init
# ---------------------------------------------------------------------------------------------


def _meta_device_job(rank: int, world_size: int) -> dict[str, Any]:
    """Build on the meta device (Megatron's get_model under --init-model-with-meta-device) and
    materialise as Megatron-FSDP does (param_and_grad_buffer.py: ``m.to_empty(device=...,
    recurse=False)`` then ``m.reset_parameters()`` on the module holding a meta parameter)."""
    from megatron_edl.integration.losses.edl import WINDOW_BUFFER

    one_process_job(0)
    with torch.device("meta"):
        router = _router(edl={"window_decay": 0.5})
    window_X = getattr(router, WINDOW_BUFFER)
    built = (router.weight.is_meta, window_X.is_meta, tuple(window_X.shape))
    router.to_empty(device="cpu", recurse=False)
    getattr(router, WINDOW_BUFFER).fill_(float("nan"))  # what uninitialised memory may hold
    router.reset_parameters()
    window_X = getattr(router, WINDOW_BUFFER)
    return {
        "built": built,
        "window": window_X.tolist(),
        "weight_finite": bool(torch.isfinite(router.weight).all()),
        "persistent": WINDOW_BUFFER in router.state_dict(),
    }


def test_window_is_initialised_after_meta_device_materialisation():
    (out,) = run_distributed(_meta_device_job, 1, timeout_s=TIMEOUT_S)
    size = NUM_DOMAINS * NUM_EXPERTS + NUM_DOMAINS
    assert out["built"] == (True, True, (size,))
    assert out["window"] == [0.0] * size
    assert out["weight_finite"] and out["persistent"]


# ---------------------------------------------------------------------------------------------
# Repeated MTP layer
# ---------------------------------------------------------------------------------------------

MTP_DEPTHS = 2
MTP = {"mtp_num_layers": MTP_DEPTHS, "mtp_use_repeated_layer": True}


def _mtp_job(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    """One micro-batch through a repeated MTP layer's router: labels pushed once (the training
    step), the router called once per depth on that depth's hidden states, then backward."""
    from megatron.core.transformer.moe import moe_logging
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_edl.integration.labels import push_labels

    job, batch = one_process_job(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    depths = [batch] + [
        {**batch, "hidden_BSH": torch.randn(batch["hidden_BSH"].shape, generator=gen)}
        for _ in range(MTP_DEPTHS - 1)
    ]
    out: dict[str, Any] = {"depths": depths}
    for name, losses in (
        ("edl", {"edl": {}}),
        ("variance", {"variance": {"coeff": 0.1}}),
    ):
        router = _router(MTP, is_mtp_layer=True, **losses)
        with torch.no_grad():
            router.weight.copy_(job["weight_EH"])
        _, labels = rank_inputs(batch, job["layout"], (0, 0, 0))
        push_labels(router, labels)
        out[f"{name}-queued"] = len(router.label_queue)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        total = 0
        for depth in depths:
            hidden_sBH, _ = rank_inputs(depth, job["layout"], (0, 0, 0))
            probs, _ = router(hidden_sBH)
            total = total + (probs * 0).sum()
        total.backward()
        tracker = moe_logging.get_moe_metrics_tracker().metrics
        metric = "edl_loss" if name == "edl" else "variance_loss"
        out[f"{name}-metric"] = tracker[metric].values.tolist()
        out[f"{name}-grad"] = router.weight.grad.double()
        out[f"{name}-left"] = len(router.label_queue)
        moe_logging.destroy_moe_metrics_tracker()
        # Each depth alone through a non-MTP router: the per-call losses and gradients.
        singles = []
        for depth in depths:
            single = _router(**losses)
            with torch.no_grad():
                single.weight.copy_(job["weight_EH"])
            hidden_sBH, labels = rank_inputs(depth, job["layout"], (0, 0, 0))
            push_labels(single, labels)
            probs, _ = single(hidden_sBH)
            (probs * 0).sum().backward()
            value = moe_logging.get_moe_metrics_tracker().metrics[metric].values[0].item()
            moe_logging.destroy_moe_metrics_tracker()
            singles.append((value, single.weight.grad.double()))
        out[f"{name}-singles"] = singles
    out["weight_EH"] = job["weight_EH"]
    return out


@pytest.fixture(scope="module")
def mtp():
    (out,) = run_distributed(_mtp_job, 1, seed=41, timeout_s=TIMEOUT_S)
    return out


@pytest.mark.parametrize("name", ["edl", "variance"])
def test_repeated_mtp_router_consumes_the_same_labels_at_every_depth(name, mtp):
    assert mtp[f"{name}-queued"] == (MTP_DEPTHS if name == "edl" else 0)
    assert mtp[f"{name}-left"] == 0


@pytest.mark.parametrize("name", ["edl", "variance"])
def test_repeated_mtp_losses_count_one_nth_per_call(name, mtp):
    """Gradient and metric: the mean over the N calls of each call's own (Megatron's 1/N)."""
    singles = mtp[f"{name}-singles"]
    want_grad = sum(grad for _, grad in singles) / MTP_DEPTHS
    torch.testing.assert_close(mtp[f"{name}-grad"], want_grad, rtol=1e-5, atol=1e-9)
    metric = mtp[f"{name}-metric"]
    layer = 2 + 1  # the MTP layer follows the decoder's num_layers = 2
    assert metric[layer - 1] == pytest.approx(sum(v for v, _ in singles) / MTP_DEPTHS, rel=1e-6)
    assert [v for i, v in enumerate(metric) if i != layer - 1] == [0.0] * (len(metric) - 1)


def test_repeated_mtp_edl_matches_the_float64_reference(mtp):
    """The per-depth EDL gradients the mean is taken over are method.md's (pure math, fp64)."""
    depths = mtp["depths"]
    rows = slice(0, depths[0]["hidden_BSH"].shape[0])
    grads = [reference_loss_and_grad(mtp["weight_EH"], [(d, rows, False)])[1] for d in depths]
    want = COEFF * sum(grads) / MTP_DEPTHS
    torch.testing.assert_close(mtp["edl-grad"], want, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# GPU: the same steps under torch.cuda.set_sync_debug_mode("error")
# ---------------------------------------------------------------------------------------------


def _gpu_sync_debug_job(rank: int, world_size: int) -> dict[str, Any]:
    """EDL (default path on CUDA: compiled) and variance, labels from pinned memory through
    ``broadcast_labels_over_tp``; warm-up steps (compilation, calibration) before the mode."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
    from megatron.core.transformer.moe import moe_logging
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_edl.integration.labels import (
        broadcast_labels_over_tp,
        push_labels,
        router_labels,
    )

    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel()
    init_num_microbatches_calculator(0, None, 2, 2, 1)
    gen = torch.Generator().manual_seed(5)
    batch = make_batch(gen, dp=1)
    loader_batch = {
        "domain_ids": batch["ids_BS"].pin_memory(),
        "edl_weights": batch["w_BS"].pin_memory(),
    }
    hidden_sBH = batch["hidden_BSH"].transpose(0, 1).contiguous().cuda()
    router = _router(edl={"window_decay": 0.5}, variance={"coeff": 0.1, "auto_calibrate": True})
    with torch.no_grad():
        router.weight.copy_(make_weight(gen))
    router.cuda()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device="cuda"))

    def step():
        keys = broadcast_labels_over_tp(
            loader_batch,
            tp_rank=0,
            src_rank=0,
            group=parallel_state.get_tensor_model_parallel_group(),
            micro_batch_size=batch["ids_BS"].shape[0],
            seq_length=batch["ids_BS"].shape[1],
        )
        labels = router_labels(
            keys["domain_ids"], keys["edl_weights"], sequence_parallel=False, tp_rank=0, tp_size=1
        )
        push_labels(router, labels)
        probs, _ = router(hidden_sBH)
        (probs * 0).sum().backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    moe_logging.destroy_moe_metrics_tracker()
    return {"grad_finite": bool(torch.isfinite(router.weight.grad).all().item())}


@pytest.mark.gpu
def test_gpu_router_steps_run_under_sync_debug_mode_error():
    # The first EDL forward on CUDA compiles its kernels (--moe-edl-fused default): minutes.
    (out,) = run_distributed(_gpu_sync_debug_job, 1, backend="nccl", timeout_s=600)
    assert out["grad_finite"]
