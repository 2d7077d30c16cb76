"""The variance and orthogonality branch of the config tree (*Advancing Expert Specialization*).

``SpecializationConfig`` holds the options of the two losses of arXiv 2505.22323
(docs/method.md section 3; flags ``--moe-variance-loss-*``, ``--moe-ortho-loss-*``), added by
``add_specialization_args`` in their own argument group, validated in ``__post_init__`` (errors
name the flag) and checked against the model by ``validate_specialization_against_model``. They
need no domain labels. Imports neither ``megatron`` nor ``torch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from megatron_edl.config._convert import EDLConfigError, as_enum, as_float, choices

__all__ = [
    "SPECIALIZATION_FLAGS",
    "SPECIALIZATION_GROUP_TITLE",
    "SpecializationConfig",
    "VarianceAxis",
    "add_specialization_args",
    "validate_specialization_against_model",
]

SPECIALIZATION_GROUP_TITLE = "expert specialization losses, arXiv 2505.22323 (megatron-edl)"


class VarianceAxis(StrEnum):
    """Axis of the variance loss (method.md section 3)."""

    TOKENS = "tokens"
    """Variance across tokens of each expert's post-top-k score column, averaged over experts
    (the paper's)."""
    EXPERTS = "experts"
    """Variance across experts of each token's dense softmax, averaged over tokens (the
    released code's)."""


SPECIALIZATION_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "variance_coeff": "--moe-variance-loss-coeff",
        "variance_axis": "--moe-variance-loss-axis",
        "ortho_coeff": "--moe-ortho-loss-coeff",
        "ortho_eps": "--moe-ortho-loss-eps",
        "auto_calibrate": "--moe-specialization-auto-calibrate",
        "variance_target": "--moe-variance-loss-target",
        "ortho_target": "--moe-ortho-loss-target",
    }
)
"""SpecializationConfig field -> command-line flag (argparse ``dest`` = the flag's name with
``-`` -> ``_``)."""


@dataclass(frozen=True, kw_only=True)
class SpecializationConfig:
    """Options of the variance and orthogonality losses; see ``SPECIALIZATION_FLAGS``.

    Both are independent of EDL and of each other: each is on when its coefficient is > 0.
    """

    variance_coeff: float = 0.0
    """γ, the weight of L_v per MoE layer (summed over layers). 0 disables it; >= 0, finite."""

    variance_axis: VarianceAxis = VarianceAxis.TOKENS
    """``tokens`` (the paper's) or ``experts`` (the released code's)."""

    ortho_coeff: float = 0.0
    """β, the weight of L_o per MoE layer (summed over layers). 0 disables it; >= 0, finite."""

    ortho_eps: float = 1e-6
    """ε in the denominator of L_o; > 0, finite."""

    auto_calibrate: bool = False
    """Replace each enabled coefficient, once per MoE layer at its first training forward, by
    ``target / |L_0|`` (L_0: the term's first value), as the released code does; the same
    value on every rank. A run resumed from a checkpoint calibrates again."""

    variance_target: float = 1e-3
    """|γ · L_v| at the first step under ``auto_calibrate``; > 0, finite."""

    ortho_target: float = 1e-4
    """|β · L_o| at the first step under ``auto_calibrate``; > 0, finite."""

    @property
    def variance_enabled(self) -> bool:
        """Whether the variance loss is on (``variance_coeff > 0``)."""
        return self.variance_coeff > 0

    @property
    def ortho_enabled(self) -> bool:
        """Whether the orthogonality loss is on (``ortho_coeff > 0``)."""
        return self.ortho_coeff > 0

    @property
    def enabled(self) -> bool:
        """Whether either loss is on."""
        return self.variance_enabled or self.ortho_enabled

    def __post_init__(self) -> None:
        """Validate and normalise every field.

        Raises:
            EDLConfigError: On any invalid field; the message names the flag and the value.
        """
        flags = SPECIALIZATION_FLAGS
        values: dict[str, Any] = {}
        for field in ("variance_coeff", "ortho_coeff"):
            value = as_float(flags[field], getattr(self, field))
            if not math.isfinite(value) or value < 0:
                raise EDLConfigError(
                    f"{flags[field]} must be >= 0 and finite, got {getattr(self, field)!r}"
                )
            values[field] = value
        for field in ("ortho_eps", "variance_target", "ortho_target"):
            value = as_float(flags[field], getattr(self, field))
            if not math.isfinite(value) or value <= 0:
                raise EDLConfigError(
                    f"{flags[field]} must be > 0 and finite, got {getattr(self, field)!r}"
                )
            values[field] = value
        values["variance_axis"] = as_enum(flags["variance_axis"], self.variance_axis, VarianceAxis)
        if not isinstance(self.auto_calibrate, bool):
            raise EDLConfigError(
                f"{flags['auto_calibrate']} must be a bool, got {self.auto_calibrate!r}"
            )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_args(cls, args: Any) -> SpecializationConfig:
        """Build the config from an argparse namespace (Megatron's ``args``), duck-typed.

        Args:
            args: Any object with the attributes ``add_specialization_args`` defines; a
                missing attribute takes the field's default.

        Returns:
            The validated config.

        Raises:
            EDLConfigError: On any invalid value.
        """
        kwargs: dict[str, Any] = {}
        for field, flag in SPECIALIZATION_FLAGS.items():
            dest = flag.removeprefix("--").replace("-", "_")
            if hasattr(args, dest):
                kwargs[field] = getattr(args, dest)
        return cls(**kwargs)


