"""Domain-aware GPT datasets on real indexed data: sidecar labels, per-prefix mode, blends, cache.

Test corpora are written with megatron-core's ``IndexedDatasetBuilder`` and ``write_sidecar``.
Every token carries its document in its value (document ``i`` of a prefix is
``[base + i] * (L - 1) + [EOD]``), so a sample's tokens say which document each came from,
independently of the dataset's index arithmetic.
"""

from __future__ import annotations

import os
import re
import shutil
import struct

import numpy as np
import pytest
import torch
from megatron.core.datasets import gpt_dataset
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

from megatron_edl.config import EDLConfigError, LabelsConfig
from megatron_edl.core.segments import sample_token_labels
from megatron_edl.data.merge import VocabularyConflictError
from megatron_edl.data.sidecar import SidecarMismatchError, write_sidecar
from megatron_edl.integration.dataset import (
    DomainGPTDataset,
    DomainGPTDatasetConfig,
    DomainMockGPTDataset,
    DomainPerPrefixGPTDataset,
    PrefixDomains,
    blend_document_domains,
    resolve_blend_domains,
)

VOCAB = 1024
EOD = VOCAB - 1  # NullTokenizer's eod
SEQ = 32


def write_prefix(prefix, labels, vocabulary, *, base=1, seed=0, min_len=2, max_len=20):
    """A prefix of ``len(labels)`` documents; document i = [base + i] * (L - 1) + [EOD]."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i in range(len(labels)):
        length = int(rng.integers(min_len, max_len + 1))
        builder.add_document(np.array([base + i] * (length - 1) + [EOD]), [length])
    builder.finalize(f"{prefix}.idx")
    if vocabulary is not None:
        write_sidecar(prefix, np.asarray(labels), vocabulary)
    return str(prefix)


def make_config(tmp_path, cls=DomainGPTDatasetConfig, **kwargs):
    defaults = dict(
        random_seed=1,
        sequence_length=SEQ,
        split="100,0,0",
        tokenizer=NullTokenizer(vocab_size=VOCAB),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    defaults.update(kwargs)
    return cls(**defaults)


def build(dataset_cls, config, sizes):
    return BlendedMegatronDatasetBuilder(dataset_cls, sizes, lambda: True, config).build()


def reference_segments(dataset: GPTDataset, idx: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence id, segment number) of each of the S tokens of sample ``idx``.

    From the document/sample/shuffle indices and the sequence lengths: the flat token stream
    of the shuffled documents, cut at the sample's start.
    """
    j = dataset.shuffle_index[idx]
    (pos_beg, off_beg), (pos_end, _) = dataset.sample_index[j], dataset.sample_index[j + 1]
    docs = np.asarray(dataset.document_index[pos_beg : pos_end + 1])
    lengths = np.asarray(dataset.dataset.sequence_lengths)[docs]
    segment = np.repeat(np.arange(len(docs)), lengths)[off_beg : off_beg + SEQ]
    return docs[segment], segment


def check_sample(dataset: GPTDataset, idx: int, sample, loss_ids_N, base: int) -> tuple[int, int]:
    """Assert the sample's labels follow its tokens' documents; returns (segments, EOD tokens)."""
    docs_S, segment_S = reference_segments(dataset, idx)
    tokens_S = sample["tokens"].numpy()
    body_S = tokens_S != EOD
    # The reference agrees with the content: a token's value names its document.
    np.testing.assert_array_equal(tokens_S[body_S] - base, docs_S[body_S])
    expected_S = np.asarray(loss_ids_N)[docs_S]
    np.testing.assert_array_equal(sample["domain_ids"].numpy(), expected_S)
    weights_S = sample["edl_weights"].numpy()
    runs = np.bincount(segment_S)
    labelled_S = expected_S >= 0
    np.testing.assert_allclose(weights_S[labelled_S], 1.0 / runs[segment_S[labelled_S]], rtol=1e-6)
    assert (weights_S[~labelled_S] == 0).all()
    labelled_segments = len({s for s, lab in zip(segment_S, labelled_S, strict=True) if lab})
    assert weights_S.sum() == pytest.approx(labelled_segments, rel=1e-5)
    return len(runs), int((~body_S).sum())


