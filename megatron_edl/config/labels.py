"""The domain-labels branch of the config tree: when labels are loaded, where they come from and
how the stored labels become loss domains.

Domain labels are loaded when any flag needs them (:func:`label_reasons`): the EDL loss
(``--moe-edl-coeff`` > 0), the per-domain validation loss (``--moe-edl-eval-per-domain``) or the
routing telemetry (:mod:`megatron_edl.config.telemetry`). ``LabelsConfig`` says where they come
from: the ``.domains`` sidecars of ``--data-path`` (default), one domain per blend prefix
(``--moe-edl-domains-per-prefix``), or synthetic domains of ``--mock-data``
(``--moe-edl-mock-domains``); and how the stored labels become loss domains, which the datasets,
the routers and the routing telemetry share whether or not the EDL loss is on: the label map
(``--moe-edl-label-map``), the random-label control (``--moe-edl-labels random``,
``--moe-edl-random-seed``), the token weighting inside a domain mean
(``--moe-edl-aggregation``), and the resolved ``num_domains``/``domain_names``.

Every field is validated once, in ``__post_init__``; every error is an ``EDLConfigError`` whose
message names the flag and the bad value. :func:`check_supported` refuses the Megatron settings
labels cannot work with. Imports neither ``megatron`` nor ``torch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from megatron_edl.config.convert import EDLConfigError, as_enum, as_int, as_names, choices
from megatron_edl.config.edl import FLAGS
from megatron_edl.config.telemetry import flags_in_use
from megatron_edl.core.options import EDLAggregation

__all__ = [
    "DOMAINS_PER_PREFIX_FLAG",
    "EVAL_PER_DOMAIN_FLAG",
    "LABELS_GROUP_TITLE",
    "LABEL_FLAGS",
    "MOCK_DOMAINS_FLAG",
    "LabelControl",
    "LabelOrigin",
    "LabelsConfig",
    "add_label_args",
    "check_loss_domains",
    "check_supported",
    "cuda_graph_capturing_router",
    "label_flag_values",
    "label_reasons",
]

DOMAINS_PER_PREFIX_FLAG = "--moe-edl-domains-per-prefix"
EVAL_PER_DOMAIN_FLAG = "--moe-edl-eval-per-domain"
MOCK_DOMAINS_FLAG = "--moe-edl-mock-domains"
LABELS_GROUP_TITLE = "domain labels (megatron-edl)"

LABEL_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "label_map": "--moe-edl-label-map",
        "control": "--moe-edl-labels",
        "random_seed": "--moe-edl-random-seed",
        "aggregation": "--moe-edl-aggregation",
    }
)
"""LabelsConfig field -> command-line flag, for the fields of how stored labels become loss
domains (``num_domains``/``domain_names`` have none: they come from the label map or the data;
``reasons`` and ``origin`` are derived from other flags). The namespace attribute is the flag's
argparse ``dest``, e.g. ``--moe-edl-label-map`` -> ``args.moe_edl_label_map``."""


def _flag(field: str) -> str:
    """The flag of ``field``, or the field name itself when it has no flag."""
    return LABEL_FLAGS.get(field, field)


def _dest(field: str) -> str:
    """The argparse namespace attribute of ``field``'s flag."""
    return LABEL_FLAGS[field].removeprefix("--").replace("-", "_")


class LabelOrigin(StrEnum):
    """Where the stored labels of the documents come from."""

    SIDECAR = "sidecar"
    """The ``.domains`` sidecar next to each ``--data-path`` prefix."""
    PREFIX = "prefix"
    """One domain per blend prefix (``--moe-edl-domains-per-prefix``)."""
    MOCK = "mock"
    """``--mock-data``: document i belongs to domain i mod ``--moe-edl-mock-domains``."""


class LabelControl(StrEnum):
    """Which labels the loss domains are: the data's, or the random-label control."""

    DATA = "data"
    """The labels stored with the data, through the label map."""
    RANDOM = "random"
    """The control of the paper: the documents' labels randomly permuted (seeded)."""


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


def label_flag_values(args: Any) -> dict[str, Any]:
    """The values of the :data:`LABEL_FLAGS` that ``args`` has (duck-typed), by field name;
    a missing attribute is left out (the field's default)."""
    return {
        field: getattr(args, _dest(field)) for field in LABEL_FLAGS if hasattr(args, _dest(field))
    }


