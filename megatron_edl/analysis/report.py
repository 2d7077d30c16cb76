"""Specialization report: routing statistics of one or more runs -> HTML + PNG + CSV + JSON.

Usage::

    python tools/report.py --out report baseline=runs/base/routing_stats edl=runs/edl/routing_stats
    python tools/report.py --out report --label-map coarse.yaml --layers 1,4 --window 5 \\
        base=runs/base/routing_stats edl=runs/edl/routing_stats probe=probes/edl

Each positional argument is ``[NAME=]PATH``: a directory of routing-statistics dumps (training
telemetry, ``--moe-edl-stats-interval``, or ``tools/probe.py`` output) or one dump's ``.json``.
A directory's ``*.json`` files that are not JSON (empty, truncated) are skipped with one
``warning:`` line naming and counting them; a damaged ``.npz`` or metadata of the wrong type is
one ``error:`` line naming the file.
Console script: ``megatron-edl-report``.

What it writes under ``--out``:

* ``index.html``: the report (no external resources; it references the PNGs under ``figures/``
  and the data files next to it);
* ``figures/``: per chosen layer, the domain x expert heat maps (runs side by side), the pairwise
  JSD / top-m Jaccard matrices and, with three domains, the ternary plot; I(D;E) and mean JSD
  versus step; I(D;E), JSD and Jaccard per layer; load balance; routing entropy; per-domain LM
  loss when a probe measured it;
* ``metrics.json`` (every metric, matrices included), ``series.csv`` (one-number metrics of
  every dump and layer), ``snapshot.csv`` (the same for the compared snapshot),
  ``snapshot_domains.csv`` (per domain and layer) and ``snapshot_loads.csv`` (per domain,
  layer and expert).

The *snapshot* of a run is what the per-layer figures compare: its last dump (a probe when the
directory holds one, else the last training interval), ``--step`` picks another, and
``--window N`` sums the last N training intervals (sums over tokens add up). ``--label-map``
groups the dumps' domains with the same YAML file format as ``--moe-edl-label-map`` (e.g. 49
fine topics into 3 coarse groups) before any metric is computed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import html
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from megatron_edl.analysis import plots
from megatron_edl.analysis.metrics import SCALAR_METRICS, LayerMetrics, stats_metrics
from megatron_edl.analysis.routing_stats import (
    SOURCES,
    RoutingStats,
    UnreadableDumpWarning,
    group_domains,
    load_run,
    sum_steps,
)
from megatron_edl.config import parse_layers

__all__ = ["ReportOptions", "RunData", "load_report_run", "main", "write_report"]

REPORT_SOURCES = ("auto", *SOURCES)
"""``--source``: a dump source of the routing statistics, or ``auto`` (probe if any)."""

FIGURES_DIR = "figures"
DEFAULT_MAX_LAYERS = 6
"""With more MoE layers than this, the per-layer figures default to first, middle and last."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportOptions:
    """What the report shows (the command-line flags of :func:`main`)."""

    layers: tuple[int, ...] | None = None
    """Layers of the per-layer figures; ``None``: every layer, or first/middle/last when there
    are more than ``DEFAULT_MAX_LAYERS``."""
    step: int | None = None
    """Snapshot step (a dump of every run must have it); ``None``: each run's last dump."""
    window: int = 1
    """Number of last training intervals summed into the snapshot (with ``step``: ending
    there)."""
    source: str = "auto"
    """Snapshot source: ``auto`` (probe if present, else train), ``train`` or ``probe``."""
    top_m: int | None = None
    """Expert-set size of the Jaccard overlap; ``None``: k."""
    basis: str = "hard"
    """Heat maps and ternary plot on ``hard`` top-k shares or ``dense`` mean probabilities."""
    title: str = "Expert specialization report"

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"--window must be >= 1, got {self.window}")
        if self.source not in REPORT_SOURCES:
            raise ValueError(f"--source must be auto, train or probe, got {self.source!r}")
        if self.basis not in ("hard", "dense"):
            raise ValueError(f"--basis must be hard or dense, got {self.basis!r}")


@dataclasses.dataclass(frozen=True)
class RunData:
    """One run's dumps (domains grouped), its snapshot and the metrics of both."""

    name: str
    path: str
    dumps: list[RoutingStats]
    snapshot: RoutingStats
    snapshot_metrics: list[LayerMetrics]
    series: list[tuple[RoutingStats, list[LayerMetrics]]]
    """Every dump with its per-layer metrics (training intervals and probes)."""


