"""Every place the project touches Megatron internals, in one registry.

A *touch* is anything beyond Megatron's public, documented surface: rebinding a function of
``megatron.training`` (training hooks), wrapping a method of a Megatron object (the MoE metrics
tracker's whitelist), overriding or calling a private method (``TopKRouter._apply_aux_loss``),
reading a private attribute (a token dispatcher's ``_comm_manager``), or an argparse private.
Each is a :class:`MegatronTouch` in :data:`TOUCHES` that says what it touches, why, and what change
upstream would let it go. The code that performs a touch looks its entry up here
(:func:`touch`), so a grep for the name finds every call site, and ``tests`` resolve every entry's
target against the installed megatron-core: an upgrade that renames or removes one fails there,
by name, before any training run does.

The CPU compatibility layer (:mod:`megatron_edl.cpu`) keeps its own registry (``PATCHES``: CPU
runs only, switchable one by one); :func:`all_touches` lists both.

Rules for a new touch: add an entry (what, why, remove_when; the exact ``target``), call
:func:`touch` at the call site, and name the public API that would replace it in
``remove_when``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Literal

__all__ = ["TOUCHES", "MegatronTouch", "all_touches", "resolve", "touch"]

Kind = Literal["rebind", "wrap", "override", "private-call", "private-attr"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MegatronTouch:
    """One use of a Megatron internal."""

    name: str
    """Stable identifier (used by :func:`touch` at the call site)."""
    target: str
    """``module:qualname`` of what is touched, e.g.
    ``megatron.core.transformer.moe.router:TopKRouter._apply_aux_loss``; for an instance attribute
    that only exists on objects, the class plus the attribute name after ``#``
    (``module:Class#attr``), checked in the class's ``__init__`` source."""
    kind: Kind
    """rebind (module attribute replaced), wrap (an object's method wrapped), override (a
    private method overridden in a subclass), private-call, private-attr."""
    where: str
    """Our module(s) that perform it."""
    why: str
    """What would be impossible without it."""
    remove_when: str
    """The upstream change (public API, hook, argument) that would let it go."""
    parameters: tuple[str, ...] = ()
    """Parameter names the target must accept (checked for callables; empty: not checked)."""


TOUCHES: dict[str, MegatronTouch] = {}


def _register(**fields: Any) -> MegatronTouch:
    entry = MegatronTouch(**fields)
    if entry.name in TOUCHES:
        raise ValueError(f"Megatron touch {entry.name!r} registered twice")
    TOUCHES[entry.name] = entry
    return entry


def touch(name: str) -> MegatronTouch:
    """The registered entry ``name`` (call sites use this so every touch is findable).

    Raises:
        KeyError: naming the unknown entry and the known ones.
    """
    try:
        return TOUCHES[name]
    except KeyError:
        raise KeyError(
            f"no Megatron touch {name!r} registered in megatron_edl.integration.internals; "
            f"known: {', '.join(sorted(TOUCHES))}"
        ) from None


def resolve(entry: MegatronTouch) -> Any:
    """Import and return the target of ``entry`` (the class, for ``#attr`` targets).

    Raises:
        LookupError: one line naming the entry and the part of the target that is missing.
    """
    module_name, _, qualname = entry.target.partition(":")
    qualname, _, instance_attr = qualname.partition("#")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise LookupError(f"touch {entry.name!r}: cannot import {module_name}: {err}") from err
    for part in qualname.split(".") if qualname else ():
        if not hasattr(obj, part):
            raise LookupError(
                f"touch {entry.name!r}: {entry.target} has no {part!r} in this megatron-core"
            )
        obj = getattr(obj, part)
    if instance_attr:
        source = inspect.getsource(obj)
        if f"self.{instance_attr}" not in source:
            raise LookupError(
                f"touch {entry.name!r}: {qualname} no longer sets self.{instance_attr}"
            )
    if entry.parameters:
        accepted = set(inspect.signature(obj).parameters)
        missing = [p for p in entry.parameters if p not in accepted]
        if missing:
            raise LookupError(f"touch {entry.name!r}: {entry.target} no longer accepts {missing}")
    return obj


def all_touches() -> list[tuple[str, str, str, str]]:
    """(name, what, why, remove_when) of every touch here and every CPU patch."""
    from megatron_edl import cpu

    rows = [(t.name, t.target, t.why, t.remove_when) for t in TOUCHES.values()]
    rows += [(p.name, p.what, p.why, p.remove_when) for p in cpu.PATCHES]
    return rows


# ----------------------------------------------------------------------------------------------
# The registry. Keep entries grouped by the module that performs them.
# ----------------------------------------------------------------------------------------------

_register(
    name="argparse-formatter",
    target="argparse:ArgumentParser._get_formatter",
    kind="private-call",
    where="megatron_edl.pretrain_gpt.escape_percent_in_help",
    why="megatron-core 0.19.2 has a help string with a bare '%' that makes --help crash; we "
    "format every help string once through argparse's own formatter to find and escape them",
    remove_when="Megatron's help strings are %-safe (fixed upstream after 0.19.2)",
)

_register(
    name="dataset-helpers-compile",
    target="megatron.core.datasets.utils:compile_helpers",
    kind="rebind",
    where="megatron_edl.pretrain_gpt.use_wheel_dataset_helpers",
    why="Megatron's initialize runs compile_helpers (make -C megatron/core/datasets) on rank 0 and "
    "exits when it fails; the megatron-core wheel ships the compiled helpers_cpp but no Makefile, "
    "so we replace it by a no-op when the Makefile is absent and helpers_cpp imports",
    remove_when="megatron-core skips the build when the compiled helpers are present (or the "
    "wheel ships its Makefile)",
)

_register(
    name="evaluate-share-logging",
    target="megatron.training.training:evaluate",
    kind="rebind",
    where="megatron_edl.integration.gpt.install_share_logging",
    why="the per-domain 'token share/<d>' entries of the validation report are shares, not "
    "losses; Megatron's evaluate_and_print_results prints a PPL for every entry, so the wrapper "
    "pops them after evaluate and prints them on a line of their own",
    remove_when="Megatron's evaluation report can mark an entry as not a loss (no PPL), or takes "
    "a logging callback",
    parameters=("forward_step_func", "data_iterator", "model"),
)

_register(
    name="gpt-dataset-sample-documents",
    target="megatron.core.datasets.gpt_dataset:GPTDataset._query_document_sample_shuffle_indices",
    kind="override",
    where="megatron_edl.integration.dataset.DomainLabelsMixin",
    why="a sample's per-token domain labels need the ids and lengths of the documents it was cut "
    "from; GPTDataset computes them in this private method and __getitem__ drops them",
    remove_when="GPTDataset returns (or exposes through a public hook) the document ids and "
    "lengths of each sample",
    parameters=("idx",),
)
