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
:func:`touch` at the call site (in the class body for code run every forward, so the lookup
happens once at import), and name the public API that would replace it in
``remove_when``. An override that hands a value to code running after the stock method returns
depends on when Megatron calls it: its ``order`` says which order, and names the test that
fails when the order changes.

The megatron-core 0.19 workarounds of the launchers are in
:mod:`megatron_edl.integration.workarounds`, each registered here.
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
    order: str = ""
    """For a handoff through an override (a value it keeps that our code reads after the stock
    method calling it returns): the call order relied on, and ``path::test`` of the test that
    fails when Megatron calls it in another order. Signatures cannot show an order."""


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
    where="megatron_edl.integration.workarounds.escape_percent_in_help",
    why="megatron-core 0.19.2 has a help string with a bare '%' that makes --help crash; we "
    "format every help string once through argparse's own formatter to find and escape them",
    remove_when="Megatron's help strings are %-safe (fixed upstream after 0.19.2)",
)

# -- megatron_edl.integration.losses.base -------------------------------------------------------

_register(
    name="moe-metrics-tracker-report",
    target="megatron.core.transformer.moe.moe_logging:MoEMetricsTracker.report",
    kind="wrap",
    where="megatron_edl.integration.losses.base.register_metrics",
    why="training_log passes a fixed whitelist (track_names) of MoE metric names to the "
    "tracker's report, so metrics recorded under other names never reach the iteration log, "
    "TensorBoard or W&B; we wrap the tracker object's report to append our names",
    remove_when="Megatron's training_log reports every recorded MoE metric, or takes extra "
    "metric names from an argument or a registration API",
    parameters=("track_names",),
)

# -- megatron_edl.integration.router -------------------------------------------------------------

_register(
    name="router-apply-aux-loss",
    target="megatron.core.transformer.moe.router:TopKRouter._apply_aux_loss",
    kind="override",
    where="megatron_edl.integration.router.AuxLossTopKRouter._apply_aux_loss",
    why="the only place the fp32 normalised scores Megatron computes for its aux losses "
    "(scores_for_aux_loss) are visible; EDL reuses them as its dense p_t instead of a second "
    "softmax (docs/BENCHMARKS.md); the override only keeps a reference and calls the stock method",
    remove_when="TopKRouter.routing returns (or exposes through a public hook) the dense scores "
    "of its score function",
    parameters=("probs", "scores_for_aux_loss", "routing_map", "with_padding_mask"),
    order="TopKRouter.routing calls _apply_aux_loss before it returns (otherwise EDL computes "
    "its own scores, correct but slower): tests/unit/integration/test_router_settings.py::"
    "test_sigmoid_aux_loss_scores_are_reused_with_the_same_gradient",
)

# -- megatron_edl.integration.losses.orthogonality ----------------------------------------------

