"""EDL's distributed plumbing: one reduction of the per-domain statistics, and the loss scale.

This is the only module of the EDL path that talks to ``torch.distributed``; the math lives in
:mod:`megatron_edl.core.edl` (``domain_sums`` -> ``edl_loss``) and never communicates. Nothing
here imports ``megatron``: process groups come in as arguments (``pg_collection.tp_dp_cp`` and
friends, chosen by the Megatron integration), and the sizes that set the loss scale come in as
plain ints. Specification: ``docs/method.md`` section 2, "Scope of the statistics" and
"Gradient scale".

Per MoE layer and micro-batch, on every rank of the statistics scope::

    probs_TE --domain_sums--> (A^r, n^r) --all_reduce_domain_stats--> (A, n) = Σ_r (A^r, n^r)
        [--DomainStatsAccumulator.combine--> (A + A_prev.detach(), n + n_prev)]
        --edl_loss--> L_ED(A, n)          identical on every rank of the group
        loss attached = β · edl_loss_scale(...) · (the host's aux-loss scale) · L_ED

Why one all-reduce suffices: A_j = Σ_t w_t 1[d_t=j] p_t and n_j = Σ_t w_t 1[d_t=j] are sums
over tokens, so with the tokens split across ranks (TP with sequence parallel, CP, DP, EP) the
global values are Σ_r A^r and Σ_r n^r. Both travel in one buffer of D*E + D numbers.

Shape legend (suffixes of tensor names):
    E  routed experts
    D  domains
    N  flat packed buffer, N = D*E + D
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DomainStatsAccumulator",
    "SCOPES",
    "all_reduce_domain_stats",
    "all_reduce_sums",
    "edl_loss_scale",
    "sum_over_group",
]

SCOPES = ("global", "local")
"""Scopes of the statistics (docs/method.md): ``global`` = tp_dp_cp group, ``local`` = tp_cp."""


def _check_stats_shapes(sums_DE: Tensor, counts_D: Tensor) -> None:
    """Raise ``ValueError`` unless ``sums_DE`` is ``(D, E)`` and ``counts_D`` is ``(D,)``."""
    if sums_DE.ndim != 2 or counts_D.shape != sums_DE.shape[:1]:
        raise ValueError(
            f"expected sums_DE of shape (D, E) and counts_D of shape (D,), got "
            f"{tuple(sums_DE.shape)} and {tuple(counts_D.shape)}"
        )


def all_reduce_domain_stats(
    sums_DE: Tensor, counts_D: Tensor, group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor]:
    """Sum the per-domain statistics (A, n) over ``group``: one all-reduce, identity backward.

        A = Σ_{r in group} A^r   (sums_DE),      n = Σ_{r in group} n^r   (counts_D)

    Packs ``sums_DE`` (flattened) and ``counts_D`` into one contiguous buffer of D*E + D numbers
    (fp32; fp64 when an input is fp64, so float64 gradient tests stay tight), runs exactly
    one ``torch.distributed.all_reduce(SUM)`` over ``group`` and unpacks (``all_reduce_sums``);
    over a group of one rank there is nothing to sum and no collective is issued. It is a
    collective: every rank of ``group`` must make the same calls in the same order, with the
    same D and E, including a rank whose tokens are all ignored (it contributes zeros).

    Autograd: the backward is the identity for ``sums_DE`` (no communication in the backward)
    and ``counts_D`` carries no gradient (the weights w_t are data). Why the identity is right:
    after the forward every rank holds the same A = Σ_r A^r and computes the same loss L(A).
    Since ∂A/∂A^r = I, ∂L/∂A^r = ∂L/∂A for every r, so passing ∂L/∂A unchanged to the local
    A^r gives each rank exactly the gradient of the *global* loss w.r.t. its own tokens'
    contributions, and the true gradient of the router weight θ is the SUM over ranks:

        ∇θ L = Σ_r (∂L/∂A) · ∂A^r/∂θ

    A SUM all-reduce in the backward would instead count that gradient |group| times. Turning
    the per-rank pieces into that sum under Megatron's own gradient reduction (sum over TP,
    average over DP×CP) is the job of ``edl_loss_scale``.

    Group choice: ``global`` scope = ``pg_collection.tp_dp_cp``, ``local`` = ``tp_cp``. This
    assumes TP ranks hold *different* tokens (sequence parallel). With TP > 1 but without
    sequence parallelism the TP ranks hold copies of the same tokens: reduce over ``dp_cp``
    (global) or ``cp`` (local) instead, or A and n would be counted TP times (the means, hence
    the loss, would not change, but every rank's gradient would be 1/TP too small).

    Args:
        sums_DE: A^r, this rank's weighted routing mass per domain (``domain_sums``), shape
            ``(D, E)``; may require grad.
        counts_D: n^r, this rank's weight per domain, shape ``(D,)``; no gradient flows to it.
        group: The process group of the statistics scope, or ``None`` for no reduction
            (single process): the inputs are then returned unchanged (same objects).

    Returns:
        ``(sums_DE, counts_D)`` summed over ``group``, fp32 (fp64 for fp64 ``sums_DE``). They
        are views of one buffer: do not modify them in place.

    Raises:
        ValueError: If the shapes are not ``(D, E)`` and ``(D,)``.
    """
    _check_stats_shapes(sums_DE, counts_D)
    if group is None:
        return sums_DE, counts_D
    return all_reduce_sums((sums_DE, counts_D.detach()), group)


class _AllReduceSumsIdentityBackward(torch.autograd.Function):
    """Forward: SUM all-reduce of several tensors packed in one buffer. Backward: identity."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, group: dist.ProcessGroup, *tensors: Tensor
    ) -> tuple[Tensor, ...]:
        dtype = torch.float32
        for tensor in tensors:
            dtype = torch.promote_types(dtype, tensor.dtype)
        buffer_N = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(buffer_N, op=dist.ReduceOp.SUM, group=group)
        ctx.dtypes = [t.dtype for t in tensors]
        pieces = torch.split(buffer_N, [t.numel() for t in tensors])
        outputs = tuple(p.view(t.shape) for p, t in zip(pieces, tensors, strict=True))
        # Sums of inputs that carry no gradient (counts, weights) carry none either.
        ctx.mark_non_differentiable(
            *(o for o, t in zip(outputs, tensors, strict=True) if not t.requires_grad)
        )
        return outputs

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, *grads: Tensor
    ) -> tuple[Tensor | None, ...]:
        pairs = zip(grads, ctx.dtypes, strict=True)
        return (None, *(None if g is None else g.to(d) for g, d in pairs))


