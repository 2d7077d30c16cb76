"""The quickstart (megatron_edl.demo.quickstart): stage reuse, a shortened run end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from megatron_edl.demo import quickstart
from megatron_edl.demo.quickstart import (
    Context,
    QuickstartConfig,
    Stage,
    parse_iteration_line,
    run_specs,
    run_stage,
    summary_table,
)

# ---------------------------------------------------------------------------------------------
# Stamps: finished stages are reused, changed ones (and what depends on them) rerun
# ---------------------------------------------------------------------------------------------


def _stages(calls: list[str], settings: dict) -> list[Stage]:
    def make(name: str, after: tuple[str, ...]) -> Stage:
        def run(ctx: Context) -> dict:
            calls.append(name)
            (ctx.workdir / f"{name}.out").write_text(str(settings[name]))
            return {"value": settings[name]}

        return Stage(
            name,
            lambda ctx: {"setting": settings[name]},
            run,
            lambda ctx: [ctx.workdir / f"{name}.out"],
            after=after,
        )

    return [make("a", ()), make("b", ("a",)), make("c", ())]


def _run_all(workdir: Path, settings: dict) -> tuple[list[str], Context]:
    calls: list[str] = []
    ctx = Context(config=QuickstartConfig(workdir=workdir), log=lambda line: None)
    for i, stage in enumerate(_stages(calls, settings), 1):
        run_stage(stage, ctx, i, 3)
    return calls, ctx


def test_stages_are_reused_until_an_input_changes(tmp_path):
    settings = {"a": 1, "b": 2, "c": 3}
    assert _run_all(tmp_path, settings)[0] == ["a", "b", "c"]
    calls, ctx = _run_all(tmp_path, settings)
    assert calls == [] and ctx.reused == ["a", "b", "c"]
    assert ctx.results["b"] == {"value": 2}  # the stamp's result
    # An upstream change reruns the stage and what reads it, not the independent one.
    settings["a"] = 10
    assert _run_all(tmp_path, settings)[0] == ["a", "b"]
    # A missing output reruns its stage only.
    (tmp_path / "c.out").unlink()
    assert _run_all(tmp_path, settings)[0] == ["c"]
    # One stamp per stage, holding the result.
    stamps = sorted(p.name for p in (tmp_path / "stamps").iterdir())
    assert stamps == ["a.json", "b.json", "c.json"]
    record = json.loads((tmp_path / "stamps" / "a.json").read_text())
    assert record["result"] == {"value": 10} and record["seconds"] >= 0


def test_failed_stage_leaves_no_stamp(tmp_path):
    ctx = Context(config=QuickstartConfig(workdir=tmp_path), log=lambda line: None)

    def fail(ctx):
        raise quickstart.QuickstartError("boom")

    stage = Stage("x", lambda c: {}, fail, lambda c: [])
    with pytest.raises(quickstart.QuickstartError, match="boom"):
        run_stage(stage, ctx, 1, 1)
    assert not (tmp_path / "stamps" / "x.json").exists()


# ---------------------------------------------------------------------------------------------
# Runs, flags, log parsing, table
# ---------------------------------------------------------------------------------------------


def test_run_specs_and_controls(tmp_path):
    label_map = tmp_path / "map.yaml"
    config = QuickstartConfig(workdir=tmp_path, controls=("coarse", "random"), edl_coeff=0.1)
    runs = {run.name: run for run in run_specs(config, label_map)}
    assert list(runs) == ["baseline", "edl", "edl-random", "edl-coarse"]
    # The baseline loads the labels for the per-domain validation loss only.
    assert runs["baseline"].flags == ("--moe-edl-eval-per-domain",)
    # EDL runs: beta, window, warm-up and (the default) the orthogonality and variance losses;
    # the controls at the same settings.
    assert runs["edl"].flags == (
        "--moe-edl-coeff", "0.1", "--moe-edl-window-decay", "0.95", "--moe-edl-warmup-iters", "25",
        "--moe-ortho-loss-coeff", "1.0", "--moe-variance-loss-coeff", "1.0",
        "--moe-specialization-auto-calibrate",
    )  # fmt: skip
    assert runs["edl-random"].flags[:11] == runs["edl"].flags
    assert runs["edl-random"].flags[11:13] == ("--moe-edl-labels", "random")
    assert runs["edl-coarse"].flags[11:] == ("--moe-edl-label-map", str(label_map))
    plain = QuickstartConfig(
        workdir=tmp_path, edl_window_decay=0.0, edl_warmup_iters=0, edl_with_ortho_variance=False
    )
    assert quickstart.edl_flags(plain) == ("--moe-edl-coeff", "0.03")
    with pytest.raises(ValueError, match="--labels must be among"):
        QuickstartConfig(controls=("fine",))
    with pytest.raises(ValueError, match="--labels must be among"):
        QuickstartConfig(controls=("clusters:1",))
    # --compare all: the 2 x 2 grid (EDL on/off x ortho+variance on/off).
    losses = {"--moe-ortho-loss-coeff", "--moe-variance-loss-coeff"}
    config = QuickstartConfig(workdir=tmp_path, compare=("ortho+variance", "all"))
    runs = {run.name: run for run in run_specs(config, label_map)}
    assert list(runs) == ["baseline", "edl", "ortho+variance", "edl-alone"]
    assert "--moe-edl-coeff" not in runs["ortho+variance"].flags
    assert losses <= set(runs["ortho+variance"].flags) and losses <= set(runs["edl"].flags)
    assert (
        not losses & set(runs["edl-alone"].flags) and "--moe-edl-coeff" in runs["edl-alone"].flags
    )
    alone = dataclasses.replace(config, edl_with_ortho_variance=False)
    runs = {run.name: run for run in run_specs(alone, label_map)}
    assert list(runs) == ["baseline", "edl", "ortho+variance", "edl+ortho+variance"]
    assert not losses & set(runs["edl"].flags) and losses <= set(runs["edl+ortho+variance"].flags)
    with pytest.raises(ValueError, match="--compare must be among"):
        QuickstartConfig(compare=("ortho",))
    with pytest.raises(ValueError, match=r"--nproc \(3\) must divide"):
        QuickstartConfig(nproc=3)


def test_cluster_control_runs_on_its_own_labels(tmp_path, capsys):
    config = QuickstartConfig(workdir=tmp_path, controls=("clusters:8", "clusters:4"))
    assert quickstart.cluster_counts(config) == [4, 8]
    ctx = Context(config=config)
    ctx.results["preprocess"] = {"tokens": {"valid": 10_000}}
    runs = {run.name: run for run in run_specs(config, tmp_path / "map.yaml")}
    assert list(runs) == ["baseline", "edl", "edl-clusters-4", "edl-clusters-8"]
    clusters = runs["edl-clusters-8"]
    assert clusters.flags == runs["edl"].flags and not clusters.fine_labels
    args = quickstart.train_args(ctx, clusters)
    assert args[args.index("--train-data-path") + 1] == str(
        tmp_path / "data" / "clusters-8" / "train_text_document"
    )
    # The probe evaluates on the fine labels of the corpus, like every run.
    probe = quickstart.probe_command(ctx, clusters)
    assert probe[probe.index("--valid-data-path") + 1] == str(
        tmp_path / "data" / "valid_text_document"
    )
    stages = [stage.name for stage in quickstart.pipeline(ctx)[0]]
    assert stages.index("clusters:4") < stages.index("preprocess:clusters-4")
    assert stages.index("preprocess:clusters-8") < stages.index("train:edl-clusters-8")
    # The command line: "clusters" is clusters:16.
    parsed = quickstart.build_parser().parse_args(["--labels", "clusters", "random"])
    assert parsed.labels == ["clusters:16", "random"]
    with pytest.raises(SystemExit):
        quickstart.build_parser().parse_args(["--labels", "clusters:x"])
    assert "expected random, coarse or clusters:K" in capsys.readouterr().err
    parse = quickstart.build_parser().parse_args
    assert quickstart.config_from_args(parse([])).edl_with_ortho_variance
    alone = quickstart.config_from_args(parse(["--edl-alone", "--compare", "all"]))
    assert not alone.edl_with_ortho_variance and alone.compare == ("all",)
    assert alone.controls == () and quickstart.config_from_args(
        parse(["--labels", "clusters:8", "random", "coarse"])
    ).controls == ("random", "coarse", "clusters:8")


def test_same_flags_for_every_run_but_edl(tmp_path):
    config = QuickstartConfig(workdir=tmp_path, controls=("random", "coarse"))
    ctx = Context(config=config)
    ctx.results["preprocess"] = {"tokens": {"valid": 10_000}}
    runs = run_specs(config, tmp_path / "map.yaml")
    flags = {run.name: quickstart.train_args(ctx, run) for run in runs}

    def without_run_specific(args, run):
        args = [a.replace(f"/runs/{run.name}/", "/runs/RUN/") for a in args]
        return args[: len(args) - len(run.flags)]

    common = {tuple(without_run_specific(flags[r.name], r)) for r in runs}
    assert len(common) == 1  # same model, data, seed, schedule
    assert "--seed" in flags["baseline"] and "--moe-edl-coeff" not in flags["baseline"]
    # The whole validation split once: 10,000 tokens in batches of 8 x 256 tokens.
    eval_iters = flags["edl"][flags["edl"].index("--eval-iters") + 1]
    assert eval_iters == str(10_000 // (8 * 256))


def test_completion_is_read_from_the_checkpoint_tracker(tmp_path):
    # 125 iterations: the log interval divides them, and the check does not read the log.
    assert quickstart.log_interval(125) == 5
    for iters in (1, 7, 19, 20, 125, 500, 1000):
        interval = quickstart.log_interval(iters)
        assert iters % interval == 0 and 1 <= interval <= 10
    log = tmp_path / "train.log"
    log.write_text("iteration      120/     125 | lm loss: 3.0 |\n")
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    with pytest.raises(quickstart.QuickstartError, match="last checkpoint at iteration None"):
        quickstart.check_training_finished("edl", 0, checkpoints, 125, log)
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("125")
    quickstart.check_training_finished("edl", 0, checkpoints, 125, log)
    with pytest.raises(quickstart.QuickstartError, match="exit status 1"):
        quickstart.check_training_finished("edl", 1, checkpoints, 125, log)
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("100")
    with pytest.raises(quickstart.QuickstartError, match="iteration 100 of 125"):
        quickstart.check_training_finished("edl", 0, checkpoints, 125, log)


def test_parse_iteration_line_and_table():
    line = (
        " [2026-01-01 00:00:00] iteration       40/     500 | consumed samples: 320 | "
        "lm loss: 6.979295E+00 | load_balancing_loss: 1.561646E+00 | edl_jsd: 0.26 |"
    )
    iteration, total, metrics = parse_iteration_line(line)
    assert (iteration, total) == (40, 500)
    assert metrics["lm loss"] == pytest.approx(6.979295)
    assert metrics["edl_jsd"] == 0.26
    assert parse_iteration_line("validation loss at iteration 40") is None
    runs = run_specs(QuickstartConfig(), Path("m.yaml"))
    table = summary_table(
        runs,
        {
            "baseline": {"valid_lm_loss": 5.0, "probe_mi": None},
            "edl": {"valid_lm_loss": 4.5, "probe_mi": 0.25},
        },
    )
    lines = table.splitlines()
    assert lines[0].startswith("| run | valid LM loss |")
    assert lines[2].startswith("| baseline | 5.000 |") and "n/a" in lines[2]
    assert lines[3].startswith("| edl | 4.500 |") and "0.250" in lines[3]


# ---------------------------------------------------------------------------------------------
# End to end, shortened: corpus -> tokenizer -> preprocess -> 2 runs -> evaluation -> report
# ---------------------------------------------------------------------------------------------

TINY_MODEL = Path(__file__).resolve().parents[2] / "helpers" / "quickstart_tiny_model.yaml"
"""2 layers, hidden 64, 4 heads, expert FFN 64, sequences of 64 tokens."""


@pytest.mark.slow
def test_shortened_quickstart_end_to_end(tmp_path):
    config = QuickstartConfig(
        workdir=tmp_path / "qs",
        corpus_bytes_per_domain=16 << 10,
        vocab_size=512,
        model=TINY_MODEL,
        train_iters=4,
        micro_batch_size=2,
        global_batch_size=4,
    )
    lines: list[str] = []
    summary = quickstart.run_quickstart(config, log=lines.append)
    workdir = config.workdir

    # Every stage ran, the report and the table exist.
    assert [p.name for p in sorted((workdir / "stamps").iterdir())] == sorted(
        [
            "corpus.json",
            "tokenizer.json",
            "preprocess.json",
            "train-baseline.json",
            "train-edl.json",
            "evaluate-baseline.json",
            "evaluate-edl.json",
            "report.json",
        ]
    )
    report = (workdir / "report" / "summary.md").read_text()
    assert "| baseline |" in report and "| edl |" in report
    printed = "\n".join(lines).splitlines()
    assert any(line.startswith("| edl |") for line in printed)
    assert printed[-1].startswith("Report: ")

    # The corpus has all three coarse groups; both runs trained every iteration.
    groups = set(summary["corpus"]["groups"].values())
    assert groups == {"code", "text", "math"}
    base, edl = (
        json.loads((workdir / "stamps" / f"train-{r}.json").read_text())["result"]
        for r in ("baseline", "edl")
    )
    assert sorted(map(int, base["iterations"])) == sorted(map(int, edl["iterations"]))
    assert sorted(map(int, base["iterations"])) == [1, 2, 3, 4]
    # Same seed, same data order: the first iteration's LM loss (before any update) is equal.
    assert base["iterations"]["1"]["lm loss"] == edl["iterations"]["1"]["lm loss"]
    # EDL is on in one run only; validation ran at the end of both.
    assert "edl_jsd" in edl["iterations"]["4"] and "edl_jsd" not in base["iterations"]["4"]
    evaluations = summary["evaluations"]
    assert evaluations["baseline"]["edl_mi"] is None and evaluations["edl"]["edl_mi"] >= 0
    # Per-domain validation loss in both runs (the baseline loads the labels for it): the same
    # validation tokens, and the token-weighted mean of the domains' losses is the overall loss.
    fine = summary["corpus"]["domains"]
    for name in ("baseline", "edl"):
        values = evaluations[name]
        shares = values["valid_token_share_per_domain"]
        assert list(shares) == fine and sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
        weighted = sum(
            share * values["valid_lm_loss_per_domain"][d] for d, share in shares.items() if share
        )
        assert weighted == pytest.approx(values["valid_lm_loss"], rel=1e-4)
    assert (
        evaluations["baseline"]["valid_token_share_per_domain"]
        == evaluations["edl"]["valid_token_share_per_domain"]
    )
    assert "## Validation LM loss per domain" in report
    # The probe evaluated both checkpoints on the fine labels; the analysis reports exist.
    for name in ("baseline", "edl"):
        assert evaluations[name]["probe_mi"] >= 0 and evaluations[name]["probe_balance"] >= 1
    assert (workdir / "report" / "fine" / "index.html").is_file()
    coarse_html = (workdir / "report" / "coarse" / "index.html").read_text()
    assert "ternary" in coarse_html
    assert list(summary["stage_seconds"]) == [
        "corpus",
        "tokenizer",
        "preprocess",
        "train:baseline",
        "train:edl",
        "evaluate:baseline",
        "evaluate:edl",
    ]  # the report's own time is in its stamp

    # Again with a control: everything finished is reused, only the new run (its evaluation and
    # the report) runs.
    lines.clear()
    config = QuickstartConfig(
        **{**config.__dict__, "controls": ("coarse",), "compare": ("ortho+variance",)}
    )
    summary = quickstart.run_quickstart(config, log=lines.append)
    reused = [line for line in lines if line.endswith("s)") and ": reused (" in line]
    assert len(reused) == 7, lines  # all but the new runs, their evaluations and the report
    assert any("train:edl-coarse: done" in line for line in lines)
    assert any("train:ortho+variance: done" in line for line in lines)
    table = (workdir / "report" / "summary.md").read_text()
    assert "| edl-coarse |" in table and "| ortho+variance |" in table
    ortho = json.loads((workdir / "stamps" / "train-ortho+variance.json").read_text())["result"]
    assert "ortho_loss" in ortho["iterations"]["4"] and "edl_jsd" not in ortho["iterations"]["4"]
    coarse = summary["evaluations"]["edl-coarse"]
    assert coarse["edl_mi"] >= 0
    assert list(coarse["valid_lm_loss_per_domain"]) == ["code", "text", "math"]


@pytest.mark.slow
def test_cluster_labels_stages_and_run(tmp_path):
    """clusters:K at tiny size: fit, relabel the same documents, train and probe the EDL run."""
    config = QuickstartConfig(
        workdir=tmp_path / "qs",
        controls=("clusters:4",),
        corpus_bytes_per_domain=16 << 10,
        vocab_size=512,
        model=TINY_MODEL,
        train_iters=2,
        micro_batch_size=2,
        global_batch_size=4,
        eval_iters=1,
    )
    lines: list[str] = []
    ctx = Context(config=config, log=lines.append)
    stages = {stage.name: stage for stage in quickstart.pipeline(ctx)[0]}
    wanted = [
        "corpus",
        "tokenizer",
        "preprocess",
        "clusters:4",
        "preprocess:clusters-4",
        "train:edl-clusters-4",
        "evaluate:edl-clusters-4",
    ]
    for i, name in enumerate(wanted, 1):
        run_stage(stages[name], ctx, i, len(wanted))
    names = ctx.results["clusters:4"]["names"]
    assert len(names) == len(set(names)) == 4
    from megatron_edl.data.sidecar import read_sidecar

    ids, vocabulary = read_sidecar(
        str(config.workdir / "data" / "clusters-4" / "train_text_document")
    )
    assert list(vocabulary)[:4] == names and len(set(ids.tolist())) > 1
    trained = ctx.results["train:edl-clusters-4"]
    assert "edl_jsd" in trained["iterations"]["2"]
    evaluation = ctx.results["evaluate:edl-clusters-4"]
    assert set(evaluation["valid_lm_loss_per_domain"]) <= set(vocabulary)
    # The probe evaluated the checkpoint on the corpus's fine labels.
    assert list((config.workdir / "runs" / "edl-clusters-4" / "probe").glob("*probe*.json"))
