"""Run ``megatron_edl.pretrain_gpt --cpu`` on local ranks and read Megatron's iteration log lines.

The ranks are forks of a server that has imported Megatron once (:mod:`tests.helpers.launch_ranks`:
torchrun's environment, about 15 s less per run); ``launcher="torchrun"`` starts the run as a
user would, and is what the launcher's own smoke tests and every script entry use.

Used by the end-to-end tests: they assert on the parsed iteration numbers and losses, never on
the exit code alone (Megatron exits with code 0 on some failures, e.g. a failed RNG-state load).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from megatron_edl.benchmarks.runs import (  # the tiny model and the log parser, shared
    TINY_MOE_GPT,
    RunResult,
    free_port,
    parse_iterations,
    parse_validations,
)
from tests.helpers.launch_ranks import launch_ranks

__all__ = [
    "LAYOUTS",
    "TINY_MOE_GPT",
    "RunResult",
    "parse_iterations",
    "parse_validations",
    "run_pretrain",
    "run_pretrain_killed",
    "with_flag_values",
]

# Parallel layouts on 2 ranks (name -> extra flags).
LAYOUTS: dict[str, list[str]] = {
    "dp2": [],
    "ep2_allgather": "--expert-model-parallel-size 2 --moe-token-dispatcher-type allgather".split(),
    "ep2_alltoall": "--expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall".split(),
    "tp2_sp": "--tensor-model-parallel-size 2 --sequence-parallel".split(),
    "pp2": "--pipeline-model-parallel-size 2".split(),
}


def with_flag_values(flags: list[str] | tuple[str, ...], **values: str) -> list[str]:
    """``flags`` with the values of existing flags replaced (``eval_iters="2"``)."""
    out = list(flags)
    for name, value in values.items():
        out[out.index("--" + name.replace("_", "-")) + 1] = value
    return out


def run_pretrain(
    nproc: int,
    flags: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 300,
    cwd: Path | None = None,
    entry: tuple[str, ...] = ("-m", "megatron_edl.pretrain_gpt", "--cpu"),
    launcher: str = "fork",
) -> RunResult:
    """``torchrun --nproc-per-node nproc *entry *flags`` (default: our launcher on CPU), or
    the same on forked ranks (``launcher="fork"``, for a ``-m module`` entry)."""
    if launcher not in ("fork", "torchrun"):
        raise ValueError(f"launcher must be 'fork' or 'torchrun', got {launcher!r}")
    cmd, full_env = _pretrain_command(nproc, flags, env, entry)
    if launcher == "fork" and entry[0] == "-m":
        rc, log = launch_ranks(nproc, entry[1], [*entry[2:], *flags], full_env, timeout_s, cwd=cwd)
        return RunResult(returncode=rc, log=log, iterations=parse_iterations(log))
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
        )
        log, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        log = (
            out.decode() if isinstance(out, bytes) else out
        ) + f"\n[timed out after {timeout_s}s]"
        rc = -9
    return RunResult(returncode=rc, log=log, iterations=parse_iterations(log))


def _pretrain_command(
    nproc: int, flags: list[str], env: dict[str, str] | None, entry: tuple[str, ...]
) -> tuple[list[str], dict[str, str]]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        *entry,
        *flags,
    ]
    full_env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)),
        **(env or {}),
    }
    return cmd, full_env


def run_pretrain_killed(
    nproc: int,
    flags: list[str],
    kill_after: Callable[[str], bool],
    *,
    timeout_s: float = 300,
    entry: tuple[str, ...] = ("-m", "megatron_edl.pretrain_gpt", "--cpu"),
) -> RunResult:
    """:func:`run_pretrain`, killing every process of the run (SIGKILL to torchrun and all its
    descendants, as a node failure would) once ``kill_after(line)`` holds for a log line.

    ``returncode`` is -9 when it was killed (or timed out), else the run's exit status.
    """
    cmd, full_env = _pretrain_command(nproc, flags, {"PYTHONUNBUFFERED": "1"}, entry)
    process = subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    killed = threading.Event()

    def kill_all() -> None:
        for pid in [process.pid, *_descendants(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()

    def kill() -> None:
        killed.set()
        kill_all()

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    lines = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if not killed.is_set() and kill_after(line):
                kill()
        rc = process.wait()
    finally:
        timer.cancel()
        kill_all()
    log = "".join(lines)
    return RunResult(
        returncode=-9 if killed.is_set() else rc, log=log, iterations=parse_iterations(log)
    )


def _descendants(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (Linux ``/proc``), children first."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                out.extend(children)
                todo.extend(children)
    return out