def test_round_trip_every_token_labelled_by_its_document_in_every_split(tmp_path):
    labels = np.random.default_rng(3).integers(0, 3, size=120)
    prefix = write_prefix(tmp_path / "corpus", labels, {"en/science": 0, "zh/history": 1, "m": 2})
    config = make_config(tmp_path, blend=([prefix], None), split="70,15,15")
    datasets = build(DomainGPTDataset, config, [40, 8, 8])
    max_segments = eod_tokens = 0
    for dataset in datasets:
        assert isinstance(dataset, DomainGPTDataset) and len(dataset) >= 8
        for idx in range(len(dataset)):
            sample = dataset[idx]
            assert sample["domain_ids"].dtype == torch.int64
            assert sample["edl_weights"].dtype == torch.float32
            segments, eods = check_sample(dataset, idx, sample, labels, base=1)
            # All documents labelled: the weights sum to the number of segments.
            assert sample["edl_weights"].sum().item() == pytest.approx(segments, rel=1e-5)
            max_segments, eod_tokens = max(max_segments, segments), eod_tokens + eods
            docs_S, _ = reference_segments(dataset, idx)
            assert set(docs_S.tolist()) <= set(dataset.indices.tolist())  # split's documents
    assert max_segments >= 3 and eod_tokens > 0
    train, valid, test = datasets
    assert set(train.indices).isdisjoint(valid.indices) and set(valid.indices).isdisjoint(
        test.indices
    )


def test_samples_are_stock_gptdataset_samples_plus_labels(tmp_path):
    prefix = write_prefix(tmp_path / "corpus", np.arange(60) % 4, {str(i): i for i in range(4)})
    common = dict(blend=([prefix], None), split="90,10,0")
    ours = build(DomainGPTDataset, make_config(tmp_path, **common), [30, 4, 0])[0]
    stock = build(GPTDataset, make_config(tmp_path, GPTDatasetConfig, **common), [30, 4, 0])[0]
    assert len(ours) == len(stock)
    for idx in range(len(ours)):
        a, b = ours[idx], stock[idx]
        assert set(a) == set(b) | {"domain_ids", "edl_weights"}
        for key in b:
            assert torch.equal(a[key], b[key]), (idx, key)


def test_label_map_by_vocabulary_names_and_unlabelled_documents(tmp_path):
    vocabulary = {"en/science": 0, "en/ads": 1, "zh/history": 2, "math": 3}
    stored = np.random.default_rng(4).integers(-1, 4, size=80)  # -1: unlabelled
    prefix = write_prefix(tmp_path / "corpus", stored, vocabulary)
    label_map = tmp_path / "map.yaml"
    label_map.write_text(
        'domains: [english, chinese]\nmap:\n  "en/ads": null\n  "en/*": english\n'
        '  "zh/*": chinese\n  math: english\n'
    )
    edl = LabelsConfig(label_map=str(label_map), num_domains=2)
    config = make_config(tmp_path, blend=([prefix], None), edl_labels=edl)
    (train, _, _) = build(DomainGPTDataset, config, [30, 0, 0])
    loss = np.array([-1, 0, -1, 1, 0])[stored + 1]  # stored -1, 0, 1, 2, 3
    assert (loss == -1).any() and (loss == 0).any() and (loss == 1).any()
    for idx in range(len(train)):
        check_sample(train, idx, train[idx], loss, base=1)


def test_loss_ids_beyond_num_domains_are_refused(tmp_path):
    prefix = write_prefix(tmp_path / "corpus", np.arange(30) % 3, {"a": 0, "b": 1, "c": 2})
    config = make_config(tmp_path, blend=([prefix], None), edl_labels=LabelsConfig(num_domains=2))
    with pytest.raises(EDLConfigError, match="loss domain id 2 but the run has 2 domains"):
        build(DomainGPTDataset, config, [10, 0, 0])


def _check_blended(blended: BlendedDataset, expected_by_prefix: dict[str, np.ndarray], bases):
    seen = set()
    for i in range(len(blended)):
        sample = blended[i]
        dataset_id = int(sample["dataset_id"])
        mid = blended.datasets[dataset_id]
        local = int(blended.dataset_sample_index[i])
        check_sample(mid, local, sample, expected_by_prefix[mid.dataset_path], bases[dataset_id])
        seen.add(dataset_id)
    assert seen == set(range(len(blended.datasets)))


