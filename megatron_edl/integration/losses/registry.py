"""Every auxiliary loss of an MoE layer, one entry each: its config branch, hook, factory, metrics.

The router (:class:`megatron_edl.integration.router.AuxLossTopKRouter`) builds the terms of the
``router`` entries from the run config, in registration order, and applies the active ones after
Megatron's top-k; the layer spec (:mod:`megatron_edl.integration.spec`) installs the MoE layer
class of an enabled ``layer`` entry; the launcher registers the metric names of the enabled
entries (:func:`register_run_metrics`). Nothing else names a loss, so adding one is a module with
its term and factory, a branch of the config tree and an entry here (docs/CONTRIBUTING.md,
"Adding a router loss").

An entry's branch is the field of :class:`~megatron_edl.config.EDLRunConfig` named by
``config_field``; the branch's dataclass has an ``enabled`` property.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from megatron_edl.config import EDLRunConfig
from megatron_edl.integration.losses.base import AuxLossTerm, register_metrics
from megatron_edl.integration.losses.edl import EDL_METRICS, build_edl_term
from megatron_edl.integration.losses.orthogonality import (
    OrthogonalityMoELayer,
    OrthogonalityTerm,
    build_orthogonality_term,
)
from megatron_edl.integration.losses.variance import VarianceTerm, build_variance_term

__all__ = [
    "EDL",
    "LOSSES",
    "ORTHOGONALITY",
    "VARIANCE",
    "Hook",
    "LossEntry",
    "any_enabled",
    "entries",
    "metric_names",
    "moe_layer_class",
    "register",
    "register_run_metrics",
    "router_terms",
]


class Hook(StrEnum):
    """Where a loss is built and applied."""

    ROUTER = "router"
    """In ``AuxLossTopKRouter.routing``, on the router's ``probs`` (inputs: logits, probs,
    routing map, padding mask, labels)."""
    LAYER = "layer"
    """In the MoE layer (its ``moe_layer`` class, e.g. a token-dispatcher hook)."""


@dataclass(frozen=True, kw_only=True)
class LossEntry:
    """One auxiliary loss."""

    name: str
    """Its key (``router.aux_terms[name]``)."""
    config_field: str
    """The :class:`~megatron_edl.config.EDLRunConfig` field holding its config branch."""
    hook: Hook
    """Where it is built and applied."""
    build: Callable[[EDLRunConfig, Any], AuxLossTerm | None]
    """``build(run_config, context) -> term``, ``None`` when the run does not need the term;
    ``context``: the router (``ROUTER``) or the MoE layer's
    :class:`~megatron_edl.integration.losses.orthogonality.LayerContext` (``LAYER``)."""
    metric_names: tuple[str, ...]
    """The names it records (registered for Megatron's log when it is enabled)."""
    moe_layer: type | None = None
    """``LAYER`` only: the ``MoELayer`` subclass the spec installs (with ``run_config=``)."""

    def __post_init__(self) -> None:
        """Check the entry's shape (its ``hook`` against ``moe_layer``).

        Raises:
            ValueError: Naming the entry and the inconsistent field.
        """
        object.__setattr__(self, "hook", Hook(self.hook))
        if (self.hook is Hook.LAYER) != (self.moe_layer is not None):
            raise ValueError(
                f"loss {self.name!r}: a {self.hook.value} hook "
                f"{'needs' if self.hook is Hook.LAYER else 'takes no'} moe_layer, got "
                f"{self.moe_layer!r}"
            )

    def config(self, run: EDLRunConfig) -> Any:
        """The entry's branch of ``run``.

        Raises:
            ValueError: The run config has no field ``config_field``.
        """
        try:
            return getattr(run, self.config_field)
        except AttributeError:
            raise ValueError(
                f"loss {self.name!r}: the run config {type(run).__name__} has no branch "
                f"{self.config_field!r}"
            ) from None

    def enabled(self, run: EDLRunConfig) -> bool:
        """Whether the loss is on in ``run`` (its branch's ``enabled``)."""
        return bool(self.config(run).enabled)


LOSSES: dict[str, LossEntry] = {}
"""The registered losses by name, in registration order (the order the router applies them)."""


def register(entry: LossEntry) -> LossEntry:
    """Add ``entry`` to :data:`LOSSES`.

    Raises:
        ValueError: A loss of that name is registered already.
    """
    if entry.name in LOSSES:
        raise ValueError(f"loss {entry.name!r} registered twice")
    LOSSES[entry.name] = entry
    return entry


EDL = register(
    LossEntry(
        name="edl",
        config_field="edl",
        hook=Hook.ROUTER,
        build=build_edl_term,
        metric_names=EDL_METRICS,
    )
)
VARIANCE = register(
    LossEntry(
        name="variance",
        config_field="variance",
        hook=Hook.ROUTER,
        build=build_variance_term,
        metric_names=VarianceTerm.metric_names,
    )
)
ORTHOGONALITY = register(
    LossEntry(
        name="orthogonality",
        config_field="orthogonality",
        hook=Hook.LAYER,
        build=build_orthogonality_term,
        metric_names=OrthogonalityTerm.metric_names,
        moe_layer=OrthogonalityMoELayer,
    )
)


def entries(hook: Hook | None = None) -> tuple[LossEntry, ...]:
    """The registered losses (of ``hook``, or all), in registration order."""
    return tuple(e for e in LOSSES.values() if hook is None or e.hook is hook)


def router_terms(run: EDLRunConfig, router) -> dict[str, AuxLossTerm]:
    """``{name: term}`` of every ``ROUTER`` entry whose factory builds one for ``router``."""
    terms = {}
    for entry in entries(Hook.ROUTER):
        term = entry.build(run, router)
        if term is not None:
            terms[entry.name] = term
    return terms


def moe_layer_class(run: EDLRunConfig) -> type | None:
    """The MoE layer class of the enabled ``LAYER`` entry, ``None`` when none is enabled.

    Raises:
        ValueError: Two enabled entries need different MoE layer classes.
    """
    classes = {e.moe_layer: e.name for e in entries(Hook.LAYER) if e.enabled(run)}
    if len(classes) > 1:
        raise ValueError(
            f"the losses {', '.join(classes.values())} each replace the MoE layer; only one "
            "layer-hooked loss can be on at a time"
        )
    return next(iter(classes), None)


def any_enabled(run: EDLRunConfig) -> bool:
    """Whether any registered loss is on in ``run``."""
    return any(e.enabled(run) for e in entries())


def metric_names(run: EDLRunConfig) -> tuple[str, ...]:
    """The metric names of the losses on in ``run``, in registration order."""
    return tuple(name for e in entries() if e.enabled(run) for name in e.metric_names)


def register_run_metrics(run: EDLRunConfig) -> tuple[str, ...]:
    """Register :func:`metric_names` of ``run`` for Megatron's log (``register_metrics``).

    Returns:
        The names registered.
    """
    names = metric_names(run)
    register_metrics(names)
    return names
