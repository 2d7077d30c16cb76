"""The quickstart: one command from raw text to "baseline vs EDL" on a CPU machine, offline.

Stages, each a function of the run's context, each finished stage remembered by a stamp file
(``<workdir>/stamps/<stage>.json``: a fingerprint of everything the stage's output depends on,
its outputs, its wall time), so that re-running reuses what is done and redoes what changed:

1. ``corpus``: the offline multi-domain corpus (:mod:`megatron_edl.demo.corpus`): labelled
   train/validation JSONL, label vocabulary, coarse label map.
2. ``tokenizer``: a byte-level BPE trained on the train split
   (:mod:`megatron_edl.demo.tokenizer`), loaded by Megatron as ``HuggingFaceTokenizer``.
3. ``preprocess``: both splits into Megatron's indexed format with the domain sidecar
   (:mod:`megatron_edl.data.preprocess`).
4. ``train:<run>``: one pre-training run per comparison arm through the launcher
   (``torchrun -m megatron_edl.pretrain_gpt --cpu``), 2 processes, expert parallelism 2, the
   same seed and therefore the same initialisation and data order: ``baseline`` (EDL off) and
   ``edl``, plus ``edl-random`` (the random-label control, ``--labels random``) and
   ``edl-coarse`` (the three coarse groups as loss domains, ``--labels coarse``), and
   ``edl-clusters-K`` (``--labels clusters:K``: K topic clusters discovered on the train split by
   :mod:`megatron_edl.data.domain_clusters`, stages ``clusters:K`` and ``preprocess:clusters-K``,
   which relabel the same documents; the label-granularity comparison).
5. ``evaluate:<run>``: the run's numbers: Megatron's validation loss after the last iteration
   over the whole validation split, overall and per domain (every run loads the domain labels;
   the baseline with ``--moe-edl-eval-per-domain``, which leaves its training stock), and the
   iteration log's last values.
6. ``report``: ``<workdir>/report/summary.{json,md}``, and the tables printed at the end.

The routing telemetry, evaluation probe and HTML report of the analysis package plug into
stages 4-6 through :func:`telemetry_args`, :func:`evaluate_run` and :func:`write_report`.

Usage:
    python -m megatron_edl.demo.quickstart                      # baseline vs EDL, ~11 min, 2 cores
    python -m megatron_edl.demo.quickstart --labels random coarse  # plus the two controls
    python -m megatron_edl.demo.quickstart --labels clusters:16    # plus EDL on 16 topic clusters
    python -m megatron_edl.demo.quickstart --train-iters 20 --corpus-bytes 64K   # a smoke run
    make quickstart

Modules: this one builds the pipeline and is the command line; the configuration, run specs,
stage machinery (stamps) and data stages are in :mod:`megatron_edl.demo.stages`, the training
stage and the evaluation and report in :mod:`megatron_edl.demo.evaluation` (names used elsewhere
are re-exported here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megatron_edl.demo.evaluation import (
    LAST_LOG_LINES,  # noqa: F401 (re-exported)
    analysis_reports,  # noqa: F401 (re-exported)
    check_training_finished,  # noqa: F401 (re-exported)
    checkpointed_iteration,  # noqa: F401 (re-exported)
    evaluate_run,
    expanded_train_args,
    log_interval,  # noqa: F401 (re-exported)
    parse_iteration_line,
    per_domain_table,
    probe_command,  # noqa: F401 (re-exported)
    probe_dir,  # noqa: F401 (re-exported)
    summary_table,  # noqa: F401 (re-exported)
    telemetry_args,  # noqa: F401 (re-exported)
    train_args,  # noqa: F401 (re-exported)
    train_stage,
    training_command,  # noqa: F401 (re-exported)
    write_report,
)
from megatron_edl.demo.stages import (
    COMPARE,
    CONTROLS,
    DEFAULT_CLUSTERS,
    MODEL_YAML,
    ORTHO_VARIANCE_RUN_FLAGS,  # noqa: F401 (re-exported)
    STAMP_VERSION,  # noqa: F401 (re-exported)
    Context,
    QuickstartConfig,
    QuickstartError,
    RunSpec,
    Stage,
    build_corpus_stage,
    cluster_count,
    cluster_counts,
    clusters_dir,
    coarse_label_map,
    config_json,  # noqa: F401 (re-exported)
    control_labels,
    corpus_inputs,
    edl_flags,  # noqa: F401 (re-exported)
    fit_clusters_stage,
    fit_settings,
    model_setting,
    preprocess_clusters_stage,
    preprocess_stage,
    run_specs,
    run_stage,
    split_prefix,
    stamp_path,  # noqa: F401 (re-exported)
    train_tokenizer_stage,
)

__all__ = [
    "CONTROLS",
    "MODEL_YAML",
    "QuickstartConfig",
    "QuickstartError",
    "RunSpec",
    "cluster_count",
    "control_labels",
    "coarse_label_map",
    "config_from_args",
    "main",
    "model_setting",
    "parse_iteration_line",
    "per_domain_table",
    "run_quickstart",
    "run_specs",
]


# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def data_stages() -> list[Stage]:
    """Stages 1-3, shared by every run: corpus, tokenizer, labelled preprocessing."""
    return [
        Stage(
            "corpus",
            corpus_inputs,
            build_corpus_stage,
            lambda c: [c.corpus_dir / "corpus.json"],
        ),
        Stage(
            "tokenizer",
            lambda c: {"vocab_size": c.config.vocab_size},
            train_tokenizer_stage,
            lambda c: [c.tokenizer_dir / "tokenizer.json"],
            after=("corpus",),
        ),
        Stage(
            "preprocess",
            lambda c: {},
            preprocess_stage,
            lambda c: [Path(f"{split_prefix(c, s)}.idx") for s in ("train", "valid")],
            after=("corpus", "tokenizer"),
        ),
    ]


def cluster_stages(config: QuickstartConfig) -> list[Stage]:
    """For every ``--labels clusters:K``: fit K discovered domains on the corpus, then relabel
    the preprocessed data with them."""
    stages = []
    for k in cluster_counts(config):
        stages.append(
            Stage(
                f"clusters:{k}",
                lambda c, k=k: dataclasses.asdict(fit_settings(c, k)),
                lambda c, k=k: fit_clusters_stage(c, k),
                lambda c, k=k: [clusters_dir(c, k) / "model.edlc"],
                after=("corpus",),
            )
        )
        stages.append(
            Stage(
                f"preprocess:clusters-{k}",
                lambda c: {},
                lambda c, k=k: preprocess_clusters_stage(c, k),
                lambda c, k=k: [
                    Path(f"{split_prefix(c, s, f'clusters-{k}')}.idx") for s in ("train", "valid")
                ],
                after=("preprocess", f"clusters:{k}"),
            )
        )
    return stages


def run_stages(runs: Sequence[RunSpec]) -> list[Stage]:
    """Stages 4-5 of ``runs``: every training, then every evaluation (probe)."""
    stages = [
        Stage(
            f"train:{run.name}",
            lambda c, run=run: {"args": expanded_train_args(c, run)},
            lambda c, run=run: train_stage(c, run),
            lambda c, run=run: [c.run_dir(run.name) / "train.log"],
            after=("preprocess", f"preprocess:{run.data}") if run.data else ("preprocess",),
        )
        for run in runs
    ]
    stages += [
        Stage(
            f"evaluate:{run.name}",
            lambda c: {},
            lambda c, run=run: evaluate_run(c, run),
            lambda c: [],
            after=(f"train:{run.name}",),
        )
        for run in runs
    ]
    return stages


def pipeline(ctx: Context) -> tuple[list[Stage], list[RunSpec]]:
    """The stages, in order, and the runs they train."""
    runs = run_specs(ctx.config, coarse_label_map(ctx.workdir))
    stages = [*data_stages(), *cluster_stages(ctx.config), *run_stages(runs)]
    stages.append(
        Stage(
            "report",
            lambda c: {"runs": [r.name for r in runs]},
            lambda c: write_report(c, runs),
            lambda c: [c.report_dir / "summary.md"],
            after=tuple(f"evaluate:{r.name}" for r in runs),
        )
    )
    return stages, runs


def run_quickstart(
    config: QuickstartConfig, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or reuse) every stage; returns the report's summary (``report/summary.json``)."""
    ctx = Context(config=config, log=log)
    stages, runs = pipeline(ctx)
    start = time.perf_counter()
    for index, stage in enumerate(stages, 1):
        run_stage(stage, ctx, index, len(stages))
    # The report's stamp keeps the times of the run that wrote it; these are this call's.
    total = time.perf_counter() - start
    summary = json.loads((ctx.report_dir / "summary.json").read_text())
    log("")
    log(
        "Stage times, wall (CPU) s: "
        + ", ".join(f"{k} {v:.1f} ({ctx.cpu_times[k]:.1f})" for k, v in ctx.times.items())
    )
    if ctx.reused:
        log(f"Reused from an earlier call: {', '.join(ctx.reused)}")
    log(f"Total: {total:.1f} s")
    log("")
    log(ctx.results["report"]["table"])
    log("")
    log(ctx.results["report"]["per_domain_table"])
    log("")
    log(
        f"Figures: {ctx.report_dir / 'fine' / 'index.html'} and "
        f"{ctx.report_dir / 'coarse' / 'index.html'} (3 groups, ternary plots)"
    )
    log(f"Report: {ctx.report_dir / 'summary.md'} (numbers: {ctx.report_dir / 'summary.json'})")
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The quickstart's flags."""
    from megatron_edl.demo.corpus import parse_size

    defaults = QuickstartConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", default=os.fspath(defaults.workdir), help="Output folder (reused)."
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        action="extend",
        type=_label_control,
        default=[],
        help="Controls, each adding a run: random (permuted labels), coarse (3 groups), "
        f"clusters[:K] (K discovered topic clusters, default {DEFAULT_CLUSTERS}).",
    )
    parser.add_argument(
        "--compare",
        type=lambda text: [part for part in text.split(",") if part],
        action="extend",
        default=[],
        help="Extra runs with the losses of arXiv 2505.22323, comma-separated: ortho+variance "
        "(EDL off, both losses), all (also EDL without them, or with them under --edl-alone).",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--corpus-bytes",
        type=parse_size,
        default=defaults.corpus_bytes_per_domain,
        help="Text per fine domain, e.g. 384K (default).",
    )
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--train-iters", type=int, default=defaults.train_iters)
    parser.add_argument(
        "--eval-iters",
        type=int,
        default=defaults.eval_iters,
        help="Validation batches at the end of each run (default: the whole validation split).",
    )
    parser.add_argument("--edl-coeff", type=float, default=defaults.edl_coeff, help="beta.")
    parser.add_argument(
        "--edl-window-decay",
        type=float,
        default=defaults.edl_window_decay,
        help="Statistics window of the EDL runs (--moe-edl-window-decay; 0: off).",
    )
    parser.add_argument(
        "--edl-warmup-iters",
        type=int,
        default=defaults.edl_warmup_iters,
        help="Linear warm-up of beta (--moe-edl-warmup-iters; 0: off).",
    )
    parser.add_argument(
        "--edl-alone",
        action="store_true",
        help="EDL runs without the orthogonality and variance losses (default: with them, the "
        "best arm of docs/science.md).",
    )
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--nproc", type=int, default=defaults.nproc, help="Processes (= EP).")
    parser.add_argument(
        "--train-args",
        default="",
        help="Extra Megatron flags for every run, one string (e.g. '--num-layers 2').",
    )
    return parser


