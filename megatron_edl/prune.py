"""Domain expert pruning of a checkpoint: how much LM loss each domain loses with m experts.

Usage:
    megatron-edl-prune --out prune/edl --nproc 2 -- --cpu --config-yaml MODEL.yaml \\
        --load runs/edl/checkpoints --train-data-path data/train --valid-data-path data/valid \\
        --moe-edl-eval-per-domain --eval-iters 20 <the run's other flags>
    megatron-edl-prune --out prune/edl --keep 8 4 2 --rankings domain global ... -- <flags>
    megatron-edl-prune --out prune/edl --export code --keep 4 [--export-dir DIR] -- <flags>
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

3. **Export** (``--export DOMAIN --keep M``, after the two passes, which then evaluate m = M):
   one process loads the checkpoint, keeps in every MoE layer the domain's first M experts of
   the ``domain`` ranking (the masked evaluation's), renumbered 0..M-1 in ascending original
   id (router rows, expert bias and expert weights sliced), and Megatron saves it as a stock
   checkpoint of ``--num-experts M`` in ``--export-dir`` (default ``OUT/export-DOMAIN-mM``;
   written to a temporary folder beside it and renamed; an existing non-empty folder is
   refused). Load it with the run's model flags and ``--num-experts M``, without any
   ``--moe-edl-*`` flag. ``export.json`` beside the checkpoint names the domain, M, the kept
   expert ids per layer (expert i of layer l is ``kept_experts[l][i]``), the source checkpoint
   and iteration, and the masked evaluation's losses for the domain at m = M (the exported
   model's own on data of that domain only: docs/method.md section 6). Pass the model flags
   without a parallel layout (the checkpoint may have been saved in any). Refused: an unknown
   domain (after the calibration, which names the domains), group-limited routing, token
   dropping, sinkhorn / quantile balancing (the export would not route as the masked
   evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "EXPORT_FORMAT",
    "PruneError",
    "build_export",
    "build_plan",
    "check_export_request",
    "last_flag_value",
    "main",
]

DEFAULT_TIMEOUT_S = 3600
EXPORT_FORMAT = "megatron-edl-prune-export"
EXPORT_SIDECAR = "export.json"


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


# Settings under which an M-expert model would not route as the masked evaluation: flag -> why.
_EXPORT_REFUSED_FLAGS = {
    "--moe-router-group-topk": "group-limited routing groups the E experts; M experts group "
    "differently",
    "--moe-expert-capacity-factor": "token dropping: an expert's capacity depends on the "
    "number of experts",
}
_EXPORT_REFUSED_BALANCING = ("sinkhorn", "quantile_balancing")
# The expert bias is added after the score function (sigmoid(-inf) = 0 + bias), so a masked
# expert can still win top-k: the masked evaluation would not be top-k over the kept experts.
_EXPERT_BIAS_FLAG = "--moe-router-enable-expert-bias"


def check_export_request(
    args: argparse.Namespace, flags: Sequence[str], num_experts: int, topk: int
) -> tuple[int, Path] | None:
    """Check ``--export`` before any work: ``(M, export folder)``, or ``None`` without it.

    Raises:
        PruneError: ``--export-dir`` without ``--export``; ``--export`` without one ``--keep
            M``; M below k or above E; an export folder that exists and is not empty; a router
            setting under which the M-expert model would not route as the masked evaluation
            (:data:`_EXPORT_REFUSED_FLAGS`, sinkhorn, quantile balancing).
    """
    from megatron_edl.core.pruning import keep_sizes
    from megatron_edl.yaml_config import expand_config_flag

    if args.export is None:
        if args.export_dir is not None:
            raise PruneError(f"--export-dir {args.export_dir}: pass --export DOMAIN with it")
        return None
    if not args.keep or len(args.keep) != 1:
        got = "" if not args.keep else f", got --keep {' '.join(map(str, args.keep))}"
        raise PruneError(f"--export {args.export} needs one --keep M (experts to keep){got}")
    (keep,) = keep_sizes(num_experts, topk, args.keep)
    expanded = expand_config_flag(list(flags))
    for flag, why in _EXPORT_REFUSED_FLAGS.items():
        value = last_flag_value(expanded, flag)
        if value is not None:
            raise PruneError(f"--export with {flag} {value}: {why}")
    balancing = last_flag_value(expanded, "--moe-router-load-balancing-type")
    if balancing in _EXPORT_REFUSED_BALANCING:
        raise PruneError(
            f"--export with --moe-router-load-balancing-type {balancing}: it routes with every "
            "expert's scores, not top-k over the kept ones"
        )
    folder = Path(args.export_dir or Path(args.out) / f"export-{_safe(args.export)}-m{keep}")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PruneError(f"--export-dir {folder} exists and is not empty: nothing is overwritten")
    return keep, folder


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "domain"


def build_export(stats, domain: str, keep: int) -> dict[str, Any]:
    """The export spec: the kept experts of ``domain`` per layer (the ``domain`` ranking).

    Args:
        stats: The calibration probe's routing statistics.
        domain: The domain's name.
        keep: M.

    Returns:
        ``{"format", "domain", "domain_index", "num_experts", "topk", "keep", "kept": {layer:
        [M ids, ascending]}}`` (:func:`megatron_edl.integration.pruning.install_export`).

    Raises:
        PruneError: ``domain`` is not one of the calibration's domains (names them).
    """
    from megatron_edl.core import pruning
    from megatron_edl.integration.pruning import EXPORT_SPEC_FORMAT

    if domain not in stats.domains:
        raise PruneError(
            f"--export {domain}: not a domain of the run's labels ({', '.join(stats.domains)})"
        )
    index = stats.domains.index(domain)
    kept_LM = pruning.export_experts(pruning.domain_order(stats.prob_sums_LDE), index, keep)
    return {
        "format": EXPORT_SPEC_FORMAT,
        "domain": domain,
        "domain_index": index,
        "num_experts": stats.num_experts,
        "topk": stats.topk,
        "keep": keep,
        "kept": {str(layer): kept_LM[i].tolist() for i, layer in enumerate(stats.layers)},
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
        "--export",
        metavar="DOMAIN",
        default=None,
        help="also write a stock checkpoint with only DOMAIN's --keep M experts per layer",
    )
    parser.add_argument(
        "--export-dir",
        default=None,
        help="where --export writes (default: OUT/export-DOMAIN-mM; must not be a non-empty "
        "folder)",
    )
    parser.add_argument(
        "--masked-eval", nargs=2, metavar=("PLAN", "RESULTS"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--export-pass", nargs=2, metavar=("SPEC", "SAVE_DIR"), help=argparse.SUPPRESS
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
    if args.export_pass:  # inside torchrun, one process: the export
        _export_pass(*args.export_pass, args.out, flags)
        return
    try:
        summary = prune(args, flags)
    except (PruneError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(summary["table"])
    print(f"wrote {Path(args.out) / 'prune.json'}, prune.md, prune.png")
    if "export" in summary:
        print(f"wrote {summary['export']['path']} (--num-experts {summary['export']['keep']})")


def prune(args: argparse.Namespace, flags: list[str]) -> dict[str, Any]:
    """Both passes and the outputs; returns the summary (``prune.json``'s content)."""
    from megatron_edl.analysis import pruning as curves_mod
    from megatron_edl.analysis.routing_stats import atomic_write, load_run
    from megatron_edl.core.pruning import RANKINGS, keep_sizes
    from megatron_edl.yaml_config import expand_config_flag

    if last_flag_value(flags, "--load") is None:
        raise PruneError("pass the checkpoint as --load CHECKPOINT_DIR")
    if "--moe-edl-eval-per-domain" not in flags:
        raise PruneError("pass --moe-edl-eval-per-domain: the curves are per-domain losses")
    if _EXPERT_BIAS_FLAG in expand_config_flag(list(flags)):
        raise PruneError(
            f"{_EXPERT_BIAS_FLAG}: the expert bias is added after the score function, so a "
            "masked expert (score 0) can still win top-k; the masked evaluation would not be "
            "top-k over the kept experts"
        )
    unknown = sorted(set(args.rankings) - set(RANKINGS))
    if unknown:
        raise PruneError(f"--rankings {unknown}: choose from {list(RANKINGS)}")
    if args.nproc < 1:
        raise PruneError(f"--nproc must be >= 1, got {args.nproc}")
    num_experts, topk = _model_shape(flags)
    keeps = keep_sizes(num_experts, topk, args.keep)
    export = check_export_request(args, flags, num_experts, topk)
    rankings = list(args.rankings)
    if export is not None and "domain" not in rankings:
        rankings.insert(0, "domain")  # the export's expected loss is the domain ranking's
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
    spec = None if export is None else build_export(stats, args.export, export[0])
    plan = build_plan(stats, keeps, rankings, seed=args.seed)
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
        "rankings": rankings,
        "seed": args.seed,
        "domains": plan["domains"],
        "orders": plan["orders"],
        "results": results,
    }
    if spec is not None:
        summary["export"] = _export(args, flags, spec, export[1], summary, out)
    summary["table"] = curves_mod.markdown_table(summary)
    curves_mod.plot_curves(summary, out / "prune.png", title=f"Domain expert pruning: {out.name}")
    atomic_write(out / "prune.md", lambda f: f.write((summary["table"] + "\n").encode()))
    text = json.dumps(summary, indent=1, sort_keys=True)
    atomic_write(out / "prune.json", lambda f: f.write(text.encode()))  # last: the study's marker
    return summary


