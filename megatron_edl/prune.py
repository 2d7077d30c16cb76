"""Domain expert pruning of a checkpoint: how much LM loss each domain loses with m experts.

Usage:
    megatron-edl-prune --out prune/edl --nproc 2 -- --cpu --config-yaml MODEL.yaml \\
        --load runs/edl/checkpoints --train-data-path data/train --valid-data-path data/valid \\
        --moe-edl-eval-per-domain --eval-iters 20 <the run's other flags>
    megatron-edl-prune --out prune/edl --keep 8 4 2 --rankings domain global ... -- <flags>
    python tools/prune.py ...                                  # the same, from a checkout

Two evaluate-only passes of the launcher (:mod:`megatron_edl.probe`, under ``torchrun``):

1. **Calibration**: the probe on ``--calibration-data-path`` (default: the run's
   ``--train-data-path``, never the validation data; with ``--mock-data`` and neither, the
   evaluation batches themselves) gives each layer's routing mass per domain;
   the experts are ranked per domain (``domain``), once for all domains (``global``) and at random
   (``random``, seeded with ``--seed``): :mod:`megatron_edl.core.pruning`.
2. **Masked evaluation**: one process evaluates the validation batches once per (ranking, m),
   each domain's tokens routing among the domain's first m experts only (the other experts'
   logits masked before top-k, k unchanged): :mod:`megatron_edl.integration.pruning`. The first
   pass keeps every expert: the probe's per-domain losses.

Output in ``--out``: ``prune.json`` (every pass's per-domain loss, the curves, the rankings),
``prune.md`` (the table) and ``prune.png`` (loss increase against m). Pass the run's flags as for
the probe (``--load`` and ``--moe-edl-eval-per-domain`` needed; ``--config-yaml`` first).
``m`` defaults to E, E/2, E/4 and k; m < k or m > E is refused before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PruneError", "build_plan", "last_flag_value", "main"]

DEFAULT_TIMEOUT_S = 3600


class PruneError(ValueError):
    """A pruning request that cannot be served; the message names the flag or file."""


def last_flag_value(flags: Sequence[str], name: str) -> str | None:
    """The value of the last ``name VALUE`` / ``name=VALUE`` in ``flags`` (``None``: absent)."""
    value = None
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


def build_plan(
    stats, keeps: Sequence[int], rankings: Sequence[str], *, seed: int
) -> dict[str, Any]:
    """The masked evaluation's plan from the calibration's routing statistics.

    Args:
        stats: The calibration probe's :class:`~megatron_edl.analysis.routing_stats.RoutingStats`.
        keeps: The m values (E first).
        rankings: Names of :data:`megatron_edl.core.pruning.RANKINGS`.
        seed: The random ranking's seed.

    Returns:
        ``{"format", "domains", "layers", "configs"}`` (:func:`~megatron_edl.integration.
        pruning.install_masked_evaluation`), the full model first; ``orders`` holds every
        ranking's expert order per layer and domain.
    """
    from megatron_edl.core import pruning
    from megatron_edl.integration.pruning import PLAN_FORMAT

    configs: list[dict[str, Any]] = [
        {"name": f"full-m{stats.num_experts}", "ranking": None, "keep": stats.num_experts}
    ]
    orders = {r: pruning.expert_order(r, stats.prob_sums_LDE, seed=seed) for r in rankings}
    for keep in keeps:
        if keep == stats.num_experts:
            continue
        for ranking in rankings:
            mask_LDE = pruning.keep_mask(orders[ranking], keep)
            configs.append(
                {
                    "name": f"{ranking}-m{keep}",
                    "ranking": ranking,
                    "keep": keep,
                    "masks": {
                        str(layer): mask_LDE[i].tolist() for i, layer in enumerate(stats.layers)
                    },
                }
            )
    return {
        "format": PLAN_FORMAT,
        "domains": list(stats.domains),
        "layers": list(stats.layers),
        "num_experts": stats.num_experts,
        "topk": stats.topk,
        "seed": seed,
        "orders": {
            r: {str(layer): o[i].tolist() for i, layer in enumerate(stats.layers)}
            for r, o in orders.items()
        },
        "configs": configs,
    }


def _model_shape(flags: Sequence[str]) -> tuple[int, int]:
    from megatron_edl.yaml_config import expand_config_flag

    expanded = expand_config_flag(list(flags))
    experts = last_flag_value(expanded, "--num-experts")
    topk = last_flag_value(expanded, "--moe-router-topk")
    if experts is None:
        raise PruneError("the run's flags set no --num-experts: pruning needs an MoE model")
    return int(experts), int(topk or 2)


def _torchrun(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    from megatron_edl.benchmarks.runs import free_port

    return [
        sys.executable,
        *("-m", "torch.distributed.run", f"--nproc-per-node={nproc}"),
        f"--master-port={free_port()}",
        *("-m", module),
        *args,
    ]


def _run(command: Sequence[str], log_path: Path, timeout: float, what: str) -> None:
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            returncode = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            raise PruneError(f"{what}: no result after {timeout:.0f} s; log: {log_path}") from None
    if returncode != 0:
        lines = log_path.read_text(errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        detail = errors[-1] if errors else (lines[-1] if lines else "")
        raise PruneError(f"{what}: exit status {returncode} ({detail}); log: {log_path}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-edl-prune",
        description=__doc__.split("\n\n", 1)[0],
        epilog="Every flag after -- (or unknown here) goes to the launcher, as for the probe.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--keep", type=int, nargs="+", default=None, help="m values (default: E, E/2, E/4, k)"
    )
    parser.add_argument(
        "--rankings",
        nargs="+",
        default=["domain", "global", "random"],
        help="expert rankings (domain, global, random)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the random ranking's seed")
    parser.add_argument("--nproc", type=int, default=1, help="processes per pass (torchrun)")
    parser.add_argument(
        "--calibration-data-path",
        default=None,
        help="data prefix the ranking is measured on (default: the run's --train-data-path)",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per pass, s")
    parser.add_argument(
        "--masked-eval", nargs=2, metavar=("PLAN", "RESULTS"), help=argparse.SUPPRESS
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the pruning evaluation (module docstring); one ``error:`` line on a bad request."""
    parser = _parser()
    args, flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    flags = [f for f in flags if f != "--"]
    if args.masked_eval:  # inside torchrun: the second pass
        from megatron_edl import probe
        from megatron_edl.integration.pruning import install_masked_evaluation, load_plan

        plan_path, results_path = args.masked_eval
        install_masked_evaluation(load_plan(plan_path), results_path)
        probe.main(["--out", args.out, *flags])
        return
    try:
        summary = prune(args, flags)
    except (PruneError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(summary["table"])
    print(f"wrote {Path(args.out) / 'prune.json'}, prune.md, prune.png")


def prune(args: argparse.Namespace, flags: list[str]) -> dict[str, Any]:
    """Both passes and the outputs; returns the summary (``prune.json``'s content)."""
    from megatron_edl.analysis import pruning as curves_mod
    from megatron_edl.analysis.routing_stats import atomic_write, load_run
    from megatron_edl.core.pruning import RANKINGS, keep_sizes

    if last_flag_value(flags, "--load") is None:
        raise PruneError("pass the checkpoint as --load CHECKPOINT_DIR")
    if "--moe-edl-eval-per-domain" not in flags:
        raise PruneError("pass --moe-edl-eval-per-domain: the curves are per-domain losses")
    unknown = sorted(set(args.rankings) - set(RANKINGS))
    if unknown:
        raise PruneError(f"--rankings {unknown}: choose from {list(RANKINGS)}")
    if args.nproc < 1:
        raise PruneError(f"--nproc must be >= 1, got {args.nproc}")
    num_experts, topk = _model_shape(flags)
    keeps = keep_sizes(num_experts, topk, args.keep)
    calibration = args.calibration_data_path or last_flag_value(flags, "--train-data-path")
    mock = calibration is None and "--mock-data" in flags
    if calibration is None and not mock:
        raise PruneError("no calibration data: pass --calibration-data-path (or --train-data-path)")
    if calibration is not None and calibration == last_flag_value(flags, "--valid-data-path"):
        raise PruneError(f"--calibration-data-path {calibration} is the validation data")
    # Mock data (tests): the ranking is measured on the evaluation batches themselves.
    calibration_flags = [] if mock else ["--valid-data-path", calibration]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cal_dir = out / "calibration"
    _run(
        _torchrun(
            args.nproc,
            "megatron_edl.probe",
            ["--out", os.fspath(cal_dir), *flags, *calibration_flags],
        ),
        out / "calibration.log",
        args.timeout,
        "calibration probe",
    )
    probes = [s for s in load_run(cal_dir) if s.source == "probe"]
    if not probes:
        raise PruneError(f"{cal_dir}: the calibration probe wrote no dump")
    stats = probes[-1]
    plan = build_plan(stats, keeps, args.rankings, seed=args.seed)
    plan_path, results_path = out / "plan.json", out / "masked_eval.json"
    atomic_write(plan_path, lambda f: f.write(json.dumps(plan, sort_keys=True).encode()))
    results_path.unlink(missing_ok=True)
    _run(
        _torchrun(
            args.nproc,
            "megatron_edl.prune",
            [
                *("--masked-eval", os.fspath(plan_path), os.fspath(results_path)),
                *("--out", os.fspath(out / "masked-stats")),
                *flags,
            ],
        ),
        out / "masked_eval.log",
        args.timeout,
        "masked evaluation",
    )
    if not results_path.exists():
        raise PruneError(f"{results_path}: the masked evaluation wrote no results")
    results = json.loads(results_path.read_text(encoding="utf-8"))["results"]
    summary = curves_mod.curves(results)
    summary |= {
        "format": "megatron-edl-prune",
        "checkpoint": last_flag_value(flags, "--load"),
        "calibration_data_path": "mock data: the evaluation batches" if mock else calibration,
        "num_experts": num_experts,
        "topk": topk,
        "keep": list(keeps),
        "rankings": list(args.rankings),
        "seed": args.seed,
        "domains": plan["domains"],
        "orders": plan["orders"],
        "results": results,
    }
    summary["table"] = curves_mod.markdown_table(summary)
    curves_mod.plot_curves(summary, out / "prune.png", title=f"Domain expert pruning: {out.name}")
    atomic_write(out / "prune.md", lambda f: f.write((summary["table"] + "\n").encode()))
    text = json.dumps(summary, indent=1, sort_keys=True)
    atomic_write(out / "prune.json", lambda f: f.write(text.encode()))  # last: the study's marker
    return summary


if __name__ == "__main__":
    main()