def _label_control(text: str) -> str:
    """A ``--labels`` value: ``random``, ``coarse`` or ``clusters[:K]`` (as ``clusters:K``)."""
    if text in CONTROLS[:2]:
        return text
    k = cluster_count(text)
    if k is None:
        raise argparse.ArgumentTypeError(
            f"expected random, coarse or clusters:K with K >= 2, got {text!r}"
        )
    return f"clusters:{k}"


def config_from_args(args: argparse.Namespace) -> QuickstartConfig:
    """The :class:`QuickstartConfig` of :func:`build_parser`'s parsed flags (validated)."""
    return QuickstartConfig(
        workdir=Path(args.workdir),
        seed=args.seed,
        controls=(
            *(c for c in CONTROLS[:2] if c in args.labels),
            *(f"clusters:{k}" for k in sorted({cluster_count(c) for c in args.labels} - {None})),
        ),
        compare=tuple(c for c in COMPARE if c in args.compare),
        corpus_bytes_per_domain=args.corpus_bytes,
        vocab_size=args.vocab_size,
        train_iters=args.train_iters,
        eval_iters=args.eval_iters,
        edl_coeff=args.edl_coeff,
        edl_window_decay=args.edl_window_decay,
        edl_warmup_iters=args.edl_warmup_iters,
        edl_with_ortho_variance=not args.edl_alone,
        lr=args.lr,
        nproc=args.nproc,
        extra_train_args=tuple(args.train_args.split()),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``megatron-edl-quickstart``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        run_quickstart(config)
    except (QuickstartError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
