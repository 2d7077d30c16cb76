"""``EDLTopKRouter``: Megatron's ``TopKRouter`` plus the Expert Divergence Loss (and variance loss).

Top-k routing, load balancing, z-loss, expert bias, token dropping, checkpoints: all stock
(``super().routing``). EDL adds no parameter and, unless the statistics window is on, no persistent
buffer, so checkpoints move freely between stock and EDL models (the window's state,
``edl_window``, is one extra key a stock model ignores; docs/method.md section 5). Per micro-batch
and MoE layer, while training with grad enabled:

1. ``probs_TE``: the dense distribution over all experts before top-k, in fp32: the router's own
   normalised scores (softmax, or sigmoid divided by its sum for a sigmoid router) or softmax
   (``--moe-edl-scores``; :func:`megatron_edl.core.edl.routing_probs`);
2. per-domain weighted sums ``A [D, E]`` and counts ``n [D]`` of the local tokens;
3. one all-reduce (SUM) of ``A`` and ``n`` over the scope's group (``tp_dp_cp`` for ``global``,
   ``tp_cp`` for ``local``), backward identity (:mod:`megatron_edl.distributed`);
4. ``L_ED`` from the reduced statistics (:func:`megatron_edl.core.edl.edl_loss`);
5. ``beta(i) * scale * L_ED`` (β of optimizer step i: :mod:`megatron_edl.core.schedule`) attached
   to ``probs`` with ``MoEAuxLossAutoScaler``, exactly like
   Megatron's load-balancing loss, so the schedule's aux-loss scale applies to it.

Steps 1-2 and 4 (with the ``edl_mi`` metric) run eagerly or compiled into a few fused kernels,
with the all-reduce between them outside compiled code (``--moe-edl-fused``,
:mod:`megatron_edl.core.edl_fused`).

Gradient scale (method.md, "Gradient scale"). Megatron's schedule multiplies aux-loss gradients by
``cp / num_microbatches`` (``calculate_per_token_loss``: by 1), sums the router-weight gradient over
TP (the weight is a sequence-parallel parameter) and averages it over DP x CP in DDP. With the
identity backward of step 3 the gradients of all ranks holding tokens sum to the gradient of the
loss on the whole micro-batch step, so the router-weight gradient after Megatron's reduction is

    (1 / (dp * cp)) * sum_ranks (cp / nmb) * s * grad_r L = (s / (dp * nmb)) * grad L_global.

The ``global`` scope therefore needs ``s = dp`` (dense data-parallel size, EP ranks included),
giving ``beta * grad L_global / nmb``: Megatron's 1/num_microbatches convention for aux losses. The
``local`` scope needs ``s = 1``: each DP replica's loss gradient, averaged over replicas, as for
Megatron's ``aux_loss``. Under ``calculate_per_token_loss`` Megatron divides all gradients by the
global token count instead; multiplying ``s`` by ``T_local * |tp_cp|`` (as Megatron does for its aux
loss) restores the same result, exact when every token counts in the LM loss.

Domain labels reach the router through a per-micro-batch FIFO (:meth:`push_labels`) that the
training step fills with the labels of the tokens this rank's router sees (CP- and SP-sliced,
s-major). The router consumes one entry per grad-enabled training forward: without recompute in
forward order, with activation recompute (full, or selective ``moe``/``mlp``) at the recompute,
which runs in backward order. Per pipeline stage and model chunk both orders are the micro-batch
order, so each recompute gets its own micro-batch's labels, never a later one's. The no-grad first
pass of a checkpointed forward consumes nothing, as Megatron's built-in losses compute nothing
there.

The same FIFO entry feeds the routing telemetry when the router records it (``stats_phase``:
:mod:`megatron_edl.integration.telemetry`, one ``RouterStats.observe`` call per forward that
consumed labels): a forward consumes one entry if the EDL loss or the statistics need it
(:meth:`EDLTopKRouter.wants_labels`), and both read that entry.

The same router also carries the variance loss of arXiv 2505.22323 when its
``SpecializationConfig`` turns it on (:func:`megatron_edl.integration.specialization.
attach_variance_loss`: one packed all-reduce over ``tp_dp_cp``, the ``global`` scale above). EDL
and the variance loss are independent: ``edl_config=None`` builds a router without EDL.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter

from megatron_edl.config import EDLConfig, EDLScope, SpecializationConfig
from megatron_edl.core import edl_fused
from megatron_edl.core.window import window_combine
from megatron_edl.distributed import (
    DomainStatsAccumulator,
    all_reduce_domain_stats,
    edl_loss_scale,
)
from megatron_edl.integration.specialization import attach_variance_loss, make_variance_term
from megatron_edl.integration.telemetry import RouterStats

# Names recorded in Megatron's MoE metrics tracker (and registered for its log line).
METRIC_NAMES = ("edl_loss", "edl_jsd", "edl_mi", "edl_domains", "edl_min_segments")

WINDOW_BUFFER = "edl_window"
"""Name of the router's persistent buffer holding the statistics window (with the window on)."""


