"""Domain expert pruning in Megatron's evaluation: masked routing, one evaluation per mask.

Each router holds an optional keep mask ``expert_mask_DE`` (bool [D, E]); in evaluation a token of
domain d routes among the experts ``expert_mask_DE[d]`` only: the other experts' logits are set to
-inf before top-k (k unchanged), so the router's top-k, its score function and the expert weights
are the stock ones over the kept experts. Unlabelled tokens (id -1) keep every expert.

:func:`install_masked_evaluation` rebinds Megatron's ``evaluate`` (registry entry
``training-evaluate``) so that one call evaluates every mask of a plan on the same batches: the
first pass records the batches this rank's forward step draws, the next passes replay them. The
per-domain LM loss of each mask (the ``lm loss/<d>`` entries of ``--moe-edl-eval-per-domain``) is
written as JSON by the last rank. The first mask of a plan is "keep every expert", so its numbers
are the probe's.

:func:`install_export` rebinds Megatron's ``setup_model_and_optimizer`` (registry entry
``training-setup-model-and-optimizer``) for the export pass (``--export DOMAIN --keep M``): once
Megatron has built the model and loaded the checkpoint, the MoE layers' tensors are sliced to
the domain's kept experts (:func:`slice_moe_state_dict`), copied into a stock M-expert model that
Megatron builds again from its arguments (``--num-experts M``), and Megatron's
``save_checkpoint`` writes it; the pass then ends (:class:`ExportDone`).

Used by :mod:`megatron_edl.prune` (docs/method.md section 6).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from megatron_edl.analysis.routing_stats import atomic_write
from megatron_edl.integration.internals import touch
from megatron_edl.integration.labels import DomainLabels, label_consumers
from megatron_edl.integration.losses.base import layer_index

__all__ = [
    "EXPORT_SPEC_FORMAT",
    "PLAN_FORMAT",
    "RESULTS_FORMAT",
    "ExportDone",
    "ExportError",
    "install_export",
    "install_masked_evaluation",
    "load_export_spec",
    "mask_expert_logits",
    "moe_layer_prefixes",
    "set_expert_masks",
    "slice_moe_state_dict",
]

PLAN_FORMAT = "megatron-edl-prune-plan"
RESULTS_FORMAT = "megatron-edl-prune-masked-eval"
EXPORT_SPEC_FORMAT = "megatron-edl-prune-export-spec"


def mask_expert_logits(
    logits: torch.Tensor,
    mask_DE: torch.Tensor,
    labels: DomainLabels | None,
    layer_number: int,
) -> torch.Tensor:
    """``logits`` with the experts a token's domain does not keep set to -inf.

    Args:
        logits: Router logits, [..., E] (flattened to [T, E] in the router's token order).
        mask_DE: bool [D, E], True for the experts domain d keeps.
        labels: The labels of this forward's tokens (the router's queue entry).
        layer_number: The router's layer, for the error message.

    Returns:
        The masked logits, same shape as ``logits``.

    Raises:
        RuntimeError: no labels reached the router (a mask needs the tokens' domains).
    """
    if labels is None:
        raise RuntimeError(
            f"expert mask on the router of layer {layer_number} but no domain labels reached it: "
            "the masked evaluation needs --moe-edl-eval-per-domain and labelled data"
        )
    num_experts = mask_DE.shape[-1]
    logits_TE = logits.reshape(-1, num_experts)
    ids_T = labels.domain_ids_T.to(device=logits.device)
    allowed_TE = mask_DE.to(device=logits.device)[ids_T.clamp(min=0)]
    allowed_TE = allowed_TE | (ids_T < 0).unsqueeze(-1)
    return logits_TE.masked_fill(~allowed_TE, float("-inf")).view_as(logits)


def _masked_routers(model_chunks: Iterable[torch.nn.Module]) -> list:
    return [
        router
        for chunk in model_chunks
        for router in label_consumers(chunk)
        if hasattr(router, "expert_mask_DE")
    ]


def set_expert_masks(
    model_chunks: Iterable[torch.nn.Module], masks: Mapping[int, torch.Tensor] | None
) -> int:
    """Give each router the keep mask of its layer (``None``: every router keeps every expert).

    Args:
        model_chunks: Megatron's model chunks.
        masks: Layer number (1-based, MTP layers after the decoder's, as the routing statistics
            number them) -> bool [D, E].

    Returns:
        The number of routers given a mask.

    Raises:
        KeyError: a router's layer has no mask in ``masks``.
    """
    count = 0
    for router in _masked_routers(model_chunks):
        if masks is None:
            router.expert_mask_DE = None
            continue
        layer = _global_layer(router)
        if layer not in masks:
            raise KeyError(f"the pruning plan has no mask for MoE layer {layer}")
        router.expert_mask_DE = masks[layer].to(router.weight.device)
        count += 1
    return count


def _global_layer(router) -> int:
    """The router's layer as the routing statistics number it (MTP layers after the decoder's)."""
    is_mtp = bool(getattr(router, "is_mtp_layer", False))
    return layer_index(router.config, router.layer_number, is_mtp_layer=is_mtp).layer


class Recorder(Iterator):
    """Draws from ``source`` and keeps what it drew, for :meth:`replay`."""

    def __init__(self, source) -> None:
        self.source = source
        self.items: list[Any] = []

    def __next__(self):
        item = next(self.source)
        self.items.append(_clone(item))
        return item

    def replay(self) -> Iterator:
        return iter([_clone(item) for item in self.items])


def _clone(item):
    if isinstance(item, torch.Tensor):
        return item.clone()
    if isinstance(item, dict):
        return {k: _clone(v) for k, v in item.items()}
    if isinstance(item, list | tuple):
        return type(item)(_clone(v) for v in item)
    return item


def _mean_losses(total_loss_dict, domains: Sequence[str]) -> dict[str, Any]:
    def value(key: str) -> float | None:
        if not total_loss_dict or key not in total_loss_dict:
            return None
        number = float(total_loss_dict[key])
        return number if number == number else None  # NaN: domain absent

    return {
        "lm_loss": value("lm loss"),
        "lm_loss_per_domain": {d: value(f"lm loss/{d}") for d in domains},
        "token_share_per_domain": {d: value(f"token share/{d}") for d in domains},
    }


def load_plan(path: str | os.PathLike) -> dict[str, Any]:
    """Read a plan written by :mod:`megatron_edl.prune` (format :data:`PLAN_FORMAT`)."""
    with open(path, encoding="utf-8") as f:
        plan = json.load(f)
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path}: not a pruning plan (format {plan.get('format')!r})")
    return plan


def install_masked_evaluation(plan: Mapping[str, Any], out_path: str | os.PathLike) -> None:
    """Rebind Megatron's ``evaluate`` to evaluate every mask of ``plan`` on the same batches.

    Call before ``pretrain`` (in the probe's evaluate-only mode); the telemetry's wrapper, if
    installed afterwards, wraps this one. Only the first call of ``evaluate`` (the validation
    set) is repeated.

    Args:
        plan: ``{"format", "domains", "layers", "configs": [{"name", "ranking", "keep",
            "masks": {layer: [[bool] * E] * D}}]}``; ``masks`` of ``None`` keeps every expert.
        out_path: Where the last rank writes the results JSON (:data:`RESULTS_FORMAT`).
    """
    from megatron.training import training

    touch("training-evaluate")
    evaluate = training.evaluate
    domains = tuple(plan["domains"])
    configs = plan["configs"]
    done = False

    @functools.wraps(evaluate)
    def evaluate_masked(forward_step_func, data_iterator, model, *a, **kw):
        nonlocal done
        if done:
            return evaluate(forward_step_func, data_iterator, model, *a, **kw)
        done = True
        recorder = Recorder(data_iterator) if data_iterator is not None else None
        results, first = [], None
        for index, config in enumerate(configs):
            masks = config.get("masks")
            set_expert_masks(
                model,
                None
                if masks is None
                else {int(k): torch.tensor(v, dtype=torch.bool) for k, v in masks.items()},
            )
            source = recorder if index == 0 or recorder is None else recorder.replay()
            result = evaluate(forward_step_func, source, model, *a, **kw)
            total_loss_dict = result[0] if isinstance(result, tuple) else None
            results.append(
                {k: config[k] for k in ("name", "ranking", "keep")}
                | _mean_losses(total_loss_dict, domains)
            )
            if first is None:
                first = result
        set_expert_masks(model, None)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if rank == world - 1:  # the last rank is on the last pipeline stage
            payload = {"format": RESULTS_FORMAT, "domains": list(domains), "results": results}
            text = json.dumps(payload, indent=1, sort_keys=True)
            atomic_write(out_path, lambda f: f.write(text.encode()))
        return first

    training.evaluate = evaluate_masked


# ----------------------------------------------------------------------------------------------
# Export: a checkpoint with one domain's kept experts only
# ----------------------------------------------------------------------------------------------

# Per-expert rows of a router (Megatron's TopKRouter: the gate, its bias with --add-bias-linear,
# the aux-loss-free expert bias). Other persistent router state has no slicing rule (refused).
_ROUTER_ROWS = ("router.weight", "router.bias", "router.expert_bias")
# SequentialMLP: one module per local expert; TEGroupedMLP: one weight (and bias) per expert.
_SEQUENTIAL_RE = re.compile(r"experts\.local_experts\.(\d+)\.(.+)")
_GROUPED_RE = re.compile(r"experts\.(linear_fc1|linear_fc2)\.(weight|bias)(\d+)")
_EXTRA_STATE = "_extra_state"


class ExportError(ValueError):
    """An export that cannot be made (the message names the layer, key or setting)."""


class ExportDone(Exception):
    """Raised by the export pass once the checkpoint is saved: ends Megatron's ``pretrain``."""


def slice_moe_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    kept: Mapping[str, Sequence[int]],
    *,
    num_experts: int,
) -> dict[str, torch.Tensor]:
    """A model's plain state dict with only the kept experts of each MoE layer, renumbered.

    Under each MoE layer prefix ``P`` (e.g. ``decoder.layers.0.mlp``): the rows ``kept[P]`` of
    ``P.router.weight`` [E, H], ``P.router.bias`` and ``P.router.expert_bias`` [E]; the experts
    ``P.experts.local_experts.<j>.*`` (SequentialMLP) and ``P.experts.linear_fc{1,2}.weight<j>``
    / ``bias<j>`` (grouped GEMM) for j in ``kept[P]``, renamed to their position i in
    ``kept[P]``, the others dropped. Everything else (attention, norms, shared experts, the
    ``_extra_state`` entries) is kept as it is.

    Args:
        state_dict: ``module.state_dict()`` of an unsharded model (every expert present).
        kept: MoE layer prefix -> the original ids of its kept experts; expert i of the result
            is ``kept[P][i]``.
        num_experts: E of the source.

    Returns:
        The new state dict (sliced router rows are copies; other tensors are shared).

    Raises:
        ExportError: a kept id outside 0..E-1 or repeated; a prefix with no router, or whose
            experts are not exactly 0..E-1 (a state dict of one expert-parallel rank); a row
            tensor whose first dimension is not E; a tensor under a router or the experts that
            no rule slices.
    """
    new_index: dict[str, dict[int, int]] = {}
    for prefix, ids in kept.items():
        ids = [int(j) for j in ids]
        if len(set(ids)) != len(ids) or not all(0 <= j < num_experts for j in ids) or not ids:
            raise ExportError(
                f"{prefix}: kept experts must be distinct ids in 0..{num_experts - 1}, got {ids}"
            )
        new_index[prefix] = {j: i for i, j in enumerate(ids)}
    prefixes = sorted(new_index, key=len, reverse=True)  # the longest match first
    seen: dict[str, set[int]] = {p: set() for p in new_index}
    routers: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
        if prefix is None:
            out[key] = value
            continue
        rest, index = key[len(prefix) + 1 :], new_index[prefix]
        sequential, grouped = _SEQUENTIAL_RE.fullmatch(rest), _GROUPED_RE.fullmatch(rest)
        if rest in _ROUTER_ROWS:
            if value.dim() == 0 or value.shape[0] != num_experts:
                raise ExportError(
                    f"{key}: expected {num_experts} rows (one per expert), got shape "
                    f"{tuple(value.shape)}"
                )
            out[key] = value[list(index)].clone()
            routers.add(prefix)
        elif sequential or grouped:
            if sequential:
                j, tail = int(sequential[1]), sequential[2]
                renamed = f"{prefix}.experts.local_experts.{{}}.{tail}"
            else:
                j = int(grouped[3])
                renamed = f"{prefix}.experts.{grouped[1]}.{grouped[2]}{{}}"
            seen[prefix].add(j)
            if j in index:
                out[renamed.format(index[j])] = value
        elif rest.startswith(("router.", "experts.")) and not rest.endswith(_EXTRA_STATE):
            raise ExportError(f"{key}: no rule to slice this tensor to the kept experts")
        else:
            out[key] = value
    for prefix in new_index:
        if prefix not in routers:
            raise ExportError(f"{prefix}: no router weight in the state dict (not an MoE layer)")
        if seen[prefix] != set(range(num_experts)):
            raise ExportError(
                f"{prefix}: the state dict holds experts {sorted(seen[prefix])}, not all "
                f"{num_experts} (export from one process, without expert parallelism)"
            )
    return out


