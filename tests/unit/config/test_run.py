"""The config tree's root: ``add_args`` defines every flag once, ``EDLRunConfig.from_args`` reads
and validates them once, and the glue gets its config explicitly (no ``get_args()``)."""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
from pathlib import Path

import pytest

from megatron_edl.config import (
    FLAGS,
    LABEL_FLAGS,
    EDLConfig,
    EDLConfigError,
    EDLRunConfig,
    LabelControl,
    LabelOrigin,
    LabelsConfig,
    Phase,
    add_args,
)

ROOT = Path(__file__).resolve().parents[3]
MODEL = dict(
    num_experts=4,
    num_layers=2,
    moe_layer_freq=1,
    moe_router_topk=2,
    moe_token_dispatcher_type="alltoall",
    mock_data=True,
    sft=False,
    hybrid_context_parallel=False,
)


def _args(argv: list[str], **megatron) -> argparse.Namespace:
    args = add_args(argparse.ArgumentParser()).parse_args(argv)
    for name, value in {**MODEL, **megatron}.items():
        setattr(args, name, value)
    return args


def test_every_flag_is_defined_once_in_one_group_per_branch():
    parser = add_args(argparse.ArgumentParser())
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    assert len(flags) == len(set(flags))
    titles = {g.title for g in parser._action_groups}
    for title in (
        "expert divergence learning (megatron-edl)",
        "expert specialization losses, arXiv 2505.22323 (megatron-edl)",
        "domain labels (megatron-edl)",
        "megatron-edl",
        "routing telemetry (megatron-edl)",
    ):
        assert title in titles


def test_no_megatron_edl_flag_loads_nothing():
    run = EDLRunConfig.from_args(_args([]))
    assert run.labels is None and not run.edl.enabled and run.edl == EDLConfig()
    assert run == EDLRunConfig() and not run.telemetry.enabled


def test_labels_without_the_loss_and_resolved_domains():
    def resolve(args, labels):
        assert labels.origin is LabelOrigin.MOCK and labels.mock_domains == 3
        return 3, ("a", "b", "c")

    args = _args(["--moe-edl-eval-per-domain", "--moe-edl-mock-domains", "3"])
    run = EDLRunConfig.from_args(args, resolve_domains=resolve)
    assert run.labels.reasons == ("--moe-edl-eval-per-domain",)
    assert not run.edl_loss and run.labels.domain_names == ("a", "b", "c")


def test_from_args_resolves_the_labels_domains_and_the_edl_config_has_no_label_field():
    seen = []

    def resolve(args, labels):
        seen.append(labels)
        return 2, ("code", "text")

    argv = [
        "--moe-edl-coeff", "0.1", "--moe-edl-label-map", "map.yaml", "--moe-edl-labels",
        "random", "--moe-edl-random-seed", "7", "--moe-edl-aggregation", "token",
    ]  # fmt: skip
    run = EDLRunConfig.from_args(_args(argv), resolve_domains=resolve)
    assert isinstance(run.labels, LabelsConfig) and isinstance(run.edl, EDLConfig)
    assert (run.labels.num_domains, run.labels.domain_names) == (2, ("code", "text"))
    assert (seen[0].num_domains, seen[0].domain_names) == (None, None)  # filled in by replace
    assert run.labels == dataclasses.replace(seen[0], num_domains=2, domain_names=("code", "text"))
    assert run.labels.label_map == "map.yaml" and run.labels.control is LabelControl.RANDOM
    assert (run.labels.random_seed, run.labels.aggregation) == (7, "token")
    assert run.edl_loss and run.edl.coeff == 0.1
    label_fields = {"label_map", "labels", "control", "random_seed", "aggregation"}
    label_fields |= {"num_domains", "domain_names"}
    assert not label_fields & {f.name for f in dataclasses.fields(EDLConfig)}
    assert set(LABEL_FLAGS) <= {f.name for f in dataclasses.fields(LabelsConfig)}
    assert not set(FLAGS.values()) & set(LABEL_FLAGS.values())


def test_no_flag_is_defined_twice():
    parser = add_args(argparse.ArgumentParser())
    counts = collections.Counter(s for a in parser._actions for s in a.option_strings)
    assert [flag for flag, n in counts.items() if n > 1] == []
    for flag in [*FLAGS.values(), *LABEL_FLAGS.values()]:
        assert counts[flag] == 1, flag
    groups = {g.title: {s for a in g._group_actions for s in a.option_strings}
              for g in parser._action_groups}  # fmt: skip
    assert set(LABEL_FLAGS.values()) <= groups["domain labels (megatron-edl)"]
    assert set(FLAGS.values()) <= groups["expert divergence learning (megatron-edl)"]


def test_label_flags_are_checked_without_labels():
    with pytest.raises(EDLConfigError, match="unknown --moe-edl-labels 'shuffled'"):
        EDLRunConfig.from_args(_args(["--moe-edl-labels", "shuffled"]))


def test_telemetry_loads_labels_and_is_validated_once():
    args = _args(["--moe-edl-stats-interval", "5", "--moe-edl-stats-dir", "out"])
    run = EDLRunConfig.from_args(args)
    assert run.labels.reasons == ("--moe-edl-stats-interval",)
    assert (run.telemetry.phase, run.telemetry.directory) == (Phase.TRAIN, "out")
    assert run.telemetry.enabled and not run.edl_loss
    with pytest.raises(ValueError, match="--moe-edl-stats-interval must be >= 1"):
        EDLRunConfig.from_args(_args(["--moe-edl-stats-interval", "0"]))


def test_sft_without_per_prefix_domains_names_the_flag():
    args = _args(["--moe-edl-coeff", "0.1"], sft=True, mock_data=False)
    with pytest.raises(EDLConfigError, match="--moe-edl-domains-per-prefix"):
        EDLRunConfig.from_args(args)


def test_the_loss_is_checked_against_the_model():
    args = _args(["--moe-edl-coeff", "0.1", "--moe-edl-layers", "2"], moe_layer_freq=[1, 0])
    with pytest.raises(EDLConfigError, match="not MoE layers"):
        EDLRunConfig.from_args(args)


def test_the_label_wrappers_never_read_megatrons_global_args():
    tree = ast.parse((ROOT / "megatron_edl" / "integration" / "gpt.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "get_args" not in names | imported
