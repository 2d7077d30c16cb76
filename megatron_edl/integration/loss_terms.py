"""One interface for every auxiliary router loss: compute, reduce, scale, attach, record.

Every loss this project adds to an MoE layer (the Expert Divergence Loss, the variance and
orthogonality losses of arXiv 2505.22323) is a sum over tokens of per-token statistics, so each
follows the same five steps per MoE layer and micro-batch (docs/method.md, "Scope of the
statistics" and "Gradient scale"):

1. **compute** (:meth:`AuxLossTerm.compute`): this rank's sums from its routed tokens (pure math,
   :mod:`megatron_edl.core`), and its token count;
2. **reduce** (:meth:`AuxLossTerm.reduce`): ONE packed all-reduce (SUM) of the sums over the
   term's group, identity backward (:func:`megatron_edl.distributed.all_reduce_sums`), after
   which every rank of the group holds the loss of the whole micro-batch step; the loss and
   its metrics from the reduced sums (:meth:`AuxLossTerm.loss`);
3. **scale** (:meth:`AuxLossTerm.gradient_scale`): the factor ``s`` of docs/method.md that turns
   Megatron's gradient reduction of the per-rank pieces into the single-process gradient,

       s = edl_loss_scale(scope, dp, cp, cp_in_aux_loss_scale=True)    (dp: global, 1: local)
       s = s * T_local * |tp_cp|                  (under --calculate-per-token-loss);

4. **attach** (:meth:`AuxLossTerm.attach`): ``weight * s * L`` on an activation with Megatron's
   ``MoEAuxLossAutoScaler``, exactly like its load-balancing loss, so the schedule's aux-loss
   scale (``cp / num_microbatches``) applies to it;
5. **record** (:meth:`AuxLossTerm.record`): each metric in Megatron's MoE metrics tracker at the
   layer index of :func:`layer_index` (MTP layers after the decoder's), averaged over ``tp_cp``
   and DP (the values are replicated over the reduce group, never partial).

A repeated MTP layer (``--mtp-use-repeated-layer``) runs its one router N = ``mtp_num_layers``
times per forward; as Megatron does for its aux and z losses, each call's loss is attached and
recorded times 1/N (:func:`mtp_repeats`), so the N calls add up to their mean.

:meth:`AuxLossTerm.apply` runs the five steps in this order. Implementations: :class:`EDLTerm`
(in the router, scope ``global`` or ``local``), :class:`VarianceTerm` (in the router) and
:class:`OrthogonalityTerm` (in the token dispatcher's combine,
:mod:`megatron_edl.integration.specialization`), the last two with the auto-calibrated weight of
:class:`CalibratedTerm`.

Shape legend: T tokens of this rank, E experts, D domains, K top-k slots, H hidden size,
X the packed window state (D*E + D).

It stays one module, over 500 lines: the interface and its implementations follow the same five
steps, so they are read together.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from torch import Tensor

from megatron_edl.config import EDLConfig, SpecializationConfig, VarianceAxis
from megatron_edl.core import edl_fused
from megatron_edl.core import specialization as spec_math
from megatron_edl.core.window import window_combine
from megatron_edl.distributed import (
    DomainStatsAccumulator,
    all_reduce_domain_stats,
    all_reduce_sums,
    edl_loss_scale,
)
from megatron_edl.integration.internals import touch
from megatron_edl.integration.labels import DomainLabels

__all__ = [
    "EDL_METRICS",
    "ORTHO_METRIC",
    "VARIANCE_METRIC",
    "AuxLossTerm",
    "CalibratedTerm",
    "EDLTerm",
    "LayerIndex",
    "LocalSums",
    "OrthogonalityTerm",
    "TermGroups",
    "VarianceTerm",
    "layer_index",
    "mtp_repeats",
    "register_edl_metrics",
]

logger = logging.getLogger(__name__)

EDL_METRICS = ("edl_loss", "edl_jsd", "edl_mi", "edl_domains", "edl_min_segments")
"""Names the EDL term records in Megatron's MoE metrics tracker."""
VARIANCE_METRIC = "variance_loss"
ORTHO_METRIC = "ortho_loss"


class LayerIndex(NamedTuple):
    """Where Megatron's MoE metrics tracker (and the routing telemetry) put a layer."""

    layer: int
    """1-based index among the decoder's layers followed by the MTP layers."""
    num_layers: int
    """Decoder layers plus MTP layers."""


