"""``with_aux_loss_router``: it swaps only the router (and, with the orthogonality loss, the MoE
layer), and models with the router losses load stock checkpoints.

Spec tests walk the spec Megatron's own spec functions return (local layer spec, GPT block spec
with dense and MoE layers, the Hybrid stack spec) with a walker written here, independent of the
implementation, and compare the installer's output with its input leaf by leaf: the router slots
of MoE layers build ``AuxLossTopKRouter`` with the given run config, everything else is the very
same object, every container off the paths to a router is shared, and the input is left untouched.

Model tests build a tiny ``GPTModel`` twice (stock and EDL spec) in one gloo process with
Megatron's parallel state initialised (``tests.helpers.distributed.run_distributed``, world size 1,
the CPU compatibility layer applied in the child only). The worker records what it sees and the
tests assert on it, so each property passes or fails on its own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import InferenceTopKRouter, TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_edl.config import (
    EDLConfig,
    EDLRunConfig,
    LabelsConfig,
    OrthogonalityConfig,
    TelemetryConfig,
    VarianceConfig,
)
from megatron_edl.integration.losses.orthogonality import OrthogonalityMoELayer
from megatron_edl.integration.router import AuxLossTopKRouter
from megatron_edl.integration.spec import aux_loss_router_needed, with_aux_loss_router
from tests.helpers.distributed import run_distributed

NUM_DOMAINS = 3
EDL_CFG = EDLConfig(coeff=0.5)
RUN = EDLRunConfig(labels=LabelsConfig(num_domains=NUM_DOMAINS), edl=EDL_CFG)

# ---------------------------------------------------------------------------------------------
# A generic spec walker (independent of megatron_edl.integration.spec)
# ---------------------------------------------------------------------------------------------


def _children(node: Any) -> list[tuple[str, Any]] | None:
    """``(path suffix, child)`` pairs of a container node, or ``None`` for a leaf."""
    if isinstance(node, functools.partial):
        return [
            (".<func>", node.func),
            *((f".<args>[{i}]", a) for i, a in enumerate(node.args)),
            *((f".<kw>[{k}]", v) for k, v in node.keywords.items()),
        ]
    if isinstance(node, dict):
        return [(f"[{k!r}]", v) for k, v in node.items()]
    if isinstance(node, list | tuple):
        return [(f"[{i}]", v) for i, v in enumerate(node)]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [(f".{f.name}", getattr(node, f.name)) for f in dataclasses.fields(node)]
    return None


def walk(node: Any, path: str = "spec") -> Iterator[tuple[str, Any, bool]]:
    """Every node of a spec, depth first: ``(path, node, is_leaf)``."""
    children = _children(node)
    yield path, node, children is None
    for suffix, child in children or ():
        yield from walk(child, path + suffix)


def nodes(spec: Any) -> dict[str, Any]:
    return {path: node for path, node, _ in walk(spec)}


def leaves(spec: Any) -> dict[str, Any]:
    return {path: node for path, node, leaf in walk(spec) if leaf}


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith((root + ".", root + "["))


def assert_only_routers_swapped(spec: Any, new_spec: Any, num_routers: int) -> None:
    """The full comparison of the installer's output with its input (see the module doc)."""
    before = nodes(spec)
    router_paths = [p for p, n in leaves(spec).items() if p.endswith(".router") and n is TopKRouter]
    assert len(router_paths) == num_routers, router_paths
    # The slots really are MoE router slots (guards the walker, not the installer).
    for p in router_paths:
        assert isinstance(before[p.removesuffix(".router")], MoESubmodules)

    after = nodes(new_spec)
    for p in router_paths:
        builder = after[p]
        assert isinstance(builder, functools.partial), (p, builder)
        assert builder.func is AuxLossTopKRouter, p
        assert builder.args == () and builder.keywords == {"run_config": RUN}, p
        assert builder.keywords["run_config"] is RUN, p

    # Every other leaf: same path, same object.
    old_rest = {
        p: n for p, n in leaves(spec).items() if not any(_under(p, r) for r in router_paths)
    }
    new_rest = {
        p: n for p, n in leaves(new_spec).items() if not any(_under(p, r) for r in router_paths)
    }
    assert old_rest.keys() == new_rest.keys()
    changed = [p for p in old_rest if new_rest[p] is not old_rest[p]]
    assert not changed, f"leaves replaced by other objects: {changed}"

    # Containers: copies on the paths to a router, the very same object everywhere else.
    for p, old in before.items():
        if any(_under(p, r) for r in router_paths):
            continue
        new = after[p]
        assert type(new) is type(old), p
        if any(_under(r, p) for r in router_paths):
            assert new is not old, f"{p} holds a router but was not copied (input mutated?)"
        else:
            assert new is old, f"{p} holds no router but was copied"


