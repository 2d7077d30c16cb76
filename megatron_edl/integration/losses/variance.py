"""The variance loss of arXiv 2505.22323 as a router term: ``gamma * L_v`` on the router's probs.

L_v = -Var(routing scores), along the axis ``--moe-variance-loss-axis`` selects (docs/method.md
section 3; the math is :mod:`megatron_edl.core.variance`). Applied in
``AuxLossTopKRouter.routing`` after Megatron's top-k: axis ``tokens`` on the post-top-k
``probs``, axis ``experts`` on the dense fp32 softmax of the logits. Its sums need one packed
all-reduce over ``tp_dp_cp`` (a token's scores are complete on its rank), so every rank gets the
loss of the whole micro-batch step and the ``global`` gradient scale applies. Recorded as
``variance_loss`` = Var = -L_v (Megatron's iteration line prints only non-negative losses) and
``weighted_variance_loss`` = γ · Var, γ the weight in use (auto-calibrated or not).

Shape legend: T tokens of this rank, E experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from megatron_edl.config import EDLRunConfig, VarianceAxis, VarianceConfig
from megatron_edl.core import variance as variance_math
from megatron_edl.integration.losses.base import (
    WEIGHTED_PREFIX,
    CalibratedTerm,
    LocalSums,
    TermGroups,
)

__all__ = ["VARIANCE_METRIC", "VarianceTerm", "build_variance_term"]

VARIANCE_METRIC = "variance_loss"


class VarianceTerm(CalibratedTerm):
    """``gamma * L_v`` on the router's post-top-k ``probs`` (L_v = -Var, recorded as Var).

    Sums: tokens axis ``Σ_t s_te, Σ_t s_te², N`` (2E + 1 numbers), experts axis
    ``Σ_t Var_e(p_t), N`` (2 numbers); :mod:`megatron_edl.core.variance`.

    Args:
        cfg: The variance branch of the run config.
        config: Megatron's ``TransformerConfig``.
        groups: The process groups.
        is_mtp_layer: Whether the layer is a multi-token-prediction layer.
    """

    metric_names = (VARIANCE_METRIC, WEIGHTED_PREFIX + VARIANCE_METRIC)

    def __init__(
        self, *, cfg: VarianceConfig, config, groups: TermGroups, is_mtp_layer: bool
    ) -> None:
        super().__init__(
            name=VARIANCE_METRIC,
            coeff=cfg.coeff,
            calibration_target=cfg.target if cfg.auto_calibrate else None,
            config=config,
            groups=groups,
            is_mtp_layer=is_mtp_layer,
        )
        self.axis: VarianceAxis = cfg.axis

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
        sums = variance_math.variance_sums(
            scores_TE=scores_TE, axis=self.axis.value, valid_T=valid_T
        )
        num_local_tokens = logits_TE.shape[0] if valid_T is None else valid_T.sum()
        return LocalSums(tuple(sums), num_local_tokens)

    def loss(
        self, reduced: tuple[Tensor, ...], **routed: Any
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """``L_v`` from the reduced sums; the metric is ``Var = -L_v`` (>= 0 for the log)."""
        loss = variance_math.variance_loss_from_sums(*reduced, axis=self.axis.value)
        return loss, {self.name: -loss.detach().float()}


def build_variance_term(run: EDLRunConfig, router) -> VarianceTerm | None:
    """The variance term of ``router`` (a Megatron ``TopKRouter``), ``None`` when the loss is
    off."""
    if not run.variance.enabled:
        return None
    return VarianceTerm(
        cfg=run.variance,
        config=router.config,
        groups=TermGroups.of_router(router),
        is_mtp_layer=router.is_mtp_layer,
    )