def all_reduce_sums(
    tensors: tuple[Tensor, ...] | list[Tensor], group: dist.ProcessGroup | None
) -> tuple[Tensor, ...]:
    """Sum any per-rank sums over ``group``: one packed all-reduce, identity backward.

    The collective under ``all_reduce_domain_stats`` (EDL) and under the other losses whose
    statistics are sums over tokens (the variance and orthogonality losses of
    :mod:`megatron_edl.core.specialization`, whose ``*_sums`` functions produce them): every
    tensor is flattened into one buffer (fp32, or the widest input dtype), reduced with exactly
    one ``all_reduce(SUM)`` (none over a one-rank group) and unpacked into tensors of the input
    shapes. The backward is the
    identity for every tensor, for the reason given in ``all_reduce_domain_stats``: each rank
    then holds the gradient of the *global* loss with respect to its own tokens, and
    ``edl_loss_scale`` (scope ``global``) turns Megatron's reduction of those pieces into the
    single-process gradient. A collective: every rank of ``group`` must call it with the same
    shapes, in the same order.

    Args:
        tensors: The per-rank sums (any shapes); some may require grad.
        group: The process group, or ``None`` for no reduction (the inputs come back as they
            are).

    Returns:
        The reduced tensors, in order, as views of one buffer: do not modify them in place.
        Those whose input did not require grad are marked non-differentiable.
    """
    tensors = tuple(tensors)
    if group is None:
        return tensors
    if group.size() == 1:
        # The sum over one rank is the identity (and so is the backward): skip the collective,
        # which costs a kernel launch on a GPU and ~0.2 ms on gloo, per layer and micro-batch.
        dtype = torch.float32
        for tensor in tensors:
            dtype = torch.promote_types(dtype, tensor.dtype)
        return tuple(t.to(dtype) for t in tensors)
    return _AllReduceSumsIdentityBackward.apply(group, *tensors)