def layer_index(config, layer_number: int, *, is_mtp_layer: bool) -> LayerIndex:
    """The global index of a layer, MTP layers included (the only place this is computed).

        layer      = layer_number + (num_layers if is_mtp_layer else 0)
        num_layers = num_layers + mtp_num_layers

    Args:
        config: Megatron's ``TransformerConfig`` (``num_layers``, ``mtp_num_layers``).
        layer_number: The layer's 1-based number in its block (the decoder or the MTP block).
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.

    Returns:
        ``(layer, num_layers)``.
    """
    num_layers = config.num_layers + (config.mtp_num_layers or 0)
    layer = layer_number + (config.num_layers if is_mtp_layer else 0)
    return LayerIndex(layer, num_layers)


def mtp_repeats(config, *, is_mtp_layer: bool) -> int:
    """How many times a layer runs per model forward: N = ``mtp_num_layers`` for the one layer of
    a repeated MTP block (``--mtp-use-repeated-layer``), else 1.

    Megatron's ``MultiTokenPredictionBlock`` then calls that layer once per prediction depth, and
    scales its aux and z losses by 1/N (``TopKRouter.attach_and_log_load_balancing_loss``,
    ``apply_z_loss``); every term here does the same (:meth:`AuxLossTerm.attach`,
    :meth:`AuxLossTerm.record`).

    Args:
        config: Megatron's ``TransformerConfig``.
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.
    """
    if is_mtp_layer and getattr(config, "mtp_use_repeated_layer", False):
        return max(int(config.mtp_num_layers or 1), 1)
    return 1


def register_edl_metrics(names: tuple[str, ...] = EDL_METRICS) -> None:
    """Make Megatron's iteration log and TensorBoard/W&B report our metrics (``names``).

    ``training_log`` passes a fixed whitelist (``track_names``) of MoE metrics to the tracker's
    ``report``; this wraps the tracker's ``report`` once so the whitelist includes ours. Later
    calls add their ``names`` (e.g. ``variance_loss``, ``ortho_loss``) to the same wrapper.
    Register only the metrics that are recorded: Megatron pre-creates every listed name.

    Args:
        names: The metric names to add.
    """
    touch("moe-metrics-tracker-report")
    tracker = get_moe_metrics_tracker()
    registered = getattr(tracker, "_edl_metric_names", None)
    if registered is None:
        registered = tracker._edl_metric_names = []
        report = tracker.report

        def report_with_edl(*args, track_names=None, **kwargs):
            if track_names is not None:
                listed = [track_names] if isinstance(track_names, str) else list(track_names)
                track_names = listed + [n for n in registered if n not in listed]
            return report(*args, track_names=track_names, **kwargs)

        tracker.report = report_with_edl
    registered.extend(n for n in names if n not in registered)


@dataclasses.dataclass(frozen=True)
class TermGroups:
    """The process groups a term uses (Megatron's ``pg_collection`` names)."""

    tp_dp_cp: Any
    """The ``global`` scope's group (every rank holding tokens of the layer)."""
    tp_cp: Any
    """The ``local`` scope's group; the metrics' ``avg_group``."""
    cp: Any
    """Context-parallel group (its size enters the gradient scale)."""

    @classmethod
    def of_router(cls, router) -> TermGroups:
        """The groups of a Megatron ``Router`` (its ``*_group`` attributes)."""
        return cls(tp_dp_cp=router.tp_dp_cp_group, tp_cp=router.tp_cp_group, cp=router.cp_group)

    @classmethod
    def of_pg_collection(cls, pg_collection) -> TermGroups:
        """The groups of a Megatron ``ProcessGroupCollection``."""
        return cls(tp_dp_cp=pg_collection.tp_dp_cp, tp_cp=pg_collection.tp_cp, cp=pg_collection.cp)


class LocalSums(NamedTuple):
    """What :meth:`AuxLossTerm.compute` returns."""

    sums: tuple[Tensor, ...]
    """This rank's sums over its tokens (reduced by one packed all-reduce)."""
    num_local_tokens: int | Tensor
    """This rank's tokens in the loss (for the ``--calculate-per-token-loss`` scale)."""


