"""Masked routing of the pruning evaluation and its curves, on hand-built routers."""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_edl.analysis import pruning as curves
from megatron_edl.integration.labels import DomainLabels
from megatron_edl.integration.pruning import (
    ExportError,
    Recorder,
    mask_expert_logits,
    slice_moe_state_dict,
)


def _labels(ids):
    ids_T = torch.tensor(ids)
    return DomainLabels(domain_ids_T=ids_T, weights_T=torch.ones(len(ids)))


def _topk(logits_TE, k=2):
    return torch.topk(logits_TE, k, dim=-1).indices.sort(dim=-1).values


def test_disjoint_domains_lose_nothing_when_pruned_to_their_experts():
    # A hand-built router: domain 0's tokens prefer experts {0, 1}, domain 1's {2, 3}.
    logits_TE = torch.tensor([[5.0, 4.0, 1.0, 0.0], [4.0, 5.0, 0.0, 1.0], [0.0, 1.0, 5.0, 4.0]])
    labels = _labels([0, 0, 1])
    own_DE = torch.tensor([[True, True, False, False], [False, False, True, True]])
    masked = mask_expert_logits(logits_TE, own_DE, labels, layer_number=1)
    assert torch.equal(_topk(masked), _topk(logits_TE))  # same routing: nothing lost
    assert torch.equal(masked[own_DE[labels.domain_ids_T]], logits_TE[own_DE[labels.domain_ids_T]])
    others = mask_expert_logits(logits_TE, ~own_DE, labels, layer_number=1)
    assert torch.equal(_topk(others), torch.tensor([[2, 3], [2, 3], [0, 1]]))  # routing changes
    assert torch.isinf(others[0, :2]).all() and torch.isinf(others[2, 2:]).all()


def test_unlabelled_tokens_keep_every_expert_and_no_labels_is_an_error():
    logits_TE = torch.randn(2, 4)
    mask_DE = torch.tensor([[True, True, False, False]])
    masked = mask_expert_logits(logits_TE, mask_DE, _labels([-1, 0]), layer_number=3)
    assert torch.equal(masked[0], logits_TE[0]) and torch.isinf(masked[1, 2:]).all()
    with pytest.raises(RuntimeError, match="layer 3 but no domain labels"):
        mask_expert_logits(logits_TE, mask_DE, None, layer_number=3)


def test_recorder_replays_the_batches_it_drew_unchanged():
    batches = [{"tokens": torch.arange(3) + i} for i in range(2)]
    recorder = Recorder(iter(batches))
    drawn = [next(recorder), next(recorder)]
    drawn[0]["tokens"].add_(100)  # a forward step that modifies its batch in place
    replayed = list(recorder.replay())
    assert [b["tokens"].tolist() for b in replayed] == [[0, 1, 2], [1, 2, 3]]


def test_curves_subtract_the_full_model_per_domain():
    results = [
        {"name": "full", "ranking": None, "keep": 8, "lm_loss": 3.0,
         "lm_loss_per_domain": {"a": 3.0, "b": 2.0, "c": None}},
        {"name": "domain-m4", "ranking": "domain", "keep": 4, "lm_loss": 3.1,
         "lm_loss_per_domain": {"a": 3.1, "b": 2.3, "c": None}},
        {"name": "global-m4", "ranking": "global", "keep": 4, "lm_loss": 3.5,
         "lm_loss_per_domain": {"a": 3.5, "b": 2.5, "c": None}},
    ]  # fmt: skip
    summary = curves.curves(results)
    (point,) = summary["curves"]["domain"]
    assert point["increase_per_domain"] == pytest.approx({"a": 0.1, "b": 0.3})
    assert point["mean_increase"] == pytest.approx(0.2)  # c has no validation tokens: left out
    assert summary["curves"]["global"][0]["mean_increase"] == pytest.approx(0.5)
    table = curves.markdown_table(summary)
    assert "| 4 | +0.200 | +0.500 |" in table
    with pytest.raises(ValueError, match="no full-model entry"):
        curves.curves(results[1:])


# ---------------------------------------------------------------------------------------------
# The export: slicing a state dict, and why the sliced router routes as the masked one
# ---------------------------------------------------------------------------------------------

SEQ, GROUPED = "decoder.layers.0.mlp", "decoder.layers.1.mlp"


def _moe_state_dict(num_experts=4, hidden=3):
    """Layer 0: SequentialMLP experts; layer 1: grouped-GEMM experts. Expert j's tensors hold j."""
    sd = {"embedding.word_embeddings.weight": torch.randn(8, hidden)}
    for prefix in (SEQ, GROUPED):
        sd[f"{prefix}.router.weight"] = torch.arange(num_experts * hidden).float()
        sd[f"{prefix}.router.weight"] = sd[f"{prefix}.router.weight"].view(num_experts, hidden)
        sd[f"{prefix}.shared_experts.linear_fc1.weight"] = torch.randn(5, hidden)
    sd[f"{SEQ}.router.expert_bias"] = torch.arange(num_experts).float() / 10
    for j in range(num_experts):
        sd[f"{SEQ}.experts.local_experts.{j}.linear_fc1.weight"] = torch.full((6, hidden), j)
        sd[f"{SEQ}.experts.local_experts.{j}.linear_fc2.weight"] = torch.full((hidden, 3), j)
        sd[f"{GROUPED}.experts.linear_fc1.weight{j}"] = torch.full((6, hidden), j)
        sd[f"{GROUPED}.experts.linear_fc2.weight{j}"] = torch.full((hidden, 3), j)
    sd[f"{GROUPED}.experts.linear_fc1._extra_state"] = None
    return sd


