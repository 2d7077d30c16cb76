"""GPT datasets whose samples carry per-token domain ids and EDL weights.

Megatron's ``GPTDataset.__getitem__`` knows which documents a packed sample spans (from
``_query_document_sample_shuffle_indices``) but discards that. The mixin here keeps the document
ids and per-document token counts of the sample being built, maps documents to domains, and adds
``domain_ids`` (int64 [S]) and ``edl_weights`` (fp32 [S]) to the sample (see
:mod:`megatron_edl.core.segments` for the weights). Everything else is stock.

``DomainMockGPTDataset`` is the labelled counterpart of ``--mock-data`` (smoke tests, CI): document
``i`` belongs to domain ``i % num_domains`` and its tokens come from that domain's band of the
vocabulary, so domains are visible in the content and routers can specialise.

Real data, through ``BlendedMegatronDatasetBuilder`` like stock ``GPTDataset`` (train/valid/test
splits, ``--data-path`` blends and per-split blends, index caching: the cached indices depend
only on the tokens, never on the labels):

* ``DomainGPTDataset``: each prefix's labels come from its ``<prefix>.domains`` sidecar
  (:mod:`megatron_edl.data.sidecar`), read and verified against the ``.idx`` when the prefix's
  low-level dataset is built, so a sidecar that does not belong to its index is a
  ``SidecarMismatchError`` naming the file before any sample is drawn.
* ``DomainPerPrefixGPTDataset``: no sidecar; every document of a prefix has that prefix's domain,
  from a YAML file (``PrefixDomains``, ``--moe-edl-domains-per-prefix``).
* ``DomainSFTDataset`` (``--sft``): Megatron's ``SFTDataset`` (JSONL conversations packed into
  THD samples), one domain per JSONL file of the blend from the same per-prefix YAML; a JSONL
  line is one "document" (its conversations share its domain), padding is unlabelled.

With ``--dataloader-inter-document-masking`` the GPT datasets above need nothing more: the labels
follow the documents whatever the attention sees.

Labels are resolved for the whole blend at once (``blend_document_domains``), once per build:
the prefixes of ``blend`` and ``blend_per_split`` in order of first appearance form one label
space. Sidecar vocabularies are reconciled by name (the merge tool's rules: the same name gets
the same id, prefixes whose ids differ are remapped, irreconcilable ones are refused), the label
map (``--moe-edl-label-map``; its name keys and globs see that union vocabulary, its integer
keys the union's ids: prefer names when vocabularies differ) maps stored ids to loss domains,
and the random control permutes the labels across *all* documents of the blend (a permutation
inside each prefix would change nothing when every prefix is one domain).

One reader per node (``resolve_blend_domains(..., per_node=True)``, the launcher's calls): the
launcher resolves the labels before ``torch.distributed`` exists (Megatron initialises it inside
``pretrain``), so no collective can share them. In a multi-process launch
(``LOCAL_RANK`` and ``WORLD_SIZE`` > 1 in the environment, as torchrun and the Slurm script set
them) local rank 0 reads the files (sidecars in full, the ``.idx`` fingerprints, SFT line counts)
and publishes the result, or its error, in a node-local file (:func:`shared_per_node`); the
other ranks of the node wait for it and return the same labels or raise the same error, so no
rank hangs and every rank stops on a bad file. They only ``stat`` the files (sizes and
modification times, the cache key: a changed file is a new key). The dataset builds reuse each
process's cached result (the launcher resolves the training labels and, under the random
control, the evaluation labels too), so no rank reads the files again.

The label sources (``LabelSource``, ``PrefixDomains``), ``BlendDomains``, the cache-key file
helpers and ``shared_per_node`` are in :mod:`megatron_edl.integration.domain_sources`; the blend
resolution and its cache are here, next to the datasets that call them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    MockGPTDataset,
    MockGPTLowLevelDataset,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split
from megatron.core.utils import log_single_rank
from megatron.training.datasets.sft_dataset import SFTDataset

from megatron_edl.config import EDLConfigError, LabelControl, LabelsConfig
from megatron_edl.core.labels import LabelMap, permute_document_labels
from megatron_edl.core.segments import SampleLabelIndex, sample_token_labels
from megatron_edl.data.merge import reconcile_vocabularies
from megatron_edl.data.sidecar import SidecarMismatchError, read_sidecar, sidecar_path
from megatron_edl.integration.domain_sources import (
    BlendDomains,
    LabelSource,
    PrefixDomains,
    blend_prefixes,
    check_named_ids,
    compact,
    compact_ids,
    file_state,
    label_files,
    sequence_count,
    shared_per_node,
    used_ids,
)
from megatron_edl.integration.internals import touch
from megatron_edl.integration.labels import DOMAIN_IDS_KEY, WEIGHTS_KEY

logger = logging.getLogger(__name__)


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

    edl_eval_document_domains: np.ndarray | None = None
    """The same for the validation and test splits, which never get the random control
    (:func:`evaluation_labels`); ``None``: ``edl_document_domains``."""

    edl_labels: LabelsConfig | None = None
    """The run's label options, for ``DomainGPTDataset``/``DomainPerPrefixGPTDataset``: the label
    map and the random control, and ``num_domains`` (loss ids must lie below it). ``None``: the
    (reconciled) stored ids are the loss ids."""

    edl_domains_per_prefix: str | None = None
    """YAML file of ``DomainPerPrefixGPTDataset``: blend prefix (path or glob) -> domain name
    (``--moe-edl-domains-per-prefix``; format: ``PrefixDomains``)."""


def loss_document_domains(
    stored_N: np.ndarray,
    labels: LabelsConfig,
    vocabulary: Mapping[str, int] | None = None,
) -> np.ndarray:
    """Loss domain ids of documents from their stored ids: label map, then the random control.

    The label map (``--moe-edl-label-map``) maps stored ids to loss domains (or -1); with
    ``--moe-edl-labels random`` the labelled documents' loss ids are permuted by a seeded random
    permutation (the paper's random-label ablation: same label frequencies, no relation to
    content).

    Args:
        stored_N: Stored label id of every document (-1: unlabelled).
        labels: The label map path, label source and seed.
        vocabulary: Stored label name -> id, for the label map's name keys and globs.

    Returns:
        int64 loss ids, one per document.
    """
    loss_N = stored_N
    if labels.label_map is not None:
        loss_N = LabelMap.from_yaml(labels.label_map, vocabulary=vocabulary).apply(stored_N)
    if labels.control == LabelControl.RANDOM:
        loss_N = permute_document_labels(loss_N, labels.random_seed)
    return np.asarray(loss_N, dtype=np.int64)


def evaluation_labels(labels: LabelsConfig | None) -> LabelsConfig | None:
    """The label options of the validation and test splits: the data's own labels.

    The random-label control (``--moe-edl-labels random``) permutes the labels the EDL loss sees
    in training; evaluation computes no EDL loss, and its per-domain losses must refer to the
    real domains, so validation and test samples carry the unpermuted loss ids (label map
    applied).
    """
    if labels is None or labels.control == LabelControl.DATA:
        return labels
    return dataclasses.replace(labels, control=LabelControl.DATA)


def check_mock_domains(num_domains: int, vocab_size: int | None) -> None:
    """Refuse a ``--moe-edl-mock-domains`` the labelled mock data cannot hold.

    Every domain needs documents (the mock data has :attr:`DomainMockGPTLowLevelDataset.size`)
    and a band of at least one token id (``vocab_size - 2`` ids are shared out; with more
    domains the tokens would run past the vocabulary and the embedding would fail in the first
    forward).

    Args:
        num_domains: ``--moe-edl-mock-domains``.
        vocab_size: The tokenizer's vocabulary size, or ``None`` when not known yet (the
            launcher knows it at start for ``NullTokenizer``: ``--vocab-size``).

    Raises:
        EDLConfigError: Naming the flag and the bound.
    """
    flag = "--moe-edl-mock-domains"
    if num_domains < 1:
        raise EDLConfigError(f"{flag} must be >= 1, got {num_domains}")
    documents = DomainMockGPTLowLevelDataset.size
    if num_domains > documents:
        raise EDLConfigError(
            f"{flag} {num_domains}: the mock data has {documents} documents, at most one domain "
            "per document"
        )
    if vocab_size is not None and num_domains > vocab_size - 2:
        raise EDLConfigError(
            f"{flag} {num_domains}: each mock domain needs its own band of token ids, and the "
            f"vocabulary ({vocab_size}, --vocab-size) holds at most {max(vocab_size - 2, 0)} "
            "bands"
        )


def mock_document_domains(num_stored_domains: int, labels: LabelsConfig) -> np.ndarray:
    """Loss domain of every document of the labelled mock data (stored id: document % D)."""
    stored_N = np.arange(DomainMockGPTLowLevelDataset.size, dtype=np.int64) % num_stored_domains
    return loss_document_domains(stored_N, labels)


# DomainLabelsMixin overrides a private method of GPTDataset (registered Megatron internal).
touch("gpt-dataset-sample-documents")


class DomainLabelsMixin:
    """Adds ``domain_ids``/``edl_weights`` to a ``GPTDataset`` subclass's samples.

    The labels of every sample are indexed once per process, at the first fetch, from Megatron's
    sample and document indices (``SampleLabelIndex``), so a fetch looks its sample's label runs
    up instead of redoing the segment arithmetic; the ``sample`` aggregation and the padding
    sample (``idx is None``) take the per-fetch path (``sample_token_labels``), with the same
    outputs.
    """

    _label_index: SampleLabelIndex | None = None

    def document_domains(self, document_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _sample_label_index(self) -> SampleLabelIndex | None:
        """The label index (built at the first call), or None for the ``sample`` aggregation."""
        if self._label_index is None and self.config.edl_aggregation in SampleLabelIndex.SUPPORTED:
            self._label_index = SampleLabelIndex(
                sample_index_N2=self.sample_index,
                document_index_M=self.document_index,
                document_lengths_L=self.dataset.sequence_lengths,
                document_domains_M=self.document_domains(np.asarray(self.document_index)),
                num_tokens=self.config.sequence_length,
                extra_token=int(self.config.add_extra_token_to_sequence),
                aggregation=self.config.edl_aggregation,
            )
        return self._label_index

    _sample_documents: tuple[int, np.ndarray, list[int]] | None = None

    def _query_document_sample_shuffle_indices(self, idx):
        text, document_ids, document_lengths = super()._query_document_sample_shuffle_indices(idx)
        # __getitem__ may edit document_lengths in place: keep a copy for the labels.
        self._sample_documents = (idx, np.asarray(document_ids), list(document_lengths))
        return text, document_ids, document_lengths

    def sample_documents(self, idx: int | None) -> tuple[np.ndarray, list[int]]:
        """The document ids and lengths of the sample ``idx`` fetched last (by ``__getitem__``).

        Raises:
            RuntimeError: Megatron's ``__getitem__`` did not call
                ``_query_document_sample_shuffle_indices`` for this ``idx`` (the order the
                ``gpt-dataset-sample-documents`` touch relies on changed).
        """
        wanted = 0 if idx is None else idx  # Megatron fetches sample 0 for a padding sample
        stashed = self._sample_documents
        if stashed is None or stashed[0] != wanted:
            raise RuntimeError(
                f"{type(self).__name__}[{idx}]: GPTDataset.__getitem__ did not call "
                f"_query_document_sample_shuffle_indices({wanted}) (got "
                f"{None if stashed is None else stashed[0]}); see the touch "
                "gpt-dataset-sample-documents in megatron_edl/integration/internals.py"
            )
        return stashed[1], stashed[2]

    def __getitem__(self, idx):
        self._sample_documents = None
        sample = super().__getitem__(idx)  # loads Megatron's indices on the first call
        document_ids, lengths = self.sample_documents(idx)
        index = self._sample_label_index() if idx is not None else None
        if index is not None:
            domain_ids_S, weights_S = index.labels(int(self.shuffle_index[idx]))
            sample[DOMAIN_IDS_KEY] = torch.from_numpy(domain_ids_S)
            sample[WEIGHTS_KEY] = torch.from_numpy(weights_S)
            return sample
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
        check_mock_domains(num_domains, self.vocab_size)
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
        if self.index_split != Split.train and self.config.edl_eval_document_domains is not None:
            domains_N = self.config.edl_eval_document_domains
        if domains_N is None:
            return document_ids.astype(np.int64) % self.config.edl_num_domains
        return domains_N[document_ids]


# ----------------------------------------------------------------------------------------------
# Indexed (real) data: blend label resolution (sources: domain_sources)
# ----------------------------------------------------------------------------------------------


def read_sidecar_labels(prefix: str) -> tuple[np.ndarray, dict[str, int]]:
    try:
        return read_sidecar(prefix)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{sidecar_path(prefix)}: no domain sidecar for dataset prefix {prefix!r}; "
            "preprocess it with domain labels, or label whole prefixes with "
            "--moe-edl-domains-per-prefix"
        ) from err


_BLEND_LOCK = threading.Lock()
_BLEND_CACHE: dict[tuple, BlendDomains] = {}
# Training and evaluation labels of one blend (they differ under the random control).
_BLEND_CACHE_SIZE = 2


def blend_document_domains(
    config: DomainGPTDatasetConfig,
    source: LabelSource | str,
    extra: str | None = None,
    *,
    split: Split = Split.train,
) -> BlendDomains:
    """Stored and loss domain ids of every sequence of every prefix of the config's blend.

    Args:
        config: The dataset config (``edl_labels``, ``edl_domains_per_prefix``, the blends).
        source: ``sidecar`` or ``prefix`` (:class:`LabelSource`).
        extra: A prefix to include if the blends lack it.
        split: The split the labels are for (validation and test: :func:`evaluation_labels`).

    Returns:
        The :class:`BlendDomains` (see :func:`resolve_blend_domains`).

    Raises:
        TypeError: If ``config`` is not a ``DomainGPTDatasetConfig``.
        FileNotFoundError, SidecarMismatchError, VocabularyConflictError, EDLConfigError: see
            :func:`resolve_blend_domains`.
    """
    if not isinstance(config, DomainGPTDatasetConfig):
        raise TypeError(f"labelled datasets need a DomainGPTDatasetConfig, got {type(config)}")
    return resolve_blend_domains(
        blend_prefixes(config, extra),
        source,
        domains_per_prefix=config.edl_domains_per_prefix,
        labels=config.edl_labels if split == Split.train else evaluation_labels(config.edl_labels),
    )


def resolve_blend_domains(
    prefixes: tuple[str, ...] | list[str],
    source: LabelSource | str,
    *,
    domains_per_prefix: str | None = None,
    labels: LabelsConfig | None = None,
    per_node: bool = False,
) -> BlendDomains:
    """Stored and loss domain ids of every sequence of the given prefixes, resolved together.

    Computed once and reused (thread-safe): the result is cached under the prefixes, the size
    and modification time of every file read, and the label options, so a changed file is read
    again; only the latest result is kept. The launcher can call it with ``labels=None``
    to learn the blend's vocabulary (for the label map's names) and ``num_stored_domains``.

    Args:
        prefixes: The dataset prefixes, in blend order (their order fixes the remapping and
            the random permutation).
        source: ``sidecar`` or ``prefix`` (:class:`LabelSource`).
        domains_per_prefix: The per-prefix YAML file (needed for ``prefix``).
        labels: Label map and random control; ``None``: loss ids = stored ids.
        per_node: Read the files on one rank per node (:func:`shared_per_node`); every local
            rank must then make the same call (the launcher's calls, made on every rank).

    Returns:
        The :class:`BlendDomains`.

    Raises:
        FileNotFoundError: A sidecar is missing (the message names it).
        SidecarMismatchError: A sidecar does not match its index (names the file and field).
        VocabularyConflictError: The prefixes' vocabularies cannot be reconciled.
        EDLConfigError: No prefixes, a missing or bad per-prefix file or label map, or an
            uncovered label.
    """
    source = LabelSource(source)
    prefixes = tuple(prefixes)
    if not prefixes:
        raise EDLConfigError("labelled indexed datasets need a blend (--data-path)")
    if source is LabelSource.PREFIX and domains_per_prefix is None:
        raise EDLConfigError(
            "DomainPerPrefixGPTDataset needs edl_domains_per_prefix (--moe-edl-domains-per-prefix)"
        )
    cfg = labels
    key = (
        source,
        prefixes,
        tuple(file_state(f) for p in prefixes for f in label_files(p, source)),
        file_state(domains_per_prefix if source is LabelSource.PREFIX else None),
        None if cfg is None else (file_state(cfg.label_map), str(cfg.control), cfg.random_seed),
    )
    with _BLEND_LOCK:
        if key not in _BLEND_CACHE:
            while len(_BLEND_CACHE) >= _BLEND_CACHE_SIZE:  # do not hold old labels
                _BLEND_CACHE.pop(next(iter(_BLEND_CACHE)))
            resolve = functools.partial(_resolve_blend, prefixes, source, domains_per_prefix, cfg)
            _BLEND_CACHE[key] = shared_per_node(resolve, key) if per_node else resolve()
        return _BLEND_CACHE[key]


def _resolve_blend(
    prefixes: tuple[str, ...],
    source: LabelSource,
    per_prefix_file: str | None,
    cfg: LabelsConfig | None,
) -> BlendDomains:
    remapped: tuple[str, ...] = ()
    if source is LabelSource.SIDECAR:
        labels = [read_sidecar_labels(p) for p in prefixes]
        for prefix, (ids, own_vocabulary) in zip(prefixes, labels, strict=True):
            check_named_ids(ids, own_vocabulary, str(sidecar_path(prefix)))
        merge = reconcile_vocabularies(
            [vocabulary for _, vocabulary in labels],
            [str(sidecar_path(p)) for p in prefixes],
            [ids for ids, _ in labels],
        )
        vocabulary = merge.vocabulary
        stored = [merge.remap(i, ids) for i, (ids, _) in enumerate(labels)]
        remapped = tuple(prefixes[i] for i in merge.changed)
        if remapped:
            log_single_rank(
                logger,
                logging.WARNING,
                "domain sidecars of the blend have different vocabularies; the ids of "
                f"{', '.join(remapped)} were remapped by label name to {vocabulary}",
            )
    else:
        assert per_prefix_file is not None
        table = PrefixDomains.from_yaml(per_prefix_file)
        vocabulary = table.vocabulary
        stored = [np.full(sequence_count(p), table.stored_id(p), dtype=np.int64) for p in prefixes]

    loss = stored
    loss_domains = None
    if cfg is not None:
        # One call over the whole blend: the random control permutes across prefixes.
        loss_all = np.concatenate(stored) if stored else np.zeros(0, np.int64)
        if cfg.label_map is None:  # the loss domains: the stored ids in use, compacted
            used = used_ids(loss_all)  # ids are named by the vocabulary (checked above)
            loss_domains = tuple(used.tolist())
            loss_all = compact_ids(loss_all, used)
        loss_all = loss_document_domains(loss_all, cfg, vocabulary)
        loss = np.split(loss_all, np.cumsum([len(ids) for ids in stored])[:-1])
    return BlendDomains(
        prefixes=prefixes,
        vocabulary=dict(vocabulary),
        stored_ids={p: compact(ids) for p, ids in zip(prefixes, stored, strict=True)},
        loss_ids={p: compact(np.asarray(ids)) for p, ids in zip(prefixes, loss, strict=True)},
        remapped=remapped,
        loss_domains=loss_domains,
    )


class DomainGPTDataset(DomainLabelsMixin, GPTDataset):
    """``GPTDataset`` whose samples carry ``domain_ids``/``edl_weights`` from domain sidecars.

    Build it like ``GPTDataset``, through ``BlendedMegatronDatasetBuilder`` with a
    ``DomainGPTDatasetConfig``; everything but the two extra keys is stock (same samples, same
    order, same index caching). Sequence ids map to stored ids through the prefix's sidecar, and
    to loss ids through ``blend_document_domains`` (see the module docstring).
    """

    label_source: ClassVar[LabelSource] = LabelSource.SIDECAR

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: str | None,
        indexed_indices: np.ndarray,
        num_samples: int | None,
        index_split: Split,
        config: DomainGPTDatasetConfig,
    ) -> None:
        self._document_domains_N = _loss_ids_of(
            type(self),
            dataset_path,
            GPTDataset.numel_low_level_dataset(indexed_dataset),
            config,
            split=index_split,
        )
        super().__init__(
            indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config
        )

    @classmethod
    def build_low_level_dataset(
        cls, dataset_path: str, config: DomainGPTDatasetConfig
    ) -> IndexedDataset:
        """Stock ``IndexedDataset``, after loading and verifying the blend's labels.

        Raises:
            FileNotFoundError, SidecarMismatchError, VocabularyConflictError, EDLConfigError: see
                :func:`blend_document_domains`.
        """
        dataset = GPTDataset.build_low_level_dataset(dataset_path, config)
        _loss_ids_of(cls, dataset_path, GPTDataset.numel_low_level_dataset(dataset), config)
        return dataset

    def document_domains(self, document_ids: np.ndarray) -> np.ndarray:
        """Loss domain ids of low-level sequences (GPTDataset's document ids)."""
        return self._document_domains_N[document_ids].astype(np.int64)


class DomainPerPrefixGPTDataset(DomainGPTDataset):
    """``DomainGPTDataset`` without sidecars: each blend prefix is one domain.

    The domains come from ``config.edl_domains_per_prefix`` (format: :class:`PrefixDomains`);
    every sequence of a prefix gets its domain, so segments and weights work as with sidecars.
    """

    label_source: ClassVar[LabelSource] = LabelSource.PREFIX


class DomainSFTDataset(SFTDataset):
    """Megatron's ``SFTDataset`` whose packed samples carry ``domain_ids``/``edl_weights``.

    Each JSONL file of the blend is one domain (``config.edl_domains_per_prefix``, format:
    :class:`PrefixDomains`; label map and random control apply per line). In a sample, every
    conversation of the line is one segment of the line's domain (``cu_seqlens``), and the pad
    tokens ``SFTDataset`` inserts (CP granularity, end of pack) are unlabelled.
    """

    label_source: ClassVar[LabelSource] = LabelSource.PREFIX

    def __init__(
        self,
        dataset,
        dataset_path: str | None,
        indices: np.ndarray,
        num_samples: int | None,
        index_split: Split,
        config: DomainGPTDatasetConfig,
    ) -> None:
        self._document_domains_N = _loss_ids_of(
            type(self), dataset_path, len(dataset), config, split=index_split
        )
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)

    @classmethod
    def build_low_level_dataset(cls, dataset_path: str, config: DomainGPTDatasetConfig):
        """Megatron's JSONL reader, after resolving and checking the blend's labels."""
        dataset = SFTDataset.build_low_level_dataset(dataset_path, config)
        _loss_ids_of(cls, dataset_path, len(dataset), config)
        return dataset

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = super().__getitem__(idx)
        line = int(self.indices[idx % len(self.indices)])
        domain = int(self._document_domains_N[line])
        num_tokens = sample["tokens"].numel()
        cu_S = sample["cu_seqlens"].tolist()
        cu_S = cu_S[: cu_S.index(num_tokens) + 1]  # drop the collation padding
        is_pad_S = (sample["tokens"] == self.config.tokenizer.pad).tolist()
        domains_K: list[int] = []
        lengths_K: list[int] = []
        for start, end in zip(cu_S[:-1], cu_S[1:], strict=True):
            # SFTDataset pads only at the end of a conversation: [tokens][pads] (like its loss
            # mask, a token equal to the pad id counts as padding).
            pads = 0
            while pads < end - start and is_pad_S[end - 1 - pads]:
                pads += 1
            domains_K += [domain, -1]
            lengths_K += [end - start - pads, pads]
        domain_ids_S, weights_S = sample_token_labels(
            segment_domains_K=domains_K,
            segment_lengths_K=lengths_K,
            num_tokens=num_tokens,
            aggregation=self.config.edl_aggregation,
        )
        sample[DOMAIN_IDS_KEY] = torch.from_numpy(domain_ids_S)
        sample[WEIGHTS_KEY] = torch.from_numpy(weights_S)
        return sample


def _loss_ids_of(
    cls: type,
    dataset_path: str | None,
    num_sequences: int,
    config: DomainGPTDatasetConfig,
    *,
    split: Split = Split.train,
) -> np.ndarray:
    if dataset_path is None:
        raise ValueError(f"{cls.__name__} needs a dataset prefix (it has no mock mode)")
    domains = blend_document_domains(config, cls.label_source, extra=dataset_path, split=split)
    loss_N = domains.loss_ids[dataset_path]
    if loss_N.shape != (num_sequences,):
        raise SidecarMismatchError(
            f"{dataset_path}: {loss_N.shape[0]} domain labels for {num_sequences} sequences"
        )
    cfg = config.edl_labels
    if cfg is not None and cfg.num_domains is not None and loss_N.size:
        top = int(loss_N.max())
        if top >= cfg.num_domains:
            raise EDLConfigError(
                f"{dataset_path}: loss domain id {top} but the run has {cfg.num_domains} "
                "domains; set a label map (--moe-edl-label-map) or check the data's vocabulary"
            )
    return loss_N
