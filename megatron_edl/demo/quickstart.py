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
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CONTROLS",
    "MODEL_YAML",
    "QuickstartConfig",
    "QuickstartError",
    "RunSpec",
    "cluster_count",
    "coarse_label_map",
    "main",
    "model_setting",
    "parse_iteration_line",
    "per_domain_table",
    "run_quickstart",
    "run_specs",
]

STAMP_VERSION = 1
CONTROLS = ("random", "coarse", "clusters")
"""Values of ``--labels``: each adds a run."""
DEFAULT_CLUSTERS = 16
"""K of ``--labels clusters`` without ``:K``."""
COMPARE = ("ortho+variance", "all")
"""Extra runs with the losses of arXiv 2505.22323 (``--compare``): both losses with EDL off, and
EDL with both losses, each auto-calibrated to the released code's targets."""
ORTHO_VARIANCE_RUN_FLAGS = (
    "--moe-ortho-loss-coeff", "1.0", "--moe-variance-loss-coeff", "1.0",
    "--moe-specialization-auto-calibrate",
)  # fmt: skip
"""The flags of the ``--compare`` runs (not :data:`megatron_edl.config.SPECIALIZATION_FLAGS`,
the losses' field -> flag table)."""


class QuickstartError(RuntimeError):
    """A stage failed; the message names the stage and where its log is."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


MODEL_YAML = Path(__file__).with_name("quickstart_model.yaml")
"""The MoE GPT the quickstart trains: a run config (:mod:`megatron_edl.yaml_config`) passed to
the launcher with ``--config-yaml``; package data, so the installed console script finds it."""


def model_setting(model: Path, key: str) -> Any:
    """The value of flag ``key`` (no dashes, e.g. ``seq-length``) in the model's run config.

    Raises:
        ValueError: The config does not set ``key``.
    """
    from megatron_edl.yaml_config import load_config

    for entries in load_config(model).values():
        if key in entries:
            return entries[key]
    raise ValueError(f"{model}: the quickstart's model config must set {key!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuickstartConfig:
    """Everything the quickstart's outputs depend on (its command-line flags)."""

    workdir: Path = Path("runs/quickstart")
    """Where every stage writes (corpus/, tokenizer/, data/, runs/<run>/, report/, stamps/)."""
    seed: int = 1234
    """One seed for the corpus, the initialisation and the data order of every run."""
    controls: tuple[str, ...] = ()
    """Extra runs: ``random``, ``coarse``, ``clusters:K`` (see :data:`CONTROLS`)."""
    compare: tuple[str, ...] = ()
    """Extra runs with the orthogonality and variance losses (see :data:`COMPARE`)."""
    corpus_bytes_per_domain: int = 384 << 10
    """Text per fine domain (train + validation)."""
    valid_fraction: float = 0.1
    vocab_size: int = 4096
    model: Path = MODEL_YAML
    """The model's run config (Megatron flags; ``--train-args`` may override them)."""
    train_iters: int = 500
    micro_batch_size: int = 4
    global_batch_size: int = 8
    lr: float = 2e-3
    edl_coeff: float = 0.01
    """β of the EDL runs."""
    eval_iters: int | None = None
    """Validation batches evaluated at the end of each run; ``None``: as many as the validation
    split fills (every validation token once)."""
    nproc: int = 2
    """Training processes (expert parallelism = nproc)."""
    extra_train_args: tuple[str, ...] = ()
    """Megatron flags appended to every run's command line."""

    def __post_init__(self) -> None:
        unknown = [c for c in self.controls if c not in CONTROLS[:2] and cluster_count(c) is None]
        if unknown:
            raise ValueError(
                f"--labels must be among random, coarse, clusters:K (K >= 2), got {unknown}"
            )
        unknown = [c for c in self.compare if c not in COMPARE]
        if unknown:
            raise ValueError(f"--compare must be among {list(COMPARE)}, got {unknown}")
        if self.train_iters < 1 or (self.eval_iters is not None and self.eval_iters < 1):
            raise ValueError(
                f"--train-iters and --eval-iters must be >= 1, got {self.train_iters}, "
                f"{self.eval_iters}"
            )
        num_experts = int(model_setting(self.model, "num-experts"))
        if self.nproc < 1 or num_experts % self.nproc:
            raise ValueError(
                f"--nproc ({self.nproc}) must divide the number of experts ({num_experts})"
            )
        if self.global_batch_size % (self.micro_batch_size * self.nproc):
            raise ValueError(
                f"the global batch ({self.global_batch_size}) must be a multiple of micro batch "
                f"({self.micro_batch_size}) x processes ({self.nproc})"
            )


