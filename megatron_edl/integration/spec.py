"""Install :class:`AuxLossTopKRouter` (and the orthogonality loss's MoE layer) in a Megatron spec.

Megatron builds an MoE layer's router from the ``router`` slot of its ``MoESubmodules`` (a
``RouterBuilder``: ``builder(config=..., pg_collection=..., is_mtp_layer=...)``). The function
here walks a spec (``ModuleSpec``, ``TransformerBlockSubmodules`` with per-layer specs, and the
``functools.partial`` builders Megatron's spec functions return; GPT or Hybrid, TE or local) and
returns a copy in which every stock ``TopKRouter`` slot builds an ``AuxLossTopKRouter`` instead;
every other submodule is the very same object as before. With the orthogonality loss on, the
``MoELayer`` builder holding those ``MoESubmodules`` (a ``partial(MoELayer, ...)`` or a
``ModuleSpec(module=MoELayer)``) builds a :class:`SpecializationMoELayer` instead, the same layer
with the loss in its token dispatcher.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_edl.config import EDLConfig, SpecializationConfig
from megatron_edl.integration.router import AuxLossTopKRouter
from megatron_edl.integration.specialization import SpecializationMoELayer


def _replace_routers(
    node: Any,
    edl_config: EDLConfig | None,
    found: list[int],
    specialization: SpecializationConfig | None = None,
    router_kwargs: Mapping[str, Any] = MappingProxyType({}),
) -> Any:
    if isinstance(node, MoESubmodules):
        router = node.router
        is_partial = isinstance(router, functools.partial)
        base = router.func if is_partial else router
        if base is AuxLossTopKRouter:
            raise ValueError("the spec already has an EDL router; install it once")
        if base is not TopKRouter:
            raise ValueError(
                f"cannot add EDL to router {getattr(base, '__qualname__', base)!r}: only "
                "Megatron's TopKRouter is supported"
            )
        found.append(1)
        # Keep any arguments a partial router builder already binds.
        args, keywords = (router.args, router.keywords) if is_partial else ((), {})
        extra = {} if specialization is None else {"specialization_config": specialization}
        extra.update(router_kwargs)
        builder = functools.partial(
            AuxLossTopKRouter, *args, **keywords, edl_config=edl_config, **extra
        )
        return dataclasses.replace(node, router=builder)
    ortho = specialization is not None and specialization.ortho_enabled
    if isinstance(node, functools.partial):  # Megatron's specs build MoE layers with partials
        args = _replace_routers(node.args, edl_config, found, specialization, router_kwargs)
        keywords = _replace_routers(node.keywords, edl_config, found, specialization, router_kwargs)
        if ortho and node.func is MoELayer:
            keywords = {**keywords, "specialization_config": specialization}
            return functools.partial(SpecializationMoELayer, *args, **keywords)
        if args is node.args and keywords is node.keywords:
            return node
        return functools.partial(node.func, *args, **keywords)
    if ortho and isinstance(node, ModuleSpec) and node.module is MoELayer:
        submodules = _replace_routers(
            node.submodules, edl_config, found, specialization, router_kwargs
        )
        params = {**node.params, "specialization_config": specialization}
        return dataclasses.replace(
            node, module=SpecializationMoELayer, submodules=submodules, params=params
        )
    if isinstance(node, dict):
        items = {
            k: _replace_routers(v, edl_config, found, specialization, router_kwargs)
            for k, v in node.items()
        }
        return items if any(items[k] is not node[k] for k in node) else node
    if isinstance(node, list | tuple):
        items = [
            _replace_routers(item, edl_config, found, specialization, router_kwargs)
            for item in node
        ]
        changed = any(a is not b for a, b in zip(items, node, strict=True))
        return type(node)(items) if changed else node
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {}
        for field in dataclasses.fields(node):
            if not field.init:
                continue
            value = getattr(node, field.name)
            new = _replace_routers(value, edl_config, found, specialization, router_kwargs)
            if new is not value:
                changes[field.name] = new
        return dataclasses.replace(node, **changes) if changes else node
    return node


def with_edl_router(
    spec: Any,
    edl_config: EDLConfig | None,
    specialization: SpecializationConfig | None = None,
    *,
    num_domains: int | None = None,
    **router_kwargs: Any,
) -> Any:
    """Return ``spec`` with every MoE router built as an :class:`AuxLossTopKRouter`.

    With ``specialization.ortho_enabled`` every MoE layer is also built as a
    :class:`SpecializationMoELayer` (the orthogonality loss in its token dispatcher).

    Args:
        spec: A Megatron layer spec (``ModuleSpec``) or block spec
            (``TransformerBlockSubmodules``), GPT or Hybrid, TE or local.
        edl_config: The EDL configuration the routers use (``None``: no EDL).
        specialization: The variance/orthogonality configuration (``None``: neither loss).
        num_domains: The number of loss domains (``LabelsConfig.num_domains``), bound into
            every router builder when given; the routers need it with EDL on or the telemetry
            (``stats_phase``), not otherwise.
        **router_kwargs: Further keyword arguments of every ``AuxLossTopKRouter`` (e.g.
            ``stats_phase``, the routing telemetry).

    Returns:
        A copy of ``spec`` sharing every unchanged submodule; the input is not modified.

    Raises:
        ValueError: if the spec holds no MoE layer, or an MoE layer uses a router other than
            Megatron's ``TopKRouter``.
    """
    if num_domains is not None:
        router_kwargs = {"num_domains": num_domains, **router_kwargs}
    found: list[int] = []
    new_spec = _replace_routers(spec, edl_config, found, specialization, router_kwargs)
    if not found:
        raise ValueError(
            "EDL and the specialization losses need MoE layers, but the layer spec has none "
            "(is --num-experts set?)"
        )
    return new_spec
