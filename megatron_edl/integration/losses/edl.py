"""The Expert Divergence Loss as a router term: ``beta(i) * L_ED`` on the router's ``probs``.

The loss, its score function, segment weights, scopes, schedule and statistics window are
specified in docs/method.md sections 2 and 5; the math is :mod:`megatron_edl.core.edl` (eager)
and :mod:`megatron_edl.core.edl_fused` (compiled, ``--moe-edl-fused``), the window
:mod:`megatron_edl.core.window`. This module adapts them to the term interface of
:mod:`megatron_edl.integration.losses.base`: the per-domain sums of this rank's tokens, one
all-reduce over the scope's group, the loss of the reduced (accumulated or windowed) statistics,
the schedule's β. The term consumes the micro-batch's domain labels (``needs_labels``) and keeps
the window in a persistent router buffer (:data:`WINDOW_BUFFER`), so a resumed run continues it.

Shape legend: T tokens of this rank, E experts, D domains, X the packed window state (D*E + D).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from megatron.core.num_microbatches_calculator import get_num_microbatches
from torch import Tensor

from megatron_edl.config import EDLConfig, EDLRunConfig
from megatron_edl.core import edl_fused
from megatron_edl.core.window import window_combine
from megatron_edl.distributed import DomainStatsAccumulator, all_reduce_domain_stats
from megatron_edl.integration.labels import DomainLabels
from megatron_edl.integration.losses.base import AuxLossTerm, LocalSums, TermGroups

__all__ = ["EDL_METRICS", "WINDOW_BUFFER", "EDLTerm", "build_edl_term"]

EDL_METRICS = ("edl_loss", "edl_jsd", "edl_mi", "edl_domains", "edl_min_segments")
"""Names the EDL term records in Megatron's MoE metrics tracker."""

WINDOW_BUFFER = "edl_window"
"""Name of the router's persistent buffer holding the statistics window (with the window on)."""