class AuxLossTerm:
    """One auxiliary loss of one MoE layer: compute -> reduce -> scale -> attach -> record.

    Subclasses implement :meth:`compute`, :meth:`loss` and :meth:`coefficient` (and override
    :meth:`reduce` when their collective differs); :meth:`apply` is the one entry point.

    Args:
        config: Megatron's ``TransformerConfig``.
        groups: The process groups.
        is_mtp_layer: Whether the layer is a multi-token-prediction layer (metric index).
        scope: ``"global"`` (reduce over ``tp_dp_cp``) or ``"local"`` (over ``tp_cp``).
    """

    metric_names: ClassVar[tuple[str, ...]] = ()
    """The metrics :meth:`loss` returns (register them with :func:`register_edl_metrics`)."""

    def __init__(
        self, *, config, groups: TermGroups, is_mtp_layer: bool, scope: str = "global"
    ) -> None:
        self.config = config
        self.groups = groups
        self.is_mtp_layer = is_mtp_layer
        self.scope = scope
        self.repeats = mtp_repeats(config, is_mtp_layer=is_mtp_layer)
        """Calls per model forward (N of a repeated MTP layer, else 1); each counts 1/N."""

    @property
    def reduce_group(self):
        """The group of the scope: ``tp_dp_cp`` (global) or ``tp_cp`` (local)."""
        return self.groups.tp_dp_cp if self.scope == "global" else self.groups.tp_cp

    # -- the five steps --------------------------------------------------------------------------

    def compute(self, **routed: Any) -> LocalSums:
        """Step 1: this rank's sums from its routed tokens (no communication)."""
        raise NotImplementedError

    def reduce(self, sums: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Step 2: sum ``sums`` over :attr:`reduce_group` (one all-reduce, identity backward)."""
        return all_reduce_sums(sums, self.reduce_group)

    def loss(
        self, reduced: tuple[Tensor, ...], **routed: Any
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """Step 2 (cont.): the loss of the whole step from the reduced sums, and its metrics."""
        raise NotImplementedError

    def coefficient(self, loss: Tensor, *, layer_number: int | None, **routed: Any) -> float:
        """The coefficient of the loss in this forward (β of the schedule, or γ)."""
        raise NotImplementedError

    def gradient_scale(self, num_local_tokens: int | Tensor) -> float | Tensor:
        """Step 3: the factor s of docs/method.md, "Gradient scale".

        ``s = dp`` (global) or ``1`` (local), Megatron's schedule supplying ``cp``; times
        ``T_local * |tp_cp|`` under ``--calculate-per-token-loss``, as Megatron's aux loss.

        Args:
            num_local_tokens: This rank's tokens in the loss.
        """
        groups = self.groups
        scale = edl_loss_scale(
            self.scope,
            dp_size=groups.tp_dp_cp.size() // groups.tp_cp.size(),  # dense DP, EP incl.
            cp_size=groups.cp.size(),
            cp_in_aux_loss_scale=True,  # Megatron's schedule multiplies aux losses by cp
        )
        if self.config.calculate_per_token_loss:
            # (s * T) * tp_cp: integers in float64, exact (the same as s * (T * tp_cp)).
            scale = scale * num_local_tokens * groups.tp_cp.size()
        return scale

    def attach(
        self, activation: Tensor, loss: Tensor, *, weight: float, num_local_tokens: int | Tensor
    ) -> Tensor:
        """Step 4: attach ``weight * s * loss`` to ``activation`` (returned unchanged in value);
        times 1/N for a layer that runs N times per forward (:attr:`repeats`), as Megatron's aux
        loss.

        Args:
            activation: The tensor whose backward carries the loss.
            loss: The layer's loss, identical on every rank of the reduce group.
            weight: Its coefficient.
            num_local_tokens: This rank's tokens in the loss.
        """
        scale = self.gradient_scale(num_local_tokens)
        if self.repeats > 1:
            scale = scale / self.repeats
        return MoEAuxLossAutoScaler.apply(activation, loss * (weight * scale))

    def record(self, metrics: Mapping[str, Tensor], layer_number: int | None) -> None:
        """Step 5: each metric in Megatron's MoE metrics tracker (nothing without a layer number);
        times 1/N for a layer that runs N times per forward, so its slot holds the calls' mean.

        Args:
            metrics: ``{name: value}``, values replicated over the reduce group.
            layer_number: The layer's 1-based number in its block.
        """
        if layer_number is None:
            return
        layer, num_layers = layer_index(self.config, layer_number, is_mtp_layer=self.is_mtp_layer)
        tracker = get_moe_metrics_tracker()
        for name, value in metrics.items():
            if self.repeats > 1:
                value = value / self.repeats
            # Values are replicated over the reduce group, not partial: average, never sum.
            tracker.record(
                name, value, layer, num_layers, avg_group=self.groups.tp_cp, needs_dp_avg=True
            )

    def apply(self, activation: Tensor, *, layer_number: int | None, **routed: Any) -> Tensor:
        """The five steps; ``routed`` are the keyword inputs of :meth:`compute`.

        Args:
            activation: The tensor that carries the loss (the router's ``probs``, the layer's
                combined output).
            layer_number: The layer's 1-based number in its block (metric index).
            **routed: The routed tokens' tensors the term reads.

        Returns:
            ``activation`` with the loss attached.
        """
        local = self.compute(**routed)
        loss, metrics = self.loss(self.reduce(local.sums), **routed)
        weight = self.coefficient(loss, layer_number=layer_number, **routed)
        activation = self.attach(
            activation, loss, weight=weight, num_local_tokens=local.num_local_tokens
        )
        self.record(metrics, layer_number)
        return activation


# -------------------------------------------------------------------------------------------------
# EDL (in the router)
# -------------------------------------------------------------------------------------------------


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
        config: Megatron's ``TransformerConfig``.
        groups: The process groups.
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.
    """

    metric_names = EDL_METRICS

    def __init__(
        self,
        *,
        cfg: EDLConfig,
        num_domains: int | None,
        score_function: str,
        config,
        groups,
        is_mtp_layer: bool,
    ) -> None:
        super().__init__(config=config, groups=groups, is_mtp_layer=is_mtp_layer, scope=cfg.scope)
        self.cfg = cfg
        self.num_domains = num_domains
        self.score_function = score_function
        self.accumulator = DomainStatsAccumulator()
        """(A, n) of the earlier micro-batches of the global batch (``accumulate``)."""
        self.microbatches_seen = 0
        """Grad-enabled forwards of the current global batch, modulo ``num_microbatches`` (times
        N for a repeated MTP layer)."""

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
        dense_probs_TE: Tensor | None,
        labels: DomainLabels,
        **_: Any,
    ) -> LocalSums:
        """``(A^r [D, E], n^r [D])`` of this rank's tokens.

        Args:
            logits_TE: Router logits ``(T, E)``.
            dense_probs_TE: Megatron's aux-loss scores ``(T, E)`` if it computed them with EDL's
                score function, else ``None`` (then p_t is computed from the logits, fused
                with the sums).
            labels: The micro-batch's labels.
        """
        probs_TE = dense_probs_TE
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
        window_X: Tensor | None = None,
        **_: Any,
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """``L_ED`` of the reduced (and accumulated or windowed) statistics, and the metrics.

        Args:
            reduced: ``(A [D, E], n [D])`` of the micro-batch step.
            logits_TE: Router logits (the path's device and dtype).
            window_X: The router's window buffer (``window_decay > 0``), updated in place.
        """
        cfg = self.cfg
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


