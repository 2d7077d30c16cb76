"""Damaged routing-statistics dumps given to the report (issue 26, items 10 and 17): a skipped
dump is named and counted in one warning line; a damaged one is one error line naming the file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_edl.analysis import report
from megatron_edl.analysis.routing_stats import UnreadableDumpWarning, load_run, write_stats
from tests.helpers.routing_stats_helpers import specialised_loads, stats_from_loads

DOMAINS = ("web", "code", "math")


def _write_run(directory: Path, steps=(10, 20, 30)) -> list[Path]:
    tokens_LD = np.array([[30.0, 20.0, 10.0]] * 2)
    return [
        write_stats(
            stats_from_loads(specialised_loads(2, 3, 4, 0.3), tokens_LD, domains=DOMAINS, step=s),
            directory,
        )
        for s in steps
    ]


def _report(tmp_path, run, capsys):
    status = report.main(["--out", str(tmp_path / "out"), f"run={run}"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return status, captured.err.strip().splitlines()


def test_truncated_and_empty_dumps_are_named_and_counted(tmp_path, capsys):
    run = tmp_path / "run"
    dumps = _write_run(run)
    dumps[0].write_text("")
    dumps[1].write_bytes(dumps[1].read_bytes()[:40])
    (run / "notes.json").write_text('{"not": "a dump"}')  # other JSON: not a dump, not warned

    status, lines = _report(tmp_path, run, capsys)
    assert status == 0
    (warning,) = lines
    assert warning.startswith(f"warning: {run}: skipped 2 unreadable dump file(s)")
    assert dumps[0].name in warning and dumps[1].name in warning
    with open(tmp_path / "out" / "series.csv") as f:
        assert {row["step"] for row in csv.DictReader(f)} == {"30"}

    with pytest.warns(UnreadableDumpWarning, match="skipped 2"):
        (stats,) = load_run(run)
    assert stats.step == 30


@pytest.mark.parametrize("cut", [0, 10, 200, -20])
def test_truncated_npz_is_one_error_naming_it(tmp_path, capsys, cut):
    run = tmp_path / "run"
    dumps = _write_run(run)
    npz = dumps[1].with_suffix(".npz")
    data = npz.read_bytes()
    npz.write_bytes(data[:cut])
    status, lines = _report(tmp_path, run, capsys)
    assert status == 1
    (line,) = lines
    assert line.startswith(f"error: {npz}: not a readable .npz archive"), line


def test_missing_npz_is_one_error_naming_it(tmp_path, capsys):
    run = tmp_path / "run"
    dumps = _write_run(run)
    npz = dumps[2].with_suffix(".npz")
    npz.unlink()
    status, lines = _report(tmp_path, run, capsys)
    assert (status, lines) == (1, [f"error: {npz}: missing (the arrays of {dumps[2]})"])


@pytest.mark.parametrize(
    ("field", "value"),
    [("layers", 5), ("topk", None), ("step", [10]), ("domains", 3), ("run", 7), ("step", None)],
)
def test_metadata_of_the_wrong_type_is_one_error_naming_the_file(tmp_path, capsys, field, value):
    run = tmp_path / "run"
    dumps = _write_run(run)
    meta = json.loads(dumps[1].read_text())
    meta[field] = value
    dumps[1].write_text(json.dumps(meta))
    status, lines = _report(tmp_path, run, capsys)
    assert status == 1
    (line,) = lines
    assert line.startswith(f"error: {dumps[1]}: bad metadata"), line


def test_missing_metadata_field_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    dumps = _write_run(run)
    meta = json.loads(dumps[0].read_text())
    del meta["num_experts"]
    dumps[0].write_text(json.dumps(meta))
    status, lines = _report(tmp_path, run, capsys)
    assert (status, lines) == (1, [f"error: {dumps[0]}: metadata field 'num_experts' is missing"])