def cluster_count(control: str) -> int | None:
    """K of a ``clusters`` / ``clusters:K`` control (None for any other value)."""
    match = re.fullmatch(r"clusters(?::(\d+))?", control)
    if match is None:
        return None
    k = int(match.group(1) or DEFAULT_CLUSTERS)
    return k if k >= 2 else None


def coarse_label_map(workdir: Path) -> Path:
    """The corpus's coarse label map (fine domain -> code, text, math) in a quickstart workdir."""
    from megatron_edl.demo.corpus import COARSE_MAP_FILE

    return Path(workdir) / "corpus" / COARSE_MAP_FILE


def cluster_counts(config: QuickstartConfig) -> list[int]:
    """The K of every ``clusters:K`` control, ascending, without repeats."""
    return sorted({k for k in map(cluster_count, config.controls) if k is not None})


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison: its name and the flags only it has (EDL's)."""

    name: str
    description: str
    flags: tuple[str, ...]
    fine_labels: bool = True
    """Whether the run trains on the fine data labels (its training telemetry then shares the
    probe's domains); False for the controls (permuted labels, coarse groups, clusters)."""
    data: str = ""
    """The run's own preprocessed data (a folder under ``data/``, e.g. ``clusters-16``: the same
    documents with other labels); ``""``: the corpus's fine labels."""


def run_specs(config: QuickstartConfig, label_map: Path) -> list[RunSpec]:
    """The runs to train: baseline, EDL, then the chosen controls (in :data:`CONTROLS` order).

    Args:
        config: The quickstart's configuration.
        label_map: The corpus's coarse label map (for the ``coarse`` control).

    Returns:
        The runs, baseline first.
    """
    beta = ("--moe-edl-coeff", str(config.edl_coeff))
    runs = [
        RunSpec(
            "baseline",
            "EDL off (Megatron's load-balancing loss only); the domain labels are loaded for the "
            "per-domain validation loss only",
            ("--moe-edl-eval-per-domain",),
        ),
        RunSpec("edl", f"EDL on the fine domains, beta = {config.edl_coeff}", beta),
    ]
    if "random" in config.controls:
        runs.append(
            RunSpec(
                "edl-random",
                "EDL with the documents' labels randomly permuted (the control)",
                (*beta, "--moe-edl-labels", "random", "--moe-edl-random-seed", str(config.seed)),
                fine_labels=False,
            )
        )
    if "coarse" in config.controls:
        runs.append(
            RunSpec(
                "edl-coarse",
                "EDL on the 3 coarse groups (code, text, math)",
                (*beta, "--moe-edl-label-map", os.fspath(label_map)),
                fine_labels=False,
            )
        )
    for k in cluster_counts(config):
        runs.append(
            RunSpec(
                f"edl-clusters-{k}",
                f"EDL on {k} topic clusters discovered on the train split (TF-IDF + k-means)",
                beta,
                fine_labels=False,
                data=f"clusters-{k}",
            )
        )
    if "ortho+variance" in config.compare:
        runs.append(
            RunSpec(
                "ortho+variance",
                "EDL off; orthogonality and variance losses (arXiv 2505.22323), auto-calibrated",
                ("--moe-edl-eval-per-domain", *ORTHO_VARIANCE_RUN_FLAGS),
            )
        )
    if "all" in config.compare:
        runs.append(
            RunSpec(
                "edl+ortho+variance",
                f"EDL (beta = {config.edl_coeff}) with the orthogonality and variance losses",
                (*beta, *ORTHO_VARIANCE_RUN_FLAGS),
            )
        )
    return runs


# ----------------------------------------------------------------------------------------------
# Stages and stamps
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What stages share: the configuration, the folders, the results of earlier stages."""

    config: QuickstartConfig
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    cpu_times: dict[str, float] = dataclasses.field(default_factory=dict)
    reused: list[str] = dataclasses.field(default_factory=list)
    log: Callable[[str], None] = print

    @property
    def workdir(self) -> Path:
        return Path(self.config.workdir)

    @property
    def corpus_dir(self) -> Path:
        return self.workdir / "corpus"

    @property
    def tokenizer_dir(self) -> Path:
        return self.workdir / "tokenizer"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def run_dir(self, run: str) -> Path:
        return self.workdir / "runs" / run

    @property
    def report_dir(self) -> Path:
        return self.workdir / "report"


@dataclasses.dataclass(frozen=True)
class Stage:
    """A step of the pipeline.

    Attributes:
        name: Stage name (``train:edl``); also the stamp's file name.
        inputs: Context -> JSON-able description of what the output depends on, besides the
            stages in ``after`` (whose fingerprints are included).
        run: Context -> result (JSON-able; stored in the stamp and given to later stages).
        outputs: Context -> paths that must exist for a stamp to count.
        after: Earlier stages whose output this one reads.
    """

    name: str
    inputs: Callable[[Context], Any]
    run: Callable[[Context], dict[str, Any]]
    outputs: Callable[[Context], list[Path]]
    after: tuple[str, ...] = ()


def _fingerprint(stage: Stage, ctx: Context) -> str:
    payload = {
        "version": STAMP_VERSION,
        "stage": stage.name,
        "inputs": stage.inputs(ctx),
        "after": {name: ctx.fingerprints[name] for name in stage.after},
    }
    text = json.dumps(payload, sort_keys=True, default=os.fspath)
    return hashlib.sha256(text.encode()).hexdigest()


def stamp_path(ctx: Context, stage: Stage) -> Path:
    """Where ``stage``'s stamp is (``<workdir>/stamps/<stage>.json``)."""
    return ctx.workdir / "stamps" / (stage.name.replace(":", "-") + ".json")


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_stage(stage: Stage, ctx: Context, index: int, total: int) -> dict[str, Any]:
    """Run ``stage``, or reuse its earlier result when its stamp matches (see module doc)."""
    fingerprint = _fingerprint(stage, ctx)
    ctx.fingerprints[stage.name] = fingerprint
    stamp = stamp_path(ctx, stage)
    prefix = f"[quickstart {index}/{total}] {stage.name}"
    if stamp.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("fingerprint") == fingerprint and all(p.exists() for p in stage.outputs(ctx)):
            ctx.results[stage.name] = saved["result"]
            ctx.times[stage.name] = saved["seconds"]
            ctx.cpu_times[stage.name] = saved["cpu_seconds"]
            ctx.reused.append(stage.name)
            ctx.log(f"{prefix}: reused (finished earlier in {saved['seconds']:.1f} s)")
            return saved["result"]
    stamp.unlink(missing_ok=True)
    ctx.log(f"{prefix}: running")
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    result = stage.run(ctx)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    ctx.results[stage.name] = result
    ctx.times[stage.name] = seconds
    ctx.cpu_times[stage.name] = cpu_seconds
    stamp.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage.name, "fingerprint": fingerprint, "seconds": seconds}
    record.update(cpu_seconds=cpu_seconds, result=result)
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=os.fspath) + "\n")
    os.replace(tmp, stamp)
    ctx.log(f"{prefix}: done in {seconds:.1f} s ({cpu_seconds:.1f} s of CPU)")
    return result


