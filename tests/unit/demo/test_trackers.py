"""megatron_edl.demo.trackers: a study report's per-layer numbers to TensorBoard (read back with
tensorboard's own event reader) and W&B (a recording stand-in for the wandb module)."""

from __future__ import annotations

import argparse
import json
import sys
import types

import pytest

from megatron_edl.demo import study as st
from megatron_edl.demo import trackers


def _layer(layer: int, mi: float, jsd: float, balance: float) -> dict:
    return {"layer": layer, "mi": mi, "jsd": jsd, "balance": balance}


def _report(tmp_path, *, per_layer: bool = True):
    runs = {}
    for arm, base in (("baseline", 0.01), ("edl", 0.2)):
        for seed in (1, 2):
            layers = [_layer(1, base, base / 2, 1.5), _layer(3, base * 3, base, 2.0)]
            run = {
                "valid_lm_loss": 4.0 + base + seed / 100,
                "valid_lm_loss_per_domain": {"code": 5.0, "math/latex": 1.0},
                "probe_mi": base * 2,
                "probe_jsd": float("nan"),  # not finite: left out
                "probe_balance": None,  # missing: left out
            }
            if per_layer:
                run["probe_per_layer"] = layers
            runs[f"{arm}-s{seed}"] = run
    data = {
        "seeds": [1, 2],
        "arms": {"baseline": ["--moe-edl-eval-per-domain"], "edl": ["--moe-edl-coeff", "0.1"]},
        "runs": runs,
        "quickstart": {"train_iters": 40},
    }
    path = tmp_path / "study.json"
    path.write_text(json.dumps(data))
    return path


def test_scalars_per_run_and_layer(tmp_path):
    runs = trackers.runs_from_study_json(_report(tmp_path))
    assert [r.name for r in runs] == ["baseline-s1", "baseline-s2", "edl-s1", "edl-s2"]
    edl2 = runs[3]
    assert (edl2.arm, edl2.seed, edl2.step, edl2.flags) == (
        "edl",
        2,
        40,
        ("--moe-edl-coeff", "0.1"),
    )
    assert edl2.scalars == {
        "valid/lm_loss": pytest.approx(4.22),
        "valid/lm_loss/code": 5.0,
        "valid/lm_loss/math/latex": 1.0,
        "probe/mi": pytest.approx(0.4),
        "probe/mi/layer_01": 0.2,
        "probe/jsd/layer_01": 0.1,
        "probe/load_max_over_mean/layer_01": 1.5,
        "probe/mi/layer_03": pytest.approx(0.6),
        "probe/jsd/layer_03": 0.2,
        "probe/load_max_over_mean/layer_03": 2.0,
    }


def test_old_report_and_missing_report_are_named(tmp_path):
    path = _report(tmp_path, per_layer=False)
    with pytest.raises(ValueError, match=r"study\.json: run baseline-s1 has no probe_per_layer"):
        trackers.runs_from_study_json(path)
    with pytest.raises(FileNotFoundError, match="no study report"):
        trackers.runs_from_study_json(tmp_path / "missing.json")


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_one_folder_per_run_and_no_duplicates(tmp_path):
    pytest.importorskip("tensorboard")
    runs = trackers.runs_from_study_json(_report(tmp_path))
    out = tmp_path / "tb"
    for _ in range(2):  # a second call replaces the first's points
        folders = trackers.write_tensorboard(runs, out)
    assert [f.name for f in folders] == [r.name for r in runs]
    for run, folder in zip(runs, folders, strict=True):
        scalars = read_scalars(folder)
        assert set(scalars) == set(run.scalars), folder
        for tag, value in run.scalars.items():
            assert scalars[tag] == [(40, pytest.approx(value))], (folder, tag)


def test_wandb_one_run_per_study_run(tmp_path, monkeypatch):
    calls = []

    class Run:
        def __init__(self, kwargs):
            self.kwargs = kwargs

        def log(self, values, step):
            calls.append(("log", self.kwargs["name"], values, step))

        def finish(self):
            calls.append(("finish", self.kwargs["name"]))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or Run(kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    runs = trackers.runs_from_study_json(_report(tmp_path))
    assert trackers.write_wandb(runs, "edl-study", save_dir=tmp_path / "wb") == 4
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [(i["name"], i["group"], i["project"]) for i in inits] == [
        (r.name, r.arm, "edl-study") for r in runs
    ]
    assert inits[2]["config"] == {"arm": "edl", "seed": 1, "flags": "--moe-edl-coeff 0.1"}
    logs = [c for c in calls if c[0] == "log"]
    assert [(c[1], c[3]) for c in logs] == [(r.name, 40) for r in runs]
    assert logs[0][2] == dict(runs[0].scalars)
    # every run finished before the next starts
    assert [c[0] for c in calls] == ["init", "log", "finish"] * 4


def test_missing_packages_are_named(tmp_path, monkeypatch):
    runs = trackers.runs_from_study_json(_report(tmp_path))
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(RuntimeError, match=r"--wandb-project p needs the wandb package"):
        trackers.write_wandb(runs, "p")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(RuntimeError, match=r"--tensorboard-dir .* needs the tensorboard package"):
        trackers.write_tensorboard(runs, tmp_path / "tb")


def test_study_cli_refuses_trackers_with_a_single_run(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("seeds: [1, 2, 3]\narms:\n  baseline: --moe-edl-eval-per-domain\n")
    argv = [str(path), "--workdir", str(tmp_path / "w"), "--run", "0", "--tensorboard-dir", "tb"]
    assert st.main(argv) == 1
    assert "use them with --report" in capsys.readouterr().err


def test_log_to_trackers_turns_package_errors_into_study_errors(tmp_path, monkeypatch):
    _report(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)
    args = argparse.Namespace(tensorboard_dir=None, wandb_project="p", wandb_save_dir=None)
    with pytest.raises(st.StudyError, match="needs the wandb package"):
        st.log_to_trackers(args, tmp_path)
    args.wandb_project = None
    st.log_to_trackers(args, tmp_path / "nowhere")  # nothing asked: nothing read
