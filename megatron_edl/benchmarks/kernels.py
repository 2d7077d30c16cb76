"""Kernel count of the EDL math of one router call, forward and backward, eager or compiled.

What a GPU pays per router call beyond the arithmetic is one launch per kernel, so the figure of
merit of the fused path (:mod:`megatron_edl.core.edl_fused`) is the number of kernels the EDL
part of one router call runs. :func:`count_kernels` runs a callable under ``torch.profiler`` and
counts:

- on CUDA: kernel launches, i.e. the CUDA runtime/driver launch calls (``cudaLaunchKernel``,
  ``cuLaunchKernel``, ...) plus ``cudaMemsetAsync``/``cudaMemcpyAsync``;
- on CPU: the kernels a GPU would launch for the same program: inductor's generated kernels
  (visible to the profiler with ``torch._inductor.config.cpp.enable_kernel_profile``, which
  :func:`edl_chain` callers set before the first compile) plus the aten operators that do
  arithmetic or fill memory, counted at the leaves of the operator tree (``aten::softmax`` runs
  ``aten::_softmax``: one kernel) and skipping the ones that only allocate or re-view memory.

:func:`edl_chain` builds the measured program: the router's EDL path without its all-reduce (one
rank), from the logits to the gradient on the logits: softmax, per-domain sums, loss and
``edl_mi`` metric, backward. ``tools/count_edl_kernels.py`` prints both paths side by side.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_edl.core import edl_fused

__all__ = ["KernelCount", "count_kernels", "edl_chain"]

# aten operators that allocate, re-view or describe memory: no kernel on any device.
_NO_KERNEL = frozenset(
    "aten::" + name
    for name in (
        "empty empty_strided empty_like as_strided view _unsafe_view reshape _reshape_alias "
        "unsqueeze squeeze expand permute transpose t numpy_T detach alias select slice "
        "resize_ lift_fresh resolve_conj resolve_neg promote_types scalar_tensor to _to_copy "
        "contiguous result_type is_nonzero set_ split chunk unbind"
    ).split()
)
_CUDA_LAUNCHES = ("LaunchKernel", "cudaMemsetAsync", "cudaMemcpyAsync", "cuMemsetD")


@dataclasses.dataclass(frozen=True)
class KernelCount:
    """Kernels counted in one profiled call, and how many of each name."""

    total: int
    by_name: dict[str, int]

    def top(self, n: int = 12) -> str:
        """The ``n`` most frequent names, ``name xcount``, comma-separated."""
        return ", ".join(f"{k} x{v}" for k, v in Counter(self.by_name).most_common(n))


def _is_inductor_kernel(name: str) -> bool:
    return "cpp_fused" in name or "triton_" in name


def count_kernels(fn: Callable[[], object], device: torch.device) -> KernelCount:
    """Run ``fn`` once under the profiler and count its kernels (see the module docstring).

    Args:
        fn: The program to count (warm it up first: a compile inside would be counted too).
        device: ``cpu`` or ``cuda``: which rule applies.

    Returns:
        The count, with a per-name breakdown.
    """
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    names: Counter[str] = Counter()
    if device.type == "cuda":
        for event in prof.events():
            if any(key in event.name for key in _CUDA_LAUNCHES):
                names[event.name] += 1
    else:
        for event in prof.events():
            if event.cpu_parent is None:
                _count_cpu_tree(event, names)
    return KernelCount(sum(names.values()), dict(names))


def _count_cpu_tree(event, names: Counter[str]) -> int:
    """Count the kernels under ``event`` into ``names``; returns how many were counted.

    An inductor kernel counts once (whatever it calls); an arithmetic aten operator counts when
    nothing below it counted (it is the leaf that does the work).
    """
    if _is_inductor_kernel(event.name):
        names[event.name] += 1
        return 1
    below = sum(_count_cpu_tree(child, names) for child in event.cpu_children)
    if below == 0 and event.name.startswith("aten::") and event.name not in _NO_KERNEL:
        names[event.name] += 1
        return 1
    return below


def edl_chain(
    path: edl_fused.EDLPath,
    *,
    tokens: int,
    experts: int,
    domains: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Callable[[], None]:
    """One router call's EDL work on random inputs: logits -> loss and metrics -> gradient.

    Labels: ids uniform in [-1, D) (about 1 in D + 1 unlabelled), weights uniform in [0, 1).

    Args:
        path: ``edl_fused.EAGER`` or a compiled path (``edl_fused.select_path(True, ...)``).
        tokens, experts, domains: T, E, D.
        device, dtype: Of the logits.
        seed: Seed of the inputs.

    Returns:
        A callable running the chain once (the gradient lands in the logits' ``.grad``).
    """
    gen = torch.Generator().manual_seed(seed)
    logits_TE = (2 * torch.randn(tokens, experts, generator=gen)).to(device, dtype)
    logits_TE.requires_grad_(True)
    domain_ids_T = torch.randint(-1, domains, (tokens,), generator=gen).to(device)
    weights_T = torch.rand(tokens, generator=gen).to(device)

    def call() -> None:
        logits_TE.grad = None
        sums_DE, counts_D = path.statistics(
            logits_TE=logits_TE,
            domain_ids_T=domain_ids_T,
            weights_T=weights_T,
            num_domains=domains,
        )
        out = path.step(sums_DE=sums_DE, counts_D=counts_D, form="log", eps=1e-6)
        out.loss.backward()

    return call