class EDLTerm(AuxLossTerm):
    """``beta(i) * L_ED`` (docs/method.md sections 2-5) on the router's ``probs``.

    compute: the dense fp32 ``p_t`` (Megatron's aux-loss scores when they are EDL's, else from
    the logits with EDL's score function) and the per-domain sums ``A [D, E]``, ``n [D]``;
    reduce: :func:`~megatron_edl.distributed.all_reduce_domain_stats` over the scope's group;
    loss: the earlier micro-batches of the global batch (``accumulate``) or the decayed window
    enter detached, then ``L_ED`` (eager or compiled, :mod:`megatron_edl.core.edl_fused`).

    Args:
        cfg: The EDL config.
        num_domains: D, the number of loss domains (``LabelsConfig.num_domains``; ``None`` only
            for a term that never computes, EDL off).
        score_function: Score function of the dense ``p_t`` (``EDLConfig.score_function``).
        router_score_function: The router's own (Megatron's aux-loss scores are reused as
            ``p_t`` when the two are the same).
        config: Megatron's ``TransformerConfig``.
        groups: The process groups.
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.
    """

    metric_names = EDL_METRICS
    needs_labels = True

    def __init__(
        self,
        *,
        cfg: EDLConfig,
        num_domains: int | None,
        score_function: str,
        router_score_function: str,
        config,
        groups: TermGroups,
        is_mtp_layer: bool,
    ) -> None:
        super().__init__(config=config, groups=groups, is_mtp_layer=is_mtp_layer, scope=cfg.scope)
        self.cfg = cfg
        self.num_domains = num_domains
        self.score_function = score_function
        self.reuses_aux_loss_scores = score_function == router_score_function
        """Whether Megatron's aux-loss scores (the router's score function, fp32, every token)
        are EDL's ``p_t``: then they are reused, one softmax and its backward fewer
        (docs/BENCHMARKS.md)."""
        self.accumulator = DomainStatsAccumulator()
        """(A, n) of the earlier micro-batches of the global batch (``accumulate``)."""
        self.microbatches_seen = 0
        """Grad-enabled forwards of the current global batch, modulo ``num_microbatches`` (times
        N for a repeated MTP layer)."""

    def active(self, *, training: bool, grad_enabled: bool, layer_number: int | None) -> bool:
        """Training with grad enabled, on a layer the loss applies to (coefficient > 0 and the
        layer selected by ``--moe-edl-layers``)."""
        return training and grad_enabled and self.cfg.applies_to(layer_number)

    def register_state(self, owner: torch.nn.Module) -> None:
        """With the window on, its state (packed ``[D*E + D]``, fp32) as a persistent buffer of
        the router, so Megatron's checkpoint holds it (a stock model ignores the extra key)."""
        if self.cfg.window_decay > 0:
            size = self.num_domains * self.config.num_moe_experts + self.num_domains
            window_X = torch.zeros(size, dtype=torch.float32, device=owner.weight.device)
            owner.register_buffer(WINDOW_BUFFER, window_X, persistent=True)

    def reset_state(self, owner: torch.nn.Module) -> None:
        """The window state to zeros (after Megatron-FSDP materialised a meta-device router)."""
        window_X = getattr(owner, WINDOW_BUFFER, None)
        if window_X is not None and not window_X.is_meta:
            with torch.no_grad():
                window_X.zero_()

    def apply(
        self,
        activation: Tensor,
        *,
        layer_number: int | None,
        queued_labels: int,
        consumer: str,
        **routed: Any,
    ) -> Tensor:
        """:meth:`begin_microbatch`, then the five steps of :meth:`AuxLossTerm.apply`.

        Args:
            activation: The router's ``probs``.
            layer_number: The layer's 1-based number in its block.
            queued_labels: Label entries queued for the router, this forward's included.
            consumer: How errors name the router.
            **routed: The router's tensors (:meth:`compute`, :meth:`loss`).
        """
        self.begin_microbatch(queued=queued_labels, consumer=consumer)
        return super().apply(activation, layer_number=layer_number, **routed)

    def begin_microbatch(self, *, queued: int, consumer: str) -> None:
        """Track the micro-batch's position in its global batch; reset the accumulator at a new one.

        A new global batch starts every ``num_microbatches`` grad-enabled forwards (Megatron
        updates that number, e.g. under batch-size ramp-up, before an iteration's first forward),
        ``N * num_microbatches`` for a repeated MTP layer: each of its N calls per forward is one
        step of the statistics (accumulated, or one step of the window).

        Args:
            queued: Label entries queued for this router, this forward's included.
            consumer: How the error names the router.

        Raises:
            RuntimeError: If more entries are queued at a global batch's start than it has
                micro-batches (labels pushed for forwards that never consumed them).
        """
        forwards = get_num_microbatches() * self.repeats
        if self.microbatches_seen == 0:
            self.accumulator.reset()
            if queued > forwards:
                raise RuntimeError(
                    f"{consumer} holds {queued} "
                    "queued label sets at the start of a global batch: labels were pushed for "
                    "forwards that never consumed them"
                )
        self.microbatches_seen = (self.microbatches_seen + 1) % forwards

    def _path(self, logits_TE: Tensor) -> edl_fused.EDLPath:
        # Eager or compiled (--moe-edl-fused): the math on either side of the all-reduce.
        return edl_fused.select_path(self.cfg.fused.compile, logits_TE.device, logits_TE.dtype)

    def compute(
        self,
        *,
        logits_TE: Tensor,
        aux_loss_scores_TE: Tensor | None,
        labels: DomainLabels,
        **_: Any,
    ) -> LocalSums:
        """``(A^r [D, E], n^r [D])`` of this rank's tokens.

        Args:
            logits_TE: Router logits ``(T, E)``.
            aux_loss_scores_TE: Megatron's aux-loss scores ``(T, E)`` if it computed them
                unfused in this forward, else ``None``; used as p_t when they are of EDL's score
                function, else p_t is computed from the logits, fused with the sums.
            labels: The micro-batch's labels.
        """
        probs_TE = aux_loss_scores_TE if self.reuses_aux_loss_scores else None
        wanted = torch.promote_types(logits_TE.dtype, torch.float32)  # fp32, or fp64 for tests
        if probs_TE is None or probs_TE.shape != logits_TE.shape or probs_TE.dtype != wanted:
            dense = {"logits_TE": logits_TE, "score_function": self.score_function}
        else:
            dense = {"probs_TE": probs_TE}
        # Ids are validated once, in the data pipeline, not here.
        sums_DE, counts_D = self._path(logits_TE).statistics(
            **dense,
            domain_ids_T=labels.domain_ids_T,
            weights_T=labels.weights_T,
            num_domains=self.num_domains,
        )
        return LocalSums((sums_DE, counts_D), logits_TE.shape[0])

    def reduce(self, sums: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``(A, n) = Σ_r (A^r, n^r)`` over the scope's group (``all_reduce_domain_stats``)."""
        return all_reduce_domain_stats(*sums, self.reduce_group)

    def loss(
        self,
        reduced: tuple[Tensor, ...],
        *,
        logits_TE: Tensor,
        owner: torch.nn.Module,
        **_: Any,
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """``L_ED`` of the reduced (and accumulated or windowed) statistics, and the metrics.

        Args:
            reduced: ``(A [D, E], n [D])`` of the micro-batch step.
            logits_TE: Router logits (the path's device and dtype).
            owner: The router; its window buffer (``window_decay > 0``) is updated in place.
        """
        cfg = self.cfg
        window_X = getattr(owner, WINDOW_BUFFER, None)
        sums_DE, counts_D = reduced
        if cfg.accumulate:  # earlier micro-batches of this global batch enter detached
            sums_DE, counts_D = self.accumulator.combine(*reduced)
            self.accumulator.update(*reduced)
        elif cfg.window_decay > 0:  # earlier micro-batches, decayed and detached
            sums_DE, counts_D, next_X = window_combine(
                sums_DE=sums_DE, counts_D=counts_D, past_X=window_X.clone(), decay=cfg.window_decay
            )
            window_X.copy_(next_X)
        out = self._path(logits_TE).step(
            sums_DE=sums_DE, counts_D=counts_D, form=cfg.form.value, eps=cfg.eps
        )
        metrics = {
            "edl_loss": out.loss.detach(),
            "edl_jsd": out.mean_jsd,
            "edl_mi": out.mutual_information,
            "edl_domains": out.num_present.to(torch.float32),
            # The weakest present domain's segments (tokens for --moe-edl-aggregation token) in
            # the statistics the loss used: too few and p̄_j is a few documents' routing.
            "edl_min_segments": torch.nan_to_num(
                torch.where(counts_D > 0, counts_D, torch.full_like(counts_D, float("inf"))).min(),
                posinf=0.0,
            )
            .detach()
            .to(torch.float32),
        }
        return out.loss, metrics

    def coefficient(self, loss: Tensor, *, layer_number: int | None, **routed: Any) -> float:
        """β of the micro-batch's optimizer step (delayed start, warm-up)."""
        return self.cfg.coefficient_at(routed["labels"].iteration)


def build_edl_term(run: EDLRunConfig, router) -> EDLTerm | None:
    """The EDL term of ``router`` (a Megatron ``TopKRouter``), or ``None`` for a run without
    domain labels.

    Built whenever labels are loaded, also with the loss off (``--moe-edl-coeff 0``): the term
    then never applies, but holds the window buffer (the checkpoint layout depends on
    ``--moe-edl-window-decay`` alone) and the score function the telemetry shares.

    Raises:
        ValueError: The loss or its window is on but the labels' ``num_domains`` is unset.
    """
    if run.labels is None:
        return None
    cfg, num_domains = run.edl, run.labels.num_domains
    if num_domains is None and (cfg.enabled or cfg.window_decay > 0):
        raise ValueError(
            "AuxLossTopKRouter with EDL on needs the number of loss domains "
            "(run_config.labels.num_domains is None)"
        )
    return EDLTerm(
        cfg=cfg,
        num_domains=num_domains,
        score_function=cfg.score_function(router.score_function),
        router_score_function=router.score_function,
        config=router.config,
        groups=TermGroups.of_router(router),
        is_mtp_layer=router.is_mtp_layer,
    )
