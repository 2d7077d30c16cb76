"""The variance and orthogonality losses (arXiv 2505.22323) inside Megatron's MoE layer.

The math is :mod:`megatron_edl.core.specialization`. Both losses are terms of the shared
auxiliary-loss interface (:class:`~megatron_edl.integration.loss_terms.VarianceTerm`,
:class:`~megatron_edl.integration.loss_terms.OrthogonalityTerm`): a weight (the flag's
coefficient, or the auto-calibrated one), the gradient scale of
:func:`megatron_edl.distributed.edl_loss_scale` (scope ``global``), the attachment with
Megatron's ``MoEAuxLossAutoScaler`` (so the schedule's aux-loss scale applies, as for the
load-balancing loss) and a per-layer metric in Megatron's MoE metrics tracker, without the
weight: ``ortho_loss`` = L_o and ``variance_loss`` = Var = −L_v (the variance the loss raises;
Megatron's iteration log line prints only non-negative losses). This module places the
orthogonality loss in Megatron's token dispatchers.

Where they hook in:

- **Variance** (``VarianceTerm``): in ``AuxLossTopKRouter.routing``, after Megatron's
  top-k, on the router's output ``probs`` (axis ``tokens``: those post-top-k scores; axis
  ``experts``: the dense fp32 softmax of the logits).
- **Orthogonality**: in the token dispatcher's combine path, where a token's k expert outputs
  are back on the token's own rank before they are summed. The layer spec builds the MoE layer
  as :class:`SpecializationMoELayer` (a ``MoELayer`` whose only change is its dispatcher), which
  rebuilds Megatron's dispatcher as the subclass below; each subclass calls the stock methods
  and only reads their tensors, so the layer's output is bit-identical.

  * ``alltoall`` (:class:`OrthogonalityAlltoAllTokenDispatcher`): after the combine all-to-all
    the token's rank holds one row per selected (token, expert) pair, expert-major; the hook in
    ``combine_postprocess`` groups them by token (not by expert) before Megatron's unpermute.
  * ``allgather`` (:class:`OrthogonalityAllGatherTokenDispatcher`): Megatron sums a token's
    expert outputs on the expert ranks (unpermute) and reduce-scatters the sums, so the k
    outputs never meet. The hook places each raw output in its token's slot of a
    ``[T_global, k, H]`` buffer on the expert rank (zeros elsewhere) and reduce-scatters that
    over the same ``tp_ep`` group: k times the combine's traffic, in fp32 like Megatron's own
    combine. Its backward is the all-gather Megatron's function provides.
  * ``flex`` with the DeepEP backend (:class:`OrthogonalityFlexTokenDispatcher`): DeepEP
    sends a token once to each rank hosting one of its C = tp * k expanded experts, and Megatron
    sums the outputs on the expert rank (unpermute) before the fused combine. The hook places
    each output in the column of the token's expert list it belongs to (``[C, T_recv, H]``) and
    sends the C columns through DeepEP's combine with the same handle (C times the combine's
    traffic, in the experts' dtype); at the token's rank the columns that are expert-TP copies
    of one expert are summed. The ``hybridep`` and ``ncclep`` backends keep the token layout
    inside opaque handles: refused at start (``--moe-flex-dispatcher-backend``).

  The raw output of an expert (before gate weighting) is recovered as ``y / p``: Megatron's
  experts multiply the gate p into the activation before ``fc2`` (and the expert bias by p), so
  their output is y = p * x exactly. The gradient of L_o reaches the expert weights (and, through
  the expert inputs, the layers below) through y; the two gradients it sends to p (through y
  and through 1/p) cancel, so it does not move the router. Pairs with p = 0 (capacity padding)
  carry no output and are skipped.

Statistics and reductions, per layer and micro-batch (every quantity is a sum over tokens, so one
packed all-reduce (SUM) over ``tp_dp_cp`` with identity backward suffices,
:func:`megatron_edl.distributed.all_reduce_sums`):

    variance, tokens axis:  Σ_t s_te, Σ_t s_te², N        2E + 1 numbers
    variance, experts axis: Σ_t Var_e(p_t), N             2 numbers
    orthogonality:          Σ_t L_t, N                    2 numbers

Nothing else needs a reduction: a token's scores are complete on its rank (the router sees all E
experts), and its k outputs are complete after the combine (expert-TP partial sums included).
With these sums every rank gets the loss of the whole micro-batch step, so the gradient after
Megatron's reduction is the single-process one when the attached loss carries the factor
``s = dp`` (``edl_loss_scale("global", ...)``; the router docstring derives it; under
``--calculate-per-token-loss`` times the local token count times ``|tp_cp|``). The expert weights
follow the same rule: DDP sums their gradients over the expert-data-parallel group and scales
them by 1 / (dp * cp), like the dense ones.

Auto-calibration (released code): at a term's first training forward its weight becomes
``target / |L_0|``; that number is averaged over ``tp_dp_cp`` so every rank uses the same weight
(the loss is already identical there; the reduction makes the weight independent of any rounding
difference). Calibration is per MoE layer and is not saved in checkpoints: a resumed run
calibrates again (pass the logged weights as coefficients to avoid that).

It stays one module, a little over 500 lines: each dispatcher subclass places the same orthogonality
hook in one of Megatron's dispatchers, so they are read side by side.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region
from megatron.core.transformer.moe import token_dispatcher as megatron_token_dispatcher
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
    MoEFlexTokenDispatcher,
)
from torch import Tensor

from megatron_edl.config import SpecializationConfig
from megatron_edl.core import specialization as spec_math
from megatron_edl.integration.internals import touch
from megatron_edl.integration.loss_terms import (
    ORTHO_METRIC,
    VARIANCE_METRIC,
    OrthogonalityTerm,
    TermGroups,
)

METRIC_NAMES = (VARIANCE_METRIC, ORTHO_METRIC)
"""Names recorded in Megatron's MoE metrics tracker (register them with
:func:`megatron_edl.integration.loss_terms.register_edl_metrics`)."""


def metric_names(cfg: SpecializationConfig) -> tuple[str, ...]:
    """The metric names of the losses ``cfg`` turns on."""
    return tuple(
        name
        for name, on in ((VARIANCE_METRIC, cfg.variance_enabled), (ORTHO_METRIC, cfg.ortho_enabled))
        if on
    )


# ---------------------------------------------------------------------------------------------
# Orthogonality loss (in the token dispatcher)
# ---------------------------------------------------------------------------------------------


class OrthogonalityLoss:
    """The orthogonality term of one MoE layer, shared by the layer and its dispatcher.

    The loss itself is :class:`~megatron_edl.integration.loss_terms.OrthogonalityTerm`
    (:attr:`term`); this holds what the dispatcher hooks need around it: whether this forward
    computes it, the top-k slots, the layer number.
    """

    def __init__(
        self, *, config, cfg: SpecializationConfig, pg_collection, is_mtp_layer: bool
    ) -> None:
        """Create the term.

        Args:
            config: Megatron's ``TransformerConfig``.
            cfg: The specialization config.
            pg_collection: Megatron's process groups.
            is_mtp_layer: Whether the layer is a multi-token-prediction layer.
        """
        self.num_slots = config.moe_router_topk
        self.enabled = cfg.ortho_enabled
        self.term = OrthogonalityTerm(
            cfg=cfg,
            config=config,
            groups=TermGroups.of_pg_collection(pg_collection),
            is_mtp_layer=is_mtp_layer,
        )
        self.training = True
        """Mirrors the MoE layer's ``training`` flag (the dispatcher is not a module)."""
        self.layer_number: int | None = None

    @property
    def active(self) -> bool:
        """Whether this forward computes the loss: enabled, training, grad enabled."""
        return self.enabled and self.training and torch.is_grad_enabled()

    @staticmethod
    def raw_rows(rows_RH: Tensor, probs_R: Tensor) -> tuple[Tensor, Tensor]:
        """Raw expert outputs ``y / p`` (fp32) of gate-weighted rows; rows with p = 0 invalid."""
        positive_R = probs_R != 0
        safe_R = torch.where(positive_R, probs_R, torch.ones_like(probs_R))
        raw_RH = rows_RH.float() / safe_R.float()[:, None]
        return raw_RH, positive_R

    def attach(
        self, output: Tensor, outputs_TKH: Tensor, valid_TK: Tensor, num_local_tokens: int
    ) -> Tensor:
        """Reduce (Σ_t L_t, N) over ``tp_dp_cp`` and attach L_o to the layer output.

        Args:
            output: The combined output of this rank's tokens.
            outputs_TKH: This rank's tokens' raw expert outputs, by slot.
            valid_TK: The slots that hold an output.
            num_local_tokens: T.

        Returns:
            ``output`` with the loss attached.
        """
        return self.term.apply(
            output,
            layer_number=self.layer_number,
            outputs_TKH=outputs_TKH,
            valid_TK=valid_TK,
            num_local_tokens=num_local_tokens,
        )