def _with_edl_checked(spec: Any, num_routers: int) -> Any:
    """Install the router, assert only the routers changed and the input was not mutated."""
    before = nodes(spec)
    new_spec = with_aux_loss_router(spec, RUN)
    after_install = nodes(spec)
    assert after_install.keys() == before.keys()
    mutated = [p for p in before if after_install[p] is not before[p]]
    assert not mutated, f"input spec mutated at {mutated}"
    assert_only_routers_swapped(spec, new_spec, num_routers)
    return new_spec


def _block_config(**kwargs) -> TransformerConfig:
    """4 layers, MoE layers 1 and 3 (``moe_layer_freq`` [1, 0, 1, 0]); overrides in kwargs."""
    options = dict(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_ffn_hidden_size=32,
        moe_layer_freq=[1, 0, 1, 0],
        use_cpu_initialization=True,
    )
    return TransformerConfig(**{**options, **kwargs})


# ---------------------------------------------------------------------------------------------
# 0. The walker itself sees what the checks rely on
# ---------------------------------------------------------------------------------------------


def test_walker_finds_router_and_leaves_of_local_layer_spec():
    spec = get_gpt_layer_local_spec(num_experts=4)
    found = leaves(spec)
    routers = [p for p, n in found.items() if n is TopKRouter]
    assert routers == ["spec.submodules.mlp.<kw>[submodules].router"]
    assert len(found) > 15  # attention, norms, experts, bda...
    # A deliberately wrong output is caught: a replaced attention leaf, and a missing router.
    broken = with_aux_loss_router(spec, RUN)
    broken = dataclasses.replace(
        broken,
        submodules=dataclasses.replace(broken.submodules, self_attn_bda=lambda *a: None),
    )
    with pytest.raises(AssertionError, match="self_attn_bda"):
        assert_only_routers_swapped(spec, broken, 1)
    with pytest.raises(AssertionError):
        assert_only_routers_swapped(spec, spec, 1)


# ---------------------------------------------------------------------------------------------
# 1. Only the router is swapped: local layer spec and GPT block spec
# ---------------------------------------------------------------------------------------------


def test_local_layer_spec_only_router_swapped():
    spec = get_gpt_layer_local_spec(num_experts=4)
    new_spec = _with_edl_checked(spec, num_routers=1)
    # And the original still builds the stock router.
    assert spec.submodules.mlp.keywords["submodules"].router is TopKRouter
    assert new_spec.submodules.mlp.keywords["submodules"].router.func is AuxLossTopKRouter


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_gpt_block_spec_only_moe_routers_swapped(qk_layernorm):
    config = _block_config(qk_layernorm=qk_layernorm)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, pp_rank=0)
    assert len(spec.layer_specs) == 4
    new_spec = _with_edl_checked(spec, num_routers=2)
    # Dense layers (freq 0) are shared as they are; MoE layers are new layer specs.
    for i, is_moe in enumerate(config.moe_layer_freq):
        if is_moe:
            assert new_spec.layer_specs[i] is not spec.layer_specs[i]
        else:
            assert new_spec.layer_specs[i] is spec.layer_specs[i]
    assert new_spec.layer_norm is spec.layer_norm


# ---------------------------------------------------------------------------------------------
# 2. Transformer Engine and Hybrid specs
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not HAVE_TE,
    reason="transformer-engine is not installed: Megatron's TE layer spec cannot be built "
    "(TESpecProvider is None without it)",
)
def test_te_layer_spec_only_router_swapped():
    spec = get_gpt_layer_with_transformer_engine_spec(num_experts=4)
    _with_edl_checked(spec, num_routers=1)


@pytest.mark.skipif(
    not HAVE_TE, reason="transformer-engine is not installed: the TE block spec cannot be built"
)
def test_te_block_spec_only_moe_routers_swapped():
    spec = get_gpt_decoder_block_spec(_block_config(), use_transformer_engine=True, pp_rank=0)
    _with_edl_checked(spec, num_routers=2)


