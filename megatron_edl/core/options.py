"""The option values and the error type the pure math shares with the config tree.

``megatron_edl.config`` builds on these (it re-exports them); they live in ``core`` so that the
math depends on nothing outside ``core`` (the import layering in pyproject.toml).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["EDLAggregation", "EDLConfigError", "EDLForm"]


class EDLConfigError(ValueError):
    """A user-controlled EDL setting (flag, config field, label map) is invalid."""


class EDLForm(StrEnum):
    """Form of the per-pair loss (method.md section 2)."""

    LOG = "log"
    """The paper's ``-log(JSD + eps)``, averaged over domain pairs."""
    LINEAR = "linear"
    """``-JSD``, averaged over domain pairs (decision)."""


class EDLAggregation(StrEnum):
    """How tokens are weighted inside a domain mean."""

    SEGMENT = "segment"
    """Every segment (run of one document inside a sample) weighs the same (the paper's)."""
    TOKEN = "token"
    """Every token weighs the same."""
    SAMPLE = "sample"
    """One label per sample; every sample weighs the same."""
