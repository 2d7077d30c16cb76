"""The domain-labels branch of the config tree: when labels are loaded and where they come from.

Domain labels are loaded when any flag needs them (:func:`label_reasons`): the EDL loss
(``--moe-edl-coeff`` > 0), the per-domain validation loss (``--moe-edl-eval-per-domain``) or the
routing telemetry (:mod:`megatron_edl.config.telemetry`). ``LabelsConfig`` says where they come
from: the ``.domains`` sidecars of ``--data-path`` (default), one domain per blend prefix
(``--moe-edl-domains-per-prefix``), or synthetic domains of ``--mock-data``
(``--moe-edl-mock-domains``). How stored labels become loss domains (``--moe-edl-label-map``, the
random control ``--moe-edl-labels random``, ``--moe-edl-aggregation``) are fields of
:class:`megatron_edl.config.edl.EDLConfig`, which the datasets and routers read (see there).
:func:`check_supported` refuses the Megatron settings labels cannot work with. Imports neither
``megatron`` nor ``torch``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from megatron_edl.config._convert import EDLConfigError
from megatron_edl.config.edl import FLAGS
from megatron_edl.config.telemetry import flags_in_use

__all__ = [
    "DOMAINS_PER_PREFIX_FLAG",
    "EVAL_PER_DOMAIN_FLAG",
    "LABELS_GROUP_TITLE",
    "MOCK_DOMAINS_FLAG",
    "LabelOrigin",
    "LabelsConfig",
    "add_label_args",
    "check_supported",
    "label_reasons",
]

DOMAINS_PER_PREFIX_FLAG = "--moe-edl-domains-per-prefix"
EVAL_PER_DOMAIN_FLAG = "--moe-edl-eval-per-domain"
MOCK_DOMAINS_FLAG = "--moe-edl-mock-domains"
LABELS_GROUP_TITLE = "domain labels (megatron-edl)"


class LabelOrigin(StrEnum):
    """Where the stored labels of the documents come from."""

    SIDECAR = "sidecar"
    """The ``.domains`` sidecar next to each ``--data-path`` prefix."""
    PREFIX = "prefix"
    """One domain per blend prefix (``--moe-edl-domains-per-prefix``)."""
    MOCK = "mock"
    """``--mock-data``: document i belongs to domain i mod ``--moe-edl-mock-domains``."""


def label_reasons(args: Any) -> list[str]:
    """The flags that need per-token domain labels in the batch (empty: load none).

    Labels are loaded when the EDL loss is on, or when a feature that only observes them is
    (per-domain validation loss for a baseline run, routing telemetry). With labels loaded the
    validation loss is always also reported per domain.
    """
    reasons = []
    if (getattr(args, "moe_edl_coeff", 0) or 0) > 0:
        reasons.append(FLAGS["coeff"])
    if getattr(args, "moe_edl_eval_per_domain", False):
        reasons.append(EVAL_PER_DOMAIN_FLAG)
    reasons += flags_in_use(args)
    return reasons


@dataclass(frozen=True, kw_only=True)
class LabelsConfig:
    """Domain labels of a run that loads them (:meth:`from_args`; ``None`` for one that doesn't)."""

    reasons: tuple[str, ...]
    """The flags that need the labels (:func:`label_reasons`), for messages."""

    origin: LabelOrigin
    """Where the documents' stored labels come from."""

    domains_per_prefix: str | None = None
    """``--moe-edl-domains-per-prefix``: YAML of blend prefix (path or glob) -> domain name."""

    mock_domains: int = 4
    """``--moe-edl-mock-domains``: number of synthetic domains with ``--mock-data``."""

    eval_per_domain: bool = False
    """``--moe-edl-eval-per-domain`` was given (the report is per domain whenever labels are
    loaded)."""

    @classmethod
    def from_args(cls, args: Any, reasons: Sequence[str]) -> LabelsConfig:
        """The labels config of Megatron's parsed ``args``, refusing what labels cannot do.

        Args:
            args: Megatron's parsed arguments (``mock_data``, ``sft``, ``hybrid_context_parallel``
                and the flags of :func:`add_label_args`).
            reasons: :func:`label_reasons` (non-empty).

        Raises:
            EDLConfigError: ``--hybrid-context-parallel``; ``--sft`` without
                ``--moe-edl-domains-per-prefix`` (or with ``--mock-data``).
        """
        why = ", ".join(reasons)
        if getattr(args, "hybrid_context_parallel", False):
            raise EDLConfigError(
                f"domain labels ({why}) with --hybrid-context-parallel are not "
                "supported: its per-sample CP groups change which ranks share a micro-batch"
            )
        per_prefix = getattr(args, "moe_edl_domains_per_prefix", None)
        mock = bool(getattr(args, "mock_data", False))
        if getattr(args, "sft", False) and (mock or not per_prefix):
            raise EDLConfigError(
                f"domain labels ({why}) with --sft need {DOMAINS_PER_PREFIX_FLAG} "
                "(one domain per SFT JSONL file of --data-path; SFT data has no sidecars and no "
                "mock mode)"
            )
        if mock:
            origin = LabelOrigin.MOCK
        elif per_prefix:
            origin = LabelOrigin.PREFIX
        else:
            origin = LabelOrigin.SIDECAR
        return cls(
            reasons=tuple(reasons),
            origin=origin,
            domains_per_prefix=per_prefix,
            mock_domains=getattr(args, "moe_edl_mock_domains", 4),
            eval_per_domain=bool(getattr(args, "moe_edl_eval_per_domain", False)),
        )


def add_label_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of where the labels come from, in their own argument group."""
    group = parser.add_argument_group(title=LABELS_GROUP_TITLE)
    group.add_argument(
        DOMAINS_PER_PREFIX_FLAG,
        default=None,
        help="YAML: blend prefix (path or glob) -> domain name. Labels every document of a "
        "prefix with its domain (no .domains sidecar needed).",
    )
    group.add_argument(
        EVAL_PER_DOMAIN_FLAG,
        action="store_true",
        help="Load the domain labels even with the EDL loss off (baseline runs) and report the "
        "validation LM loss per domain ('lm loss/<domain>') and each domain's share of the "
        "validation tokens ('token share/<domain>') next to the overall loss. On whenever "
        "labels are loaded.",
    )
    group.add_argument(
        MOCK_DOMAINS_FLAG,
        type=int,
        default=4,
        help="With --mock-data and domain labels: number of synthetic domains (document i "
        "belongs to domain i %% N, its tokens to that domain's vocabulary band).",
    )
    return parser


# Megatron's CUDA-graph capture regions that contain the router (empty = the whole layer).
_GRAPH_MODULES_WITH_ROUTER = frozenset({"moe", "moe_router", "moe_preprocess"})


def check_supported(args: Any, reasons: Sequence[str]) -> None:
    """Refuse, at start, the Megatron settings domain labels cannot work with.

    Called by the launcher when labels are loaded (``reasons``: the flags that need them).
    Supported and tested: sigmoid/sqrtsoftplus score functions (``--moe-edl-scores``), expert
    bias and aux-loss-free balancing, ``--moe-router-fusion``, MTP layers. Refused:

    - CUDA graphs that capture the router (``--cuda-graph-impl`` other than ``none`` with
      ``--cuda-graph-modules`` empty, i.e. the whole layer, or naming ``moe``, ``moe_router``
      or ``moe_preprocess``; or ``full_iteration``): a replay would reuse the labels queued at
      capture time, and the queue is Python state a graph cannot hold;
    - ``--fim-data``: fill-in-the-middle reorders the tokens of a document, so the per-token
      labels would no longer be aligned (the FIM dataset carries none).

    Args:
        args: Megatron's parsed (and validated) arguments.
        reasons: The flags that load labels, for the message.

    Raises:
        EDLConfigError: On an unsupported combination; the message names both flags and values.
    """
    why = ", ".join(reasons)
    impl = getattr(args, "cuda_graph_impl", "none") or "none"
    if impl != "none":
        modules = [getattr(m, "name", str(m)) for m in getattr(args, "cuda_graph_modules", [])]
        captured = sorted(_GRAPH_MODULES_WITH_ROUTER.intersection(modules))
        if impl == "full_iteration" or not modules or captured:
            region = (
                "the whole iteration"
                if impl == "full_iteration"
                else f"--cuda-graph-modules {' '.join(captured)}"
                if captured
                else "the whole layer (empty --cuda-graph-modules)"
            )
            raise EDLConfigError(
                f"domain labels ({why}) cannot be used with --cuda-graph-impl {impl} capturing "
                f"{region}: a graph replay would reuse the labels of the capture. Capture only "
                "attn/mlp (--cuda-graph-modules attn) or set --cuda-graph-impl none"
            )
    if getattr(args, "fim_data", False):
        raise EDLConfigError(
            f"domain labels ({why}) cannot be used with --fim-data: fill-in-the-middle reorders "
            "the tokens of a document and its dataset carries no labels"
        )
