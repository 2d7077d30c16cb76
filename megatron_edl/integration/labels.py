"""Domain labels from the batch to the EDL routers: TP broadcast, SP slicing, per-micro-batch push.

Order of slicing, the same as the tokens': the dataset gives ``[b, S]`` labels with the batch; TP
rank 0 broadcasts them over TP (Megatron's ``get_batch_on_this_tp_rank`` drops unknown keys);
``get_batch_on_this_cp_rank`` splits them along the sequence like the tokens (zig-zag); the router
of a sequence-parallel layer sees rows ``[r*s/tp, (r+1)*s/tp)`` of the ``[s, b]`` layout, flattened
s-major (``index = s_local * b + b_idx``), which :func:`router_labels` reproduces.
"""

from __future__ import annotations

import weakref

import torch

from megatron_edl.integration.router import DomainLabels, EDLTopKRouter

# Batch keys the labelled datasets add (both [b, S]).
DOMAIN_IDS_KEY = "domain_ids"
WEIGHTS_KEY = "edl_weights"
EDL_BATCH_KEYS = (DOMAIN_IDS_KEY, WEIGHTS_KEY)


def broadcast_labels_over_tp(
    batch: dict,
    *,
    tp_rank: int,
    src_rank: int,
    group,
    micro_batch_size: int,
    seq_length: int,
) -> dict[str, torch.Tensor]:
    """Broadcast the EDL keys from TP rank 0 to the TP group, as one packed float64 tensor.

    Args:
        batch: On TP rank 0, the data loader's batch (must hold both EDL keys); ignored elsewhere.

    Returns:
        ``{"domain_ids": int64 [b, S], "edl_weights": float32 [b, S]}`` on every TP rank.
    """
    shape = (2, micro_batch_size, seq_length)
    if tp_rank == 0:
        missing = [k for k in EDL_BATCH_KEYS if batch.get(k) is None]
        if missing:
            raise KeyError(
                f"EDL is on but the batch has no {missing}: use a labelled dataset "
                "(--mock-data with EDL, or a domain-labelled indexed dataset)"
            )
        packed = torch.stack(
            [batch[DOMAIN_IDS_KEY].to(torch.float64), batch[WEIGHTS_KEY].to(torch.float64)]
        ).cuda()
        if tuple(packed.shape) != shape:
            raise ValueError(
                f"EDL labels have shape {tuple(packed.shape[1:])}, expected {shape[1:]}"
            )
    else:
        packed = torch.empty(shape, dtype=torch.float64, device="cuda")
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.broadcast(packed, src_rank, group=group)
    return {DOMAIN_IDS_KEY: packed[0].to(torch.int64), WEIGHTS_KEY: packed[1].to(torch.float32)}


def router_labels(
    domain_ids_BS: torch.Tensor,
    weights_BS: torch.Tensor,
    *,
    sequence_parallel: bool,
    tp_rank: int,
    tp_size: int,
    iteration: int | None = None,
) -> DomainLabels:
    """The labels of the tokens this rank's routers see, in their order.

    Args:
        domain_ids_BS: ``[b, s]`` domain ids of this CP rank's part of the micro-batch.
        weights_BS: ``[b, s]`` EDL token weights, same layout.
        sequence_parallel: Whether the MoE layers run sequence parallel (then each TP rank's
            router sees ``s / tp`` of the sequence).
        tp_rank: This rank's tensor-parallel rank.
        tp_size: Tensor-parallel size.
        iteration: The 0-based optimizer step (for the β schedule), or ``None``.
    """
    ids_SB, weights_SB = domain_ids_BS.t(), weights_BS.t()
    if sequence_parallel and tp_size > 1:
        seq = ids_SB.shape[0]
        if seq % tp_size:
            raise ValueError(f"sequence length {seq} is not divisible by TP size {tp_size}")
        rows = slice(tp_rank * seq // tp_size, (tp_rank + 1) * seq // tp_size)
        ids_SB, weights_SB = ids_SB[rows], weights_SB[rows]
    return DomainLabels(
        domain_ids_T=ids_SB.reshape(-1).contiguous(),
        weights_T=weights_SB.reshape(-1).contiguous().float(),
        iteration=iteration,
    )


_ROUTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def edl_routers(model: torch.nn.Module) -> list[EDLTopKRouter]:
    """The EDL routers of one model chunk (wrapped or not), cached per chunk."""
    routers = _ROUTERS.get(model)
    if routers is None:
        routers = [m for m in model.modules() if isinstance(m, EDLTopKRouter)]
        _ROUTERS[model] = routers
    return routers


def routers_wanting_labels(model: torch.nn.Module) -> list[EDLTopKRouter]:
    """The routers of ``model`` whose next forward (in the current grad mode) consumes labels."""
    grad_enabled = torch.is_grad_enabled()
    return [r for r in edl_routers(model) if r.wants_labels(grad_enabled)]


def push_labels(model: torch.nn.Module, labels: DomainLabels) -> None:
    """Queue one micro-batch's labels on every EDL router of ``model`` that will consume them
    (the EDL loss in training forwards, the routing telemetry in the forwards it counts)."""
    for router in routers_wanting_labels(model):
        router.push_labels(labels)
