"""``AuxLossTopKRouter``: Megatron's ``TopKRouter`` plus our router losses and routing telemetry.

The router any of EDL, the variance loss or the routing telemetry needs (each can be on alone).

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

Steps 1-5 (and the metrics) are :class:`megatron_edl.integration.loss_terms.EDLTerm`, one
implementation of the auxiliary-loss interface every router loss here shares
(:class:`~megatron_edl.integration.loss_terms.AuxLossTerm`: compute, reduce, scale, attach,
record).

Steps 1-2 and 4 (with the ``edl_mi`` metric) run eagerly or compiled into a few fused kernels,
with the all-reduce between them outside compiled code (``--moe-edl-fused``,
:mod:`megatron_edl.core.edl_fused`).

Gradient scale (docs/method.md, "Gradient scale"; computed by
:meth:`~megatron_edl.integration.loss_terms.AuxLossTerm.gradient_scale`). Megatron's schedule
multiplies aux-loss gradients by ``cp / num_microbatches`` (``calculate_per_token_loss``: by 1),
sums the router-weight gradient over TP (the weight is a sequence-parallel parameter) and
averages it over DP x CP in DDP. With the identity backward of step 3 the gradients of all ranks
holding tokens sum to the gradient of the loss on the whole micro-batch step, so the
router-weight gradient after Megatron's reduction is

    (1 / (dp * cp)) * sum_ranks (cp / nmb) * s * grad_r L = (s / (dp * nmb)) * grad L_global.

The ``global`` scope therefore needs ``s = dp`` (dense data-parallel size, EP ranks included),
giving ``beta * grad L_global / nmb``: Megatron's 1/num_microbatches convention for aux losses. The
``local`` scope needs ``s = 1``: each DP replica's loss gradient, averaged over replicas, as for
Megatron's ``aux_loss``. Under ``calculate_per_token_loss`` Megatron divides all gradients by the
global token count instead; multiplying ``s`` by ``T_local * |tp_cp|`` (as Megatron does for its aux
loss) restores the same result, exact when every token counts in the LM loss.

Domain labels reach the router through a per-micro-batch FIFO (its ``label_queue``, a
:class:`megatron_edl.integration.labels.LabelQueue`; :meth:`push_labels`) that the training step
fills with the labels of the tokens this rank's router sees (CP- and SP-sliced,
s-major). The router consumes one entry per grad-enabled training forward: without recompute in
forward order, with activation recompute (full, or selective ``moe``/``mlp``) at the recompute,
which runs in backward order. Per pipeline stage and model chunk both orders are the micro-batch
order, so each recompute gets its own micro-batch's labels, never a later one's. The no-grad first
pass of a checkpointed forward consumes nothing, as Megatron's built-in losses compute nothing
there.

The same FIFO entry feeds the routing telemetry when the router records it (``stats_phase``:
:mod:`megatron_edl.integration.telemetry`, one ``RouterStats.observe`` call per forward that
consumed labels): a forward consumes one entry if the EDL loss or the statistics need it
(:meth:`AuxLossTopKRouter.wants_labels`), and both read that entry.

A repeated MTP layer (``--mtp-use-repeated-layer``) runs its one router N = ``mtp_num_layers``
times per forward: :meth:`AuxLossTopKRouter.push_labels` queues the micro-batch's labels N times,
each call consumes one copy (the same labels: the N depths route the same positions), every
loss counts 1/N per call, as Megatron's aux loss
(:func:`~megatron_edl.integration.loss_terms.mtp_repeats`), and the routing telemetry counts
every call's routing (N observations of each token per micro-batch).

The window buffer is initialised in :meth:`AuxLossTopKRouter.reset_parameters`, which
Megatron-FSDP calls after it materialises a router built on the meta device
(``--init-model-with-meta-device``): a buffer created on the meta device holds no values.

The same router also carries the variance loss of arXiv 2505.22323 when its
``SpecializationConfig`` turns it on (:class:`megatron_edl.integration.loss_terms.VarianceTerm`:
one packed all-reduce over ``tp_dp_cp``, the ``global`` scale above). EDL and the variance loss
are independent: ``edl_config=None`` builds a router without EDL. The number of loss domains is
the labels' (``LabelsConfig.num_domains``), passed as ``num_domains``: needed when EDL is on (or
its window is), or the router records the telemetry.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_edl.config import EDLConfig, SpecializationConfig
from megatron_edl.integration.internals import touch
from megatron_edl.integration.labels import DomainLabels, LabelConsumer, LabelQueue
from megatron_edl.integration.loss_terms import (
    EDL_METRICS,
    EDLTerm,
    TermGroups,
    VarianceTerm,
    mtp_repeats,
    register_edl_metrics,
)
from megatron_edl.integration.pruning import mask_expert_logits
from megatron_edl.integration.telemetry import RouterStats

__all__ = [
    "METRIC_NAMES",
    "WINDOW_BUFFER",
    "AuxLossTopKRouter",
    "DomainLabels",
    "register_edl_metrics",
]

METRIC_NAMES = EDL_METRICS
"""Names the EDL loss records in Megatron's MoE metrics tracker (register them for its log line
with :func:`~megatron_edl.integration.loss_terms.register_edl_metrics`, re-exported here)."""

WINDOW_BUFFER = "edl_window"
"""Name of the router's persistent buffer holding the statistics window (with the window on)."""


