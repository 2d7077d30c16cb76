"""megatron-edl's configuration: one tree of frozen dataclasses, one module per branch.

=================================  =============================================================
module                             holds
=================================  =============================================================
:mod:`.run`                        ``EDLRunConfig``, the root (built once by ``from_args``);
                                   ``add_args``, the entry point of every flag; the launcher's
                                   ``--cpu`` and ``--config-yaml``
:mod:`.labels`                     whether domain labels are loaded, where they come from and
                                   how they become loss domains (``LabelsConfig``: label map,
                                   random control, aggregation, resolved domains);
                                   ``check_supported``
:mod:`.edl`                        the EDL loss (``EDLConfig``, its ``--moe-edl-*`` flags)
:mod:`.layers`                     ``--moe-edl-layers`` and the checks against the model shape
:mod:`.specialization`             the variance/orthogonality losses (``SpecializationConfig``)
:mod:`.telemetry`                  the routing telemetry's flags (``TelemetryConfig``)
=================================  =============================================================

A new flag goes into the branch it configures: its ``add_*_args`` defines it, its dataclass
holds and validates the value (errors are :class:`EDLConfigError` naming the flag), and
:meth:`EDLRunConfig.from_args` reads it. The package imports neither ``megatron`` nor ``torch``:
the argparse namespace is duck-typed. Specification: ``docs/method.md`` sections 2 and 3.
"""

from megatron_edl.config._convert import EDLConfigError
from megatron_edl.config.edl import (
    ARGUMENT_GROUP_TITLE,
    FLAGS,
    EDLConfig,
    EDLForm,
    EDLFused,
    EDLScope,
    EDLScores,
    add_edl_args,
)
from megatron_edl.config.labels import (
    LABEL_FLAGS,
    LabelControl,
    LabelOrigin,
    LabelsConfig,
    add_label_args,
    check_supported,
    label_reasons,
)
from megatron_edl.config.layers import parse_layers, validate_against_model
from megatron_edl.config.run import EDLRunConfig, add_args
from megatron_edl.config.specialization import (
    SPECIALIZATION_FLAGS,
    SPECIALIZATION_GROUP_TITLE,
    SpecializationConfig,
    VarianceAxis,
    add_specialization_args,
    validate_specialization_against_model,
)
from megatron_edl.config.telemetry import Phase, TelemetryConfig, add_telemetry_args
from megatron_edl.core.options import EDLAggregation

__all__ = [
    "ARGUMENT_GROUP_TITLE",
    "FLAGS",
    "LABEL_FLAGS",
    "SPECIALIZATION_FLAGS",
    "SPECIALIZATION_GROUP_TITLE",
    "EDLAggregation",
    "EDLConfig",
    "EDLConfigError",
    "EDLForm",
    "EDLFused",
    "EDLRunConfig",
    "EDLScope",
    "EDLScores",
    "LabelControl",
    "LabelOrigin",
    "LabelsConfig",
    "Phase",
    "SpecializationConfig",
    "TelemetryConfig",
    "VarianceAxis",
    "add_args",
    "add_edl_args",
    "add_label_args",
    "add_specialization_args",
    "add_telemetry_args",
    "check_supported",
    "label_reasons",
    "parse_layers",
    "validate_against_model",
    "validate_specialization_against_model",
]