def edl_loss_scale(
    scope: str, *, dp_size: int, cp_size: int, cp_in_aux_loss_scale: bool = False
) -> float:
    """Factor on the EDL loss that makes the reduced router gradient the right one.

    Target (docs/method.md, "Gradient scale"): after the host's gradient reduction the
    router-weight gradient equals β·∇θ L_ED of one process on the same data, where the data is
    the global micro-batch (``global``) or, for ``local``, the average over DP replicas of each
    replica's own ∇θ L_ED (times the 1/num_microbatches convention of Megatron's aux losses,
    which the caller's aux-loss scale supplies).

    How Megatron reduces the router weight (a dense, non-expert parameter):
    - TP: with sequence parallel the weight is marked ``sequence_parallel`` and
      ``finalize_model_grads`` SUMS its gradient over TP;
    - DP×CP: DDP AVERAGES it over the ``dp_cp`` group of size R = dp·cp (pre-scale 1/R and sum,
      or an averaging collective: same result).
    EP ranks are DP ranks of the router: ``dp_size`` is the dense data-parallel size (Megatron's
    ``pg_collection.dp``, which spans the EP ranks), not the expert-data-parallel size.

    With the identity backward of ``all_reduce_domain_stats`` each rank holds its share
    g_r = (∂L/∂A) · ∂A^r/∂θ of the gradient, and after Megatron's reduction the weight gets
    c · (1/R) Σ_{r in tp×dp×cp} g_r for a factor c on the attached loss. Hence:

        global (reduce over tp_dp_cp):  ∇θ L = Σ_{tp,dp,cp} g_r           =>  c = dp·cp
        local  (reduce over tp_cp):     (1/dp) Σ_dp ∇θ L_dp, where
                                        ∇θ L_dp = Σ_{tp,cp} g_r           =>  c = cp

    (TP ranks are already summed by the sequence-parallel rule; the CP ranks of one replica hold
    parts of the same samples, so their pieces must be summed, not averaged.)

    Interplay with Megatron's ``MoEAuxLossAutoScaler``: the caller multiplies the loss by this
    factor *and* attaches it through the autoscaler, whose backward multiplies by the scale the
    schedule sets. In megatron-core 0.19 (``pipeline_parallel/schedules.py``) that scale is
    ``loss_scale · cp_size / num_microbatches``: it already contains the CP factor. In the
    ``--calculate-per-token-loss`` case it is ``loss_scale`` only, DDP sums instead of
    averaging, ``finalize_model_grads`` divides by the global token count, and Megatron's own
    aux loss pre-multiplies by ``num_local_tokens · tp_cp_size`` (``attach_and_log_load_balancing
    _loss``), which again supplies CP and leaves a net 1/(num_microbatches · dp). In both cases,
    when the caller follows Megatron's aux-loss conventions, pass ``cp_in_aux_loss_scale=True``:
    the factor becomes c / cp (``dp`` for global, 1 for local), so CP is not counted twice.
    (The per-token variant is exact only when every rank of the group uses the same
    multiplier, i.e. the same token count; Megatron accepts that approximation for its aux
    loss.) Note that Megatron's own ``global_aux_loss`` carries no factor dp, so its gradient is
    1/dp of the gradient of its global loss; EDL follows docs/method.md and restores the full one.

    Args:
        scope: ``"global"`` or ``"local"`` (a ``str`` enum with these values works too).
        dp_size: Dense data-parallel size (EP ranks included), >= 1.
        cp_size: Context-parallel size, >= 1.
        cp_in_aux_loss_scale: ``True`` when the rest of the loss scaling already multiplies by
            ``cp_size`` (Megatron's ``MoEAuxLossAutoScaler`` under its schedules, see above);
            ``False`` (default) when the only other reduction is DDP's average over DP×CP.

    Returns:
        The factor c (``False``) or c / cp (``True``), as a float.

    Raises:
        ValueError: On an unknown ``scope`` or a size < 1; the message names the value.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    factor = dp_size * cp_size if scope == "global" else cp_size
    if cp_in_aux_loss_scale:
        factor //= cp_size
    return float(factor)


class DomainStatsAccumulator:
    """Running (A, n) over the micro-batches of one global batch; earlier ones enter detached.

    Micro-batch m's loss is computed on

        A_{≤m} = A_m + Σ_{i<m} stopgrad(A_i),     n_{≤m} = n_m + Σ_{i<m} n_i

    like Megatron's ``global_aux_loss`` (whose counts it accumulates the same way). No division
    by the number of micro-batches is needed: the domain means p̄_j = A_j / n_j are ratios, so
    they are the means over all micro-batches seen so far. Use one accumulator per MoE layer,
    on the *reduced* statistics (after ``all_reduce_domain_stats``, so each micro-batch still
    costs one all-reduce and the state is identical on every rank of the group)::

        sums_DE, counts_D = all_reduce_domain_stats(local_sums_DE, local_counts_D, group)
        total_sums_DE, total_counts_D = acc.combine(sums_DE, counts_D)
        out = edl_loss(sums_DE=total_sums_DE, counts_D=total_counts_D)
        acc.update(sums_DE, counts_D)
        ...
        acc.reset()   # at the step boundary (e.g. an optimizer step-pre-hook)

    Call ``update`` once per micro-batch: an activation-recompute pass of the same micro-batch
    must not call it again (and sees the state as it is then, not as it was in the first
    forward). Pure tensors, no collectives; the state lives on the device of the inputs.
    """

    def __init__(self) -> None:
        self._sums_DE: Tensor | None = None
        self._counts_D: Tensor | None = None
        self._num_updates = 0

    @property
    def num_updates(self) -> int:
        """Number of ``update`` calls since construction or the last ``reset``."""
        return self._num_updates

    def _check_matches(self, sums_DE: Tensor, counts_D: Tensor) -> None:
        _check_stats_shapes(sums_DE, counts_D)
        if self._sums_DE is not None and self._sums_DE.shape != sums_DE.shape:
            raise ValueError(
                f"sums_DE of shape {tuple(sums_DE.shape)} does not match the accumulated "
                f"{tuple(self._sums_DE.shape)}"
            )

    def combine(self, sums_DE: Tensor, counts_D: Tensor) -> tuple[Tensor, Tensor]:
        """The statistics to compute this micro-batch's loss on: current plus detached past.

        Args:
            sums_DE: A_m of the current micro-batch, shape ``(D, E)``; may require grad.
            counts_D: n_m of the current micro-batch, shape ``(D,)``.

        Returns:
            ``(A_m + Σ_{i<m} A_i, n_m + Σ_{i<m} n_i)``; the inputs themselves when nothing has
            been accumulated. Gradient flows to ``sums_DE`` only.

        Raises:
            ValueError: On bad shapes or a shape that differs from the accumulated one.
        """
        self._check_matches(sums_DE, counts_D)
        if self._sums_DE is None or self._counts_D is None:
            return sums_DE, counts_D
        return sums_DE + self._sums_DE, counts_D + self._counts_D

    def update(self, sums_DE: Tensor, counts_D: Tensor) -> None:
        """Add a micro-batch's statistics, detached, to the running sums.

        Args:
            sums_DE: A_m, shape ``(D, E)``.
            counts_D: n_m, shape ``(D,)``.

        Raises:
            ValueError: On bad shapes or a shape that differs from the accumulated one.
        """
        self._check_matches(sums_DE, counts_D)
        sums_DE, counts_D = sums_DE.detach(), counts_D.detach()
        if self._sums_DE is None or self._counts_D is None:
            self._sums_DE, self._counts_D = sums_DE.clone(), counts_D.clone()
        else:
            self._sums_DE = self._sums_DE + sums_DE
            self._counts_D = self._counts_D + counts_D
        self._num_updates += 1

    def reset(self) -> None:
        """Forget the accumulated statistics (call at the step boundary)."""
        self._sums_DE = None
        self._counts_D = None
        self._num_updates = 0


def sum_over_group(buffer: Tensor, group: dist.ProcessGroup | None) -> bool:
    """SUM all-reduce of a statistics buffer over ``group``, in place, outside autograd.

    The routing telemetry's one collective per dump (:mod:`megatron_edl.integration.telemetry`):
    every MoE layer's packed sums of a pipeline stage travel in one buffer.

    Args:
        buffer: The local sums; replaced in place by the sum over ``group``.
        group: The process group, or ``None`` for no reduction (single process).

    Returns:
        Whether this rank is the group's first rank (the one that writes the result).
    """
    if group is None:
        return True
    with torch.no_grad():
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return dist.get_rank(group) == 0
