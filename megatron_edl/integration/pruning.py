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

Used by :mod:`megatron_edl.prune` (docs/method.md section 6).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from megatron_edl.analysis.routing_stats import atomic_write
from megatron_edl.integration.internals import touch
from megatron_edl.integration.labels import DomainLabels, label_consumers

__all__ = [
    "PLAN_FORMAT",
    "RESULTS_FORMAT",
    "install_masked_evaluation",
    "mask_expert_logits",
    "set_expert_masks",
]

PLAN_FORMAT = "megatron-edl-prune-plan"
RESULTS_FORMAT = "megatron-edl-prune-masked-eval"


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
        masks: Layer number (1-based, as ``router.layer_number``) -> bool [D, E].

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
        if router.layer_number not in masks:
            raise KeyError(f"the pruning plan has no mask for MoE layer {router.layer_number}")
        router.expert_mask_DE = masks[router.layer_number].to(router.weight.device)
        count += 1
    return count


class _Recorder(Iterator):
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
        recorder = _Recorder(data_iterator) if data_iterator is not None else None
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
