"""``AuxLossTopKRouter``: Megatron's ``TopKRouter`` plus the router losses and routing telemetry.

Top-k routing, load balancing, z-loss, expert bias, token dropping, checkpoints: all stock
(``super().routing``). The router builds the terms of the registry's ``router`` losses
(:func:`megatron_edl.integration.losses.registry.router_terms`: EDL, variance, any new one) from
the run config it is given, and after Megatron's top-k applies each term that is active in this
forward to ``probs``, in registration order (:meth:`AuxLossTerm.apply
<megatron_edl.integration.losses.base.AuxLossTerm.apply>`: compute, reduce, scale, attach,
record; docs/method.md, "Gradient scale"). With no term active it routes exactly like
``TopKRouter``. A term adds no parameter; the EDL window is its one persistent buffer
(``edl_window``, docs/method.md section 5), which a stock model ignores.

Domain labels reach the router through a per-micro-batch FIFO (its ``label_queue``, a
:class:`megatron_edl.integration.labels.LabelQueue`; :meth:`push_labels`) that the training step
fills with the labels of the tokens this rank's router sees (CP- and SP-sliced, s-major). The
router consumes one entry per forward that needs them (:meth:`wants_labels`: an active term
with ``needs_labels``, or the telemetry): a grad-enabled training forward, so without recompute
in forward order and with activation recompute (full, or selective ``moe``/``mlp``) at the
recompute, in backward order; per pipeline stage and model chunk both are the micro-batch order,
so each forward gets its own micro-batch's labels. The no-grad first pass of a checkpointed
forward consumes nothing. The same entry feeds the routing telemetry
(:mod:`megatron_edl.integration.telemetry`, one ``RouterStats.observe`` per consuming forward).

A repeated MTP layer (``--mtp-use-repeated-layer``) runs its one router N = ``mtp_num_layers``
times per forward: :meth:`push_labels` queues the micro-batch's labels N times, each call
consumes one copy, each loss counts 1/N per call (:func:`~megatron_edl.integration.losses.base.
mtp_repeats`), and the telemetry counts every call's routing.

The terms' buffers are re-initialised in :meth:`AuxLossTopKRouter.reset_parameters`, which
Megatron-FSDP calls after it materialises a router built on the meta device
(``--init-model-with-meta-device``): a buffer created on the meta device holds no values.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_edl.config import EDLRunConfig
from megatron_edl.integration.internals import touch
from megatron_edl.integration.labels import DomainLabels, LabelConsumer, LabelQueue
from megatron_edl.integration.losses import registry
from megatron_edl.integration.losses.base import mtp_repeats
from megatron_edl.integration.pruning import mask_expert_logits
from megatron_edl.integration.telemetry import RouterStats

__all__ = ["AuxLossTopKRouter"]


class AuxLossTopKRouter(TopKRouter, LabelConsumer):
    """``TopKRouter`` that attaches the registry's router losses next to Megatron's and feeds
    the routing telemetry; with all of them off it routes exactly like ``TopKRouter``.

    Args:
        config: Megatron's ``TransformerConfig``.
        pg_collection: Megatron's process groups (``None``: its defaults).
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.
        run_config: The run's config: each registered loss reads its branch; ``labels`` gives
            the number of loss domains, ``telemetry.phase`` which forwards the routing
            telemetry counts (``None``: no telemetry; it needs ``labels``).
    """

    def __init__(
        self,
        config,
        pg_collection=None,
        is_mtp_layer: bool = False,
        *,
        run_config: EDLRunConfig,
    ):
        if not isinstance(run_config, EDLRunConfig):
            raise TypeError(f"run_config must be an EDLRunConfig, got {type(run_config).__name__}")
        phase = run_config.telemetry.phase
        labels = run_config.labels
        if phase is not None and (labels is None or labels.num_domains is None):
            raise ValueError(
                f"routing statistics (telemetry phase {phase}) need the labels' num_domains, "
                f"got labels {labels!r}"
            )
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.run_config = run_config
        self.num_domains = None if labels is None else labels.num_domains
        """D, the number of loss domains (``None``: the run loads no labels)."""
        self.edl_score_function = (
            None if labels is None else run_config.edl.score_function(self.score_function)
        )
        """Score function of the telemetry's (and EDL's) dense p_t (``--moe-edl-scores``)."""
        self.aux_terms = registry.router_terms(run_config, self)
        """``{name: term}`` of the registry's router losses this run builds, in order."""
        for term in self.aux_terms.values():
            term.register_state(self)
        self.label_queue = LabelQueue()
        """Per-micro-batch domain labels (pushed by the training step, one entry per forward
        that :meth:`wants_labels`)."""
        self._aux_loss_scores: torch.Tensor | None = None
        self.forwards_per_microbatch = mtp_repeats(config, is_mtp_layer=is_mtp_layer)
        """Forwards of this router per micro-batch: N of a repeated MTP layer, else 1."""
        self.expert_mask_DE: torch.Tensor | None = None
        """bool [D, E]: the experts each domain's tokens may route to in evaluation (pruning:
        :mod:`megatron_edl.integration.pruning`); ``None``: every expert."""
        self.routing_stats = None
        """Per-domain routing telemetry (:mod:`megatron_edl.integration.telemetry`), or None."""
        if phase is not None:
            # Without sequence parallelism the TP ranks route the same tokens: count them once.
            tp_size = self.tp_group.size() if self.tp_group is not None else 1
            records = tp_size == 1 or config.sequence_parallel or self.tp_group.rank() == 0
            self.routing_stats = RouterStats(
                num_domains=self.num_domains, phase=phase, records=records
            )

    def reset_parameters(self) -> None:
        """Megatron's (the router weight), then the terms' buffers.

        Megatron-FSDP materialises a module built on the meta device with ``to_empty`` (its
        parameters and buffers hold uninitialised memory) and then calls this; Megatron's
        ``Router.__init__`` calls it before the terms exist.
        """
        super().reset_parameters()
        for term in getattr(self, "aux_terms", {}).values():
            term.reset_state(self)

    def push_labels(self, labels: DomainLabels) -> None:
        """Queue one micro-batch's labels, once per forward of this router in that micro-batch
        (:attr:`forwards_per_microbatch`: N copies for a repeated MTP layer)."""
        for _ in range(self.forwards_per_microbatch):
            self.label_queue.push(labels)

    def active_terms(self, grad_enabled: bool) -> list:
        """The terms a forward in the current mode applies.

        Args:
            grad_enabled: ``torch.is_grad_enabled()`` during the forward.
        """
        return [
            term
            for term in self.aux_terms.values()
            if term.active(
                training=self.training, grad_enabled=grad_enabled, layer_number=self.layer_number
            )
        ]

    def wants_labels(self, grad_enabled: bool) -> bool:
        """Whether a forward in the current mode consumes one entry of labels (a term or stats).

        Args:
            grad_enabled: ``torch.is_grad_enabled()`` during the forward.
        """
        terms = any(term.needs_labels for term in self.active_terms(grad_enabled))
        stats = self.routing_stats is not None and self.routing_stats.counts_forward(
            training=self.training, grad_enabled=grad_enabled
        )
        return terms or stats

    _touches = (touch("router-apply-aux-loss"),)  # registered at import, not per forward

    def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask=False):
        # Megatron's aux losses (aux_loss, seq_aux_loss, global_aux_loss share these scores)
        # already computed the normalised scores of the router's score function in fp32 over
        # every token: the terms may reuse them (EDL as its dense p_t when the score functions
        # agree). Fused (TE) scores are not offered.
        if not self.config.moe_router_fusion and not with_padding_mask:
            self._aux_loss_scores = scores_for_aux_loss
        return super()._apply_aux_loss(probs, scores_for_aux_loss, routing_map, with_padding_mask)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        self._aux_loss_scores = None
        grad_enabled = torch.is_grad_enabled()
        terms = self.active_terms(grad_enabled)
        labels = None
        if self.wants_labels(grad_enabled):
            # One entry: the terms, the statistics and the evaluation's expert mask.
            num_tokens = logits.numel() // self.config.num_moe_experts
            labels = self.label_queue.pop(num_tokens, consumer=self._consumer_name())
        logits_TE = logits.view(-1, self.config.num_moe_experts)
        if self.expert_mask_DE is not None and not self.training:
            # pruning evaluation: top-k among the kept experts; the statistics below see the
            # unmasked logits (finite entropies) and the masked routing map
            logits = mask_expert_logits(logits, self.expert_mask_DE, labels, self.layer_number)
        probs, routing_map = super().routing(logits, padding_mask)
        for term in terms:  # each sees the router's output with the earlier terms attached
            probs = term.apply(
                probs,
                layer_number=self.layer_number,
                owner=self,
                logits_TE=logits_TE,
                probs_TE=probs,
                routing_map_TE=routing_map,
                padding_mask=padding_mask,
                labels=labels,
                aux_loss_scores_TE=self._aux_loss_scores,
                queued_labels=len(self.label_queue) + 1,  # this forward's labels are taken
                consumer=self._consumer_name(),
            )
        if labels is not None and self.routing_stats is not None:
            self.routing_stats.observe(
                training=self.training,
                logits_TE=logits_TE,
                routing_map_TE=routing_map,
                labels=labels,
                padding_mask=padding_mask,
                score_function=self.edl_score_function or "softmax",
            )
        self._aux_loss_scores = None  # do not keep the activation beyond this forward
        return probs, routing_map

    def _consumer_name(self) -> str:
        return f"EDL router of layer {self.layer_number}"
