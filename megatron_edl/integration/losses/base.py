"""The interface every auxiliary loss of an MoE layer implements: compute, reduce, scale, attach,
record.

Each loss here (EDL, variance, orthogonality, a new one) is a sum over tokens of per-token
statistics, so each follows the same five steps per MoE layer and micro-batch,
:meth:`AuxLossTerm.apply`:

1. **compute**: this rank's sums from its routed tokens (pure math in :mod:`megatron_edl.core`)
   and its token count;
2. **reduce**: ONE packed all-reduce (SUM) over the term's group, identity backward
   (:func:`megatron_edl.distributed.all_reduce_sums`); then the loss of the whole micro-batch step
   and its metrics from the reduced sums (:meth:`AuxLossTerm.loss`);
3. **scale**: the factor ``s`` that turns Megatron's gradient reduction of the per-rank pieces into
   the single-process gradient (derived in docs/method.md, "Gradient scale");
4. **attach**: ``weight * s * L`` on an activation with Megatron's ``MoEAuxLossAutoScaler``, like
   its load-balancing loss;
5. **record**: each metric in Megatron's MoE metrics tracker at the layer of :func:`layer_index`
   (MTP layers after the decoder's).

A layer that runs N times per forward (a repeated MTP layer, :func:`mtp_repeats`) attaches and
records each call's loss times 1/N, as Megatron does for its aux and z losses.
:class:`CalibratedTerm` adds the auto-calibrated weight and records the weighted value next to
the raw one. :func:`register_metrics` makes Megatron's log report the recorded names. Which terms
exist and where they are built: :mod:`megatron_edl.integration.losses.registry`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from torch import Tensor

from megatron_edl.distributed import all_reduce_sums, edl_loss_scale
from megatron_edl.integration.internals import touch

__all__ = [
    "WEIGHTED_PREFIX",
    "AuxLossTerm",
    "CalibratedTerm",
    "LayerIndex",
    "LocalSums",
    "TermGroups",
    "layer_index",
    "mtp_repeats",
    "register_metrics",
]

logger = logging.getLogger(__name__)

WEIGHTED_PREFIX = "weighted_"
"""``weighted_<name>``: the metric of a :class:`CalibratedTerm` times the weight in use. It ends
in ``loss`` like the raw name, so Megatron's iteration line prints it as a loss (six digits)."""


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


def register_metrics(names: Iterable[str]) -> None:
    """Make Megatron's iteration log and TensorBoard/W&B report the metrics ``names``.

    ``training_log`` passes a fixed whitelist (``track_names``) of MoE metrics to the tracker's
    ``report``; this wraps the tracker's ``report`` once so the whitelist includes ours, and
    later calls add their ``names`` to the same wrapper. Register only the metrics that are
    recorded: Megatron pre-creates every listed name. The launcher registers those of the run's
    losses (:func:`megatron_edl.integration.losses.registry.register_run_metrics`).

    Args:
        names: The metric names to add.
    """
    touch("moe-metrics-tracker-report")
    tracker = get_moe_metrics_tracker()
    registered = getattr(tracker, "aux_loss_metric_names", None)
    if registered is None:
        registered = tracker.aux_loss_metric_names = []
        report = tracker.report

        def report_with_ours(*args, track_names=None, **kwargs):
            if track_names is not None:
                listed = [track_names] if isinstance(track_names, str) else list(track_names)
                track_names = listed + [n for n in registered if n not in listed]
            return report(*args, track_names=track_names, **kwargs)

        tracker.report = report_with_ours
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
    """The metrics the term records (its registry entry registers them)."""

    needs_labels: ClassVar[bool] = False
    """Whether :meth:`compute` reads the micro-batch's domain labels (``routed["labels"]``); the
    router then consumes one label entry in every forward where the term is :meth:`active`."""

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

    def active(self, *, training: bool, grad_enabled: bool, layer_number: int | None) -> bool:
        """Whether a forward in this mode applies the term: training with grad enabled (the
        recompute pass under activation recompute; the no-grad first pass computes nothing, as
        Megatron's built-in losses).

        Args:
            training: The module's ``training`` flag.
            grad_enabled: ``torch.is_grad_enabled()`` during the forward.
            layer_number: The layer's 1-based number in its block.
        """
        return training and grad_enabled

    def register_state(self, owner: torch.nn.Module) -> None:
        """Register the term's buffers on ``owner`` (the router or layer); none by default.

        Persistent buffers become checkpoint keys: a term without any leaves the checkpoint
        layout stock.
        """

    def reset_state(self, owner: torch.nn.Module) -> None:
        """Re-initialise the buffers of :meth:`register_state` (``owner.reset_parameters``)."""

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


class CalibratedTerm(AuxLossTerm):
    """A ``global``-scope term whose weight is its flag's coefficient or auto-calibrated.

    Auto-calibration (released code of arXiv 2505.22323): at the term's first training forward
    its weight becomes ``target / |L_0|``, averaged over ``tp_dp_cp`` so every rank uses the same
    weight. Calibration is per MoE layer and not checkpointed: a resumed run calibrates again.

    Besides its metric ``name`` (the raw value, ``m``) it records ``weighted_<name>`` =
    ``weight * m``, the weight in use (calibrated or not) times the raw value: what the term
    adds to the objective, up to the sign the raw metric carries (docs/method.md section 3).

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

    def record(self, metrics: Mapping[str, Tensor], layer_number: int | None) -> None:
        """Step 5, with ``weighted_<name> = weight * metrics[name]`` added (the weight in use).

        Args:
            metrics: ``{name: value}``, values replicated over the reduce group.
            layer_number: The layer's 1-based number in its block.
        """
        weighted = {WEIGHTED_PREFIX + self.name: self.weight * metrics[self.name]}
        super().record({**metrics, **weighted}, layer_number)
