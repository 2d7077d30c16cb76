"""The config tree's root: ``add_args`` defines every flag once, ``EDLRunConfig.from_args`` reads
and validates them once, and the glue gets its config explicitly (no ``get_args()``)."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from megatron_edl.config import EDLConfigError, EDLRunConfig, LabelOrigin, Phase, add_args

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
    assert run.labels is None and run.edl is None
    assert not run.routers_needed and not run.telemetry.enabled


def test_labels_without_the_loss_and_resolved_domains():
    def resolve(args, edl, labels):
        assert labels.origin is LabelOrigin.MOCK and labels.mock_domains == 3
        return 3, ("a", "b", "c")

    args = _args(["--moe-edl-eval-per-domain", "--moe-edl-mock-domains", "3"])
    run = EDLRunConfig.from_args(args, resolve_domains=resolve)
    assert run.labels.reasons == ("--moe-edl-eval-per-domain",)
    assert not run.edl_loss and run.edl.domain_names == ("a", "b", "c")


def test_telemetry_loads_labels_and_is_validated_once():
    args = _args(["--moe-edl-stats-interval", "5", "--moe-edl-stats-dir", "out"])
    run = EDLRunConfig.from_args(args)
    assert run.labels.reasons == ("--moe-edl-stats-interval",)
    assert (run.telemetry.phase, run.telemetry.directory) == (Phase.TRAIN, "out")
    assert run.routers_needed and not run.edl_loss
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


def test_telemetry_flag_functions_are_re_exported():
    from megatron_edl.config import telemetry as config_telemetry
    from megatron_edl.integration import telemetry

    for name in ("telemetry_phase", "flags_in_use", "stats_directory", "add_telemetry_args"):
        assert getattr(telemetry, name) is getattr(config_telemetry, name)


def test_the_label_wrappers_never_read_megatrons_global_args():
    tree = ast.parse((ROOT / "megatron_edl" / "integration" / "gpt.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "get_args" not in names | imported
