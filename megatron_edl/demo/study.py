"""Studies on the quickstart's data: a grid of arms x seeds, resumable, with mean ± standard error.

A study is a YAML file::

    seeds: [1, 2, 3]                 # Megatron's --seed of each run: initialisation, data order
    quickstart:                      # optional: the quickstart's settings (corpus, model, schedule)
      train_iters: 250
      micro_batch_size: 8
      global_batch_size: 16
      train_args: "--num-layers 2"  # Megatron flags appended to every run
    arms:                            # name -> Megatron flags on top of the quickstart's
      baseline: --moe-edl-eval-per-domain
      edl: --moe-edl-coeff 0.01
      edl-window: --moe-edl-coeff 0.01 --moe-edl-window-decay 0.9 --moe-edl-warmup-iters 50
      random:                        # a mapping: flags plus the labels the arm trains on
        flags: --moe-edl-coeff 0.01
        labels: random                 # fine (default) | random | coarse | clusters:K
    prune: [baseline, edl]           # optional: the arms whose runs are pruned (default: all)

An arm's ``labels`` chooses what EDL sees, on the same documents: ``fine`` (the corpus's
domains), ``random`` (the fine labels permuted per document with the quickstart's seed,
``--moe-edl-labels random``), ``coarse`` (the corpus's 3 groups, ``--moe-edl-label-map``) or
``clusters:K`` (K topic clusters fitted on the train split, the quickstart's ``--labels
clusters:K`` stages, built once and shared by every arm that names them).

Every arm runs once per seed as the quickstart's run ``<arm>-s<seed>``, on one corpus,
tokenizer and labelled data (the quickstart's stages 1-3, built once with the quickstart's
seed), then the quickstart's evaluation: the validation LM loss overall and per domain, and the
evaluation probe of the checkpoint on the fine labels (I(D;E), mean JSD, max/mean load, averaged
over MoE layers). Every stage leaves the quickstart's stamp, so a study interrupted at any point
continues where it stopped, over several sittings. The report (``<workdir>/report/``):
``study.md`` and ``study.json`` (per arm: mean ± standard error over seeds, n = seeds), and
``pareto.png`` (validation LM loss against I(D;E), one point per arm with its error bars); the
quickstart's HTML reports of every run are there too (``fine/``, ``coarse/``).

Usage:
    megatron-edl-study STUDY.yaml --workdir runs/study                 # everything, in sequence
    megatron-edl-study STUDY.yaml --workdir runs/study --list          # index, run name
    megatron-edl-study STUDY.yaml --workdir runs/study --prepare       # stages 1-3 only
    megatron-edl-study STUDY.yaml --workdir runs/study --run 4         # one arm x seed
    megatron-edl-study STUDY.yaml --workdir runs/study --report        # the report (trains nothing)
    megatron-edl-study STUDY.yaml --workdir runs/study --report --tensorboard-dir tb
                                            # ... and every run's numbers per layer to TensorBoard
    bash examples/slurm/study.sh STUDY.yaml runs/study                 # prepare, array, report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megatron_edl.demo import quickstart as qs
from megatron_edl.demo.evaluation import prune_dir, prune_run

__all__ = [
    "StudyConfig",
    "StudyError",
    "aggregate",
    "load_study",
    "main",
    "run_study",
    "study_runs",
]

# The numbers a study reports per arm (key in the quickstart's evaluation, title).
METRICS = (
    ("valid_lm_loss", "valid LM loss"),
    ("probe_mi", "I(D;E)"),
    ("probe_mi_hard", "hard I(D;E)"),
    ("probe_jsd", "mean JSD"),
    ("probe_balance", "load max/mean"),
    ("train_lm_loss", "train LM loss"),
    ("prune_domain_half", "Δloss E/2 (domain)"),
    ("prune_global_half", "Δloss E/2 (global)"),
    ("prune_domain_quarter", "Δloss E/4 (domain)"),
    ("prune_global_quarter", "Δloss E/4 (global)"),
)
# Paired differences against the reference arm (the study's ``reference``, default its first).
PAIRED_METRICS = (
    "valid_lm_loss", "probe_mi", "probe_mi_hard",
    "prune_domain_half", "prune_global_half", "prune_domain_quarter", "prune_global_quarter",
)  # fmt: skip
# Settings of the quickstart a study may set (QuickstartConfig fields; train_args is a string).
_QUICKSTART_KEYS = (
    "corpus_bytes_per_domain", "vocab_size", "train_iters", "micro_batch_size",
    "global_batch_size", "lr", "eval_iters", "nproc", "seed", "train_args",
)  # fmt: skip
# Flags that train on other labels than the fine ones (the probe then writes its own folder).
_CONTROL_FLAGS = ("--moe-edl-labels", "--moe-edl-label-map")


class StudyError(ValueError):
    """A malformed study file or an incomplete study; the message names the file and key."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """A parsed study: the quickstart's settings, the seeds, the arms in file order."""

    quickstart: qs.QuickstartConfig
    seeds: tuple[int, ...]
    arms: tuple[tuple[str, tuple[str, ...]], ...]
    """(name, Megatron flags) of every arm, in file order."""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    """Arm name -> its labels (``random``, ``coarse``, ``clusters:K``); absent: ``fine``."""
    reference: str = ""
    """The arm the paired differences are taken against (default: the first arm)."""
    prune: tuple[str, ...] | None = None
    """The arms whose runs get the pruning stage (``None``: every arm)."""

    def __post_init__(self) -> None:
        if not self.reference:
            object.__setattr__(self, "reference", self.arms[0][0])


