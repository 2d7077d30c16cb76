"""Install :class:`AuxLossTopKRouter` (and a layer-hooked loss's MoE layer) in a Megatron spec.

Megatron builds an MoE layer's router from the ``router`` slot of its ``MoESubmodules`` (a
``RouterBuilder``: ``builder(config=..., pg_collection=..., is_mtp_layer=...)``).
:func:`with_aux_loss_router` walks a spec (``ModuleSpec``, ``TransformerBlockSubmodules`` with
per-layer specs, and the ``functools.partial`` builders Megatron's spec functions return; GPT or
Hybrid, TE or local) and returns a copy in which every stock ``TopKRouter`` slot builds an
``AuxLossTopKRouter`` bound to the run config; every other submodule is the very same object as
before. When a ``layer`` loss of the registry is on (the orthogonality loss), the ``MoELayer``
builder holding those ``MoESubmodules`` (a ``partial(MoELayer, ...)`` or a
``ModuleSpec(module=MoELayer)``) builds that entry's ``moe_layer`` instead, bound to the same
run config. :func:`layer_spec_provider` is the ``transformer_layer_spec`` the launcher installs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.training.models.gpt import default_layer_spec

from megatron_edl.config import EDLRunConfig
from megatron_edl.integration.losses import registry
from megatron_edl.integration.router import AuxLossTopKRouter

__all__ = ["aux_loss_router_needed", "layer_spec_provider", "with_aux_loss_router"]


def _replace_routers(node: Any, run: EDLRunConfig, moe_layer: type | None, found: list[int]) -> Any:
    if isinstance(node, MoESubmodules):
        router = node.router
        is_partial = isinstance(router, functools.partial)
        base = router.func if is_partial else router
        if base is AuxLossTopKRouter:
            raise ValueError("the spec already has an AuxLossTopKRouter; install it once")
        if base is not TopKRouter:
            raise ValueError(
                f"cannot add the router losses to router {getattr(base, '__qualname__', base)!r}: "
                "only Megatron's TopKRouter is supported"
            )
        found.append(1)
        # Keep any arguments a partial router builder already binds.
        args, keywords = (router.args, router.keywords) if is_partial else ((), {})
        builder = functools.partial(AuxLossTopKRouter, *args, **keywords, run_config=run)
        return dataclasses.replace(node, router=builder)
    if isinstance(node, functools.partial):  # Megatron's specs build MoE layers with partials
        args = _replace_routers(node.args, run, moe_layer, found)
        keywords = _replace_routers(node.keywords, run, moe_layer, found)
        if moe_layer is not None and node.func is MoELayer:
            keywords = {**keywords, "run_config": run}
            return functools.partial(moe_layer, *args, **keywords)
        if args is node.args and keywords is node.keywords:
            return node
        return functools.partial(node.func, *args, **keywords)
    if moe_layer is not None and isinstance(node, ModuleSpec) and node.module is MoELayer:
        submodules = _replace_routers(node.submodules, run, moe_layer, found)
        params = {**node.params, "run_config": run}
        return dataclasses.replace(node, module=moe_layer, submodules=submodules, params=params)
    if isinstance(node, dict):
        items = {k: _replace_routers(v, run, moe_layer, found) for k, v in node.items()}
        return items if any(items[k] is not node[k] for k in node) else node
    if isinstance(node, list | tuple):
        items = [_replace_routers(item, run, moe_layer, found) for item in node]
        changed = any(a is not b for a, b in zip(items, node, strict=True))
        return type(node)(items) if changed else node
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {}
        for field in dataclasses.fields(node):
            if not field.init:
                continue
            value = getattr(node, field.name)
            new = _replace_routers(value, run, moe_layer, found)
            if new is not value:
                changes[field.name] = new
        return dataclasses.replace(node, **changes) if changes else node
    return node


def with_aux_loss_router(spec: Any, run_config: EDLRunConfig) -> Any:
    """Return ``spec`` with every MoE router built as an :class:`AuxLossTopKRouter` bound to
    ``run_config`` (and every MoE layer as the ``moe_layer`` of an enabled layer-hooked loss).

    Args:
        spec: A Megatron layer spec (``ModuleSpec``) or block spec
            (``TransformerBlockSubmodules``), GPT or Hybrid, TE or local.
        run_config: The run config every router (and replaced MoE layer) receives.

    Returns:
        A copy of ``spec`` sharing every unchanged submodule; the input is not modified.

    Raises:
        TypeError: ``run_config`` is not an ``EDLRunConfig``.
        ValueError: The spec holds no MoE layer, an MoE layer uses a router other than
            Megatron's ``TopKRouter``, or two enabled losses each replace the MoE layer.
    """
    if not isinstance(run_config, EDLRunConfig):
        raise TypeError(f"run_config must be an EDLRunConfig, got {type(run_config).__name__}")
    found: list[int] = []
    new_spec = _replace_routers(spec, run_config, registry.moe_layer_class(run_config), found)
    if not found:
        raise ValueError(
            "the router losses and the routing telemetry need MoE layers, but the layer spec has "
            "none (is --num-experts set?)"
        )
    return new_spec


def aux_loss_router_needed(run_config: EDLRunConfig) -> bool:
    """Whether the run needs :func:`with_aux_loss_router`: a registered loss or the routing
    telemetry is on."""
    return registry.any_enabled(run_config) or run_config.telemetry.enabled


def layer_spec_provider(base_spec: Any, run_config: EDLRunConfig):
    """A ``GPTModelConfig.transformer_layer_spec`` provider: ``base_spec`` (a spec, a provider,
    or ``None`` for Megatron's default) with :func:`with_aux_loss_router` applied.

    Args:
        base_spec: The model config's ``transformer_layer_spec`` before ours.
        run_config: The run config.
    """

    def provider(model_config, vp_stage=None):
        spec = base_spec
        if spec is None:
            spec = default_layer_spec(model_config, vp_stage)
        elif callable(spec) and not hasattr(spec, "module"):
            spec = spec(model_config, vp_stage=vp_stage)
        return with_aux_loss_router(spec, run_config)

    return provider