def _hybrid_specs():
    """Megatron's Hybrid stack specs (TE classes are placeholders without TE: spec-level only)."""
    try:
        from megatron.core.models.hybrid import hybrid_layer_specs
    except Exception as exc:  # noqa: BLE001 - any import failure means "not buildable here"
        pytest.skip(f"Megatron's hybrid layer specs cannot be imported here: {exc!r}")
    return hybrid_layer_specs


def test_hybrid_stack_spec_only_moe_router_swapped():
    specs = _hybrid_specs()
    new_spec = _with_edl_checked(specs.hybrid_stack_spec, num_routers=1)
    assert new_spec.submodules.mamba_layer is specs.hybrid_stack_spec.submodules.mamba_layer
    assert new_spec.submodules.mtp_block_spec is specs.hybrid_stack_spec.submodules.mtp_block_spec


def test_hybrid_inference_spec_router_is_rejected_by_name():
    specs = _hybrid_specs()
    with pytest.raises(ValueError, match="InferenceTopKRouter"):
        with_aux_loss_router(specs.hybrid_inference_stack_spec, RUN)


# ---------------------------------------------------------------------------------------------
# 3. Errors
# ---------------------------------------------------------------------------------------------


def test_spec_without_moe_is_rejected():
    with pytest.raises(ValueError, match="--num-experts"):
        with_aux_loss_router(get_gpt_layer_local_spec(num_experts=None), RUN)
    dense_block = get_gpt_decoder_block_spec(  # no --num-experts: every layer is dense
        _block_config(num_moe_experts=None, moe_ffn_hidden_size=None, moe_layer_freq=1),
        use_transformer_engine=False,
        pp_rank=0,
    )
    assert len(dense_block.layer_specs) == 4
    with pytest.raises(ValueError, match="--num-experts"):
        with_aux_loss_router(dense_block, RUN)


@pytest.mark.parametrize("kind", ["layer", "block"])
def test_installing_twice_is_rejected(kind):
    if kind == "layer":
        spec = get_gpt_layer_local_spec(num_experts=4)
    else:
        spec = get_gpt_decoder_block_spec(_block_config(), use_transformer_engine=False, pp_rank=0)
    once = with_aux_loss_router(spec, RUN)
    with pytest.raises(ValueError, match="already"):
        with_aux_loss_router(once, RUN)
    with pytest.raises(ValueError, match="already"):
        with_aux_loss_router(once, dataclasses.replace(RUN, edl=EDLConfig(coeff=1.0)))


class CustomRouter(torch.nn.Module):
    """A router that is no TopKRouter at all."""


class CustomTopKRouter(TopKRouter):
    """A user subclass of TopKRouter: EDL would silently replace its behaviour."""


def _with_router(spec, router):
    mlp = spec.submodules.mlp
    submodules = dataclasses.replace(mlp.keywords["submodules"], router=router)
    return dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            spec.submodules, mlp=functools.partial(mlp.func, *mlp.args, submodules=submodules)
        ),
    )


@pytest.mark.parametrize(
    ("router", "name"),
    [
        (CustomRouter, "CustomRouter"),
        (CustomTopKRouter, "CustomTopKRouter"),
        (InferenceTopKRouter, "InferenceTopKRouter"),
        (functools.partial(CustomRouter), "CustomRouter"),
    ],
)
def test_custom_router_is_rejected_by_name(router, name):
    spec = _with_router(get_gpt_layer_local_spec(num_experts=4), router)
    with pytest.raises(ValueError, match=name):
        with_aux_loss_router(spec, RUN)
    # The same surgery with the stock router is accepted (the helper builds a valid spec).
    ok = _with_router(get_gpt_layer_local_spec(num_experts=4), TopKRouter)
    _with_edl_checked(ok, num_routers=1)


# ---------------------------------------------------------------------------------------------
# 3b. The layer-hooked loss (orthogonality) swaps the MoE layer; the run config is bound once
# ---------------------------------------------------------------------------------------------

BOTH = EDLRunConfig(
    variance=VarianceConfig(coeff=0.1), orthogonality=OrthogonalityConfig(coeff=0.2)
)


