"""The stamp machinery of megatron_edl.demo.stages: one fingerprint per stage whatever the spelling
of the workdir, stamps of the earlier spelling still reused, and a reuse-only pass that neither runs
nor deletes anything; the study's ``--report`` built on it never trains."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from megatron_edl.demo import stages as sg
from megatron_edl.demo import study as st


def _context(workdir) -> sg.Context:
    return sg.Context(config=sg.QuickstartConfig(workdir=Path(workdir)), log=lambda _: None)


def _stage(calls: list[str]) -> sg.Stage:
    """A stage whose inputs hold paths under the workdir, like a training stage's flags."""
    return sg.Stage(
        "train:toy",
        lambda c: {"args": ["--save", os.fspath(c.workdir / "runs" / "toy"), "--lr", "1e-3"]},
        lambda c: calls.append("ran") or {"loss": 1.0},
        lambda c: [],
    )


def test_relative_and_absolute_workdir_give_one_fingerprint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = sg.stage_fingerprints(_stage([]), _context("runs/w"))[0]
    absolute = sg.stage_fingerprints(_stage([]), _context(tmp_path / "runs" / "w"))[0]
    other = sg.stage_fingerprints(_stage([]), _context("runs/v"))[0]
    assert relative == absolute
    # the workdir's name itself is not hashed; what is under it is
    assert other == relative
    assert (
        sg.stage_fingerprints(_stage([]), _context("runs/w"))[0]
        != sg.stage_fingerprints(
            sg.Stage("train:toy", lambda c: {"args": ["--lr", "1e-3"]}, lambda c: {}, lambda c: []),
            _context("runs/w"),
        )[0]
    )


def _legacy_fingerprint(stage: sg.Stage, ctx: sg.Context) -> str:
    """How stamps were hashed before the normalisation: the workdir as spelled."""
    payload = {"version": sg.STAMP_VERSION, "stage": stage.name, "inputs": stage.inputs(ctx)}
    payload["after"] = {}
    text = json.dumps(payload, sort_keys=True, default=os.fspath)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("written_as", ["relative", "absolute"])
def test_a_stamp_of_either_spelling_is_reused_by_the_other(tmp_path, monkeypatch, written_as):
    monkeypatch.chdir(tmp_path)
    spelled = {"relative": "runs/w", "absolute": os.fspath(tmp_path / "runs" / "w")}
    writer = _context(spelled[written_as])
    reader = _context(spelled["absolute" if written_as == "relative" else "relative"])
    legacy = _legacy_fingerprint(_stage([]), writer)
    stamp = sg.stamp_path(writer, _stage([]))
    stamp.parent.mkdir(parents=True)
    record = {"fingerprint": legacy, "seconds": 1.0, "cpu_seconds": 1.0, "result": {"loss": 2.0}}
    stamp.write_text(json.dumps(record))
    calls: list[str] = []
    assert sg.run_stage(_stage(calls), reader, 1, 1) == {"loss": 2.0}
    assert calls == [] and reader.fingerprints["train:toy"] == legacy  # what later stages hash


def test_reuse_only_neither_runs_nor_deletes_a_stale_stamp(tmp_path):
    ctx = _context(tmp_path / "w")
    stamp = sg.stamp_path(ctx, _stage([]))
    stamp.parent.mkdir(parents=True)
    stale = {"fingerprint": "0" * 64, "seconds": 1.0, "cpu_seconds": 1.0, "result": {}}
    stamp.write_text(json.dumps(stale))
    calls: list[str] = []
    assert sg.run_stage(_stage(calls), ctx, 1, 1, reuse_only=True) is None
    assert calls == [] and json.loads(stamp.read_text()) == stale
    # without reuse_only the stale stage runs and its stamp gets the canonical fingerprint
    assert sg.run_stage(_stage(calls), ctx, 1, 1) == {"loss": 1.0} and calls == ["ran"]
    assert json.loads(stamp.read_text())["fingerprint"] == sg.stage_fingerprints(_stage([]), ctx)[0]


def test_report_names_stale_runs_instead_of_training_them(tmp_path, monkeypatch):
    path = tmp_path / "study.yaml"
    path.write_text("seeds: [1, 2, 3]\narms:\n  baseline: --moe-edl-eval-per-domain\n")
    study = st.load_study(path, tmp_path / "w")
    ran: list[str] = []

    def every_stamp_matches(stage, ctx, index, total, *, reuse_only=False):
        if stage.name.startswith("train:baseline-s2"):
            assert reuse_only, "--report asked to train"
            return None
        ran.append(stage.name)
        return {}

    monkeypatch.setattr(st.qs, "run_stage", every_stamp_matches)
    monkeypatch.setattr(st.qs, "stamp_path", lambda ctx, stage: tmp_path)  # "evaluated"
    with pytest.raises(st.StudyError, match=r"stale .*train:baseline-s2"):
        st.run_study(study, only="report")
    assert "study-report" not in ran and "train:baseline-s1" in ran
