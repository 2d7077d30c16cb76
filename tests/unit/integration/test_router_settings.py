"""EDL with the router settings of current MoE recipes, and the settings refused at start.

Supported, each against a float64 reference of the pure math
(tests/unit/integration/test_router.py's):

- sigmoid score function (DeepSeek-V3 / Qwen3-style routers): p_t is the router's normalised
  sigmoid scores by default (``--moe-edl-scores router``), softmax on request;
- expert bias (aux-loss-free balancing): the bias picks the top-k only, EDL's p_t ignores it;
- Megatron's aux loss with a sigmoid router: its normalised scores are reused, same gradient;
- ``--moe-router-fusion``: with stand-ins for Transformer Engine's fused kernels (TE is absent
  on CPU) the loss and gradient equal the unfused router's;
- sigmoid + expert bias end to end through Megatron's training loop (MTP layers are covered in
  tests/e2e/test_edl_pretrain.py).

Refused at start with the flag named, one line, exit status 2: CUDA graphs capturing the router
(with labels, or with the variance/orthogonality losses alone), ``--fim-data`` with labels, the
orthogonality loss with ``--overlap-moe-expert-parallel-comm``, and any launcher refusal (no
traceback).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from typing import Any

import pytest
import torch

from megatron_edl.config import EDLConfigError, check_supported
from megatron_edl.core.edl import routing_probs
from megatron_edl.core.routing_sums import routing_sums
from tests.helpers.distributed import run_distributed
from tests.helpers.megatron_runs import TINY_MOE_GPT, run_pretrain
from tests.unit.integration.test_router import (
    COEFF,
    NUM_EXPERTS,
    forward_backward,
    make_batch,
    make_router,
    make_weight,
    one_process_job,
    reference_loss_and_grad,
    take_edl_loss,
)

SIGMOID_BIAS = {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True}
AUX = {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.01}

# ---------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------


def test_routing_probs_normalise_the_router_scores_by_hand():
    logits_TE = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    # sigmoid: [1/2, 3/4] -> divided by their sum 5/4: [2/5, 3/5]
    sigmoid = routing_probs(logits_TE=logits_TE, score_function="sigmoid")
    torch.testing.assert_close(sigmoid, torch.tensor([[0.4, 0.6]], dtype=torch.float64))
    softmax = routing_probs(logits_TE=logits_TE)  # e^0 : e^ln3 = 1 : 3
    torch.testing.assert_close(softmax, torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    softplus = torch.log1p(torch.exp(logits_TE)).sqrt()
    torch.testing.assert_close(
        routing_probs(logits_TE=logits_TE, score_function="sqrtsoftplus"),
        softplus / softplus.sum(),
    )
    with pytest.raises(ValueError, match="'tanh'"):
        routing_probs(logits_TE=logits_TE, score_function="tanh")


def test_telemetry_sums_use_the_score_function():
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    ids_T = torch.tensor([0, 1, -1] * 4)
    routing_map_TE = torch.zeros(12, 4, dtype=torch.bool)
    routing_map_TE[:, :2] = True
    sums_XF = routing_sums(
        logits_TE=logits_TE,
        routing_map_TE=routing_map_TE,
        domain_ids_T=ids_T,
        num_domains=2,
        score_function="sigmoid",
    )
    p_TE = routing_probs(logits_TE=logits_TE, score_function="sigmoid")
    entropy_T = -(p_TE * p_TE.log()).sum(-1)
    for domain in (0, 1):
        rows = ids_T == domain
        torch.testing.assert_close(sums_XF[domain, 4:8], p_TE[rows].sum(0))
        torch.testing.assert_close(sums_XF[domain, 8], entropy_T[rows].sum())
    softmax_XF = routing_sums(
        logits_TE=logits_TE, routing_map_TE=routing_map_TE, domain_ids_T=ids_T, num_domains=2
    )
    assert not torch.allclose(softmax_XF[0, 4:8], sums_XF[0, 4:8])


# ---------------------------------------------------------------------------------------------
# The router (one gloo process, Megatron's real TopKRouter underneath)
# ---------------------------------------------------------------------------------------------


def _te_fusion_stand_ins():
    """Patches that make ``moe_router_fusion`` run with the unfused math (TE is absent)."""
    from unittest import mock

    from megatron.core.transformer.moe import moe_utils

    def topk(**kwargs):
        return moe_utils.topk_routing_with_score_function(**kwargs, fused=False)

    def aux_scores(logits, topk, score_function):
        return moe_utils.compute_routing_scores_for_aux_loss(logits, topk, score_function)

    def aux_loss(probs, tokens_per_expert, total_num_tokens, topk, num_experts, coeff):
        return moe_utils.switch_load_balancing_loss_func(
            probs, tokens_per_expert, total_num_tokens, topk, num_experts, coeff
        )

    return [
        mock.patch.object(moe_utils, "HAVE_TE", True),
        mock.patch.object(moe_utils, "fused_topk_with_score_function", topk),
        mock.patch.object(moe_utils, "fused_compute_score_for_moe_aux_loss", aux_scores),
        mock.patch.object(moe_utils, "fused_moe_aux_loss", aux_loss),
    ]


CASES: dict[str, dict[str, Any]] = {
    "sigmoid-bias": {"config": SIGMOID_BIAS, "edl": {}},
    "sigmoid-bias-softmax": {"config": SIGMOID_BIAS, "edl": {"scores": "softmax"}},
    "softmax": {"config": {}, "edl": {}},
    "sigmoid-aux": {"config": {"moe_router_score_function": "sigmoid", **AUX}, "edl": {}},
    "sigmoid-aux-own": {
        "config": {"moe_router_score_function": "sigmoid", **AUX},
        "edl": {},
        "own_scores": True,
    },
    "sigmoid-bias-aux-unfused": {"config": {**SIGMOID_BIAS, **AUX}, "edl": {}},
    "sigmoid-bias-aux-fused": {
        "config": {**SIGMOID_BIAS, **AUX, "moe_router_fusion": True},
        "edl": {},
        "te_stand_ins": True,
    },
}


def _settings_job(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    import contextlib
    import types
    from unittest import mock

    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_edl.core import edl

    job, batch = one_process_job(seed)
    bias_E = torch.linspace(-2.0, 2.0, NUM_EXPERTS)  # strong enough to change the top-k
    out = {}
    for name, case in CASES.items():
        with contextlib.ExitStack() as stack:
            for patch in _te_fusion_stand_ins() if case.get("te_stand_ins") else []:
                stack.enter_context(patch)
            router = make_router(job, config_overrides=case["config"], **case["edl"])
            if case["config"].get("moe_router_load_balancing_type") == "aux_loss":
                router.routing_type = "aux_loss"
            if router.expert_bias is not None:
                router.expert_bias.copy_(bias_E)
            if case.get("own_scores"):
                router._apply_aux_loss = types.MethodType(TopKRouter._apply_aux_loss, router)
            own = stack.enter_context(
                mock.patch.object(edl, "routing_probs", wraps=edl.routing_probs)
            )
            _, routing_map = forward_backward(router, job, batch)
            out[name] = {
                "own_probs_calls": own.call_count,
                "loss": take_edl_loss(),
                "grad": router.weight.grad.clone(),
                "routing_map": routing_map.clone(),
                "score_function": router.edl_score_function,
            }
    return out


@pytest.fixture(scope="module")
def settings():
    gen = torch.Generator().manual_seed(11)
    job = {"weight_EH": make_weight(gen)}
    batch = make_batch(gen, dp=1)
    (out,) = run_distributed(_settings_job, 1, seed=11)
    refs = {
        score: reference_loss_and_grad(job["weight_EH"], [(batch, slice(None), False)], score)
        for score in ("softmax", "sigmoid")
    }
    return out, refs


def _assert_edl_matches(result: dict, ref: tuple[float, torch.Tensor]) -> None:
    loss, grad_EH = ref
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(result["grad"].double(), COEFF * grad_EH, rtol=1e-4, atol=1e-7)


def test_sigmoid_router_edl_uses_its_normalised_scores(settings):
    out, refs = settings
    assert out["sigmoid-bias"]["score_function"] == "sigmoid"
    _assert_edl_matches(out["sigmoid-bias"], refs["sigmoid"])
    # The references discriminate: the softmax of the same logits is another loss.
    assert abs(refs["sigmoid"][0] - refs["softmax"][0]) > 1e-3


def test_softmax_stays_an_explicit_option(settings):
    out, refs = settings
    assert out["sigmoid-bias-softmax"]["score_function"] == "softmax"
    _assert_edl_matches(out["sigmoid-bias-softmax"], refs["softmax"])
    _assert_edl_matches(out["softmax"], refs["softmax"])


def test_expert_bias_changes_the_top_k_but_not_edl(settings):
    out, _ = settings
    # Same logits, same EDL loss and gradient; the biased router picked other experts.
    assert not torch.equal(out["sigmoid-bias"]["routing_map"], out["sigmoid-aux"]["routing_map"])


def test_sigmoid_aux_loss_scores_are_reused_with_the_same_gradient(settings):
    out, refs = settings
    reuse, own = out["sigmoid-aux"], out["sigmoid-aux-own"]
    assert (reuse["own_probs_calls"], own["own_probs_calls"]) == (0, 1)
    assert reuse["loss"] == pytest.approx(refs["sigmoid"][0], rel=1e-5)
    assert own["loss"] == pytest.approx(refs["sigmoid"][0], rel=1e-5)
    torch.testing.assert_close(reuse["grad"], own["grad"], rtol=1e-5, atol=1e-7)


def test_router_fusion_gives_the_unfused_loss_and_gradient(settings):
    out, refs = settings
    fused, unfused = out["sigmoid-bias-aux-fused"], out["sigmoid-bias-aux-unfused"]
    assert fused["own_probs_calls"] == 1  # fused aux scores are not reused: EDL's own
    assert fused["loss"] == pytest.approx(refs["sigmoid"][0], rel=1e-5)
    torch.testing.assert_close(fused["grad"], unfused["grad"], rtol=1e-5, atol=1e-7)
    assert torch.equal(fused["routing_map"], unfused["routing_map"])


# ---------------------------------------------------------------------------------------------
# End to end and start-time refusals
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigmoid_expert_bias_aux_loss_free_training(tmp_path):
    flags = [
        *TINY_MOE_GPT, "--train-iters", "3",
        "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
        "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0",
        "--moe-edl-coeff", "0.5", "--moe-edl-mock-domains", "3",
        "--moe-edl-stats-interval", "3", "--moe-edl-stats-dir", str(tmp_path / "stats"),
    ]  # fmt: skip
    result = run_pretrain(2, [*flags, "--expert-model-parallel-size", "2"])
    assert result.returncode == 0, result.describe()
    assert sorted(result.iterations) == [1, 2, 3], result.describe()
    assert all(it["edl_loss"] > 0 and it["edl_jsd"] >= 0 for it in result.iterations.values())
    assert "load_balancing_loss" not in result.iterations[1]
    assert list((tmp_path / "stats").glob("*.json")), "telemetry wrote no dump"


def _args(**values) -> argparse.Namespace:
    defaults = {"cuda_graph_impl": "none", "cuda_graph_modules": [], "fim_data": False}
    return argparse.Namespace(**{**defaults, **values})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"cuda_graph_impl": "local"}, "--cuda-graph-impl local capturing the whole layer"),
        (
            {"cuda_graph_impl": "transformer_engine", "cuda_graph_modules": ["attn", "moe_router"]},
            "--cuda-graph-modules moe_router",
        ),
        ({"cuda_graph_impl": "full_iteration"}, "the whole iteration"),
        ({"fim_data": True}, "--fim-data"),
    ],
)
def test_unsupported_settings_are_refused_naming_the_flag(values, message):
    with pytest.raises(EDLConfigError, match=message) as info:
        check_supported(_args(**values), ["--moe-edl-coeff"])
    assert "--moe-edl-coeff" in str(info.value)


def test_cuda_graphs_outside_the_router_are_allowed():
    check_supported(_args(cuda_graph_impl="local", cuda_graph_modules=["attn"]), ["x"])
    check_supported(_args(), ["x"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--moe-edl-coeff", "-1"], "--moe-edl-coeff must be >= 0 and finite, got -1.0"),
        (["--moe-edl-coeff", "0.1", "--cuda-graph-impl", "local"], "--cuda-graph-impl local"),
        (["--config-yaml", "missing.yaml"], "missing.yaml"),
        (["--save", "ckpt"], "arguments.py:"),  # Megatron's bare assert, shown as one line
    ],
)
def test_launcher_refusal_is_one_line_and_exit_status_2(tmp_path, extra, message):
    cmd = [sys.executable, "-m", "megatron_edl.pretrain_gpt", "--cpu", *TINY_MOE_GPT, *extra]
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=_cpu_env()
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "extra, world_size, message",
    [
        (
            ["--moe-variance-loss-coeff", "0.1", "--cuda-graph-impl", "local"],
            1,
            "--moe-variance-loss-coeff 0.1 cannot be used with --cuda-graph-impl local capturing "
            "the whole layer",
        ),
        (
            # Megatron's own checks of the overlap: EP > 1 (2 ranks announced; nothing starts
            # before the refusal), alltoall, bf16.
            [
                "--moe-ortho-loss-coeff",
                "0.1",
                "--overlap-moe-expert-parallel-comm",
                "--expert-model-parallel-size",
                "2",
                "--moe-token-dispatcher-type",
                "alltoall",
                "--bf16",
            ],  # fmt: skip
            2,
            "--moe-ortho-loss-coeff 0.1 cannot be used with --overlap-moe-expert-parallel-comm",
        ),
    ],
    ids=["cuda-graphs", "ep-overlap"],
)
def test_specialization_refusals_are_one_line_before_the_model(
    tmp_path, extra, world_size, message
):
    """The variance/orthogonality losses without labels: CUDA graphs over the router and the EP
    overlap (orthogonality) are refused at start, exit status 2, no model built."""
    cmd = [sys.executable, "-m", "megatron_edl.pretrain_gpt", "--cpu", *TINY_MOE_GPT, *extra]
    env = {**_cpu_env(), "WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "number of parameters" not in proc.stdout + proc.stderr  # printed by get_model


def _cpu_env() -> dict[str, str]:
    import os

    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_forward_step_times_batch_and_forward_with_the_straggler_detector(monkeypatch):
    """As the stock forward_step: the batch fetch inside ``stimer(bdata=True)``, the model's
    forward inside ``stimer``; the detector is Megatron's singleton (the one it reports)."""
    import contextlib
    import types

    from megatron.core.utils import StragglerDetector

    from megatron_edl.integration import upstream_pretrain_gpt as gpt

    assert gpt.stimer is StragglerDetector()
    events: list[str] = []

    class Recorder:
        def __call__(self, bdata: bool = False):
            return self._region("batch" if bdata else "forward")

        def __enter__(self):
            events.append("enter forward")

        def __exit__(self, *exc):
            events.append("exit forward")

        @contextlib.contextmanager
        def _region(self, name):
            events.append(f"enter {name}")
            yield
            events.append(f"exit {name}")

    batch = dict.fromkeys(gpt.BATCH_KEYS)
    batch.update(tokens=torch.zeros(1, 4, dtype=torch.long))

    def get_batch(data_iterator, vp_stage=None):
        events.append("get_batch")
        return batch

    def model(*args, **kwargs):
        events.append("model")
        return torch.zeros(1)

    args = types.SimpleNamespace(seq_length=4, overlap_moe_expert_parallel_comm=False)
    timers = lambda *a, **k: types.SimpleNamespace(start=lambda: None, stop=lambda: None)  # noqa: E731
    monkeypatch.setattr(gpt, "stimer", Recorder())
    monkeypatch.setattr(gpt, "get_args", lambda: args)
    monkeypatch.setattr(gpt, "get_timers", lambda: timers)
    monkeypatch.setattr(gpt, "get_batch", get_batch)
    monkeypatch.setattr(gpt, "get_attr_wrapped_model", lambda m, name: None)
    gpt.forward_step(iter(()), model)
    assert events == [
        "enter batch", "get_batch", "exit batch", "enter forward", "model", "exit forward",
    ]  # fmt: skip
