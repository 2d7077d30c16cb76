"""docs/launching.md's table of GPU-only settings: one row per setting, every cell "tested on CPU"
naming tests that exist, "refused" quoting the message, or "not run"."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## GPU-only settings: tested on CPU, refused, or not run"
# The settings issue 24 lists, each found by a phrase of its row's first cell.
SETTINGS = (
    "TE spec", "grouped GEMM", "permute fusion", "router fusion", "FP8", "fp32 router",
    "alltoall", "allgather", "DeepEP", "HybridEP", "overlap", "shared experts", "recompute",
    "CUDA graphs", "torch.compile", "distributed optimizer", "Megatron-FSDP", "aux loss", "MTP",
)  # fmt: skip
VERDICTS = ("tested on CPU", "refused: ", "not run", "same tests as variance", "does not apply")


def _rows() -> list[list[str]]:
    text = (ROOT / "docs" / "launching.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0] == "| setting | EDL | variance | orthogonality |"
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def _node_ids(cell: str) -> list[str]:
    """The test node ids a cell names: ``path::test[param]``, then ``::test`` of the same file
    and ``[param]`` of the same test."""
    ids, path, test = [], None, None
    for token in re.findall(r"`([^`]+)`", cell):
        m = re.fullmatch(r"((?:unit|e2e)/[\w/]+\.py)?(?:::(\w+))?(\[[\w-]+\])?", token)
        if not m or not any(m.groups()):
            continue
        path = m[1] or path
        test = m[2] or (test if not m[1] else None)
        if path and test:
            ids.append(f"tests/{path}::{test}{m[3] or ''}")
    return ids


def test_every_gpu_only_setting_has_one_row_with_a_cell_per_loss():
    rows = _rows()
    assert all(len(row) == 4 for row in rows), [row[0] for row in rows if len(row) != 4]
    for setting in SETTINGS:
        assert [row[0] for row in rows if setting in row[0]], setting


def test_every_cell_is_tested_refused_or_not_run():
    for setting, *cells in _rows():
        for cell in cells:
            assert cell.startswith(VERDICTS), (setting, cell)
            if cell.startswith("tested"):
                assert _node_ids(cell), (setting, cell)  # every tested cell names its test


def test_every_named_test_exists():
    ids = sorted({i for row in _rows() for cell in row[1:] for i in _node_ids(cell)})
    assert len(ids) > 20
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
