"""Config, flags, spec installation and metric registration of the variance/orthogonality losses."""

from __future__ import annotations

import argparse
import dataclasses
import functools

import pytest
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_edl.config import (
    SPECIALIZATION_FLAGS,
    EDLConfig,
    EDLConfigError,
    SpecializationConfig,
    VarianceAxis,
    add_edl_args,
    add_specialization_args,
    validate_specialization_against_model,
)
from megatron_edl.integration.loss_terms import register_edl_metrics
from megatron_edl.integration.router import AuxLossTopKRouter
from megatron_edl.integration.spec import with_edl_router
from megatron_edl.integration.specialization import SpecializationMoELayer, metric_names
from tests.unit.integration.test_spec import _block_config

# ---------------------------------------------------------------------------------------------
# SpecializationConfig and its flags
# ---------------------------------------------------------------------------------------------


def test_defaults_are_valid_and_disabled() -> None:
    cfg = SpecializationConfig()
    assert not cfg.enabled and not cfg.variance_enabled and not cfg.ortho_enabled
    assert cfg.variance_axis is VarianceAxis.TOKENS
    assert (cfg.ortho_eps, cfg.variance_target, cfg.ortho_target) == (1e-6, 1e-3, 1e-4)
    assert cfg.auto_calibrate is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ortho_coeff = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        SpecializationConfig(0.1)  # type: ignore[misc]  # kw_only


