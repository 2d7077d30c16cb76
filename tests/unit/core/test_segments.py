"""Per-token domain ids and weights: the pure segment logic and the labelled mock dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_edl.config import LabelsConfig
from megatron_edl.core.segments import sample_token_labels


def test_segment_weights_by_hand():
    # Segments of 3, 1 and 4 tokens (domains 0, 1, 0); 8 tokens seen, one extra token fetched.
    ids, w = sample_token_labels(
        segment_domains_K=[0, 1, 0], segment_lengths_K=[3, 1, 5], num_tokens=8
    )
    assert ids.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    np.testing.assert_allclose(w, [1 / 3] * 3 + [1.0] + [1 / 4] * 4)
    # n_j = number of segments of domain j.
    assert np.bincount(ids, weights=w).tolist() == pytest.approx([2.0, 1.0])


def test_token_and_sample_modes_by_hand():
    kwargs = dict(segment_domains_K=[2, 1, -1], segment_lengths_K=[2, 3, 1], num_tokens=8)
    ids, w = sample_token_labels(**kwargs, aggregation="token")
    assert ids.tolist() == [2, 2, 1, 1, 1, -1, -1, -1]  # unlabelled segment, then padding
    assert w.tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    ids, w = sample_token_labels(**kwargs, aggregation="sample")
    assert ids.tolist() == [1, 1, 1, 1, 1, -1, -1, -1]  # majority domain: 1 (3 tokens)
    np.testing.assert_allclose(w, [0.2] * 5 + [0] * 3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="aggregation 'doc'"):
        sample_token_labels(
            segment_domains_K=[0], segment_lengths_K=[1], num_tokens=1, aggregation="doc"
        )
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        sample_token_labels(segment_domains_K=[0, 1], segment_lengths_K=[2, -1], num_tokens=1)
    with pytest.raises(ValueError, match="equal length"):
        sample_token_labels(segment_domains_K=[0, 1], segment_lengths_K=[2], num_tokens=1)


def test_mock_document_domains_label_map_and_random_control(tmp_path):
    from megatron_edl.integration.dataset import mock_document_domains

    cfg = LabelsConfig(num_domains=3)
    stored = mock_document_domains(3, cfg)
    assert stored[:6].tolist() == [0, 1, 2, 0, 1, 2]

    label_map = tmp_path / "map.yaml"
    label_map.write_text("domains: [x, y]\nmap:\n  0: x\n  1: null\n  2: y\n")
    mapped = mock_document_domains(3, LabelsConfig(label_map=str(label_map)))
    assert mapped[:6].tolist() == [0, -1, 1, 0, -1, 1]

    shuffled = mock_document_domains(3, LabelsConfig(control="random", random_seed=7))
    assert np.bincount(shuffled).tolist() == np.bincount(stored).tolist()
    assert (shuffled != stored).mean() > 0.5  # labels no longer follow the documents


def test_labelled_mock_samples_follow_their_documents():
    """Tokens of domain j lie in vocabulary band j; domain ids and weights follow segments."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    from megatron_edl.integration.dataset import DomainGPTDatasetConfig, DomainMockGPTDataset

    num_domains, seq = 3, 64
    config = DomainGPTDatasetConfig(
        random_seed=1,
        sequence_length=seq,
        split="100,0,0",
        tokenizer=NullTokenizer(vocab_size=1024),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        edl_num_domains=num_domains,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        DomainMockGPTDataset, [20, 0, 0], lambda: True, config
    ).build()
    band = train.dataset.band
    for i in range(20):
        sample = train[i]
        ids_S, w_S, tokens_S = sample["domain_ids"], sample["edl_weights"], sample["tokens"]
        assert ids_S.shape == w_S.shape == tokens_S.shape == (seq,)
        body = tokens_S != train.dataset.eod_token
        expected = (tokens_S[body] - 1) // band
        assert torch.equal(ids_S[body], expected), i
        # Each segment (maximal run of one document) has weights summing to 1.
        assert w_S.sum().item() == pytest.approx(round(w_S.sum().item()), abs=1e-5)
        assert w_S.sum() >= 1
