#!/usr/bin/env python
"""A full MoE layer forward+backward with vs without EDL (router, dispatch, experts, combine).

Builds megatron-core's ``MoELayer`` from its own MLP spec (local ``SequentialMLP`` experts on
CPU; the Transformer Engine spec with grouped GEMM on a GPU when TE is installed) once per
variant, with the EDL router installed exactly as the launcher does, copies the weights of the
first into the others, and times forward plus the backward of a fixed upstream gradient, the
variants alternated round by round in this process. Prints the time per call and the per-round
ratios (target ``edl / stock`` <= 1.005).

Variants (``--configs``, from ``megatron_edl.benchmarks.moe_modules.VARIANTS``): ``stock``,
``edl``, ``aux`` (Megatron's aux-loss load balancing), ``aux+edl``. Router losses added later
(orthogonality, variance) become new entries there and are then selectable here. ``--null``
adds a second stock layer built the same way: its ratio to ``stock`` (ideally 1) shows what
difference the measurement can resolve, which matters for a target of 0.5%.

Usage:
    python tools/benchmark_moe_layer.py                            # T=2048 H=1024 F=512 E=64
    python tools/benchmark_moe_layer.py --configs stock edl aux aux+edl --experts 64 256
    python tools/benchmark_moe_layer.py --device cuda --tokens 16384 --hidden 4096 --ffn-hidden 2048
    python tools/benchmark_moe_layer.py --tokens 64 --hidden 16 --ffn-hidden 16 --experts 8 \\
        --topk 2 --repeats 2                                      # smoke test
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
    RATIOS,
    VARIANTS,
    ModuleShape,
    build_moe_layer,
    init_megatron,
    random_router_labels,
    transformer_config,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


NULL = "stock (copy)"


def moe_cases(shape: ModuleShape, configs: list[str], device: torch.device, dtype):
    """Name -> callable running one forward+backward of that variant's MoE layer.

    A name ``NULL`` is a second, separately built stock layer (the A/A check).
    """
    gen = torch.Generator().manual_seed(1)
    seq = shape.tokens // shape.batch
    hidden_sBH = torch.randn(seq, shape.batch, shape.hidden, generator=gen).to(device, dtype)
    hidden_sBH.requires_grad_(True)
    grad_sBH = torch.randn(seq, shape.batch, shape.hidden, generator=gen).to(device, dtype)
    labels = random_router_labels(shape)
    labels = type(labels)(labels.domain_ids_T.to(device), labels.weights_T.to(device))
    state = None
    cases = {}
    for name in configs:
        variant = VARIANTS["stock" if name == NULL else name]
        config = transformer_config(shape, load_balancing=variant.load_balancing, dtype=dtype)
        layer = build_moe_layer(config, variant.edl_config(), device, num_domains=shape.domains)
        # Same weights in every variant (the state dict also holds non-tensor extra states).
        if state is None:
            state = {k: p.detach().clone() for k, p in layer.named_parameters()}
        with torch.no_grad():
            for k, p in layer.named_parameters():
                p.copy_(state[k])
        cases[name] = _one_call(layer, hidden_sBH, grad_sBH, labels, variant.edl is not None)
    return cases


def _one_call(layer, hidden_sBH, grad_sBH, labels, edl: bool):
    def call() -> None:
        if edl:
            layer.router.push_labels(labels)
        hidden_sBH.grad = None
        layer.zero_grad(set_to_none=True)
        output_sBH, _ = layer(hidden_sBH)
        output_sBH.backward(grad_sBH)

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: fp32 on CPU, bf16 on a GPU")
    parser.add_argument("--tokens", type=int, default=2048, help="T per micro-batch")
    parser.add_argument("--hidden", type=int, default=1024, help="H")
    parser.add_argument("--ffn-hidden", type=int, default=512, help="expert FFN hidden size")
    parser.add_argument("--experts", type=int, nargs="+", default=[64], help="E values")
    parser.add_argument("--domains", type=int, nargs="+", default=[3, 49], help="D values")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="samples per micro-batch")
    parser.add_argument(
        "--configs", nargs="+", default=["stock", "edl"], choices=list(VARIANTS),
        help="variants to compare, the first is the baseline (default: stock edl)",
    )  # fmt: skip
    parser.add_argument(
        "--null", action="store_true",
        help=f"also time a second stock layer, '{NULL}': the A/A ratio shows the resolution",
    )  # fmt: skip
    add_timing_args(parser, repeats=10, warmup=2)
    args = parser.parse_args(argv)
    set_threads(args)
    device = init_megatron(args.device)
    if args.clock == "cpu" and device.type == "cuda":
        parser.error("--clock cpu measures the host, not the GPU: use --clock wall")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    print(describe_machine(args.device))
    print(
        f"dtype {dtype}, top-k {args.topk}, F {args.ffn_hidden}, {args.repeats} rounds after "
        f"{args.warmup} warm-up, {args.clock} clock"
    )
    configs = list(args.configs)
    pairs = [(a, b) for a, b in RATIOS if a in configs and b in configs]
    if not pairs:
        pairs = [(c, configs[0]) for c in configs[1:]]
    if args.null:
        if "stock" not in configs:
            parser.error("--null compares a second stock layer with stock: add stock to --configs")
        configs.append(NULL)
        pairs.append((NULL, "stock"))
    times = Table(
        "MoE layer forward+backward, ms per call, median [min, max]",
        ["T", "H", "F", "E", "D", *configs],
    )
    ratio_table = Table(
        "MoE layer ratios, per-round median [min, max] (target edl / stock <= 1.005)",
        ["T", "H", "F", "E", "D", *(f"{a} / {b}" for a, b in pairs), "EDL cost (ms)"],
    )
    for experts in args.experts:
        for domains in args.domains:
            shape = ModuleShape(
                tokens=args.tokens, hidden=args.hidden, experts=experts, domains=domains,
                topk=min(args.topk, experts), ffn_hidden=args.ffn_hidden, batch=args.batch,
            )  # fmt: skip
            cases = moe_cases(shape, configs, device, dtype)
            samples = alternate(
                cases, repeats=args.repeats, warmup=args.warmup, sync=sync, clock=CLOCKS[args.clock]
            )
            key = (shape.tokens, shape.hidden, shape.ffn_hidden, experts, domains)
            times.add(*key, *(Stats.of(samples[c]).format(1e3, 1) for c in configs))
            cost = "-"
            if "edl" in samples and "stock" in samples:
                diffs = [a - b for a, b in zip(samples["edl"], samples["stock"], strict=True)]
                cost = f"{statistics.median(diffs) * 1e3:.1f}"
            ratio_table.add(
                *key, *(Stats.of(ratios(samples[a], samples[b])).format() for a, b in pairs), cost
            )
            print(f"done {key}", flush=True)
    times.print()
    ratio_table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
