"""Evaluation probe: routing statistics and per-domain LM loss of a checkpoint, without training.

Usage:
    torchrun --nproc-per-node 2 tools/probe.py --out probes/edl --cpu \\
        --config-yaml examples/configs/tiny_moe_cpu.yaml --load runs/edl/checkpoints --eval-iters 20
    torchrun --nproc-per-node 8 -m megatron_edl.probe --out probes/edl --load CKPT <flags>

The probe is the launcher (:mod:`megatron_edl.pretrain_gpt`) in Megatron's evaluate-only mode: it
appends ``--skip-train --no-load-optim --no-load-rng --moe-edl-window-decay 0 --moe-edl-probe-dir
OUT`` to the given flags (the statistics window is training state sized by the training labels,
which may not be the probe's), so the checkpoint is loaded with Megatron's own loader (any parallel
layout; the CPU layer with ``--cpu``), the labelled validation data
(``--split``/``--valid-data-path``, or ``--mock-data --moe-edl-mock-domains N``) goes through the
model in eval mode, the MoE routers record their per-domain statistics
(:mod:`megatron_edl.integration.telemetry`), and one dump (``source = "probe"``, step = the
checkpoint's iteration) is written with the per-domain LM loss of that evaluation. Pass the flags
the model was trained with (with ``--config-yaml``, put it first: later flags override the file's);
``--eval-iters`` sets the number of evaluation batches. Megatron initialises ``torch.distributed``
from ``torchrun``'s environment, so launch it with ``torchrun`` even for one process. Read the
output with ``tools/report.py``. Console script: ``megatron-edl-probe``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_edl.config.telemetry import PROBE_DIR_FLAG

__all__ = ["check_checkpoint", "main", "probe_argv"]

PROBE_FLAGS = ("--skip-train", "--no-load-optim", "--no-load-rng")
# The statistics window is training state, sized by the training labels' domains; the probe does
# not train and may read other labels (the fine ones of a model trained on coarse groups), so it
# builds its routers without the window (the checkpoint's window key is then an unexpected key,
# which Megatron's default --dist-ckpt-strictness accepts).
NO_WINDOW = ("--moe-edl-window-decay", "0")


def probe_argv(out: str, flags: Sequence[str]) -> list[str]:
    """The launcher command line of a probe.

    Args:
        out: Output directory of the dump.
        flags: The run's Megatron flags, including ``--load``.

    Returns:
        ``flags`` followed by the evaluate-only flags (``--train-iters 1`` when neither
        ``--train-iters`` nor ``--train-samples`` is given: Megatron sizes its datasets from it),
        the statistics window off (:data:`NO_WINDOW`) and ``--moe-edl-probe-dir out``.

    Raises:
        ValueError: If ``flags`` has no ``--load`` or already sets ``--moe-edl-probe-dir``.
    """
    flags = list(flags)
    if not any(f == "--load" or f.startswith("--load=") for f in flags):
        raise ValueError("the probe needs --load CHECKPOINT_DIR")
    if any(f == PROBE_DIR_FLAG or f.startswith(f"{PROBE_DIR_FLAG}=") for f in flags):
        raise ValueError(f"pass the output directory as --out, not {PROBE_DIR_FLAG}")
    extra = [f for f in PROBE_FLAGS if f not in flags]
    if not any(f.split("=")[0] in ("--train-iters", "--train-samples") for f in flags):
        extra += ["--train-iters", "1"]  # Megatron sizes its datasets from it even when skipping
    return [*flags, *extra, *NO_WINDOW, PROBE_DIR_FLAG, out]


def _flag_value(flags: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``flags`` (``None``: absent)."""
    value = None
    for i, f in enumerate(flags):
        if f == flag and i + 1 < len(flags):
            value = flags[i + 1]
        elif f.startswith(f"{flag}="):
            value = f.split("=", 1)[1]
    return value


def check_checkpoint(flags: Sequence[str]) -> None:
    """Refuse a ``--load`` with no checkpoint Megatron would load (it would evaluate a random
    model, warn once in its log and exit 0).

    Megatron loads the iteration its tracker (``latest_checkpointed_iteration.txt``) names, or
    ``--ckpt-step``'s; without either it starts from random weights, ``iter_*`` folders or not.

    Raises:
        ValueError: Naming ``--load`` and what is missing.
    """
    from pathlib import Path

    from megatron_edl.checkpoint import TRACKER

    load = _flag_value(flags, "--load")
    if load is None:
        return  # probe_argv names the missing flag
    folder = Path(load)
    if not folder.is_dir():
        raise ValueError(f"--load {load}: no such folder, so no checkpoint to evaluate")
    if (folder / TRACKER).is_file() or _flag_value(flags, "--ckpt-step") is not None:
        return  # the tracker's (or --ckpt-step's) folder: checked by the launcher
    found = sorted(p.name for p in folder.glob("iter_*") if p.is_dir())
    hint = f" (it holds {found[-1]}: pass --ckpt-step N)" if found else " (and no iter_* folder)"
    raise ValueError(
        f"--load {load}: no checkpoint: no {TRACKER}{hint}; Megatron would evaluate a randomly "
        "initialised model"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the probe (under ``torchrun`` for several processes).

    Args:
        argv: ``--out DIR`` plus the launcher's flags (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog="Every other flag goes to megatron_edl.pretrain_gpt (Megatron's flags).",
    )
    parser.add_argument("--out", required=True, help="output directory of the probe's dump")
    args, flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        launcher_argv = probe_argv(args.out, flags)
    except ValueError as err:
        parser.error(str(err))
    from megatron_edl import pretrain_gpt

    try:
        check_checkpoint(flags)
    except ValueError as err:  # one line, exit status 2 (before anything is built)
        pretrain_gpt.refuse(err)

    pretrain_gpt.main(launcher_argv)


if __name__ == "__main__":
    main()
