"""Domain labels from the batch to their consumers (the routers): batch keys, TP broadcast, SP
slicing, and the per-micro-batch queue each consumer reads.

Order of slicing, the same as the tokens': the dataset gives ``[b, S]`` labels with the batch; TP
rank 0 broadcasts them over TP (Megatron's ``get_batch_on_this_tp_rank`` drops unknown keys);
``get_batch_on_this_cp_rank`` splits them along the sequence like the tokens (zig-zag); the router
of a sequence-parallel layer sees rows ``[r*s/tp, (r+1)*s/tp)`` of the ``[s, b]`` layout, flattened
s-major (``index = s_local * b + b_idx``), which :func:`router_labels` reproduces.

The bottom of the integration package's layering: this module imports nothing of ours (and no
``megatron``), so the datasets, the training step, the routers and the telemetry can all use it.
A module that consumes labels subclasses :class:`LabelConsumer` (a :class:`LabelQueue` plus
``wants_labels``); :func:`push_labels` finds the consumers of a model by that base class, never by
the router's class.

Shape legend: b micro-batch size, S (s) sequence length (of this CP rank), T tokens one router
sees (``s * b``, or ``s / tp * b`` under sequence parallelism).
"""

from __future__ import annotations

import collections
import dataclasses
import weakref

import torch

__all__ = [
    "DOMAIN_IDS_KEY",
    "EDL_BATCH_KEYS",
    "WEIGHTS_KEY",
    "DomainLabels",
    "LabelConsumer",
    "LabelQueue",
    "broadcast_labels_over_tp",
    "label_consumers",
    "push_labels",
    "router_labels",
    "routers_wanting_labels",
    "to_device_async",
]

# Batch keys the labelled datasets add (both [b, S]).
DOMAIN_IDS_KEY = "domain_ids"
WEIGHTS_KEY = "edl_weights"
EDL_BATCH_KEYS = (DOMAIN_IDS_KEY, WEIGHTS_KEY)


@dataclasses.dataclass(frozen=True)
class DomainLabels:
    """Domain ids and EDL token weights of the tokens one router sees in one micro-batch.

    Both are flattened in the router's token order (s-major over this rank's CP/SP shard).
    """

    domain_ids_T: torch.Tensor
    """int64 [T]; -1 = no label."""
    weights_T: torch.Tensor
    """fp32 [T]; 1/T_s for the segment mode, 1 for the token mode."""
    iteration: int | None = None
    """0-based optimizer step of the micro-batch (Megatron's ``args.curr_iteration``), for the
    β schedule; ``None``: the full β."""


class LabelQueue:
    """Per-micro-batch FIFO of :class:`DomainLabels` of one consumer (one router).

    The training step pushes one entry per micro-batch before the model's forward; the consumer
    pops one entry per forward that needs labels (:meth:`LabelConsumer.wants_labels`): without
    recompute in forward order, with activation recompute at the recompute, which runs in
    backward order. Per pipeline stage and model chunk both orders are the micro-batch order, so
    each forward gets its own micro-batch's labels.
    """

    def __init__(self) -> None:
        self._entries: collections.deque[DomainLabels] = collections.deque()

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, labels: DomainLabels) -> None:
        """Queue the labels of one micro-batch."""
        self._entries.append(labels)

    def pop(self, num_tokens: int, *, consumer: str = "label consumer") -> DomainLabels:
        """The oldest entry, checked against the number of tokens the consumer sees.

        Args:
            num_tokens: T, the tokens of the forward that consumes the entry.
            consumer: How the errors name the consumer, e.g. ``"EDL router of layer 3"``.

        Raises:
            RuntimeError: If the queue is empty (the training step pushed nothing).
            ValueError: If the entry holds a number of labels other than ``num_tokens`` (names
                both).
        """
        if not self._entries:
            raise RuntimeError(
                f"{consumer} has no domain labels for this "
                "micro-batch: the training step must push them before the model's forward "
                "(megatron_edl.integration.gpt.forward_step does)"
            )
        labels = self._entries.popleft()
        if labels.domain_ids_T.numel() != num_tokens:
            raise ValueError(
                f"{consumer} sees {num_tokens} tokens but got "
                f"{labels.domain_ids_T.numel()} domain labels: labels must be sliced like the "
                "tokens (CP split, then the sequence-parallel slice, s-major)"
            )
        return labels

    def clear(self) -> None:
        """Drop every queued entry."""
        self._entries.clear()


class LabelConsumer:
    """Base of the modules that consume domain labels (the routers), found by :func:`push_labels`.

    A subclass sets ``self.label_queue`` (a :class:`LabelQueue`) in its ``__init__`` and
    implements :meth:`wants_labels`; its forward pops one entry whenever ``wants_labels`` was
    true for that forward's grad mode.
    """

    label_queue: LabelQueue

    def wants_labels(self, grad_enabled: bool) -> bool:
        """Whether a forward in the current mode consumes one entry of labels.

        Args:
            grad_enabled: ``torch.is_grad_enabled()`` during the forward.
        """
        raise NotImplementedError

    def push_labels(self, labels: DomainLabels) -> None:
        """Queue the labels of one micro-batch (called by the training step before forward)."""
        self.label_queue.push(labels)


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

    No host sync: on TP rank 0 each key goes to the GPU from pinned memory with
    ``non_blocking=True`` (:func:`to_device_async`; Megatron's data loader already pins its
    batches), and the packing runs on the GPU. Without CUDA (``--cpu``) the tensors stay where
    they are.

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
            [to_device_async(batch[key]).to(torch.float64) for key in EDL_BATCH_KEYS]
        )
        if tuple(packed.shape) != shape:
            raise ValueError(
                f"EDL labels have shape {tuple(packed.shape[1:])}, expected {shape[1:]}"
            )
    else:
        packed = torch.empty(shape, dtype=torch.float64, device=_label_device())
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.broadcast(packed, src_rank, group=group)
    return {DOMAIN_IDS_KEY: packed[0].to(torch.int64), WEIGHTS_KEY: packed[1].to(torch.float32)}


def _label_device() -> torch.device:
    """The current CUDA device, or the CPU without CUDA (``--cpu``)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device_async(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the current CUDA device, copied without a host sync.

    A host tensor is staged in pinned memory (unless it already is, as Megatron's data loader
    leaves it) and copied with ``non_blocking=True``: the copy is queued on the current stream
    and the host goes on (a pageable source makes ``.cuda()`` wait for the copy). Without CUDA
    the tensor is returned as it is (CPU runs: nothing to copy, and pinning needs CUDA).
    """
    if not torch.cuda.is_available():
        return tensor
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(_label_device(), non_blocking=True)


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


_CONSUMERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def label_consumers(model: torch.nn.Module) -> list[LabelConsumer]:
    """The label consumers (routers) of one model chunk (wrapped or not), cached per chunk."""
    consumers = _CONSUMERS.get(model)
    if consumers is None:
        consumers = [m for m in model.modules() if isinstance(m, LabelConsumer)]
        _CONSUMERS[model] = consumers
    return consumers


def routers_wanting_labels(model: torch.nn.Module) -> list[LabelConsumer]:
    """The routers of ``model`` whose next forward (in the current grad mode) consumes labels."""
    grad_enabled = torch.is_grad_enabled()
    return [r for r in label_consumers(model) if r.wants_labels(grad_enabled)]


def push_labels(model: torch.nn.Module, labels: DomainLabels) -> None:
    """Queue one micro-batch's labels on every router of ``model`` that will consume them
    (the EDL loss in training forwards, the routing telemetry in the forwards it counts)."""
    for router in routers_wanting_labels(model):
        router.push_labels(labels)
