"""The quickstart's training stage (4) and its evaluation and report (5).

Part of :mod:`megatron_edl.demo.quickstart`, which re-exports these names: the training
command line (:func:`train_args`, :func:`training_command`; the training stage's fingerprint
hashes it), the log-line parsing, :func:`evaluate_run` and :func:`write_report`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_edl.demo.stages import (
    Context,
    QuickstartError,
    RunSpec,
    coarse_label_map,
    config_json,
    model_setting,
    split_prefix,
    tokenizer_args,
)

# 4: training
# ----------------------------------------------------------------------------------------------

# The run's numbers are read from Megatron's log lines, on purpose: the training loop reports its
# losses (LM, load balancing, EDL's edl_* metrics) and the validation loss only there and to the
# optional TensorBoard/W&B writers (reading those back would need tensorboard's event reader). The
# routing-statistics dumps of the telemetry hold routing counts and probabilities, and LM loss only
# in the probe's dump, not the training run's; the log lines are also what the live progress bar
# shows while the run trains.
_ITERATION_RE = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|(.*)$")
_VALIDATION_RE = re.compile(r"validation loss at iteration (\d+) on validation set \|(.*)$")
_SHARES_RE = re.compile(r"validation token shares \|(.*)$")  # integration.gpt.SHARE_LINE
_METRIC_RE = re.compile(r"\s*([^|:]+?):\s*([-+0-9.eE]+|nan|inf)\s*$", re.IGNORECASE)


def _metrics(fields: str) -> dict[str, float]:
    out = {}
    for field in fields.split("|"):
        match = _METRIC_RE.match(field)
        if match:
            out[match.group(1).strip()] = float(match.group(2))
    return out


def parse_iteration_line(line: str) -> tuple[int, int, dict[str, float]] | None:
    """``(iteration, train_iters, metrics)`` of a Megatron ``iteration N/M | k: v | ...`` line.

    Args:
        line: A line of Megatron's log.

    Returns:
        The parsed line, or ``None`` for any other line.
    """
    match = _ITERATION_RE.search(line)
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), _metrics(match.group(3))


def telemetry_args(ctx: Context, run: RunSpec) -> list[str]:
    """Flags that make a run write routing statistics (the analysis package's telemetry).

    The same flags for every run, EDL on or off, so the baseline's routing is measured like
    EDL's: about ten dumps per run into ``runs/<run>/stats`` (training labels: the fine domains,
    or the control's labels).
    """
    interval = max(1, ctx.config.train_iters // 10)
    stats = ctx.run_dir(run.name) / "stats"
    return ["--moe-edl-stats-interval", str(interval), "--moe-edl-stats-dir", os.fspath(stats)]


def probe_dir(ctx: Context, run: RunSpec) -> Path:
    """Where the probe's dump of ``run`` goes: next to its training dumps when both use the fine
    labels (the report then has the run's series and the probe snapshot), else its own folder."""
    return ctx.run_dir(run.name) / ("stats" if run.fine_labels else "probe")


# The run flags the probe drops: it evaluates every run on the data's own fine labels.
_TRAINING_LABEL_FLAGS = ("--moe-edl-labels", "--moe-edl-random-seed", "--moe-edl-label-map")


def probe_command(ctx: Context, run: RunSpec) -> list[str]:
    """``torchrun ... -m megatron_edl.probe --out DIR <the run's flags> --load CKPT``."""
    return [
        sys.executable,
        *("-m", "torch.distributed.run", f"--nproc-per-node={ctx.config.nproc}"),
        f"--master-port={_free_port()}",
        *("-m", "megatron_edl.probe", "--out", os.fspath(probe_dir(ctx, run))),
        *_probe_flags(ctx, run),
    ]


def prune_dir(ctx: Context, run: RunSpec) -> Path:
    """Where the pruning evaluation of ``run`` writes (:mod:`megatron_edl.prune`)."""
    return ctx.run_dir(run.name) / "prune"


def prune_command(ctx: Context, run: RunSpec) -> list[str]:
    """``python -m megatron_edl.prune --out DIR -- <the probe's flags>``: the random ranking
    seeded with the run's own ``--seed`` (the last one of its command line)."""
    from megatron_edl.prune import last_flag_value

    flags = _probe_flags(ctx, run)
    seed = last_flag_value(flags, "--seed") or "0"
    return [
        sys.executable,
        *("-m", "megatron_edl.prune", "--out", os.fspath(prune_dir(ctx, run))),
        *("--nproc", str(ctx.config.nproc), "--seed", seed, "--"),
        *flags,
    ]


def prune_run(ctx: Context, run: RunSpec) -> dict[str, Any]:
    """The study's pruning stage: the loss increase per (ranking, m) of one checkpoint."""
    log_path = ctx.run_dir(run.name) / "prune.log"
    with open(log_path, "w", encoding="utf-8") as log:
        returncode = subprocess.run(
            prune_command(ctx, run), env=_training_env(ctx), stdout=log, stderr=subprocess.STDOUT
        ).returncode
    summary_path = prune_dir(ctx, run) / "prune.json"
    if returncode != 0 or not summary_path.exists():
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-10:])
        raise QuickstartError(
            f"prune:{run.name}: exit status {returncode}; full log: {log_path}\n{tail}"
        )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return {"full": summary["full"], "curves": summary["curves"]}


