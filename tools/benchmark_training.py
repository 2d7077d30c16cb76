#!/usr/bin/env python
"""A training iteration through Megatron's real loop, EDL vs baseline (``pretrain_gpt --cpu``).

Each run is ``torchrun -m megatron_edl.pretrain_gpt --cpu`` with the tiny MoE GPT of the tests
(2 layers, H=64, 4 experts top-2, sequence 64, 2 micro-batches of 2, mock data; flags:
``megatron_edl.benchmarks.runs.TINY_MOE_GPT``), ``--log-interval 1`` so that Megatron's own
timer logs the ``elapsed time per iteration`` of every iteration. The baseline is that model as
it is (stock router with its aux loss, stock mock dataset); the EDL run adds ``--moe-edl-coeff
1e-2 --moe-edl-mock-domains 3`` (labelled mock dataset, labels pushed to the routers, the EDL
loss and its all-reduce in every layer, four more logged metrics). Runs alternate (A B B A ...);
a run's sample is the median of its iteration times after ``--skip`` warm-up iterations.

Prints per configuration the median [min, max] over runs of those medians, the ratio of the
median iteration times over all runs (target EDL / baseline <= 1.02), the per-round ratio, and
tokens per second. ``--memory`` adds Megatron's memory report at the last iteration
(``--log-memory-interval``) and prints the peak allocated memory of each configuration
(``torch.cuda.max_memory_allocated`` on rank 0, so 0 on CPU).

``--clock cpu`` (for shared machines) runs ``megatron_edl.benchmarks.cpu_clock_pretrain``
instead of the launcher: the same training, with Megatron's timers reading the process's CPU
time, and one torch thread per process, so other processes' load does not enter the figures.

Usage:
    python tools/benchmark_training.py                         # 4 rounds of 40 iterations
    python tools/benchmark_training.py --clock cpu --rounds 6 --iters 60
    python tools/benchmark_training.py --nproc 2 --extra "--expert-model-parallel-size 2"
    python tools/benchmark_training.py --rounds 1 --iters 4 --skip 2   # smoke test
    python tools/benchmark_training.py --device cuda --memory --extra "--bf16 --hidden-size 1024"
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys

from megatron_edl.benchmarks.harness import (
    Stats,
    Table,
    alternate,
    describe_machine,
    ratios,
)
from megatron_edl.benchmarks.runs import TINY_MOE_GPT, RunResult, free_port, parse_iterations

EDL_FLAGS = ["--moe-edl-coeff", "1e-2", "--moe-edl-mock-domains", "3"]
ITERATION_TIME = "elapsed time per iteration (ms)"
# Megatron's report_memory line: "... memory (MB) | allocated: A | max allocated: M | ..."
_PEAK_RE = re.compile(r"\| max allocated: ([0-9.]+)")
# Megatron's count of the built model's parameters (rank 0 holds them all with TP = PP = 1).
# megatron-core 0.19: "number of parameters on (tensor, gtp_remat, pipeline) model parallel
# rank (0, 0, 0): N".
_PARAMS_RE = re.compile(r"number of parameters on \([^)]*\) model parallel rank \([0, ]*\): (\d+)")
LAUNCHERS = {
    "wall": "megatron_edl.pretrain_gpt",
    "cpu": "megatron_edl.benchmarks.cpu_clock_pretrain",
}


def run_training(
    nproc: int, flags: list[str], *, clock: str, timeout_s: float, device: str = "cpu"
) -> RunResult:
    """``torchrun -m <launcher> [--cpu] *flags`` (launcher by ``clock``); the parsed log.

    ``device`` ``cpu`` runs the CPU launcher (``--cpu``, CUDA hidden); ``cuda`` runs the launcher
    as on a GPU cluster, one GPU per process.
    """
    cpu_flags = ["--cpu"] if device == "cpu" else []
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", "-m", LAUNCHERS[clock], *cpu_flags, *flags,
    ]  # fmt: skip
    threads = 1 if clock == "cpu" else max(1, (os.cpu_count() or 2) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        proc = subprocess.run(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout_s,
        )  # fmt: skip
        log, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        log = (out.decode() if isinstance(out, bytes) else out) + f"\n[timed out: {timeout_s} s]"
        rc = -9
    return RunResult(returncode=rc, log=log, iterations=parse_iterations(log))


def run_case(
    nproc: int,
    flags: list[str],
    iters: int,
    skip: int,
    clock: str,
    timeout_s: float,
    log: dict,
    device: str = "cpu",
    memory: bool = False,
):
    """A callable for the harness: one training run, returning its median iteration time (s).

    With ``memory`` the run logs Megatron's memory report at its last iteration, and the peak
    allocated MiB goes to ``log["peak_mib"]``.
    """
    memory_flags = ["--log-memory-interval", str(iters)] if memory else []

    def call() -> float:
        result = run_training(
            nproc,
            [*flags, "--train-iters", str(iters), "--log-interval", "1", *memory_flags],
            clock=clock,
            timeout_s=timeout_s,
            device=device,
        )
        times_ms = [
            result.iterations[i][ITERATION_TIME]
            for i in sorted(result.iterations)
            if i > skip and ITERATION_TIME in result.iterations[i]
        ]
        if result.returncode != 0 or len(times_ms) != iters - skip:
            raise RuntimeError(f"training run failed or logged too little:\n{result.describe()}")
        log.setdefault("iterations", []).extend(times_ms)
        log["parameters"] = [int(n) for n in _PARAMS_RE.findall(result.log)][:1]
        if memory:
            peaks = [float(m) for m in _PEAK_RE.findall(result.log)]
            if not peaks:
                raise RuntimeError(f"no memory report in the log:\n{result.describe()}")
            log.setdefault("peak_mib", []).append(peaks[-1])
        return statistics.median(times_ms) / 1e3

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (one run each)")
    parser.add_argument("--warmup-rounds", type=int, default=0, help="untimed rounds first")
    parser.add_argument("--iters", type=int, default=40, help="training iterations per run")
    parser.add_argument("--skip", type=int, default=10, help="warm-up iterations not counted")
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun)")
    parser.add_argument(
        "--extra", action="append", default=[],
        help="more Megatron flags for both runs (repeatable; a later flag overrides)",
    )  # fmt: skip
    parser.add_argument(
        "--memory", action="store_true",
        help="report each configuration's peak allocated memory (Megatron's memory report)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument(
        "--clock", choices=LAUNCHERS, default="wall",
        help="Megatron's timers on wall time, or on the process's CPU time (shared machines)",
    )  # fmt: skip
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cpu: the CPU launcher (--cpu); cuda: the launcher on GPUs (one per process)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu measures the host, not the GPU: use --clock wall")
    if args.skip >= args.iters:
        parser.error(f"--skip ({args.skip}) must be below --iters ({args.iters})")

    extra = shlex.split(" ".join(args.extra))
    base = [*TINY_MOE_GPT, *extra]
    configs = {"baseline": base, "edl": [*base, *EDL_FLAGS]}
    logs: dict[str, dict] = {name: {} for name in configs}
    cases = {
        name: run_case(
            args.nproc,
            flags,
            args.iters,
            args.skip,
            args.clock,
            args.timeout,
            logs[name],
            args.device,
            args.memory,
        )  # fmt: skip
        for name, flags in configs.items()
    }
    print(describe_machine(args.device))
    print(
        f"{args.nproc} process(es), {args.iters} iterations per run, first {args.skip} skipped, "
        f"{args.clock} clock"
    )
    print("flags: " + " ".join(base) + "  [edl: + " + " ".join(EDL_FLAGS) + "]", flush=True)
    samples = alternate(cases, repeats=args.rounds, warmup=args.warmup_rounds)
    for log in logs.values():  # warm-up rounds logged too: keep only the timed runs' share
        log["iterations"] = log["iterations"][-args.rounds * (args.iters - args.skip) :]

    tokens = _tokens_per_iteration(base)
    table = Table(
        f"Training iteration (tiny MoE GPT{' with --extra flags' if extra else ''}, "
        f"Megatron's timer, {args.clock} clock), ms",
        ["config", "runs", "median of run medians [min, max]", "median of all iterations",
         "tokens/s", *(["peak allocated (MiB), max over runs"] if args.memory else [])],
    )  # fmt: skip
    pooled = {name: statistics.median(log["iterations"]) for name, log in logs.items()}
    for name in configs:
        peak = [f"{max(logs[name]['peak_mib']):,.0f}"] if args.memory else []
        table.add(
            name,
            len(samples[name]),
            Stats.of(samples[name]).format(1e3, 1),
            f"{pooled[name]:.1f}",
            f"{tokens / (pooled[name] / 1e3):,.0f}",
            *peak,
        )
    table.print()
    if all(log.get("parameters") for log in logs.values()):
        model = Table("Model (Megatron's count of the built model)", ["config", "parameters"])
        for name, log in logs.items():
            model.add(name, f"{log['parameters'][0]:,}")
        model.print()
    ratio_table = Table(
        "Training iteration ratio edl / baseline (target <= 1.02)",
        ["ratio of median iteration times", "per-round ratios, median [min, max]"],
    )
    ratio_table.add(
        f"{pooled['edl'] / pooled['baseline']:.3f}",
        Stats.of(ratios(samples["edl"], samples["baseline"])).format(),
    )
    ratio_table.print()
    return 0


def _tokens_per_iteration(flags: list[str]) -> int:
    def value(name: str) -> int:
        return int(flags[len(flags) - 1 - flags[::-1].index(name) + 1])

    return value("--global-batch-size") * value("--seq-length")


if __name__ == "__main__":
    sys.exit(main())
