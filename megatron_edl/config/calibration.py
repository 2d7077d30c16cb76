"""What the variance and orthogonality branches share (arXiv 2505.22323, docs/method.md section 3).

Both losses come from one paper and sit in one argument group of ``--help``
(:func:`add_calibrated_loss_args`); one flag, ``--moe-specialization-auto-calibrate``, turns on
the auto-calibration of both coefficients; both run host-side steps that a CUDA graph of the
router cannot hold (:func:`check_moe_and_graphs`). Imports neither ``megatron`` nor ``torch``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from megatron_edl.config.convert import as_float
from megatron_edl.core.options import EDLConfigError

__all__ = [
    "AUTO_CALIBRATE_FLAG",
    "SPECIALIZATION_GROUP_TITLE",
    "add_calibrated_loss_args",
    "check_moe_and_graphs",
    "checked_positive",
    "checked_weight",
]

SPECIALIZATION_GROUP_TITLE = "expert specialization losses, arXiv 2505.22323 (megatron-edl)"
AUTO_CALIBRATE_FLAG = "--moe-specialization-auto-calibrate"


def checked_weight(flags: Mapping[str, str], coeff: Any, auto_calibrate: Any) -> float:
    """A calibrated loss's weight as a float (``>= 0``, finite), its ``auto_calibrate`` a bool.

    Raises:
        EDLConfigError: Naming the flag (``flags["coeff"]``, ``flags["auto_calibrate"]``) and
            the value.
    """
    value = as_float(flags["coeff"], coeff)
    if not math.isfinite(value) or value < 0:
        raise EDLConfigError(f"{flags['coeff']} must be >= 0 and finite, got {coeff!r}")
    if not isinstance(auto_calibrate, bool):
        raise EDLConfigError(f"{flags['auto_calibrate']} must be a bool, got {auto_calibrate!r}")
    return value


def checked_positive(flag: str, value: Any) -> float:
    """``value`` as a float, ``> 0`` and finite (a calibration target, an epsilon).

    Raises:
        EDLConfigError: Naming ``flag`` and the value.
    """
    number = as_float(flag, value)
    if not math.isfinite(number) or number <= 0:
        raise EDLConfigError(f"{flag} must be > 0 and finite, got {value!r}")
    return number


def add_calibrated_loss_args(
    parser: argparse.ArgumentParser, *branches: Callable[[Any], None]
) -> argparse.ArgumentParser:
    """One argument group: each branch's flags (``branches`` add them), then the shared flag.

    Args:
        parser: Megatron's (or any) argument parser.
        *branches: ``add_*_args(group)`` of each calibrated loss.

    Returns:
        The same parser, as Megatron's ``extra_args_provider`` expects.
    """
    group = parser.add_argument_group(title=SPECIALIZATION_GROUP_TITLE)
    for add in branches:
        add(group)
    group.add_argument(
        AUTO_CALIBRATE_FLAG,
        action="store_true",
        default=False,
        help="Once per MoE layer, at the first training step, replace each enabled coefficient "
        "by target / |first value of its loss| (the released code's calibration).",
    )
    return parser


def check_moe_and_graphs(
    enabled: Sequence[tuple[str, float]],
    *,
    num_moe_experts: int | None,
    cuda_graph_capture: str | None,
) -> None:
    """Refuse the calibrated losses that are on without MoE layers or with CUDA graphs of the
    router.

    Args:
        enabled: ``(coefficient flag, value)`` of each loss that is on.
        num_moe_experts: Megatron's ``--num-experts``.
        cuda_graph_capture: The CUDA-graph setting whose graphs contain the router, as
            ``megatron_edl.config.labels.cuda_graph_capturing_router`` names it, or ``None``.

    Raises:
        EDLConfigError: Naming the flags, their values and the conflicting setting.
    """
    for flag, value in enabled:
        if not num_moe_experts:
            raise EDLConfigError(
                f"{flag} {value} needs an MoE model, but --num-experts is {num_moe_experts!r}"
            )
    if enabled and cuda_graph_capture is not None:
        named = " and ".join(f"{flag} {value}" for flag, value in enabled)
        raise EDLConfigError(
            f"{named} cannot be used with {cuda_graph_capture}: the losses run "
            "host-side steps a graph cannot capture or replay (the orthogonality hook's "
            "nonzero(), the auto-calibration's .item(), the metric recording). Capture only "
            "attn/mlp (--cuda-graph-modules attn) or set --cuda-graph-impl none"
        )