def test_each_loss_switches_on_alone() -> None:
    variance = SpecializationConfig(variance_coeff=0.1, variance_axis="EXPERTS")
    assert variance.enabled and variance.variance_enabled and not variance.ortho_enabled
    assert variance.variance_axis is VarianceAxis.EXPERTS
    ortho = SpecializationConfig(ortho_coeff="0.5")
    assert ortho.enabled and ortho.ortho_enabled and ortho.ortho_coeff == 0.5
    assert metric_names(variance) == ("variance_loss",)
    assert metric_names(dataclasses.replace(variance, ortho_coeff=1.0)) == (
        "variance_loss",
        "ortho_loss",
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("variance_coeff", -0.1, "--moe-variance-loss-coeff must be >= 0 and finite, got -0.1"),
        ("ortho_coeff", float("inf"), "--moe-ortho-loss-coeff must be >= 0 and finite, got inf"),
        ("ortho_coeff", "much", "--moe-ortho-loss-coeff must be a number, got 'much'"),
        ("ortho_eps", 0.0, "--moe-ortho-loss-eps must be > 0 and finite, got 0.0"),
        ("variance_target", -1.0, "--moe-variance-loss-target must be > 0"),
        ("ortho_target", float("nan"), "--moe-ortho-loss-target must be > 0"),
        ("variance_axis", "rows", "unknown --moe-variance-loss-axis 'rows'; choose from tokens"),
        ("auto_calibrate", "yes", "--moe-specialization-auto-calibrate must be a bool"),
    ],
)
def test_bad_values_name_the_flag(field, value, message) -> None:
    with pytest.raises(EDLConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SpecializationConfig(**{field: value})


def test_flags_round_trip_through_argparse_next_to_the_edl_flags() -> None:
    parser = add_specialization_args(add_edl_args(argparse.ArgumentParser()))
    defaults = SpecializationConfig.from_args(parser.parse_args([]))
    assert defaults == SpecializationConfig()
    args = parser.parse_args(
        "--moe-variance-loss-coeff 0.2 --moe-variance-loss-axis experts "
        "--moe-ortho-loss-coeff 0.3 --moe-ortho-loss-eps 1e-5 "
        "--moe-specialization-auto-calibrate --moe-variance-loss-target 2e-3 "
        "--moe-ortho-loss-target 3e-4 --moe-edl-coeff 0.1".split()
    )
    assert SpecializationConfig.from_args(args) == SpecializationConfig(
        variance_coeff=0.2,
        variance_axis="experts",
        ortho_coeff=0.3,
        ortho_eps=1e-5,
        auto_calibrate=True,
        variance_target=2e-3,
        ortho_target=3e-4,
    )
    assert EDLConfig.from_args(args).coeff == 0.1
    assert set(SPECIALIZATION_FLAGS) == {f.name for f in dataclasses.fields(SpecializationConfig)}
    with pytest.raises(EDLConfigError, match="--moe-variance-loss-axis"):
        SpecializationConfig.from_args(parser.parse_args(["--moe-variance-loss-axis", "x"]))


def test_validation_against_the_model() -> None:
    ok = dict(num_moe_experts=8, moe_router_topk=2, token_dispatcher_type="alltoall")
    both = SpecializationConfig(variance_coeff=0.1, ortho_coeff=0.1)
    validate_specialization_against_model(both, **ok)
    validate_specialization_against_model(SpecializationConfig(), **{**ok, "num_moe_experts": None})
    cases = [
        (both, {"num_moe_experts": None}, "--moe-variance-loss-coeff 0.1 needs an MoE model"),
        (
            SpecializationConfig(ortho_coeff=0.1),
            {"num_moe_experts": 0},
            "--moe-ortho-loss-coeff 0.1 needs an MoE model",
        ),
        (both, {"moe_router_topk": 1}, "needs --moe-router-topk >= 2"),
        (both, {"token_dispatcher_type": "x"}, "allgather, alltoall and flex, got 'x'"),
        (
            both,
            {"token_dispatcher_type": "flex", "flex_dispatcher_backend": "hybridep"},
            "--moe-flex-dispatcher-backend hybridep",
        ),
        (
            both,
            {"token_dispatcher_type": "flex", "flex_dispatcher_backend": "ncclep"},
            "--moe-flex-dispatcher-backend ncclep",
        ),
        (both, {"apply_probs_on_input": True}, "--moe-apply-probs-on-input"),
    ]
    for cfg, changes, message in cases:
        with pytest.raises(EDLConfigError, match=message):
            validate_specialization_against_model(cfg, **{**ok, **changes})
    # flex with DeepEP (the default backend) is supported; the backend of another dispatcher
    # type is not read.
    validate_specialization_against_model(both, **{**ok, "token_dispatcher_type": "flex"})
    validate_specialization_against_model(
        both, **{**ok, "token_dispatcher_type": "flex", "flex_dispatcher_backend": "deepep"}
    )
    validate_specialization_against_model(both, **{**ok, "flex_dispatcher_backend": "hybridep"})
    # Top-1 routing and any flex backend are fine for the variance loss alone.
    validate_specialization_against_model(
        SpecializationConfig(variance_coeff=0.1),
        **{
            **ok,
            "moe_router_topk": 1,
            "token_dispatcher_type": "flex",
            "flex_dispatcher_backend": "hybridep",
        },
    )


def test_cuda_graphs_over_the_router_and_the_ep_overlap_are_refused() -> None:
    """Refused with the losses alone (no labels loaded): CUDA graphs that capture the router
    (the hooks' nonzero()/.item() cannot be captured) name both flags; the EP overlap with
    the orthogonality loss (its combine node would walk the router node's graph) too."""
    from megatron_edl.config.labels import cuda_graph_capturing_router

    ok = dict(num_moe_experts=8, moe_router_topk=2, token_dispatcher_type="alltoall")
    variance = SpecializationConfig(variance_coeff=0.1)
    ortho = SpecializationConfig(ortho_coeff=0.2)
    both = SpecializationConfig(variance_coeff=0.1, ortho_coeff=0.2)
    capture = cuda_graph_capturing_router(
        argparse.Namespace(cuda_graph_impl="local", cuda_graph_modules=[])
    )
    assert (
        capture == "--cuda-graph-impl local capturing the whole layer (empty --cuda-graph-modules)"
    )
    for cfg, named in (
        (variance, "--moe-variance-loss-coeff 0.1 cannot"),
        (ortho, "--moe-ortho-loss-coeff 0.2 cannot"),
        (both, "--moe-variance-loss-coeff 0.1 and --moe-ortho-loss-coeff 0.2 cannot"),
    ):
        with pytest.raises(EDLConfigError, match=f"{named} be used with --cuda-graph-impl local"):
            validate_specialization_against_model(cfg, **ok, cuda_graph_capture=capture)
    outside = argparse.Namespace(cuda_graph_impl="transformer_engine", cuda_graph_modules=["attn"])
    assert cuda_graph_capturing_router(outside) is None
    validate_specialization_against_model(both, **ok, cuda_graph_capture=None)
    validate_specialization_against_model(SpecializationConfig(), **ok, cuda_graph_capture=capture)

    with pytest.raises(
        EDLConfigError,
        match="--moe-ortho-loss-coeff 0.2 cannot be used with --overlap-moe-expert-parallel-comm",
    ):
        validate_specialization_against_model(ortho, **ok, overlap_moe_expert_parallel_comm=True)
    validate_specialization_against_model(variance, **ok, overlap_moe_expert_parallel_comm=True)


def test_run_config_passes_the_graph_and_overlap_settings() -> None:
    """``EDLRunConfig.from_args`` reads Megatron's flags for the two checks above."""
    from megatron_edl.config import EDLRunConfig, add_args

    parser = add_args(argparse.ArgumentParser())
    base = ["--moe-ortho-loss-coeff", "0.2"]
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
    ):
        args = parser.parse_args(base)
        vars(args).update({**model, **megatron})
        with pytest.raises(EDLConfigError, match=message):
            EDLRunConfig.from_args(args)
    args = parser.parse_args(base)
    vars(args).update(model)
    assert EDLRunConfig.from_args(args).specialization.ortho_enabled


