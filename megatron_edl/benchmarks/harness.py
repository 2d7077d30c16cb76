"""Alternated A/B measurement: the timing discipline every EDL benchmark script shares.

On a shared or throttling machine absolute times drift by tens of percent from one minute to the
next, so a benchmark that times configuration A for a while and then B measures the drift as much
as the difference. Here every *round* runs each configuration once, in an order that reverses
from one round to the next (A B C, C B A, A B C, ...), after a few untimed warm-up rounds. A
ratio is then taken *per round* (B_r / A_r, two measurements a fraction of a second apart) and
summarised by its median, minimum and maximum over the rounds: drift slower than a round cancels,
and the spread of the ratios shows how much to trust the median.

A measured callable either returns ``None`` (the harness times the call with
``time.perf_counter``, calling ``sync`` before and after: ``torch.cuda.synchronize`` on a GPU) or
returns its own measurement as a float (seconds): a training run that reports the median of its
per-iteration times, a preprocessing run that reports CPU seconds.

Results are printed as Markdown tables (:class:`Table`), so they paste into docs/BENCHMARKS.md as
they are and the smoke tests can read them back (:func:`read_tables`) and check their structure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "CLOCKS",
    "add_timing_args",
    "Stats",
    "Table",
    "alternate",
    "describe_machine",
    "ratios",
    "read_tables",
    "set_threads",
]


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""The ``--clock`` choices of the scripts. ``cpu`` (user + system time of this process) is
immune to the time slices other processes take on a shared machine; with one torch thread it
is the work itself, with several it also counts threads spinning at a barrier. A GPU needs
``wall`` (with a synchronize)."""


@dataclasses.dataclass(frozen=True)
class Stats:
    """Median, minimum and maximum of a sample (at least one value)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """Summarise ``values``.

        Raises:
            ValueError: If ``values`` is empty.
        """
        if not values:
            raise ValueError("cannot summarise an empty sample")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def format(self, scale: float = 1.0, digits: int = 3) -> str:
        """``median [min, max]``, each multiplied by ``scale`` (1e3: seconds -> ms)."""
        m, lo, hi = (v * scale for v in (self.median, self.min, self.max))
        return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def alternate(
    cases: Mapping[str, Callable[[], float | None]],
    *,
    repeats: int,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Run every case once per round, alternating the order, and collect one sample per round.

    Round r runs the cases in their mapping order when r is even and in reverse order when r is
    odd, so each case is as often first as last. ``warmup`` untimed rounds come first (in the
    same alternating order).

    Args:
        cases: Name -> callable. A callable that returns a float reports its own measurement
            (seconds); one that returns ``None`` is timed by wall clock around the call.
        repeats: Timed rounds (>= 1).
        warmup: Untimed rounds before them (>= 0).
        sync: Called before starting and after stopping the clock (e.g. a device synchronize).
        clock: Seconds counter: wall time by default; ``time.process_time`` (CPU time of this
            process, all threads) on a shared CPU machine, where wall time also counts the
            time other processes hold the cores (see :data:`CLOCKS`).

    Returns:
        Name -> ``repeats`` samples in seconds, in round order (sample r of every case comes
        from the same round, so :func:`ratios` pairs them).

    Raises:
        ValueError: On no cases, ``repeats < 1`` or ``warmup < 0``.
    """
    if not cases:
        raise ValueError("alternate needs at least one case")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else reversed(names):
            if sync is not None:
                sync()
            start = clock()
            reported = cases[name]()
            if sync is not None:
                sync()
            elapsed = clock() - start
            if r >= warmup:
                samples[name].append(elapsed if reported is None else float(reported))
    return samples


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios ``numerator[r] / denominator[r]`` of two cases of one :func:`alternate`.

    Raises:
        ValueError: If the samples differ in length.
    """
    if len(numerator) != len(denominator):
        raise ValueError(
            f"samples of different lengths ({len(numerator)} and {len(denominator)}) do not "
            "come from the same rounds"
        )
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


class Table:
    """A Markdown table: a title line, a header and rows, printed as they come.

    The title is printed as ``### title``; :func:`read_tables` finds tables by it.
    """

    def __init__(self, title: str, columns: Sequence[str]) -> None:
        self.title = title
        self.columns = list(columns)
        self.rows: list[list[str]] = []

    def add(self, *cells: object) -> None:
        """Append a row (cells are formatted with ``str``).

        Raises:
            ValueError: If the number of cells differs from the number of columns.
        """
        if len(cells) != len(self.columns):
            raise ValueError(
                f"table {self.title!r} has {len(self.columns)} columns, got {len(cells)} cells"
            )
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        """The table as Markdown, title first."""
        lines = [f"### {self.title}", "", _row(self.columns), _row(["---"] * len(self.columns))]
        lines += [_row(r) for r in self.rows]
        return "\n".join(lines) + "\n"

    def print(self) -> None:
        """Print :meth:`render` (flushed, so progress shows under a pipe)."""
        print("\n" + self.render(), flush=True)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def read_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The tables :meth:`Table.print` wrote into ``text``: title -> rows as column -> cell.

    A table is a ``### title`` line followed (after blank lines) by a header row, a ``---``
    separator row and data rows, each a line starting with ``|``.
    """
    tables: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("### "):
            i += 1
            continue
        title = lines[i][4:].strip()
        i += 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        block = []
        while i < len(lines) and lines[i].startswith("|"):
            block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
            i += 1
        if len(block) >= 2:
            header = block[0]
            tables[title] = [dict(zip(header, cells, strict=False)) for cells in block[2:]]
    return tables


def describe_machine(device: str = "cpu") -> str:
    """One line: CPU model and cores (or the GPU), Python, torch and megatron-core versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"CPU {cpu} ({os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads)"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(torch.device(device))}")
    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # noqa: BLE001 - a version string is informative only
        mcore = "?"
    parts.append(f"python {platform.python_version()}, torch {torch.__version__}, mcore {mcore}")
    return "; ".join(parts)


def add_timing_args(
    parser: argparse.ArgumentParser, *, repeats: int, warmup: int, clock: bool = True
) -> argparse.ArgumentParser:
    """The flags every timing benchmark shares: ``--repeats``, ``--warmup``, ``--threads`` (torch
    CPU threads; :func:`set_threads` applies it) and, with ``clock``, ``--clock``
    (:data:`CLOCKS`)."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds per shape")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds per shape")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    if clock:
        parser.add_argument(
            "--clock",
            choices=CLOCKS,
            default="wall",
            help="wall time, or CPU time of this process (shared CPU machines; not on a GPU)",
        )
    return parser


def set_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads(args.threads)`` when ``--threads`` was given."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
