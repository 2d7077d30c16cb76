"""Hostile input to the merge (issue 26, items 4, 10, 11 and 15): every refusal is one line
naming the file, the inputs are never touched and nothing is left under the final names."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_edl.data import merge as merge_module
from megatron_edl.data.merge import MergeError, find_prefixes, merge_datasets
from megatron_edl.data.sidecar import SidecarMismatchError, read_sidecar, write_sidecar

EOD = 1023
VOCAB = {"a": 0, "b": 1}
SIDECAR_HEADER = 81  # bytes before the sidecar's JSON block (see sidecar.py)


def write_prefix(prefix, num_documents, seed, labels=None):
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(num_documents):
        doc = np.concatenate([rng.integers(0, EOD, size=int(rng.integers(1, 20))), [EOD]])
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    if labels is None:
        labels = rng.integers(-1, 2, size=num_documents)
    write_sidecar(prefix, np.asarray(labels), VOCAB)
    return str(prefix)


def files_of(prefix):
    return {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx", ".domains")}


def outputs(directory):
    """Every name in ``directory`` (the temporary names included)."""
    return sorted(p.name for p in Path(directory).iterdir())


@pytest.fixture
def shards(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return [write_prefix(data / f"shard{i}", 5 + i, seed=i) for i in range(2)]


def refused(capsys, argv):
    """Run the command line; return its one error line."""
    assert merge_module.main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("merge_datasets: error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


# -- item 4: paths compared by realpath, duplicates and folder-like prefixes refused ----------


def test_output_reached_through_a_symlinked_folder_is_refused(shards, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "data", target_is_directory=True)
    before = files_of(shards[0])
    with pytest.raises(MergeError, match=r"shard0.*cannot also be the output"):
        merge_datasets(shards, link / "shard0", overwrite=True)
    assert files_of(shards[0]) == before
    assert outputs(tmp_path / "data") == sorted(
        f"shard{i}{s}" for i in range(2) for s in (".bin", ".domains", ".idx")
    )


def test_output_file_that_is_a_symlink_to_an_input_is_refused(shards, tmp_path):
    out = tmp_path / "out"
    for suffix in (".bin", ".idx", ".domains"):
        Path(f"{out}{suffix}").symlink_to(f"{shards[1]}{suffix}")
    with pytest.raises(MergeError, match=r"out\.bin is .*shard1\.bin"):
        merge_datasets(shards, out, overwrite=True)


def test_the_same_shard_through_two_paths_is_refused_naming_both(shards, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "data", target_is_directory=True)
    other = str(link / "shard0")
    with pytest.raises(MergeError, match="listed twice") as info:
        merge_datasets([shards[0], shards[1], other], tmp_path / "merged")
    assert shards[0] in str(info.value) and other in str(info.value)
    assert not list(tmp_path.glob("merged*"))


@pytest.mark.parametrize("form", ["slash", "existing folder", "dot"])
def test_folder_like_output_prefix_is_refused(shards, tmp_path, capsys, form):
    folder = tmp_path / "out"
    folder.mkdir()
    output = {"slash": f"{folder}/", "existing folder": str(folder), "dot": f"{folder}/."}[form]
    line = refused(capsys, ["--input", *shards, "--output-prefix", output])
    assert "names a folder" in line and str(folder) in line
    assert outputs(folder) == []
    assert outputs(tmp_path) == ["data", "out"]


# -- item 10: corrupt ids are refused, not turned into "unlabelled" ----------------------------


def _set_stored_id(prefix, index, value):
    path = Path(f"{prefix}.domains")
    data = bytearray(path.read_bytes())
    (block_len,) = struct.unpack_from("<Q", data, SIDECAR_HEADER - 8)
    assert data[16] == 3  # int16 ids
    struct.pack_into("<h", data, SIDECAR_HEADER + block_len + 2 * index, value)
    path.write_bytes(bytes(data))


def test_sidecar_id_below_minus_one_is_refused_naming_file_and_document(shards, tmp_path, capsys):
    _set_stored_id(shards[1], 3, -2)
    with pytest.raises(SidecarMismatchError, match=r"shard1\.domains: .*sequence 3.* -2"):
        merge_datasets(shards, tmp_path / "merged")
    line = refused(capsys, ["--input", *shards, "--output-prefix", str(tmp_path / "merged")])
    assert "shard1.domains" in line and "sequence 3" in line
    assert not list(tmp_path.glob("merged*"))


# -- item 11: Megatron's cache/ folder beside a shard -------------------------------------------


def test_shard_with_megatron_cache_folder_is_a_prefix_not_a_folder(shards, tmp_path, capsys):
    # GPTDataset writes its indices to <path_prefix>/cache/GPTDataset_indices/.
    for prefix in shards:
        cache = Path(prefix) / "cache" / "GPTDataset_indices"
        cache.mkdir(parents=True)
        (cache / "abc-GPTDataset-train-document_index.npy").write_bytes(b"x")
    assert find_prefixes(shards) == shards
    assert find_prefixes([str(tmp_path / "data")]) == shards
    out = tmp_path / "merged"
    assert merge_module.main(["--input", *shards, "--output-prefix", str(out)]) == 0
    # The merged dataset is trained on too; replacing it keeps working.
    (out / "cache" / "GPTDataset_indices").mkdir(parents=True)
    argv = ["--input", *shards, "--output-prefix", str(out), "--overwrite"]
    assert merge_module.main(argv) == 0, capsys.readouterr().err
    ids, _ = read_sidecar(out)
    assert ids.shape == (11,)


def test_folder_with_an_idx_beside_it_and_shards_inside_is_ambiguous(shards, tmp_path):
    inner = Path(shards[0])
    inner.mkdir()
    write_prefix(inner / "x", 2, seed=9)
    with pytest.raises(MergeError, match=r"shard0 is both a dataset prefix.*and a folder"):
        find_prefixes([shards[0]])


# -- item 15: output paths, file kinds, disk full, empty shards, damaged sidecar JSON -----------


def test_output_below_a_file_is_refused_naming_the_file(shards, tmp_path, capsys):
    blocker = tmp_path / "plain"
    blocker.write_text("not a folder")
    line = refused(capsys, ["--input", *shards, "--output-prefix", f"{blocker}/sub/merged"])
    assert f"{blocker} is a file, not a folder" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_a_read_only_folder_is_refused(shards, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        line = refused(capsys, ["--input", *shards, "--output-prefix", f"{folder}/merged"])
    finally:
        folder.chmod(0o755)
    assert f"{folder}: folder is not writable" in line
    assert outputs(folder) == []


def test_permission_denied_while_writing_is_one_line_and_leaves_nothing(
    shards, tmp_path, capsys, monkeypatch
):
    # Stands in for the read-only folder where the tests run as root (root may write anywhere).
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(merge_module, "IndexedDatasetBuilder", denied)
    line = refused(capsys, ["--input", *shards, "--output-prefix", str(tmp_path / "merged")])
    assert "Permission denied" in line and str(tmp_path / "merged") in line
    assert outputs(tmp_path) == ["data"]


def test_idx_that_is_a_folder_is_refused_for_shard_and_output(shards, tmp_path, capsys):
    bad = tmp_path / "data" / "dir"
    write_prefix(bad, 2, seed=5)
    os.remove(f"{bad}.idx")
    os.mkdir(f"{bad}.idx")
    line = refused(capsys, ["--input", shards[0], str(bad), "--output-prefix", str(tmp_path / "m")])
    assert f"{bad}.idx is a folder, not a file" in line
    # The output's .idx is a folder: refused even with --overwrite, the folder left alone.
    out = tmp_path / "out"
    os.mkdir(f"{out}.idx")
    argv = ["--input", *shards, "--output-prefix", str(out), "--overwrite"]
    line = refused(capsys, argv)
    assert f"{out}.idx is a folder" in line
    assert outputs(tmp_path) == ["data", "out.idx"]


@pytest.mark.parametrize("where", ["tokens", "sidecar"])
def test_disk_full_is_one_line_and_leaves_no_partial_output(
    shards, tmp_path, capsys, monkeypatch, where
):
    out = tmp_path / "merged"
    merge_datasets(shards[:1], out)
    before = files_of(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "tokens":
        monkeypatch.setattr(IndexedDatasetBuilder, "add_index", full)
    else:
        monkeypatch.setattr(merge_module, "write_sidecar", full)
    line = refused(capsys, ["--input", *shards, "--output-prefix", str(out), "--overwrite"])
    assert "No space left on device" in line and str(out) in line
    assert files_of(out) == before  # the old dataset is untouched
    assert outputs(tmp_path) == ["data", "merged.bin", "merged.domains", "merged.idx"]


def test_empty_shard_adds_nothing_and_all_empty_is_refused_naming_it(shards, tmp_path, capsys):
    empty = write_prefix(tmp_path / "data" / "empty", 0, seed=3)
    other = write_prefix(tmp_path / "data" / "empty2", 0, seed=4)
    assert os.path.getsize(f"{empty}.bin") == 0
    merge_datasets([shards[0]], tmp_path / "alone")
    result = merge_datasets([empty, shards[0], other], tmp_path / "with")
    assert (result.sequences, result.documents) == (5, 5)
    assert files_of(tmp_path / "with") == files_of(tmp_path / "alone")
    line = refused(capsys, ["--input", empty, "--output-prefix", str(tmp_path / "nothing")])
    assert f"{empty}: empty shard (0 sequences)" in line and ".idx" not in line
    assert not list(tmp_path.glob("nothing*"))


def test_truncated_idx_and_short_bin_of_a_shard_are_named(shards, tmp_path, capsys):
    out = str(tmp_path / "m")
    idx = Path(f"{shards[1]}.idx")
    whole = idx.read_bytes()
    idx.write_bytes(whole[:-9])
    line = refused(capsys, ["--input", *shards, "--output-prefix", out])
    assert f"{shards[1]}.idx: truncated" in line
    idx.write_bytes(whole)
    binary = Path(f"{shards[1]}.bin")
    binary.write_bytes(binary.read_bytes()[:-2])
    line = refused(capsys, ["--input", *shards, "--output-prefix", out])
    assert f"{shards[1]}.bin:" in line and "bytes" in line
    assert not list(tmp_path.glob("m*"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b.replace(b'"vocabulary"', b'"vocabularx"'),
        lambda b: b.replace(b'"vocabulary"', b'"vocabul\xffry"'),
        lambda b: b.replace(b"{", b"[", 1),
    ],
    ids=["key", "utf-8", "syntax"],
)
def test_damaged_sidecar_json_names_the_file(shards, tmp_path, capsys, damage):
    path = Path(f"{shards[1]}.domains")
    data = path.read_bytes()
    (block_len,) = struct.unpack_from("<Q", data, SIDECAR_HEADER - 8)
    block = data[SIDECAR_HEADER : SIDECAR_HEADER + block_len]
    damaged = damage(block)
    assert len(damaged) == len(block) and damaged != block
    path.write_bytes(data[:SIDECAR_HEADER] + damaged + data[SIDECAR_HEADER + block_len :])
    line = refused(capsys, ["--input", *shards, "--output-prefix", str(tmp_path / "m")])
    assert f"{path}:" in line and "JSON block" in line
    assert not list(tmp_path.glob("m*"))
