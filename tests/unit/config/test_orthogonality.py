"""``OrthogonalityConfig``, its flags and its checks against the model
(megatron_edl.config.orthogonality)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_edl.config import (
    ORTHOGONALITY_FLAGS,
    EDLConfigError,
    OrthogonalityConfig,
    add_args,
    validate_orthogonality_against_model,
)


def test_defaults_are_valid_and_disabled() -> None:
    cfg = OrthogonalityConfig()
    assert not cfg.enabled
    assert (cfg.eps, cfg.target, cfg.auto_calibrate) == (1e-6, 1e-4, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.coeff = 1.0  # type: ignore[misc]
    assert OrthogonalityConfig(coeff="0.5").enabled


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("coeff", float("inf"), "--moe-ortho-loss-coeff must be >= 0 and finite, got inf"),
        ("coeff", "much", "--moe-ortho-loss-coeff must be a number, got 'much'"),
        ("eps", 0.0, "--moe-ortho-loss-eps must be > 0 and finite, got 0.0"),
        ("target", float("nan"), "--moe-ortho-loss-target must be > 0"),
        ("auto_calibrate", 1, "--moe-specialization-auto-calibrate must be a bool"),
    ],
)
def test_bad_values_name_the_flag(field, value, message) -> None:
    with pytest.raises(EDLConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OrthogonalityConfig(**{field: value})


def test_flags_round_trip_through_argparse() -> None:
    parser = add_args(argparse.ArgumentParser())
    assert OrthogonalityConfig.from_args(parser.parse_args([])) == OrthogonalityConfig()
    args = parser.parse_args(
        "--moe-ortho-loss-coeff 0.3 --moe-ortho-loss-eps 1e-5 "
        "--moe-specialization-auto-calibrate --moe-ortho-loss-target 3e-4".split()
    )
    assert OrthogonalityConfig.from_args(args) == OrthogonalityConfig(
        coeff=0.3, eps=1e-5, auto_calibrate=True, target=3e-4
    )
    assert set(ORTHOGONALITY_FLAGS) == {f.name for f in dataclasses.fields(OrthogonalityConfig)}


def test_validation_against_the_model() -> None:
    ok = dict(moe_router_topk=2, token_dispatcher_type="alltoall")
    on = OrthogonalityConfig(coeff=0.1)
    validate_orthogonality_against_model(on, **ok)
    validate_orthogonality_against_model(OrthogonalityConfig(), **{**ok, "moe_router_topk": 1})
    cases = [
        ({"moe_router_topk": 1}, "needs --moe-router-topk >= 2"),
        ({"token_dispatcher_type": "x"}, "allgather, alltoall and flex, got 'x'"),
        (
            {"token_dispatcher_type": "flex", "flex_dispatcher_backend": "hybridep"},
            "--moe-flex-dispatcher-backend hybridep",
        ),
        (
            {"token_dispatcher_type": "flex", "flex_dispatcher_backend": "ncclep"},
            "--moe-flex-dispatcher-backend ncclep",
        ),
        ({"apply_probs_on_input": True}, "--moe-apply-probs-on-input"),
        (
            {"overlap_moe_expert_parallel_comm": True},
            "--moe-ortho-loss-coeff 0.1 cannot be used with --overlap-moe-expert-parallel-comm",
        ),
    ]
    for changes, message in cases:
        with pytest.raises(EDLConfigError, match=message):
            validate_orthogonality_against_model(on, **{**ok, **changes})
    # flex with DeepEP (the default backend) is supported; the backend of another dispatcher
    # type is not read.
    validate_orthogonality_against_model(on, **{**ok, "token_dispatcher_type": "flex"})
    validate_orthogonality_against_model(on, **{**ok, "flex_dispatcher_backend": "hybridep"})
