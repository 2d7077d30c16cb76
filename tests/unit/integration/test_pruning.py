"""Masked routing of the pruning evaluation and its curves, on hand-built routers."""

from __future__ import annotations

import pytest
import torch

from megatron_edl.analysis import pruning as curves
from megatron_edl.integration.labels import DomainLabels
from megatron_edl.integration.pruning import _Recorder, mask_expert_logits


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
    recorder = _Recorder(iter(batches))
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
