"""``VarianceConfig`` and its flags (megatron_edl.config.variance)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_edl.config import (
    VARIANCE_FLAGS,
    EDLConfigError,
    VarianceAxis,
    VarianceConfig,
    add_args,
)


def test_defaults_are_valid_and_disabled() -> None:
    cfg = VarianceConfig()
    assert not cfg.enabled and cfg.axis is VarianceAxis.TOKENS
    assert (cfg.target, cfg.auto_calibrate) == (1e-3, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.coeff = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        VarianceConfig(0.1)  # type: ignore[misc]  # kw_only


def test_on_with_a_coefficient_and_strings_converted() -> None:
    cfg = VarianceConfig(coeff="0.5", axis="EXPERTS")
    assert cfg.enabled and cfg.coeff == 0.5 and cfg.axis is VarianceAxis.EXPERTS


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("coeff", -0.1, "--moe-variance-loss-coeff must be >= 0 and finite, got -0.1"),
        ("coeff", "much", "--moe-variance-loss-coeff must be a number, got 'much'"),
        ("target", -1.0, "--moe-variance-loss-target must be > 0"),
        ("axis", "rows", "unknown --moe-variance-loss-axis 'rows'; choose from tokens"),
        ("auto_calibrate", "yes", "--moe-specialization-auto-calibrate must be a bool"),
    ],
)
def test_bad_values_name_the_flag(field, value, message) -> None:
    with pytest.raises(EDLConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VarianceConfig(**{field: value})


def test_flags_round_trip_through_argparse() -> None:
    parser = add_args(argparse.ArgumentParser())
    assert VarianceConfig.from_args(parser.parse_args([])) == VarianceConfig()
    args = parser.parse_args(
        "--moe-variance-loss-coeff 0.2 --moe-variance-loss-axis experts "
        "--moe-specialization-auto-calibrate --moe-variance-loss-target 2e-3".split()
    )
    assert VarianceConfig.from_args(args) == VarianceConfig(
        coeff=0.2, axis="experts", auto_calibrate=True, target=2e-3
    )
    assert set(VARIANCE_FLAGS) == {f.name for f in dataclasses.fields(VarianceConfig)}
    with pytest.raises(EDLConfigError, match="--moe-variance-loss-axis"):
        VarianceConfig.from_args(parser.parse_args(["--moe-variance-loss-axis", "x"]))
