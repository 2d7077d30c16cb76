"""Figures of the specialization report (matplotlib, no pyplot state: each function returns a
``matplotlib.figure.Figure`` drawn on the Agg canvas; the caller saves it).

Every figure compares runs side by side. Inputs are :class:`megatron_edl.analysis.metrics.
LayerMetrics` (or ``None`` where a run lacks the layer) and plain series; nothing here computes
a metric except the ternary projection, whose coordinates :func:`ternary_xy` defines.

Shape legend: D domains, E experts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from megatron_edl.analysis.metrics import LayerMetrics

__all__ = [
    "TERNARY_CORNERS",
    "fig_balance",
    "fig_divergence_by_layer",
    "fig_entropy",
    "fig_heatmaps",
    "fig_lm_loss",
    "fig_pairs",
    "fig_ternary",
    "fig_overview",
    "fig_vs_step",
    "ternary_xy",
]

TERNARY_CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
"""Plot coordinates of the corners of domains 0, 1, 2 (bottom left, bottom right, top)."""

_PANEL_W, _PANEL_H = 4.2, 3.2


def ternary_xy(mix_3E: np.ndarray) -> np.ndarray:
    """Project 3-domain mixes onto the triangle: point_e = Σ_d mix[d, e] · corner_d.

    An expert used only by domain d lies on d's corner; one used equally by all three at the
    centroid.

    Args:
        mix_3E: Columns summing to 1 (``metrics.expert_mix``), shape ``(3, E)``; NaN columns
            give NaN points.

    Returns:
        ``xy_E2``: the points, shape ``(E, 2)``.

    Raises:
        ValueError: If the first axis is not 3.
    """
    if mix_3E.ndim != 2 or mix_3E.shape[0] != 3:
        raise ValueError(f"ternary_xy needs a (3, E) mix, got shape {mix_3E.shape}")
    return mix_3E.T @ TERNARY_CORNERS


def _grid(rows: int, cols: int, *, width: float = _PANEL_W, height: float = _PANEL_H, **kw):
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _no_data(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _domain_ticks(ax, domains: Sequence[str], axis: str = "y") -> None:
    if len(domains) > 30:  # too many to label legibly
        return
    positions = np.arange(len(domains))
    if axis in ("y", "both"):
        ax.set_yticks(positions, labels=list(domains), fontsize=8)
    if axis in ("x", "both"):
        ax.set_xticks(positions, labels=list(domains), fontsize=8, rotation=90)


def fig_heatmaps(
    layer: int,
    runs: Mapping[str, LayerMetrics | None],
    domains: Sequence[str],
    *,
    basis: str = "hard",
) -> Figure:
    """Domain x expert load of one layer, one panel per run, one colour scale.

    Args:
        layer: The layer number (title).
        runs: Run name -> the layer's metrics (``None``: the run lacks the layer).
        domains: Domain names (rows).
        basis: ``"hard"`` (share of the domain's top-k assignments) or ``"dense"`` (mean
            routing probability).

    Returns:
        The figure.
    """
    fig, axes = _grid(1, len(runs), height=max(_PANEL_H, 0.25 * len(domains) + 1.5))
    _draw_heatmaps(fig, axes[0], layer, runs, domains, basis)
    return fig


def _draw_heatmaps(fig, axes, layer, runs, domains, basis) -> None:
    key = "load_hard_DE" if basis == "hard" else "load_dense_DE"
    values = [getattr(m, key) for m in runs.values() if m is not None]
    vmax = max((float(np.nanmax(v)) for v in values if np.isfinite(v).any()), default=1.0)
    image = None
    for ax, (name, metrics) in zip(axes, runs.items(), strict=True):
        if metrics is None:
            _no_data(ax, name)
            continue
        data_DE = getattr(metrics, key)
        image = ax.imshow(data_DE, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"{name}: layer {layer}")
        ax.set_xlabel("expert")
        ax.set_ylabel("domain")
        _domain_ticks(ax, domains)
        if data_DE.shape[1] <= 32:
            ax.set_xticks(np.arange(data_DE.shape[1]))
            ax.tick_params(axis="x", labelsize=7)
    if image is not None:
        label = "share of domain's top-k load" if basis == "hard" else "mean routing prob."
        fig.colorbar(image, ax=list(axes), label=label, shrink=0.9)


def fig_pairs(
    layer: int, runs: Mapping[str, LayerMetrics | None], domains: Sequence[str]
) -> Figure:
    """Pairwise JSD (dense, nats) and top-m Jaccard matrices of one layer, per run.

    Args:
        layer: The layer number (title).
        runs: Run name -> the layer's metrics (or ``None``).
        domains: Domain names.

    Returns:
        The figure (row 1: JSD, row 2: Jaccard).
    """
    size = max(_PANEL_H, 0.25 * len(domains) + 1.5)
    fig, axes = _grid(2, len(runs), width=size + 0.8, height=size)
    jsd_image = jac_image = None
    for col, (name, metrics) in enumerate(runs.items()):
        if metrics is None:
            _no_data(axes[0, col], name)
            _no_data(axes[1, col], name)
            continue
        jsd_image = axes[0, col].imshow(metrics.jsd_DD, cmap="magma", vmin=0, vmax=math.log(2))
        axes[0, col].set_title(f"{name}: JSD, layer {layer}")
        jac_image = axes[1, col].imshow(metrics.jaccard_DD, cmap="Blues", vmin=0, vmax=1)
        axes[1, col].set_title(f"{name}: top-{metrics.top_m} Jaccard")
        for row in (0, 1):
            _domain_ticks(axes[row, col], domains, "both")
    if jsd_image is not None:
        fig.colorbar(jsd_image, ax=axes[0].tolist(), label="JSD (nats, max ln 2)", shrink=0.9)
    if jac_image is not None:
        fig.colorbar(jac_image, ax=axes[1].tolist(), label="Jaccard", shrink=0.9)
    return fig


def fig_ternary(
    layer: int, runs: Mapping[str, LayerMetrics | None], domains: Sequence[str]
) -> Figure:
    """Ternary plot of one layer for three domains: one point per expert, per run.

    A point is the expert's load share across the three domains (``LayerMetrics.expert_mix_DE``),
    its area proportional to the expert's share of all top-k load; experts at a corner serve one
    domain only, experts near the centre serve all three alike.

    Args:
        layer: The layer number (title).
        runs: Run name -> the layer's metrics (or ``None``).
        domains: The three domain names (corners: bottom left, bottom right, top).

    Returns:
        The figure.

    Raises:
        ValueError: If there are not exactly three domains.
    """
    if len(domains) != 3:
        raise ValueError(f"a ternary plot needs 3 domains, got {len(domains)}: {list(domains)}")
    fig, axes = _grid(1, len(runs), width=_PANEL_H + 0.6, height=_PANEL_H + 0.4)
    for ax, (name, metrics) in zip(axes[0], runs.items(), strict=True):
        _draw_ternary(ax, f"{name}: layer {layer}", metrics, domains)
    return fig


def _draw_ternary(ax, title: str, metrics: LayerMetrics | None, domains: Sequence[str]) -> None:
    triangle = np.vstack([TERNARY_CORNERS, TERNARY_CORNERS[:1]])
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.plot(triangle[:, 0], triangle[:, 1], color="black", linewidth=1)
    ax.plot(*TERNARY_CORNERS.mean(axis=0), marker="+", color="grey", markersize=8)
    for corner, label, align in zip(
        TERNARY_CORNERS, domains, ("right", "left", "center"), strict=True
    ):
        offset = (0, 0.04) if align == "center" else (0, -0.07)
        ax.text(corner[0] + offset[0], corner[1] + offset[1], label, ha=align, fontsize=9)
    ax.set_xlim(-0.15, 1.15)
    ax.set_ylim(-0.12, 0.98)
    if metrics is None:
        ax.text(0.5, 0.3, "no data", ha="center")
        return
    xy_E2 = ternary_xy(metrics.expert_mix_DE)
    load_E = np.nansum(metrics.load_hard_DE * metrics.tokens_D[:, None], axis=0)
    share_E = load_E / load_E.sum() if load_E.sum() > 0 else np.zeros_like(load_E)
    sizes_E = 20 + 600 * share_E
    ax.scatter(xy_E2[:, 0], xy_E2[:, 1], s=sizes_E, alpha=0.7, edgecolors="black")
    if xy_E2.shape[0] <= 16:
        for e, (x, y) in enumerate(xy_E2):
            if np.isfinite(x):
                ax.annotate(str(e), (x, y), fontsize=7, ha="center", va="center")


def fig_vs_step(
    series: Mapping[str, Mapping[int, Sequence[tuple[int, float, float]]]],
    *,
    num_domains: int,
) -> Figure:
    """I(D;E) and mean JSD versus step, per layer, one column per run.

    Args:
        series: Run name -> layer -> ``[(step, mi, jsd_mean), ...]``.
        num_domains: D (the MI ceiling ln D is drawn).

    Returns:
        The figure (row 1: MI, row 2: mean JSD).
    """
    fig, axes = _grid(2, len(series), sharey="row")
    all_layers = sorted({layer for per_layer in series.values() for layer in per_layer})
    colours = _layer_colours(all_layers)
    for col, (name, per_layer) in enumerate(series.items()):
        for layer, points in sorted(per_layer.items()):
            if not points:
                continue
            steps, mi, jsd = (np.array(v, dtype=float) for v in zip(*points, strict=True))
            kw = dict(color=colours[layer], marker="o", markersize=3, label=f"layer {layer}")
            axes[0, col].plot(steps, mi, **kw)
            axes[1, col].plot(steps, jsd, **kw)
        axes[0, col].set_title(name)
        if num_domains > 1:
            axes[0, col].axhline(math.log(num_domains), color="grey", linestyle="--", lw=0.8)
        axes[1, col].axhline(math.log(2), color="grey", linestyle="--", lw=0.8)
        axes[1, col].set_xlabel("iteration")
        axes[1, col].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, col].set_ylabel("I(domain; expert) (nats)")
        axes[1, col].set_ylabel("mean pairwise JSD (nats)")
    if len(all_layers) <= 12:
        axes[0, -1].legend(fontsize=7)
    return fig


def _layer_colours(layers: Sequence[int]) -> dict[int, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    n = max(len(layers) - 1, 1)
    return {layer: cmap(0.9 * i / n) for i, layer in enumerate(layers)}


def _grouped_bars(ax, runs: Mapping[str, Sequence[LayerMetrics]], value, label: str) -> None:
    layers = sorted({m.layer for ms in runs.values() for m in ms})
    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(layers))
    for i, (name, metrics) in enumerate(runs.items()):
        by_layer = {m.layer: value(m) for m in metrics}
        heights = [by_layer.get(layer, np.nan) for layer in layers]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, labels=[str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel(label)


def fig_divergence_by_layer(runs: Mapping[str, Sequence[LayerMetrics]]) -> Figure:
    """I(D;E), mean JSD and mean top-m Jaccard per layer, runs as grouped bars.

    Args:
        runs: Run name -> the metrics of its layers (one step).

    Returns:
        The figure.
    """
    fig, axes = _grid(1, 3)
    _grouped_bars(axes[0, 0], runs, lambda m: m.mi, "I(domain; expert) (nats)")
    _grouped_bars(axes[0, 1], runs, lambda m: m.jsd_mean, "mean pairwise JSD (nats)")
    _grouped_bars(axes[0, 2], runs, lambda m: m.jaccard_mean, "mean top-m Jaccard")
    axes[0, 0].legend(fontsize=7)
    return fig


def fig_balance(runs: Mapping[str, Sequence[LayerMetrics]]) -> Figure:
    """Load balance per layer: max/mean, coefficient of variation, dead experts.

    Args:
        runs: Run name -> the metrics of its layers (one step).

    Returns:
        The figure.
    """
    fig, axes = _grid(1, 3)
    _grouped_bars(axes[0, 0], runs, lambda m: m.balance.max_over_mean, "max / mean load")
    axes[0, 0].axhline(1.0, color="grey", linestyle="--", lw=0.8)
    _grouped_bars(axes[0, 1], runs, lambda m: m.balance.cv, "coefficient of variation")
    _grouped_bars(axes[0, 2], runs, lambda m: m.balance.dead_experts, "dead experts")
    axes[0, 0].legend(fontsize=7)
    return fig


def fig_entropy(runs: Mapping[str, Sequence[LayerMetrics]], domains: Sequence[str]) -> Figure:
    """Routing entropy per layer (normalised by ln E): per token, and per domain's marginal.

    Args:
        runs: Run name -> the metrics of its layers (one step).
        domains: Domain names.

    Returns:
        The figure (left: mean per-token entropy; right: H(p̄_d) / ln E, one line per domain
        when there are at most 10 domains, else the mean with a min-max band).
    """
    fig, axes = _grid(1, 2, width=_PANEL_W + 1)
    styles = ["-", "--", ":", "-."]
    for i, (name, metrics) in enumerate(runs.items()):
        layers = [m.layer for m in metrics]
        style = styles[i % len(styles)]
        axes[0, 0].plot(layers, [m.token_entropy for m in metrics], style, marker="o", label=name)
        entropy_LD = np.array([m.domain_entropy_D for m in metrics])
        if entropy_LD.size == 0:
            continue
        if len(domains) <= 10:
            for d, domain in enumerate(domains):
                axes[0, 1].plot(
                    layers, entropy_LD[:, d], style, marker="o", color=f"C{d}",
                    label=f"{name}: {domain}",
                )  # fmt: skip
        else:
            with np.errstate(all="ignore"):
                axes[0, 1].plot(layers, np.nanmean(entropy_LD, axis=1), style, label=name)
                axes[0, 1].fill_between(
                    layers, np.nanmin(entropy_LD, axis=1), np.nanmax(entropy_LD, axis=1), alpha=0.2
                )
    axes[0, 0].set_ylabel("per-token entropy / ln E")
    axes[0, 1].set_ylabel("per-domain marginal entropy / ln E")
    for ax in axes[0]:
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    return fig


def fig_lm_loss(losses: Mapping[str, np.ndarray], domains: Sequence[str]) -> Figure:
    """Per-domain LM loss (probe), runs as grouped bars.

    Args:
        losses: Run name -> LM loss per domain (NaN where the domain had no tokens).
        domains: Domain names.

    Returns:
        The figure.
    """
    fig, axes = _grid(1, 1, width=max(_PANEL_W, 0.5 * len(domains) + 2))
    ax = axes[0, 0]
    width = 0.8 / max(len(losses), 1)
    x = np.arange(len(domains))
    for i, (name, loss_D) in enumerate(losses.items()):
        ax.bar(x + (i - (len(losses) - 1) / 2) * width, loss_D, width, label=name)
    ax.set_xticks(x, labels=list(domains), rotation=90 if len(domains) > 8 else 0)
    ax.set_ylabel("LM loss (nats/token)")
    ax.legend(fontsize=7)
    return fig


def fig_overview(
    layer: int,
    runs: Mapping[str, LayerMetrics | None],
    series: Mapping[str, Mapping[int, Sequence[tuple[int, float, float]]]],
    domains: Sequence[str],
    *,
    basis: str = "hard",
) -> Figure:
    """The report at a glance: one layer's heat maps (and ternary plots with three domains)
    per run, and I(D;E) versus step averaged over layers, per run.

    Args:
        layer: The layer of the heat maps and ternary plots.
        runs: Run name -> that layer's metrics (or ``None``).
        series: Run name -> layer -> ``[(step, mi, jsd_mean), ...]`` (training dumps).
        domains: Domain names.
        basis: Heat-map basis, as in :func:`fig_heatmaps`.

    Returns:
        The figure.
    """
    rows = 2 if len(domains) == 3 else 1
    fig = Figure(figsize=(_PANEL_W * (len(runs) + 1) + 0.8, _PANEL_H * rows), layout="constrained")
    grid = fig.add_gridspec(rows, len(runs) + 1)
    heat_axes = [fig.add_subplot(grid[0, i]) for i in range(len(runs))]
    _draw_heatmaps(fig, heat_axes, layer, runs, domains, basis)
    if rows == 2:
        for i, (name, metrics) in enumerate(runs.items()):
            _draw_ternary(fig.add_subplot(grid[1, i]), f"{name}: layer {layer}", metrics, domains)
    ax = fig.add_subplot(grid[:, len(runs)])
    for i, (name, per_layer) in enumerate(series.items()):
        by_step: dict[int, list[float]] = {}
        for points in per_layer.values():
            for step, mi, _ in points:
                by_step.setdefault(step, []).append(mi)
        steps = sorted(by_step)
        ax.plot(steps, [np.mean(by_step[s]) for s in steps], marker="o", ms=3, color=f"C{i}",
                label=name)  # fmt: skip
    if len(domains) > 1:
        ax.axhline(math.log(len(domains)), color="grey", linestyle="--", lw=0.8, label="ln D")
    ax.set_xlabel("iteration")
    ax.set_ylabel("I(domain; expert), mean over layers (nats)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return fig