@dataclass(frozen=True, kw_only=True)
class LabelsConfig:
    """Domain labels of a run that loads them (:meth:`from_args`; ``None`` for one that doesn't).

    Strings are accepted for the enum fields (case-insensitive); ``__post_init__`` converts them,
    so the stored values always have the annotated types. Use ``dataclasses.replace`` to derive a
    copy (for instance to fill in ``num_domains``); it validates again.
    """

    reasons: tuple[str, ...] = ()
    """The flags that need the labels (:func:`label_reasons`), for messages."""

    origin: LabelOrigin = LabelOrigin.SIDECAR
    """Where the documents' stored labels come from."""

    domains_per_prefix: str | None = None
    """``--moe-edl-domains-per-prefix``: YAML of blend prefix (path or glob) -> domain name."""

    mock_domains: int = 4
    """``--moe-edl-mock-domains``: number of synthetic domains with ``--mock-data``."""

    eval_per_domain: bool = False
    """``--moe-edl-eval-per-domain`` was given (the report is per domain whenever labels are
    loaded)."""

    label_map: str | None = None
    """Path of the YAML label map (stored data labels -> loss domains); ``None`` uses the
    stored ids as they are."""

    control: LabelControl = LabelControl.DATA
    """Label source (``--moe-edl-labels``): ``data`` or ``random`` (the paper's random-label
    control)."""

    random_seed: int = 1234
    """Seed of the label permutation of the ``random`` control; >= 0."""

    aggregation: EDLAggregation = EDLAggregation.SEGMENT
    """Token weighting inside a domain mean: ``segment`` (paper), ``token`` or ``sample``. The
    datasets compute the per-token weights from it, so the EDL loss and the routing telemetry
    both depend on it."""

    num_domains: int | None = None
    """Number of loss domains D; ``None`` until the label map or the data tells. >= 1."""

    domain_names: tuple[str, ...] | None = None
    """Names of the loss domains, in id order (``num_domains`` of them), for logs and reports;
    ``None`` until the label map or the data tells."""

    def __post_init__(self) -> None:
        """Validate and normalise the label fields.

        Raises:
            EDLConfigError: On any invalid field; the message names the flag and the value.
        """
        label_map = self.label_map
        if isinstance(label_map, os.PathLike):
            label_map = os.fspath(label_map)
        if label_map is not None and (not isinstance(label_map, str) or not label_map.strip()):
            raise EDLConfigError(
                f"{_flag('label_map')} must be a non-empty path, got {self.label_map!r}"
            )
        values: dict[str, Any] = {
            "reasons": tuple(self.reasons),
            "origin": as_enum("origin", self.origin, LabelOrigin),
            "aggregation": as_enum(_flag("aggregation"), self.aggregation, EDLAggregation),
            "label_map": label_map,
            "control": as_enum(_flag("control"), self.control, LabelControl),
            "random_seed": as_int(_flag("random_seed"), self.random_seed, minimum=0),
            "mock_domains": as_int(MOCK_DOMAINS_FLAG, self.mock_domains, minimum=1),
            "num_domains": (
                None
                if self.num_domains is None
                else as_int(_flag("num_domains"), self.num_domains, minimum=1)
            ),
        }
        values["domain_names"] = as_names(self.domain_names, values["num_domains"])
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_args(cls, args: Any, reasons: Sequence[str]) -> LabelsConfig:
        """The labels config of Megatron's parsed ``args``, refusing what labels cannot do.

        Args:
            args: Megatron's parsed arguments (``mock_data``, ``sft``, ``hybrid_context_parallel``
                and the flags of :func:`add_label_args`).
            reasons: :func:`label_reasons` (non-empty).

        Returns:
            The validated config (``num_domains``/``domain_names`` are ``None``: the launcher's
            domain resolver fills them in).

        Raises:
            EDLConfigError: ``--hybrid-context-parallel``; ``--sft`` without
                ``--moe-edl-domains-per-prefix`` (or with ``--mock-data``); an invalid value of
                a flag of :data:`LABEL_FLAGS`.
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
            **label_flag_values(args),
        )


def add_label_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of where the labels come from and how they become loss domains, in their own
    argument group.

    Defaults equal the ``LabelsConfig`` defaults. Enum flags take plain strings;
    ``LabelsConfig.from_args`` validates them and names the valid choices on error.

    Args:
        parser: Megatron's (or any) argument parser.

    Returns:
        The same parser, as Megatron's ``extra_args_provider`` expects.
    """
    default = {f.name: f.default for f in dataclasses.fields(LabelsConfig)}
    group = parser.add_argument_group(title=LABELS_GROUP_TITLE)
    group.add_argument(
        LABEL_FLAGS["aggregation"],
        type=str,
        default=default["aggregation"].value,
        help=f"Token weighting inside a domain mean: {choices(EDLAggregation)}. segment = "
        "every document segment weighs the same (the paper's), token = every token, "
        "sample = one label per sample. "
        "Default: %(default)s.",
    )
    group.add_argument(
        LABEL_FLAGS["label_map"],
        type=str,
        default=default["label_map"],
        help="YAML file mapping the stored data labels to loss domains (groups, ignored "
        "labels). Default: use the stored ids as they are.",
    )
    group.add_argument(
        LABEL_FLAGS["control"],
        type=str,
        default=default["control"].value,
        help=f"Label source: {choices(LabelControl)}. random = the documents' labels randomly "
        "permuted (the paper's control). Default: %(default)s.",
    )
    group.add_argument(
        LABEL_FLAGS["random_seed"],
        type=int,
        default=default["random_seed"],
        help="Seed of the label permutation of --moe-edl-labels random. Default: %(default)s.",
    )
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


