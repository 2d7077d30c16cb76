"""The orthogonality-loss branch of the config tree (arXiv 2505.22323, docs/method.md section 3).

``OrthogonalityConfig`` holds the options of L_o on each token's k raw expert outputs (flags
``--moe-ortho-loss-*`` and the shared ``--moe-specialization-auto-calibrate``), added by
``add_orthogonality_args`` into the group of :func:`megatron_edl.config.calibration.
add_calibrated_loss_args`, validated in ``__post_init__`` (errors name the flag) and checked
against the model by ``validate_orthogonality_against_model``. It needs no domain labels.
Imports neither ``megatron`` nor ``torch``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from megatron_edl.config.calibration import AUTO_CALIBRATE_FLAG, checked_positive, checked_weight
from megatron_edl.config.convert import fields_from_args
from megatron_edl.core.options import EDLConfigError

__all__ = [
    "ORTHOGONALITY_FLAGS",
    "OrthogonalityConfig",
    "add_orthogonality_args",
    "validate_orthogonality_against_model",
]

ORTHOGONALITY_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "coeff": "--moe-ortho-loss-coeff",
        "eps": "--moe-ortho-loss-eps",
        "auto_calibrate": AUTO_CALIBRATE_FLAG,
        "target": "--moe-ortho-loss-target",
    }
)
"""OrthogonalityConfig field -> command-line flag (argparse ``dest`` = the flag's name with
``-`` -> ``_``)."""


@dataclass(frozen=True, kw_only=True)
class OrthogonalityConfig:
    """Options of the orthogonality loss; see ``ORTHOGONALITY_FLAGS``. On when ``coeff > 0``."""

    coeff: float = 0.0
    """β_o, the weight of L_o per MoE layer (summed over layers). 0 disables it; >= 0, finite."""

    eps: float = 1e-6
    """ε in the denominator of L_o; > 0, finite."""

    auto_calibrate: bool = False
    """Replace β_o, once per MoE layer at its first training forward, by ``target / |L_0|``
    (L_0: the loss's first value), as the released code does; the same value on every rank. A
    run resumed from a checkpoint calibrates again."""

    target: float = 1e-4
    """|β_o · L_o| at the first step under ``auto_calibrate``; > 0, finite."""

    @property
    def enabled(self) -> bool:
        """Whether the orthogonality loss is on (``coeff > 0``)."""
        return self.coeff > 0

    def __post_init__(self) -> None:
        """Validate and normalise every field.

        Raises:
            EDLConfigError: On any invalid field; the message names the flag and the value.
        """
        flags = ORTHOGONALITY_FLAGS
        object.__setattr__(self, "coeff", checked_weight(flags, self.coeff, self.auto_calibrate))
        object.__setattr__(self, "eps", checked_positive(flags["eps"], self.eps))
        object.__setattr__(self, "target", checked_positive(flags["target"], self.target))

    @classmethod
    def from_args(cls, args: Any) -> OrthogonalityConfig:
        """Build the config from an argparse namespace (Megatron's ``args``), duck-typed; a
        missing attribute takes the field's default.

        Raises:
            EDLConfigError: On any invalid value.
        """
        return cls(**fields_from_args(args, ORTHOGONALITY_FLAGS))


def add_orthogonality_args(group: Any) -> None:
    """Add the orthogonality loss's own flags (defaults: ``OrthogonalityConfig``'s) to ``group``.

    Args:
        group: The argument group (anything with ``add_argument``) of
            :func:`~megatron_edl.config.calibration.add_calibrated_loss_args`.
    """
    default = OrthogonalityConfig()
    group.add_argument(
        ORTHOGONALITY_FLAGS["coeff"],
        type=float,
        default=default.coeff,
        help="Weight (beta) of the orthogonality loss on each token's k raw expert outputs, per "
        "MoE layer; 0 disables it. Default: %(default)s.",
    )
    group.add_argument(
        ORTHOGONALITY_FLAGS["eps"],
        type=float,
        default=default.eps,
        help="Epsilon in the denominator of the orthogonality loss (> 0). Default: %(default)s.",
    )
    group.add_argument(
        ORTHOGONALITY_FLAGS["target"],
        type=float,
        default=default.target,
        help="Auto-calibration target of |beta * L_o|. Default: %(default)s.",
    )


def validate_orthogonality_against_model(
    cfg: OrthogonalityConfig,
    *,
    moe_router_topk: int,
    token_dispatcher_type: str,
    flex_dispatcher_backend: str = "deepep",
    apply_probs_on_input: bool = False,
    overlap_moe_expert_parallel_comm: bool = False,
) -> None:
    """Check the orthogonality options against the model (the MoE and CUDA-graph checks it
    shares with the variance loss: :func:`megatron_edl.config.calibration.check_moe_and_graphs`).

    Args:
        cfg: The config.
        moe_router_topk: Megatron's ``--moe-router-topk``.
        token_dispatcher_type: Megatron's ``--moe-token-dispatcher-type``.
        flex_dispatcher_backend: Megatron's ``--moe-flex-dispatcher-backend`` (read with
            ``flex`` only).
        apply_probs_on_input: Megatron's ``--moe-apply-probs-on-input``.
        overlap_moe_expert_parallel_comm: Megatron's ``--overlap-moe-expert-parallel-comm``.

    Raises:
        EDLConfigError: The loss is on with the EP communication overlap (its combine node would
            back-propagate through the router node's graph), with top-1 routing (it is
            identically 0), with a token dispatcher it has no hook in, with the ``flex``
            dispatcher on a backend other than ``deepep`` (``hybridep`` and ``ncclep`` keep the
            token layout inside opaque handles), or with the gate applied to the expert input
            (the raw outputs are then unknown).
    """
    if not cfg.enabled:
        return
    flag = ORTHOGONALITY_FLAGS["coeff"]
    if overlap_moe_expert_parallel_comm:
        raise EDLConfigError(
            f"{flag} {cfg.coeff} cannot be used with --overlap-moe-expert-parallel-comm: "
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