def test_blend_of_two_prefixes_reconciles_vocabularies_by_name(tmp_path):
    # The same name has different ids in the two sidecars: b is 1 in A but 0 in B.
    labels_a = np.arange(40) % 2  # a, b
    labels_b = np.arange(50) % 2  # b, c
    a = write_prefix(tmp_path / "A", labels_a, {"a": 0, "b": 1}, seed=1)
    b = write_prefix(tmp_path / "B", labels_b, {"b": 0, "c": 1}, base=500, seed=2)
    config = make_config(tmp_path, blend=([a, b], [0.5, 0.5]), split="90,10,0")
    train, valid, _ = build(DomainGPTDataset, config, [40, 6, 0])
    assert isinstance(train, BlendedDataset)
    domains = blend_document_domains(config, "sidecar")
    assert domains.vocabulary == {"a": 0, "b": 1, "c": 2} and domains.remapped == (b,)
    # What a launcher asks before building: the blend's vocabulary and stored domain count.
    stored = resolve_blend_domains([a, b], "sidecar")
    assert stored.vocabulary == domains.vocabulary and stored.num_stored_domains == 3
    expected = {a: labels_a, b: np.array([1, 2])[labels_b]}
    for blended in (train, valid):
        _check_blended(blended, expected, bases=[1, 500])


def test_irreconcilable_vocabularies_in_a_blend_are_refused(tmp_path):
    # A says x and y are one label (id 0); B gives them different ids.
    a = write_prefix(tmp_path / "A", np.zeros(20, int), {"x": 0, "y": 0})
    b = write_prefix(tmp_path / "B", np.arange(20) % 2, {"x": 0, "y": 1}, base=500)
    config = make_config(tmp_path, blend=([a, b], None))
    with pytest.raises(VocabularyConflictError, match=re.escape(f"{b}.domains")):
        build(DomainGPTDataset, config, [10, 0, 0])


def _per_prefix_corpus(tmp_path):
    a = write_prefix(tmp_path / "web_A", np.zeros(40), None, seed=1)
    b = write_prefix(tmp_path / "code_B", np.zeros(60), None, base=500, seed=2)
    domains = tmp_path / "domains.yaml"
    domains.write_text(f"{a}: web\n'*/code_*': code\n")
    return a, b, domains


def test_per_prefix_mode_gives_each_prefix_its_domain(tmp_path):
    a, b, domains = _per_prefix_corpus(tmp_path)
    config = make_config(
        tmp_path, blend=([a, b], [0.3, 0.7]), split="90,10,0", edl_domains_per_prefix=str(domains)
    )
    train, valid, _ = build(DomainPerPrefixGPTDataset, config, [40, 6, 0])
    assert PrefixDomains.from_yaml(domains).vocabulary == {"web": 0, "code": 1}
    expected = {a: np.zeros(40, int), b: np.ones(60, int)}
    for blended in (train, valid):
        _check_blended(blended, expected, bases=[1, 500])
        for i in range(len(blended)):
            sample = blended[i]
            assert (sample["domain_ids"] == int(sample["dataset_id"])).all()


def test_per_prefix_random_control_permutes_across_prefixes(tmp_path):
    a, b, domains = _per_prefix_corpus(tmp_path)
    config = make_config(
        tmp_path,
        blend=([a, b], None),
        edl_domains_per_prefix=str(domains),
        edl_labels=LabelsConfig(control="random", random_seed=5),
    )
    build(DomainPerPrefixGPTDataset, config, [20, 0, 0])
    domains_ = blend_document_domains(config, "prefix")
    loss_a, loss_b = domains_.loss_ids[a], domains_.loss_ids[b]
    # Same label frequencies over the blend (40 web, 60 code) ...
    assert np.bincount(np.concatenate([loss_a, loss_b])).tolist() == [40, 60]
    # ... but no longer one label per prefix (a permutation inside each prefix would be).
    assert len(set(loss_a.tolist())) == 2 and len(set(loss_b.tolist())) == 2


def test_random_control_applies_to_training_samples_only(tmp_path):
    """Validation samples carry the real domains: per-domain validation losses of a random-label
    run must be comparable with the baseline's (the EDL loss is not computed in evaluation)."""
    a, b, domains = _per_prefix_corpus(tmp_path)
    config = make_config(
        tmp_path,
        blend=([a, b], [0.5, 0.5]),
        split="80,20,0",
        edl_domains_per_prefix=str(domains),
        edl_labels=LabelsConfig(control="random", random_seed=5),
    )
    train, valid, _ = build(DomainPerPrefixGPTDataset, config, [30, 10, 0])
    for i in range(len(valid)):
        sample = valid[i]
        assert (sample["domain_ids"] == int(sample["dataset_id"])).all()
    mismatched = sum(
        int((train[i]["domain_ids"] != int(train[i]["dataset_id"])).any())
        for i in range(len(train))
    )
    assert mismatched > 0  # training samples do carry permuted labels