def test_slice_keeps_the_kept_rows_and_experts_renumbered_in_the_given_order():
    sd = _moe_state_dict()
    out = slice_moe_state_dict(sd, {SEQ: [1, 3], GROUPED: [0, 2]}, num_experts=4)
    assert torch.equal(out[f"{SEQ}.router.weight"], sd[f"{SEQ}.router.weight"][[1, 3]])
    assert out[f"{GROUPED}.router.weight"].shape == (2, 3)
    assert torch.equal(out[f"{GROUPED}.router.weight"], sd[f"{GROUPED}.router.weight"][[0, 2]])
    assert out[f"{SEQ}.router.expert_bias"].tolist() == pytest.approx([0.1, 0.3])
    for new, old in enumerate([1, 3]):
        for fc in ("linear_fc1", "linear_fc2"):
            assert out[f"{SEQ}.experts.local_experts.{new}.{fc}.weight"].unique().tolist() == [old]
    for new, old in enumerate([0, 2]):
        assert out[f"{GROUPED}.experts.linear_fc2.weight{new}"].unique().tolist() == [old]
    assert not any(".local_experts.2." in k or k.endswith(("weight2", "weight3")) for k in out)
    # Everything outside the routed experts is the very same tensor.
    for key in ("embedding.word_embeddings.weight", f"{SEQ}.shared_experts.linear_fc1.weight"):
        assert out[key] is sd[key]
    assert f"{GROUPED}.experts.linear_fc1._extra_state" in out
    assert len(out) == len(sd) - 2 * 2 - 2 * 2  # 2 of 4 experts x 2 tensors, in each layer


def test_slice_refuses_what_it_cannot_slice():
    sd = _moe_state_dict()
    with pytest.raises(ExportError, match="distinct ids in 0..3, got \\[1, 1\\]"):
        slice_moe_state_dict(sd, {SEQ: [1, 1]}, num_experts=4)
    with pytest.raises(ExportError, match="got \\[0, 4\\]"):
        slice_moe_state_dict(sd, {SEQ: [0, 4]}, num_experts=4)
    one_rank = {k: v for k, v in sd.items() if ".local_experts.3." not in k}  # an EP shard
    with pytest.raises(ExportError, match="holds experts \\[0, 1, 2\\], not all 4"):
        slice_moe_state_dict(one_rank, {SEQ: [0, 1]}, num_experts=4)
    with pytest.raises(ExportError, match="router.weight: expected 5 rows"):
        slice_moe_state_dict(sd, {SEQ: [0, 1]}, num_experts=5)
    window = {**sd, f"{SEQ}.router.moe_edl_window": torch.zeros(15)}
    with pytest.raises(ExportError, match="moe_edl_window: no rule to slice"):
        slice_moe_state_dict(window, {SEQ: [0, 1]}, num_experts=4)
    with pytest.raises(ExportError, match="decoder.layers.0.self_attention: no router weight"):
        slice_moe_state_dict(sd, {"decoder.layers.0.self_attention": [0, 1]}, num_experts=4)


@pytest.mark.parametrize(
    "score_function, pre_softmax", [("softmax", False), ("softmax", True), ("sigmoid", False)]
)
def test_sliced_router_routes_as_the_masked_router(score_function, pre_softmax):
    """Megatron's top-k over E logits with the others at -inf equals its top-k over the M kept
    rows (docs/method.md section 6): same experts, same probabilities."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    torch.manual_seed(0)
    logits_TE, kept = torch.randn(64, 8), torch.tensor([1, 2, 5, 6])
    route = functools.partial(
        topk_routing_with_score_function,
        topk=2,
        use_pre_softmax=pre_softmax,
        score_function=score_function,
        scaling_factor=2.5,
    )
    mask_DE = torch.zeros(1, 8, dtype=torch.bool)
    mask_DE[0, kept] = True
    masked = mask_expert_logits(logits_TE, mask_DE, _labels([0] * 64), layer_number=1)
    probs_TE, map_TE = route(masked)
    probs_TM, map_TM = route(logits_TE[:, kept].contiguous())
    assert not map_TE[:, ~mask_DE[0]].any()
    assert torch.equal(map_TE[:, kept], map_TM)
    torch.testing.assert_close(probs_TE[:, kept], probs_TM, rtol=1e-6, atol=0)


def test_expert_bias_makes_the_masked_router_differ():
    """Why the pruning tool refuses --moe-router-enable-expert-bias: the bias is added to the
    masked experts' zero sigmoid scores, so a masked expert can still take a top-k slot."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits_TE = torch.tensor([[0.0, 0.0, -5.0, -5.0]])
    bias_E = torch.tensor([0.0, 0.0, 10.0, 0.0])  # expert 2 is masked but heavily favoured
    mask_DE = torch.tensor([[True, True, False, True]])
    masked = mask_expert_logits(logits_TE, mask_DE, _labels([0]), layer_number=1)
    _, map_TE = topk_routing_with_score_function(
        masked, 2, score_function="sigmoid", expert_bias=bias_E
    )
    assert map_TE[0, 2]  # the masked expert is selected
