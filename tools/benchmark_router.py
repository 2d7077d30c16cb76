#!/usr/bin/env python
"""Router forward+backward with the EDL loss vs without, and vs Megatron's own aux loss.

Builds Megatron's ``TopKRouter`` and the ``AuxLossTopKRouter`` (same weights) on a one-process group
and times ``router(hidden)`` plus the backward of a fixed upstream gradient on ``probs``, the
variants alternated round by round in this process (megatron_edl.benchmarks.harness). Variants
(``--configs``): ``stock`` (no router loss), ``edl`` (EDL only), ``aux`` (Megatron's
``aux_loss`` load balancing: the reference kind of work) and ``aux+edl``; ``edl-eager`` and
``edl-fused`` force the eager or the compiled EDL math (``--moe-edl-fused``). Labels: packed
documents of 32-1024 tokens, 10% unlabelled, segment weights (random_router_labels).

Prints, per shape, the time per call of each variant and the per-round ratios ``edl / stock``
(target <= 1.02 at T=8192, H=1024), ``aux / stock`` and ``aux+edl / aux``, median [min, max];
with ``--sweep``, the EDL cost (edl - stock) against T, E, D and H around T=8192, H=1024, E=64,
D=3: it should grow like T*E (plus a D^2*E term of the loss) and not with H.

Usage:
    python tools/benchmark_router.py                       # T=8192 H=1024 E=64,256 D=3,49, fp32
    python tools/benchmark_router.py --device cuda         # the same in bf16 on a GPU
    python tools/benchmark_router.py --sweep --repeats 10  # EDL cost vs T, E, D, H
    python tools/benchmark_router.py --tokens 64 --hidden 16 --experts 8 --domains 3 --repeats 2
    python tools/benchmark_router.py --configs stock edl-eager edl-fused   # compiled vs eager
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from megatron_edl.benchmarks.harness import (
    CLOCKS,
    Stats,
    Table,
    add_timing_args,
    alternate,
    describe_machine,
    ratios,
    set_threads,
)
from megatron_edl.benchmarks.moe_modules import (
    DEFAULT_VARIANTS,
    RATIOS,
    VARIANTS,
    ModuleShape,
    build_router,
    init_megatron,
    random_router_labels,
    transformer_config,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def router_cases(shape: ModuleShape, configs: list[str], device: torch.device, dtype):
    """Name -> callable running one forward+backward of that variant's router on one input."""
    gen = torch.Generator().manual_seed(1)
    seq = shape.tokens // shape.batch
    hidden_sBH = torch.randn(seq, shape.batch, shape.hidden, generator=gen).to(device, dtype)
    hidden_sBH.requires_grad_(True)
    grad_TE = torch.randn(shape.tokens, shape.experts, generator=gen).to(device)
    labels = random_router_labels(shape)
    labels = type(labels)(labels.domain_ids_T.to(device), labels.weights_T.to(device))
    weight = None
    cases = {}
    for name in configs:
        variant = VARIANTS[name]
        config = transformer_config(shape, load_balancing=variant.load_balancing, dtype=dtype)
        router = build_router(config, variant.edl_config(), device, num_domains=shape.domains)
        if weight is None:
            weight = router.weight.detach().clone()
        with torch.no_grad():
            router.weight.copy_(weight)
        cases[name] = _one_call(router, hidden_sBH, grad_TE, labels, variant.edl is not None)
    return cases


def _one_call(router, hidden_sBH, grad_TE, labels, edl: bool):
    def call() -> None:
        if edl:
            router.push_labels(labels)
        hidden_sBH.grad = None
        router.weight.grad = None
        probs_TE, _ = router(hidden_sBH)
        probs_TE.backward(grad_TE.to(probs_TE.dtype))

    return call


def measure(shape, configs, device, dtype, args):
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    cases = router_cases(shape, configs, device, dtype)
    return alternate(
        cases, repeats=args.repeats, warmup=args.warmup, sync=sync, clock=CLOCKS[args.clock]
    )