def _valid_slots(selected_TE: Tensor, num_slots: int) -> Tensor:
    """valid_TK: slot s of token t holds an output iff s < the token's number of outputs."""
    counts_T = selected_TE.sum(dim=1)
    return torch.arange(num_slots, device=selected_TE.device)[None, :] < counts_T[:, None]


class OrthogonalityAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's alltoall dispatcher plus the orthogonality loss in ``combine_postprocess``."""

    # Megatron internals read below (registered at import, not per forward).
    _touches = (touch("alltoall-dispatcher-state"),)

    def __init__(self, *args, orthogonality: OrthogonalityLoss, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.orthogonality = orthogonality

    def combine_postprocess(self, permutated_local_input_tokens: Tensor) -> Tensor:
        """Megatron's unpermute; the loss is computed on its input, attached to its output."""
        routing_map_TE, probs_TE = self.routing_map, self.probs
        output = super().combine_postprocess(permutated_local_input_tokens)
        ortho = self.orthogonality
        if not ortho.active:
            return output
        num_tokens = routing_map_TE.shape[0]
        token_R, expert_R = spec_math.permuted_row_tokens(routing_map_TE=routing_map_TE)
        raw_RH, valid_R = ortho.raw_rows(permutated_local_input_tokens, probs_TE[token_R, expert_R])
        selected_TE = routing_map_TE & (probs_TE != 0)
        slot_R = spec_math.token_slots(selected_TE=selected_TE)[token_R, expert_R]
        outputs_TKH, _ = spec_math.group_rows_by_token(
            rows_RH=raw_RH,
            token_R=token_R,
            slot_R=slot_R,
            num_tokens=num_tokens,
            num_slots=ortho.num_slots,
            valid_R=valid_R,
            validate=False,
        )
        valid_TK = _valid_slots(selected_TE, ortho.num_slots)
        return ortho.attach(output, outputs_TKH, valid_TK, num_tokens)


class OrthogonalityAllGatherTokenDispatcher(MoEAllGatherTokenDispatcher):
    """Megatron's allgather dispatcher plus the orthogonality loss (see the module docstring)."""

    # Megatron internals read below (registered at import, not per forward).
    _touches = (touch("allgather-dispatcher-state"),)

    def __init__(self, *args, orthogonality: OrthogonalityLoss, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.orthogonality = orthogonality
        self._ortho_active = False

    def dispatch_preprocess(self, hidden_states: Tensor, routing_map: Tensor, probs: Tensor):
        """Megatron's; notes which slots of this rank's tokens will hold an output."""
        self._ortho_active = self.orthogonality.active
        if self._ortho_active:
            self._ortho_valid_TK = _valid_slots(
                routing_map & (probs != 0), self.orthogonality.num_slots
            )
        return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def dispatch_postprocess(self, hidden_states: Tensor, probs: Tensor):
        """Megatron's; first keeps the slots of the local experts' (gathered) tokens."""
        if self._ortho_active:
            first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
            selected_TE = self.routing_map & (probs != 0)  # global tokens of the tp_ep group
            self._ortho_slot_TL = spec_math.token_slots(selected_TE=selected_TE)[:, first:last]
        return super().dispatch_postprocess(hidden_states, probs)

    def combine_preprocess(self, hidden_states: Tensor) -> Tensor:
        """Megatron's unpermute; also places the raw outputs in ``[T_global, k, H]`` slots."""
        output = super().combine_preprocess(hidden_states)
        if self._ortho_active:
            token_R, local_R = spec_math.permuted_row_tokens(routing_map_TE=self.local_map)
            raw_RH, valid_R = self.orthogonality.raw_rows(hidden_states, self.local_probs)
            self._ortho_outputs_TKH, _ = spec_math.group_rows_by_token(
                rows_RH=raw_RH,
                token_R=token_R,
                slot_R=self._ortho_slot_TL[token_R, local_R],
                num_tokens=self.local_map.shape[0],
                num_slots=self.orthogonality.num_slots,
                valid_R=valid_R,
                validate=False,
            )
        return output

    def token_combine(self, hidden_states: Tensor) -> Tensor:
        """Megatron's reduce-scatter; the raw outputs follow it to their tokens' ranks."""
        output = super().token_combine(hidden_states)
        if not self._ortho_active:
            return output
        outputs_TKH, self._ortho_outputs_TKH = self._ortho_outputs_TKH, None
        num_global, num_slots, hidden = outputs_TKH.shape
        if self.tp_size > 1 or self.ep_size > 1:
            outputs_TKH = reduce_scatter_to_sequence_parallel_region(
                outputs_TKH.reshape(num_global, num_slots * hidden), group=self.tp_ep_group
            ).view(-1, num_slots, hidden)
        valid_TK, self._ortho_valid_TK = self._ortho_valid_TK, None
        return self.orthogonality.attach(output, outputs_TKH, valid_TK, outputs_TKH.shape[0])


def expanded_to_expert(indices_TC: Tensor, *, tp_size: int, num_local_experts: int) -> Tensor:
    """Expert id of every expanded id of the flex dispatcher; ``-1`` stays ``-1``.

    Megatron's ``MoEFlexTokenDispatcher._initialize_metadata`` lays the E experts out as
    ``[ep, tp, local]``: expanded id ``(ep_rank * tp + tp_rank) * L + l`` is expert
    ``ep_rank * L + l`` on expert-TP rank ``tp_rank`` (L local experts).
    """
    per_ep_rank = tp_size * num_local_experts
    expert_TC = (indices_TC // per_ep_rank) * num_local_experts + indices_TC % num_local_experts
    return torch.where(indices_TC >= 0, expert_TC, indices_TC)


class OrthogonalityFlexTokenDispatcher(MoEFlexTokenDispatcher):
    """Megatron's flex dispatcher (DeepEP backend) plus the orthogonality loss.

    DeepEP sends a token once to every rank of ``tp_ep`` that hosts at least one entry of its
    list of C = tp * k expanded experts (``_comm_manager.token_indices``, ``-1`` for a dropped
    pair). On that rank ``dispatched_indices`` ``[T_recv, C]`` keep the source's column order and
    hold the local expert id of each column hosted here, ``-1`` elsewhere. Megatron permutes the
    received rows by local expert, runs the experts (gate multiplied in) and unpermutes (sum over
    the local experts); ``fused_combine`` sums each token's partial rows back at its source.

    The hook:

    * ``combine_preprocess`` (before Megatron's unpermute, which runs unchanged): places every
      gate-weighted expert output (received row r, local expert l) in column c of a per-column
      buffer ``[C, T_recv, H]``, where ``dispatched_indices[r, c] == l``
      (:func:`megatron_edl.core.specialization.row_columns`); padding rows (quantization
      alignment) name no column and are skipped.
    * ``token_combine``, before Megatron's combine (which releases the DeepEP handle): each
      column goes back through ``fused_combine`` with the same handle, in the experts' output
      dtype (DeepEP combines bf16). A column is hosted by exactly one rank, so the sum over ranks
      is that rank's value: the transport adds no rounding. At the source the token then holds
      y_c for each of its C columns; the raw outputs y_c / p_c are formed in fp32 there (p_c:
      ``_comm_manager.token_probs``, the same fp32 numbers the experts multiplied in), columns
      that are expert-TP copies of one expert are summed (their partial outputs)
      (:func:`~megatron_edl.core.specialization.merge_columns`), and the loss is attached to the
      combined output as for the other dispatchers. Columns with index ``-1`` or p = 0 are empty.

    Why C combines of width H and not one combine of width C * H: DeepEP bounds the bytes of a
    row. The backward of a combine is a DeepEP dispatch of the gradient; its intranode dispatch
    kernel (SM90 path) copies each half row through an 8 KiB shared-memory buffer per warp
    (``kNumTMABytesPerWarp``), i.e. rows of at most about 16 KiB (H <= 8184 in bf16), and its
    internode combine stages a whole row in 16 KiB. A C * H wide row exceeds that for ordinary
    model sizes (already C = 8, H = 1024); H-wide rows are what Megatron's own dispatch and
    combine send. Cost: C = tp * k combines per layer, each the size of Megatron's combine, and
    a ``[C, T_recv, H]`` buffer (the allgather path also moves k times its combine).
    """

    # Megatron internals read below (registered at import, not per forward).
    _touches = (
        touch("flex-dispatcher-comm-manager"),
        touch("deepep-manager-state"),
        touch("token-dispatcher-fused-combine"),
    )

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: list[int],
        config,
        pg_collection=None,
        *,
        orthogonality: OrthogonalityLoss,
    ) -> None:
        if config.moe_flex_dispatcher_backend != "deepep":
            raise ValueError(_flex_backend_message(config.moe_flex_dispatcher_backend))
        super().__init__(num_local_experts, local_expert_indices, config, pg_collection)
        self.orthogonality = orthogonality
        self._ortho_active = False
        self._ortho_columns_CTH: Tensor | None = None

    def dispatch_preprocess(self, hidden_states: Tensor, routing_map: Tensor, probs: Tensor):
        """Megatron's; notes whether this forward computes the loss."""
        self._ortho_active = self.orthogonality.active
        return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def combine_preprocess(self, hidden_states: Tensor) -> Tensor:
        """Places the expert outputs in their columns, then Megatron's unpermute."""
        if self._ortho_active:
            self._ortho_columns_CTH = self._columns(hidden_states)
        return super().combine_preprocess(hidden_states)

    def _columns(self, rows_RH: Tensor) -> Tensor:
        """``[C, T_recv, H]``: every expert output row in its (column, received token) slot."""
        manager = self._comm_manager
        indices_TC = manager.dispatched_indices
        token_R, local_R = spec_math.permuted_row_tokens(
            routing_map_TE=manager.dispatched_routing_map
        )
        if manager.pad_offsets is not None:  # fused permute-and-pad: each expert's rows padded
            row_R = torch.arange(token_R.numel(), device=rows_RH.device)
            rows_RH = rows_RH[row_R + manager.pad_offsets.to(row_R.device)[local_R]]
        column_R, found_R = spec_math.row_columns(
            indices_TC=indices_TC, token_R=token_R, expert_R=local_R
        )
        # Grouped by column (the "token" of group_rows_by_token), one slot per received token.
        columns_CTH, _ = spec_math.group_rows_by_token(
            rows_RH=rows_RH,
            token_R=column_R,
            slot_R=token_R,
            num_tokens=indices_TC.shape[1],
            num_slots=indices_TC.shape[0],
            valid_R=found_R,
            validate=False,
        )
        return columns_CTH

    def token_combine(
        self, hidden_states: Tensor, async_finish: bool = True, allocate_on_comm_stream: bool = True
    ) -> Tensor:
        """The columns go back to their tokens (same DeepEP handle), then Megatron's combine."""
        if not self._ortho_active:
            return super().token_combine(hidden_states, async_finish, allocate_on_comm_stream)
        columns_CTH, self._ortho_columns_CTH = self._ortho_columns_CTH, None
        manager = self._comm_manager
        combined = [
            megatron_token_dispatcher.fused_combine(column_TH, manager.group, manager.handle)[0]
            for column_TH in columns_CTH
        ]
        indices_TC, probs_TC = manager.token_indices, manager.token_probs
        output = super().token_combine(hidden_states, async_finish, allocate_on_comm_stream)
        num_tokens, num_columns = indices_TC.shape
        y_TCH = torch.stack(combined, dim=1)
        raw_RH, positive_R = self.orthogonality.raw_rows(
            y_TCH.reshape(num_tokens * num_columns, -1), probs_TC.reshape(-1)
        )
        outputs_TKH, valid_TK = spec_math.merge_columns(
            columns_TCH=raw_RH.view(num_tokens, num_columns, -1),
            expert_TC=expanded_to_expert(
                indices_TC, tp_size=self.tp_size, num_local_experts=self.num_local_experts
            ),
            valid_TC=(indices_TC >= 0) & positive_R.view(num_tokens, num_columns),
            num_slots=self.orthogonality.num_slots,
            validate=False,
        )
        return self.orthogonality.attach(output, outputs_TKH, valid_TK, num_tokens)


def _flex_backend_message(backend: str) -> str:
    return (
        "the orthogonality loss supports the flex token dispatcher with the deepep backend only "
        f"(hybridep and ncclep keep the token layout inside opaque handles), got "
        f"--moe-flex-dispatcher-backend {backend}"
    )


# Keyed by the dispatcher type Megatron built; for flex only the deepep backend is supported
# (checked by the layer before Megatron builds the dispatcher, and by the subclass).
_ORTHOGONALITY_DISPATCHERS = {
    MoEAllGatherTokenDispatcher: OrthogonalityAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher: OrthogonalityAlltoAllTokenDispatcher,
    MoEFlexTokenDispatcher: OrthogonalityFlexTokenDispatcher,
}


class SpecializationMoELayer(MoELayer):
    """``MoELayer`` whose token dispatcher adds the orthogonality loss; nothing else differs.

    Same parameters, buffers and checkpoint layout as ``MoELayer``; installed through the layer
    spec (:func:`megatron_edl.integration.spec.with_edl_router`).
    """

    def __init__(
        self,
        config,
        submodules=None,
        layer_number: int | None = None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: str | None = None,
        *,
        specialization_config: SpecializationConfig,
    ) -> None:
        if (
            config.moe_token_dispatcher_type == "flex"
            and config.moe_flex_dispatcher_backend != "deepep"
        ):  # before Megatron builds the backend's manager
            raise ValueError(_flex_backend_message(config.moe_flex_dispatcher_backend))
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            is_mtp_layer=is_mtp_layer,
            name=name,
        )
        self.orthogonality = OrthogonalityLoss(
            config=config,
            cfg=specialization_config,
            pg_collection=pg_collection,
            is_mtp_layer=is_mtp_layer,
        )
        self.orthogonality.training = self.training
        self.orthogonality.layer_number = layer_number
        dispatcher_cls = _ORTHOGONALITY_DISPATCHERS.get(type(self.token_dispatcher))
        if dispatcher_cls is None:
            raise ValueError(
                "the orthogonality loss supports the allgather, alltoall and flex (deepep) token "
                "dispatchers, "
                f"not {type(self.token_dispatcher).__name__} (--moe-token-dispatcher-type "
                f"{config.moe_token_dispatcher_type})"
            )
        self.token_dispatcher = dispatcher_cls(
            self.num_local_experts,
            self.local_expert_indices,
            config=self.config,
            pg_collection=pg_collection,
            orthogonality=self.orthogonality,
        )
        if self.use_shared_expert and self.shared_expert_overlap:
            self.token_dispatcher.set_shared_experts(self.shared_experts)
        if hasattr(self, "_training_token_dispatcher"):  # inference-optimized layers
            touch("moe-layer-training-dispatcher")
            self._training_token_dispatcher = self.token_dispatcher

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron's; the orthogonality metric is recorded under this layer number too."""
        super().set_layer_number(layer_number)
        self.orthogonality.layer_number = layer_number

    def train(self, mode: bool = True):
        """``nn.Module.train``; the dispatcher (not a module) follows the mode."""
        super().train(mode)
        self.orthogonality.training = mode
        return self
