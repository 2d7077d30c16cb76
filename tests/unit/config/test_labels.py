"""Tests of ``megatron_edl.config.labels``: the label options of ``LabelsConfig`` (label map,
random control, aggregation, resolved domains), their validation and their flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_edl.config import (
    LABEL_FLAGS,
    EDLAggregation,
    EDLConfigError,
    LabelControl,
    LabelOrigin,
    LabelsConfig,
    add_label_args,
)

# ---------------------------------------------------------------------------------------------
# LabelsConfig
# ---------------------------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    cfg = LabelsConfig()
    assert cfg.origin is LabelOrigin.SIDECAR
    assert cfg.aggregation is EDLAggregation.SEGMENT
    assert cfg.label_map is None
    assert cfg.control is LabelControl.DATA
    assert cfg.random_seed == 1234
    assert cfg.num_domains is None


def test_frozen_and_kw_only() -> None:
    cfg = LabelsConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.random_seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        LabelsConfig(())  # type: ignore[misc]


def test_replace_revalidates() -> None:
    cfg = dataclasses.replace(LabelsConfig(random_seed=5), num_domains=3)
    assert cfg.num_domains == 3 and cfg.random_seed == 5
    with pytest.raises(EDLConfigError, match="num_domains must be >= 1, got 0"):
        dataclasses.replace(cfg, num_domains=0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "aggregation",
            "foo",
            "unknown --moe-edl-aggregation 'foo'; choose from segment, token, sample",
        ),
        ("aggregation", 3, "unknown --moe-edl-aggregation 3; choose from segment, token, sample"),
        ("control", "shuffled", "unknown --moe-edl-labels 'shuffled'; choose from data, random"),
        ("label_map", "", "--moe-edl-label-map must be a non-empty path, got ''"),
        ("label_map", 7, "--moe-edl-label-map must be a non-empty path, got 7"),
        ("random_seed", -1, "--moe-edl-random-seed must be >= 0, got -1"),
        ("random_seed", 1.5, "--moe-edl-random-seed must be an integer, got 1.5"),
        ("num_domains", 0, "num_domains must be >= 1, got 0"),
        ("num_domains", "three", "num_domains must be an integer, got 'three'"),
        ("domain_names", "ab", "domain_names must be a sequence of non-empty strings, got 'ab'"),
        ("domain_names", ("a", ""), "domain_names must be a sequence of non-empty strings"),
        ("domain_names", ("a", "a"), "domain names must be unique, got ('a', 'a')"),
    ],
)
def test_invalid_field_names_flag_and_value(field: str, value: object, message: str) -> None:
    with pytest.raises(EDLConfigError) as info:
        LabelsConfig(**{field: value})
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_every_label_flag_field_has_an_invalid_value_case() -> None:
    """The parametrized table above covers every label option (guards against new unchecked
    fields)."""
    covered = {"aggregation", "control", "label_map", "random_seed", "num_domains", "domain_names"}
    where = {"reasons", "origin", "domains_per_prefix", "mock_domains", "eval_per_domain"}
    assert covered | where == {f.name for f in dataclasses.fields(LabelsConfig)}
    assert set(LABEL_FLAGS) == covered - {"num_domains", "domain_names"}
    assert all(flag.startswith("--moe-edl-") for flag in LABEL_FLAGS.values())


def test_domain_names_must_match_num_domains() -> None:
    assert LabelsConfig(num_domains=2, domain_names=["a", "b"]).domain_names == ("a", "b")
    with pytest.raises(EDLConfigError, match=r"2 domain names \('a', 'b'\) for 3 domains"):
        LabelsConfig(num_domains=3, domain_names=("a", "b"))


@pytest.mark.parametrize(
    ("field", "text", "member"),
    [
        ("aggregation", "Token", EDLAggregation.TOKEN),
        ("aggregation", "sample", EDLAggregation.SAMPLE),
        ("control", "random", LabelControl.RANDOM),
    ],
)
def test_enum_strings_are_converted(field: str, text: str, member: object) -> None:
    value = getattr(LabelsConfig(**{field: text}), field)
    assert value is member
    assert value == member.value  # StrEnum compares equal to its string


def test_numeric_and_path_normalisation(tmp_path) -> None:
    cfg = LabelsConfig(random_seed="7", num_domains=3, label_map=tmp_path / "m.yaml")
    assert cfg.random_seed == 7
    assert cfg.label_map == str(tmp_path / "m.yaml")


# ---------------------------------------------------------------------------------------------
# add_label_args / from_args
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    return add_label_args(argparse.ArgumentParser(prog="test"))


def test_label_flags_are_in_the_labels_group() -> None:
    parser = argparse.ArgumentParser()
    assert add_label_args(parser) is parser
    groups = [g for g in parser._action_groups if g.title == "domain labels (megatron-edl)"]
    assert len(groups) == 1
    flags = {s for a in groups[0]._group_actions for s in a.option_strings}
    assert set(LABEL_FLAGS.values()) <= flags


def test_argparse_defaults_equal_dataclass_defaults() -> None:
    args = _parser().parse_args([])
    assert LabelsConfig.from_args(args, ["--moe-edl-coeff"]) == LabelsConfig(
        reasons=("--moe-edl-coeff",), origin=LabelOrigin.SIDECAR
    )


def test_help_renders() -> None:
    text = _parser().format_help()  # raises on an unescaped % in a help string
    for flag in LABEL_FLAGS.values():
        assert flag in text


def test_round_trip_all_flags() -> None:
    argv = (
        "--moe-edl-aggregation token --moe-edl-label-map maps/3.yaml --moe-edl-labels random "
        "--moe-edl-random-seed 9"
    ).split()
    cfg = LabelsConfig.from_args(_parser().parse_args(argv), ["--moe-edl-coeff"])
    assert cfg == LabelsConfig(
        reasons=("--moe-edl-coeff",),
        origin=LabelOrigin.SIDECAR,
        aggregation=EDLAggregation.TOKEN,
        label_map="maps/3.yaml",
        control=LabelControl.RANDOM,
        random_seed=9,
    )


def test_from_args_bad_enum_is_config_error() -> None:
    args = _parser().parse_args(["--moe-edl-aggregation", "foo"])
    with pytest.raises(EDLConfigError, match="choose from segment, token, sample"):
        LabelsConfig.from_args(args, ["--moe-edl-coeff"])


# ---------------------------------------------------------------------------------------------
# Mock domains and the EDL loss's two domains (issue 26, items 7 and 16)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, "x"])
def test_mock_domains_below_one_names_the_flag(value: object) -> None:
    with pytest.raises(EDLConfigError, match=r"--moe-edl-mock-domains"):
        LabelsConfig(origin="mock", mock_domains=value)


EDL_ON = ("--moe-edl-coeff",)


@pytest.mark.parametrize(
    ("labels", "used", "message"),
    [
        (
            LabelsConfig(reasons=EDL_ON, label_map="maps/null.yaml"),
            0,
            r"label map maps/null\.yaml \(--moe-edl-label-map\) maps the data to no loss domain "
            r"\(every label to null\)",
        ),
        (
            LabelsConfig(reasons=EDL_ON, label_map="one.yaml"),
            1,
            r"one\.yaml \(--moe-edl-label-map\) maps the data to 1 loss domain",
        ),
        (
            LabelsConfig(reasons=EDL_ON, origin="mock", mock_domains=1),
            1,
            "--moe-edl-mock-domains 1",
        ),
        (
            LabelsConfig(reasons=EDL_ON, origin="prefix", domains_per_prefix="p.yaml"),
            1,
            r"p\.yaml \(--moe-edl-domains-per-prefix\)",
        ),
        (LabelsConfig(reasons=EDL_ON), 1, r"\.domains sidecars of --data-path use 1 label id"),
    ],
)
def test_edl_with_fewer_than_two_loss_domains_is_refused(labels, used, message) -> None:
    from megatron_edl.config.labels import check_loss_domains

    with pytest.raises(EDLConfigError, match=message) as info:
        check_loss_domains(labels, used)
    assert "needs at least two loss domains" in str(info.value)
    assert "\n" not in str(info.value)


def test_two_domains_or_labels_without_the_loss_pass() -> None:
    from megatron_edl.config.labels import check_loss_domains

    check_loss_domains(LabelsConfig(reasons=EDL_ON), 2)
    check_loss_domains(LabelsConfig(reasons=("--moe-edl-eval-per-domain",)), 1)  # no loss
    check_loss_domains(LabelsConfig(reasons=("--moe-edl-stats-interval",)), 0)
