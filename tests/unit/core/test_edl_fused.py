"""The fused EDL path (``--moe-edl-fused``): compiled vs eager values, gradients, kernel count.

Compiling takes tens of seconds on CPU, so the compiled tests share one compiled path (module
fixture) at one (E, D); token counts vary, which must not recompile (``dynamic=True``). fp64
exactness tests stay on the eager path (tests/unit/core/test_edl.py,
tests/unit/core/test_edl_fast_paths.py).
"""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from megatron_edl.benchmarks.kernels import count_kernels, edl_chain
from megatron_edl.config import EDLConfig, EDLFused, add_edl_args
from megatron_edl.core import edl_fused

CPU = torch.device("cpu")
EXPERTS, DOMAINS = 16, 5
MAX_KERNELS = 15  # the target per router call, forward and backward


@pytest.fixture(scope="module")
def compiled():
    # Inductor's CPU kernels show up in the profiler only when compiled with this on.
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        path = edl_fused.select_path(True, CPU)
        assert path.compiled, "torch.compile failed: the fused path fell back to eager"
        yield path


def _inputs(tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits_TE = (2 * torch.randn(tokens, EXPERTS, generator=gen)).requires_grad_(True)
    domain_ids_T = torch.randint(-1, DOMAINS, (tokens,), generator=gen)
    weights_T = torch.rand(tokens, generator=gen)
    return logits_TE, domain_ids_T, weights_T


def _run(path: edl_fused.EDLPath, tokens: int, seed: int):
    logits_TE, domain_ids_T, weights_T = _inputs(tokens, seed)
    sums_DE, counts_D = path.statistics(
        logits_TE=logits_TE, domain_ids_T=domain_ids_T, weights_T=weights_T, num_domains=DOMAINS
    )
    out = path.step(sums_DE=sums_DE, counts_D=counts_D, form="log", eps=1e-6)
    out.loss.backward()
    return sums_DE.detach(), counts_D, out, logits_TE.grad


def test_fused_matches_eager_values_and_gradients_for_any_token_count(compiled):
    graphs_before = None
    for tokens, seed in ((300, 0), (517, 1)):
        sums_f, counts_f, out_f, grad_f = _run(compiled, tokens, seed)
        sums_e, counts_e, out_e, grad_e = _run(edl_fused.EAGER, tokens, seed)
        torch.testing.assert_close(sums_f, sums_e, rtol=1e-6, atol=1e-6 * sums_e.abs().max())
        torch.testing.assert_close(counts_f, counts_e, rtol=1e-6, atol=0)
        assert out_f.loss.item() == pytest.approx(out_e.loss.item(), rel=1e-6)
        assert out_f.mean_jsd.item() == pytest.approx(out_e.mean_jsd.item(), rel=1e-6)
        assert out_f.num_present.item() == out_e.num_present.item() == DOMAINS
        # I(E; D) = H(p̄) - Σ_j w_j H(p̄_j) is a difference of O(ln E) terms: absolute scale.
        assert out_f.mutual_information.item() == pytest.approx(
            out_e.mutual_information.item(), abs=1e-6 * torch.log(torch.tensor(EXPERTS)).item()
        )
        torch.testing.assert_close(grad_f, grad_e, rtol=1e-6, atol=1e-6 * grad_e.abs().max())
        assert grad_e.abs().max() > 0
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # A new token count reuses the graphs (dynamic T): no recompile.
        assert graphs_before is None or graphs == graphs_before
        graphs_before = graphs


def test_fused_kernel_count_per_router_call(compiled):
    counts = {}
    for name, path in (("fused", compiled), ("eager", edl_fused.EAGER)):
        chain = edl_chain(path, tokens=400, experts=EXPERTS, domains=DOMAINS, device=CPU)
        chain()  # warm (compiles nothing new: same E and D as the other test)
        counts[name] = count_kernels(chain, CPU)
    fused, eager = counts["fused"], counts["eager"]
    assert fused.total <= MAX_KERNELS, fused.top()
    # The counting rule sees the generated kernels, and the eager path's many small operations.
    assert sum(v for k, v in fused.by_name.items() if "cpp_fused" in k) >= 2, fused.top()
    assert eager.total >= 4 * MAX_KERNELS, eager.top()


def test_auto_and_off_are_eager_on_cpu():
    assert edl_fused.select_path(EDLFused.AUTO.compile, CPU) is edl_fused.EAGER
    assert edl_fused.select_path(EDLFused.OFF.compile, CPU) is edl_fused.EAGER
    assert EDLFused.ON.compile is True


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def call(**kw):
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(edl_fused, "_compiled", None)
    monkeypatch.setattr(edl_fused, "_compile_failed", False)
    monkeypatch.setattr(edl_fused, "_probed", set())
    with caplog.at_level(logging.WARNING, logger=edl_fused.__name__):
        assert edl_fused.select_path(True, CPU) is edl_fused.EAGER
        assert edl_fused.select_path(True, CPU) is edl_fused.EAGER
    warnings = [r for r in caplog.records if "torch.compile of the EDL math failed" in r.message]
    assert len(warnings) == 1
    assert "no C++ compiler" in warnings[0].getMessage()


def test_fused_flag_parses():  # invalid values: tests/unit/config/test_edl.py
    parser = add_edl_args(argparse.ArgumentParser())
    args = parser.parse_args(["--moe-edl-fused", "on"])
    assert EDLConfig.from_args(args).fused is EDLFused.ON
    assert EDLConfig.from_args(parser.parse_args([])).fused is EDLFused.AUTO


@pytest.mark.gpu
def test_fused_on_cuda_matches_eager_and_launches_few_kernels():
    cuda = torch.device("cuda")
    path = edl_fused.select_path(EDLFused.AUTO.compile, cuda)  # auto compiles on CUDA
    assert path.compiled
    results = {}
    for name, p in (("fused", path), ("eager", edl_fused.EAGER)):
        gen = torch.Generator().manual_seed(3)
        logits_TE = (2 * torch.randn(4096, 64, generator=gen)).to(cuda).requires_grad_(True)
        domain_ids_T = torch.randint(-1, 49, (4096,), generator=gen).to(cuda)
        weights_T = torch.rand(4096, generator=gen).to(cuda)
        sums_DE, counts_D = p.statistics(
            logits_TE=logits_TE, domain_ids_T=domain_ids_T, weights_T=weights_T, num_domains=49
        )
        out = p.step(sums_DE=sums_DE, counts_D=counts_D, form="log", eps=1e-6)
        out.loss.backward()
        results[name] = (out.loss.item(), logits_TE.grad.cpu())
    assert results["fused"][0] == pytest.approx(results["eager"][0], rel=1e-6)
    grad_e = results["eager"][1]
    torch.testing.assert_close(
        results["fused"][1], grad_e, rtol=1e-5, atol=1e-6 * grad_e.abs().max()
    )
    chain = edl_chain(path, tokens=4096, experts=64, domains=49, device=cuda)
    chain()
    launches = count_kernels(chain, cuda)
    assert launches.total <= MAX_KERNELS, launches.top()