# -------------------------------------------------------------------------------------------------
# Variance and orthogonality (arXiv 2505.22323)
# -------------------------------------------------------------------------------------------------


class CalibratedTerm(AuxLossTerm):
    """A ``global``-scope term whose weight is its flag's coefficient or auto-calibrated.

    Auto-calibration (released code): at the term's first training forward its weight becomes
    ``target / |L_0|``, averaged over ``tp_dp_cp`` so every rank uses the same weight.

    Args:
        name: Metric name.
        coeff: The flag's coefficient (> 0 when the term is on).
        calibration_target: ``target`` of the auto-calibration, or ``None`` for none.
        config: Megatron's ``TransformerConfig``.
        groups: The process groups.
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.
    """

    def __init__(
        self,
        *,
        name: str,
        coeff: float,
        calibration_target: float | None,
        config,
        groups: TermGroups,
        is_mtp_layer: bool,
    ) -> None:
        super().__init__(config=config, groups=groups, is_mtp_layer=is_mtp_layer, scope="global")
        self.name = name
        self.weight = coeff
        """The weight in use: the coefficient, replaced once by the calibrated value."""
        self.calibration_target = calibration_target
        self.calibrated = calibration_target is None

    def _calibrate(self, loss: Tensor, layer_number: int | None) -> None:
        group = self.groups.tp_dp_cp
        magnitude = loss.detach().abs().to(torch.float64)
        weight = torch.where(
            magnitude > 0,
            self.calibration_target / magnitude,
            magnitude.new_tensor(self.weight),
        )
        (total,) = all_reduce_sums((weight.reshape(1),), group)
        self.weight = total.item() / group.size()
        self.calibrated = True
        if group.rank() == 0:
            logger.info(
                "layer %s: %s weight auto-calibrated to %.6g (target %.3g, first value %.6g)",
                layer_number,
                self.name,
                self.weight,
                self.calibration_target,
                magnitude.item(),
            )

    def coefficient(self, loss: Tensor, *, layer_number: int | None, **routed: Any) -> float:
        """The coefficient, calibrated at the first call when calibration is on."""
        if not self.calibrated:
            self._calibrate(loss, layer_number)
        return self.weight


