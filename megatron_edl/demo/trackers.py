"""A study's per-run results, per MoE layer, to TensorBoard and Weights & Biases.

``megatron-edl-study ... --tensorboard-dir DIR`` and/or ``--wandb-project NAME`` log, after the
report, one tracker run per study run (``<arm>-s<seed>``) at step ``train_iters``:

- ``valid/lm_loss`` and ``valid/lm_loss/<domain>``: Megatron's validation LM loss;
- ``probe/mi``, ``probe/jsd``, ``probe/load_max_over_mean``: the evaluation probe on the fine
  labels, averaged over the MoE layers (the study's table);
- ``probe/mi/layer_<NN>``, ``probe/jsd/layer_<NN>``, ``probe/load_max_over_mean/layer_<NN>``:
  the same per MoE layer (1-based Megatron layer number).

The values come from the report's ``study.json`` (``runs.<name>.probe_per_layer``), so logging
never retrains or reprobes, and a study can be logged after it finished. TensorBoard: one folder
per run, ``DIR/<run>``, written with ``torch.utils.tensorboard`` (Megatron's writer; needs the
``tensorboard`` package); the event files this module wrote there before are replaced, so a
second call does not duplicate points. W&B: one run per study run, ``group`` = arm, ``config`` =
the arm's flags and seed (needs the ``wandb`` package; offline with ``WANDB_MODE=offline``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TrackedRun", "runs_from_study_json", "write_tensorboard", "write_wandb"]

# Where the per-layer and mean probe numbers of a run sit in the report (key in the run's
# evaluation -> tracker tag).
_PROBE_TAGS = (("mi", "probe/mi"), ("jsd", "probe/jsd"), ("balance", "probe/load_max_over_mean"))
_EVENT_GLOB = "events.out.tfevents.*"


@dataclass(frozen=True)
class TrackedRun:
    """One study run's scalars for the trackers."""

    name: str
    """``<arm>-s<seed>``."""
    arm: str
    seed: int
    flags: tuple[str, ...]
    step: int
    """The step the scalars are logged at (the run's last iteration)."""
    scalars: Mapping[str, float]
    """Tag -> value (module docstring); values that are missing or not finite are left out."""


def _scalars(evaluation: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}

    def put(tag: str, value: Any) -> None:
        if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
            out[tag] = float(value)

    put("valid/lm_loss", evaluation.get("valid_lm_loss"))
    for domain, value in (evaluation.get("valid_lm_loss_per_domain") or {}).items():
        put(f"valid/lm_loss/{domain}", value)
    for key, tag in _PROBE_TAGS:
        put(tag, evaluation.get(f"probe_{key}"))
    for layer in evaluation.get("probe_per_layer") or []:
        for key, tag in _PROBE_TAGS:
            put(f"{tag}/layer_{int(layer['layer']):02d}", layer.get(key))
    return out


def runs_from_study_json(path: str | Path) -> list[TrackedRun]:
    """The tracked runs of a study report (``<workdir>/report/study.json``).

    Raises:
        FileNotFoundError: No report at ``path`` (run the study's report first).
        ValueError: A report without per-layer probe numbers (written by an older version:
            rerun the report stage).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no study report (run the study's --report first)")
    data = json.loads(path.read_text())
    train_iters = int(data["quickstart"]["train_iters"])
    runs = []
    for arm, flags in data["arms"].items():
        for seed in data["seeds"]:
            name = f"{arm}-s{seed}"
            evaluation = data["runs"][name]
            if "probe_per_layer" not in evaluation:
                raise ValueError(
                    f"{path}: run {name} has no probe_per_layer (a report of an older version); "
                    "rerun the study's --report"
                )
            runs.append(
                TrackedRun(
                    name=name,
                    arm=arm,
                    seed=int(seed),
                    flags=tuple(flags),
                    step=train_iters,
                    scalars=_scalars(evaluation),
                )
            )
    return runs


def _require(module: str, flag: str, package: str) -> Any:
    """``import module``, or a RuntimeError naming the flag that needs it and the package."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(f"{flag} needs the {package} package (pip install {package})") from err


def write_tensorboard(runs: list[TrackedRun], log_dir: str | Path) -> list[Path]:
    """One TensorBoard run folder per study run under ``log_dir``; returns the folders.

    Raises:
        RuntimeError: ``tensorboard`` is not installed (names the package to install).
    """
    SummaryWriter = _require(  # noqa: N806 (a class)
        "torch.utils.tensorboard", f"--tensorboard-dir {log_dir}", "tensorboard"
    ).SummaryWriter
    folders = []
    for run in runs:
        folder = Path(log_dir) / run.name
        for old in folder.glob(_EVENT_GLOB):
            old.unlink()
        writer = SummaryWriter(log_dir=str(folder))
        try:
            writer.add_text("flags", " ".join(run.flags) or "(none)", run.step)
            for tag, value in run.scalars.items():
                writer.add_scalar(tag, value, run.step)
        finally:
            writer.close()
        folders.append(folder)
    return folders


def write_wandb(runs: list[TrackedRun], project: str, *, save_dir: str | Path | None = None) -> int:
    """One W&B run per study run in ``project`` (group = arm); returns the number logged.

    Raises:
        RuntimeError: ``wandb`` is not installed (names the package to install).
    """
    wandb = _require("wandb", f"--wandb-project {project}", "wandb")
    for run in runs:
        handle = wandb.init(
            project=project,
            name=run.name,
            group=run.arm,
            dir=None if save_dir is None else str(save_dir),
            config={"arm": run.arm, "seed": run.seed, "flags": " ".join(run.flags)},
        )
        try:
            handle.log(dict(run.scalars), step=run.step)
        finally:
            handle.finish()
    return len(runs)