def add_specialization_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the variance and orthogonality loss flags, in one argument group.

    Defaults equal the ``SpecializationConfig`` defaults; ``SpecializationConfig.from_args``
    validates the values.

    Args:
        parser: Megatron's (or any) argument parser.

    Returns:
        The same parser, as Megatron's ``extra_args_provider`` expects.
    """
    default = {f.name: f.default for f in dataclasses.fields(SpecializationConfig)}
    flags = SPECIALIZATION_FLAGS
    group = parser.add_argument_group(title=SPECIALIZATION_GROUP_TITLE)
    group.add_argument(
        flags["variance_coeff"],
        type=float,
        default=default["variance_coeff"],
        help="Weight (gamma) of the variance loss L_v = -Var(routing scores), per MoE layer; "
        "0 disables it. Default: %(default)s.",
    )
    group.add_argument(
        flags["variance_axis"],
        type=str,
        default=default["variance_axis"].value,
        help=f"Axis of the variance: {choices(VarianceAxis)}. tokens = across tokens of each "
        "expert's post-top-k score (the paper's), experts = across experts of each token's dense "
        "softmax (the released code's). Default: %(default)s.",
    )
    group.add_argument(
        flags["ortho_coeff"],
        type=float,
        default=default["ortho_coeff"],
        help="Weight (beta) of the orthogonality loss on each token's k raw expert outputs, per "
        "MoE layer; 0 disables it. Default: %(default)s.",
    )
    group.add_argument(
        flags["ortho_eps"],
        type=float,
        default=default["ortho_eps"],
        help="Epsilon in the denominator of the orthogonality loss (> 0). Default: %(default)s.",
    )
    group.add_argument(
        flags["auto_calibrate"],
        action="store_true",
        default=default["auto_calibrate"],
        help="Once per MoE layer, at the first training step, replace each enabled coefficient "
        "by target / |first value of its loss| (the released code's calibration).",
    )
    group.add_argument(
        flags["variance_target"],
        type=float,
        default=default["variance_target"],
        help="Auto-calibration target of |gamma * L_v|. Default: %(default)s.",
    )
    group.add_argument(
        flags["ortho_target"],
        type=float,
        default=default["ortho_target"],
        help="Auto-calibration target of |beta * L_o|. Default: %(default)s.",
    )
    return parser


def validate_specialization_against_model(
    cfg: SpecializationConfig,
    *,
    num_moe_experts: int | None,
    moe_router_topk: int,
    token_dispatcher_type: str,
    flex_dispatcher_backend: str = "deepep",
    apply_probs_on_input: bool = False,
    cuda_graph_capture: str | None = None,
    overlap_moe_expert_parallel_comm: bool = False,
) -> None:
    """Check the variance and orthogonality options against the model.

    Args:
        cfg: The config.
        num_moe_experts: Megatron's ``--num-experts``.
        moe_router_topk: Megatron's ``--moe-router-topk``.
        token_dispatcher_type: Megatron's ``--moe-token-dispatcher-type``.
        flex_dispatcher_backend: Megatron's ``--moe-flex-dispatcher-backend`` (read with
            ``flex`` only).
        apply_probs_on_input: Megatron's ``--moe-apply-probs-on-input``.
        cuda_graph_capture: The CUDA-graph setting whose graphs contain the router, as
            ``megatron_edl.config.labels.cuda_graph_capturing_router`` names it, or ``None``.
        overlap_moe_expert_parallel_comm: Megatron's ``--overlap-moe-expert-parallel-comm``.

    Raises:
        EDLConfigError: A loss is on without MoE or with CUDA graphs that capture the router
            (the orthogonality hook's ``nonzero()`` and the auto-calibration's ``.item()`` are
            host syncs, and a replay skips the losses' Python steps); or the orthogonality loss
            is on with top-1 routing (it is identically 0), with the ``flex`` dispatcher on a
            backend other than ``deepep`` (``hybridep`` and ``ncclep`` keep the token layout
            inside opaque handles), with the gate applied to the expert input (the raw outputs
            are then unknown), or with the EP communication overlap (its combine node would
            back-propagate through the router node's graph).
    """
    flags = SPECIALIZATION_FLAGS
    enabled = [
        field
        for field, on in (
            ("variance_coeff", cfg.variance_enabled),
            ("ortho_coeff", cfg.ortho_enabled),
        )
        if on
    ]
    for field in enabled:
        if not num_moe_experts:
            raise EDLConfigError(
                f"{flags[field]} {getattr(cfg, field)} needs an MoE model, but --num-experts is "
                f"{num_moe_experts!r}"
            )
    if enabled and cuda_graph_capture is not None:
        named = " and ".join(f"{flags[field]} {getattr(cfg, field)}" for field in enabled)
        raise EDLConfigError(
            f"{named} cannot be used with {cuda_graph_capture}: the losses run "
            "host-side steps a graph cannot capture or replay (the orthogonality hook's "
            "nonzero(), the auto-calibration's .item(), the metric recording). Capture only "
            "attn/mlp (--cuda-graph-modules attn) or set --cuda-graph-impl none"
        )
    if not cfg.ortho_enabled:
        return
    flag = flags["ortho_coeff"]
    if overlap_moe_expert_parallel_comm:
        raise EDLConfigError(
            f"{flag} {cfg.ortho_coeff} cannot be used with --overlap-moe-expert-parallel-comm: "
            "the overlap runs the combine in a schedule node of its own, and the orthogonality "
            "hook there divides by the router node's probs, so backward would walk the router's "
            "graph twice. Turn one of them off"
        )
    if moe_router_topk < 2:
        raise EDLConfigError(
            f"{flag} needs --moe-router-topk >= 2 (the loss compares a token's experts), got "
            f"{moe_router_topk!r}"
        )
    if token_dispatcher_type not in ("allgather", "alltoall", "flex"):
        raise EDLConfigError(
            f"{flag} supports --moe-token-dispatcher-type allgather, alltoall and flex, got "
            f"{token_dispatcher_type!r}"
        )
    if token_dispatcher_type == "flex" and flex_dispatcher_backend != "deepep":
        raise EDLConfigError(
            f"{flag} supports the flex token dispatcher with the deepep backend only (hybridep "
            "and ncclep keep the token layout inside opaque handles), got "
            f"--moe-flex-dispatcher-backend {flex_dispatcher_backend}"
        )
    if apply_probs_on_input:
        raise EDLConfigError(
            f"{flag} cannot be combined with --moe-apply-probs-on-input (the raw expert outputs "
            "are not available then)"
        )
