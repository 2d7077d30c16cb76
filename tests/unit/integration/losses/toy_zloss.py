"""A toy router loss, added the way docs/CONTRIBUTING.md "Adding a router loss" says: one module
(this one: the term and its factory), one config branch and one registry entry; nothing in the
router, the spec or the launcher names it. Used by ``test_registry.py``.

The loss is a router z-loss (ST-MoE, arXiv 2202.08906), a sum over tokens like every term:

    L_z = (1/N) Σ_t (log Σ_e exp z_te)²        (z_t: router logits of token t, N tokens)

    sums of one rank: (Σ_{t local} lse(z_t)², N_local); one all-reduce; L_z = S / N.

In a real loss the branch dataclass lives in ``megatron_edl/config/<name>.py`` and the field in
``EDLRunConfig``; here :class:`RunConfigWithZLoss` stands in for that field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from megatron_edl.config import EDLRunConfig
from megatron_edl.integration.losses.base import AuxLossTerm, LocalSums, TermGroups
from megatron_edl.integration.losses.registry import Hook, LossEntry

METRIC = "toy_z_loss"


# -- 1. the config branch ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZLossConfig:
    """The branch: its coefficient turns it on."""

    coeff: float = 0.0
    """Weight of L_z per MoE layer; 0 disables it."""

    @property
    def enabled(self) -> bool:
        """Whether the loss is on."""
        return self.coeff > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfigWithZLoss(EDLRunConfig):
    """``EDLRunConfig`` with the new branch (what the new field of ``EDLRunConfig`` would be)."""

    zloss: ZLossConfig = dataclasses.field(default_factory=ZLossConfig)


# -- 2. the term and its factory -----------------------------------------------------------------


class ZLossTerm(AuxLossTerm):
    """``coeff * L_z`` on the router's ``probs`` (scope ``global``)."""

    metric_names = (METRIC,)

    def __init__(self, *, cfg: ZLossConfig, config, groups: TermGroups, is_mtp_layer: bool):
        super().__init__(config=config, groups=groups, is_mtp_layer=is_mtp_layer)
        self.cfg = cfg

    def compute(self, *, logits_TE: Tensor, **_: Any) -> LocalSums:
        lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
        count = torch.tensor(float(lse_T.numel()), device=lse_T.device)
        return LocalSums(((lse_T**2).sum(), count), lse_T.numel())

    def loss(self, reduced: tuple[Tensor, ...], **_: Any) -> tuple[Tensor, Mapping[str, Tensor]]:
        total, count = reduced
        loss = total / count
        return loss, {METRIC: loss.detach()}

    def coefficient(self, loss: Tensor, *, layer_number: int | None, **_: Any) -> float:
        return self.cfg.coeff


def build_zloss_term(run: EDLRunConfig, router) -> ZLossTerm | None:
    """The factory the registry calls with the run config and the router."""
    if not run.zloss.enabled:
        return None
    return ZLossTerm(
        cfg=run.zloss,
        config=router.config,
        groups=TermGroups.of_router(router),
        is_mtp_layer=router.is_mtp_layer,
    )


# -- 3. the registry entry -----------------------------------------------------------------------

ENTRY = LossEntry(
    name="toy_zloss",
    config_field="zloss",
    hook=Hook.ROUTER,
    build=build_zloss_term,
    metric_names=ZLossTerm.metric_names,
)
"""Registered by the test with ``registry.register(ENTRY)`` (in-process: ``monkeypatch``)."""