def load_study(path: str | os.PathLike, workdir: str | os.PathLike) -> StudyConfig:
    """Read a study file (strict YAML: duplicate keys are errors).

    Args:
        path: The study YAML (module docstring).
        workdir: Where the study writes (the quickstart's workdir).

    Returns:
        The study.

    Raises:
        StudyError: naming the file and the key that is wrong.
    """
    from megatron_edl.core.labels import load_strict_yaml

    data = load_strict_yaml(Path(path), what="study") or {}
    where = os.fspath(path)
    if not isinstance(data, dict):
        raise StudyError(f"{where}: a study is a mapping (seeds, arms, quickstart)")
    unknown = sorted(set(data) - {"seeds", "arms", "quickstart", "reference", "prune"})
    if unknown:
        raise StudyError(
            f"{where}: unknown keys {unknown}; a study has seeds, arms, quickstart, reference, "
            "prune"
        )
    seeds = data.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise StudyError(f"{where}: seeds must be a list of distinct integers >= 0, got {seeds!r}")
    arms = data.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise StudyError(f"{where}: arms must map arm names to Megatron flags, got {arms!r}")
    parsed_arms = []
    arm_labels: dict[str, str] = {}
    for name, flags in arms.items():
        if (
            not isinstance(name, str)
            or not name
            or not all(c.isalnum() or c in "-_." for c in name)
        ):
            raise StudyError(f"{where}: arm name {name!r}: use letters, digits, '-', '_', '.'")
        if isinstance(flags, dict):
            extra = sorted(set(flags) - {"flags", "labels"})
            if extra:
                raise StudyError(f"{where}: arms.{name}: unknown keys {extra}; use flags, labels")
            label = str(flags.get("labels", "fine"))
            if label not in ("fine", *qs.CONTROLS[:2]) and qs.cluster_count(label) is None:
                raise StudyError(
                    f"{where}: arms.{name}.labels must be fine, random, coarse or clusters:K "
                    f"(K >= 2), got {label!r}"
                )
            if label != "fine":
                arm_labels[name] = label
            flags = flags.get("flags")
        if flags is None:
            flags = ""
        if not isinstance(flags, str | list):
            raise StudyError(f"{where}: arms.{name} must be a string or a list of flags")
        parsed_arms.append((name, tuple(shlex.split(flags) if isinstance(flags, str) else flags)))
    settings = dict(data.get("quickstart") or {})
    unknown = sorted(set(settings) - set(_QUICKSTART_KEYS))
    if unknown:
        raise StudyError(
            f"{where}: unknown quickstart settings {unknown}; allowed: {list(_QUICKSTART_KEYS)}"
        )
    extra = tuple(shlex.split(str(settings.pop("train_args", ""))))
    # The clusters the arms name: the quickstart's stages fit and apply them once.
    controls = tuple(dict.fromkeys(v for v in arm_labels.values() if v.startswith("clusters")))
    try:
        config = qs.QuickstartConfig(
            workdir=Path(workdir), extra_train_args=extra, controls=controls, **settings
        )
    except (TypeError, ValueError) as err:
        raise StudyError(f"{where}: quickstart: {err}") from err
    reference = data.get("reference", parsed_arms[0][0])
    if reference not in dict(parsed_arms):
        raise StudyError(f"{where}: reference {reference!r} is not an arm of the study")
    prune = data.get("prune")
    if prune is not None and (
        not isinstance(prune, list) or not all(a in dict(parsed_arms) for a in prune)
    ):
        raise StudyError(f"{where}: prune must be a list of the study's arms, got {prune!r}")
    return StudyConfig(
        quickstart=config,
        seeds=tuple(seeds),
        arms=tuple(parsed_arms),
        labels=arm_labels,
        reference=reference,
        prune=None if prune is None else tuple(prune),
    )


