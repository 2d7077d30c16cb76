"""The study runner (megatron_edl.demo.study): file validation, the runs, mean ± SE by hand, and the
whole study end to end at tiny size (resumable: a second call trains nothing)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from megatron_edl.demo import study as st
from tests.unit.demo.test_quickstart import TINY_MODEL
from tests.unit.demo.test_trackers import read_scalars


def _write(tmp_path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_runs_are_arms_times_seeds_with_the_seed_last(tmp_path):
    path = _write(
        tmp_path,
        "seeds: [3, 1]\narms:\n  base: --moe-edl-eval-per-domain\n"
        "  rnd: [--moe-edl-coeff, '0.1', --moe-edl-labels, random]\n"
        "quickstart:\n  train_iters: 7\n  train_args: --num-layers 2\n",
    )
    study = st.load_study(path, tmp_path / "w")
    assert study.quickstart.train_iters == 7
    assert study.quickstart.extra_train_args == ("--num-layers", "2")
    runs = st.study_runs(study)
    assert [r.name for r in runs] == ["base-s3", "base-s1", "rnd-s3", "rnd-s1"]
    assert runs[0].flags == ("--moe-edl-eval-per-domain", "--seed", "3")
    assert runs[0].fine_labels and not runs[2].fine_labels  # random labels: a control


def test_arms_choose_their_labels(tmp_path):
    path = _write(
        tmp_path,
        "seeds: [1]\narms:\n  fine: {flags: --moe-edl-coeff 0.1}\n"
        "  rnd: {flags: --moe-edl-coeff 0.1, labels: random}\n"
        "  grp: {flags: --moe-edl-coeff 0.1, labels: coarse}\n"
        "  top: {flags: --moe-edl-coeff 0.1, labels: 'clusters:5'}\n",
    )
    study = st.load_study(path, tmp_path / "w")
    assert study.quickstart.controls == ("clusters:5",)  # its fit and relabel stages run once
    runs = {r.name: r for r in st.study_runs(study)}
    assert runs["fine-s1"].flags == ("--moe-edl-coeff", "0.1", "--seed", "1")
    assert runs["fine-s1"].fine_labels and runs["fine-s1"].data == ""
    assert runs["rnd-s1"].flags == (
        "--moe-edl-coeff",
        "0.1",
        "--moe-edl-labels",
        "random",
        "--moe-edl-random-seed",
        "1",
        "--seed",
        "1",
    )  # fmt: skip: the permutation is seeded by the run's seed
    label_map = str(tmp_path / "w" / "corpus" / "label_map_coarse.yaml")
    assert runs["grp-s1"].flags[2:4] == ("--moe-edl-label-map", label_map)
    assert runs["top-s1"].data == "clusters-5" and runs["top-s1"].flags[2:] == ("--seed", "1")
    assert not any(runs[f"{a}-s1"].fine_labels for a in ("rnd", "grp", "top"))
    ctx = st.qs.Context(config=study.quickstart, log=lambda _: None)
    names = [s.name for s in st.study_stages(ctx, study, list(runs.values()))]
    assert names.index("preprocess:clusters-5") < names.index("train:top-s1")


@pytest.mark.parametrize(
    "text, message",
    [
        ("seeds: [1]\narms: {a: {flags: '', labels: topics}}\n", "arms.a.labels must be fine"),
        ("seeds: [1]\narms: {a: {flag: ''}}\n", "arms.a: unknown keys ['flag']"),
        ("seeds: []\narms: {a: ''}\n", "seeds must be a list of distinct integers"),
        ("seeds: [1, 1]\narms: {a: ''}\n", "seeds must be a list of distinct integers"),
        ("seeds: [1]\narms: {}\n", "arms must map arm names"),
        ("seeds: [1]\narms: {'a b': ''}\n", "arm name 'a b'"),
        ("seeds: [1]\narms: {a: ''}\nquickstart: {iters: 3}\n", "unknown quickstart settings"),
        ("seeds: [1]\narms: {a: ''}\nquickstart: {train_iters: 0}\n", "quickstart: --train-iters"),
        ("seeds: [1]\narms: {a: ''}\nextra: 1\n", "unknown keys ['extra']"),
        ("seeds: [1]\narms: {a: ''}\nprune: [b]\n", "prune must be a list of the study's arms"),
    ],
)
def test_bad_study_files_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(st.StudyError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        st.load_study(_write(tmp_path, text), tmp_path / "w")
    assert "study.yaml" in str(e.value)


def test_mean_and_standard_error_by_hand(tmp_path):
    study = st.load_study(_write(tmp_path, "seeds: [1, 2, 3]\narms: {a: '', b: ''}\n"), tmp_path)
    evaluations = {}
    for arm, losses in (("a", [3.0, 4.0, 5.0]), ("b", [2.0, float("nan"), 2.0])):
        for seed, loss in zip((1, 2, 3), losses, strict=True):
            evaluations[f"{arm}-s{seed}"] = {
                "valid_lm_loss": loss,
                "probe_mi": 0.1 * seed,
                "valid_lm_loss_per_domain": {"code": loss + 1},
            }
    table = st.aggregate(study, evaluations)
    # a: mean 4, sample sd 1, SE = 1 / sqrt(3)
    assert table["a"]["valid_lm_loss"]["mean"] == pytest.approx(4.0)
    assert table["a"]["valid_lm_loss"]["se"] == pytest.approx(1 / math.sqrt(3))
    assert table["a"]["valid_lm_loss/code"]["mean"] == pytest.approx(5.0)
    # b: the non-finite seed is left out: mean 2, SE 0 over two seeds
    assert table["b"]["valid_lm_loss"]["mean"] == 2.0 and table["b"]["valid_lm_loss"]["se"] == 0
    assert table["a"]["probe_mi"]["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert table["a"]["probe_jsd"] == {"mean": None, "se": None, "n": 3, "values": [None] * 3}
    text = st.study_tables(study, table)
    assert "| a | 4.000 ± 0.577 |" in text and "| code | 5.000 ± 0.577 |" in text


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resumes(tmp_path, capsys):
    import dataclasses

    path = _write(
        tmp_path,
        "seeds: [1, 2]\narms:\n  baseline: --moe-edl-eval-per-domain\n"
        "  edl-window: --moe-edl-coeff 0.1 --moe-edl-window-decay 0.5\n"
        "quickstart:\n  corpus_bytes_per_domain: 16384\n  vocab_size: 512\n  train_iters: 4\n"
        "  micro_batch_size: 2\n  global_batch_size: 4\nprune: [edl-window]\n",
    )
    study = st.load_study(path, tmp_path / "w")
    study = dataclasses.replace(
        study, quickstart=dataclasses.replace(study.quickstart, model=TINY_MODEL)
    )
    lines: list[str] = []
    st.run_study(study, log=lines.append)
    report = tmp_path / "w" / "report"
    data = json.loads((report / "study.json").read_text())
    assert sorted(data["runs"]) == ["baseline-s1", "baseline-s2", "edl-window-s1", "edl-window-s2"]
    for arm in ("baseline", "edl-window"):
        loss = data["aggregate"][arm]["valid_lm_loss"]
        assert loss["n"] == 2 and loss["mean"] > 0 and loss["se"] is not None
        assert data["aggregate"][arm]["probe_mi"]["mean"] >= 0
    # Different seeds, different runs: the two baseline runs differ.
    values = data["aggregate"]["baseline"]["valid_lm_loss"]["values"]
    assert values[0] != values[1]
    # Only the arm the study names is pruned; the others' pruning columns read n/a.
    assert [n for n, r in data["runs"].items() if "prune" in r] == [
        "edl-window-s1",
        "edl-window-s2",
    ]
    assert data["runs"]["baseline-s1"].get("prune_domain_half") is None
    assert (report / "pareto.png").stat().st_size > 0
    assert "| edl-window |" in (report / "study.md").read_text()
    # The probe's per-layer numbers average to the table's, and reach TensorBoard per layer.
    for name, run in data["runs"].items():
        layers = run["probe_per_layer"]
        assert layers and [x["layer"] for x in layers] == sorted(x["layer"] for x in layers)
        mean = sum(x["mi"] for x in layers) / len(layers)
        assert mean == pytest.approx(run["probe_mi"]), name
    tb = tmp_path / "tb"
    tracker_args = argparse.Namespace(tensorboard_dir=tb, wandb_project=None, wandb_save_dir=None)
    st.log_to_trackers(tracker_args, report)
    assert capsys.readouterr().out.strip() == f"TensorBoard: 4 runs in {tb}"
    scalars = read_scalars(tb / "edl-window-s2")
    for layer in data["runs"]["edl-window-s2"]["probe_per_layer"]:
        tag = f"probe/jsd/layer_{layer['layer']:02d}"
        assert scalars[tag] == [(4, pytest.approx(layer["jsd"]))], tag

    lines.clear()  # a second call reuses every stage
    st.run_study(study, log=lines.append)
    assert not [line for line in lines if line.endswith(": running")], lines
    assert st.main([str(path), "--workdir", str(tmp_path / "w"), "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[3] == "3\tedl-window-s2"


def test_shipped_example_studies_load(tmp_path):
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[3] / "examples" / "studies").glob("*.yaml"))
    assert examples
    for path in examples:
        study = st.load_study(path, tmp_path)
        assert len(study.seeds) >= 3 and study.reference.endswith("baseline"), path


def test_random_control_differs_per_seed(tmp_path):
    path = _write(
        tmp_path, "seeds: [4, 5]\narms:\n  rnd: {flags: --moe-edl-coeff 0.1, labels: random}\n"
    )
    runs = st.study_runs(st.load_study(path, tmp_path / "w"))
    seeds = [r.flags[r.flags.index("--moe-edl-random-seed") + 1] for r in runs]
    assert seeds == ["4", "5"]


def test_t_interval_equals_scipy():
    from scipy import stats

    values = [0.10, 0.04, 0.07]
    got = st.t_interval(values)
    low, high = stats.t.interval(0.95, df=2, loc=0.07, scale=stats.sem(values))
    assert got["mean"] == pytest.approx(0.07)
    assert (got["low"], got["high"]) == (pytest.approx(low), pytest.approx(high))
    # by hand: s = 0.03, se = 0.03 / sqrt(3), t(0.975, 2) = 4.302653
    assert got["half_width"] == pytest.approx(4.302653 * 0.03 / 3**0.5, rel=1e-6)
    assert got["significant"] is False  # 0.07 - 0.0745 < 0: 3 seeds need t = 4.30 SE
    assert st.t_interval([0.10, 0.08, 0.09])["significant"] is True
    assert st.t_interval([0.2])["half_width"] is None


def test_paired_differences_against_the_reference(tmp_path):
    path = _write(
        tmp_path,
        "seeds: [1, 2, 3]\nreference: base\narms:\n  edl: --moe-edl-coeff 0.1\n"
        "  base: --moe-edl-eval-per-domain\n",
    )
    study = st.load_study(path, tmp_path / "w")
    losses = {"base": [3.70, 3.72, 3.71], "edl": [3.80, 3.76, 3.78]}
    evaluations = {
        f"{arm}-s{s}": {"valid_lm_loss": losses[arm][i]}
        for arm in losses
        for i, s in enumerate((1, 2, 3))
    }
    paired = st.paired_differences(study, evaluations)
    assert list(paired) == ["edl"]
    entry = paired["edl"]["valid_lm_loss"]
    assert entry["values"] == pytest.approx([0.10, 0.04, 0.07])
    assert entry["half_width"] == pytest.approx(4.302653 * 0.03 / 3**0.5, rel=1e-6)
    assert paired["edl"]["probe_mi"]["mean"] is None  # not measured: no interval
    bad = _write(tmp_path, "seeds: [1]\nreference: nope\narms:\n  a: ''\n")
    with pytest.raises(st.StudyError, match="reference 'nope'"):
        st.load_study(bad, tmp_path / "w")


def test_prune_numbers_pick_half_and_quarter():
    prune = {
        "full": {"keep": 8},
        "curves": {
            "domain": [{"keep": 4, "mean_increase": 0.5}, {"keep": 2, "mean_increase": 1.5}],
            "global": [{"keep": 4, "mean_increase": 0.9}],
        },
    }
    assert st.prune_numbers(prune, 8) == {
        "prune_domain_half": 0.5, "prune_domain_quarter": 1.5,
        "prune_global_half": 0.9, "prune_global_quarter": None,
    }  # fmt: skip