def _snapshot(name: str, dumps: list[RoutingStats], options: ReportOptions) -> RoutingStats:
    source = options.source
    if source == "auto":
        source = "probe" if any(d.source == "probe" for d in dumps) else "train"
    candidates = [d for d in dumps if d.source == source]
    if not candidates:
        raise ValueError(f"run {name!r} has no {source} dumps")
    if options.step is not None:
        ends = [i for i, d in enumerate(candidates) if d.step == options.step]
        if not ends:
            steps = [d.step for d in candidates]
            raise ValueError(f"run {name!r} has no {source} dump at step {options.step} ({steps})")
        candidates = candidates[: ends[0] + 1]
    chosen = candidates[-options.window :] if source == "train" else candidates[-1:]
    return sum_steps(chosen)


def load_report_run(
    name: str,
    path: str | os.PathLike,
    options: ReportOptions,
    label_map: str | os.PathLike | None = None,
) -> RunData:
    """Read a run's dumps, group their domains, pick the snapshot and compute the metrics.

    Args:
        name: Run name (figure titles, tables).
        path: Directory of dumps or one dump's ``.json``.
        options: Report options (snapshot choice, top-m).
        label_map: Optional YAML label map grouping the dumps' domains.

    Returns:
        The run's data.

    Raises:
        ValueError: If the path holds no dumps or the snapshot cannot be formed.
    """
    dumps = load_run(path)
    if label_map is not None:
        dumps = [group_domains(d, label_map) for d in dumps]
    snapshot = _snapshot(name, dumps, options)
    series = [(d, stats_metrics(d, top_m=options.top_m)) for d in dumps]
    return RunData(
        name=name,
        path=os.fspath(path),
        dumps=dumps,
        snapshot=snapshot,
        snapshot_metrics=stats_metrics(snapshot, top_m=options.top_m),
        series=series,
    )