def _probe_flags(ctx: Context, run: RunSpec) -> list[str]:
    """The launcher flags of ``run``'s probe: ``--cpu``, the run's flags (less its training
    labels, plus ``--moe-edl-eval-per-domain``), ``--load CKPT``."""
    flags: list[str] = []
    run_flags = list(run.flags)
    i = 0
    while i < len(run_flags):
        if run_flags[i] in _TRAINING_LABEL_FLAGS:
            i += 2
            continue
        flags.append(run_flags[i])
        i += 1
    probe_run = dataclasses.replace(run, flags=(*flags, "--moe-edl-eval-per-domain"), data="")
    args = train_args(ctx, probe_run, telemetry=False)
    save = args.index("--save")
    del args[save : save + 4]  # --save DIR --save-interval N
    return ["--cpu", *args, "--load", os.fspath(ctx.run_dir(run.name) / "checkpoints")]


def train_args(ctx: Context, run: RunSpec, *, telemetry: bool = True) -> list[str]:
    """Every Megatron flag of ``run`` after ``--cpu`` (the model, data, schedule, EDL flags).

    The model is ``--config-yaml`` :attr:`QuickstartConfig.model`; the flags after it come from
    the quickstart's own options (``--nproc``, ``--train-iters``, ``--lr``, ``--seed``, the
    workdir) or are fixed here (no data workers, cosine decay, weight decay 0.01, clipping 1.0):
    a fixed flag moved into the YAML would move in the expanded command line, which is what a
    training stage's stamp hashes (:func:`expanded_train_args`), and every run trained so far
    (studies resumed over several sittings) would train again.
    """
    config = ctx.config
    run_dir = ctx.run_dir(run.name)
    return [
        *("--config-yaml", os.fspath(config.model)),  # expanded in place by the launcher
        *("--expert-model-parallel-size", str(config.nproc)),
        *("--train-data-path", str(split_prefix(ctx, "train", run.data))),
        *("--valid-data-path", str(split_prefix(ctx, "valid", run.data))),
        *tokenizer_args(ctx),
        *("--num-workers", "0"),
        *("--micro-batch-size", str(config.micro_batch_size)),
        *("--global-batch-size", str(config.global_batch_size)),
        *("--train-iters", str(config.train_iters)),
        *("--lr", str(config.lr), "--min-lr", str(config.lr / 10)),
        *("--lr-decay-style", "cosine"),
        *("--lr-warmup-iters", str(max(1, config.train_iters // 20))),
        *("--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", str(config.seed)),
        *("--log-interval", str(log_interval(config.train_iters))),
        *("--eval-iters", str(_eval_iters(ctx))),
        *("--eval-interval", str(config.train_iters + 1)),  # only the final evaluation
        *("--save", str(run_dir / "checkpoints"), "--save-interval", str(config.train_iters)),
        *(telemetry_args(ctx, run) if telemetry else []),
        *run.flags,
        *config.extra_train_args,
    ]


def expanded_train_args(ctx: Context, run: RunSpec) -> list[str]:
    """:func:`train_args` with the model's run config expanded: what a training stage's stamp
    depends on (an edit of the YAML reruns the runs; the same flags as when the model was
    written in Python, so the stamps of runs trained before stay valid)."""
    from megatron_edl.yaml_config import expand_config_flag

    return expand_config_flag(train_args(ctx, run))


def _eval_iters(ctx: Context) -> int:
    if ctx.config.eval_iters is not None:
        return ctx.config.eval_iters
    tokens = ctx.results["preprocess"]["tokens"]["valid"]
    seq_length = int(model_setting(ctx.config.model, "seq-length"))
    per_iteration = ctx.config.global_batch_size * seq_length
    return max(1, tokens // per_iteration)


def log_interval(train_iters: int) -> int:
    """About 20 log lines, at most every 10 iterations, and a divisor of ``train_iters`` (the
    last iteration is logged: the report averages the last lines)."""
    cap = max(1, min(10, train_iters // 20))
    return next(d for d in range(cap, 0, -1) if train_iters % d == 0)


def checkpointed_iteration(checkpoints: Path) -> int | None:
    """The iteration of the last complete checkpoint in ``checkpoints``, from Megatron's tracker
    file ``latest_checkpointed_iteration.txt`` (written after the checkpoint), or ``None``."""
    try:
        text = (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def check_training_finished(
    name: str, returncode: int, checkpoints: Path, train_iters: int, log_path: Path
) -> None:
    """Raise unless the run exited 0 and checkpointed its last iteration (``--save-interval``
    is ``train_iters``): what the later stages load, whatever the log interval.

    Raises:
        QuickstartError: naming the exit status, the checkpointed iteration and the log.
    """
    last = checkpointed_iteration(checkpoints)
    if returncode != 0 or last != train_iters:
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-30:])
        raise QuickstartError(
            f"train:{name}: exit status {returncode}, last checkpoint at iteration {last} of "
            f"{train_iters} in {checkpoints}; full log: {log_path}\n{tail}"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_command(ctx: Context, run: RunSpec) -> list[str]:
    """``python -m torch.distributed.run ... -m megatron_edl.pretrain_gpt --cpu <flags>``."""
    return [
        sys.executable,
        *("-m", "torch.distributed.run", f"--nproc-per-node={ctx.config.nproc}"),
        f"--master-port={_free_port()}",
        *("-m", "megatron_edl.pretrain_gpt", "--cpu"),
        *train_args(ctx, run),
    ]


def _training_env(ctx: Context) -> dict[str, str]:
    threads = max(1, (os.cpu_count() or 1) // ctx.config.nproc)
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


class _TrainProgress:
    """A tqdm bar over iterations on a terminal, else a line every tenth of the run."""

    def __init__(self, ctx: Context, run: str, total: int) -> None:
        from tqdm import tqdm

        self.ctx, self.run, self.total = ctx, run, total
        self.bar = tqdm(total=total, desc=f"  {run}", unit="it", file=sys.stderr, disable=None)
        self.start = time.perf_counter()
        self.done = 0
        self.step = max(1, total // 10)

    def update(self, iteration: int, metrics: dict[str, float]) -> None:
        shown = {k: metrics[k] for k in ("lm loss", "edl_jsd", "edl_mi") if k in metrics}
        text = ", ".join(f"{k} {v:.3f}" for k, v in shown.items())
        if not self.bar.disable:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(iteration - self.done)
        elif iteration // self.step > self.done // self.step or iteration == self.total:
            elapsed = time.perf_counter() - self.start
            self.ctx.log(
                f"  {self.run}: iteration {iteration}/{self.total}, {text} ({elapsed:.0f} s)"
            )
        self.done = iteration

    def close(self) -> None:
        self.bar.close()


def train_stage(ctx: Context, run: RunSpec) -> dict[str, Any]:
    """Stage 4: one training run; its full log is ``runs/<run>/train.log``."""
    run_dir = ctx.run_dir(run.name)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    command = training_command(ctx, run)
    (run_dir / "command.txt").write_text(" ".join(command[1:]) + "\n")
    log_path = run_dir / "train.log"
    iterations: dict[int, dict[str, float]] = {}
    validation: dict[str, float] = {}
    shares: dict[str, float] = {}
    progress = _TrainProgress(ctx, run.name, ctx.config.train_iters)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command,
            env=_training_env(ctx),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            parsed = parse_iteration_line(line)
            if parsed is not None:
                iterations[parsed[0]] = parsed[2]
                progress.update(parsed[0], parsed[2])
            share_line = _SHARES_RE.search(line)  # printed just before its loss line
            if share_line:
                shares = _metrics(share_line.group(1))
            match = _VALIDATION_RE.search(line)
            if match:
                validation = {**_metrics(match.group(2)), **shares}
        returncode = process.wait()
    progress.close()
    check_training_finished(
        run.name, returncode, run_dir / "checkpoints", ctx.config.train_iters, log_path
    )
    return {
        "iterations": {str(k): v for k, v in sorted(iterations.items())},
        "validation": validation,
        "checkpoint": os.fspath(run_dir / "checkpoints"),
    }


# ----------------------------------------------------------------------------------------------
# 5-6: evaluation and report
# ----------------------------------------------------------------------------------------------

LAST_LOG_LINES = 5
"""Training metrics are averaged over this many last log lines (the log is noisy)."""


_PER_DOMAIN_RE = re.compile(r"^(lm loss|token share)/(.+) value$")


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def evaluate_run(ctx: Context, run: RunSpec) -> dict[str, Any]:
    """Stage 5: the numbers of one run.

    Today: Megatron's validation LM loss at the end of training, overall and per loss domain
    (``lm loss/<domain>``, with each domain's share of the validation tokens; a domain absent
    from the validation batches has none), and the mean of the last :data:`LAST_LOG_LINES`
    logged values of the training LM loss, the load-balancing loss and, for EDL runs, the EDL
    metrics (mean pairwise JSD and I(domain; expert), averaged over MoE layers). Then the
    evaluation probe (:mod:`megatron_edl.probe`) runs the checkpoint over the validation split
    on the data's fine labels (every run alike, controls included) and writes the routing
    statistics the report reads (:func:`probe_dir`).
    """
    command = probe_command(ctx, run)
    log_path = ctx.run_dir(run.name) / "probe.log"
    with open(log_path, "w", encoding="utf-8") as log:
        returncode = subprocess.run(
            command, env=_training_env(ctx), stdout=log, stderr=subprocess.STDOUT
        ).returncode
    dumps = list(probe_dir(ctx, run).glob("*probe*.json"))
    if returncode != 0 or not dumps:
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-30:])
        raise QuickstartError(
            f"evaluate:{run.name}: probe exit status {returncode}, {len(dumps)} probe dumps; "
            f"full log: {log_path}\n{tail}"
        )
    trained = ctx.results[f"train:{run.name}"]
    iterations = [trained["iterations"][k] for k in sorted(trained["iterations"], key=int)]
    recent = iterations[-LAST_LOG_LINES:]

    def mean(name: str) -> float | None:
        values = [m[name] for m in recent if name in m]
        return _finite(sum(values) / len(values)) if values else None

    per_domain: dict[str, float | None] = {}
    shares: dict[str, float | None] = {}
    for key, value in trained["validation"].items():
        match = _PER_DOMAIN_RE.match(key)
        if match:
            target = per_domain if match.group(1) == "lm loss" else shares
            target[match.group(2)] = _finite(value)
    return {
        "valid_lm_loss": _finite(trained["validation"].get("lm loss value")),
        "valid_lm_loss_per_domain": per_domain,
        "valid_token_share_per_domain": shares,
        "train_lm_loss": mean("lm loss"),
        "load_balancing_loss": mean("load_balancing_loss"),
        "edl_jsd": mean("edl_jsd"),
        "edl_mi": mean("edl_mi"),
    }


_TABLE_COLUMNS = (
    ("valid_lm_loss", "valid LM loss"),
    ("train_lm_loss", "train LM loss"),
    ("probe_mi", "I(D;E)"),
    ("probe_jsd", "mean JSD"),
    ("probe_balance", "load max/mean"),
    ("load_balancing_loss", "LB loss"),
)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_table(runs: Sequence[RunSpec], evaluations: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per run, the evaluation's numbers as columns."""
    header = "| run | " + " | ".join(title for _, title in _TABLE_COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(_TABLE_COLUMNS) + 1)]
    for run in runs:
        values = evaluations[run.name]
        cells = [_cell(values.get(key)) for key, _ in _TABLE_COLUMNS]
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_domain_table(runs: Sequence[RunSpec], evaluations: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the validation LM loss: one row per domain, one column per run.

    Rows are the union of the runs' loss domains in order of appearance (a run with other loss
    domains, e.g. the coarse groups, has ``n/a`` in the others), then the overall loss.
    """
    domains: dict[str, None] = {}
    for run in runs:
        domains.update(dict.fromkeys(evaluations[run.name].get("valid_lm_loss_per_domain", {})))
    header = "| domain | " + " | ".join(run.name for run in runs) + " |"
    lines = [header, "|" + " --- |" * (len(runs) + 1)]
    for domain in domains:
        cells = [
            _cell(evaluations[run.name].get("valid_lm_loss_per_domain", {}).get(domain))
            for run in runs
        ]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    overall = [_cell(evaluations[run.name].get("valid_lm_loss")) for run in runs]
    lines.append("| all | " + " | ".join(overall) + " |")
    return "\n".join(lines)


def analysis_reports(ctx: Context, runs: Sequence[RunSpec]) -> dict[str, dict[str, Any]]:
    """The analysis reports of the runs' probes (:mod:`megatron_edl.analysis.report`).

    ``report/fine/index.html``: the fine domains (heat maps per layer, I(D;E) and JSD versus step
    from the training dumps of the runs trained on fine labels, load balance, Jaccard, entropy);
    ``report/coarse/index.html``: the same grouped into the 3 coarse domains with the corpus's
    label map, with the ternary plot. Returns, per run, the probe's I(D;E), mean JSD (dense
    probabilities, fine domains) and max/mean expert load, averaged over the MoE layers
    (``probe_mi``, ``probe_jsd``, ``probe_balance``) and per layer (``probe_per_layer``: a list of
    ``{"layer", "mi", "jsd", "balance"}``).
    """
    from megatron_edl.analysis import report

    options = report.ReportOptions(source="probe", title="Quickstart: expert specialization")
    label_map = coarse_label_map(ctx.workdir)
    numbers: dict[str, dict[str, Any]] = {}
    for name, grouping in (("fine", None), ("coarse", label_map)):
        loaded = [
            report.load_report_run(run.name, probe_dir(ctx, run), options, label_map=grouping)
            for run in runs
        ]
        report.write_report(loaded, ctx.report_dir / name, options)
        if grouping is None:
            for data in loaded:
                layers = data.snapshot_metrics
                numbers[data.name] = {
                    "probe_mi": sum(m.mi for m in layers) / len(layers),
                    "probe_mi_hard": sum(m.mi_hard for m in layers) / len(layers),
                    "probe_jsd": sum(m.jsd_mean for m in layers) / len(layers),
                    "probe_balance": sum(m.balance.max_over_mean for m in layers) / len(layers),
                    "probe_per_layer": [
                        {
                            "layer": m.layer,
                            "mi": m.mi,
                            "jsd": m.jsd_mean,
                            "balance": m.balance.max_over_mean,
                        }
                        for m in layers
                    ],
                }
    return numbers


def write_report(ctx: Context, runs: Sequence[RunSpec]) -> dict[str, Any]:
    """Stage 6: the analysis reports (:func:`analysis_reports`), ``report/summary.json`` and
    ``report/summary.md``."""
    ctx.report_dir.mkdir(parents=True, exist_ok=True)
    evaluations = {run.name: dict(ctx.results[f"evaluate:{run.name}"]) for run in runs}
    for name, values in analysis_reports(ctx, runs).items():
        evaluations[name].update(values)
    table = summary_table(runs, evaluations)
    domain_table = per_domain_table(runs, evaluations)
    summary = {
        "runs": [dataclasses.asdict(run) for run in runs],
        "evaluations": evaluations,
        "corpus": ctx.results.get("corpus", {}),
        "stage_seconds": dict(ctx.times),
        "stage_cpu_seconds": dict(ctx.cpu_times),
        "config": config_json(ctx.config),
    }
    (ctx.report_dir / "summary.json").write_text(
        json.dumps(summary, indent=2, default=os.fspath) + "\n"
    )
    notes = [
        "# Quickstart: baseline vs EDL",
        "",
        table,
        "",
        "valid LM loss: Megatron's validation loss after the last iteration; train LM loss and "
        f"LB loss (load-balancing loss) average the last {LAST_LOG_LINES} training log lines. "
        "I(D;E) (nats), mean pairwise JSD (dense routing probabilities) and max/mean expert load "
        "come from the evaluation probe of each checkpoint on the validation split with the "
        "fine domain labels (every run alike), averaged over the MoE layers. Figures: "
        "fine/index.html (heat maps, I(D;E) and JSD versus step) and coarse/index.html "
        "(3 groups, ternary plot).",
        "",
        "## Validation LM loss per domain",
        "",
        domain_table,
        "",
        "Runs:",
        *[f"- {run.name}: {run.description}" for run in runs],
    ]
    (ctx.report_dir / "summary.md").write_text("\n".join(notes) + "\n")
    return {"table": table, "per_domain_table": domain_table}