def _export_pass(spec_path: str, save_dir: str, out: str, flags: list[str]) -> None:
    """The export pass (inside ``torchrun``, one process): the probe's launch, stopped by the
    export once the checkpoint is saved (:func:`~megatron_edl.integration.pruning.
    install_export`)."""
    import torch

    from megatron_edl import probe
    from megatron_edl.integration.pruning import (
        ExportDone,
        ExportError,
        install_export,
        load_export_spec,
    )

    install_export(load_export_spec(spec_path), save_dir)
    try:
        probe.main(["--out", out, *flags])
    except ExportDone:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return
    except ExportError as err:  # one line for the tool's message (_run reads "error:" lines)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print("error: the export pass ended without exporting", file=sys.stderr, flush=True)
    sys.exit(2)


def _expected_losses(results: Sequence[dict[str, Any]], domain: str, keep: int) -> dict[str, Any]:
    """The masked evaluation's losses of ``domain`` at m = ``keep`` (domain ranking)."""
    for entry in results:
        if entry["keep"] == keep and entry["ranking"] in ("domain", None):
            return {
                "name": entry["name"],
                "lm_loss_domain": entry["lm_loss_per_domain"].get(domain),
                "lm_loss": entry["lm_loss"],
                "token_share_domain": entry.get("token_share_per_domain", {}).get(domain),
            }
    raise PruneError(f"the masked evaluation has no entry for m = {keep} (domain ranking)")


