"""The report tool on synthetic runs: every figure, an HTML that links only existing files, data
files with every metric, the ternary projection, label-map grouping.

Shape legend: L layers, D domains, E experts.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from megatron_edl.analysis import metrics, plots, report
from megatron_edl.analysis.routing_stats import write_stats
from tests.helpers.routing_stats_helpers import html_links, specialised_loads, stats_from_loads

DOMAINS = ("web", "code", "math")


def _write_run(directory: Path, strengths: list[float], *, probe_loss=None) -> None:
    """Two pipeline stages (layer 1 | layers 2-3), one training dump per strength."""
    tokens_LD = np.array([[30.0, 20.0, 10.0]] * 3)
    for i, strength in enumerate(strengths):
        stats = stats_from_loads(
            specialised_loads(3, 3, 6, strength), tokens_LD, domains=DOMAINS, step=10 * (i + 1)
        )
        write_stats(stats.select_layers([1]), directory, part="l001")
        write_stats(stats.select_layers([2, 3]), directory, part="l002")
    if probe_loss is not None:
        probe = stats_from_loads(
            specialised_loads(3, 3, 6, strengths[-1]), tokens_LD, domains=DOMAINS,
            step=10 * len(strengths), source="probe", lm_loss_D=np.array(probe_loss),
        )  # fmt: skip
        write_stats(probe, directory / "probe")


def test_report_writes_every_figure_and_only_links_existing_files(tmp_path) -> None:
    _write_run(tmp_path / "base", [0.0, 0.05, 0.1])
    _write_run(tmp_path / "edl", [0.2, 0.5, 0.9], probe_loss=[2.0, 3.0, 4.0])
    out = tmp_path / "report"
    status = report.main([
        "--out", str(out), f"baseline={tmp_path / 'base'}", f"edl={tmp_path / 'edl'}",
        f"edl-probe={tmp_path / 'edl' / 'probe'}",
    ])  # fmt: skip
    assert status == 0

    figures = {p.name for p in (out / "figures").iterdir()}
    expected = {
        *(f"{kind}_layer{layer:03d}.png" for kind in ("heatmap", "ternary", "pairs")
          for layer in (1, 2, 3)),
        "mi_jsd_vs_step.png", "divergence_by_layer.png", "balance.png", "entropy.png",
        "lm_loss.png", "overview.png",
    }  # fmt: skip
    assert figures == expected
    for name in figures:
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    links = html_links(out / "index.html")
    assert links, "the report links nothing"
    for link in links:
        assert not link.startswith(("http:", "https:", "/")), link
        assert (out / link).is_file(), f"the HTML references a missing file: {link}"
    assert {f"figures/{name}" for name in figures} <= set(links)  # every figure is shown

    document = json.loads((out / "metrics.json").read_text())  # strict JSON (no NaN)
    assert set(document["runs"]) == {"baseline", "edl", "edl-probe"}
    snapshot = document["runs"]["edl"]["snapshot"]
    assert snapshot["step"] == 30 and [m["layer"] for m in snapshot["layers"]] == [1, 2, 3]
    assert len(snapshot["layers"][0]["jsd_DD"]) == 3
    with open(out / "series.csv") as f:
        series = list(csv.DictReader(f))
    assert len(series) == 3 * 3 + 3 * 3 + 3  # 3 dumps x 3 layers per run, probe: 3 layers
    with open(out / "snapshot.csv") as f:
        snap = {(r["run"], r["layer"]): r for r in csv.DictReader(f)}
    assert float(snap["edl", "1"]["mi"]) > float(snap["baseline", "1"]["mi"])
    with open(out / "snapshot_domains.csv") as f:
        losses = [float(r["lm_loss"]) for r in csv.DictReader(f) if r["run"] == "edl-probe"]
    assert losses[:3] == [2.0, 3.0, 4.0]
    # The training curve: MI rises with the strength of specialisation in the EDL run.
    edl_mi = [float(r["mi"]) for r in series if r["run"] == "edl" and r["layer"] == "1"]
    assert edl_mi == sorted(edl_mi) and edl_mi[0] < edl_mi[-1]


def test_ternary_point_of_a_single_domain_expert_is_at_its_corner() -> None:
    # Expert 0: domain "web" only; expert 1: "code" only; expert 2: "math" only; expert 3: all
    # three alike (relative to each domain's size).
    loads_LDE = np.array([[
        [0.5, 0.0, 0.0, 0.5],
        [0.0, 0.5, 0.0, 0.5],
        [0.0, 0.0, 0.5, 0.5],
    ]])  # fmt: skip
    layer = metrics.layer_metrics(stats_from_loads(loads_LDE, [[60, 30, 10]], topk=1), 1)
    fig = plots.fig_ternary(1, {"run": layer}, DOMAINS)
    points_E2 = np.asarray(fig.axes[0].collections[0].get_offsets())
    np.testing.assert_allclose(points_E2[:3], plots.TERNARY_CORNERS, atol=1e-12)
    np.testing.assert_allclose(points_E2[3], plots.TERNARY_CORNERS.mean(axis=0), atol=1e-12)
    # The pure projection: a vertex for a one-hot mix.
    np.testing.assert_allclose(plots.ternary_xy(np.eye(3)), plots.TERNARY_CORNERS)
    with pytest.raises(ValueError, match="3 domains"):
        plots.fig_ternary(1, {"run": layer}, ("a", "b"))


def test_label_map_groups_fine_domains_for_the_ternary_plot(tmp_path) -> None:
    fine = ("en/a", "en/b", "zh/a", "zh/b", "math", "ads")
    loads_LDE = np.random.default_rng(1).dirichlet(np.ones(4), size=(2, 6))
    stats = stats_from_loads(loads_LDE, np.full((2, 6), 10.0), domains=fine)
    write_stats(stats, tmp_path / "run")
    label_map = tmp_path / "coarse.yaml"
    label_map.write_text(
        "domains: [english, chinese, math]\nmap: {'en/*': english, 'zh/*': chinese, "
        "math: math, ads: null}\n"
    )
    out = tmp_path / "report"
    assert report.main(["--out", str(out), "--label-map", str(label_map), "--layers", "2",
                        str(tmp_path / "run")]) == 0  # fmt: skip
    figures = {p.name for p in (out / "figures").iterdir()}
    assert "ternary_layer002.png" in figures and "heatmap_layer001.png" not in figures
    document = json.loads((out / "metrics.json").read_text())
    assert document["domains"] == ["english", "chinese", "math"]
    (layer2,) = [m for m in document["runs"]["run"]["snapshot"]["layers"] if m["layer"] == 2]
    assert layer2["tokens_D"] == [20.0, 20.0, 10.0]
    # Without the map there are six domains: no ternary plot.
    assert report.main(["--out", str(tmp_path / "fine"), str(tmp_path / "run")]) == 0
    assert not list((tmp_path / "fine" / "figures").glob("ternary_*"))


def test_runs_with_different_domains_are_refused(tmp_path, capsys) -> None:
    write_stats(stats_from_loads(specialised_loads(1, 2, 4, 0.5), [[1, 1]]), tmp_path / "a")
    write_stats(
        stats_from_loads(specialised_loads(1, 2, 4, 0.5), [[1, 1]], domains=("x", "y")),
        tmp_path / "b",
    )
    assert report.main(["--out", str(tmp_path / "r"), str(tmp_path / "a"), str(tmp_path / "b")])
    assert "different domains" in capsys.readouterr().err
    assert math.isnan(metrics.mean_over_pairs(np.full((2, 2), np.nan)))
