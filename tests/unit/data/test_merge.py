"""Merge of labelled shards (tokens, labels, vocabularies) and the inspect/verify tool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_edl.data import inspect as inspect_module
from megatron_edl.data import merge as merge_module
from megatron_edl.data.inspect import inspect_dataset, show_document
from megatron_edl.data.merge import (
    MergeError,
    VocabularyConflictError,
    merge_datasets,
    reconcile_vocabularies,
)
from megatron_edl.data.sidecar import SidecarMismatchError, read_sidecar, write_sidecar

REPO = Path(__file__).resolve().parents[3]
EOD = 1023


def random_documents(n, seed):
    rng = np.random.default_rng(seed)
    return [
        np.concatenate([rng.integers(0, EOD, size=int(rng.integers(1, 30))), [EOD]])
        for _ in range(n)
    ]


def write_prefix(prefix, documents, labels, vocabulary, dtype=np.uint16):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    if vocabulary is not None:
        write_sidecar(prefix, np.asarray(labels), vocabulary)
    return str(prefix)


def dataset_files(prefix):
    return {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx", ".domains")}


VOCAB = {"en/science": 0, "zh/history": 1, "math": 2}


@pytest.fixture
def three_shards(tmp_path):
    """Three shards and the one-pass build of their concatenation."""
    documents = random_documents(45, seed=0)
    labels = np.random.default_rng(1).integers(-1, 3, size=45)
    cuts = [0, 10, 31, 45]
    shards = [
        write_prefix(tmp_path / f"shard{i}", documents[a:b], labels[a:b], VOCAB)
        for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))
    ]
    whole = write_prefix(tmp_path / "whole", documents, labels, VOCAB)
    return shards, whole, documents, labels


def test_merge_of_three_shards_equals_one_pass_build(three_shards, tmp_path):
    shards, whole, documents, labels = three_shards
    result = merge_datasets(shards, tmp_path / "out" / "merged")
    merged = str(tmp_path / "out" / "merged")
    assert (result.sequences, result.documents, result.remapped) == (45, 45, ())
    assert result.tokens == sum(len(d) for d in documents)
    # Tokens: the same bytes as one pass, and stock IndexedDataset reads the same documents.
    assert dataset_files(merged) == dataset_files(whole)
    ds = IndexedDataset(merged)
    assert len(ds) == 45
    for i, doc in enumerate(documents):
        np.testing.assert_array_equal(ds[i], doc)
    # Labels and vocabulary, through the verifying reader.
    ids, vocabulary = read_sidecar(merged)
    np.testing.assert_array_equal(ids, labels)
    assert vocabulary == VOCAB
    assert sorted(os.listdir(tmp_path / "out")) == ["merged.bin", "merged.domains", "merged.idx"]


def test_merge_reconciles_vocabularies_by_name(tmp_path):
    vocabularies = [{"a": 0, "b": 1}, {"b": 0, "c": 1}, {"a": 0, "c": 5}]
    shard_labels = [[0, 1, 1, -1], [0, 1, 1, 0, 0], [5, 0, 5]]
    shards = []
    for i, (vocabulary, labels) in enumerate(zip(vocabularies, shard_labels, strict=True)):
        docs = random_documents(len(labels), seed=10 + i)
        shards.append(write_prefix(tmp_path / f"s{i}", docs, labels, vocabulary))
    result = merge_datasets(shards, tmp_path / "merged")
    assert result.vocabulary == {"a": 0, "b": 1, "c": 2}
    assert result.remapped == (shards[1], shards[2])
    ids, vocabulary = read_sidecar(tmp_path / "merged")
    name_of = {i: n for n, i in vocabulary.items()}
    expected = []
    for vocab, labels in zip(vocabularies, shard_labels, strict=True):
        shard_name_of = {i: n for n, i in vocab.items()}
        expected += [None if x == -1 else shard_name_of[x] for x in labels]
    assert [None if x == -1 else name_of[int(x)] for x in ids] == expected


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 5), max_size=5),
        min_size=1,
        max_size=4,
    )
)
def test_reconciled_vocabulary_keeps_every_name_and_separates_labels(vocabularies):
    sources = [f"s{i}" for i in range(len(vocabularies))]
    try:
        merged = reconcile_vocabularies(vocabularies, sources)
    except VocabularyConflictError as err:
        # Refused only when a source splits names that an earlier source made aliases.
        assert "collapse" in str(err) or "share id" in str(err)
        assert any(len(set(v.values())) < len(v) for v in vocabularies)
        return
    for vocabulary, remap in zip(vocabularies, merged.remaps, strict=True):
        for name, stored in vocabulary.items():
            assert merged.vocabulary[name] == remap[stored]  # same name -> same merged id
        assert len(set(remap.values())) == len(remap)  # distinct labels stay distinct
    if all(v == vocabularies[0] for v in vocabularies):
        assert merged.vocabulary == vocabularies[0] and merged.changed == ()


def test_merge_refuses_inconsistent_input_naming_the_shard(three_shards, tmp_path):
    shards, _, documents, _ = three_shards
    docs = random_documents(3, seed=7)

    bad = write_prefix(tmp_path / "bad", docs, [0, 0, 0], {"b": 0, "a": -2})
    with pytest.raises(VocabularyConflictError, match=r"bad\.domains.*malformed.*'a': -2"):
        merge_datasets([shards[0], bad], tmp_path / "m1")

    alias = write_prefix(tmp_path / "alias", docs, [2, 2, 2], {"math": 2, "calculus": 2})
    split = write_prefix(tmp_path / "split", docs, [0, 1, 0], {"math": 0, "calculus": 1})
    with pytest.raises(VocabularyConflictError, match=r"split\.domains.*collapse"):
        merge_datasets([alias, split], tmp_path / "m2")

    wide = write_prefix(tmp_path / "wide", docs, [0, 0, 0], VOCAB, dtype=np.int32)
    with pytest.raises(MergeError, match="different token dtypes"):
        merge_datasets([shards[0], wide], tmp_path / "m3")

    other = write_prefix(tmp_path / "other", docs, [0, 0, 0], {"x": 0})
    with pytest.raises(VocabularyConflictError, match="require_same_vocabulary"):
        merge_datasets([shards[0], other], tmp_path / "m4", require_same_vocabulary=True)

    os.remove(f"{other}.domains")
    with pytest.raises(MergeError, match=r"other\.domains: missing domain sidecar"):
        merge_datasets([shards[0], other], tmp_path / "m5")

    write_sidecar(other, np.zeros(3, int), {"x": 0})
    Path(f"{other}.domains").write_bytes(Path(f"{other}.domains").read_bytes()[:-1])
    with pytest.raises(SidecarMismatchError, match=r"other\.domains"):
        merge_datasets([shards[0], other], tmp_path / "m6")

    with pytest.raises(MergeError, match="listed twice"):
        merge_datasets([shards[0], shards[0]], tmp_path / "m7")
    assert not list(tmp_path.glob("m[0-9]*"))  # nothing written by a refused merge


def test_existing_output_is_refused_then_replaced_atomically(three_shards, tmp_path, monkeypatch):
    shards, whole, _, _ = three_shards
    out = tmp_path / "merged"
    merge_datasets(shards[:1], out)
    before = dataset_files(out)
    with pytest.raises(MergeError, match="output exists"):
        merge_datasets(shards, out)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(merge_module, "write_sidecar", crash)
    with pytest.raises(MergeError, match="merged: writing the merged dataset failed: disk full"):
        merge_datasets(shards, out, overwrite=True)
    assert dataset_files(out) == before  # the old dataset is untouched
    assert sorted(p.name for p in tmp_path.glob("merged*")) == [
        "merged.bin",
        "merged.domains",
        "merged.idx",
    ]  # and no temporary file is left
    monkeypatch.undo()
    merge_datasets(shards, out, overwrite=True)
    assert dataset_files(out) == dataset_files(whole)


def test_inspect_counts_per_domain_and_checks_consistency(three_shards, tmp_path):
    _, whole, documents, labels = three_shards
    report = inspect_dataset(whole)
    assert report.ok, report.problems
    assert (report.sequences, report.documents) == (45, 45)
    assert report.tokens == sum(len(d) for d in documents)
    lengths = np.array([len(d) for d in documents])
    got = {d.domain_id: (d.names, d.sequences, d.tokens) for d in report.domains}
    for stored, names in [(-1, ()), (0, ("en/science",)), (1, ("zh/history",)), (2, ("math",))]:
        mask = labels == stored
        assert got[stored] == (names, int(mask.sum()), int(lengths[mask].sum()))
    assert "consistent" in report.format() and "zh/history" in report.format()

    view = show_document(whole, 7, decode=lambda ids: " ".join(map(str, ids)))
    assert view.tokens == documents[7].tolist() and view.domain_id == labels[7]
    assert view.text == " ".join(map(str, documents[7]))
    with pytest.raises(IndexError, match="out of range; it has 45 sequences"):
        show_document(whole, 45)


def test_inspect_reports_each_inconsistency(three_shards, tmp_path):
    shards, _, _, _ = three_shards
    docs = random_documents(4, seed=3)

    unnamed = write_prefix(tmp_path / "unnamed", docs, [0, 1, 2, 2], {"a": 0, "c": 2})
    assert any("[1] have no name" in p for p in inspect_dataset(unnamed).problems)

    truncated = write_prefix(tmp_path / "truncated", docs, [0, 0, 0, 0], {"a": 0})
    Path(f"{truncated}.bin").write_bytes(Path(f"{truncated}.bin").read_bytes()[:-2])
    assert any("truncated.bin" in p and "bytes" in p for p in inspect_dataset(truncated).problems)

    stale = write_prefix(tmp_path / "stale", docs, [0, 0, 0, 0], {"a": 0})
    write_prefix(tmp_path / "stale", random_documents(4, seed=4), None, None)
    (problem,) = inspect_dataset(stale).problems
    assert "stale.domains was written for another" in problem

    missing = write_prefix(tmp_path / "missing", docs, None, None)
    assert inspect_dataset(missing).problems == (f"{missing}.domains: no domain sidecar",)
    assert inspect_dataset(shards[0]).ok


def test_inspect_command_line_with_megatron_tokenizer_flags(three_shards, tmp_path, capsys):
    _, whole, documents, labels = three_shards
    argv = [whole, "--show", "3", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024"]
    assert inspect_module.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["problems"] == [] and out["sequences"] == 45
    (shown,) = out["shown"]
    assert shown["tokens"] == documents[3].tolist() and shown["domain_id"] == labels[3]
    assert shown["text"] == " ".join(map(str, documents[3]))  # NullTokenizer's detokenize

    Path(f"{whole}.domains").write_bytes(Path(f"{whole}.domains").read_bytes()[:-1])
    assert inspect_module.main([whole]) == 1
    assert "1 problem(s)" in capsys.readouterr().out


def test_merge_command_line(three_shards, tmp_path, capsys):
    shards, whole, _, _ = three_shards
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for shard in shards:
        for suffix in (".bin", ".idx", ".domains"):
            os.rename(shard + suffix, shard_dir / (Path(shard).name + suffix))
    out = tmp_path / "cli" / "merged"
    cmd = [sys.executable, str(REPO / "tools" / "merge_datasets.py")]
    proc = subprocess.run(
        [*cmd, "--input", str(shard_dir), "--output-prefix", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged 3 shards" in proc.stdout and "45 sequences" in proc.stdout
    assert dataset_files(out) == dataset_files(whole)
    # The directory's shards were merged in name order (shard0, shard1, shard2), as built.
    # Refusals: in-process (a second interpreter would only re-import megatron).
    assert merge_module.main(["--input", str(shard_dir), "--output-prefix", str(out)]) == 1
    assert "output exists" in capsys.readouterr().err