def moe_layer_prefixes(model: torch.nn.Module) -> dict[str, int]:
    """MoE layer prefix (``decoder.layers.0.mlp``) -> its global layer number, per router."""
    from megatron.core.transformer.moe.router import Router

    return {
        name.removesuffix(".router"): _global_layer(module)
        for name, module in model.named_modules()
        if isinstance(module, Router) and name.endswith(".router")
    }


def load_export_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Read an export spec written by :mod:`megatron_edl.prune` (:data:`EXPORT_SPEC_FORMAT`):
    ``{"format", "num_experts", "keep", "kept": {layer: [ids]}}``."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("format") != EXPORT_SPEC_FORMAT:
        raise ValueError(f"{path}: not an export spec (format {spec.get('format')!r})")
    return spec


def _copy_into(target: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``target``: every key but ``_extra_state`` entries must match."""
    result = target.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_EXTRA_STATE)]
    unexpected = [k for k in result.unexpected_keys if not k.endswith(_EXTRA_STATE)]
    if missing or unexpected:
        raise ExportError(
            f"the sliced state dict does not fit the stock model with --num-experts: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )


def install_export(spec: Mapping[str, Any], save_dir: str | os.PathLike) -> None:
    """Rebind Megatron's ``setup_model_and_optimizer`` to export the loaded model's kept experts.

    After Megatron built the model (the run's flags, E experts) and loaded ``--load`` into it
    (any saved layout: ``torch_dist`` reshards), the wrapper slices its state dict
    (:func:`slice_moe_state_dict`, the kept ids of each layer in ``spec``), has Megatron build
    the stock model of the same arguments with ``--num-experts M`` (the stock layer spec,
    Megatron's own ``setup_model_and_optimizer``, nothing loaded), copies the sliced tensors into
    it, and saves it with Megatron's ``save_checkpoint`` to ``save_dir`` at the source's
    iteration, in the run's ``--ckpt-format``. Then it raises :class:`ExportDone`. One process
    only (the pass holds every expert).

    Args:
        spec: ``{"num_experts": E, "keep": M, "kept": {layer: [M ids]}}`` (layers numbered as
            the routing statistics number them).
        save_dir: Megatron's ``--save`` for the exported checkpoint (must not exist, or be empty).
    """
    from megatron.training import training

    touch("training-setup-model-and-optimizer")
    setup = training.setup_model_and_optimizer

    @functools.wraps(setup)
    def setup_and_export(model_type, model_provider_func=None, checkpointing_context=None, **kw):
        model, _, _ = setup(model_type, model_provider_func, checkpointing_context, **kw)

        def build_stock(model_config):
            kw_stock = dict(kw)
            if kw.get("cfg_container") is not None:
                kw_stock["cfg_container"] = copy.copy(kw["cfg_container"])
                kw_stock["cfg_container"].model = model_config
            target, _, _ = setup(model_type, model_provider_func, checkpointing_context, **kw_stock)
            return target

        _export(model, spec, save_dir, build_stock)
        raise ExportDone

    training.setup_model_and_optimizer = setup_and_export


def _export(model_chunks, spec: Mapping[str, Any], save_dir, build_stock) -> None:
    from megatron.core.utils import unwrap_model
    from megatron.training import get_args
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.checkpointing import save_checkpoint

    if torch.distributed.get_world_size() != 1:
        raise ExportError(
            f"the export runs on one process (it holds every expert), got "
            f"{torch.distributed.get_world_size()}"
        )
    chunks = unwrap_model(model_chunks)
    if len(chunks) != 1:
        raise ExportError(f"the export needs one model chunk, got {len(chunks)}")
    (source,) = chunks
    layers = moe_layer_prefixes(source)
    kept_by_layer = {int(layer): ids for layer, ids in spec["kept"].items()}
    if sorted(layers.values()) != sorted(kept_by_layer):
        raise ExportError(
            f"the export spec keeps experts of layers {sorted(kept_by_layer)}, the model's MoE "
            f"layers are {sorted(layers.values())}"
        )
    sliced = slice_moe_state_dict(
        source.state_dict(),
        {prefix: kept_by_layer[layer] for prefix, layer in layers.items()},
        num_experts=int(spec["num_experts"]),
    )
    args = get_args()
    iteration, flops = args.iteration, args.num_floating_point_operations_so_far
    # The stock model of these arguments with --num-experts M, as Megatron's own upcycling
    # rebuilds a model after changing args.num_experts; nothing is loaded into it.
    args.num_experts, args.load, args.pretrained_checkpoint = int(spec["keep"]), None, None
    target_chunks = build_stock(gpt_config_from_args(args))
    (target,) = unwrap_model(target_chunks)
    _copy_into(target, sliced)
    args.save = os.fspath(save_dir)
    save_checkpoint(iteration, target_chunks, None, None, flops, checkpointing_context={})