def _export(
    args: argparse.Namespace,
    flags: list[str],
    spec: dict[str, Any],
    folder: Path,
    summary: dict[str, Any],
    out: Path,
) -> dict[str, Any]:
    """The export pass into a temporary folder beside ``folder``, ``export.json``, the rename."""
    from megatron_edl.analysis.routing_stats import atomic_write
    from megatron_edl.checkpoint import TRACKER

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would stay on the renamed export
    try:
        spec_path = out / "export_spec.json"
        atomic_write(spec_path, lambda f: f.write(json.dumps(spec, sort_keys=True).encode()))
        _run(
            _torchrun(
                1,
                "megatron_edl.prune",
                [
                    *("--export-pass", os.fspath(spec_path), os.fspath(tmp)),  # its --save
                    *("--out", os.fspath(out / "export-stats")),
                    *flags,
                ],
            ),
            out / "export.log",
            args.timeout,
            "export",
        )
        tracker = tmp / TRACKER
        if not tracker.is_file():
            raise PruneError(f"the export pass saved no checkpoint; log: {out / 'export.log'}")
        sidecar = {
            "format": EXPORT_FORMAT,
            "domain": spec["domain"],
            "keep": spec["keep"],
            "num_experts": spec["num_experts"],
            "topk": spec["topk"],
            "ranking": "domain",
            "numbering": "expert i of layer l is kept_experts[l][i] of the source (ascending id)",
            "kept_experts": spec["kept"],
            "source_checkpoint": last_flag_value(flags, "--load"),
            "source_iteration": int(tracker.read_text().strip()),
            "calibration_data_path": summary["calibration_data_path"],
            "masked_evaluation": _expected_losses(summary["results"], spec["domain"], spec["keep"]),
            "load_with": f"the run's model flags with --num-experts {spec['keep']}, no --moe-edl-*",
        }
        text = json.dumps(sidecar, indent=1, sort_keys=True)
        atomic_write(tmp / EXPORT_SIDECAR, lambda f: f.write(text.encode()))
        try:  # replaces an empty folder; refuses a non-empty one (nothing is overwritten)
            os.rename(tmp, folder)
        except OSError as err:
            raise PruneError(
                f"--export-dir {folder}: cannot rename the export there ({err})"
            ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**sidecar, "path": os.fspath(folder)}


if __name__ == "__main__":
    main()
