"""The variance-loss branch of the config tree (arXiv 2505.22323, docs/method.md section 3).

``VarianceConfig`` holds the options of L_v = -Var(routing scores) (flags
``--moe-variance-loss-*`` and the shared ``--moe-specialization-auto-calibrate``), added by
``add_variance_args`` into the group of :func:`megatron_edl.config.calibration.
add_calibrated_loss_args` and validated in ``__post_init__`` (errors name the flag). It needs no
domain labels. Imports neither ``megatron`` nor ``torch``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from megatron_edl.config.calibration import AUTO_CALIBRATE_FLAG, checked_positive, checked_weight
from megatron_edl.config.convert import as_enum, choices, fields_from_args

__all__ = ["VARIANCE_FLAGS", "VarianceAxis", "VarianceConfig", "add_variance_args"]


class VarianceAxis(StrEnum):
    """Axis of the variance loss (method.md section 3)."""

    TOKENS = "tokens"
    """Variance across tokens of each expert's post-top-k score column, averaged over experts
    (the paper's)."""
    EXPERTS = "experts"
    """Variance across experts of each token's dense softmax, averaged over tokens (the
    released code's)."""


VARIANCE_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "coeff": "--moe-variance-loss-coeff",
        "axis": "--moe-variance-loss-axis",
        "auto_calibrate": AUTO_CALIBRATE_FLAG,
        "target": "--moe-variance-loss-target",
    }
)
"""VarianceConfig field -> command-line flag (argparse ``dest`` = the flag's name with
``-`` -> ``_``)."""


@dataclass(frozen=True, kw_only=True)
class VarianceConfig:
    """Options of the variance loss; see ``VARIANCE_FLAGS``. On when ``coeff > 0``."""

    coeff: float = 0.0
    """γ, the weight of L_v per MoE layer (summed over layers). 0 disables it; >= 0, finite."""

    axis: VarianceAxis = VarianceAxis.TOKENS
    """``tokens`` (the paper's) or ``experts`` (the released code's)."""

    auto_calibrate: bool = False
    """Replace γ, once per MoE layer at its first training forward, by ``target / |L_0|``
    (L_0: the loss's first value), as the released code does; the same value on every rank. A
    run resumed from a checkpoint calibrates again."""

    target: float = 1e-3
    """|γ · L_v| at the first step under ``auto_calibrate``; > 0, finite."""

    @property
    def enabled(self) -> bool:
        """Whether the variance loss is on (``coeff > 0``)."""
        return self.coeff > 0

    def __post_init__(self) -> None:
        """Validate and normalise every field.

        Raises:
            EDLConfigError: On any invalid field; the message names the flag and the value.
        """
        flags = VARIANCE_FLAGS
        object.__setattr__(self, "coeff", checked_weight(flags, self.coeff, self.auto_calibrate))
        object.__setattr__(self, "target", checked_positive(flags["target"], self.target))
        object.__setattr__(self, "axis", as_enum(flags["axis"], self.axis, VarianceAxis))

    @classmethod
    def from_args(cls, args: Any) -> VarianceConfig:
        """Build the config from an argparse namespace (Megatron's ``args``), duck-typed; a
        missing attribute takes the field's default.

        Raises:
            EDLConfigError: On any invalid value.
        """
        return cls(**fields_from_args(args, VARIANCE_FLAGS))


def add_variance_args(group: Any) -> None:
    """Add the variance loss's own flags (defaults: ``VarianceConfig``'s) to ``group``.

    Args:
        group: The argument group (anything with ``add_argument``) of
            :func:`~megatron_edl.config.calibration.add_calibrated_loss_args`.
    """
    default = VarianceConfig()
    group.add_argument(
        VARIANCE_FLAGS["coeff"],
        type=float,
        default=default.coeff,
        help="Weight (gamma) of the variance loss L_v = -Var(routing scores), per MoE layer; "
        "0 disables it. Default: %(default)s.",
    )
    group.add_argument(
        VARIANCE_FLAGS["axis"],
        type=str,
        default=default.axis.value,
        help=f"Axis of the variance: {choices(VarianceAxis)}. tokens = across tokens of each "
        "expert's post-top-k score (the paper's), experts = across experts of each token's dense "
        "softmax (the released code's). Default: %(default)s.",
    )
    group.add_argument(
        VARIANCE_FLAGS["target"],
        type=float,
        default=default.target,
        help="Auto-calibration target of |gamma * L_v|. Default: %(default)s.",
    )
