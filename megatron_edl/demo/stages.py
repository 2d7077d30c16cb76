"""The quickstart's configuration, run specs, stage machinery (stamps) and data stages.

Part of :mod:`megatron_edl.demo.quickstart`, which re-exports these names: the settings
(:class:`QuickstartConfig`, :class:`RunSpec`), the stages and their stamps (:class:`Context`,
:class:`Stage`, :func:`run_stage`) and stages 1-3 (corpus, tokenizer, preprocessing, clusters).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STAMP_VERSION = 1
CONTROLS = ("random", "coarse", "clusters")
"""Values of ``--labels``: each adds a run."""
DEFAULT_CLUSTERS = 16
"""K of ``--labels clusters`` without ``:K``."""
COMPARE = ("ortho+variance", "all")
"""Extra runs with the losses of arXiv 2505.22323 (``--compare``), auto-calibrated to the
released code's targets: ``ortho+variance`` both losses with EDL off; ``all`` also the fourth
cell of the 2 x 2 grid (EDL on/off x both losses on/off): EDL alone (``edl-alone``), or, with
``--edl-alone``, EDL with both losses (``edl+ortho+variance``)."""
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
    edl_coeff: float = 0.03
    """β of the EDL runs (the defaults of the EDL settings: docs/science.md, chosen by a 3-seed
    study)."""
    edl_window_decay: float = 0.95
    """``--moe-edl-window-decay`` of the EDL runs (0: no statistics window)."""
    edl_warmup_iters: int = 25
    """``--moe-edl-warmup-iters`` of the EDL runs (0: full β from the first iteration)."""
    edl_with_ortho_variance: bool = True
    """The EDL runs also train with the orthogonality and variance losses
    (:data:`ORTHO_VARIANCE_RUN_FLAGS`): the best arm of docs/science.md, below the baseline's
    validation loss at 16 times its I(D;E) over 3 seeds; ``--edl-alone`` turns it off."""
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


def edl_flags(config: QuickstartConfig, *, ortho_variance: bool | None = None) -> tuple[str, ...]:
    """The flags every EDL run of the quickstart shares: β, the window, the warm-up, and the
    orthogonality and variance losses (``ortho_variance``; ``None``: as the config says)."""
    flags = ("--moe-edl-coeff", str(config.edl_coeff))
    if config.edl_window_decay:
        flags += ("--moe-edl-window-decay", str(config.edl_window_decay))
    if config.edl_warmup_iters:
        flags += ("--moe-edl-warmup-iters", str(config.edl_warmup_iters))
    if config.edl_with_ortho_variance if ortho_variance is None else ortho_variance:
        flags += ORTHO_VARIANCE_RUN_FLAGS
    return flags


def control_labels(config: QuickstartConfig, control: str) -> tuple[tuple[str, ...], str]:
    """What gives an EDL run the labels of ``control``: its extra flags and its data folder.

    ``fine`` (the corpus's domains): nothing; ``random``: the fine labels permuted per document
    with the quickstart's seed; ``coarse``: the corpus's label map to the 3 groups;
    ``clusters:K``: the data relabelled with K discovered clusters (``data/clusters-K``).
    """
    if control == "random":
        return ("--moe-edl-labels", "random", "--moe-edl-random-seed", str(config.seed)), ""
    if control == "coarse":
        return ("--moe-edl-label-map", os.fspath(coarse_label_map(config.workdir))), ""
    k = cluster_count(control)
    return (), ("" if k is None else f"clusters-{k}")


def run_specs(config: QuickstartConfig, label_map: Path) -> list[RunSpec]:
    """The runs to train: baseline, EDL, then the chosen controls (in :data:`CONTROLS` order).

    Args:
        config: The quickstart's configuration.
        label_map: The corpus's coarse label map (for the ``coarse`` control).

    Returns:
        The runs, baseline first.
    """
    beta = edl_flags(config)
    runs = [
        RunSpec(
            "baseline",
            "EDL off (Megatron's load-balancing loss only); the domain labels are loaded for the "
            "per-domain validation loss only",
            ("--moe-edl-eval-per-domain",),
        ),
        RunSpec("edl", f"EDL on the fine domains ({' '.join(beta)})", beta),
    ]
    if "random" in config.controls:
        runs.append(
            RunSpec(
                "edl-random",
                "EDL with the documents' labels randomly permuted (the control)",
                (*beta, *control_labels(config, "random")[0]),
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
        other = edl_flags(config, ortho_variance=not config.edl_with_ortho_variance)
        name = "edl-alone" if config.edl_with_ortho_variance else "edl+ortho+variance"
        runs.append(RunSpec(name, f"EDL on the fine domains ({' '.join(other)})", other))
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


def stage_fingerprints(stage: Stage, ctx: Context) -> list[str]:
    """``stage``'s fingerprint, then the ones an equal stage had under another spelling of the
    workdir.

    The canonical fingerprint hashes the inputs with every path under the workdir written
    ``<workdir>/...``, so ``runs/x`` and its absolute path give one fingerprint. Stamps written
    before this normalisation hashed the workdir as spelled then: relative to the current folder
    or absolute, both accepted.
    """
    payload = {
        "version": STAMP_VERSION,
        "stage": stage.name,
        "inputs": stage.inputs(ctx),
        "after": {name: ctx.fingerprints[name] for name in stage.after},
    }
    text = json.dumps(payload, sort_keys=True, default=os.fspath)
    absolute = os.path.abspath(ctx.workdir)
    spellings = [absolute, os.path.relpath(absolute), os.fspath(ctx.workdir)]
    spellings = sorted(set(spellings), key=len, reverse=True)  # a longer one may hold a shorter
    pattern = re.compile(
        '"(' + "|".join(re.escape(json.dumps(w)[1:-1]) for w in spellings) + ')(?=[/"])'
    )
    canonical = pattern.sub('"<workdir>', text)
    texts = [
        canonical,
        *(canonical.replace('"<workdir>', '"' + json.dumps(w)[1:-1]) for w in spellings),
    ]
    return list(dict.fromkeys(hashlib.sha256(t.encode()).hexdigest() for t in texts))


def stamp_path(ctx: Context, stage: Stage) -> Path:
    """Where ``stage``'s stamp is (``<workdir>/stamps/<stage>.json``)."""
    return ctx.workdir / "stamps" / (stage.name.replace(":", "-") + ".json")


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_stage(
    stage: Stage, ctx: Context, index: int, total: int, *, reuse_only: bool = False
) -> dict[str, Any] | None:
    """Run ``stage``, or reuse its earlier result when its stamp matches (see module doc).

    With ``reuse_only`` a stage without a matching stamp is neither run nor touched: the return
    value is ``None``.
    """
    fingerprints = stage_fingerprints(stage, ctx)
    ctx.fingerprints[stage.name] = fingerprints[0]
    stamp = stamp_path(ctx, stage)
    prefix = f"[quickstart {index}/{total}] {stage.name}"
    if stamp.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("fingerprint") in fingerprints and all(p.exists() for p in stage.outputs(ctx)):
            ctx.fingerprints[stage.name] = saved["fingerprint"]  # what later stages hashed
            ctx.results[stage.name] = saved["result"]
            ctx.times[stage.name] = saved["seconds"]
            ctx.cpu_times[stage.name] = saved["cpu_seconds"]
            ctx.reused.append(stage.name)
            ctx.log(f"{prefix}: reused (finished earlier in {saved['seconds']:.1f} s)")
            return saved["result"]
    if reuse_only:
        return None
    stamp.unlink(missing_ok=True)
    ctx.log(f"{prefix}: running")
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    result = stage.run(ctx)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    ctx.results[stage.name] = result
    ctx.times[stage.name] = seconds
    ctx.cpu_times[stage.name] = cpu_seconds
    stamp.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage.name, "fingerprint": fingerprints[0], "seconds": seconds}
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