class AuxLossTopKRouter(TopKRouter, LabelConsumer):
    """``TopKRouter`` that attaches ``beta * L_ED`` (and ``gamma * L_v``) next to Megatron's losses
    and feeds the routing telemetry; with all of them off it routes exactly like ``TopKRouter``.

    Args:
        config: Megatron's ``TransformerConfig``.
        pg_collection: Megatron's process groups (``None``: its defaults).
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.
        edl_config: The EDL config (the loss applies where ``edl_config.applies_to(layer)``), or
            ``None`` for no EDL and no telemetry.
        num_domains: D, the number of loss domains of the labels the router receives
            (``LabelsConfig.num_domains``); needed when EDL is on (or its window is) or with
            ``stats_phase``, else may be ``None``.
        specialization_config: The variance loss's config (``None``: off).
        stats_phase: Which forwards the routing telemetry counts (``"train"``/``"eval"``), or
            ``None`` for no telemetry.
    """

    def __init__(
        self,
        config,
        pg_collection=None,
        is_mtp_layer: bool = False,
        *,
        edl_config: EDLConfig | None,
        num_domains: int | None = None,
        specialization_config: SpecializationConfig | None = None,
        stats_phase: str | None = None,
    ):
        if edl_config is not None:
            if not isinstance(edl_config, EDLConfig):
                raise TypeError(
                    f"edl_config must be an EDLConfig or None, got {type(edl_config).__name__}"
                )
            if num_domains is None and (edl_config.enabled or edl_config.window_decay > 0):
                raise ValueError(
                    "AuxLossTopKRouter with EDL on needs num_domains (number of loss domains)"
                )
        if stats_phase is not None and edl_config is None:
            raise ValueError("routing statistics (stats_phase) need an edl_config (the scores)")
        if stats_phase is not None and num_domains is None:
            raise ValueError("routing statistics (stats_phase) need num_domains (the domains)")
        if specialization_config is None:
            specialization_config = SpecializationConfig()
        elif not isinstance(specialization_config, SpecializationConfig):
            raise TypeError(
                "specialization_config must be a SpecializationConfig or None, got "
                f"{type(specialization_config).__name__}"
            )
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.edl_config = edl_config
        self.num_domains = num_domains
        """D, the number of loss domains (``None``: neither EDL nor the telemetry is on)."""
        self.edl_score_function = (
            None if edl_config is None else edl_config.score_function(self.score_function)
        )
        """Score function of EDL's and the telemetry's dense p_t (``EDLConfig.scores``)."""
        self.specialization_config = specialization_config
        groups = TermGroups.of_router(self)
        self.edl_term = (
            None
            if edl_config is None
            else EDLTerm(
                cfg=edl_config,
                num_domains=num_domains,
                score_function=self.edl_score_function,
                config=config,
                groups=groups,
                is_mtp_layer=is_mtp_layer,
            )
        )
        """The EDL loss term (:mod:`megatron_edl.integration.loss_terms`), or ``None``."""
        self.variance_term = (
            VarianceTerm(
                cfg=specialization_config, config=config, groups=groups, is_mtp_layer=is_mtp_layer
            )
            if specialization_config.variance_enabled
            else None
        )
        """The variance loss term, or ``None`` when the loss is off."""
        self.label_queue = LabelQueue()
        """Per-micro-batch domain labels (pushed by the training step, one entry per forward
        that :meth:`wants_labels`)."""
        self._edl_dense_probs: torch.Tensor | None = None
        if edl_config is not None and edl_config.window_decay > 0:
            # The window state (packed [D*E + D]): persistent, so Megatron's checkpoint holds it
            # (a stock model ignores the extra key when it loads such a checkpoint).
            size = num_domains * config.num_moe_experts + num_domains
            window_X = torch.zeros(size, dtype=torch.float32, device=self.weight.device)
            self.register_buffer(WINDOW_BUFFER, window_X, persistent=True)
        self.forwards_per_microbatch = mtp_repeats(config, is_mtp_layer=is_mtp_layer)
        """Forwards of this router per micro-batch: N of a repeated MTP layer, else 1."""
        self.expert_mask_DE: torch.Tensor | None = None
        """bool [D, E]: the experts each domain's tokens may route to in evaluation (pruning:
        :mod:`megatron_edl.integration.pruning`); ``None``: every expert."""
        self.routing_stats = None
        """Per-domain routing telemetry (:mod:`megatron_edl.integration.telemetry`), or None."""
        if stats_phase is not None:
            # Without sequence parallelism the TP ranks route the same tokens: count them once.
            tp_size = self.tp_group.size() if self.tp_group is not None else 1
            records = tp_size == 1 or config.sequence_parallel or self.tp_group.rank() == 0
            self.routing_stats = RouterStats(
                num_domains=num_domains, phase=stats_phase, records=records
            )

    def reset_parameters(self) -> None:
        """Megatron's (the router weight), then the window state to zeros.

        Megatron-FSDP materialises a module built on the meta device with ``to_empty`` (its
        parameters and buffers hold uninitialised memory) and then calls this; Megatron's
        ``Router.__init__`` calls it before the window exists.
        """
        super().reset_parameters()
        window_X = getattr(self, WINDOW_BUFFER, None)
        if window_X is not None and not window_X.is_meta:
            with torch.no_grad():
                window_X.zero_()

    def push_labels(self, labels: DomainLabels) -> None:
        """Queue one micro-batch's labels, once per forward of this router in that micro-batch
        (:attr:`forwards_per_microbatch`: N copies for a repeated MTP layer)."""
        for _ in range(self.forwards_per_microbatch):
            self.label_queue.push(labels)

    @property
    def edl_active(self) -> bool:
        """Whether EDL applies to this layer (coefficient > 0 and the layer is selected)."""
        return self.edl_config is not None and self.edl_config.applies_to(self.layer_number)

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

    _touches = (touch("router-apply-aux-loss"),)  # registered at import, not per forward

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
        labels = None
        if self.wants_labels(torch.is_grad_enabled()):
            # One entry: EDL, the statistics and the evaluation's expert mask.
            num_tokens = logits.numel() // self.config.num_moe_experts
            labels = self.label_queue.pop(num_tokens, consumer=self._consumer_name())
        logits_TE = logits.view(-1, self.config.num_moe_experts)
        if self.expert_mask_DE is not None and not self.training:
            # pruning evaluation: top-k among the kept experts; the statistics below see the
            # unmasked logits (finite entropies) and the masked routing map
            logits = mask_expert_logits(logits, self.expert_mask_DE, labels, self.layer_number)
        probs, routing_map = super().routing(logits, padding_mask)
        if labels is not None:
            if self.training and torch.is_grad_enabled() and self.edl_active:
                probs = self._apply_edl(logits_TE, probs, labels)
            if self.routing_stats is not None:
                self.routing_stats.observe(
                    training=self.training,
                    logits_TE=logits_TE,
                    routing_map_TE=routing_map,
                    labels=labels,
                    padding_mask=padding_mask,
                    score_function=self.edl_score_function or "softmax",
                )
        if self.training and torch.is_grad_enabled() and self.variance_term is not None:
            probs = self.variance_term.apply(
                probs,
                layer_number=self.layer_number,
                logits_TE=logits_TE,
                probs_TE=probs,
                padding_mask=padding_mask,
            )
        self._edl_dense_probs = None  # do not keep the activation beyond this forward
        return probs, routing_map

    def _consumer_name(self) -> str:
        return f"EDL router of layer {self.layer_number}"

    def _apply_edl(
        self, logits_TE: torch.Tensor, probs: torch.Tensor, labels: DomainLabels
    ) -> torch.Tensor:
        term = self.edl_term
        term.begin_microbatch(
            queued=len(self.label_queue) + 1,  # this forward's labels are already taken
            consumer=self._consumer_name(),
        )
        return term.apply(
            probs,
            layer_number=self.layer_number,
            logits_TE=logits_TE,
            dense_probs_TE=self._edl_dense_probs,  # Megatron's aux-loss scores, if computed
            labels=labels,
            window_X=getattr(self, WINDOW_BUFFER, None),
        )