# ----------------------------------------------------------------------------------------------
# 1-3: corpus, tokenizer, preprocessing
# ----------------------------------------------------------------------------------------------


def _corpus_config(ctx: Context):
    from megatron_edl.demo.corpus import CorpusConfig

    return CorpusConfig(
        output_dir=ctx.corpus_dir,
        seed=ctx.config.seed,
        max_bytes_per_domain=ctx.config.corpus_bytes_per_domain,
        valid_fraction=ctx.config.valid_fraction,
    )


def _corpus_inputs(ctx: Context) -> Any:
    config = _corpus_config(ctx).to_json()
    config.pop("output_dir")
    return config


def build_corpus_stage(ctx: Context) -> dict[str, Any]:
    """Stage 1: the corpus; logs its table."""
    from megatron_edl.demo.corpus import build_corpus

    report = build_corpus(_corpus_config(ctx))
    ctx.log(report.table())
    return {
        "domains": [d.name for d in report.present],
        "groups": {d.name: d.group for d in report.present},
        "documents": {d.name: d.documents for d in report.present},
        "missing_sources": [f"{s.name} ({d}): {s.missing}" for d, s in report.missing_sources],
    }


def train_tokenizer_stage(ctx: Context) -> dict[str, Any]:
    """Stage 2: the BPE tokenizer, trained on the corpus's train split."""
    from megatron_edl.demo.tokenizer import jsonl_texts, train_bpe_tokenizer

    if ctx.tokenizer_dir.exists():
        shutil.rmtree(ctx.tokenizer_dir)
    train_bpe_tokenizer(
        jsonl_texts([ctx.corpus_dir / "train.jsonl"]),
        ctx.tokenizer_dir,
        vocab_size=ctx.config.vocab_size,
        min_frequency=2,
    )
    vocab = json.loads((ctx.tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return {"vocab_size": len(vocab)}


def _tokenizer_args(ctx: Context) -> list[str]:
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(ctx.tokenizer_dir)]


def _prefix(ctx: Context, split: str, data: str = "") -> Path:
    return (ctx.data_dir / data if data else ctx.data_dir) / f"{split}_text_document"


def preprocess_stage(ctx: Context) -> dict[str, Any]:
    """Stage 3: both splits to Megatron's indexed format plus the domain sidecar."""
    labels = ["--domain-field", "domain", "--label-vocab", str(ctx.corpus_dir / "labels.yaml")]
    return _preprocess_splits(ctx, "", labels, "preprocess")


def _preprocess_splits(
    ctx: Context, data: str, label_args: Sequence[str], stage: str
) -> dict[str, Any]:
    """Both splits into ``data/<data>/`` (``data/`` itself for ``""``) with the given labels."""
    from megatron_edl.data import preprocess

    out_dir = ctx.data_dir / data if data else ctx.data_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tokens = {}
    for split in ("train", "valid"):
        argv = [
            *("--input", str(ctx.corpus_dir / f"{split}.jsonl")),
            *("--output-prefix", str(out_dir / split)),
            *_tokenizer_args(ctx),
            "--append-eod",
            *label_args,
            *("--workers", "1"),  # a few MB: worker start-up would cost more than it saves
            *("--log-interval", "100000"),
        ]
        if preprocess.main(argv) != 0:
            raise QuickstartError(f"{stage}: preprocessing the {split} split failed (above)")
        stats = json.loads(Path(f"{_prefix(ctx, split, data)}.stats.json").read_text())
        tokens[split] = stats["tokens_written"]
        ctx.log(
            f"  {split}: {stats['documents_written']} documents, {stats['tokens_written']} tokens"
        )
    return {"tokens": tokens}


def _clusters_dir(ctx: Context, k: int) -> Path:
    return ctx.workdir / "clusters" / f"k{k}"


def _fit_settings(ctx: Context, k: int):
    from megatron_edl.data.domain_clusters import FitSettings

    return FitSettings(num_clusters=k, seed=ctx.config.seed)


def fit_clusters_stage(ctx: Context, k: int) -> dict[str, Any]:
    """Stage ``clusters:K``: K topic clusters fitted on the train split (the run's seed)."""
    from megatron_edl.data.domain_clusters import fit_from_inputs

    folder = _clusters_dir(ctx, k)
    folder.mkdir(parents=True, exist_ok=True)
    model = fit_from_inputs([str(ctx.corpus_dir / "train.jsonl")], _fit_settings(ctx, k))
    model.save(folder / "model.edlc")
    sizes = model.header["sample"]["cluster_documents"]
    ctx.log("  " + ", ".join(f"{n} ({d})" for n, d in zip(model.names, sizes, strict=True)))
    return {"names": model.names, "sample_documents": sizes}


def preprocess_clusters_stage(ctx: Context, k: int) -> dict[str, Any]:
    """Stage ``preprocess:clusters-K``: the same documents labelled with the K clusters (a
    document without any of the model's terms keeps its place under ``unclustered``)."""
    labels = [
        *("--domain-clusters", str(_clusters_dir(ctx, k) / "model.edlc")),
        *("--on-missing", "fallback:unclustered"),
    ]
    result = _preprocess_splits(ctx, f"clusters-{k}", labels, f"preprocess:clusters-{k}")
    if result["tokens"] != ctx.results["preprocess"]["tokens"]:
        raise QuickstartError(
            f"preprocess:clusters-{k}: {result['tokens']} tokens, the fine-label data has "
            f"{ctx.results['preprocess']['tokens']}: not the same documents"
        )
    return result


# ----------------------------------------------------------------------------------------------
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
    return [
        sys.executable,
        *("-m", "torch.distributed.run", f"--nproc-per-node={ctx.config.nproc}"),
        f"--master-port={_free_port()}",
        *("-m", "megatron_edl.probe", "--out", os.fspath(probe_dir(ctx, run)), "--cpu"),
        *args,
        *("--load", os.fspath(ctx.run_dir(run.name) / "checkpoints")),
    ]


def train_args(ctx: Context, run: RunSpec, *, telemetry: bool = True) -> list[str]:
    """Every Megatron flag of ``run`` after ``--cpu`` (the model, data, schedule, EDL flags).

    The model is ``--config-yaml`` :attr:`QuickstartConfig.model`; the flags after it come from
    the quickstart's own options (``--nproc``, ``--train-iters``, ``--lr``, ``--seed``, the
    workdir) or are fixed here (no data workers, cosine decay, weight decay 0.01, clipping 1.0):
    a fixed flag moved into the YAML would move in the expanded command line, which is what a
    training stage's stamp hashes (:func:`_expanded_train_args`), and every run trained so far
    (studies resumed over several sittings) would train again.
    """
    config = ctx.config
    run_dir = ctx.run_dir(run.name)
    return [
        *("--config-yaml", os.fspath(config.model)),  # expanded in place by the launcher
        *("--expert-model-parallel-size", str(config.nproc)),
        *("--train-data-path", str(_prefix(ctx, "train", run.data))),
        *("--valid-data-path", str(_prefix(ctx, "valid", run.data))),
        *_tokenizer_args(ctx),
        *("--num-workers", "0"),
        *("--micro-batch-size", str(config.micro_batch_size)),
        *("--global-batch-size", str(config.global_batch_size)),
        *("--train-iters", str(config.train_iters)),
        *("--lr", str(config.lr), "--min-lr", str(config.lr / 10)),
        *("--lr-decay-style", "cosine"),
        *("--lr-warmup-iters", str(max(1, config.train_iters // 20))),
        *("--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", str(config.seed)),
        *("--log-interval", str(_log_interval(config.train_iters))),
        *("--eval-iters", str(_eval_iters(ctx))),
        *("--eval-interval", str(config.train_iters + 1)),  # only the final evaluation
        *("--save", str(run_dir / "checkpoints"), "--save-interval", str(config.train_iters)),
        *(telemetry_args(ctx, run) if telemetry else []),
        *run.flags,
        *config.extra_train_args,
    ]


def _expanded_train_args(ctx: Context, run: RunSpec) -> list[str]:
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


def _log_interval(train_iters: int) -> int:
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


def analysis_reports(ctx: Context, runs: Sequence[RunSpec]) -> dict[str, dict[str, float]]:
    """The analysis reports of the runs' probes (:mod:`megatron_edl.analysis.report`).

    ``report/fine/index.html``: the fine domains (heat maps per layer, I(D;E) and JSD versus step
    from the training dumps of the runs trained on fine labels, load balance, Jaccard, entropy);
    ``report/coarse/index.html``: the same grouped into the 3 coarse domains with the corpus's
    label map, with the ternary plot. Returns, per run, the probe's I(D;E), mean JSD (dense
    probabilities, fine domains) and max/mean expert load, averaged over the MoE layers.
    """
    from megatron_edl.analysis import report

    options = report.ReportOptions(source="probe", title="Quickstart: expert specialization")
    label_map = coarse_label_map(ctx.workdir)
    numbers: dict[str, dict[str, float]] = {}
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
                    "probe_jsd": sum(m.jsd_mean for m in layers) / len(layers),
                    "probe_balance": sum(m.balance.max_over_mean for m in layers) / len(layers),
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


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def config_json(config: QuickstartConfig) -> dict[str, Any]:
    """The configuration as JSON-able values (for the reports)."""
    from megatron_edl.yaml_config import flags_from_yaml

    out = dataclasses.asdict(config)
    out["workdir"] = os.fspath(config.workdir)
    out["model"] = {"config_yaml": os.fspath(config.model), "flags": flags_from_yaml(config.model)}
    return out


def data_stages() -> list[Stage]:
    """Stages 1-3, shared by every run: corpus, tokenizer, labelled preprocessing."""
    return [
        Stage(
            "corpus",
            _corpus_inputs,
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
            lambda c: [Path(f"{_prefix(c, s)}.idx") for s in ("train", "valid")],
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
                lambda c, k=k: dataclasses.asdict(_fit_settings(c, k)),
                lambda c, k=k: fit_clusters_stage(c, k),
                lambda c, k=k: [_clusters_dir(c, k) / "model.edlc"],
                after=("corpus",),
            )
        )
        stages.append(
            Stage(
                f"preprocess:clusters-{k}",
                lambda c: {},
                lambda c, k=k: preprocess_clusters_stage(c, k),
                lambda c, k=k: [
                    Path(f"{_prefix(c, s, f'clusters-{k}')}.idx") for s in ("train", "valid")
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
            lambda c, run=run: {"args": _expanded_train_args(c, run)},
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
        "(EDL off), all (EDL with both).",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``megatron-edl-quickstart``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = QuickstartConfig(
            workdir=Path(args.workdir),
            seed=args.seed,
            controls=(
                *(c for c in CONTROLS[:2] if c in args.labels),
                *(
                    f"clusters:{k}"
                    for k in sorted({cluster_count(c) for c in args.labels} - {None})
                ),
            ),
            compare=tuple(c for c in COMPARE if c in args.compare),
            corpus_bytes_per_domain=args.corpus_bytes,
            vocab_size=args.vocab_size,
            train_iters=args.train_iters,
            eval_iters=args.eval_iters,
            edl_coeff=args.edl_coeff,
            lr=args.lr,
            nproc=args.nproc,
            extra_train_args=tuple(args.train_args.split()),
        )
        run_quickstart(config)
    except (QuickstartError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
