"""GPT datasets whose samples carry per-token domain ids and EDL weights.

Megatron's ``GPTDataset.__getitem__`` knows which documents a packed sample spans (from
``_query_document_sample_shuffle_indices``) but discards that. The mixin here keeps the document
ids and per-document token counts of the sample being built, maps documents to domains, and adds
``domain_ids`` (int64 [S]) and ``edl_weights`` (fp32 [S]) to the sample (see
:mod:`megatron_edl.core.segments` for the weights). Everything else is stock.

``DomainMockGPTDataset`` is the labelled counterpart of ``--mock-data`` (smoke tests, CI): document
``i`` belongs to domain ``i % num_domains`` and its tokens come from that domain's band of the
vocabulary, so domains are visible in the content and routers can specialise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import (
    GPTDatasetConfig,
    MockGPTDataset,
    MockGPTLowLevelDataset,
)

from megatron_edl.config import EDLConfig, EDLLabels
from megatron_edl.core.labels import LabelMap, permute_document_labels
from megatron_edl.core.segments import sample_token_labels
from megatron_edl.integration.labels import DOMAIN_IDS_KEY, WEIGHTS_KEY


@dataclasses.dataclass(kw_only=True)
class DomainGPTDatasetConfig(GPTDatasetConfig):
    """``GPTDatasetConfig`` plus what the labelled datasets need."""

    edl_aggregation: str = "segment"
    """Token weighting: ``segment``, ``token`` or ``sample`` (``--moe-edl-aggregation``)."""

    edl_num_domains: int = 1
    """Number of stored domains of the mock data (``--moe-edl-mock-domains``)."""

    edl_document_domains: np.ndarray | None = None
    """Loss domain of every low-level document (label map and random control applied); ``None``
    means the stored ids are the loss ids."""


def loss_document_domains(stored_N: np.ndarray, edl_config: EDLConfig) -> np.ndarray:
    """Loss domain ids of documents from their stored ids: label map, then the random control.

    The label map (``--moe-edl-label-map``) maps stored ids to loss domains (or -1); with
    ``--moe-edl-labels random`` the labelled documents' loss ids are permuted by a seeded random
    permutation (the paper's random-label ablation: same label frequencies, no relation to
    content).
    """
    loss_N = stored_N
    if edl_config.label_map is not None:
        loss_N = LabelMap.from_yaml(edl_config.label_map).apply(stored_N)
    if edl_config.labels == EDLLabels.RANDOM:
        loss_N = permute_document_labels(loss_N, edl_config.random_seed)
    return np.asarray(loss_N, dtype=np.int64)


def mock_document_domains(num_stored_domains: int, edl_config: EDLConfig) -> np.ndarray:
    """Loss domain of every document of the labelled mock data (stored id: document % D)."""
    stored_N = np.arange(DomainMockGPTLowLevelDataset.size, dtype=np.int64) % num_stored_domains
    return loss_document_domains(stored_N, edl_config)


class DomainLabelsMixin:
    """Adds ``domain_ids``/``edl_weights`` to a ``GPTDataset`` subclass's samples."""

    def document_domains(self, document_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _query_document_sample_shuffle_indices(self, idx):
        text, document_ids, document_lengths = super()._query_document_sample_shuffle_indices(idx)
        # __getitem__ may edit document_lengths in place: keep a copy for the labels.
        self._sample_documents = (np.asarray(document_ids), list(document_lengths))
        return text, document_ids, document_lengths

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        document_ids, lengths = self._sample_documents
        if idx is None:  # a padding sample: nothing in it is labelled
            domains = np.full(len(document_ids), -1, dtype=np.int64)
        else:
            domains = self.document_domains(document_ids)
        domain_ids_S, weights_S = sample_token_labels(
            segment_domains_K=domains,
            segment_lengths_K=lengths,
            num_tokens=sample["tokens"].numel(),
            aggregation=self.config.edl_aggregation,
        )
        sample[DOMAIN_IDS_KEY] = torch.from_numpy(domain_ids_S)
        sample[WEIGHTS_KEY] = torch.from_numpy(weights_S)
        return sample


class DomainMockGPTLowLevelDataset(MockGPTLowLevelDataset):
    """Mock documents whose tokens lie in a vocabulary band per domain (document i: i % D)."""

    def __init__(self, tokenizer, num_domains: int) -> None:
        super().__init__(tokenizer)
        if num_domains < 1:
            raise ValueError(f"--moe-edl-mock-domains must be >= 1, got {num_domains}")
        self.num_domains = num_domains
        self.band = max(1, (self.vocab_size - 2) // num_domains)

    def __getitem__(self, idx: int) -> np.ndarray:
        length = int(self.sequence_lengths[idx])
        domain = idx % self.num_domains
        body = 1 + domain * self.band + np.arange(length - 1) % self.band
        return np.concatenate([body, [self.eod_token]]).astype(np.int64)


class DomainMockGPTDataset(DomainLabelsMixin, MockGPTDataset):
    """``MockGPTDataset`` with domain labels (see the module docstring)."""

    @staticmethod
    def build_low_level_dataset(dataset_path, config: DomainGPTDatasetConfig):
        return DomainMockGPTLowLevelDataset(config.tokenizer, config.edl_num_domains)

    def document_domains(self, document_ids: np.ndarray) -> np.ndarray:
        domains_N = self.config.edl_document_domains
        if domains_N is None:
            return document_ids.astype(np.int64) % self.config.edl_num_domains
        return domains_N[document_ids]