_register(
    name="flex-dispatcher-comm-manager",
    target="megatron.core.transformer.moe.token_dispatcher:MoEFlexTokenDispatcher#_comm_manager",
    kind="private-attr",
    where="megatron_edl.integration.losses.orthogonality.OrthogonalityFlexTokenDispatcher",
    why="the orthogonality loss needs each token's k expert outputs on the token's rank; the "
    "flex dispatcher keeps the DeepEP handle and the token/column layout only in its private "
    "_comm_manager",
    remove_when="MoEFlexTokenDispatcher exposes the dispatch layout (indices, probs, handle) or "
    "a combine that returns per-expert outputs",
)
_register(
    name="deepep-manager-state",
    target="megatron.core.transformer.moe.token_dispatcher:_DeepepManager#dispatched_indices",
    kind="private-attr",
    where="megatron_edl.integration.losses.orthogonality.OrthogonalityFlexTokenDispatcher",
    why="the DeepEP manager (a private class) holds the layout the hook reads: "
    "dispatched_indices, dispatched_routing_map, pad_offsets, token_indices, token_probs, group, "
    "handle; the entry checks the first, the others are set next to it",
    remove_when="as flex-dispatcher-comm-manager",
)
_register(
    name="token-dispatcher-fused-combine",
    target="megatron.core.transformer.moe.token_dispatcher:_DeepepManager.combine",
    kind="private-call",
    where="megatron_edl.integration.losses.orthogonality.OrthogonalityFlexTokenDispatcher.token_combine",
    why="each column of expert outputs goes back to its token's rank through DeepEP's combine "
    "with the dispatch's own handle: we call the dispatcher module's fused_combine (None without "
    "DeepEP, so the entry checks _DeepepManager.combine, Megatron's caller of it), the function "
    "Megatron itself calls (tests/helpers/deepep_emulation.py replaces it there)",
    remove_when="as flex-dispatcher-comm-manager",
)
_register(
    name="alltoall-dispatcher-state",
    target="megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher#probs",
    kind="private-attr",
    where="megatron_edl.integration.losses.orthogonality.OrthogonalityAlltoAllTokenDispatcher",
    why="the orthogonality hook in combine_postprocess needs the (token, expert) layout of the "
    "combined rows: it reads the routing_map and probs the dispatcher keeps from "
    "dispatch_preprocess (internal state, not an API)",
    remove_when="the dispatcher hands the routing layout to combine (argument or public "
    "property), or offers a per-expert-output combine hook",
)
_register(
    name="allgather-dispatcher-state",
    target="megatron.core.transformer.moe.token_dispatcher:MoEAllGatherTokenDispatcher#local_map",
    kind="private-attr",
    where="megatron_edl.integration.losses.orthogonality.OrthogonalityAllGatherTokenDispatcher",
    why="the orthogonality hook places each local expert's outputs in their tokens' slots: it "
    "reads the gathered routing_map (in dispatch_postprocess, before Megatron clears it), "
    "local_map and local_probs, internal state of the dispatcher",
    remove_when="as alltoall-dispatcher-state",
)
_register(
    name="moe-layer-training-dispatcher",
    target="megatron.core.transformer.moe.moe_layer:MoELayer#_training_token_dispatcher",
    kind="private-attr",
    where="megatron_edl.integration.losses.orthogonality.OrthogonalityMoELayer.__init__",
    why="inference-optimized MoE layers swap the token dispatcher back from the private "
    "_training_token_dispatcher when they return to training; ours must be the one kept there",
    remove_when="MoELayer builds its dispatcher through a builder or spec slot we can fill",
)

# -- megatron_edl.integration.telemetry ----------------------------------------------------------

_register(
    name="training-post-step-callbacks",
    target="megatron.training.training:post_training_step_callbacks",
    kind="rebind",
    where="megatron_edl.integration.telemetry.install_hooks",
    why="Megatron's training loop has no callback API; train() looks this function up as a module "
    "global after every iteration, so rebinding it is the only way to dump the routing "
    "statistics at an iteration boundary on every rank",
    remove_when="megatron.training offers per-iteration callbacks (e.g. a callbacks argument of "
    "pretrain)",
    parameters=("model", "optimizer", "opt_param_scheduler", "iteration"),
)
_register(
    name="training-evaluate",
    target="megatron.training.training:evaluate",
    kind="rebind",
    where="megatron_edl.integration.telemetry.install_hooks, "
    "megatron_edl.integration.pruning.install_masked_evaluation",
    why="the evaluation probe records the routing of Megatron's evaluation and needs a hook "
    "before and after it; the pruning evaluation repeats it on the same batches under each "
    "expert mask; evaluate() is looked up as a module global by its callers",
    remove_when="megatron.training offers evaluation callbacks",
    parameters=("forward_step_func", "data_iterator", "model"),
)

# -- megatron_edl.integration.pruning -----------------------------------------------------------

_register(
    name="training-setup-model-and-optimizer",
    target="megatron.training.training:setup_model_and_optimizer",
    kind="rebind",
    where="megatron_edl.integration.pruning.install_export",
    why="the pruning export (megatron-edl-prune --export) needs the model Megatron built and "
    "loaded from --load (any saved layout), then a stock model of the same arguments with "
    "--num-experts M (it calls the function again with args.num_experts = M and no --load, as "
    "Megatron's upcycling rebuilds a model after changing the global args) to save with "
    "save_checkpoint; pretrain() looks this function up as a module global and offers no hook "
    "between loading the checkpoint and building the data",
    remove_when="megatron.training offers a model-loading API outside pretrain (load a checkpoint "
    "into models built from a config) or a post-load callback of pretrain",
    parameters=("model_type", "model_provider_func", "checkpointing_context", "cfg_container"),
)

# -- integration.workarounds, integration.gpt, integration.dataset ------------------------------

_register(
    name="dataset-helpers-compile",
    target="megatron.core.datasets.utils:compile_helpers",
    kind="rebind",
    where="megatron_edl.integration.workarounds.use_wheel_dataset_helpers",
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
    order="GPTDataset.__getitem__(idx) calls it with idx (0 for a padding sample) on every "
    "fetch, before it returns; otherwise the fetch raises naming this touch: "
    "tests/unit/integration/test_dataset.py::"
    "test_a_fetch_that_skips_the_document_query_is_refused",
)
