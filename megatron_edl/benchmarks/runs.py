"""Megatron training runs as the benchmarks and the tests start them: the tiny MoE GPT's flags,
a free port for torchrun, and the run's log parsed into per-iteration metrics.

Shared by ``tools/benchmark_training.py`` (and, through it, the GPU check) and the tests'
``tests/helpers/megatron_runs.py``, which starts the runs. Pure Python; imports neither torch nor
megatron.
"""

from __future__ import annotations

import dataclasses
import re
import socket

__all__ = ["TINY_MOE_GPT", "RunResult", "free_port", "parse_iterations", "parse_validations"]

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

_VALIDATION_RE = re.compile(r"validation(\S*) loss at (.*?) \| (.*)$")
_SHARE_RE = re.compile(r"(validation) (token shares) \| (.*)$")
_VALUE_RE = re.compile(r"\s*(.+?) value:\s*([-+0-9.eE]+|nan|inf)\s*$")
_ITERATION_RE = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|(.*)$")
_METRIC_RE = re.compile(r"\s*([^|:]+?):\s*([-+0-9.eE]+|nan|inf)\s*$")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