# ---------------------------------------------------------------------------------------------
# Spec installation
# ---------------------------------------------------------------------------------------------

BOTH = SpecializationConfig(variance_coeff=0.1, ortho_coeff=0.2)
EDL_CFG = EDLConfig(coeff=0.1)


def _block_spec():
    return get_gpt_decoder_block_spec(_block_config(), use_transformer_engine=False, pp_rank=0)


@pytest.mark.parametrize("edl", [None, EDL_CFG])
def test_orthogonality_swaps_the_moe_layer_and_the_router_gets_both_configs(edl) -> None:
    spec = _block_spec()
    new = with_edl_router(spec, edl, BOTH)
    for old_layer, new_layer in zip(spec.layer_specs, new.layer_specs, strict=True):
        mlp = new_layer.submodules.mlp
        if old_layer.submodules.mlp.func is not MoELayer:  # dense layer: untouched
            assert new_layer is old_layer
            continue
        assert mlp.func is SpecializationMoELayer
        assert mlp.keywords["specialization_config"] is BOTH
        router = mlp.keywords["submodules"].router
        assert router.func is AuxLossTopKRouter
        assert router.keywords == {"edl_config": edl, "specialization_config": BOTH}
        assert (
            mlp.keywords["submodules"].experts
            is old_layer.submodules.mlp.keywords["submodules"].experts
        )


def test_without_orthogonality_only_the_router_changes() -> None:
    spec = get_gpt_layer_local_spec(num_experts=4)
    variance_only = SpecializationConfig(variance_coeff=0.1)
    new = with_edl_router(spec, None, variance_only)
    assert new.submodules.mlp.func is MoELayer
    router = new.submodules.mlp.keywords["submodules"].router
    assert router.keywords == {"edl_config": None, "specialization_config": variance_only}
    with pytest.raises(ValueError, match="already"):
        with_edl_router(new, None, BOTH)


def test_module_spec_form_of_the_moe_layer_is_swapped_too() -> None:
    local = get_gpt_layer_local_spec(num_experts=4).submodules.mlp
    spec = ModuleSpec(module=MoELayer, submodules=local.keywords["submodules"], params={"x": 1})
    new = with_edl_router(spec, None, BOTH)
    assert new.module is SpecializationMoELayer
    assert new.params == {"x": 1, "specialization_config": BOTH}
    assert isinstance(new.submodules, MoESubmodules)
    assert new.submodules.router.func is AuxLossTopKRouter
    assert spec.module is MoELayer and spec.params == {"x": 1}  # the input is unchanged


def test_router_type_checks() -> None:
    partial = functools.partial(AuxLossTopKRouter, edl_config="not a config")
    with pytest.raises(TypeError, match="edl_config must be an EDLConfig or None"):
        partial(config=TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1))


# ---------------------------------------------------------------------------------------------
# Metric registration
# ---------------------------------------------------------------------------------------------


def test_registered_names_accumulate_in_one_wrapper() -> None:
    from megatron.core.transformer.moe import moe_logging

    moe_logging.destroy_moe_metrics_tracker()
    tracker = moe_logging.get_moe_metrics_tracker()
    seen: list[list[str]] = []
    tracker.report = lambda *a, track_names=None, **k: seen.append(track_names)
    try:
        register_edl_metrics(("variance_loss",))
        register_edl_metrics(("ortho_loss", "variance_loss"))
        tracker.report(1.0, 1, track_names=["load_balancing_loss"])
        assert seen == [["load_balancing_loss", "variance_loss", "ortho_loss"]]
    finally:
        moe_logging.destroy_moe_metrics_tracker()
