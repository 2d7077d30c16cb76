"""The orthogonality loss of arXiv 2505.22323 inside Megatron's MoE layer: ``beta_o * L_o``.

L_o, per token over its k selected experts' raw outputs (docs/method.md section 3; the math is
:mod:`megatron_edl.core.orthogonality`), is computed where a token's k expert outputs are back on
the token's rank, in the token dispatcher's combine path, and attached to the layer's combined
output. The layer spec builds the MoE layer as :class:`OrthogonalityMoELayer` (a ``MoELayer``
whose only change is its dispatcher), which rebuilds Megatron's dispatcher as one of the
subclasses below; each calls the stock methods and only reads their tensors, so the layer's
output is bit-identical.

* ``alltoall`` (:class:`OrthogonalityAlltoAllTokenDispatcher`): after the combine all-to-all the
  token's rank holds one row per selected (token, expert) pair, expert-major; the hook in
  ``combine_postprocess`` groups them by token before Megatron's unpermute.
* ``allgather`` (:class:`OrthogonalityAllGatherTokenDispatcher`): Megatron sums a token's expert
  outputs on the expert ranks and reduce-scatters the sums, so the k outputs never meet. The hook
  places each raw output in its token's slot of a ``[T_global, k, H]`` buffer on the expert rank
  (zeros elsewhere) and reduce-scatters that over the same ``tp_ep`` group: k times the combine's
  traffic, in fp32 like Megatron's own combine.
* ``flex`` with the DeepEP backend (:class:`OrthogonalityFlexTokenDispatcher`): each column of a
  token's expanded expert list goes back to its rank through DeepEP's combine with the same
  handle. The ``hybridep`` and ``ncclep`` backends keep the token layout inside opaque handles:
  refused at start.

The raw output of an expert (before gate weighting) is recovered as ``y / p``: Megatron's experts
multiply the gate p into the activation before ``fc2`` (and the expert bias by p), so y = p * x
exactly. The gradient of L_o reaches the expert weights through y; its two gradients to p
(through y and through 1/p) cancel, so it does not move the router. Pairs with p = 0 (capacity
padding) carry no output and are skipped. The sums ``Σ_t L_t, N`` need one packed all-reduce over
``tp_dp_cp`` (a token's k outputs are complete after the combine, expert-TP partial sums
included), so the ``global`` gradient scale applies; the expert weights follow the same rule.
Recorded as ``ortho_loss`` = L_o and ``weighted_ortho_loss`` = β_o · L_o, β_o the weight in use.

Shape legend: T tokens, K top-k slots, H hidden size, R permuted rows, C expanded experts of the
flex dispatcher, L local experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

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

from megatron_edl.config import EDLRunConfig, OrthogonalityConfig
from megatron_edl.core import orthogonality as ortho_math
from megatron_edl.integration.internals import touch
from megatron_edl.integration.losses.base import (
    WEIGHTED_PREFIX,
    CalibratedTerm,
    LocalSums,
    TermGroups,
)

__all__ = [
    "ORTHOGONALITY_DISPATCHERS",
    "ORTHO_METRIC",
    "LayerContext",
    "OrthogonalityAllGatherTokenDispatcher",
    "OrthogonalityAlltoAllTokenDispatcher",
    "OrthogonalityFlexTokenDispatcher",
    "OrthogonalityLoss",
    "OrthogonalityMoELayer",
    "OrthogonalityTerm",
    "build_orthogonality_term",
    "expanded_to_expert",
    "flex_backend_message",
    "valid_slots",
]

ORTHO_METRIC = "ortho_loss"


class LayerContext(NamedTuple):
    """What a layer-hooked loss is built from (the MoE layer's constructor arguments)."""

    config: Any
    """Megatron's ``TransformerConfig``."""
    pg_collection: Any
    """Megatron's process groups."""
    is_mtp_layer: bool
    """Whether the layer is a multi-token-prediction layer."""


class OrthogonalityTerm(CalibratedTerm):
    """``beta_o * L_o`` on the MoE layer's combined output; sums ``Σ_t L_t, N`` (2 numbers).

    Args:
        cfg: The orthogonality branch of the run config.
        config: Megatron's ``TransformerConfig``.
        groups: The process groups.
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.
    """

    metric_names = (ORTHO_METRIC, WEIGHTED_PREFIX + ORTHO_METRIC)

    def __init__(
        self, *, cfg: OrthogonalityConfig, config, groups: TermGroups, is_mtp_layer: bool
    ) -> None:
        super().__init__(
            name=ORTHO_METRIC,
            coeff=cfg.coeff,
            calibration_target=cfg.target if cfg.auto_calibrate else None,
            config=config,
            groups=groups,
            is_mtp_layer=is_mtp_layer,
        )
        self.eps = cfg.eps

    def compute(
        self, *, outputs_TKH: Tensor, valid_TK: Tensor, num_local_tokens: int, **_: Any
    ) -> LocalSums:
        """The orthogonality sums of this rank's tokens.

        Args:
            outputs_TKH: The tokens' raw expert outputs, by slot.
            valid_TK: The slots that hold an output.
            num_local_tokens: T.
        """
        sums = ortho_math.orthogonality_sums(
            outputs_TKH=outputs_TKH, eps=self.eps, valid_TK=valid_TK
        )
        return LocalSums(tuple(sums), num_local_tokens)

    def loss(
        self, reduced: tuple[Tensor, ...], **routed: Any
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """``L_o`` from the reduced sums, recorded as is."""
        loss = ortho_math.orthogonality_loss_from_sums(*reduced)
        return loss, {self.name: loss.detach().float()}


def build_orthogonality_term(run: EDLRunConfig, layer: LayerContext) -> OrthogonalityTerm | None:
    """The orthogonality term of an MoE layer, ``None`` when the loss is off."""
    if not run.orthogonality.enabled:
        return None
    return OrthogonalityTerm(
        cfg=run.orthogonality,
        config=layer.config,
        groups=TermGroups.of_pg_collection(layer.pg_collection),
        is_mtp_layer=layer.is_mtp_layer,
    )


# ---------------------------------------------------------------------------------------------
# The hooks in Megatron's token dispatchers
# ---------------------------------------------------------------------------------------------


class OrthogonalityLoss:
    """The orthogonality term of one MoE layer, shared by the layer and its dispatcher.

    The loss itself is :class:`OrthogonalityTerm` (:attr:`term`); this holds what the
    dispatcher hooks need around it: whether this forward computes it, the top-k slots, the
    layer number.

    Args:
        term: The layer's term (:func:`build_orthogonality_term`).
    """

    def __init__(self, term: OrthogonalityTerm) -> None:
        self.num_slots = term.config.moe_router_topk
        self.term = term
        self.training = True
        """Mirrors the MoE layer's ``training`` flag (the dispatcher is not a module)."""
        self.layer_number: int | None = None

    @property
    def active(self) -> bool:
        """Whether this forward computes the loss: training, grad enabled."""
        return self.term.active(
            training=self.training,
            grad_enabled=torch.is_grad_enabled(),
            layer_number=self.layer_number,
        )

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


def valid_slots(selected_TE: Tensor, num_slots: int) -> Tensor:
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
        token_R, expert_R = ortho_math.permuted_row_tokens(routing_map_TE=routing_map_TE)
        raw_RH, valid_R = ortho.raw_rows(permutated_local_input_tokens, probs_TE[token_R, expert_R])
        selected_TE = routing_map_TE & (probs_TE != 0)
        slot_R = ortho_math.token_slots(selected_TE=selected_TE)[token_R, expert_R]
        outputs_TKH, _ = ortho_math.group_rows_by_token(
            rows_RH=raw_RH,
            token_R=token_R,
            slot_R=slot_R,
            num_tokens=num_tokens,
            num_slots=ortho.num_slots,
            valid_R=valid_R,
            validate=False,
        )
        valid_TK = valid_slots(selected_TE, ortho.num_slots)
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
            self._ortho_valid_TK = valid_slots(
                routing_map & (probs != 0), self.orthogonality.num_slots
            )
        return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def dispatch_postprocess(self, hidden_states: Tensor, probs: Tensor):
        """Megatron's; first keeps the slots of the local experts' (gathered) tokens."""
        if self._ortho_active:
            first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
            selected_TE = self.routing_map & (probs != 0)  # global tokens of the tp_ep group
            self._ortho_slot_TL = ortho_math.token_slots(selected_TE=selected_TE)[:, first:last]
        return super().dispatch_postprocess(hidden_states, probs)

    def combine_preprocess(self, hidden_states: Tensor) -> Tensor:
        """Megatron's unpermute; also places the raw outputs in ``[T_global, k, H]`` slots."""
        output = super().combine_preprocess(hidden_states)
        if self._ortho_active:
            token_R, local_R = ortho_math.permuted_row_tokens(routing_map_TE=self.local_map)
            raw_RH, valid_R = self.orthogonality.raw_rows(hidden_states, self.local_probs)
            self._ortho_outputs_TKH, _ = ortho_math.group_rows_by_token(
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
      (:func:`megatron_edl.core.orthogonality.row_columns`); padding rows (quantization
      alignment) name no column and are skipped.
    * ``token_combine``, before Megatron's combine (which releases the DeepEP handle): each
      column goes back through ``fused_combine`` with the same handle, in the experts' output
      dtype (DeepEP combines bf16). A column is hosted by exactly one rank, so the sum over ranks
      is that rank's value: the transport adds no rounding. At the source the token then holds
      y_c for each of its C columns; the raw outputs y_c / p_c are formed in fp32 there (p_c:
      ``_comm_manager.token_probs``, the same fp32 numbers the experts multiplied in), columns
      that are expert-TP copies of one expert are summed (their partial outputs)
      (:func:`~megatron_edl.core.orthogonality.merge_columns`), and the loss is attached to the
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
            raise ValueError(flex_backend_message(config.moe_flex_dispatcher_backend))
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
        token_R, local_R = ortho_math.permuted_row_tokens(
            routing_map_TE=manager.dispatched_routing_map
        )
        if manager.pad_offsets is not None:  # fused permute-and-pad: each expert's rows padded
            row_R = torch.arange(token_R.numel(), device=rows_RH.device)
            rows_RH = rows_RH[row_R + manager.pad_offsets.to(row_R.device)[local_R]]
        column_R, found_R = ortho_math.row_columns(
            indices_TC=indices_TC, token_R=token_R, expert_R=local_R
        )
        # Grouped by column (the "token" of group_rows_by_token), one slot per received token.
        columns_CTH, _ = ortho_math.group_rows_by_token(
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
        outputs_TKH, valid_TK = ortho_math.merge_columns(
            columns_TCH=raw_RH.view(num_tokens, num_columns, -1),
            expert_TC=expanded_to_expert(
                indices_TC, tp_size=self.tp_size, num_local_experts=self.num_local_experts
            ),
            valid_TC=(indices_TC >= 0) & positive_R.view(num_tokens, num_columns),
            num_slots=self.orthogonality.num_slots,
            validate=False,
        )
        return self.orthogonality.attach(output, outputs_TKH, valid_TK, num_tokens)


def flex_backend_message(backend: str) -> str:
    """The refusal of a flex dispatcher backend other than DeepEP."""
    return (
        "the orthogonality loss supports the flex token dispatcher with the deepep backend only "
        f"(hybridep and ncclep keep the token layout inside opaque handles), got "
        f"--moe-flex-dispatcher-backend {backend}"
    )


# Keyed by the dispatcher type Megatron built; for flex only the deepep backend is supported
# (checked by the layer before Megatron builds the dispatcher, and by the subclass).
ORTHOGONALITY_DISPATCHERS = {
    MoEAllGatherTokenDispatcher: OrthogonalityAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher: OrthogonalityAlltoAllTokenDispatcher,
    MoEFlexTokenDispatcher: OrthogonalityFlexTokenDispatcher,
}


class OrthogonalityMoELayer(MoELayer):
    """``MoELayer`` whose token dispatcher adds the orthogonality loss; nothing else differs.

    Same parameters, buffers and checkpoint layout as ``MoELayer``; installed through the layer
    spec (:func:`megatron_edl.integration.spec.with_aux_loss_router`) when the run's
    orthogonality loss is on (the registry entry's ``moe_layer``).

    Args:
        run_config: The run config (its ``orthogonality`` branch).
        Others: as ``MoELayer``.
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
        run_config: EDLRunConfig,
    ) -> None:
        if (
            config.moe_token_dispatcher_type == "flex"
            and config.moe_flex_dispatcher_backend != "deepep"
        ):  # before Megatron builds the backend's manager
            raise ValueError(flex_backend_message(config.moe_flex_dispatcher_backend))
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        term = build_orthogonality_term(
            run_config, LayerContext(config, pg_collection, is_mtp_layer=is_mtp_layer)
        )
        if term is None:
            raise ValueError(
                "OrthogonalityMoELayer needs the orthogonality loss on, got "
                f"--moe-ortho-loss-coeff {run_config.orthogonality.coeff}"
            )
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            is_mtp_layer=is_mtp_layer,
            name=name,
        )
        self.orthogonality = OrthogonalityLoss(term)
        self.orthogonality.training = self.training
        self.orthogonality.layer_number = layer_number
        dispatcher_cls = ORTHOGONALITY_DISPATCHERS.get(type(self.token_dispatcher))
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
