#!/usr/bin/env python
"""Peak memory of the EDL loss (one layer, forward+backward) against the number of domains.

Each row runs ``edl_loss`` and its backward on statistics of D domains, M of them present, in a
fresh process and reports the growth of its peak resident set
(megatron_edl.benchmarks.edl_memory), next to the size of one fp32 (D, D, E) tensor and, with
``--one-pass``, the same call forced through the one-pass form over all D rows where it fits
(the first version's memory, which grew with the square of the largest domain id) and the
ratio of the two; no timing.

Usage:
    python tools/benchmark_edl_memory.py        # D=3, 49 (all present), 1000 (300, 1000), 32640
    python tools/benchmark_edl_memory.py --one-pass           # plus the one-pass form of each
    python tools/benchmark_edl_memory.py --experts 256 --shapes 1000:300 1000:1000
"""

from __future__ import annotations

import argparse

from megatron_edl.benchmarks.edl_memory import peak_memory
from megatron_edl.benchmarks.harness import Table

_ONE_PASS_LIMIT = 1 << 27
"""Largest D * D * E measured in the one-pass form (about 3 GiB of peak memory in fp32)."""


def _shape(text: str) -> tuple[int, int]:
    domains, _, present = text.partition(":")
    return int(domains), int(present or domains)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--experts", type=int, default=64, help="E (default: %(default)s)")
    parser.add_argument(
        "--shapes",
        type=_shape,
        nargs="+",
        default=[(3, 3), (49, 49), (1000, 300), (1000, 1000), (32640, 300)],
        help="D:M pairs (domains:present); default: 3:3 49:49 1000:300 1000:1000 32640:300",
    )
    parser.add_argument(
        "--one-pass", action="store_true", help="also measure the one-pass form of every shape"
    )
    args = parser.parse_args(argv)
    table = Table(
        f"EDL loss peak memory, E={args.experts}, fp32, forward+backward",
        ["D", "M present", "peak MiB", "one-pass peak MiB", "one-pass / peak", "(D,D,E) MiB"],
    )
    for domains, present in args.shapes:
        point = peak_memory(domains, args.experts, present)
        one_pass = ratio = "-"
        if args.one_pass and domains * domains * args.experts <= _ONE_PASS_LIMIT:
            dense = peak_memory(
                domains, args.experts, present, block_elements=domains * domains * args.experts
            )
            one_pass = f"{dense.peak_mib:.1f}"
            ratio = f"{dense.peak_mib / point.peak_mib:.1f}" if point.peak_mib > 0.5 else "-"
        table.add(
            domains,
            point.present,
            f"{point.peak_mib:.1f}",
            one_pass,
            ratio,
            f"{point.dense_mib:.1f}",
        )
    table.print()


if __name__ == "__main__":
    main()
