"""The shared auxiliary-loss interface (megatron_edl.integration.losses.base): the one layer
numbering (MTP layers included), the gradient-scale rule of docs/method.md, without a process
group (fake groups give the sizes), and the metric registration. The terms' numerics are checked
end to end against single-process references in integration/test_router.py and
integration/losses/test_orthogonality.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_edl.integration.losses.base import (
    WEIGHTED_PREFIX,
    AuxLossTerm,
    CalibratedTerm,
    TermGroups,
    layer_index,
    register_metrics,
)


class _Group:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def _groups(tp: int, dp: int, cp: int) -> TermGroups:
    return TermGroups(tp_dp_cp=_Group(tp * dp * cp), tp_cp=_Group(tp * cp), cp=_Group(cp))


@pytest.mark.parametrize(
    "mtp_num_layers, layer_number, is_mtp, expected",
    [(None, 3, False, (3, 4)), (2, 3, False, (3, 6)), (2, 1, True, (5, 6)), (2, 2, True, (6, 6))],
)
def test_layer_index_puts_mtp_layers_after_the_decoder(
    mtp_num_layers, layer_number, is_mtp, expected
):
    config = SimpleNamespace(num_layers=4, mtp_num_layers=mtp_num_layers)
    assert layer_index(config, layer_number, is_mtp_layer=is_mtp) == expected


@pytest.mark.parametrize("scope, expected", [("global", 3.0), ("local", 1.0)])
def test_gradient_scale_is_dp_for_global_and_one_for_local(scope, expected):
    config = SimpleNamespace(calculate_per_token_loss=False)
    term = AuxLossTerm(config=config, groups=_groups(2, 3, 2), is_mtp_layer=False, scope=scope)
    assert term.gradient_scale(num_local_tokens=10) == expected


def test_per_token_scale_multiplies_by_local_tokens_and_tp_cp():
    config = SimpleNamespace(calculate_per_token_loss=True)
    term = AuxLossTerm(config=config, groups=_groups(2, 3, 2), is_mtp_layer=False)
    assert term.gradient_scale(num_local_tokens=10) == 3.0 * 10 * 4
    scale = term.gradient_scale(num_local_tokens=torch.tensor(10))  # valid tokens of a mask
    assert torch.is_tensor(scale) and scale.item() == 3.0 * 10 * 4


def test_reduce_group_follows_the_scope():
    groups = _groups(2, 3, 1)
    config = SimpleNamespace(calculate_per_token_loss=False)
    assert AuxLossTerm(config=config, groups=groups, is_mtp_layer=False).reduce_group is (
        groups.tp_dp_cp
    )
    local = AuxLossTerm(config=config, groups=groups, is_mtp_layer=False, scope="local")
    assert local.reduce_group is groups.tp_cp


def test_registered_names_accumulate_in_one_wrapper() -> None:
    from megatron.core.transformer.moe import moe_logging

    moe_logging.destroy_moe_metrics_tracker()
    tracker = moe_logging.get_moe_metrics_tracker()
    seen: list[list[str]] = []
    tracker.report = lambda *a, track_names=None, **k: seen.append(track_names)
    try:
        register_metrics(("variance_loss",))
        register_metrics(("ortho_loss", "variance_loss"))
        tracker.report(1.0, 1, track_names=["load_balancing_loss"])
        assert seen == [["load_balancing_loss", "variance_loss", "ortho_loss"]]
    finally:
        moe_logging.destroy_moe_metrics_tracker()


@pytest.mark.parametrize("repeats", [1, 3])
def test_calibrated_term_records_the_weighted_value_next_to_the_raw_one(repeats):
    """``weighted_<name> = weight * <name>``, both times 1/N for a repeated MTP layer."""
    from megatron.core.transformer.moe import moe_logging

    config = SimpleNamespace(
        num_layers=2, mtp_num_layers=repeats, mtp_use_repeated_layer=repeats > 1
    )
    term = CalibratedTerm(
        name="toy_loss",
        coeff=0.25,
        calibration_target=None,
        config=config,
        groups=_groups(1, 1, 1),
        is_mtp_layer=repeats > 1,
    )
    assert term.weight == 0.25 and term.calibrated
    moe_logging.destroy_moe_metrics_tracker()
    try:
        term.record({"toy_loss": torch.tensor(3.0)}, layer_number=1)
        metrics = moe_logging.get_moe_metrics_tracker().metrics
        layer = 1 + (2 if repeats > 1 else 0) - 1
        raw = metrics["toy_loss"].values[layer].item()
        weighted = metrics[WEIGHTED_PREFIX + "toy_loss"].values[layer].item()
        assert raw == pytest.approx(3.0 / repeats)
        assert weighted == pytest.approx(0.25 * 3.0 / repeats)
    finally:
        moe_logging.destroy_moe_metrics_tracker()
