"""Run ``megatron_edl.pretrain_gpt --cpu`` under torchrun and read Megatron's iteration log lines.

Used by the end-to-end tests: they assert on the parsed iteration numbers and losses, never on
the exit code alone (Megatron exits with code 0 on some failures, e.g. a failed RNG-state load).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from tests.distributed import free_port

# A tiny MoE GPT: 2 layers, 4 experts, top-2, on mock data.
TINY_MOE_GPT = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 "
    "--seq-length 64 --max-position-embeddings 64 "
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 64 "
    "--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 "
    "--micro-batch-size 2 --global-batch-size 4 "
    "--lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 "
    "--weight-decay 0.01 --clip-grad 1.0 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 1024 "
    "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
    "--untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0 "
    "--log-interval 1 --eval-iters 0 --eval-interval 1000 --num-workers 0 --split 100,0,0 "
    "--seed 1234"
).split()

# Parallel layouts on 2 ranks (name -> extra flags).
LAYOUTS: dict[str, list[str]] = {
    "dp2": [],
    "ep2_allgather": "--expert-model-parallel-size 2 --moe-token-dispatcher-type allgather".split(),
    "ep2_alltoall": "--expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall".split(),
    "tp2_sp": "--tensor-model-parallel-size 2 --sequence-parallel".split(),
    "pp2": "--pipeline-model-parallel-size 2".split(),
}

_VALIDATION_RE = re.compile(r"validation(\S*) loss at (.*?) \| (.*)$")
_SHARE_RE = re.compile(r"(validation) (token shares) \| (.*)$")
_VALUE_RE = re.compile(r"\s*(.+?) value:\s*([-+0-9.eE]+|nan|inf)\s*$")
_ITERATION_RE = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|(.*)$")
_METRIC_RE = re.compile(r"\s*([^|:]+?):\s*([-+0-9.eE]+|nan|inf)\s*$")


@dataclasses.dataclass
class RunResult:
    returncode: int
    log: str
    iterations: dict[int, dict[str, float]]
    """Megatron's per-iteration log metrics, e.g. ``iterations[3]["lm loss"]``."""

    @property
    def validations(self) -> list[dict[str, float]]:
        """Every validation line's ``<key> value`` entries, in log order."""
        return parse_validations(self.log)

    def losses(self, name: str = "lm loss") -> list[float]:
        return [self.iterations[i][name] for i in sorted(self.iterations)]

    def describe(self) -> str:
        return f"rc={self.returncode}, iterations={sorted(self.iterations)}\n{self.log[-6000:]}"


def with_flag_values(flags: list[str] | tuple[str, ...], **values: str) -> list[str]:
    """``flags`` with the values of existing flags replaced (``eval_iters="2"``)."""
    out = list(flags)
    for name, value in values.items():
        out[out.index("--" + name.replace("_", "-")) + 1] = value
    return out


def parse_validations(log: str) -> list[dict[str, float]]:
    """The ``<key> value: X`` entries of every Megatron ``validation loss at ...`` line, with
    those of the token-share line printed just before it (``gpt.SHARE_LINE``)."""
    out = []
    shares: dict[str, float] = {}
    for line in log.splitlines():
        match = _VALIDATION_RE.search(line)
        share_line = _SHARE_RE.search(line)
        if match or share_line:
            fields = (_VALUE_RE.match(f) for f in (match or share_line).group(3).split("|"))
            values = {m.group(1).strip(): float(m.group(2)) for m in fields if m}
            if share_line:
                shares = values
            else:
                out.append({**values, **shares})
                shares = {}
    return out


def parse_iterations(log: str) -> dict[int, dict[str, float]]:
    """Every ``iteration N/M | name: value | ...`` line of a Megatron log, keyed by N."""
    out: dict[int, dict[str, float]] = {}
    for line in log.splitlines():
        match = _ITERATION_RE.search(line)
        if not match:
            continue
        metrics = {}
        for field in match.group(3).split("|"):
            m = _METRIC_RE.match(field)
            if m:
                metrics[m.group(1).strip()] = float(m.group(2))
        out[int(match.group(1))] = metrics
    return out


def run_pretrain(
    nproc: int,
    flags: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 300,
    cwd: Path | None = None,
    entry: tuple[str, ...] = ("-m", "megatron_edl.pretrain_gpt", "--cpu"),
) -> RunResult:
    """``torchrun --nproc-per-node nproc *entry *flags`` (default: our launcher on CPU)."""
    cmd, full_env = _pretrain_command(nproc, flags, env, entry)
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
