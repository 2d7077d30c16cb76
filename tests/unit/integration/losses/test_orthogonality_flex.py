"""The orthogonality loss with Megatron's flex token dispatcher (DeepEP backend).

Its losses and gradients under EP=2 and TP=2 with sequence parallelism are checked with the other
dispatchers in ``tests/unit/integration/losses/test_orthogonality.py`` (layouts ``ep2-flex`` and
``tp2sp-flex``: equal to one process's first-principles result, layer output bit-identical to the
stock ``MoELayer``'s), where DeepEP's fused dispatch and combine are emulated with gloo collectives
(``tests/helpers/deepep_emulation.py``): DeepEP needs NVIDIA GPUs. This file checks that the
emulation cannot be silently wrong:

- on hand-built routing it returns what DeepEP's semantics give: the received tokens and their
  order, the columns of other ranks set to -1 (probabilities 0), the per-expert counts, the sum
  back at the source, and the backward of each operation (the other one applied to the
  gradients);
- Megatron's stock flex layer on the emulation gives the alltoall layer's output and gradients
  (router, experts, input) for the same weights and tokens, under EP=2 and TP=2 with sequence
  parallelism.

Also: the layer refuses the hybridep and ncclep backends by name. The tests marked ``gpu`` run on
two GPUs with NCCL (skipped without them): the alltoall dispatcher against the first-principles
reference, and the flex dispatcher with real DeepEP (skipped without ``deep_ep``) against the
alltoall dispatcher, in bf16 (DeepEP combines bf16 only).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from tests.helpers.distributed import run_distributed

TIMEOUT_S = 120
RTOL = 1e-5

# ---------------------------------------------------------------------------------------------
# The emulation on hand-built routing (2 ranks, 4 experts: rank 0 hosts 0 and 1, rank 1 hosts
# 2 and 3). Token t of rank r has the value v = 10 r + t + 1 in every hidden entry.
# ---------------------------------------------------------------------------------------------

INDICES = {0: [[0, 2], [1, -1], [3, 2]], 1: [[2, 3], [0, 1], [1, 3]]}
PROBS = {0: [[0.6, 0.4], [0.9, 0.0], [0.7, 0.3]], 1: [[0.5, 0.5], [0.8, 0.2], [0.1, 0.9]]}
# What each rank receives (source rank order, then source token order).
EXPECTED_RECV = {
    0: {
        "values": [1.0, 2.0, 12.0, 13.0],  # rank 0 tokens 0 and 1, rank 1 tokens 1 and 2
        "indices": [[0, -1], [1, -1], [0, 1], [1, -1]],
        "probs": [[0.6, 0.0], [0.9, 0.0], [0.8, 0.2], [0.1, 0.0]],
        "tokens_per_expert": [2, 3],
        "source_token": [0, 1, 1, 2],  # of the received rows
    },
    1: {
        "values": [1.0, 3.0, 11.0, 13.0],  # rank 0 tokens 0 and 2, rank 1 tokens 0 and 2
        "indices": [[-1, 0], [1, 0], [0, 1], [-1, 1]],
        "probs": [[0.0, 0.4], [0.7, 0.3], [0.5, 0.5], [0.0, 0.9]],
        "tokens_per_expert": [3, 3],
        "source_token": [0, 2, 0, 2],
    },
}
# Rank r sends back (r + 1) * its received rows: the sum at the source is (sum over the ranks
# that received the token of (r + 1)) * the token.
EXPECTED_COMBINE_FACTOR = {0: [3.0, 1.0, 2.0], 1: [2.0, 1.0, 3.0]}
# d/d(probs) of sum(10 (r + 1) recv_probs) over ranks r: 10 (host rank + 1), 0 for -1 columns.
EXPECTED_PROBS_GRAD = {
    0: [[10.0, 20.0], [10.0, 0.0], [20.0, 20.0]],
    1: [[20.0, 20.0], [10.0, 10.0], [10.0, 20.0]],
}


def _emulation_worker(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist

    from megatron_edl import cpu
    from tests.helpers import deepep_emulation as fake

    cpu.apply()
    group = dist.group.WORLD
    values_T = torch.tensor([10.0 * rank + t + 1 for t in range(3)])
    x_TH = (values_T[:, None] * torch.tensor([[1.0, -1.0]])).requires_grad_()
    probs_TC = torch.tensor(PROBS[rank], requires_grad=True)
    indices_TC = torch.tensor(INDICES[rank])
    recv_x, recv_indices, recv_probs, tokens_per_expert, handle = fake.fused_dispatch(
        x_TH, indices_TC, probs_TC, 4, group
    )
    ((recv_x * (rank + 1)).sum() + (recv_probs * 10.0 * (rank + 1)).sum()).backward()
    out = {
        "recv_values": recv_x.detach()[:, 0].tolist(),
        "recv_x": recv_x.detach().clone(),
        "indices": recv_indices.tolist(),
        "probs": recv_probs.detach().clone(),
        "tokens_per_expert": tokens_per_expert.tolist(),
        "dispatch_x_grad": x_TH.grad.clone(),
        "dispatch_probs_grad": probs_TC.grad.clone(),
    }
    # Combine: rank r returns (r + 1) * the rows it received.
    rows_VH = (recv_x.detach() * (rank + 1)).requires_grad_()
    combined_TH, none = fake.fused_combine(rows_VH, group, handle)
    weights_T = torch.arange(1.0, 4.0)  # the gradient of source token t is t + 1
    (combined_TH * weights_T[:, None]).sum().backward()
    out.update(
        combined=combined_TH.detach().clone(),
        combine_returns_none=none is None,
        combine_rows_grad=rows_VH.grad[:, 0].tolist(),
    )
    return out


@pytest.fixture(scope="module")
def emulation():
    return run_distributed(_emulation_worker, 2, timeout_s=TIMEOUT_S)


def test_emulated_dispatch_follows_deepep(emulation):
    for rank, got in enumerate(emulation):
        want = EXPECTED_RECV[rank]
        assert got["recv_values"] == want["values"]
        torch.testing.assert_close(
            got["recv_x"], torch.tensor(want["values"])[:, None] * torch.tensor([[1.0, -1.0]])
        )
        assert got["indices"] == want["indices"]
        torch.testing.assert_close(got["probs"], torch.tensor(want["probs"]))
        assert got["tokens_per_expert"] == want["tokens_per_expert"]


def test_emulated_combine_sums_at_the_source(emulation):
    for rank, got in enumerate(emulation):
        values_T = torch.tensor([10.0 * rank + t + 1 for t in range(3)])
        factor_T = torch.tensor(EXPECTED_COMBINE_FACTOR[rank])
        want = (factor_T * values_T)[:, None] * torch.tensor([[1.0, -1.0]])
        torch.testing.assert_close(got["combined"], want)
        assert got["combine_returns_none"]


def test_emulated_backwards_are_combine_and_dispatch_of_the_gradients(emulation):
    for rank, got in enumerate(emulation):
        # Dispatch backward: each source token gets the sum of its received rows' gradients.
        factor_T = torch.tensor(EXPECTED_COMBINE_FACTOR[rank])
        torch.testing.assert_close(got["dispatch_x_grad"], factor_T[:, None].expand(3, 2))
        torch.testing.assert_close(
            got["dispatch_probs_grad"], torch.tensor(EXPECTED_PROBS_GRAD[rank])
        )
        # Combine backward: each received row gets its source token's gradient (t + 1).
        source_T = EXPECTED_RECV[rank]["source_token"]
        assert got["combine_rows_grad"] == [t + 1.0 for t in source_T]


# ---------------------------------------------------------------------------------------------
# Megatron's flex layer on the emulation == the alltoall layer
# ---------------------------------------------------------------------------------------------

LAYOUTS = {"ep2": (1, 2), "tp2sp": (2, 1)}


def _stock_step(tp: int, ep: int, dispatcher: str) -> dict[str, Any]:
    """Output and reduced gradients of the stock MoE layer for loss = sum(output * cos(input))."""
    from tests.unit.integration.losses import test_orthogonality as harness

    harness.setup_layout(tp, ep)
    hidden_sBH = harness.local_hidden(tp).requires_grad_()
    layer, first_expert, rows = harness.build(tp, ep, dispatcher, "tokens", False, stock=True)
    output, _ = layer(hidden_sBH)
    (output * torch.cos(hidden_sBH.detach())).sum().backward()
    return {
        "output": output.detach().clone(),
        "input_grad": hidden_sBH.grad.clone(),
        **harness.reduced_grads(layer, first_expert, rows),
    }


def _layers_worker(rank: int, world_size: int) -> dict[tuple[str, str], Any]:
    from megatron_edl import cpu
    from tests.helpers import deepep_emulation

    cpu.apply()
    deepep_emulation.install()
    return {
        (name, dispatcher): _stock_step(tp, ep, dispatcher)
        for name, (tp, ep) in LAYOUTS.items()
        for dispatcher in ("alltoall", "flex")
    }


@pytest.fixture(scope="module")
def layers():
    return run_distributed(_layers_worker, 2, timeout_s=TIMEOUT_S)


def _assert_close(got, want, what: str, rtol: float = RTOL) -> None:
    atol = rtol * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_emulated_flex_layer_equals_the_alltoall_layer(name, layers):
    for rank, result in enumerate(layers):
        flex, alltoall = result[(name, "flex")], result[(name, "alltoall")]
        assert alltoall["output"].abs().max() > 1e-3
        for key in ("output", "input_grad", "router_EH"):
            _assert_close(flex[key], alltoall[key], f"rank {rank} {name}: {key}")
        for got, want in zip(flex["experts"], alltoall["experts"], strict=True):
            assert got[:2] == want[:2]
            _assert_close(got[2], want[2], f"rank {rank} {name}: expert {got[0]} fc1 grad")
            _assert_close(got[3], want[3], f"rank {rank} {name}: expert {got[0]} fc2 grad")


# ---------------------------------------------------------------------------------------------
# Backends without a readable layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["hybridep", "ncclep"])
def test_layer_refuses_other_flex_backends_by_name(backend):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_edl.config import EDLRunConfig, OrthogonalityConfig
    from megatron_edl.integration.losses.orthogonality import OrthogonalityMoELayer

    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        num_moe_experts=4,
        moe_ffn_hidden_size=8,
        moe_router_topk=2,
        moe_token_dispatcher_type="flex",
        moe_flex_dispatcher_backend=backend,
        use_cpu_initialization=True,
    )
    with pytest.raises(ValueError, match=f"--moe-flex-dispatcher-backend {backend}"):
        OrthogonalityMoELayer(
            config=config,
            run_config=EDLRunConfig(orthogonality=OrthogonalityConfig(coeff=0.1)),
        )


# ---------------------------------------------------------------------------------------------
# GPU: NCCL on two GPUs; the flex one with real DeepEP
# ---------------------------------------------------------------------------------------------

HAVE_DEEP_EP = importlib.util.find_spec("deep_ep") is not None
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (EP=2 over NCCL)"
)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _gpu_worker(rank: int, world_size: int, dispatchers: tuple[str, ...], dtype_name: str):
    """EP=2 runs of ``dispatchers`` on GPU ``rank`` (harness of
    tests/unit/integration/losses/test_orthogonality.py)."""
    from tests.unit.integration.losses import test_orthogonality as harness

    dtype = getattr(torch, dtype_name)
    out = {
        dispatcher: harness.run_layout(
            1, 2, dispatcher, "tokens", False, device="cuda", dtype=dtype
        )
        for dispatcher in dispatchers
    }
    harness.setup_layout(1, 1)
    layer, _, _ = harness.build(1, 1, "allgather", "tokens", False, device="cuda")
    out["first-principles"] = harness.first_principles(layer, "tokens", False)
    return _to_cpu(out)


def _assert_matches(got: dict[str, Any], want: dict[str, Any], what: str, rtol: float) -> None:
    """Recorded losses and the reduced router gradient of one rank."""
    for metric in ("variance_loss", "ortho_loss"):
        assert got["metrics"][metric] == pytest.approx(want["metrics"][metric], rel=rtol), (
            f"{what}: {metric}"
        )
    _assert_close(got["router_EH"].float(), want["router_EH"].float(), f"{what}: router", rtol)


def _expert_grads(per_rank: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's full fc1 and fc2 gradients, from the shards of all ranks."""
    from tests.unit.integration.losses.test_orthogonality import full_expert_grads

    return full_expert_grads([e for result in per_rank for e in result["experts"]])


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_alltoall_matches_first_principles():
    """fp32 on two GPUs: losses and gradients equal one process's (as on CPU)."""
    results = run_distributed(
        _gpu_worker, 2, ("alltoall",), "float32", timeout_s=300, backend="nccl"
    )
    rtol = 1e-4  # GPU reductions run in another order than the reference's
    want = results[0]["first-principles"]
    for result in results:
        assert result["alltoall"]["output_equal"]
        _assert_matches(result["alltoall"], want, "alltoall", rtol)
    got = _expert_grads([result["alltoall"] for result in results])
    for got_grad, want_grad in zip(got, _expert_grads([want]), strict=True):
        _assert_close(got_grad, want_grad, "alltoall: expert grads", rtol)


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.skipif(not HAVE_DEEP_EP, reason="deep_ep (DeepEP) is not installed")
def test_gpu_flex_deepep_matches_alltoall():
    """bf16 on two GPUs with real DeepEP: the layer output is bit-identical to the stock flex
    layer's, and the losses and gradients are the alltoall dispatcher's (bf16 tolerance)."""
    results = run_distributed(
        _gpu_worker, 2, ("flex", "alltoall"), "bfloat16", timeout_s=300, backend="nccl"
    )
    rtol = 3e-2
    for result in results:
        assert result["flex"]["output_equal"]
        _assert_matches(result["flex"], result["alltoall"], "flex vs alltoall", rtol)
    got = _expert_grads([result["flex"] for result in results])
    want = _expert_grads([result["alltoall"] for result in results])
    for got_grad, want_grad in zip(got, want, strict=True):
        _assert_close(got_grad, want_grad, "flex vs alltoall: expert grads", rtol)
