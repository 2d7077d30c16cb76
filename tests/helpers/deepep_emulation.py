"""A gloo stand-in for DeepEP's fused dispatch and combine, for Megatron's flex dispatcher on CPU.

DeepEP (https://github.com/deepseek-ai/DeepEP) needs NVIDIA GPUs and cannot be installed here.
Megatron's ``_DeepepManager`` reaches it only through three names of
``megatron.core.transformer.moe.token_dispatcher`` (imported there from ``moe/fused_a2a.py``):
``fused_dispatch``, ``fused_combine`` and ``set_deepep_num_sms``. :func:`install` replaces them,
inside a spawned gloo worker, by the functions below, which follow DeepEP's documented
semantics (its normal, non-low-latency kernels) with plain collectives:

``fused_dispatch(x_TH, indices_TC, probs_TC, num_experts, group)``
    Experts are split evenly over the ranks of ``group`` (L = num_experts / world per rank, rank
    i hosting ``[i * L, (i + 1) * L)``). Rank i receives, once, every token of every rank that
    names at least one of its experts, in source-rank order, then source-token order. Returns
    ``(recv_x, recv_indices, recv_probs, tokens_per_expert, handle)``: ``recv_indices`` keep the
    source's C columns, with the local expert id where the column's expert is hosted here and
    ``-1`` elsewhere; ``recv_probs`` the source's probabilities there and 0 elsewhere;
    ``tokens_per_expert`` the number of received tokens of each local expert (a CPU int64
    tensor, as Megatron's ``FusedDispatch`` builds it from DeepEP's list).
``fused_combine(x, group, handle)``
    Each received row goes back to its source token, and the rows of a token are summed over
    the ranks it was sent to. Returns ``(combined, None)``.

Both are differentiable like DeepEP's autograd functions: the backward of dispatch is the
combine of the gradients (of ``recv_x`` and of ``recv_probs``), the backward of combine is the
dispatch of the gradient. Here both follow from autograd through Megatron's all-gather
(``gather_from_sequence_parallel_region``, backward: reduce-scatter) and reduce-scatter
(``reduce_scatter_to_sequence_parallel_region``, backward: all-gather) over ``group`` and a
row selection. Every rank must hold the same number of tokens (as in the tests).

Shape legend: T tokens of this rank, C columns of a token's expert list, H hidden size,
G tokens of the whole group (world * T), V received tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass
class Handle:
    """What combine needs: which of the group's tokens this rank received."""

    received_G: Tensor
    """Bool mask over the group's tokens (rank-major) of the rows this rank received."""
    num_local_tokens: int


def _all_gather_ints(tensor: Tensor, group) -> Tensor:
    import torch.distributed as dist

    out = [torch.empty_like(tensor) for _ in range(group.size())]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return torch.cat(out)


def fused_dispatch(
    x_TH,
    indices_TC,
    probs_TC,
    num_experts,
    group,
    async_finish=False,
    allocate_on_comm_stream=False,
):
    """DeepEP's dispatch (see the module docstring); the two stream flags are ignored."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    world, rank = group.size(), group.rank()
    if num_experts % world:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the group ({world})")
    sizes = _all_gather_ints(torch.tensor([x_TH.shape[0]]), group)
    if not bool((sizes == x_TH.shape[0]).all()):
        raise ValueError(f"every rank must hold the same number of tokens, got {sizes.tolist()}")
    num_local = num_experts // world
    first = rank * num_local
    x_GH = gather_from_sequence_parallel_region(x_TH, group=group)
    probs_GC = gather_from_sequence_parallel_region(probs_TC, group=group)
    indices_GC = _all_gather_ints(indices_TC, group)
    here_GC = (indices_GC >= first) & (indices_GC < first + num_local)
    received_G = here_GC.any(dim=1)
    here_VC = here_GC[received_G]
    recv_indices_VC = torch.where(here_VC, indices_GC[received_G] - first, -1)
    recv_probs_VC = torch.where(
        here_VC, probs_GC[received_G], torch.zeros_like(here_VC, dtype=probs_GC.dtype)
    )
    tokens_per_expert = torch.tensor(
        [int((recv_indices_VC == local).sum()) for local in range(num_local)]
    )
    handle = Handle(received_G=received_G, num_local_tokens=x_TH.shape[0])
    return x_GH[received_G], recv_indices_VC, recv_probs_VC, tokens_per_expert, handle


def fused_combine(x_VH, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """DeepEP's combine (see the module docstring); the two stream flags are ignored."""
    from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region

    num_group = handle.received_G.shape[0]
    rows_GH = x_VH.new_zeros(num_group, *x_VH.shape[1:])
    rows_GH = rows_GH.index_put((handle.received_G.nonzero(as_tuple=True)[0],), x_VH)
    return reduce_scatter_to_sequence_parallel_region(rows_GH, group=group), None


NUM_SMS: list[int] = []
"""The values Megatron passed to ``set_deepep_num_sms`` (DeepEP sizes its kernels with it)."""


def set_deepep_num_sms(num_sms):
    """Records the value (no kernels to size here)."""
    NUM_SMS.append(num_sms)


def install() -> None:
    """Put the emulation into Megatron's token dispatcher module (call inside a worker)."""
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.fused_dispatch = fused_dispatch
    token_dispatcher.fused_combine = fused_combine
    token_dispatcher.set_deepep_num_sms = set_deepep_num_sms
