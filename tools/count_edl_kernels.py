#!/usr/bin/env python
"""Kernels per router call of the EDL math, eager vs compiled (``--moe-edl-fused``).

Runs the EDL part of one router call (softmax, per-domain sums, loss, ``edl_mi`` metric, and the
backward to the logits; no all-reduce: one rank) on both paths and counts its kernels with the
profiler (megatron_edl.benchmarks.kernels: CUDA kernel launches on a GPU; on CPU inductor's
generated kernels plus the arithmetic aten operators). Then times both paths per call,
alternated round by round (megatron_edl.benchmarks.harness), and prints the ratio
``fused / eager``. Prints Markdown tables; ``--json`` also writes the numbers.

Usage:
    python tools/count_edl_kernels.py                          # T=4096 E=64 D=49, CPU, fp32
    python tools/count_edl_kernels.py --device cuda --dtype bf16
    python tools/count_edl_kernels.py --tokens 256 --experts 8 --domains 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch._inductor.config

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
from megatron_edl.benchmarks.kernels import count_kernels, edl_chain
from megatron_edl.core import edl_fused

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the logits")
    parser.add_argument("--tokens", type=int, default=4096, help="T")
    parser.add_argument("--experts", type=int, default=64, help="E")
    parser.add_argument("--domains", type=int, default=49, help="D")
    add_timing_args(parser, repeats=20, warmup=3)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    set_threads(args)
    device = torch.device(args.device)
    if device.type == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu measures the host, not the GPU: use --clock wall")
    # Inductor's CPU kernels are visible to the profiler only when compiled with this on.
    torch._inductor.config.cpp.enable_kernel_profile = True
    fused = edl_fused.select_path(True, device, DTYPES[args.dtype])
    if not fused.compiled:
        print("torch.compile failed here: the fused path fell back to eager", file=sys.stderr)
        return 1
    shape = {"tokens": args.tokens, "experts": args.experts, "domains": args.domains}
    paths = {"eager": edl_fused.EAGER, "fused": fused}
    chains = {
        name: edl_chain(path, **shape, device=device, dtype=DTYPES[args.dtype])
        for name, path in paths.items()
    }
    for chain in chains.values():  # compile, and warm up both
        chain()
        chain()
    counts = {name: count_kernels(chain, device) for name, chain in chains.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    samples = alternate(
        chains, repeats=args.repeats, warmup=args.warmup, sync=sync, clock=CLOCKS[args.clock]
    )
    print(describe_machine(args.device))
    print(f"dtype {args.dtype}, {args.repeats} rounds after {args.warmup} warm-up, {args.clock}")
    what = "CUDA kernel launches" if device.type == "cuda" else "kernels (CPU rule)"
    table = Table(
        f"EDL kernels per router call (forward+backward) and time, {what}",
        ["T", "E", "D", "eager kernels", "fused kernels", "eager (ms)", "fused (ms)",
         "fused / eager"],
    )  # fmt: skip
    ratio = Stats.of(ratios(samples["fused"], samples["eager"]))
    table.add(
        args.tokens, args.experts, args.domains, counts["eager"].total, counts["fused"].total,
        Stats.of(samples["eager"]).format(1e3, 3), Stats.of(samples["fused"]).format(1e3, 3),
        ratio.format(),
    )  # fmt: skip
    table.print()
    print(f"fused kernels: {counts['fused'].top()}")
    print(f"eager kernels (most frequent): {counts['eager'].top(8)}")
    if args.json:
        result = {
            "device": args.device, "dtype": args.dtype, **shape,
            "eager_kernels": counts["eager"].total, "fused_kernels": counts["fused"].total,
            "fused_kernel_names": counts["fused"].by_name,
            "eager_ms": Stats.of(samples["eager"]).median * 1e3,
            "fused_ms": Stats.of(samples["fused"]).median * 1e3,
            "fused_over_eager": ratio.median,
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