def _label_flags(study: StudyConfig, arm: str) -> tuple[tuple[str, ...], str]:
    """The flags and the data folder that give ``arm`` its labels (:attr:`StudyConfig.labels`)."""
    return qs.control_labels(study.quickstart, study.labels.get(arm, "fine"))


def study_runs(study: StudyConfig) -> list[qs.RunSpec]:
    """Every arm x seed as a quickstart run ``<arm>-s<seed>`` (arm-major, seeds in order)."""
    runs = []
    for arm, flags in study.arms:
        label_flags, data = _label_flags(study, arm)
        for seed in study.seeds:
            runs.append(
                qs.RunSpec(
                    f"{arm}-s{seed}",
                    f"arm {arm}, seed {seed}: {' '.join(flags) or '(no extra flag)'}"
                    + (f", labels {study.labels[arm]}" if arm in study.labels else ""),
                    # the seed after the quickstart's --seed: wins; a random-label control
                    # permutes the labels with the run's own seed
                    (
                        *flags,
                        *_with_run_seed(label_flags, seed),
                        "--seed",
                        str(seed),
                    ),
                    fine_labels=arm not in study.labels
                    and not any(f in _CONTROL_FLAGS for f in flags),
                    data=data,
                )
            )
    return runs


def _with_run_seed(label_flags: Sequence[str], seed: int) -> tuple[str, ...]:
    """``label_flags`` with a random-label control's permutation seeded by the run's ``seed``."""
    flags = list(label_flags)
    for i, flag in enumerate(flags[:-1]):
        if flag == "--moe-edl-random-seed":
            flags[i + 1] = str(seed)
    return tuple(flags)


