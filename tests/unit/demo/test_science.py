"""docs/science.md's tables equal the ones regenerated from the committed raw runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_edl.demo import science

ROOT = Path(__file__).resolve().parents[3]


def test_committed_tables_equal_the_regenerated_ones():
    stale = science.update_document(ROOT / science.DOCUMENT, ROOT / science.RESULTS_DIR, check=True)
    assert stale == [], f"run: python -m megatron_edl.demo.science tables ({stale})"


def test_a_changed_run_makes_its_table_stale_and_tables_rewrites_it(tmp_path):
    results = tmp_path / "science"
    shutil.copytree(ROOT / science.RESULTS_DIR, results)
    document = tmp_path / "science.md"
    shutil.copy(ROOT / science.DOCUMENT, document)
    path = results / "fresh_seeds.json"
    data = json.loads(path.read_text())
    data["runs"]["baseline-s4"]["valid_lm_loss"] += 0.5
    path.write_text(json.dumps(data))
    assert science.update_document(document, results, check=True) == ["fresh_seeds"]
    assert science.main(["tables", "--document", str(document), "--results", str(results)]) == 0
    assert science.update_document(document, results, check=True) == []
    assert document.read_text() != (ROOT / science.DOCUMENT).read_text()
