#!/usr/bin/env python
"""Cost of the routing telemetry: a router's forward+backward with and without recording, and
the cost of one dump.

Builds Megatron's router as ``AuxLossTopKRouter`` with the EDL loss off (stock routing), once
without telemetry and once recording training statistics (telemetry phase ``train``), with the
same weights, on a one-process group; times ``router(hidden)`` plus a backward of a fixed
gradient on ``probs``, the two variants alternated round by round. Also times
``routing_sums`` alone (the whole per-micro-batch work of the telemetry) and one
``dump_routing_stats`` (reduction + writing the ``.npz``/``.json``), which happens once per
``--moe-edl-stats-interval`` iterations. Prints medians [min, max] in ms and the per-round
ratio ``telemetry / stock``.

Usage:
    python tools/benchmark_telemetry.py                                # T=8192 H=1024 E=64
    python tools/benchmark_telemetry.py --domains 3 49 --experts 64 256 --repeats 20
    python tools/benchmark_telemetry.py --device cuda                  # on a GPU (bf16)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch

from megatron_edl.benchmarks.harness import add_timing_args, set_threads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _init(device: torch.device) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if device.type == "cpu":
        from megatron_edl import cpu

        cpu.apply()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(60))
    parallel_state.initialize_model_parallel()


def _router(hidden: int, experts: int, domains: int, stats: bool, dtype, device):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_edl.config import EDLConfig, EDLRunConfig, LabelsConfig, TelemetryConfig
    from megatron_edl.integration.router import AuxLossTopKRouter

    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=8, num_moe_experts=experts,
        moe_router_topk=2, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        use_cpu_initialization=True, params_dtype=dtype, add_bias_linear=False,
        bf16=dtype == torch.bfloat16,
    )  # fmt: skip
    router = AuxLossTopKRouter(
        config=config,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        run_config=EDLRunConfig(
            labels=LabelsConfig(num_domains=domains),
            edl=EDLConfig(coeff=0.0),
            telemetry=TelemetryConfig(phase="train" if stats else None),
        ),
    )
    router.set_layer_number(1)
    return router.to(device).train()


def run_shape(args, tokens: int, hidden: int, experts: int, domains: int) -> dict[str, list]:
    from megatron_edl.core.routing_sums import routing_sums
    from megatron_edl.integration.labels import DomainLabels
    from megatron_edl.integration.telemetry import dump_routing_stats

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    batch = 2
    hidden_sBH = torch.randn(tokens // batch, batch, hidden, generator=gen).to(device, dtype)
    hidden_sBH.requires_grad_(True)
    grad_TE = torch.randn(tokens, experts, generator=gen).to(device)
    ids_T = torch.randint(-1, domains, (tokens,), generator=gen).to(device)
    labels = DomainLabels(domain_ids_T=ids_T, weights_T=torch.ones(tokens, device=device))
    stock = _router(hidden, experts, domains, False, dtype, device)
    stats = _router(hidden, experts, domains, True, dtype, device)
    with torch.no_grad():
        stats.weight.copy_(stock.weight)

    def call(router) -> None:
        if router.routing_stats is not None:
            router.push_labels(labels)
        probs, _ = router(hidden_sBH)
        probs.float().backward(grad_TE)

    logits_TE = torch.randn(tokens, experts, generator=gen).to(device, dtype)
    map_TE = torch.zeros(tokens, experts, dtype=torch.bool, device=device)
    map_TE[:, :2] = True
    times: dict[str, list] = {"stock": [], "telemetry": [], "ratio": [], "sums": [], "dump": []}
    for _ in range(args.warmup):
        call(stock), call(stats)
    for i in range(args.repeats):
        pair = [(stock, "stock"), (stats, "telemetry")]
        for router, name in pair if i % 2 == 0 else pair[::-1]:
            times[name].append(_timed(lambda r=router: call(r), device))
        times["ratio"].append(times["telemetry"][-1] / times["stock"][-1])
        times["sums"].append(
            _timed(
                lambda: routing_sums(
                    logits_TE=logits_TE, routing_map_TE=map_TE, domain_ids_T=ids_T,
                    num_domains=domains,
                ),
                device,
            )
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        for step in range(min(args.repeats, 5)):
            times["dump"].append(
                _timed(
                    lambda s=step: dump_routing_stats(
                        [stats], directory=out, step=s + 1, num_iterations=1, source="train",
                        domains=[f"d{d}" for d in range(domains)],
                    ),
                    device,
                )
            )  # fmt: skip
    return times


def _fmt(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):.3f}{unit} [{min(values):.3f}, {max(values):.3f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024])
    parser.add_argument("--experts", type=int, nargs="+", default=[64])
    parser.add_argument("--domains", type=int, nargs="+", default=[3, 49])
    add_timing_args(parser, repeats=20, warmup=3, clock=False)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    set_threads(args)
    _init(torch.device(args.device))
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("T H E D | stock fwd+bwd ms | with telemetry ms | ratio | routing_sums ms | dump ms")
    for tokens in args.tokens:
        for hidden in args.hidden:
            for experts in args.experts:
                for domains in args.domains:
                    t = run_shape(args, tokens, hidden, experts, domains)
                    print(
                        f"{tokens} {hidden} {experts} {domains} | {_fmt(t['stock'])} | "
                        f"{_fmt(t['telemetry'])} | {_fmt(t['ratio'])} | {_fmt(t['sums'])} | "
                        f"{_fmt(t['dump'])}",
                        flush=True,
                    )


if __name__ == "__main__":
    sys.exit(main())