@pytest.mark.parametrize("edl", [None, EDL_CFG])
def test_orthogonality_swaps_the_moe_layer_and_both_get_the_run_config(edl) -> None:
    run = BOTH if edl is None else dataclasses.replace(BOTH, labels=RUN.labels, edl=edl)
    spec = get_gpt_decoder_block_spec(_block_config(), use_transformer_engine=False, pp_rank=0)
    new = with_aux_loss_router(spec, run)
    for old_layer, new_layer in zip(spec.layer_specs, new.layer_specs, strict=True):
        mlp = new_layer.submodules.mlp
        if old_layer.submodules.mlp.func is not MoELayer:  # dense layer: untouched
            assert new_layer is old_layer
            continue
        assert mlp.func is OrthogonalityMoELayer
        assert mlp.keywords["run_config"] is run
        router = mlp.keywords["submodules"].router
        assert router.func is AuxLossTopKRouter
        assert router.keywords == {"run_config": run}
        assert (
            mlp.keywords["submodules"].experts
            is old_layer.submodules.mlp.keywords["submodules"].experts
        )


def test_without_orthogonality_only_the_router_changes() -> None:
    spec = get_gpt_layer_local_spec(num_experts=4)
    variance_only = EDLRunConfig(variance=VarianceConfig(coeff=0.1))
    new = with_aux_loss_router(spec, variance_only)
    assert new.submodules.mlp.func is MoELayer
    router = new.submodules.mlp.keywords["submodules"].router
    assert router.keywords == {"run_config": variance_only}
    with pytest.raises(ValueError, match="already"):
        with_aux_loss_router(new, BOTH)


def test_module_spec_form_of_the_moe_layer_is_swapped_too() -> None:
    local = get_gpt_layer_local_spec(num_experts=4).submodules.mlp
    spec = ModuleSpec(module=MoELayer, submodules=local.keywords["submodules"], params={"x": 1})
    new = with_aux_loss_router(spec, BOTH)
    assert new.module is OrthogonalityMoELayer
    assert new.params == {"x": 1, "run_config": BOTH}
    assert isinstance(new.submodules, MoESubmodules)
    assert new.submodules.router.func is AuxLossTopKRouter
    assert spec.module is MoELayer and spec.params == {"x": 1}  # the input is unchanged


def test_the_run_config_is_type_checked() -> None:
    with pytest.raises(TypeError, match="run_config must be an EDLRunConfig, got EDLConfig"):
        with_aux_loss_router(get_gpt_layer_local_spec(num_experts=4), EDL_CFG)
    partial = functools.partial(AuxLossTopKRouter, run_config="not a config")
    with pytest.raises(TypeError, match="run_config must be an EDLRunConfig, got str"):
        partial(config=TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1))


def test_the_router_is_needed_for_any_loss_or_the_telemetry() -> None:
    assert not aux_loss_router_needed(EDLRunConfig())
    assert not aux_loss_router_needed(EDLRunConfig(labels=LabelsConfig(num_domains=2)))
    assert aux_loss_router_needed(RUN)
    assert aux_loss_router_needed(EDLRunConfig(orthogonality=OrthogonalityConfig(coeff=0.1)))
    telemetry = EDLRunConfig(
        labels=LabelsConfig(num_domains=2), telemetry=TelemetryConfig(phase="train")
    )
    assert aux_loss_router_needed(telemetry)


# ---------------------------------------------------------------------------------------------
# 4./5. Models: checkpoint compatibility, router classes, a training step with EDL
# ---------------------------------------------------------------------------------------------

VOCAB, SEQ, BATCH, HIDDEN = 64, 16, 2, 32