def prune_numbers(prune: dict[str, Any] | None, num_experts: int) -> dict[str, float | None]:
    """The study's pruning columns of one run: the mean loss increase when each domain keeps
    E/2 and E/4 experts, by the domain and the global ranking (``None`` where not measured)."""
    out: dict[str, float | None] = {}
    for ranking in ("domain", "global"):
        points = (prune or {}).get("curves", {}).get(ranking, [])
        for name, keep in (("half", num_experts // 2), ("quarter", num_experts // 4)):
            point = next((p for p in points if p["keep"] == keep), None)
            out[f"prune_{ranking}_{name}"] = None if point is None else point["mean_increase"]
    return out


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and two-sided Student-t interval of ``values`` (scipy), ``mean ± t · s / sqrt(n)``.

    Returns:
        ``{"mean", "low", "high", "half_width", "n", "significant"}``; ``significant``: the
        interval excludes 0. Fewer than 2 finite values: no interval (``None``).
    """
    from scipy import stats

    n = sum(1 for v in values if v is not None and math.isfinite(v))
    mean, se = _mean_se(values)
    if se is None:
        return {"mean": mean, "low": None, "high": None,
                "half_width": None, "n": n, "significant": None}  # fmt: skip
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * se
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "half_width": half,
        "n": n,
        "significant": bool(mean - half > 0 or mean + half < 0),
    }


def paired_differences(
    study: StudyConfig, evaluations: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per arm other than the reference: per metric of :data:`PAIRED_METRICS`, the per-seed
    differences arm - reference and their 95 % t-interval (:func:`t_interval`)."""
    reference = study.reference
    out: dict[str, dict[str, Any]] = {}
    for arm, _ in study.arms:
        if arm == reference:
            continue
        table: dict[str, Any] = {}
        for key in PAIRED_METRICS:
            diffs = []
            for seed in study.seeds:
                a = evaluations[f"{arm}-s{seed}"].get(key)
                b = evaluations[f"{reference}-s{seed}"].get(key)
                diffs.append(None if a is None or b is None else a - b)
            table[key] = {**t_interval(diffs), "values": diffs}
        out[arm] = table
    return out


def _mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error (sample standard deviation / sqrt(n)); SE is None for n < 2."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def aggregate(
    study: StudyConfig, evaluations: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per arm: ``{metric: {"mean", "se", "n", "values"}}`` over its seeds, for the metrics of
    :data:`METRICS` and the validation LM loss of every domain (``valid_lm_loss/<domain>``)."""
    out: dict[str, dict[str, Any]] = {}
    for arm, _ in study.arms:
        per_seed = [evaluations[f"{arm}-s{seed}"] for seed in study.seeds]
        keys = [key for key, _ in METRICS]
        domains = dict.fromkeys(d for e in per_seed for d in e.get("valid_lm_loss_per_domain", {}))
        table: dict[str, Any] = {}
        for key in keys:
            values = [e.get(key) for e in per_seed]
            mean, se = _mean_se(values)
            table[key] = {"mean": mean, "se": se, "n": len(values), "values": values}
        for domain in domains:
            values = [e.get("valid_lm_loss_per_domain", {}).get(domain) for e in per_seed]
            mean, se = _mean_se(values)
            table[f"valid_lm_loss/{domain}"] = {
                "mean": mean, "se": se, "n": len(values), "values": values,
            }  # fmt: skip
        out[arm] = table
    return out


def _cell(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "n/a"
    return f"{entry['mean']:.3f}" + ("" if entry["se"] is None else f" ± {entry['se']:.3f}")


def study_tables(study: StudyConfig, table: dict[str, dict[str, Any]]) -> str:
    """Markdown: the summary (one row per arm) and the per-domain validation LM loss."""
    header = "| arm | " + " | ".join(title for _, title in METRICS) + " |"
    lines = [header, "|" + " --- |" * (len(METRICS) + 1)]
    for arm, _ in study.arms:
        lines.append(f"| {arm} | " + " | ".join(_cell(table[arm][k]) for k, _ in METRICS) + " |")
    domains = dict.fromkeys(
        k.split("/", 1)[1] for arm, _ in study.arms for k in table[arm] if "/" in k
    )
    lines += ["", "| domain | " + " | ".join(a for a, _ in study.arms) + " |"]
    lines.append("|" + " --- |" * (len(study.arms) + 1))
    for domain in domains:
        cells = [
            _cell(table[a].get(f"valid_lm_loss/{domain}", {"mean": None})) for a, _ in study.arms
        ]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval_cell(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "n/a"
    if entry["half_width"] is None:
        return f"{entry['mean']:+.3f}"
    mark = " *" if entry["significant"] else ""
    return f"{entry['mean']:+.3f} ± {entry['half_width']:.3f}{mark}"


def paired_table(study: StudyConfig, paired: dict[str, dict[str, Any]]) -> str:
    """Markdown: per arm, the paired difference to the reference and its 95 % t half-width
    (``*``: the interval excludes 0)."""
    titles = dict(METRICS)
    lines = [
        f"Paired differences against `{study.reference}` (mean ± 95 % t half-width over seeds; "
        "* = significant at 95 %):",
        "",
        "| arm | " + " | ".join(titles[k] for k in PAIRED_METRICS) + " |",
        "|" + " --- |" * (len(PAIRED_METRICS) + 1),
    ]
    for arm, _ in study.arms:
        if arm in paired:
            cells = [_interval_cell(paired[arm][k]) for k in PAIRED_METRICS]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(study: StudyConfig, table: dict[str, dict[str, Any]], path: Path) -> None:
    """Validation LM loss (y) against I(D;E) (x), one point per arm with ±1 SE error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm, _ in study.arms:
        x, y = table[arm]["probe_mi"], table[arm]["valid_lm_loss"]
        if x["mean"] is None or y["mean"] is None:
            continue
        ax.errorbar(
            x["mean"], y["mean"], xerr=x["se"] or 0.0, yerr=y["se"] or 0.0, fmt="o", capsize=3
        )
        ax.annotate(arm, (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("I(domain; expert), nats (probe, fine labels)")
    ax.set_ylabel("validation LM loss")
    ax.set_title(f"Arms: mean ± SE over {len(study.seeds)} seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_study_report(
    ctx: qs.Context, study: StudyConfig, runs: Sequence[qs.RunSpec]
) -> dict[str, Any]:
    """The report stage: the quickstart's analysis reports of every run, then the study's
    tables, ``study.json`` and ``pareto.png``."""
    ctx.report_dir.mkdir(parents=True, exist_ok=True)
    evaluations = {run.name: dict(ctx.results[f"evaluate:{run.name}"]) for run in runs}
    for name, values in qs.analysis_reports(ctx, runs).items():
        evaluations[name].update(values)
    for run in runs:
        prune = ctx.results.get(f"prune:{run.name}")
        if prune is not None:
            evaluations[run.name]["prune"] = prune
            evaluations[run.name].update(prune_numbers(prune, prune["full"]["keep"]))
    table = aggregate(study, evaluations)
    paired = paired_differences(study, evaluations)
    tables = study_tables(study, table) + "\n\n" + paired_table(study, paired)
    (ctx.report_dir / "study.json").write_text(
        json.dumps(
            {
                "seeds": list(study.seeds),
                "arms": {arm: list(flags) for arm, flags in study.arms},
                "aggregate": table,
                "reference": study.reference,
                "paired": paired,
                "runs": evaluations,
                "quickstart": qs.config_json(study.quickstart),
            },
            indent=2,
            default=os.fspath,
        )
        + "\n"
    )
    pareto_plot(study, table, ctx.report_dir / "pareto.png")
    notes = [
        "# Study: arms x seeds on the quickstart's data",
        "",
        f"Seeds: {', '.join(map(str, study.seeds))}. Cells: mean ± standard error over the seeds "
        "(sample standard deviation / sqrt(n)); paired differences: mean ± the two-sided 95 % "
        "Student-t half-width. Δloss E/2, E/4: mean over domains of the validation LM-loss "
        "increase when each domain keeps E/2 (E/4) experts per layer, ranked by its own routing "
        "mass (domain) or one ranking for all (global) (megatron-edl-prune). "
        "valid LM loss: Megatron's validation loss after the last iteration; I(D;E) (dense "
        "and hard), mean JSD and max/mean load: the evaluation probe on the fine labels, "
        "averaged over MoE layers; train LM loss: the last log lines.",
        "",
        tables,
        "",
        "Arms (Megatron flags on top of the quickstart's):",
        *[f"- {arm}: `{' '.join(flags)}`" for arm, flags in study.arms],
        "",
        "Figure: pareto.png. Every run's routing report: fine/index.html, coarse/index.html.",
    ]
    (ctx.report_dir / "study.md").write_text("\n".join(notes) + "\n")
    return {"tables": tables}


def study_stages(
    ctx: qs.Context,
    study: StudyConfig,
    runs: Sequence[qs.RunSpec],
    pruned: Sequence[str] | None = None,
) -> list[qs.Stage]:
    """Every stage; ``pruned``: the runs with a pruning stage (``None``: every run of the arms
    in :attr:`StudyConfig.prune`)."""
    arms = {f"{arm}-s{seed}": arm for arm, _ in study.arms for seed in study.seeds}
    prune_runs = [
        r
        for r in runs
        if (pruned is None or r.name in pruned)
        and (study.prune is None or arms[r.name] in study.prune)
    ]
    report = qs.Stage(
        "study-report",
        # "format" 3: study.json holds the probe's per-layer numbers (demo.trackers reads them),
        # the hard I(D;E) and every run's pruning curves
        lambda c: {"runs": [r.name for r in runs], "format": 3},
        lambda c: write_study_report(c, study, runs),
        lambda c: [c.report_dir / "study.md"],
        after=(
            *(f"evaluate:{r.name}" for r in runs if r not in prune_runs),
            *(f"prune:{r.name}" for r in prune_runs),
        ),
    )
    prune = [
        qs.Stage(
            f"prune:{run.name}",
            lambda c: {"format": 1},
            lambda c, run=run: prune_run(c, run),
            lambda c, run=run: [prune_dir(c, run) / "prune.json"],
            after=(f"evaluate:{run.name}",),
        )
        for run in prune_runs
    ]
    return [
        *qs.data_stages(),
        *qs.cluster_stages(study.quickstart),
        *qs.run_stages(runs),
        *prune,
        report,
    ]


def run_study(
    study: StudyConfig,
    *,
    only: str = "all",
    run_index: int | None = None,
    log: Callable[[str], None] = print,
) -> qs.Context:
    """Run (or reuse) the study's stages.

    Args:
        study: The study.
        only: ``all`` (every stage), ``prepare`` (stages 1-3), ``run`` (stages 1-3, then the
            training and evaluation of run ``run_index``), ``report`` (the report; every run
            must be evaluated already).
        run_index: With ``only="run"``: the index in :func:`study_runs`.
        log: Where progress goes.

    Returns:
        The quickstart context (results of every stage run or reused).

    Raises:
        StudyError: A bad run index, or a report asked before every run is evaluated.
        QuickstartError: A stage failed.
    """
    ctx = qs.Context(config=study.quickstart, log=log)
    runs = study_runs(study)
    stages = study_stages(ctx, study, runs)
    shared = [s.name for s in qs.data_stages() + qs.cluster_stages(study.quickstart)]
    if only == "prepare":
        stages = [s for s in stages if s.name in shared]
    elif only == "run":
        if run_index is None or not 0 <= run_index < len(runs):
            raise StudyError(f"--run must be in [0, {len(runs)}), got {run_index!r}")
        name = runs[run_index].name
        wanted = (*shared, f"train:{name}", f"evaluate:{name}", f"prune:{name}")
        stages = [s for s in stages if s.name in wanted]
    elif only == "report":
        missing = [r.name for r in runs if not qs.stamp_path(ctx, _evaluate(stages, r)).exists()]
        if missing:
            raise StudyError(f"the report needs every run evaluated; missing: {missing}")
        # the pruning curves of the runs pruned so far (the others' columns read n/a)
        pruned = [
            s.name.split(":", 1)[1]
            for s in stages
            if s.name.startswith("prune:") and qs.stamp_path(ctx, s).exists()
        ]
        stages = study_stages(ctx, study, runs, pruned)
    total = len(stages)
    stale = []
    for index, stage in enumerate(stages, 1):
        # --report never trains: a run whose stamp no longer matches is named, not retrained
        reuse_only = only == "report" and stage.name != "study-report"
        if stale and stage.name == "study-report":
            break
        if qs.run_stage(stage, ctx, index, total, reuse_only=reuse_only) is None and reuse_only:
            stale.append(stage.name)
    if stale:
        raise StudyError(
            f"--report reads finished runs only; {len(stale)} stages are missing or stale (their "
            f"flags, data or code changed since; run them with --run INDEX): {', '.join(stale)}"
        )
    return ctx


def _evaluate(stages: Sequence[qs.Stage], run: qs.RunSpec) -> qs.Stage:
    return next(s for s in stages if s.name == f"evaluate:{run.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", help="Study YAML (seeds, arms, quickstart settings).")
    parser.add_argument("--workdir", required=True, help="Output folder (reused: resumes).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="Print index and name of every run.")
    mode.add_argument("--prepare", action="store_true", help="Only corpus, tokenizer, data.")
    mode.add_argument(
        "--run",
        type=int,
        nargs="?",
        const=-1,
        metavar="INDEX",
        help="Only run INDEX (default: $SLURM_ARRAY_TASK_ID), after the shared stages.",
    )
    mode.add_argument("--report", action="store_true", help="Only the report.")
    trackers = parser.add_argument_group(
        "trackers",
        "After the report: every run's validation loss and probe numbers, overall "
        "and per MoE layer, one tracker run per study run (megatron_edl.demo.trackers).",
    )
    trackers.add_argument("--tensorboard-dir", help="TensorBoard folder (one subfolder per run).")
    trackers.add_argument("--wandb-project", help="Weights & Biases project (group = arm).")
    trackers.add_argument("--wandb-save-dir", help="Local folder of the W&B runs.")
    return parser


def log_to_trackers(args: argparse.Namespace, report_dir: Path) -> None:
    """Log the report's runs to TensorBoard and/or W&B, as ``args`` asks (nothing if neither)."""
    if not (args.tensorboard_dir or args.wandb_project):
        return
    from megatron_edl.demo import trackers

    try:
        runs = trackers.runs_from_study_json(report_dir / "study.json")
        if args.tensorboard_dir:
            trackers.write_tensorboard(runs, args.tensorboard_dir)
            print(f"TensorBoard: {len(runs)} runs in {args.tensorboard_dir}")
        if args.wandb_project:
            trackers.write_wandb(runs, args.wandb_project, save_dir=args.wandb_save_dir)
            print(f"W&B: {len(runs)} runs in project {args.wandb_project}")
    except (RuntimeError, ValueError) as err:  # a tracker package missing, an old report
        raise StudyError(str(err)) from err


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``megatron-edl-study``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        study = load_study(args.study, args.workdir)
        runs = study_runs(study)
        if args.list:
            for index, run in enumerate(runs):
                print(f"{index}\t{run.name}")
            return 0
        only, run_index = "all", None
        if args.prepare:
            only = "prepare"
        elif args.report:
            only = "report"
        elif args.run is not None:
            only = "run"
            run_index = args.run
            if run_index == -1:
                task = os.environ.get("SLURM_ARRAY_TASK_ID")
                if task is None or not task.isdigit():
                    raise StudyError("--run without INDEX needs $SLURM_ARRAY_TASK_ID")
                run_index = int(task)
        if (args.tensorboard_dir or args.wandb_project) and only not in ("all", "report"):
            raise StudyError(
                "--tensorboard-dir and --wandb-project log the report: use them "
                "with --report or without a mode"
            )
        ctx = run_study(study, only=only, run_index=run_index)
        if "study-report" in ctx.results:
            print(ctx.results["study-report"]["tables"])
            print(f"Report: {ctx.report_dir / 'study.md'} and {ctx.report_dir / 'pareto.png'}")
            log_to_trackers(args, ctx.report_dir)
    except (StudyError, qs.QuickstartError, FileNotFoundError) as err:
        print(f"megatron-edl-study: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