def main_table(args, device, dtype) -> None:
    configs = args.configs
    pairs = [(a, b) for a, b in RATIOS if a in configs and b in configs]
    times = Table(
        "Router forward+backward, ms per call, median [min, max]",
        ["T", "H", "E", "D", *configs],
    )
    ratio_table = Table(
        "Router ratios, per-round median [min, max] (target edl / stock <= 1.02)",
        ["T", "H", "E", "D", *(f"{a} / {b}" for a, b in pairs), "EDL cost (ms)"],
    )
    for experts in args.experts:
        for domains in args.domains:
            shape = ModuleShape(
                tokens=args.tokens, hidden=args.hidden, experts=experts, domains=domains,
                topk=min(args.topk, experts), batch=args.batch,
            )  # fmt: skip
            samples = measure(shape, configs, device, dtype, args)
            key = (shape.tokens, shape.hidden, experts, domains)
            times.add(*key, *(Stats.of(samples[c]).format(1e3, 2) for c in configs))
            cells = [Stats.of(ratios(samples[a], samples[b])).format() for a, b in pairs]
            cost = _edl_cost(samples)
            ratio_table.add(*key, *cells, "-" if cost is None else f"{cost * 1e3:.2f}")
            print(f"done {key}", flush=True)
    times.print()
    ratio_table.print()


def _edl_cost(samples: dict[str, list[float]]) -> float | None:
    """Median per-round difference edl - stock (seconds), if both ran (edl: or edl-eager)."""
    edl = next((samples[n] for n in ("edl", "edl-eager") if n in samples), None)
    if edl is None or "stock" not in samples:
        return None
    return statistics.median(a - b for a, b in zip(edl, samples["stock"], strict=True))


def sweep_points(args) -> list[ModuleShape]:
    """One parameter at a time around T=tokens, H=hidden, E=experts[0], D=domains[0]."""
    base = {
        "tokens": args.tokens, "hidden": args.hidden, "experts": args.experts[0],
        "domains": args.domains[0], "topk": min(args.topk, args.experts[0]), "batch": args.batch,
    }  # fmt: skip
    t, h, e = args.tokens, args.hidden, args.experts[0]
    axes = {
        "tokens": [t // 4, t // 2, t, 2 * t],
        "experts": sorted({max(args.topk, e // 2), e, 2 * e, 4 * e}),
        "domains": sorted({args.domains[0], 12, 49}),
        "hidden": [h // 4, h, 2 * h],
    }
    points = []
    for axis, values in axes.items():
        for value in values:
            shape = ModuleShape(**{**base, axis: value})
            if shape not in points:
                points.append(shape)
    return points


def sweep_table(args, device, dtype) -> None:
    table = Table(
        "EDL cost (edl - stock, median of per-round differences) vs shape",
        ["T", "H", "E", "D", "stock (ms)", "EDL cost (ms)", "ns per T*E", "edl / stock"],
    )
    for shape in sweep_points(args):
        samples = measure(shape, ["stock", "edl"], device, dtype, args)
        cost = _edl_cost(samples)
        table.add(
            shape.tokens, shape.hidden, shape.experts, shape.domains,
            f"{statistics.median(samples['stock']) * 1e3:.2f}",
            f"{cost * 1e3:.2f}",
            f"{cost * 1e9 / (shape.tokens * shape.experts):.2f}",
            Stats.of(ratios(samples["edl"], samples["stock"])).format(),
        )  # fmt: skip
        print(f"done {shape}", flush=True)
    table.print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: fp32 on CPU, bf16 on a GPU")
    parser.add_argument("--tokens", type=int, default=8192, help="T per micro-batch")
    parser.add_argument("--hidden", type=int, default=1024, help="H")
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 256], help="E values")
    parser.add_argument("--domains", type=int, nargs="+", default=[3, 49], help="D values")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="samples per micro-batch")
    parser.add_argument(
        "--configs", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
        help=f"variants to compare (default: {' '.join(DEFAULT_VARIANTS)})",
    )  # fmt: skip
    add_timing_args(parser, repeats=20, warmup=3)
    parser.add_argument("--sweep", action="store_true", help="EDL cost vs T, E, D, H instead")
    args = parser.parse_args(argv)
    set_threads(args)
    device = init_megatron(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    print(describe_machine(args.device))
    print(
        f"dtype {dtype}, top-k {args.topk}, {args.repeats} rounds after {args.warmup} warm-up, "
        f"{args.clock} clock"
    )
    if args.clock == "cpu" and device.type == "cuda":
        parser.error("--clock cpu measures the host, not the GPU: use --clock wall")
    if args.sweep:
        sweep_table(args, device, dtype)
    else:
        main_table(args, device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