def test_per_prefix_file_errors_name_the_file_and_prefix(tmp_path):
    a, b, _ = _per_prefix_corpus(tmp_path)
    only_a = tmp_path / "only_a.yaml"
    only_a.write_text(f"{a}: web\n")
    config = make_config(tmp_path, blend=([a, b], None), edl_domains_per_prefix=str(only_a))
    with pytest.raises(EDLConfigError, match=f"{re.escape(str(only_a))}.*{re.escape(b)}"):
        build(DomainPerPrefixGPTDataset, config, [10, 0, 0])
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text(f"{a}: web\n{a}: code\n")
    with pytest.raises(EDLConfigError, match="duplicate key"):
        PrefixDomains.from_yaml(duplicate)
    with pytest.raises(EDLConfigError, match="domain must be a name or null"):
        PrefixDomains.from_dict({a: 3})
    no_file = make_config(tmp_path, blend=([a], None))
    with pytest.raises(EDLConfigError, match="--moe-edl-domains-per-prefix"):
        build(DomainPerPrefixGPTDataset, no_file, [10, 0, 0])


def test_cached_indices_are_reused_on_a_second_build(tmp_path, monkeypatch):
    a = write_prefix(tmp_path / "A", np.arange(50) % 3, {"x": 0, "y": 1, "z": 2})
    b = write_prefix(tmp_path / "B", np.arange(30) % 3, {"x": 0, "y": 1, "z": 2}, base=500)
    config = make_config(tmp_path, blend=([a, b], [0.5, 0.5]), split="80,20,0")
    first = build(DomainGPTDataset, config, [30, 6, 0])
    cache = tmp_path / "cache"
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    assert any("DomainGPTDataset" in p.name for p in files)
    assert any("BlendedDataset" in p.name for p in files)
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("indices rebuilt instead of loaded from the cache")

    monkeypatch.setattr(gpt_dataset, "_build_document_index", no_rebuild)
    monkeypatch.setattr(gpt_dataset, "_build_shuffle_index", no_rebuild)
    second = build(DomainGPTDataset, config, [30, 6, 0])
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    for x, y in zip(first[:2], second[:2], strict=True):
        for i in range(len(x)):
            assert all(torch.equal(x[i][k], y[i][k]) for k in ("tokens", "domain_ids")), i


def _patch_header_count(sidecar, value):
    data = bytearray(sidecar.read_bytes())
    struct.pack_into("<Q", data, 17, value)  # the sequence count field
    sidecar.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["edited_index", "edited_count", "truncated", "other_run"])
def test_sidecar_index_mismatch_is_a_named_error_at_load(tmp_path, damage):
    prefix = write_prefix(tmp_path / "corpus", np.arange(40) % 2, {"a": 0, "b": 1})
    sidecar = tmp_path / "corpus.domains"
    if damage == "edited_index":  # same document count, other tokens: the old sidecar is stale
        saved = sidecar.read_bytes()
        write_prefix(tmp_path / "corpus", np.arange(40) % 2, None, seed=9)
        sidecar.write_bytes(saved)
    elif damage == "edited_count":
        _patch_header_count(sidecar, 41)
    elif damage == "truncated":
        sidecar.write_bytes(sidecar.read_bytes()[:-7])
    else:  # a sidecar from another preprocessing run (another corpus of the same size)
        other = write_prefix(tmp_path / "other", np.arange(40) % 2, {"a": 0, "b": 1}, seed=5)
        shutil.copy(f"{other}.domains", sidecar)
    config = make_config(tmp_path, blend=([prefix], None))
    with pytest.raises(SidecarMismatchError, match=re.escape(str(sidecar))):
        build(DomainGPTDataset, config, [10, 0, 0])


