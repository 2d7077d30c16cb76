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
:mod:`.variance`                   the variance loss (``VarianceConfig``)
:mod:`.orthogonality`              the orthogonality loss (``OrthogonalityConfig``)
:mod:`.calibration`                what those two share: their argument group, the
                                   auto-calibration flag, the MoE and CUDA-graph checks
:mod:`.convert`                    the conversions every branch uses (errors name the flag)
:mod:`.telemetry`                  the routing telemetry's flags (``TelemetryConfig``)
=================================  =============================================================

A new flag goes into the branch it configures: its ``add_*_args`` defines it, its dataclass
holds and validates the value (errors are :class:`EDLConfigError` naming the flag), and
:meth:`EDLRunConfig.from_args` reads it. The package imports neither ``megatron`` nor ``torch``:
the argparse namespace is duck-typed. Specification: ``docs/method.md`` sections 2 and 3.
"""

from megatron_edl.config.calibration import (
    AUTO_CALIBRATE_FLAG,
    SPECIALIZATION_GROUP_TITLE,
    add_calibrated_loss_args,
)
from megatron_edl.config.edl import (
    ARGUMENT_GROUP_TITLE,
    FLAGS,
    EDLConfig,
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
from megatron_edl.config.orthogonality import (
    ORTHOGONALITY_FLAGS,
    OrthogonalityConfig,
    add_orthogonality_args,
    validate_orthogonality_against_model,
)
from megatron_edl.config.run import EDLRunConfig, add_args
from megatron_edl.config.telemetry import Phase, TelemetryConfig, add_telemetry_args
from megatron_edl.config.variance import (
    VARIANCE_FLAGS,
    VarianceAxis,
    VarianceConfig,
    add_variance_args,
)
from megatron_edl.core.options import EDLAggregation, EDLConfigError, EDLForm

__all__ = [
    "ARGUMENT_GROUP_TITLE",
    "AUTO_CALIBRATE_FLAG",
    "FLAGS",
    "LABEL_FLAGS",
    "ORTHOGONALITY_FLAGS",
    "SPECIALIZATION_GROUP_TITLE",
    "VARIANCE_FLAGS",
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
    "OrthogonalityConfig",
    "Phase",
    "TelemetryConfig",
    "VarianceAxis",
    "VarianceConfig",
    "add_args",
    "add_calibrated_loss_args",
    "add_edl_args",
    "add_label_args",
    "add_orthogonality_args",
    "add_telemetry_args",
    "add_variance_args",
    "check_supported",
    "label_reasons",
    "parse_layers",
    "validate_against_model",
    "validate_orthogonality_against_model",
]