def _default_layers(layers: Sequence[int]) -> tuple[int, ...]:
    if len(layers) <= DEFAULT_MAX_LAYERS:
        return tuple(layers)
    return tuple(sorted({layers[0], layers[len(layers) // 2], layers[-1]}))


def _json_value(value: Any) -> Any:
    """NaN -> None, numpy -> lists/floats, recursively, for strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_value(value.tolist())
    if isinstance(value, np.generic):
        return _json_value(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _layer_record(metrics: LayerMetrics) -> dict[str, Any]:
    record = dataclasses.asdict(metrics)
    record.update(metrics.scalars())
    return record


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value)}"
    return f"{value:.4g}"


_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


class _Html:
    def __init__(self, title: str) -> None:
        self.parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
        ]

    def add(self, text: str) -> None:
        self.parts.append(text)

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str, cls: str = "") -> None:
        attr = f' class="{cls}"' if cls else ""
        self.parts.append(f"<p{attr}>{text}</p>")

    def image(self, src: str, alt: str) -> None:
        self.parts.append(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> None:
        out = ["<table><tr>"]
        out += [f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in
                enumerate(header)]  # fmt: skip
        out.append("</tr>")
        for row in rows:
            cells = [
                f'<td class="{"l" if i < left else ""}">'
                f"{html.escape(c if isinstance(c, str) else _fmt(c))}</td>"
                for i, c in enumerate(row)
            ]
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
        self.parts.append("".join(out))

    def text(self) -> str:
        return "\n".join([*self.parts, "</body></html>"]) + "\n"


def _save(fig, out_dir: Path, name: str, written: list[str]) -> str:
    rel = f"{FIGURES_DIR}/{name}"
    fig.savefig(out_dir / rel, dpi=90)
    written.append(rel)
    return rel


def _check_compatible(runs: Sequence[RunData]) -> tuple[str, ...]:
    domains = runs[0].snapshot.domains
    for run in runs[1:]:
        if run.snapshot.domains != domains:
            raise ValueError(
                f"runs {runs[0].name!r} and {run.name!r} have different domains "
                f"({list(domains)} vs {list(run.snapshot.domains)}); group them with --label-map"
            )
    return domains


def write_report(
    runs: Sequence[RunData], out_dir: str | os.PathLike, options: ReportOptions
) -> Path:
    """Write the HTML report, its figures and the metric files.

    Args:
        runs: The runs, in display order (from :func:`load_report_run`).
        out_dir: Output directory (created; existing files of the same names are replaced).
        options: Report options.

    Returns:
        The path of ``index.html``.

    Raises:
        ValueError: If there is no run, or the runs' domains differ.
    """
    matplotlib.use("Agg")
    if not runs:
        raise ValueError("the report needs at least one run")
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    domains = _check_compatible(runs)
    out_dir = Path(out_dir)
    (out_dir / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    figures: list[str] = []
    all_layers = sorted({m.layer for run in runs for m in run.snapshot_metrics})
    chosen = options.layers or _default_layers(all_layers)
    unknown = [layer for layer in chosen if layer not in all_layers]
    if unknown:
        raise ValueError(f"--layers {list(unknown)} are not MoE layers of the runs ({all_layers})")
    by_run_layer = {
        run.name: {m.layer: m for m in run.snapshot_metrics} for run in runs
    }  # fmt: skip

    page = _Html(options.title)
    _runs_section(page, runs)
    series = {
        run.name: _series_points(run) for run in runs if any(d.source == "train" for d in run.dumps)
    }
    overview_layer = chosen[-1]
    rel = _save(
        plots.fig_overview(
            overview_layer, {name: by_run_layer[name].get(overview_layer) for name in names},
            series, domains, basis=options.basis,
        ),
        out_dir, "overview.png", figures,
    )  # fmt: skip
    page.para(
        f"At a glance: layer {overview_layer} of each run's snapshot, and I(domain; expert) "
        "averaged over layers versus training step.",
        "note",
    )
    page.image(rel, "overview")

    page.heading("Domain x expert load")
    basis_text = (
        "share of each domain's top-k assignments per expert (rows sum to 1; uniform = 1/E)"
        if options.basis == "hard"
        else "each domain's mean dense routing probability per expert (rows sum to 1)"
    )
    page.para(f"Snapshot of each run; colour: {basis_text}.", "note")
    for layer in chosen:
        per_run = {name: by_run_layer[name].get(layer) for name in names}
        rel = _save(
            plots.fig_heatmaps(layer, per_run, domains, basis=options.basis),
            out_dir, f"heatmap_layer{layer:03d}.png", figures,
        )  # fmt: skip
        page.image(rel, f"domain x expert load, layer {layer}")

    if len(domains) == 3:
        page.heading("Ternary plots")
        page.para(
            "One point per expert: its load share across the three domains (each domain's "
            "shares normalised by its own size); area = the expert's share of all load. "
            "Corners: experts used by one domain only; centre (+): shared experts.",
            "note",
        )
        for layer in chosen:
            per_run = {name: by_run_layer[name].get(layer) for name in names}
            if options.basis == "dense":
                per_run = {n: _dense_mix(m) for n, m in per_run.items()}
            rel = _save(
                plots.fig_ternary(layer, per_run, domains),
                out_dir, f"ternary_layer{layer:03d}.png", figures,
            )  # fmt: skip
            page.image(rel, f"ternary plot, layer {layer}")

    page.heading("Specialization versus training step")
    if series:
        rel = _save(plots.fig_vs_step(series, num_domains=len(domains)), out_dir,
                    "mi_jsd_vs_step.png", figures)  # fmt: skip
        page.para(
            "I(domain; expert) and mean pairwise JSD of the dense routing distributions per "
            "training interval; dashed: ln D and ln 2, the maxima.",
            "note",
        )
        page.image(rel, "I(D;E) and mean JSD versus step")
    else:
        page.para("No training dumps (probes only).", "note")

    page.heading("Per layer")
    snapshots = {run.name: run.snapshot_metrics for run in runs}
    rel = _save(plots.fig_divergence_by_layer(snapshots), out_dir, "divergence_by_layer.png",
                figures)  # fmt: skip
    page.image(rel, "I(D;E), JSD and Jaccard per layer")
    for layer in chosen:
        per_run = {name: by_run_layer[name].get(layer) for name in names}
        rel = _save(plots.fig_pairs(layer, per_run, domains), out_dir,
                    f"pairs_layer{layer:03d}.png", figures)  # fmt: skip
        page.image(rel, f"pairwise JSD and Jaccard, layer {layer}")
    rel = _save(plots.fig_balance(snapshots), out_dir, "balance.png", figures)
    page.image(rel, "load balance per layer")
    rel = _save(plots.fig_entropy(snapshots, domains), out_dir, "entropy.png", figures)
    page.image(rel, "routing entropy per layer")

    losses = {
        run.name: run.snapshot_metrics[0].lm_loss_D
        for run in runs
        if run.snapshot_metrics and run.snapshot_metrics[0].lm_loss_D is not None
    }
    if losses:
        page.heading("Per-domain LM loss")
        rel = _save(plots.fig_lm_loss(losses, domains), out_dir, "lm_loss.png", figures)
        page.image(rel, "per-domain LM loss")

    _tables_section(page, runs, domains)
    page.heading("Data files")
    data_files = _write_data(runs, out_dir, domains)
    page.add(
        "<ul>"
        + "".join(f'<li><a href="{html.escape(f)}">{html.escape(f)}</a></li>' for f in data_files)
        + "</ul>"
    )
    index = out_dir / "index.html"
    index.write_text(page.text(), encoding="utf-8")
    return index


def _dense_mix(metrics: LayerMetrics | None) -> LayerMetrics | None:
    from megatron_edl.analysis.metrics import expert_mix

    if metrics is None:
        return None
    return dataclasses.replace(metrics, expert_mix_DE=expert_mix(metrics.load_dense_DE))


def _series_points(run: RunData) -> dict[int, list[tuple[int, float, float]]]:
    points: dict[int, list[tuple[int, float, float]]] = {}
    for dump, metrics in run.series:
        if dump.source != "train":
            continue
        for m in metrics:
            points.setdefault(m.layer, []).append((dump.step, m.mi, m.jsd_mean))
    return points


def _runs_section(page: _Html, runs: Sequence[RunData]) -> None:
    page.heading("Runs")
    rows = []
    for run in runs:
        snap = run.snapshot
        train_steps = [d.step for d in run.dumps if d.source == "train"]
        rows.append([
            run.name, run.path, f"{snap.source} @ {snap.step}",
            float(snap.num_iterations), float(len(train_steps)),
            ", ".join(map(str, snap.layers)), float(snap.num_experts), float(snap.topk),
        ])  # fmt: skip
    page.table(
        ["run", "path", "snapshot", "iterations summed", "training dumps", "MoE layers", "E",
         "k"], rows, left=3,
    )  # fmt: skip
    page.para(f"Domains: {html.escape(', '.join(runs[0].snapshot.domains))}.", "note")


def _tables_section(page: _Html, runs: Sequence[RunData], domains: Sequence[str]) -> None:
    page.heading("Numbers (snapshot)")
    header = ["run", "layer", *SCALAR_METRICS]
    rows = [
        [run.name, str(m.layer), *m.scalars().values()]
        for run in runs
        for m in run.snapshot_metrics
    ]
    page.table(header, rows, left=2)
    page.para(
        "; ".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}" for k, v in SCALAR_METRICS.items()),
        "note",
    )
    page.heading("Per domain (snapshot, mean over layers)", 3)
    header = ["domain"]
    for run in runs:
        header += [f"{run.name}: tokens", f"{run.name}: token entropy",
                   f"{run.name}: H(p̄_d)/ln E", f"{run.name}: LM loss"]  # fmt: skip
    rows = []
    for d, domain in enumerate(domains):
        row: list[Any] = [domain]
        for run in runs:
            ms = run.snapshot_metrics
            with np.errstate(all="ignore"):
                token_h = float(np.nanmean([m.token_entropy_D[d] for m in ms])) if ms else math.nan
                marg_h = float(np.nanmean([m.domain_entropy_D[d] for m in ms])) if ms else math.nan
            loss = ms[0].lm_loss_D[d] if ms and ms[0].lm_loss_D is not None else math.nan
            row += [float(ms[0].tokens_D[d]) if ms else math.nan, token_h, marg_h, float(loss)]
        rows.append(row)
    page.table(header, rows)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(
                ["" if isinstance(v, float) and not math.isfinite(v) else v for v in row]
            )


def _write_data(runs: Sequence[RunData], out_dir: Path, domains: Sequence[str]) -> list[str]:
    scalars = list(SCALAR_METRICS)
    series_rows = [
        [run.name, dump.source, dump.step, dump.num_iterations, m.layer, *m.scalars().values()]
        for run in runs
        for dump, metrics in run.series
        for m in metrics
    ]
    _write_csv(out_dir / "series.csv",
               ["run", "source", "step", "iterations", "layer", *scalars], series_rows)  # fmt: skip
    snap_rows = [
        [run.name, run.snapshot.source, run.snapshot.step, m.layer, *m.scalars().values()]
        for run in runs
        for m in run.snapshot_metrics
    ]
    _write_csv(out_dir / "snapshot.csv", ["run", "source", "step", "layer", *scalars], snap_rows)
    domain_rows = []
    load_rows = []
    for run in runs:
        for m in run.snapshot_metrics:
            for d, domain in enumerate(domains):
                loss = float(m.lm_loss_D[d]) if m.lm_loss_D is not None else math.nan
                domain_rows.append([
                    run.name, m.layer, domain, float(m.tokens_D[d]), float(m.token_entropy_D[d]),
                    float(m.domain_entropy_D[d]), float(m.domain_entropy_hard_D[d]), loss,
                ])  # fmt: skip
                for e in range(m.load_hard_DE.shape[1]):
                    load_rows.append([
                        run.name, m.layer, domain, e, float(m.load_hard_DE[d, e]),
                        float(m.load_dense_DE[d, e]), float(m.expert_mix_DE[d, e]),
                    ])  # fmt: skip
    _write_csv(
        out_dir / "snapshot_domains.csv",
        ["run", "layer", "domain", "tokens", "token_entropy", "domain_entropy",
         "domain_entropy_hard", "lm_loss"], domain_rows,
    )  # fmt: skip
    _write_csv(
        out_dir / "snapshot_loads.csv",
        ["run", "layer", "domain", "expert", "load_hard", "load_dense", "expert_mix"], load_rows,
    )  # fmt: skip
    document = {
        "domains": list(domains),
        "scalar_metrics": SCALAR_METRICS,
        "runs": {
            run.name: {
                "path": run.path,
                "snapshot": {
                    "source": run.snapshot.source,
                    "step": run.snapshot.step,
                    "num_iterations": run.snapshot.num_iterations,
                    "layers": [_layer_record(m) for m in run.snapshot_metrics],
                },
                "series": [
                    {"source": dump.source, "step": dump.step, "layer": m.layer, **m.scalars()}
                    for dump, metrics in run.series
                    for m in metrics
                ],
            }
            for run in runs
        },
    }
    with open(out_dir / "metrics.json", "w", encoding="utf-8") as f:
        json.dump(_json_value(document), f, indent=1, allow_nan=False)
    return ["metrics.json", "series.csv", "snapshot.csv", "snapshot_domains.csv",
            "snapshot_loads.csv"]  # fmt: skip


def _parse_run(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec.rstrip("/")).name or spec
    if not name or not path:
        raise ValueError(f"run must be PATH or NAME=PATH, got {spec!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tools/report.py``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog="See the module docstring of megatron_edl.analysis.report for the outputs.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="[NAME=]PATH",
        help="a run's directory of routing-stats dumps, or one dump's .json",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--label-map",
        default=None,
        help="YAML label map (the --moe-edl-label-map format) grouping the "
        "dumps' domains, e.g. fine topics into coarse groups",
    )
    parser.add_argument(
        "--layers",
        default=None,
        help="layers of the per-layer figures, e.g. '1,3,5-8' or 'all' "
        f"(default: all, or first/middle/last beyond {DEFAULT_MAX_LAYERS})",
    )
    parser.add_argument(
        "--step", type=int, default=None, help="snapshot step (default: each run's last dump)"
    )
    parser.add_argument(
        "--window", type=int, default=1, help="sum the last N training intervals into the snapshot"
    )
    parser.add_argument(
        "--source",
        default="auto",
        choices=REPORT_SOURCES,
        help="snapshot source (auto: probe if the run has one, else train)",
    )
    parser.add_argument(
        "--top-m",
        type=int,
        default=None,
        help="expert-set size of the Jaccard overlap (default: k)",
    )
    parser.add_argument(
        "--basis",
        default="hard",
        choices=("hard", "dense"),
        help="heat maps/ternary on top-k shares (hard) or mean probabilities",
    )
    parser.add_argument("--title", default=ReportOptions.title)
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 1 on an input error (one ``error:`` line naming the file). Dump files of a
        run directory that cannot be parsed (empty, truncated) are skipped with one ``warning:``
        line per directory that names and counts them.
    """
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        # Skipped dump files (and any other warning) as one line each, not file:line + source.
        warnings.showwarning = _print_warning
        warnings.simplefilter("always", UnreadableDumpWarning)
        return _run(args)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def _run(args: argparse.Namespace) -> int:
    try:
        layers = parse_layers(args.layers) if args.layers else None
        options = ReportOptions(
            layers=layers, step=args.step, window=args.window, source=args.source,
            top_m=args.top_m, basis=args.basis, title=args.title,
        )  # fmt: skip
        runs = [
            load_report_run(name, path, options, args.label_map)
            for name, path in map(_parse_run, args.runs)
        ]
        index = write_report(runs, args.out, options)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
