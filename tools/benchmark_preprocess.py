"""Benchmark preprocessing with domain labels against the same run without domain handling.

Generates labelled JSONL corpora of the given sizes, then times ``preprocess`` with
``--domain-field`` against the identical run with domain handling switched off (the hidden
``--no-domains`` switch: no label extraction, no vocabulary, no sidecar), alternating the two
(A B B A ...) so that drift affects both alike, for each worker count. Peak memory is measured
in fresh processes per configuration: ``ru_maxrss`` of the main process (and its growth over
its state just before the run) and of the largest worker; and, in a separate run (tracemalloc's
own bookkeeping inflates RSS), the tracemalloc peak of the main process's Python heap.

Sample fetch: the first corpus, preprocessed with domains, is read through Megatron's
``GPTDataset`` and through ``DomainGPTDataset`` (the same samples plus ``domain_ids`` and
``edl_weights``), built with the same config by ``BlendedMegatronDatasetBuilder``; the time of
``dataset[i]`` over the same sample indices is compared, alternated, for each sequence length,
with and without the causal attention mask that Megatron builds in the data loader by default.

Timing uses megatron_edl.benchmarks.harness (alternated rounds, per-round ratios,
median [min, max]); tables are printed in Markdown (docs/BENCHMARKS.md).

The tokenizer is the tests' byte-level BPE trained on the spot (tests/helpers/data_helpers.py), or
any HuggingFace tokenizer folder given with --tokenizer-model; nothing downloads. The generated
corpus and the timed run are megatron_edl.benchmarks.preprocessing (shared with
tools/benchmark_domain_labels.py).

Usage:
    python tools/benchmark_preprocess.py                       # 10 and 50 MB, 1 and 2 workers
    python tools/benchmark_preprocess.py --sizes-mb 10 200 --workers 1 2 4 --repeats 5
    python tools/benchmark_preprocess.py --tokenizer-model ./my_hf_tokenizer --workdir /scratch
    python tools/benchmark_preprocess.py --skip-timing --skip-memory --seq-lengths 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path

from megatron_edl.benchmarks.harness import (
    CLOCKS,
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


class _RssSampler(threading.Thread):
    """Samples this process's resident set size (Linux ``/proc/self/statm``); keeps the peak."""

    def __init__(self, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = self.current()
        self._done = threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            self.peak = max(self.peak, self.current())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, self.current())


def memory_child(spec: dict) -> dict:
    """Run once in this (fresh) process and report its memory figures (MiB)."""
    tok_args = tokenizer_args(spec["tokenizer_dir"])
    from megatron_edl.data.preprocess import build_megatron_tokenizer

    build_megatron_tokenizer(tok_args)  # imports and tokenizer load count as baseline
    run = (Path(spec["corpus"]), Path(spec["out_dir"]), tok_args, spec["domains"], spec["workers"])
    if spec["tracemalloc"]:  # its own bookkeeping inflates RSS: measured in separate runs
        tracemalloc.start()
        _, _, tokens = run_once(*run)
        _, heap_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"heap_peak_mb": heap_peak / 2**20, "tokens": tokens}
    sampler = _RssSampler()
    before = sampler.current()
    sampler.start()
    _, _, tokens = run_once(*run)
    peak = sampler.stop()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "main_rss_before_mb": before / 2**20,
        "main_rss_peak_mb": peak / 2**20,
        "worker_rss_peak_mb": children / 2**20 if spec["workers"] > 1 else None,
        "tokens": tokens,
    }


