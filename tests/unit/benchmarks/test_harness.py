"""Smoke tests of the benchmark scripts (tools/benchmark_*.py) at tiny sizes.

Each script runs end to end and prints its Markdown tables; the tests read them back
(``harness.read_tables``) and check their structure: titles, columns, one row per measured
configuration, well-formed ``median [min, max]`` cells. Times are never asserted. Two things
are asserted because they are counts or arithmetic, not timings: the collectives EDL adds to an
MoE layer (exactly one all-reduce of D*E + D numbers where the statistics group has more than
one rank, none otherwise), and the training benchmark's ratio of stubbed iteration times.

To stay within a few seconds of CI, the router, MoE-layer and collectives scripts run in one
subprocess (one interpreter start, one megatron import; the collectives spawn two gloo ranks),
and the training script runs in-process with a stubbed ``run_pretrain`` (the real loop is
exercised by test_edl_pretrain.py); the CPU-clock launcher is checked to switch Megatron's timer
clock and then hand over to the real launcher.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_edl.benchmarks.harness import (
    Stats,
    Table,
    add_timing_args,
    alternate,
    ratios,
    read_tables,
    set_threads,
)
from tests.helpers.megatron_runs import RunResult, parse_iterations

ROOT = Path(__file__).resolve().parents[3]
STATS = re.compile(r"^-?\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]$")

DRIVER = """
import importlib.util