def cuda_graph_capturing_router(args: Any) -> str | None:
    """The CUDA-graph setting of ``args`` whose graphs contain the router, as the message names
    it (e.g. ``"--cuda-graph-impl local capturing the whole layer (empty
    --cuda-graph-modules)"``), or ``None`` when no graph contains it.

    Captured: ``--cuda-graph-impl full_iteration``; ``local`` or ``transformer_engine`` with an
    empty ``--cuda-graph-modules`` (the whole layer) or one naming ``moe``, ``moe_router`` or
    ``moe_preprocess``. Those regions hold the router, and ``moe`` and the whole layer also the
    token dispatcher's combine.
    """
    impl = getattr(args, "cuda_graph_impl", "none") or "none"
    if impl == "none":
        return None
    modules = [getattr(m, "name", str(m)) for m in getattr(args, "cuda_graph_modules", [])]
    captured = sorted(_GRAPH_MODULES_WITH_ROUTER.intersection(modules))
    if impl == "full_iteration":
        region = "the whole iteration"
    elif captured:
        region = f"--cuda-graph-modules {' '.join(captured)}"
    elif not modules:
        region = "the whole layer (empty --cuda-graph-modules)"
    else:
        return None
    return f"--cuda-graph-impl {impl} capturing {region}"


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
    capture = cuda_graph_capturing_router(args)
    if capture is not None:
        raise EDLConfigError(
            f"domain labels ({why}) cannot be used with {capture}: a graph replay would reuse "
            "the labels of the capture. Capture only attn/mlp (--cuda-graph-modules attn) or set "
            "--cuda-graph-impl none"
        )
    if getattr(args, "fim_data", False):
        raise EDLConfigError(
            f"domain labels ({why}) cannot be used with --fim-data: fill-in-the-middle reorders "
            "the tokens of a document and its dataset carries no labels"
        )


def check_loss_domains(labels: LabelsConfig, num_used: int) -> None:
    """Refuse the EDL loss with fewer than two loss domains in use, naming where they come from.

    With M < 2 present domains the loss is 0 by definition (docs/method.md section 2): a run
    whose labels give fewer than two loss domains would train with ``edl_loss 0`` and say
    nothing. Labels without the loss (per-domain validation, telemetry) are not refused.

    Args:
        labels: The run's label options (``reasons`` tell whether the loss is on).
        num_used: The loss domains the data's documents use (after the label map).

    Raises:
        EDLConfigError: The EDL loss is on and ``num_used < 2``; names the flag or file.
    """
    if FLAGS["coeff"] not in labels.reasons or num_used >= 2:
        return
    if labels.label_map is not None:
        target = "no loss domain (every label to null)" if num_used == 0 else "1 loss domain"
        where = f"the label map {labels.label_map} ({_flag('label_map')}) maps the data to {target}"
    elif labels.origin is LabelOrigin.MOCK:
        where = f"{MOCK_DOMAINS_FLAG} {labels.mock_domains} gives {num_used} domain"
    elif labels.origin is LabelOrigin.PREFIX:
        where = (
            f"the per-prefix domains {labels.domains_per_prefix} ({DOMAINS_PER_PREFIX_FLAG}) "
            f"give the blend's prefixes {num_used} domain(s)"
        )
    else:
        where = f"the .domains sidecars of --data-path use {num_used} label id(s)"
    raise EDLConfigError(
        f"EDL ({FLAGS['coeff']}) needs at least two loss domains, but {where}: the loss would "
        f"stay 0. Use labels with two or more domains, or set {FLAGS['coeff']} 0 "
        f"({EVAL_PER_DOMAIN_FLAG} alone reports per-domain losses)"
    )
