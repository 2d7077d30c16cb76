"""The root of the config tree: one ``EDLRunConfig`` per run, built once from Megatron's args.

Branches (one module each): :mod:`~megatron_edl.config.labels` (whether domain labels are loaded,
where they come from and how they become loss domains), :mod:`~megatron_edl.config.edl` (the EDL
loss), :mod:`~megatron_edl.config.variance` and :mod:`~megatron_edl.config.orthogonality` (the
losses of arXiv 2505.22323, sharing :mod:`~megatron_edl.config.calibration`),
:mod:`~megatron_edl.config.telemetry` (routing statistics). Each loss of
:mod:`megatron_edl.integration.losses.registry` names the field of its branch here.
:func:`add_args` defines every megatron-edl flag (Megatron's ``extra_args_provider`` calls it);
:meth:`EDLRunConfig.from_args` reads and validates them after Megatron parsed and validated its
own, and the launcher passes the result explicitly to the dataset provider, the step functions
and the layer spec. Imports neither ``megatron`` nor ``torch``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_edl.config.calibration import add_calibrated_loss_args, check_moe_and_graphs
from megatron_edl.config.edl import EDLConfig, add_edl_args
from megatron_edl.config.labels import (
    LabelsConfig,
    add_label_args,
    check_loss_domains,
    check_supported,
    cuda_graph_capturing_router,
    label_flag_values,
    label_reasons,
)
from megatron_edl.config.layers import validate_against_model
from megatron_edl.config.orthogonality import (
    ORTHOGONALITY_FLAGS,
    OrthogonalityConfig,
    add_orthogonality_args,
    validate_orthogonality_against_model,
)
from megatron_edl.config.telemetry import TelemetryConfig, add_telemetry_args
from megatron_edl.config.variance import VARIANCE_FLAGS, VarianceConfig, add_variance_args

__all__ = [
    "CONFIG_FLAG",
    "CPU_FLAG",
    "LAUNCHER_GROUP_TITLE",
    "DomainResolver",
    "EDLRunConfig",
    "add_args",
    "add_launcher_args",
]

CPU_FLAG = "--cpu"
CONFIG_FLAG = "--config-yaml"
LAUNCHER_GROUP_TITLE = "megatron-edl"

DomainResolver = Callable[[Any, LabelsConfig], tuple[int, tuple[str, ...]]]
"""``(args, labels) -> (num_domains, domain_names)``: reads the label map, the data's label
vocabulary or the mock domains (the launcher's reads files; see
``megatron_edl.integration.install.resolve_domains``)."""


@dataclass(frozen=True, kw_only=True)
class EDLRunConfig:
    """Everything megatron-edl adds to one run, validated (:meth:`from_args`)."""

    labels: LabelsConfig | None = None
    """Where the domain labels come from and how they become loss domains, with the resolved
    ``num_domains``/``domain_names``; ``None``: the run loads none (stock data and step)."""

    edl: EDLConfig = dataclasses.field(default_factory=EDLConfig)
    """The EDL loss options (``coeff == 0``, ``enabled`` false: the loss is off)."""

    variance: VarianceConfig = dataclasses.field(default_factory=VarianceConfig)
    """The variance loss (label-free; ``enabled`` false when off)."""

    orthogonality: OrthogonalityConfig = dataclasses.field(default_factory=OrthogonalityConfig)
    """The orthogonality loss (label-free; ``enabled`` false when off)."""

    telemetry: TelemetryConfig = dataclasses.field(default_factory=TelemetryConfig)
    """The routing telemetry (``enabled`` false when off)."""

    @property
    def edl_loss(self) -> bool:
        """Whether the EDL loss is on."""
        return self.edl.enabled

    @classmethod
    def from_args(cls, args: Any, *, resolve_domains: DomainResolver | None = None) -> EDLRunConfig:
        """Read and validate every megatron-edl flag of Megatron's parsed ``args``.

        Order of the checks (the first failing one is reported): the EDL options, the label
        options (label map, random control, aggregation: checked whether or not labels are
        loaded), the Megatron settings labels cannot work with, the EDL options against the
        model, the label source, the domain names (``resolve_domains``, which reads files), at
        least two loss domains with the EDL loss on (``check_loss_domains``), the
        variance and orthogonality options against the model, the telemetry flags.

        Args:
            args: Megatron's parsed (and validated) arguments, or any object with the
                attributes :func:`add_args` and Megatron define.
            resolve_domains: Fills in the labels' ``num_domains``/``domain_names``; ``None``
                leaves them unset.

        Raises:
            EDLConfigError: An invalid or unsupported setting (names the flag and the value).
            ValueError: Inconsistent telemetry flags. Whatever ``resolve_domains`` raises (a
                missing label file: ``FileNotFoundError``).
        """
        reasons = label_reasons(args)
        edl = EDLConfig.from_args(args)
        LabelsConfig(**label_flag_values(args))  # the label flags are checked in any case
        labels = None
        if reasons:
            check_supported(args, reasons)
            if edl.enabled:
                validate_against_model(
                    edl,
                    num_moe_experts=args.num_experts,
                    num_layers=args.num_layers,
                    moe_layer_freq=args.moe_layer_freq,
                )
            labels = LabelsConfig.from_args(args, reasons)
            if resolve_domains is not None:
                num_domains, names = resolve_domains(args, labels)
                labels = dataclasses.replace(labels, num_domains=num_domains, domain_names=names)
                check_loss_domains(labels, num_domains)  # EDL needs two domains or more
        variance = VarianceConfig.from_args(args)
        orthogonality = OrthogonalityConfig.from_args(args)
        check_moe_and_graphs(
            [
                (flags["coeff"], cfg.coeff)
                for flags, cfg in ((VARIANCE_FLAGS, variance), (ORTHOGONALITY_FLAGS, orthogonality))
                if cfg.enabled
            ],
            num_moe_experts=args.num_experts,
            cuda_graph_capture=cuda_graph_capturing_router(args),
        )
        validate_orthogonality_against_model(
            orthogonality,
            moe_router_topk=args.moe_router_topk,
            token_dispatcher_type=args.moe_token_dispatcher_type,
            flex_dispatcher_backend=getattr(args, "moe_flex_dispatcher_backend", "deepep"),
            apply_probs_on_input=getattr(args, "moe_apply_probs_on_input", False),
            overlap_moe_expert_parallel_comm=getattr(
                args, "overlap_moe_expert_parallel_comm", False
            ),
        )
        telemetry = TelemetryConfig.from_args(args) if labels is not None else TelemetryConfig()
        return cls(
            labels=labels,
            edl=edl,
            variance=variance,
            orthogonality=orthogonality,
            telemetry=telemetry,
        )


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The launcher's own flags (``python -m megatron_edl.pretrain_gpt``), in one group."""
    group = parser.add_argument_group(title=LAUNCHER_GROUP_TITLE)
    group.add_argument(
        CPU_FLAG,
        action="store_true",
        help="Run on CPU with gloo (tests, CI, the quickstart): applies megatron_edl.cpu and sets "
        "the flags CPU needs. Refused when CUDA is available.",
    )
    group.add_argument(
        CONFIG_FLAG,
        metavar="YAML",
        help="Read flags from a YAML run config (megatron_edl.yaml_config; examples/configs), "
        "expanded in place: flags after it override the file's.",
    )
    return parser


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every megatron-edl flag, one argument group per branch (``extra_args_provider``)."""
    parser = add_edl_args(parser)
    parser = add_calibrated_loss_args(parser, add_variance_args, add_orthogonality_args)
    parser = add_label_args(parser)
    parser = add_launcher_args(parser)
    return add_telemetry_args(parser)