def load(name):
    spec = importlib.util.spec_from_file_location(name, f"tools/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

benchmark_collectives, benchmark_moe_layer, benchmark_router = map(
    load, ["benchmark_collectives", "benchmark_moe_layer", "benchmark_router"]
)
tiny = ["--tokens", "32", "--hidden", "16", "--experts", "8", "--topk", "2", "--repeats", "2",
        "--warmup", "1"]
benchmark_router.main([*tiny, "--domains", "3", "5"])
benchmark_router.main([*tiny, "--domains", "3", "--sweep", "--repeats", "1"])
benchmark_moe_layer.main([*tiny, "--ffn-hidden", "16", "--domains", "3", "--null",
                          "--configs", "stock", "edl", "aux", "aux+edl"])
benchmark_collectives.main(["--tokens", "32", "--hidden", "16", "--experts", "8",
                            "--topk", "2", "--domains", "3", "5"])
"""


def _run(args: list[str], timeout: float = 600) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def module_tables() -> dict[str, list[dict[str, str]]]:
    return read_tables(_run(["-c", DRIVER]))


def _table(tables, prefix: str) -> list[dict[str, str]]:
    matches = [rows for title, rows in tables.items() if title.startswith(prefix)]
    assert len(matches) == 1, (prefix, list(tables))
    return matches[0]


def test_router_benchmark_tables(module_tables):
    times = _table(module_tables, "Router forward+backward, ms per call")
    assert [(r["E"], r["D"]) for r in times] == [("8", "3"), ("8", "5")]
    for row in times:
        assert all(STATS.match(row[c]) for c in ("stock", "edl", "aux", "aux+edl")), row
    ratio_rows = _table(module_tables, "Router ratios")
    assert len(ratio_rows) == 2
    for row in ratio_rows:
        for column in ("edl / stock", "aux / stock", "aux+edl / aux"):
            assert STATS.match(row[column]), row
        float(row["EDL cost (ms)"])


def test_router_sweep_varies_one_parameter_at_a_time(module_tables):
    rows = _table(module_tables, "EDL cost (edl - stock")
    shapes = [(int(r["T"]), int(r["H"]), int(r["E"]), int(r["D"])) for r in rows]
    assert len(set(shapes)) == len(shapes) >= 8
    base = (32, 16, 8, 3)
    assert base in shapes
    for shape in shapes:  # each point differs from the base in at most one of T, H, E, D
        assert sum(a != b for a, b in zip(shape, base, strict=True)) <= 1, shape
    for row in rows:
        float(row["EDL cost (ms)"]), float(row["ns per T*E"])
        assert STATS.match(row["edl / stock"])


def test_moe_layer_benchmark_tables(module_tables):
    times = _table(module_tables, "MoE layer forward+backward")
    assert len(times) == 1 and all(
        STATS.match(times[0][c]) for c in ("stock", "edl", "aux", "aux+edl", "stock (copy)")
    )
    ratio_rows = _table(module_tables, "MoE layer ratios")
    columns = ("edl / stock", "aux / stock", "aux+edl / aux", "stock (copy) / stock")
    assert len(ratio_rows) == 1 and all(STATS.match(ratio_rows[0][c]) for c in columns)
    float(ratio_rows[0]["EDL cost (ms)"])


def test_edl_adds_one_all_reduce_of_d_e_plus_d_per_layer_and_micro_batch(module_tables):
    rows = _table(module_tables, "Extra collectives of EDL")
    seen = set()
    for row in rows:
        domains = int(row["D"])
        seen.add((row["layout"], domains, row["comparison"]))
        assert row["same extra on all ranks"] == "yes", row
        if row["layout"] == "dp-local":  # statistics over tp x cp = one rank: nothing to sum
            assert (row["extra calls"], row["extra elements"]) == ("0", "-"), row
        else:
            assert row["extra calls"] == "allreduce_ +1", row
            assert row["extra elements"] == str(domains * 8 + domains), row
    layouts = ("dp", "dp-local", "ep", "tp")
    comparisons = ("edl - stock", "aux+edl - aux")
    assert seen == {(lay, d, c) for lay in layouts for d in (3, 5) for c in comparisons}
    per_config = _table(module_tables, "Collectives per MoE layer per micro-batch")
    stock_dp = [r for r in per_config if (r["layout"], r["config"]) == ("dp", "stock")]
    assert [r["collective"] for r in stock_dp] == ["-", "-"]  # no collective at all, D = 3, 5


def test_preprocess_benchmark_tables(tmp_path):
    out = _run(
        [
            "tools/benchmark_preprocess.py", "--sizes-mb", "0.05", "--workers", "1",
            "--repeats", "1", "--skip-memory", "--seq-lengths", "64", "--fetch-samples", "4",
            "--fetch-rounds", "1", "--workdir", str(tmp_path),
        ]
    )  # fmt: skip
    tables = read_tables(out)
    timing = _table(tables, "Preprocessing time with / without domain handling")
    assert [r["clock"] for r in timing] == ["wall", "cpu"]
    assert all(STATS.match(r["ratio"]) for r in timing)
    fetch = _table(tables, "Sample fetch dataset[i]")
    assert [(r["S"], r["attention mask"]) for r in fetch] == [("64", "yes"), ("64", "no")]
    assert all(STATS.match(r["ratio"]) for r in fetch)


def test_domain_labels_benchmark_tables(tmp_path):
    out = _run(
        [
            "tools/benchmark_domain_labels.py", "--sizes-mb", "0.1", "--workers", "1",
            "--repeats", "1", "--clusters", "3", "--fit-sizes-mb", "0.1",
            "--workdir", str(tmp_path),
        ]
    )  # fmt: skip
    tables = read_tables(out)
    timing = _table(tables, "Preprocessing time with cluster labels (K = 3) / field labels")
    assert [r["clock"] for r in timing] == ["wall", "cpu"]
    assert all(STATS.match(r["throughput ratio"]) for r in timing)
    fits = _table(tables, "Fitting time, K = 3")
    assert [r["input"] for r in fits] == ["generated 0.1 MB"] and int(fits[0]["documents"]) > 3


def _load_training_tool():
    spec = importlib.util.spec_from_file_location(
        "benchmark_training", ROOT / "tools" / "benchmark_training.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_benchmark_ratio_of_median_iteration_times(monkeypatch, capsys):
    tool = _load_training_tool()
    calls = []

    def fake_run_training(nproc, flags, clock, timeout_s, device):
        assert device == "cpu"  # the default; --device cuda runs the launcher on GPUs
        edl = "--moe-edl-coeff" in flags
        calls.append((nproc, edl, flags[flags.index("--train-iters") + 1]))
        ms = [500.0, 300.0] + ([11.0, 13.0, 12.0] if edl else [10.0, 10.0, 9.0])
        log = "\n".join(
            f" [t] iteration {i + 1:8d}/{len(ms):8d} | consumed samples: {4 * (i + 1)} | "
            f"elapsed time per iteration (ms): {m:.1f} | lm loss: 6.9E+00 |"
            for i, m in enumerate(ms)
        )
        return RunResult(returncode=0, log=log, iterations=parse_iterations(log))

    monkeypatch.setattr(tool, "run_training", fake_run_training)
    assert tool.main(["--rounds", "2", "--iters", "5", "--skip", "2"]) == 0
    tables = read_tables(capsys.readouterr().out)
    # Alternated A B, B A; every run asked for 5 iterations.
    assert calls == [(1, False, "5"), (1, True, "5"), (1, True, "5"), (1, False, "5")]
    rows = _table(tables, "Training iteration (tiny MoE GPT")
    assert [r["config"] for r in rows] == ["baseline", "edl"]
    assert [r["median of all iterations"] for r in rows] == ["10.0", "12.0"]
    assert rows[0]["tokens/s"] == "25,600"  # 4 samples x 64 tokens / 10 ms
    (ratio,) = _table(tables, "Training iteration ratio edl / baseline")
    assert ratio["ratio of median iteration times"] == "1.200"
    assert ratio["per-round ratios, median [min, max]"] == "1.200 [1.200, 1.200]"


def test_cpu_clock_launcher_switches_megatron_timers_then_runs_the_launcher(monkeypatch):
    import time

    from megatron.core import timers

    import megatron_edl.pretrain_gpt
    from megatron_edl.benchmarks import cpu_clock_pretrain

    monkeypatch.setattr(timers, "time", timers.time)  # restored after the test
    ran = []
    monkeypatch.setattr(megatron_edl.pretrain_gpt, "main", lambda: ran.append(timers.time.time))
    cpu_clock_pretrain.main()
    assert ran == [time.process_time]


# ------------------------------------------------------------------------------------------
# The harness itself (pure Python)
# ------------------------------------------------------------------------------------------


def test_alternate_reverses_the_order_every_round_and_pairs_samples():
    order, clock = [], iter(range(1000))
    cases = {
        "a": lambda: order.append("a"),
        "b": lambda: order.append("b") or 2.5,  # reports its own measurement
        "c": lambda: order.append("c"),
    }
    samples = alternate(cases, repeats=3, warmup=1, clock=lambda: float(next(clock)))
    assert order == list("abccbaabccba")
    assert samples["b"] == [2.5, 2.5, 2.5]
    assert samples["a"] == [1.0, 1.0, 1.0] and samples["c"] == [1.0, 1.0, 1.0]
    assert ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="same rounds"):
        ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="repeats"):
        alternate(cases, repeats=0)


def test_stats_and_table_round_trip():
    assert Stats.of([3.0, 1.0, 2.0]).format(1e3, 1) == "2000.0 [1000.0, 3000.0]"
    table = Table("Title with | no pipes", ["x", "y"])
    table.add(1, "2.0 [1.0, 3.0]")
    with pytest.raises(ValueError, match="2 columns"):
        table.add(1)
    text = "noise\n" + table.render() + "\nmore noise\n"
    assert read_tables(text) == {"Title with | no pipes": [{"x": "1", "y": "2.0 [1.0, 3.0]"}]}


def test_timing_args_defaults_and_threads(monkeypatch):
    import argparse

    import torch

    parser = add_timing_args(argparse.ArgumentParser(), repeats=7, warmup=2)
    args = parser.parse_args([])
    assert (args.repeats, args.warmup, args.threads, args.clock) == (7, 2, None, "wall")
    assert parser.parse_args(["--clock", "cpu"]).clock == "cpu"
    with pytest.raises(SystemExit):
        parser.parse_args(["--clock", "gpu"])
    no_clock = add_timing_args(argparse.ArgumentParser(), repeats=1, warmup=0, clock=False)
    assert not hasattr(no_clock.parse_args([]), "clock")

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    set_threads(parser.parse_args([]))
    set_threads(parser.parse_args(["--threads", "3"]))
    assert calls == [3]