class VarianceTerm(CalibratedTerm):
    """``gamma * L_v`` on the router's post-top-k ``probs`` (L_v = -Var, recorded as Var).

    Sums: tokens axis ``Σ_t s_te, Σ_t s_te², N`` (2E + 1 numbers), experts axis
    ``Σ_t Var_e(p_t), N`` (2 numbers); :mod:`megatron_edl.core.specialization`.

    Args:
        cfg: The specialization config (``variance_*`` fields).
        config: Megatron's ``TransformerConfig``.
        groups: The process groups.
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.
    """

    metric_names = (VARIANCE_METRIC,)

    def __init__(
        self, *, cfg: SpecializationConfig, config, groups: TermGroups, is_mtp_layer: bool
    ) -> None:
        super().__init__(
            name=VARIANCE_METRIC,
            coeff=cfg.variance_coeff,
            calibration_target=cfg.variance_target if cfg.auto_calibrate else None,
            config=config,
            groups=groups,
            is_mtp_layer=is_mtp_layer,
        )
        self.axis: VarianceAxis = cfg.variance_axis

    def compute(
        self, *, logits_TE: Tensor, probs_TE: Tensor, padding_mask: Tensor | None, **_: Any
    ) -> LocalSums:
        """The variance sums of the local tokens.

        Args:
            logits_TE: Router logits ``(T, E)``.
            probs_TE: Post-top-k probabilities ``(T, E)`` (Megatron's router output).
            padding_mask: Megatron's padding mask (``True`` = padding, as its aux and z losses
                read it), any shape with T elements, or ``None``.
        """
        valid_T = None if padding_mask is None else ~padding_mask.reshape(-1).bool()
        if self.axis == VarianceAxis.TOKENS:
            scores_TE = probs_TE
        else:
            scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        sums = spec_math.variance_sums(scores_TE=scores_TE, axis=self.axis.value, valid_T=valid_T)
        num_local_tokens = logits_TE.shape[0] if valid_T is None else valid_T.sum()
        return LocalSums(tuple(sums), num_local_tokens)

    def loss(
        self, reduced: tuple[Tensor, ...], **routed: Any
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """``L_v`` from the reduced sums; the metric is ``Var = -L_v`` (>= 0 for the log)."""
        loss = spec_math.variance_loss_from_sums(*reduced, axis=self.axis.value)
        return loss, {self.name: -loss.detach().float()}


class OrthogonalityTerm(CalibratedTerm):
    """``beta_o * L_o`` on the MoE layer's combined output; sums ``Σ_t L_t, N`` (2 numbers).

    Args:
        cfg: The specialization config (``ortho_*`` fields).
        config: Megatron's ``TransformerConfig``.
        groups: The process groups.
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.
    """

    metric_names = (ORTHO_METRIC,)

    def __init__(
        self, *, cfg: SpecializationConfig, config, groups: TermGroups, is_mtp_layer: bool
    ) -> None:
        super().__init__(
            name=ORTHO_METRIC,
            coeff=cfg.ortho_coeff,
            calibration_target=cfg.ortho_target if cfg.auto_calibrate else None,
            config=config,
            groups=groups,
            is_mtp_layer=is_mtp_layer,
        )
        self.eps = cfg.ortho_eps

    def compute(
        self, *, outputs_TKH: Tensor, valid_TK: Tensor, num_local_tokens: int, **_: Any
    ) -> LocalSums:
        """The orthogonality sums of this rank's tokens.

        Args:
            outputs_TKH: The tokens' raw expert outputs, by slot.
            valid_TK: The slots that hold an output.
            num_local_tokens: T.
        """
        sums = spec_math.orthogonality_sums(
            outputs_TKH=outputs_TKH, eps=self.eps, valid_TK=valid_TK
        )
        return LocalSums(tuple(sums), num_local_tokens)

    def loss(
        self, reduced: tuple[Tensor, ...], **routed: Any
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """``L_o`` from the reduced sums, recorded as is."""
        loss = spec_math.orthogonality_loss_from_sums(*reduced)
        return loss, {self.name: loss.detach().float()}