def test_missing_sidecar_names_the_file_and_the_alternative(tmp_path):
    prefix = write_prefix(tmp_path / "corpus", np.arange(20) % 2, {"a": 0, "b": 1})
    os.remove(f"{prefix}.domains")
    config = make_config(tmp_path, blend=([prefix], None))
    with pytest.raises(FileNotFoundError, match=r"corpus\.domains.*--moe-edl-domains-per-prefix"):
        build(DomainGPTDataset, config, [10, 0, 0])


def test_blend_per_split_shares_one_label_space(tmp_path):
    a = write_prefix(tmp_path / "A", np.arange(40) % 2, {"a": 0, "b": 1}, seed=1)
    b = write_prefix(tmp_path / "B", np.arange(40) % 2, {"c": 0, "a": 1}, base=500, seed=2)
    config = make_config(tmp_path, split=None, blend_per_split=[([a], None), ([b], None), None])
    train, valid, test = build(DomainGPTDataset, config, [20, 10, 0])
    assert test is None
    expected_b = np.array([2, 0])[np.arange(40) % 2]  # c -> 2 (new), a -> 0 (A's id)
    for idx in range(len(valid)):
        check_sample(valid, idx, valid[idx], expected_b, base=500)
    for idx in range(len(train)):
        check_sample(train, idx, train[idx], np.arange(40) % 2, base=1)


def _per_fetch_labels(dataset, idx, sample) -> tuple[np.ndarray, np.ndarray]:
    """The labels by ``sample_token_labels`` from the fetched sample's own documents."""
    document_ids, lengths = dataset.sample_documents(idx)
    return sample_token_labels(
        segment_domains_K=dataset.document_domains(document_ids),
        segment_lengths_K=lengths,
        num_tokens=sample["tokens"].numel(),
        aggregation=dataset.config.edl_aggregation,
    )


@pytest.mark.parametrize("aggregation", ["segment", "token"])
@pytest.mark.parametrize("extra_token", [True, False])
def test_indexed_labels_equal_the_per_fetch_labels_bitwise(tmp_path, aggregation, extra_token):
    """Every sample's labels from the label index are those of the per-fetch arithmetic."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=150)
    prefix = write_prefix(tmp_path / "c", labels, {"a": 0, "b": 1, "c": 2}, max_len=70)
    config = make_config(
        tmp_path, blend=([prefix], None), split="80,20,0", edl_aggregation=aggregation,
        add_extra_token_to_sequence=extra_token,
    )  # fmt: skip
    mock_config = make_config(
        tmp_path, edl_aggregation=aggregation, add_extra_token_to_sequence=extra_token,
        edl_num_domains=3, sequence_length=64,
    )  # fmt: skip
    datasets = [*build(DomainGPTDataset, config, [60, 10, 0])[:2]]
    datasets.append(build(DomainMockGPTDataset, mock_config, [30, 0, 0])[0])
    multi_document = 0
    for dataset in datasets:
        for idx in range(min(len(dataset), 200)):  # the mock dataset holds many more
            sample = dataset[idx]
            want_ids, want_w = _per_fetch_labels(dataset, idx, sample)
            assert np.array_equal(sample["domain_ids"].numpy(), want_ids), idx
            got_w = sample["edl_weights"].numpy()
            assert np.array_equal(got_w.view(np.int32), want_w.view(np.int32)), idx
            multi_document += len(dataset.sample_documents(idx)[0]) > 1
        assert dataset._label_index is not None  # the index path ran
    assert multi_document > 10


def test_a_fetch_that_skips_the_document_query_is_refused(tmp_path, monkeypatch):
    """The labels read the documents ``GPTDataset.__getitem__`` queried for this very fetch
    (touch ``gpt-dataset-sample-documents``). An upgrade whose ``__getitem__`` no longer calls
    the query fails the fetch naming the touch, instead of labelling the sample with the
    documents of the fetch before."""
    prefix = write_prefix(tmp_path / "c", np.arange(40) % 2, {"a": 0, "b": 1})
    config = make_config(tmp_path, blend=([prefix], None), split="100,0,0")
    train = build(DomainGPTDataset, config, [10, 0, 0])[0]
    before = train[1]  # a normal fetch: the stash is this sample's
    assert train.sample_documents(1)[0].size >= 1 and before["domain_ids"].numel() > 0
    monkeypatch.setattr(GPTDataset, "__getitem__", lambda self, idx: dict(before))
    with pytest.raises(RuntimeError, match=r"did not call .*\(2\) \(got None\).*sample-documents"):
        train[2]
