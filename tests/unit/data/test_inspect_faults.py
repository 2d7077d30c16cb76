"""Damaged datasets given to the inspect tool (issue 26, item 14): each damage is one problem
line naming the file, exit status 1, no traceback (megatron-core's ``__del__`` ones included)."""

from __future__ import annotations

import gc
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_edl.data import inspect as inspect_module
from megatron_edl.data.inspect import inspect_dataset
from megatron_edl.data.sidecar import (
    IndexFileError,
    SidecarMismatchError,
    read_index_header,
    read_sidecar,
    write_sidecar,
)

SIDECAR_HEADER = 81  # bytes before the sidecar's JSON block (see sidecar.py)


@pytest.fixture
def dataset(tmp_path):
    prefix = tmp_path / "ds"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for n in (3, 5, 2, 4):
        builder.add_document(np.arange(n, dtype=np.uint16), [n])
    builder.finalize(f"{prefix}.idx")
    write_sidecar(prefix, np.array([0, 1, -1, 1]), {"code": 0, "math": 1})
    return str(prefix)


@pytest.fixture
def unraisable(monkeypatch):
    """Exceptions Python could not raise (from ``__del__``), recorded instead of printed."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


def inspected(prefix, capsys, unraisable):
    """Run the command line; return its problem lines (and check there is no traceback)."""
    status = inspect_module.main([prefix])
    gc.collect()
    captured = capsys.readouterr()
    assert status == 1
    assert not unraisable, [u.exc_value for u in unraisable]
    assert "Traceback" not in captured.out + captured.err
    return [line[4:] for line in captured.out.splitlines() if line.startswith("  - ")]


def _patch_block(prefix, damage):
    path = Path(f"{prefix}.domains")
    data = path.read_bytes()
    (block_len,) = struct.unpack_from("<Q", data, SIDECAR_HEADER - 8)
    block = data[SIDECAR_HEADER : SIDECAR_HEADER + block_len]
    damaged = damage(block)
    assert len(damaged) == len(block) and damaged != block
    path.write_bytes(data[:SIDECAR_HEADER] + damaged + data[SIDECAR_HEADER + block_len :])
    return path


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda b: b.replace(b'"vocabulary"', b'"vocabularx"'), 'no "vocabulary" object'),
        (lambda b: b.replace(b'"vocabulary"', b'"vocabul\xffry"'), "not UTF-8"),
        (lambda b: b.replace(b"{", b"[", 1), "not valid JSON"),
        (lambda b: b"[" + b" " * (len(b) - 2) + b"]", 'no "vocabulary" object'),
    ],
    ids=["key", "utf-8", "syntax", "list"],
)
def test_flipped_bytes_in_the_sidecar_json_are_one_problem(
    dataset, capsys, unraisable, damage, what
):
    path = _patch_block(dataset, damage)
    (problem,) = inspected(dataset, capsys, unraisable)
    assert problem.startswith(f"{path}: ") and what in problem and "damaged" in problem
    with pytest.raises(SidecarMismatchError, match=f"^{re.escape(str(path))}: "):
        read_sidecar(dataset)


def test_id_below_minus_one_is_one_problem_naming_the_sequence(dataset, capsys, unraisable):
    path = Path(f"{dataset}.domains")
    data = bytearray(path.read_bytes())
    (block_len,) = struct.unpack_from("<Q", data, SIDECAR_HEADER - 8)
    struct.pack_into("<h", data, SIDECAR_HEADER + block_len + 2 * 2, -7)
    path.write_bytes(bytes(data))
    (problem,) = inspected(dataset, capsys, unraisable)
    assert problem.startswith(f"{path}: sequence 2") and "domain id -7, below -1" in problem


@pytest.mark.parametrize("cut", [1, 9, 40, 60])
def test_truncated_idx_is_one_problem_without_del_tracebacks(dataset, capsys, unraisable, cut):
    idx = Path(f"{dataset}.idx")
    idx.write_bytes(idx.read_bytes()[:-cut])
    (problem,) = inspected(dataset, capsys, unraisable)
    assert problem.startswith(f"{idx}: ")
    assert "truncated" in problem or "not a Megatron .idx" in problem
    with pytest.raises(IndexFileError, match=f"^{re.escape(str(idx))}: "):
        read_index_header(idx)


def test_empty_bin_and_folder_idx_are_one_line(dataset, capsys, unraisable):
    Path(f"{dataset}.bin").write_bytes(b"")
    (problem,) = inspected(dataset, capsys, unraisable)
    assert problem.startswith(f"{dataset}.bin: empty")

    Path(f"{dataset}.idx").unlink()
    Path(f"{dataset}.idx").mkdir()
    assert inspect_module.main([dataset]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"inspect_dataset: error: {dataset}.idx is a folder, not a file"


def test_an_intact_dataset_still_inspects_as_consistent(dataset):
    report = inspect_dataset(dataset)
    assert report.ok, report.problems
    assert [(d.domain_id, d.sequences) for d in report.domains] == [(-1, 1), (0, 1), (1, 2)]
