"""Tests of ``megatron_edl.config``: EDLConfig validation, flags, layer specs, model checks (the
label options: test_labels.py)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_edl.config import (
    FLAGS,
    EDLConfig,
    EDLConfigError,
    EDLForm,
    EDLScope,
    add_edl_args,
    parse_layers,
    validate_against_model,
)

# ---------------------------------------------------------------------------------------------
# EDLConfig
# ---------------------------------------------------------------------------------------------


def test_defaults_are_valid_and_disabled() -> None:
    cfg = EDLConfig()
    assert cfg.coeff == 0.0
    assert not cfg.enabled
    assert cfg.form is EDLForm.LOG
    assert cfg.eps == 1e-6
    assert cfg.scope is EDLScope.GLOBAL
    assert cfg.accumulate is False
    assert cfg.layers is None


def test_enabled_and_applies_to() -> None:
    cfg = EDLConfig(coeff=0.01)
    assert cfg.enabled
    assert cfg.applies_to(1) and cfg.applies_to(40)
    some = EDLConfig(coeff=0.01, layers=(2, 4))
    assert some.applies_to(2) and not some.applies_to(3)
    assert not EDLConfig(coeff=0.0, layers=(2,)).applies_to(2)


def test_frozen_and_kw_only() -> None:
    cfg = EDLConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.coeff = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        EDLConfig(0.1)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("coeff", -0.1, "--moe-edl-coeff must be >= 0 and finite, got -0.1"),
        ("coeff", math.inf, "--moe-edl-coeff must be >= 0 and finite, got inf"),
        ("coeff", math.nan, "--moe-edl-coeff must be >= 0 and finite, got nan"),
        ("coeff", "lots", "--moe-edl-coeff must be a number, got 'lots'"),
        ("coeff", True, "--moe-edl-coeff must be a number, got True"),
        ("eps", 0.0, "--moe-edl-eps must be > 0 with --moe-edl-form log, got 0.0"),
        ("eps", -1e-6, "--moe-edl-eps must be >= 0 and finite, got -1e-06"),
        ("eps", math.nan, "--moe-edl-eps must be >= 0 and finite, got nan"),
        ("form", "quadratic", "unknown --moe-edl-form 'quadratic'; choose from log, linear"),
        ("scope", "world", "unknown --moe-edl-scope 'world'; choose from global, local"),
        ("fused", "fast", "unknown --moe-edl-fused 'fast'; choose from auto, on, off"),
        ("accumulate", "yes", "--moe-edl-accumulate must be a bool, got 'yes'"),
        ("accumulate", 1, "--moe-edl-accumulate must be a bool, got 1"),
        ("layers", (), "--moe-edl-layers lists no layer, got ()"),
        ("layers", (0, 2), "--moe-edl-layers: layer numbers are 1-based integers, got 0"),
        ("layers", (1.5,), "--moe-edl-layers: layer numbers are 1-based integers, got 1.5"),
        ("layers", 3, "--moe-edl-layers must be a sequence of layer numbers"),
        ("layers", "2-x", "--moe-edl-layers: bad entry '2-x'"),
        ("scores", "tanh", "unknown --moe-edl-scores 'tanh'; choose from router, softmax"),
        ("start_iter", -1, "--moe-edl-start-iter must be >= 0, got -1"),
        ("warmup_iters", 2.5, "--moe-edl-warmup-iters must be an integer, got 2.5"),
        ("window_decay", 1.5, "--moe-edl-window-decay must be in [0, 1), got 1.5"),
    ],
)
def test_invalid_field_names_flag_and_value(field: str, value: object, message: str) -> None:
    with pytest.raises(EDLConfigError) as info:
        EDLConfig(**{field: value})
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_every_flagged_field_has_an_invalid_value_case() -> None:
    """The parametrized table above covers every field (guards against new unchecked fields)."""
    covered = {
        "coeff",
        "eps",
        "form",
        "scope",
        "accumulate",
        "layers",
        "scores",
        "start_iter",
        "warmup_iters",
        "window_decay",
        "fused",
    }
    assert covered == {f.name for f in dataclasses.fields(EDLConfig)}
    assert set(FLAGS) == covered
    assert all(flag.startswith("--moe-edl-") for flag in FLAGS.values())


def test_linear_form_accepts_zero_eps() -> None:
    assert EDLConfig(form="linear", eps=0.0).eps == 0.0


@pytest.mark.parametrize(
    ("field", "text", "member"),
    [
        ("form", "linear", EDLForm.LINEAR),
        ("form", " LOG ", EDLForm.LOG),
        ("scope", "local", EDLScope.LOCAL),
    ],
)
def test_enum_strings_are_converted(field: str, text: str, member: object) -> None:
    value = getattr(EDLConfig(**{field: text}), field)
    assert value is member
    assert value == member.value  # StrEnum compares equal to its string


def test_numeric_normalisation() -> None:
    cfg = EDLConfig(coeff=1, eps="1e-5")
    assert isinstance(cfg.coeff, float) and cfg.coeff == 1.0
    assert cfg.eps == 1e-5


def test_layers_normalised_sorted_unique() -> None:
    assert EDLConfig(layers=[5, 1, 3, 3]).layers == (1, 3, 5)
    assert EDLConfig(layers="4,1-2").layers == (1, 2, 4)
    assert EDLConfig(layers="all").layers is None


# ---------------------------------------------------------------------------------------------
# parse_layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, None),
        ("all", None),
        ("ALL", None),
        ("1", (1,)),
        ("1,3,5-8", (1, 3, 5, 6, 7, 8)),
        (" 2 - 4 , 1 ", (1, 2, 3, 4)),
        ("1-4,3-6", (1, 2, 3, 4, 5, 6)),
        ("7-7", (7,)),
    ],
)
def test_parse_layers(spec: str | None, expected: tuple[int, ...] | None) -> None:
    assert parse_layers(spec) == expected


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("1,,3", "empty entry"),
        ("", "empty entry"),
        ("a", "'a'"),
        ("3-", "'3-'"),
        ("-3", "'-3'"),
        ("1-2-3", "'1-2-3'"),
        ("1.5", "'1.5'"),
        ("0", "'0'"),
        ("0-3", "'0-3'"),
        ("8-5", "reversed range '8-5'"),
        ("\u00b2", "'\u00b2'"),  # a superscript two: str.isdigit says yes, int() refuses it
        ("1-\u00b3", "'1-\u00b3'"),
    ],
)
def test_parse_layers_errors_name_flag_and_token(spec: str, bad: str) -> None:
    with pytest.raises(EDLConfigError) as info:
        parse_layers(spec)
    assert "--moe-edl-layers" in str(info.value)
    assert bad in str(info.value)


def test_parse_layers_range_check() -> None:
    assert parse_layers("1-4", num_layers=4) == (1, 2, 3, 4)
    with pytest.raises(EDLConfigError, match=r"--moe-edl-layers: '3-5' .* beyond the model's 4"):
        parse_layers("1,3-5", num_layers=4)


# ---------------------------------------------------------------------------------------------
# add_edl_args / from_args
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    return add_edl_args(argparse.ArgumentParser(prog="test"))


def test_add_edl_args_returns_parser_with_one_group() -> None:
    parser = argparse.ArgumentParser()
    assert add_edl_args(parser) is parser
    groups = [
        g for g in parser._action_groups if g.title == "expert divergence learning (megatron-edl)"
    ]
    assert len(groups) == 1
    flags = {s for a in groups[0]._group_actions for s in a.option_strings}
    assert flags == set(FLAGS.values())


def test_argparse_defaults_equal_dataclass_defaults() -> None:
    assert EDLConfig.from_args(_parser().parse_args([])) == EDLConfig()


def test_help_renders() -> None:
    text = _parser().format_help()  # raises on an unescaped % in a help string
    for flag in FLAGS.values():
        assert flag in text


def test_round_trip_all_flags() -> None:
    argv = (
        "--moe-edl-coeff 0.05 --moe-edl-form linear --moe-edl-eps 1e-4 --moe-edl-scope local "
        "--moe-edl-accumulate --moe-edl-layers 2,4-5"
    ).split()
    cfg = EDLConfig.from_args(_parser().parse_args(argv))
    assert cfg == EDLConfig(
        coeff=0.05,
        form=EDLForm.LINEAR,
        eps=1e-4,
        scope=EDLScope.LOCAL,
        accumulate=True,
        layers=(2, 4, 5),
    )
    assert cfg.enabled


def test_from_args_checks_layers_against_num_layers() -> None:
    args = _parser().parse_args(["--moe-edl-layers", "1-9"])
    args.num_layers = 8
    with pytest.raises(EDLConfigError, match="beyond the model's 8 layers"):
        EDLConfig.from_args(args)


def test_from_args_duck_typed_and_missing_attributes_default() -> None:
    args = argparse.Namespace(moe_edl_coeff=0.2, moe_edl_layers=(3, 1))
    cfg = EDLConfig.from_args(args)
    assert cfg.coeff == 0.2 and cfg.layers == (1, 3) and cfg.form is EDLForm.LOG


def test_config_module_imports_neither_megatron_nor_torch() -> None:
    code = (
        "import sys, megatron_edl.config; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'torch')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])


# ---------------------------------------------------------------------------------------------
# validate_against_model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [None, 0])
def test_validate_no_moe(num_experts: int | None) -> None:
    with pytest.raises(EDLConfigError) as info:
        validate_against_model(EDLConfig(coeff=0.1), num_moe_experts=num_experts, num_layers=4)
    assert "--moe-edl-coeff" in str(info.value) and "--num-experts" in str(info.value)


def test_validate_disabled_needs_no_moe() -> None:
    assert validate_against_model(EDLConfig(), num_moe_experts=None, num_layers=4) == ()


def test_validate_all_layers_freq_int() -> None:
    cfg = EDLConfig(coeff=0.1)
    assert validate_against_model(cfg, num_moe_experts=8, num_layers=4) == (1, 2, 3, 4)
    # Megatron: layer_number l is MoE when (l - 1) % N == 0.
    out = validate_against_model(cfg, num_moe_experts=8, num_layers=7, moe_layer_freq=3)
    assert out == (1, 4, 7)


def test_validate_non_moe_layer_freq_int() -> None:
    cfg = EDLConfig(coeff=0.1, layers=(1, 2, 3))
    with pytest.raises(EDLConfigError) as info:
        validate_against_model(cfg, num_moe_experts=8, num_layers=6, moe_layer_freq=2)
    message = str(info.value)
    assert "--moe-edl-layers" in message and "[2]" in message and "[1, 3, 5]" in message
    ok = EDLConfig(coeff=0.1, layers=(1, 5))
    assert validate_against_model(ok, num_moe_experts=8, num_layers=6, moe_layer_freq=2) == (1, 5)


def test_validate_non_moe_layer_freq_list() -> None:
    pattern = [0, 1, 1, 0]
    cfg = EDLConfig(coeff=0.1, layers=(1, 2, 4))
    with pytest.raises(EDLConfigError, match=r"layers \[1, 4\] that are not MoE layers"):
        validate_against_model(cfg, num_moe_experts=8, num_layers=4, moe_layer_freq=pattern)
    every = EDLConfig(coeff=0.1)
    out = validate_against_model(every, num_moe_experts=8, num_layers=4, moe_layer_freq=pattern)
    assert out == (2, 3)


def test_validate_layer_beyond_model() -> None:
    cfg = EDLConfig(coeff=0.1, layers=(2, 9))
    with pytest.raises(EDLConfigError, match=r"--moe-edl-layers lists layers \[9\] beyond"):
        validate_against_model(cfg, num_moe_experts=8, num_layers=4)


@pytest.mark.parametrize(
    ("freq", "message"),
    [
        (0, "--moe-layer-freq must be >= 1, got 0"),
        ([1, 0, 1], "list of 4 zeros and ones"),
        ([1, 2, 1, 1], "list of 4 zeros and ones"),
        ([0, 0, 0, 0], "makes no layer an MoE layer"),
        ("1", "--moe-layer-freq must be an int or a list of 0/1"),
    ],
)
def test_validate_bad_moe_layer_freq(freq: object, message: str) -> None:
    with pytest.raises(EDLConfigError, match=message):
        validate_against_model(
            EDLConfig(coeff=0.1), num_moe_experts=8, num_layers=4, moe_layer_freq=freq
        )
