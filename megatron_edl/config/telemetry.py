"""The routing-telemetry branch of the config tree: its flags, phase and output directory.

The telemetry (:mod:`megatron_edl.integration.telemetry`) records per-domain routing statistics
during training (``--moe-edl-stats-interval``) or of one evaluation of a checkpoint (the probe,
``--moe-edl-probe-dir``). Either flag loads the domain labels
(:mod:`megatron_edl.config.labels`), whether or not the EDL loss is on.

The flags keep their ``--moe-edl-`` prefix although they are not options of the loss: recorded
runs, the YAML run configs (examples/configs), the study driver and the probe CLI pass them by
that name, and renaming would break every one of those command lines. Imports neither
``megatron`` nor ``torch``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "DIR_FLAG",
    "INTERVAL_FLAG",
    "PROBE_DIR_FLAG",
    "STATS_SUBDIR",
    "TELEMETRY_GROUP_TITLE",
    "Phase",
    "TelemetryConfig",
    "add_telemetry_args",
    "check_writable_directory",
    "flags_in_use",
    "stats_directory",
    "telemetry_phase",
]

INTERVAL_FLAG = "--moe-edl-stats-interval"
DIR_FLAG = "--moe-edl-stats-dir"
PROBE_DIR_FLAG = "--moe-edl-probe-dir"
STATS_SUBDIR = "routing_stats"
TELEMETRY_GROUP_TITLE = "routing telemetry (megatron-edl)"


class Phase(StrEnum):
    """Which forwards a router's statistics count."""

    TRAIN = "train"
    """Grad-enabled training forwards (one per micro-batch)."""
    EVAL = "eval"
    """Evaluation forwards (model in eval mode)."""


def telemetry_phase(args: argparse.Namespace) -> Phase | None:
    """The statistics phase the flags ask for (``None``: no telemetry).

    Raises:
        ValueError: If both the training statistics and the probe are requested, the interval
            is < 1, or the probe lacks ``--skip-train``/``--eval-iters`` (names the flag).
    """
    interval = getattr(args, "moe_edl_stats_interval", None)
    probe_dir = getattr(args, "moe_edl_probe_dir", None)
    if interval is not None and interval < 1:
        raise ValueError(f"{INTERVAL_FLAG} must be >= 1, got {interval}")
    if interval is not None and probe_dir is not None:
        raise ValueError(f"{INTERVAL_FLAG} and {PROBE_DIR_FLAG} cannot be combined")
    if interval is not None:
        return Phase.TRAIN
    if probe_dir is not None:
        if not getattr(args, "skip_train", False):
            raise ValueError(f"{PROBE_DIR_FLAG} evaluates a checkpoint: it needs --skip-train")
        if not getattr(args, "eval_iters", 0):
            raise ValueError(f"{PROBE_DIR_FLAG} needs --eval-iters > 0 (the probe's batches)")
        return Phase.EVAL
    return None


def flags_in_use(args: argparse.Namespace) -> list[str]:
    """The telemetry flags set on the command line (reasons to load the domain labels)."""
    flags = []
    if getattr(args, "moe_edl_stats_interval", None) is not None:
        flags.append(INTERVAL_FLAG)
    if getattr(args, "moe_edl_probe_dir", None) is not None:
        flags.append(PROBE_DIR_FLAG)
    return flags


def stats_directory(args: argparse.Namespace) -> str:
    """Where the dumps go: ``--moe-edl-probe-dir``/``--moe-edl-stats-dir``, or
    ``<--save>/routing_stats``, or ``<--tensorboard-dir>/routing_stats``.

    Raises:
        ValueError: If no directory can be derived (names the flags).
    """
    if getattr(args, "moe_edl_probe_dir", None):
        return args.moe_edl_probe_dir
    if getattr(args, "moe_edl_stats_dir", None):
        return args.moe_edl_stats_dir
    for base in (getattr(args, "save", None), getattr(args, "tensorboard_dir", None)):
        if base:
            return os.path.join(base, STATS_SUBDIR)
    raise ValueError(f"{INTERVAL_FLAG} needs {DIR_FLAG}, --save or --tensorboard-dir")


def _directory_flag(args: argparse.Namespace) -> str:
    """The flag :func:`stats_directory` took the directory from (for messages)."""
    if getattr(args, "moe_edl_probe_dir", None):
        return PROBE_DIR_FLAG
    if getattr(args, "moe_edl_stats_dir", None):
        return DIR_FLAG
    return "--save" if getattr(args, "save", None) else "--tensorboard-dir"


def check_writable_directory(directory: str | os.PathLike, flag: str) -> None:
    """Refuse, at start, a dump directory that the first dump could not create or write.

    The dumps create the directory (with its parents) when they are first written, after
    training started; this checks now what that will need: every existing part of the path is
    a folder, and the deepest existing one (the directory itself, or the ancestor the dump
    would create it in) is writable. Nothing is created.

    Args:
        directory: The dump directory.
        flag: The flag that set it, for the message.

    Raises:
        ValueError: Naming the flag and the path, if the directory cannot be used.
    """
    path = os.path.abspath(os.fspath(directory))
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"lies below the file {existing}"
        raise ValueError(f"{flag} {directory}: the statistics directory {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be created in {existing})"
        raise ValueError(f"{flag} {directory}: the statistics directory is not writable{where}")


@dataclass(frozen=True, kw_only=True)
class TelemetryConfig:
    """The telemetry a run records, resolved from the flags once (:meth:`from_args`)."""

    phase: Phase | None = None
    """Which forwards the routers record; ``None``: no telemetry."""

    directory: str | None = None
    """Where the dumps go (:func:`stats_directory`); ``None`` without telemetry."""

    interval: int | None = None
    """``--moe-edl-stats-interval``: a dump every N iterations (training phase only)."""

    @property
    def enabled(self) -> bool:
        """Whether the routers record statistics."""
        return self.phase is not None

    @classmethod
    def from_args(cls, args: Any) -> TelemetryConfig:
        """The telemetry the flags ask for, validated.

        Raises:
            ValueError: As :func:`telemetry_phase`, :func:`stats_directory` and
                :func:`check_writable_directory` (names the flag).
        """
        phase = telemetry_phase(args)
        if phase is None:
            return cls()
        directory = stats_directory(args)
        check_writable_directory(directory, _directory_flag(args))
        return cls(
            phase=phase,
            directory=directory,
            interval=getattr(args, "moe_edl_stats_interval", None),
        )


def add_telemetry_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The telemetry flags, in their own argument group."""
    group = parser.add_argument_group(title=TELEMETRY_GROUP_TITLE)
    group.add_argument(
        INTERVAL_FLAG,
        type=int,
        default=None,
        help="Write per-domain routing statistics of every MoE layer every N iterations (and "
        "after the last one). Loads the domain labels whether or not the EDL loss is on.",
    )
    group.add_argument(
        DIR_FLAG,
        default=None,
        help=f"Directory of the statistics dumps (default: <--save>/{STATS_SUBDIR}, else "
        f"<--tensorboard-dir>/{STATS_SUBDIR}).",
    )
    group.add_argument(
        PROBE_DIR_FLAG,
        default=None,
        help="Evaluation probe: record the routing of Megatron's (first) evaluation, with "
        "--load CKPT --skip-train, and write it with the per-domain LM loss to this directory.",
    )
    return parser
