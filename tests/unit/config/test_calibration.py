"""What the variance and orthogonality branches share (megatron_edl.config.calibration): one
argument group, the auto-calibration flag, the MoE and CUDA-graph checks, and their place in
``EDLRunConfig.from_args``."""

from __future__ import annotations

import argparse

import pytest

from megatron_edl.config import EDLConfigError, EDLRunConfig, add_args
from megatron_edl.config.calibration import SPECIALIZATION_GROUP_TITLE, check_moe_and_graphs
from megatron_edl.config.labels import cuda_graph_capturing_router

VARIANCE = ("--moe-variance-loss-coeff", 0.1)
ORTHO = ("--moe-ortho-loss-coeff", 0.2)


def test_both_losses_and_the_shared_flag_are_in_one_group() -> None:
    parser = add_args(argparse.ArgumentParser())
    (group,) = [g for g in parser._action_groups if g.title == SPECIALIZATION_GROUP_TITLE]
    flags = [a.option_strings[0] for a in group._group_actions]
    assert flags == [
        "--moe-variance-loss-coeff",
        "--moe-variance-loss-axis",
        "--moe-variance-loss-target",
        "--moe-ortho-loss-coeff",
        "--moe-ortho-loss-eps",
        "--moe-ortho-loss-target",
        "--moe-specialization-auto-calibrate",
    ]


def test_a_loss_without_moe_is_refused_naming_it() -> None:
    check_moe_and_graphs([VARIANCE, ORTHO], num_moe_experts=8, cuda_graph_capture=None)
    check_moe_and_graphs([], num_moe_experts=None, cuda_graph_capture="anything")
    with pytest.raises(EDLConfigError, match="--moe-variance-loss-coeff 0.1 needs an MoE model"):
        check_moe_and_graphs([VARIANCE, ORTHO], num_moe_experts=None, cuda_graph_capture=None)
    with pytest.raises(EDLConfigError, match="--moe-ortho-loss-coeff 0.2 needs an MoE model"):
        check_moe_and_graphs([ORTHO], num_moe_experts=0, cuda_graph_capture=None)


def test_cuda_graphs_over_the_router_are_refused_naming_every_loss_on() -> None:
    """Refused with the losses alone (no labels loaded): CUDA graphs that capture the router
    (the hooks' nonzero()/.item() cannot be captured) name the flags."""
    capture = cuda_graph_capturing_router(
        argparse.Namespace(cuda_graph_impl="local", cuda_graph_modules=[])
    )
    assert (
        capture == "--cuda-graph-impl local capturing the whole layer (empty --cuda-graph-modules)"
    )
    for enabled, named in (
        ([VARIANCE], "--moe-variance-loss-coeff 0.1 cannot"),
        ([ORTHO], "--moe-ortho-loss-coeff 0.2 cannot"),
        ([VARIANCE, ORTHO], "--moe-variance-loss-coeff 0.1 and --moe-ortho-loss-coeff 0.2 cannot"),
    ):
        with pytest.raises(EDLConfigError, match=f"{named} be used with --cuda-graph-impl local"):
            check_moe_and_graphs(enabled, num_moe_experts=8, cuda_graph_capture=capture)
    outside = argparse.Namespace(cuda_graph_impl="transformer_engine", cuda_graph_modules=["attn"])
    assert cuda_graph_capturing_router(outside) is None


def test_run_config_passes_the_graph_and_overlap_settings() -> None:
    """``EDLRunConfig.from_args`` reads Megatron's flags for the checks above."""
    parser = add_args(argparse.ArgumentParser())
    base = ["--moe-ortho-loss-coeff", "0.2", "--moe-variance-loss-coeff", "0.1"]
    model = dict(
        num_experts=8,
        num_layers=2,
        moe_layer_freq=1,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        cuda_graph_impl="none",
        cuda_graph_modules=[],
        fim_data=False,
    )
    for megatron, message in (
        ({"cuda_graph_impl": "full_iteration"}, "capturing the whole iteration"),
        ({"overlap_moe_expert_parallel_comm": True}, "--overlap-moe-expert-parallel-comm"),
        ({"num_experts": None}, "--moe-variance-loss-coeff 0.1 needs an MoE model"),
        ({"moe_router_topk": 1}, "--moe-ortho-loss-coeff needs --moe-router-topk >= 2"),
    ):
        args = parser.parse_args(base)
        vars(args).update({**model, **megatron})
        with pytest.raises(EDLConfigError, match=message):
            EDLRunConfig.from_args(args)
    args = parser.parse_args(base)
    vars(args).update(model)
    run = EDLRunConfig.from_args(args)
    assert run.orthogonality.enabled and run.variance.enabled and not run.edl_loss