def register_edl_metrics(names: tuple[str, ...] = METRIC_NAMES) -> None:
    """Make Megatron's iteration log and TensorBoard/W&B report the EDL metrics (or ``names``).

    ``training_log`` passes a fixed whitelist (``track_names``) of MoE metrics to the tracker's
    ``report``; this wraps the tracker's ``report`` once so the whitelist includes ours. Later
    calls add their ``names`` (e.g. ``variance_loss``, ``ortho_loss``) to the same wrapper.
    Register only the metrics that are recorded: Megatron pre-creates every listed name.

    Args:
        names: The metric names to add.
    """
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


class EDLTopKRouter(TopKRouter):
    """``TopKRouter`` that attaches ``beta * L_ED`` (and ``gamma * L_v``) next to Megatron's."""

    def __init__(
        self,
        config,
        pg_collection=None,
        is_mtp_layer: bool = False,
        *,
        edl_config: EDLConfig | None,
        specialization_config: SpecializationConfig | None = None,
        stats_phase: str | None = None,
    ):
        if edl_config is not None:
            if not isinstance(edl_config, EDLConfig):
                raise TypeError(
                    f"edl_config must be an EDLConfig or None, got {type(edl_config).__name__}"
                )
            if edl_config.num_domains is None:
                raise ValueError(
                    "EDLTopKRouter needs edl_config.num_domains (number of loss domains)"
                )
        if stats_phase is not None and edl_config is None:
            raise ValueError("routing statistics (stats_phase) need an edl_config (the domains)")
        if specialization_config is None:
            specialization_config = SpecializationConfig()
        elif not isinstance(specialization_config, SpecializationConfig):
            raise TypeError(
                "specialization_config must be a SpecializationConfig or None, got "
                f"{type(specialization_config).__name__}"
            )
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.edl_config = edl_config
        self.edl_score_function = (
            None if edl_config is None else edl_config.score_function(self.score_function)
        )
        """Score function of EDL's and the telemetry's dense p_t (``EDLConfig.scores``)."""
        self.specialization_config = specialization_config
        self._variance_term = make_variance_term(self, specialization_config)
        self._edl_labels: collections.deque[DomainLabels] = collections.deque()
        self._edl_accumulator = DomainStatsAccumulator()
        self._edl_microbatches_seen = 0
        self._edl_dense_probs: torch.Tensor | None = None
        if edl_config is not None and edl_config.window_decay > 0:
            # The window state (packed [D*E + D]): persistent, so Megatron's checkpoint holds it
            # (a stock model ignores the extra key when it loads such a checkpoint).
            num_domains = edl_config.num_domains
            size = num_domains * config.num_moe_experts + num_domains
            window_X = torch.zeros(size, dtype=torch.float32, device=self.weight.device)
            self.register_buffer(WINDOW_BUFFER, window_X, persistent=True)
        self.routing_stats = None
        """Per-domain routing telemetry (:mod:`megatron_edl.integration.telemetry`), or None."""
        if stats_phase is not None:
            # Without sequence parallelism the TP ranks route the same tokens: count them once.
            tp_size = self.tp_group.size() if self.tp_group is not None else 1
            records = tp_size == 1 or config.sequence_parallel or self.tp_group.rank() == 0
            self.routing_stats = RouterStats(
                num_domains=edl_config.num_domains, phase=stats_phase, records=records
            )

    @property
    def edl_active(self) -> bool:
        """Whether EDL applies to this layer (coefficient > 0 and the layer is selected)."""
        return self.edl_config is not None and self.edl_config.applies_to(self.layer_number)

    def push_labels(self, labels: DomainLabels) -> None:
        """Queue the labels of one micro-batch (called by the training step before forward)."""
        self._edl_labels.append(labels)

    def wants_labels(self, grad_enabled: bool) -> bool:
        """Whether a forward in the current mode consumes one entry of labels (EDL or stats).

        Args:
            grad_enabled: ``torch.is_grad_enabled()`` during the forward.
        """
        edl_here = self.training and grad_enabled and self.edl_active
        stats = self.routing_stats is not None and self.routing_stats.counts_forward(
            training=self.training, grad_enabled=grad_enabled
        )
        return edl_here or stats

    def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask=False):
        # Megatron's aux losses (aux_loss, seq_aux_loss, global_aux_loss share these scores)
        # already computed the normalised scores of the router's score function in fp32 over
        # every token: EDL's dense probabilities when EDL uses that score function. Reuse them
        # (one softmax and one softmax backward fewer; docs/BENCHMARKS.md). Fused (TE) scores
        # are not reused: EDL computes its own from the logits.
        if (
            self.edl_score_function == self.score_function
            and not self.config.moe_router_fusion
            and not with_padding_mask
        ):
            self._edl_dense_probs = scores_for_aux_loss
        return super()._apply_aux_loss(probs, scores_for_aux_loss, routing_map, with_padding_mask)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        self._edl_dense_probs = None
        probs, routing_map = super().routing(logits, padding_mask)
        logits_TE = logits.view(-1, self.config.num_moe_experts)
        if self.wants_labels(torch.is_grad_enabled()):
            labels = self._next_labels(logits_TE.shape[0])  # one entry: EDL and the statistics
            if self.training and torch.is_grad_enabled() and self.edl_active:
                probs = self._apply_edl(logits_TE, probs, labels)
            if self.routing_stats is not None:
                self.routing_stats.observe(self, logits_TE, routing_map, labels, padding_mask)
        if self.training and torch.is_grad_enabled() and self._variance_term is not None:
            probs = attach_variance_loss(
                self,
                self._variance_term,
                self.specialization_config.variance_axis,
                logits_TE=logits_TE,
                probs_TE=probs,
                padding_mask=padding_mask,
            )
        self._edl_dense_probs = None  # do not keep the activation beyond this forward
        return probs, routing_map

    def _next_labels(self, num_tokens: int) -> DomainLabels:
        if not self._edl_labels:
            raise RuntimeError(
                f"EDL router of layer {self.layer_number} has no domain labels for this "
                "micro-batch: the training step must push them before the model's forward "
                "(megatron_edl.integration.gpt.forward_step does)"
            )
        labels = self._edl_labels.popleft()
        if labels.domain_ids_T.numel() != num_tokens:
            raise ValueError(
                f"EDL router of layer {self.layer_number} sees {num_tokens} tokens but got "
                f"{labels.domain_ids_T.numel()} domain labels: labels must be sliced like the "
                "tokens (CP split, then the sequence-parallel slice, s-major)"
            )
        return labels

    def _apply_edl(
        self, logits_TE: torch.Tensor, probs: torch.Tensor, labels: DomainLabels
    ) -> torch.Tensor:
        cfg = self.edl_config
        # Position of this micro-batch in its global batch: a new global batch starts every
        # num_microbatches grad-enabled forwards of this router (Megatron updates that number,
        # e.g. under batch-size ramp-up, before an iteration's first forward).
        if self._edl_microbatches_seen == 0:
            self._edl_accumulator.reset()
            queued = len(self._edl_labels) + 1  # this forward's labels are already taken
            if queued > get_num_microbatches():
                raise RuntimeError(
                    f"EDL router of layer {self.layer_number} holds {queued} "
                    "queued label sets at the start of a global batch: labels were pushed for "
                    "forwards that never consumed them"
                )
        self._edl_microbatches_seen = (self._edl_microbatches_seen + 1) % get_num_microbatches()
        # Eager or compiled (--moe-edl-fused): the math on either side of the all-reduce.
        path = edl_fused.select_path(cfg.fused.compile, logits_TE.device, logits_TE.dtype)
        probs_TE = self._edl_dense_probs  # Megatron's aux-loss softmax, when it computed one
        wanted = torch.promote_types(logits_TE.dtype, torch.float32)  # fp32, or fp64 for tests
        if probs_TE is None or probs_TE.shape != logits_TE.shape or probs_TE.dtype != wanted:
            # p_t is computed inside (fused with the sums), with EDL's score function.
            dense = {"logits_TE": logits_TE, "score_function": self.edl_score_function}
        else:
            dense = {"probs_TE": probs_TE}
        # Ids are validated once, in the data pipeline, not here.
        sums_DE, counts_D = path.statistics(
            **dense,
            domain_ids_T=labels.domain_ids_T,
            weights_T=labels.weights_T,
            num_domains=cfg.num_domains,
        )
        group = self.tp_dp_cp_group if cfg.scope == EDLScope.GLOBAL else self.tp_cp_group
        sums_DE, counts_D = all_reduce_domain_stats(sums_DE, counts_D, group)
        if cfg.accumulate:  # earlier micro-batches of this global batch enter detached
            reduced = (sums_DE, counts_D)
            sums_DE, counts_D = self._edl_accumulator.combine(*reduced)
            self._edl_accumulator.update(*reduced)
        elif cfg.window_decay > 0:  # earlier micro-batches, decayed and detached
            window_X = getattr(self, WINDOW_BUFFER)
            sums_DE, counts_D, next_X = window_combine(
                sums_DE=sums_DE, counts_D=counts_D, past_X=window_X.clone(), decay=cfg.window_decay
            )
            window_X.copy_(next_X)
        out = path.step(sums_DE=sums_DE, counts_D=counts_D, form=cfg.form.value, eps=cfg.eps)

        scale = edl_loss_scale(
            cfg.scope,
            dp_size=self.tp_dp_cp_group.size() // self.tp_cp_group.size(),  # dense DP, EP incl.
            cp_size=self.cp_group.size(),
            cp_in_aux_loss_scale=True,  # Megatron's schedule multiplies aux losses by cp
        )
        if self.calculate_per_token_loss:
            scale *= logits_TE.shape[0] * self.tp_cp_group.size()
        coeff = cfg.coefficient_at(labels.iteration)  # delayed start, warm-up
        probs = MoEAuxLossAutoScaler.apply(probs, out.loss * (coeff * scale))
        self._record_edl_metrics(out, counts_D)
        return probs

    def _record_edl_metrics(self, out: edl_fused.EDLStepOutput, counts_D: torch.Tensor) -> None:
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer = self.layer_number + (self.config.num_layers if self.is_mtp_layer else 0)
        values = {
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
        tracker = get_moe_metrics_tracker()
        for name, value in values.items():
            # Values are replicated over the reduce group, not partial: average, never sum.
            tracker.record(
                name, value, layer, num_layers, avg_group=self.tp_cp_group, needs_dp_avg=True
            )
