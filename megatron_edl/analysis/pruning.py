"""Pruning curves: the per-domain LM loss increase when each domain keeps m experts.

Reads the masked evaluation's results (:mod:`megatron_edl.integration.pruning`, one entry per
(ranking, m), the first one keeping every expert) and gives, per ranking and m, each domain's
loss increase over the full model and their mean over the domains with validation tokens; a
Markdown table and a plot of the mean increase against m (one line per ranking, the per-domain
curves of the domain ranking thin behind it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_edl.analysis.routing_stats import atomic_write

__all__ = ["curves", "markdown_table", "plot_curves"]


def curves(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Loss increases of every (ranking, m) over the full model.

    Args:
        results: The masked evaluation's entries: ``name``, ``ranking`` (``None`` for the full
            model), ``keep``, ``lm_loss``, ``lm_loss_per_domain``.

    Returns:
        ``{"full": {"keep", "lm_loss", "lm_loss_per_domain"}, "curves": {ranking: [{"keep",
        "mean_increase", "increase_per_domain", "lm_loss"}], ...}}``, keep descending; a domain
        without validation tokens (loss ``None``) is left out of the mean.

    Raises:
        ValueError: no entry keeps every expert (ranking ``None``).
    """
    full = next((r for r in results if r.get("ranking") is None), None)
    if full is None:
        raise ValueError("the masked evaluation has no full-model entry (ranking null)")
    base_D = full["lm_loss_per_domain"]
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in results:
        ranking = entry.get("ranking")
        if ranking is None:
            continue
        increase_D = {
            d: loss - base_D[d]
            for d, loss in entry["lm_loss_per_domain"].items()
            if loss is not None and base_D.get(d) is not None
        }
        mean = sum(increase_D.values()) / len(increase_D) if increase_D else None
        out.setdefault(ranking, []).append(
            {
                "keep": entry["keep"],
                "lm_loss": entry.get("lm_loss"),
                "mean_increase": mean,
                "increase_per_domain": increase_D,
            }
        )
    for points in out.values():
        points.sort(key=lambda p: -p["keep"])
    return {
        "full": {k: full.get(k) for k in ("keep", "lm_loss", "lm_loss_per_domain")},
        "curves": out,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.3f}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """Rows: m; columns: the mean loss increase (nats) of each ranking."""
    rankings = list(summary["curves"])
    keeps = sorted({p["keep"] for pts in summary["curves"].values() for p in pts}, reverse=True)
    full = summary["full"]
    lines = [
        f"Full model (m = {full['keep']}): LM loss {full['lm_loss']:.3f}"
        if full.get("lm_loss") is not None
        else f"Full model (m = {full['keep']})",
        "",
        "| experts kept per domain (m) | " + " | ".join(f"{r} ranking" for r in rankings) + " |",
        "| --- |" + " --- |" * len(rankings),
    ]
    for keep in keeps:
        cells = []
        for ranking in rankings:
            point = next((p for p in summary["curves"][ranking] if p["keep"] == keep), None)
            cells.append(_fmt(point and point["mean_increase"]))
        lines.append(f"| {keep} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean over domains of the validation LM-loss increase over the full model (nats).")
    return "\n".join(lines)


def plot_curves(summary: Mapping[str, Any], path: str | os.PathLike, *, title: str = "") -> None:
    """Mean loss increase against m per ranking; per-domain curves of the domain ranking, thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    full_keep = summary["full"]["keep"]
    domain_points = summary["curves"].get("domain", [])
    domains = sorted({d for p in domain_points for d in p["increase_per_domain"]})
    for d in domains:
        xs = [full_keep] + [p["keep"] for p in domain_points if d in p["increase_per_domain"]]
        ys = [0.0] + [
            p["increase_per_domain"][d] for p in domain_points if d in p["increase_per_domain"]
        ]
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, linewidth=0.8)
    for ranking, points in summary["curves"].items():
        xs = [full_keep] + [p["keep"] for p in points]
        ys = [0.0] + [p["mean_increase"] for p in points]
        ax.plot(xs, ys, marker="o", label=f"{ranking} ranking (mean over domains)")
    ax.set_xscale("log", base=2)
    ax.invert_xaxis()
    ax.set_xlabel("experts kept per domain (m)")
    ax.set_ylabel("validation LM loss increase (nats)")
    ax.set_title(title or "Domain expert pruning")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