def measure_memory(spec: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_runs(corpora: dict, worker_counts: list[int], repeats: int, workdir: Path, tok_args):
    """Wall and CPU time with and without domain handling, alternated, per configuration."""
    table = Table(
        "Preprocessing time with / without domain handling, s, median [min, max] over "
        f"{repeats} alternated rounds (target ratio <= 1.03)",
        ["MiB", "workers", "clock", "with domains", "without", "ratio", "tokens/s with, without"],
    )
    for size, corpus in corpora.items():
        for workers in worker_counts:
            cpu: dict[bool, list[float]] = {True: [], False: []}
            tokens: dict[bool, int] = {}

            def case(domains: bool, corpus=corpus, workers=workers, cpu=cpu, tokens=tokens):
                def call() -> float:
                    wall, cpu_s, n = run_once(corpus, workdir / "out", tok_args, domains, workers)
                    cpu[domains].append(cpu_s)
                    tokens[domains] = n
                    return wall

                return call

            wall = alternate(
                {"with": case(True), "without": case(False)}, repeats=repeats, warmup=0
            )
            assert tokens[True] == tokens[False]
            for clock, times in (
                ("wall", wall),
                ("cpu", {"with": cpu[True], "without": cpu[False]}),
            ):
                rate = [tokens[True] / statistics.median(times[k]) for k in ("with", "without")]
                table.add(
                    f"{size:g}",
                    workers,
                    clock,
                    Stats.of(times["with"]).format(),
                    Stats.of(times["without"]).format(),
                    Stats.of(ratios(times["with"], times["without"])).format(),
                    f"{rate[0]:,.0f}, {rate[1]:,.0f}",
                )
    table.print()


def time_sample_fetch(
    prefix: str,
    tok_args,
    seq_lengths: list[int],
    samples: int,
    rounds: int,
    workdir: Path,
    clock: str = "wall",
):
    """``DomainGPTDataset[i]`` vs ``GPTDataset[i]`` over the same indices, alternated."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_edl.data.preprocess import build_megatron_tokenizer
    from megatron_edl.integration.dataset import DomainGPTDataset, DomainGPTDatasetConfig

    tokenizer = build_megatron_tokenizer(tok_args)
    table = Table(
        f"Sample fetch dataset[i], us per sample ({clock} clock), median [min, max] over "
        f"{rounds} alternated rounds of {samples} samples (target ratio <= 1.2)",
        ["S", "attention mask", "GPTDataset", "DomainGPTDataset", "ratio"],
    )
    for seq in seq_lengths:
        for mask in (True, False):
            datasets = {}
            for name, cls, config_cls in (
                ("GPTDataset", GPTDataset, GPTDatasetConfig),
                ("DomainGPTDataset", DomainGPTDataset, DomainGPTDatasetConfig),
            ):
                config = config_cls(
                    random_seed=1,
                    sequence_length=seq,
                    blend=([prefix], None),
                    split="100,0,0",
                    tokenizer=tokenizer,
                    reset_position_ids=False,
                    reset_attention_mask=False,
                    eod_mask_loss=False,
                    create_attention_mask=mask,
                    path_to_cache=str(workdir / "index-cache"),
                )
                builder = BlendedMegatronDatasetBuilder(cls, [samples, 0, 0], lambda: True, config)
                datasets[name] = builder.build()[0]
            count = min(samples, *(len(d) for d in datasets.values()))

            def fetch(dataset, count=count):
                def call() -> None:
                    for i in range(count):
                        dataset[i]

                return call

            times = alternate(
                {name: fetch(d) for name, d in datasets.items()},
                repeats=rounds,
                warmup=1,
                clock=CLOCKS[clock],
            )
            table.add(
                seq,
                "yes" if mask else "no",
                Stats.of(times["GPTDataset"]).format(1e6 / count, 1),
                Stats.of(times["DomainGPTDataset"]).format(1e6 / count, 1),
                Stats.of(ratios(times["DomainGPTDataset"], times["GPTDataset"])).format(),
            )
    table.print()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 50])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="Timed pairs per configuration.")
    parser.add_argument("--tokenizer-model", help="HF tokenizer folder (default: train a tiny one)")
    parser.add_argument("--workdir", help="Scratch folder (default: a temporary one)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-fetch", action="store_true", help="no sample-fetch comparison")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--fetch-samples", type=int, default=200, help="samples per round")
    parser.add_argument("--fetch-rounds", type=int, default=10)
    parser.add_argument(
        "--fetch-clock", choices=CLOCKS, default="wall",
        help="sample fetch: wall time, or this process's CPU time (shared machines)",
    )  # fmt: skip
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0

    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edl-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = args.tokenizer_model or str(train_tiny_tokenizer(workdir / "tokenizer"))
    tok_args = tokenizer_args(tokenizer_dir)
    print(describe_machine("cpu"))
    print(f"tokenizer {tokenizer_dir}")

    corpora = {}
    for size in args.sizes_mb:
        path = workdir / f"corpus_{size:g}mb.jsonl"
        docs = generate_corpus(path, size)
        corpora[size] = path
        print(f"corpus {path.name}: {path.stat().st_size / 2**20:.1f} MiB, {docs} documents")

    if not args.skip_timing:
        run_once(corpora[args.sizes_mb[0]], workdir / "warmup", tok_args, True, 1)
        time_runs(corpora, args.workers, args.repeats, workdir, tok_args)

    if not args.skip_fetch:
        first = corpora[args.sizes_mb[0]]
        run_once(first, workdir / "indexed", tok_args, True, 1, keep=True)
        prefix = str(workdir / "indexed" / "bench_text_document")
        time_sample_fetch(
            prefix,
            tok_args,
            args.seq_lengths,
            args.fetch_samples,
            args.fetch_rounds,
            workdir,
            args.fetch_clock,
        )

    if not args.skip_memory:
        memory = Table(
            "Preprocessing memory, MiB, fresh process per row: main-process RSS before the run, "
            "its peak during it (sampled every 5 ms) and growth, the largest worker's peak RSS, "
            "the tracemalloc peak of the main process's Python heap (separate run)",
            ["MiB", "workers", "domains", "RSS before", "peak", "growth", "worker RSS", "py heap"],
        )
        for size, corpus in corpora.items():
            for workers in args.workers:
                for domains in (True, False):
                    spec = {
                        "tokenizer_dir": tokenizer_dir,
                        "corpus": str(corpus),
                        "out_dir": str(workdir / "mem"),
                        "domains": domains,
                        "workers": workers,
                    }
                    m = measure_memory({**spec, "tracemalloc": False})
                    m.update(measure_memory({**spec, "tracemalloc": True}))
                    worker = m["worker_rss_peak_mb"]
                    memory.add(
                        f"{size:g}",
                        workers,
                        "yes" if domains else "no",
                        f"{m['main_rss_before_mb']:.0f}",
                        f"{m['main_rss_peak_mb']:.0f}",
                        f"{m['main_rss_peak_mb'] - m['main_rss_before_mb']:.1f}",
                        f"{worker:.0f}" if worker else "-",
                        f"{m['heap_peak_mb']:.1f}",
                    )
        memory.print()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