def _model_worker(rank: int, world_size: int) -> dict[str, Any]:
    """Build stock and EDL GPTModels and record everything the tests below assert on."""
    from megatron_edl import cpu

    cpu.apply()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_edl.core import edl
    from megatron_edl.integration.labels import push_labels, router_labels

    parallel_state.initialize_model_parallel()
    init_num_microbatches_calculator(
        rank, None, global_batch_size=BATCH, micro_batch_size=BATCH, data_parallel_size=1
    )
    config = TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=64,
        num_moe_experts=4,
        moe_ffn_hidden_size=32,
        moe_router_topk=2,
        moe_token_dispatcher_type="allgather",
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,  # Megatron's expert bias fails in place on CPU autograd
    )
    stock_spec = get_gpt_layer_local_spec(num_experts=4)

    def build(spec, seed: int, edl_config: EDLConfig | None = None):
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        if edl_config is not None:
            spec = with_aux_loss_router(spec, dataclasses.replace(RUN, edl=edl_config))
        return GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ
        )

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    lm_labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    domain_ids = torch.randint(0, NUM_DOMAINS, (BATCH, SEQ), generator=gen)
    edl_weights = torch.rand(BATCH, SEQ, generator=gen) + 0.5

    @torch.no_grad()
    def logits(model):
        model.eval()
        return model(tokens, position_ids, None)

    def routers(model):
        return [m for m in model.modules() if isinstance(m, TopKRouter)]

    out: dict[str, Any] = {}
    stock = build(stock_spec, seed=1)
    model = build(stock_spec, seed=2, edl_config=EDL_CFG)
    out["stock_router_types"] = [type(r).__name__ for r in routers(stock)]
    out["edl_router_types"] = [type(r).__name__ for r in routers(model)]
    out["edl_router_configs_are_cfg"] = [
        getattr(r, "run_config", RUN).edl is EDL_CFG for r in routers(model)
    ]

    # Checkpoint layout.
    out["stock_keys"] = list(stock.state_dict())
    out["edl_keys"] = list(model.state_dict())
    out["stock_params"] = [n for n, _ in stock.named_parameters()]
    out["edl_params"] = [n for n, _ in model.named_parameters()]

    def persistent_buffers(m):
        return [
            f"{prefix}.{name}".lstrip(".")
            for prefix, mod in m.named_modules()
            for name, buf in mod._buffers.items()
            if buf is not None and name not in mod._non_persistent_buffers_set
        ]

    out["stock_buffers"] = persistent_buffers(stock)
    out["edl_buffers"] = persistent_buffers(model)

    def sharded_keys(m):
        return {k: getattr(v, "key", None) for k, v in m.sharded_state_dict().items()}

    out["stock_sharded"] = sharded_keys(stock)
    out["edl_sharded"] = sharded_keys(model)

    # Load both ways (strict) between models with different weights.
    stock_sd = {k: v.clone() if torch.is_tensor(v) else v for k, v in stock.state_dict().items()}
    edl_sd = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    stock_logits, edl_logits = logits(stock), logits(model)
    out["logits_differ_before_load"] = not torch.equal(stock_logits, edl_logits)

    def strict_load(target, state_dict) -> str | None:
        try:
            target.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:  # missing/unexpected keys or shape mismatches
            return str(exc)
        return None

    out["stock_to_edl_load_error"] = strict_load(model, stock_sd)
    out["edl_after_stock_load_equal"] = torch.equal(logits(model), stock_logits)
    out["edl_to_stock_load_error"] = strict_load(stock, edl_sd)
    out["stock_after_edl_load_equal"] = torch.equal(logits(stock), edl_logits)
    out["logits_shape"] = list(stock_logits.shape)

    # 5. One training forward/backward: EDL model vs the stock model on the same weights.
    # (non-strict: a failed strict load is reported above, this part still runs)
    zero = build(stock_spec, seed=3, edl_config=dataclasses.replace(EDL_CFG, coeff=0.0))
    for m in (model, stock, zero):
        m.load_state_dict(stock_sd, strict=False)
    captured: dict[int, torch.Tensor] = {}
    for i, r in enumerate(routers(model)):
        r.register_forward_pre_hook(
            lambda mod, args, i=i: captured.__setitem__(i, args[0].detach().clone())
        )

    labels = router_labels(domain_ids, edl_weights, sequence_parallel=False, tp_rank=0, tp_size=1)

    def train_step(m, push: bool, force: bool = False):
        m.train()
        m.zero_grad()
        if push:
            push_labels(m, labels)
        if force:  # queue labels even where push_labels would not (inactive EDL)
            for r in routers(m):
                r.push_labels(labels)
        loss = m(tokens, position_ids, None, labels=lm_labels)
        loss.sum().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    stock_loss, stock_grads = train_step(stock, push=False)
    edl_loss_, edl_grads = train_step(model, push=True)
    push_labels(zero, labels)
    out["zero_queued_by_push"] = [len(r.label_queue) for r in routers(zero)]
    zero_loss, zero_grads = train_step(zero, push=False, force=True)
    out["queued_after_step"] = [len(r.label_queue) for r in routers(model)]
    out["zero_queued_after_step"] = [len(r.label_queue) for r in routers(zero)]
    out["train_loss_equal"] = torch.equal(stock_loss, edl_loss_)
    out["zero_loss_equal"] = torch.equal(stock_loss, zero_loss)
    router_names = [n for n in stock_grads if n.endswith("mlp.router.weight")]
    out["router_names"] = router_names
    out["router_grad_diff"] = {
        n: (edl_grads[n] - stock_grads[n]).abs().max().item() for n in router_names
    }
    out["zero_grads_equal"] = zero_grads.keys() == stock_grads.keys() and all(
        torch.equal(zero_grads[n], stock_grads[n]) for n in stock_grads
    )

    # Expected EDL gradient of the last router weight (nothing downstream of it feeds EDL):
    # coeff * d L_ED / dW from the router's captured input; scale 1 (dp = cp = nmb = 1).
    last = routers(model)[-1]
    weight = last.weight.detach().clone().requires_grad_(True)
    logits_TE = torch.nn.functional.linear(captured[len(captured) - 1].reshape(-1, HIDDEN), weight)
    sums_DE, counts_D = edl.domain_sums(
        probs_TE=edl.routing_probs(logits_TE=logits_TE),
        domain_ids_T=labels.domain_ids_T,
        weights_T=labels.weights_T,
        num_domains=NUM_DOMAINS,
    )
    loss = edl.edl_loss(sums_DE=sums_DE, counts_D=counts_D, form=EDL_CFG.form, eps=EDL_CFG.eps)
    (expected,) = torch.autograd.grad(EDL_CFG.coeff * loss.loss, weight)
    name = router_names[-1]
    got = edl_grads[name] - stock_grads[name]
    out["last_router_expected_norm"] = expected.norm().item()
    out["last_router_grad_error"] = ((got - expected).norm() / expected.norm()).item()

    # Without labels the EDL router refuses to train silently.
    model.train()
    try:
        model(tokens, position_ids, None, labels=lm_labels)
        out["no_labels_error"] = None
    except RuntimeError as exc:
        out["no_labels_error"] = str(exc)
    return out