def corpus_inputs(ctx: Context) -> Any:
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


def tokenizer_args(ctx: Context) -> list[str]:
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(ctx.tokenizer_dir)]


def split_prefix(ctx: Context, split: str, data: str = "") -> Path:
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
            *tokenizer_args(ctx),
            "--append-eod",
            *label_args,
            *("--workers", "1"),  # a few MB: worker start-up would cost more than it saves
            *("--log-interval", "100000"),
        ]
        if preprocess.main(argv) != 0:
            raise QuickstartError(f"{stage}: preprocessing the {split} split failed (above)")
        stats = json.loads(Path(f"{split_prefix(ctx, split, data)}.stats.json").read_text())
        tokens[split] = stats["tokens_written"]
        ctx.log(
            f"  {split}: {stats['documents_written']} documents, {stats['tokens_written']} tokens"
        )
    return {"tokens": tokens}


def clusters_dir(ctx: Context, k: int) -> Path:
    return ctx.workdir / "clusters" / f"k{k}"


def fit_settings(ctx: Context, k: int):
    from megatron_edl.data.domain_clusters import FitSettings

    return FitSettings(num_clusters=k, seed=ctx.config.seed)


def fit_clusters_stage(ctx: Context, k: int) -> dict[str, Any]:
    """Stage ``clusters:K``: K topic clusters fitted on the train split (the run's seed)."""
    from megatron_edl.data.domain_clusters import fit_from_inputs

    folder = clusters_dir(ctx, k)
    folder.mkdir(parents=True, exist_ok=True)
    model = fit_from_inputs([str(ctx.corpus_dir / "train.jsonl")], fit_settings(ctx, k))
    model.save(folder / "model.edlc")
    sizes = model.header["sample"]["cluster_documents"]
    ctx.log("  " + ", ".join(f"{n} ({d})" for n, d in zip(model.names, sizes, strict=True)))
    return {"names": model.names, "sample_documents": sizes}


def preprocess_clusters_stage(ctx: Context, k: int) -> dict[str, Any]:
    """Stage ``preprocess:clusters-K``: the same documents labelled with the K clusters (a
    document without any of the model's terms keeps its place under ``unclustered``)."""
    labels = [
        *("--domain-clusters", str(clusters_dir(ctx, k) / "model.edlc")),
        *("--on-missing", "fallback:unclustered"),
    ]
    result = _preprocess_splits(ctx, f"clusters-{k}", labels, f"preprocess:clusters-{k}")
    if result["tokens"] != ctx.results["preprocess"]["tokens"]:
        raise QuickstartError(
            f"preprocess:clusters-{k}: {result['tokens']} tokens, the fine-label data has "
            f"{ctx.results['preprocess']['tokens']}: not the same documents"
        )
    return result


def config_json(config: QuickstartConfig) -> dict[str, Any]:
    """The configuration as JSON-able values (for the reports)."""
    from megatron_edl.yaml_config import flags_from_yaml

    out = dataclasses.asdict(config)
    out["workdir"] = os.fspath(config.workdir)
    out["model"] = {"config_yaml": os.fspath(config.model), "flags": flags_from_yaml(config.model)}
    return out
