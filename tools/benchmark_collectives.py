#!/usr/bin/env python
"""Collectives per MoE layer per micro-batch, with and without EDL: number, kind and size.

Runs one forward+backward of a megatron-core ``MoELayer`` (stock router, or the EDL router
installed as the launcher does) on ``--world`` gloo ranks for each parallel layout, and counts
every collective that reaches the process-group backend (``CollectiveCounter``: all ``c10d``
operators, also those Megatron issues through saved aliases). Counting is exact, so this is a
check as much as a measurement (tests/unit/benchmarks/test_harness.py asserts it): EDL must add
exactly one all-reduce of D*E + D fp32 numbers per layer and micro-batch where its statistics group
has more than one rank, and nothing where it has one (``local`` scope without TP/CP) or where EDL is
off.

Layouts: ``dp`` (data parallel over all ranks), ``ep`` (expert parallel, all-to-all dispatcher),
``tp`` (tensor parallel with sequence parallelism), each with the ``global`` scope (statistics
over tp x dp x cp) and, for ``dp``, also ``local`` (over tp x cp: one rank here).

Usage:
    python tools/benchmark_collectives.py                     # 2 ranks, E=64, D=3 and 49
    python tools/benchmark_collectives.py --world 4 --experts 8 --domains 3
"""

from __future__ import annotations

import argparse
import sys

from megatron_edl.benchmarks.collectives import LAYOUTS, count_worker
from megatron_edl.benchmarks.harness import Table, describe_machine


def summarise(calls: dict[str, list[tuple[int, int]]]) -> dict[str, tuple[int, list[int]]]:
    """op -> (number of calls, elements of each)."""
    return {op: (len(sizes), [e for e, _ in sizes]) for op, sizes in sorted(calls.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2, help="gloo ranks")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--tokens", type=int, default=256, help="T per micro-batch and rank")
    parser.add_argument("--hidden", type=int, default=64, help="H (and expert FFN size)")
    parser.add_argument("--experts", type=int, default=64, help="E")
    parser.add_argument("--domains", type=int, nargs="+", default=[3, 49], help="D values")
    parser.add_argument("--topk", type=int, default=8)
    args = parser.parse_args(argv)
    from megatron_edl.benchmarks.gloo import run_distributed

    spec = {
        "layouts": args.layouts, "tokens": args.tokens, "hidden": args.hidden,
        "experts": args.experts, "domains": args.domains, "topk": min(args.topk, args.experts),
    }  # fmt: skip
    per_rank = run_distributed(count_worker, args.world, spec, timeout_s=600)
    print(describe_machine("cpu"))
    print(f"{args.world} gloo ranks, E={args.experts}, top-k {spec['topk']}, T={args.tokens}")

    table = Table(
        "Collectives per MoE layer per micro-batch (forward+backward, rank 0)",
        ["layout", "D", "config", "collective", "calls", "elements per call"],
    )
    extra = Table(
        "Extra collectives of EDL (edl - stock, aux+edl - aux) per layer per micro-batch",
        ["layout", "D", "comparison", "extra calls", "extra elements", "expected (D*E + D)",
         "same extra on all ranks"],
    )  # fmt: skip
    for (layout, domains, name), calls in per_rank[0].items():
        for op, (count, sizes) in summarise(calls).items():
            table.add(layout, domains, name, op, count, _sizes(sizes))
        if not calls:
            table.add(layout, domains, name, "-", 0, "-")
    for layout in args.layouts:
        scope_ranks = args.world if LAYOUTS[layout][2] == "global" else 1
        for domains in args.domains:
            for with_edl, without in (("edl", "stock"), ("aux+edl", "aux")):
                key_a, key_b = (layout, domains, with_edl), (layout, domains, without)
                differences = [_difference(r[key_a], r[key_b]) for r in per_rank]
                calls, elements = differences[0]
                same = all(d == differences[0] for d in differences)
                expected = domains * args.experts + domains if scope_ranks > 1 else 0
                table_expected = f"1 x {expected}" if expected else "0"
                extra.add(
                    layout, domains, f"{with_edl} - {without}", calls, elements, table_expected,
                    "yes" if same else "NO",
                )  # fmt: skip
    table.print()
    extra.print()
    return 0


def _sizes(sizes: list[int]) -> str:
    distinct = sorted(set(sizes))
    return ", ".join(f"{s} (x{sizes.count(s)})" if sizes.count(s) > 1 else str(s) for s in distinct)


def _difference(a: dict, b: dict) -> tuple[str, str]:
    """The calls and element counts in ``a`` beyond those in ``b`` (per operator)."""
    calls, elements = [], []
    for op in sorted(set(a) | set(b)):
        mine, theirs = [e for e, _ in a.get(op, [])], [e for e, _ in b.get(op, [])]
        for size in theirs:
            if size in mine:
                mine.remove(size)
        if len(a.get(op, [])) != len(b.get(op, [])) or mine:
            calls.append(f"{op} {len(a.get(op, [])) - len(b.get(op, [])):+d}")
            elements.extend(str(e) for e in mine)
    return (", ".join(calls) or "0"), (", ".join(elements) or "-")


if __name__ == "__main__":
    sys.exit(main())