@pytest.fixture(scope="module")
def model_results() -> dict[str, Any]:
    return run_distributed(_model_worker, 1, timeout_s=120)[0]


def test_router_classes_of_built_models(model_results):
    assert model_results["stock_router_types"] == ["TopKRouter", "TopKRouter"]
    assert model_results["edl_router_types"] == ["AuxLossTopKRouter", "AuxLossTopKRouter"]
    assert model_results["edl_router_configs_are_cfg"] == [True, True]


def test_edl_adds_no_parameters_or_buffers(model_results):
    r = model_results
    assert r["edl_keys"] == r["stock_keys"]
    assert any(k.endswith("mlp.router.weight") for k in r["stock_keys"])
    assert r["edl_params"] == r["stock_params"]
    assert r["edl_buffers"] == r["stock_buffers"]


def test_sharded_state_dict_keys_match(model_results):
    stock, edl_ = model_results["stock_sharded"], model_results["edl_sharded"]
    assert stock, "empty sharded state dict"
    assert edl_ == stock


def test_state_dicts_load_strictly_both_ways(model_results):
    r = model_results
    assert r["logits_shape"] == [BATCH, SEQ, VOCAB]
    assert r["logits_differ_before_load"], "models start equal: the load check proves nothing"
    assert r["stock_to_edl_load_error"] is None, r["stock_to_edl_load_error"]
    assert r["edl_to_stock_load_error"] is None, r["edl_to_stock_load_error"]
    assert r["edl_after_stock_load_equal"], "stock -> EDL load does not reproduce stock logits"
    assert r["stock_after_edl_load_equal"], "EDL -> stock load does not reproduce EDL logits"


def test_training_step_attaches_edl_gradient_to_routers(model_results):
    r = model_results
    assert r["queued_after_step"] == [0, 0], "every MoE layer consumes its micro-batch's labels"
    assert r["train_loss_equal"], "EDL must not change the forward values"
    assert len(r["router_names"]) == 2
    for name, diff in r["router_grad_diff"].items():
        assert diff > 1e-3, f"no EDL gradient on {name}"
    assert r["last_router_expected_norm"] > 1e-3
    assert r["last_router_grad_error"] < 1e-4


def test_zero_coeff_is_the_stock_model(model_results):
    r = model_results
    assert r["zero_queued_by_push"] == [0, 0], "push_labels skips routers without EDL"
    assert r["zero_queued_after_step"] == [1, 1], "coeff 0 consumes no labels"
    assert r["zero_loss_equal"]
    assert r["zero_grads_equal"]


def test_training_without_labels_raises(model_results):
    error = model_results["no_labels_error"]
    assert error is not None and "no domain labels" in error
