"""Benchmark discovered-domain labels: preprocessing with --domain-clusters against field labels.

Beside tools/benchmark_preprocess.py, with its corpus generator and preprocessing run
(megatron_edl.benchmarks.preprocessing) and the same harness (megatron_edl.benchmarks.harness:
alternated rounds, per-round ratios, median [min, max]). For each corpus size, a K-cluster
model is fitted on the corpus (megatron_edl.data.domain_clusters), then the same preprocessing
runs with cluster labels (``--domain-clusters``: TF-IDF features and the nearest centroid, per
chunk, in the workers) and with field labels (``--domain-field``), alternated, per worker count;
the ratio is the throughput of cluster labels over field labels (time with field labels / time
with cluster labels; target >= 0.5). Then the fitting time (wall and CPU: sampling, TF-IDF,
k-means, names) on corpora of the ``--fit-sizes-mb`` given, every document in the sample.

The generated text draws from four small word lists (megatron_edl.benchmarks.preprocessing):
its vocabulary is tiny, so the k-means part of the fit is cheaper than on real text (fewer
distinct terms per document); the reading and tokenising of the vectorizer, which dominate,
scale with the bytes.
``--fit-input`` fits on files of your own instead (the size is what they hold).

Usage:
    python tools/benchmark_domain_labels.py                      # 10 MB, 1 and 2 workers
    python tools/benchmark_domain_labels.py --sizes-mb 50 --workers 2 --repeats 5 \\
        --fit-sizes-mb 10 100 --clusters 32
    python tools/benchmark_domain_labels.py --skip-timing --fit-input 'corpus/*.jsonl.gz'
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from megatron_edl.benchmarks.harness import (
    Stats,
    Table,
    alternate,
    describe_machine,
    ratios,
)
from megatron_edl.benchmarks.preprocessing import (
    generate_corpus,
    run_once,
    tokenizer_args,
)
from megatron_edl.demo.tokenizer import train_tiny_tokenizer


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fit(inputs: list[str], clusters: int, sample_documents: int, max_chars: int | None = None):
    """Fit a model on ``inputs``; returns ``(model, wall seconds, CPU seconds)``."""
    from megatron_edl.data.domain_clusters import FitSettings, fit_from_inputs

    settings = FitSettings(num_clusters=clusters, sample_documents=sample_documents)
    if max_chars is not None:
        settings = dataclasses.replace(settings, max_chars=max_chars)
    cpu, start = _cpu_seconds(), time.perf_counter()
    model = fit_from_inputs(inputs, settings)
    return model, time.perf_counter() - start, _cpu_seconds() - cpu


def time_labels(corpora, worker_counts, repeats, clusters, workdir, tok_args) -> None:
    """Cluster labels against field labels, alternated, per corpus and worker count."""
    from megatron_edl.data.preprocess import ClusterLabel

    table = Table(
        f"Preprocessing time with cluster labels (K = {clusters}) / field labels, s, median "
        f"[min, max] over {repeats} alternated rounds; throughput ratio = field / clusters "
        "(target >= 0.5)",
        ["MiB", "workers", "clock", "clusters", "field", "throughput ratio", "tokens/s clusters"],
    )
    for size, corpus in corpora.items():
        model, _, _ = fit([str(corpus)], clusters, sample_documents=20_000)
        model_file = workdir / f"clusters_{size:g}mb.edlc"
        model.save(model_file)
        source = ClusterLabel(str(model_file))
        for workers in worker_counts:
            cpu: dict[str, list[float]] = {"clusters": [], "field": []}
            tokens: dict[str, int] = {}

            def case(name, label_source, corpus=corpus, workers=workers, cpu=cpu, tokens=tokens):
                def call() -> float:
                    wall, cpu_s, n = run_once(
                        corpus, workdir / "out", tok_args, True, workers, label_source=label_source
                    )
                    cpu[name].append(cpu_s)
                    tokens[name] = n
                    return wall

                return call

            wall = alternate(
                {"clusters": case("clusters", source), "field": case("field", None)},
                repeats=repeats,
                warmup=0,
            )
            assert tokens["clusters"] == tokens["field"]
            for clock, times in (("wall", wall), ("cpu", cpu)):
                rate = tokens["clusters"] / statistics.median(times["clusters"])
                table.add(
                    f"{size:g}",
                    workers,
                    clock,
                    Stats.of(times["clusters"]).format(),
                    Stats.of(times["field"]).format(),
                    Stats.of(ratios(times["field"], times["clusters"])).format(),
                    f"{rate:,.0f}",
                )
    table.print()


def time_fits(fit_inputs: dict[str, list[str]], clusters: int, max_chars: int | None) -> None:
    table = Table(
        f"Fitting time, K = {clusters}, every document in the sample, cut to "
        f"{max_chars or 'the default'} characters (target: 100 MB < 60 s)",
        ["input", "MiB", "documents", "MiB of text fitted", "terms", "wall s", "cpu s"],
    )
    for name, inputs in fit_inputs.items():
        size = sum(os.path.getsize(p) for p in inputs) / 2**20
        model, wall, cpu = fit(inputs, clusters, sample_documents=10**9, max_chars=max_chars)
        sample = model.header["sample"]
        table.add(
            name,
            f"{size:.1f}",
            sample["documents"],
            f"{sample['characters'] / 2**20:.1f}",
            sample["features"],
            f"{wall:.1f}",
            f"{cpu:.1f}",
        )
    table.print()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[10])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="Timed pairs per configuration.")
    parser.add_argument("--clusters", type=int, default=16, help="K of the fitted models.")
    parser.add_argument("--fit-sizes-mb", type=float, nargs="*", default=[10])
    parser.add_argument("--fit-input", nargs="+", help="Fit on these files instead.")
    parser.add_argument(
        "--fit-max-chars", type=int, help="Characters per document in the fit (default: 10,000)."
    )
    parser.add_argument("--tokenizer-model", help="HF tokenizer folder (default: train a tiny one)")
    parser.add_argument("--workdir", help="Scratch folder (default: a temporary one)")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edl-bench-labels-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(describe_machine("cpu"))

    def corpus(size: float) -> Path:
        path = workdir / f"corpus_{size:g}mb.jsonl"
        if not path.exists():
            docs = generate_corpus(path, size)
            print(f"corpus {path.name}: {path.stat().st_size / 2**20:.1f} MiB, {docs} documents")
        return path

    if not args.skip_timing:
        tokenizer_dir = args.tokenizer_model or str(train_tiny_tokenizer(workdir / "tokenizer"))
        tok_args = tokenizer_args(tokenizer_dir)
        print(f"tokenizer {tokenizer_dir}")
        corpora = {size: corpus(size) for size in args.sizes_mb}
        time_labels(corpora, args.workers, args.repeats, args.clusters, workdir, tok_args)
    if args.fit_input:
        from megatron_edl.data.readers import expand_inputs

        time_fits({"--fit-input": expand_inputs(args.fit_input)}, args.clusters, args.fit_max_chars)
    elif args.fit_sizes_mb:
        generated = {f"generated {s:g} MB": [str(corpus(s))] for s in args.fit_sizes_mb}
        time_fits(generated, args.clusters, args.fit_max_chars)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
