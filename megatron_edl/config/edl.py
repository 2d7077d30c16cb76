"""The EDL loss branch of the config tree: ``EDLConfig``, its enums and its ``--moe-edl-*`` flags.

``EDLConfig`` holds the options of the Expert Divergence Loss (docs/method.md section 2). Its
``coeff`` turns the loss on; a config with ``coeff == 0`` still travels whenever domain labels are
loaded (:mod:`megatron_edl.config.labels` says when), because it also carries the label options
the loss and the datasets share: ``label_map``, ``labels``/``random_seed`` (the random control),
``aggregation``, and the resolved ``num_domains``/``domain_names``. Those fields stay here (their
flags in the one ``--moe-edl-*`` group) because the routers, the datasets and the recorded runs
read them from this object; :class:`megatron_edl.config.labels.LabelsConfig` holds the rest of
"where the labels come from" (data source, mock domains, per-domain evaluation).

Every field is validated once, in ``__post_init__``; every error is an ``EDLConfigError`` whose
message names the flag and the bad value. Imports neither ``megatron`` nor ``torch``.

Example::

    parser = add_edl_args(argparse.ArgumentParser())
    args = parser.parse_args(["--moe-edl-coeff", "0.01", "--moe-edl-layers", "2-8"])
    cfg = EDLConfig.from_args(args)
    validate_against_model(cfg, num_moe_experts=64, num_layers=8, moe_layer_freq=1)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from megatron_edl.config._convert import (
    EDLConfigError,
    as_enum,
    as_float,
    as_int,
    as_names,
    choices,
)
from megatron_edl.config.layers import COEFF_FLAG, LAYERS_FLAG, as_layers, parse_layers
from megatron_edl.core.options import EDLAggregation, EDLForm
from megatron_edl.core.schedule import edl_coefficient

__all__ = [
    "ARGUMENT_GROUP_TITLE",
    "FLAGS",
    "EDLAggregation",
    "EDLConfig",
    "EDLForm",
    "EDLFused",
    "EDLLabels",
    "EDLScope",
    "EDLScores",
    "add_edl_args",
]

ARGUMENT_GROUP_TITLE = "expert divergence learning (megatron-edl)"


class EDLScope(StrEnum):
    """Which ranks' tokens the per-domain statistics are summed over."""

    GLOBAL = "global"
    """Every rank of the micro-batch step: Megatron's ``tp_dp_cp`` group (default)."""
    LOCAL = "local"
    """One data-parallel replica: the ``tp_cp`` group."""


class EDLFused(StrEnum):
    """How the EDL math of a router call runs (``megatron_edl.core.edl_fused``)."""

    AUTO = "auto"
    """Compiled on CUDA, eager elsewhere."""
    ON = "on"
    """Compiled (``torch.compile``) on any device; eager, with one warning, if that fails."""
    OFF = "off"
    """Eager."""

    @property
    def compile(self) -> bool | None:
        """``select_path``'s argument: True, False, or None (decide by device)."""
        return {EDLFused.AUTO: None, EDLFused.ON: True, EDLFused.OFF: False}[self]


class EDLLabels(StrEnum):
    """Where the domain labels come from."""

    DATA = "data"
    """The labels stored with the data, through the label map."""
    RANDOM = "random"
    """The control of the paper: the documents' labels randomly permuted (seeded)."""


class EDLScores(StrEnum):
    """Which dense expert distribution p_t the loss and the routing telemetry use."""

    ROUTER = "router"
    """The router's own normalised scores (``--moe-router-score-function``): softmax(z) for a
    softmax router, sigmoid(z) / sum sigmoid(z) for a sigmoid router (the scores it ranks its
    experts by, and Megatron's aux loss uses)."""
    SOFTMAX = "softmax"
    """softmax(z) whatever the router's score function."""


FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "coeff": COEFF_FLAG,
        "form": "--moe-edl-form",
        "eps": "--moe-edl-eps",
        "scope": "--moe-edl-scope",
        "aggregation": "--moe-edl-aggregation",
        "accumulate": "--moe-edl-accumulate",
        "layers": LAYERS_FLAG,
        "label_map": "--moe-edl-label-map",
        "labels": "--moe-edl-labels",
        "random_seed": "--moe-edl-random-seed",
        "scores": "--moe-edl-scores",
        "start_iter": "--moe-edl-start-iter",
        "warmup_iters": "--moe-edl-warmup-iters",
        "window_decay": "--moe-edl-window-decay",
        "fused": "--moe-edl-fused",
    }
)
"""EDLConfig field -> command-line flag, for every field that has a flag (``num_domains`` has
none: it comes from the label map or the data). The namespace attribute is the flag's
argparse ``dest``, e.g. ``--moe-edl-coeff`` -> ``args.moe_edl_coeff``."""


def _flag(field: str) -> str:
    """The flag of ``field``, or the field name itself when it has no flag."""
    return FLAGS.get(field, field)


def _dest(field: str) -> str:
    """The argparse namespace attribute of ``field``'s flag."""
    return FLAGS[field].removeprefix("--").replace("-", "_")


@dataclass(frozen=True, kw_only=True)
class EDLConfig:
    """Options of the Expert Divergence Loss; see ``FLAGS`` for the flag of each field.

    Strings are accepted for the enum fields (case-insensitive) and for ``layers`` (the
    ``--moe-edl-layers`` syntax of ``parse_layers``); ``__post_init__`` converts them, so the
    stored values always have the annotated types. Use ``dataclasses.replace`` to derive a copy
    (for instance to fill in ``num_domains``); it validates again.
    """

    coeff: float = 0.0
    """β, the weight of L_ED in the objective (per MoE layer, summed over layers). 0 disables
    EDL. Must be finite and >= 0."""

    form: EDLForm = EDLForm.LOG
    """Per-pair loss: ``log`` (-log(JSD + eps), the paper's) or ``linear`` (-JSD)."""

    eps: float = 1e-6
    """ε inside the log of the ``log`` form; must be finite and > 0 for that form (>= 0 for
    ``linear``, which ignores it)."""

    scope: EDLScope = EDLScope.GLOBAL
    """Ranks whose tokens the per-domain statistics sum over: ``global`` (tp_dp_cp) or
    ``local`` (tp_cp)."""

    aggregation: EDLAggregation = EDLAggregation.SEGMENT
    """Token weighting inside a domain mean: ``segment`` (paper), ``token`` or ``sample``."""

    accumulate: bool = False
    """Accumulate the statistics across the micro-batches of one global batch; the earlier
    micro-batches enter detached."""

    layers: tuple[int, ...] | None = None
    """1-based Megatron layer numbers EDL applies to, sorted and unique; ``None`` means every
    MoE layer."""

    label_map: str | None = None
    """Path of the YAML label map (stored data labels -> loss domains); ``None`` uses the
    stored ids as they are."""

    labels: EDLLabels = EDLLabels.DATA
    """Label source: ``data`` or ``random`` (the paper's random-label control)."""

    random_seed: int = 1234
    """Seed of the label permutation of the ``random`` control; >= 0."""

    scores: EDLScores = EDLScores.ROUTER
    """The dense distribution p_t: the router's normalised scores (``router``) or ``softmax``."""

    start_iter: int = 0
    """0-based optimizer step from which β applies (before it the loss is computed and logged
    with weight 0); >= 0. Schedule: :mod:`megatron_edl.core.schedule`."""

    warmup_iters: int = 0
    """Steps of linear warm-up of β after ``start_iter`` (0: the full β at once); >= 0."""

    window_decay: float = 0.0
    """λ of the statistics window across micro-batches (:mod:`megatron_edl.core.window`): the
    loss sees the current reduced (A, n) plus λ-decayed detached earlier ones, about 1 / (1 - λ)
    micro-batches; 0 = off. In [0, 1); needs the ``global`` scope, excludes ``accumulate``."""
    fused: EDLFused = EDLFused.AUTO
    """``torch.compile`` of the EDL math: ``auto`` (on CUDA), ``on`` or ``off`` (eager)."""

    num_domains: int | None = None
    """Number of loss domains D; ``None`` until the label map or the data tells. >= 1."""

    domain_names: tuple[str, ...] | None = None
    """Names of the loss domains, in id order (``num_domains`` of them), for logs and reports;
    ``None`` until the label map or the data tells."""

    @property
    def enabled(self) -> bool:
        """Whether EDL is on (``coeff > 0``)."""
        return self.coeff > 0

    def applies_to(self, layer_number: int) -> bool:
        """Whether EDL applies to the (MoE) layer with this 1-based Megatron layer number.

        Args:
            layer_number: 1-based layer number, as Megatron's ``TransformerLayer.layer_number``.

        Returns:
            ``True`` when EDL is enabled and ``layers`` is ``None`` or lists ``layer_number``.
        """
        return self.enabled and (self.layers is None or layer_number in self.layers)

    def coefficient_at(self, iteration: int | None) -> float:
        """β of the optimizer step ``iteration`` (0-based; ``None``: the full β), following the
        delayed start and warm-up of :func:`megatron_edl.core.schedule.edl_coefficient`."""
        return edl_coefficient(
            coeff=self.coeff,
            iteration=iteration,
            start_iter=self.start_iter,
            warmup_iters=self.warmup_iters,
        )

    def score_function(self, router_score_function: str) -> str:
        """The score function of p_t for a router with ``router_score_function``.

        Args:
            router_score_function: The router's ``--moe-router-score-function``.

        Returns:
            ``router_score_function`` for ``scores=router``, else ``"softmax"``.
        """
        return router_score_function if self.scores is EDLScores.ROUTER else "softmax"

    def __post_init__(self) -> None:
        """Validate and normalise every field.

        Raises:
            EDLConfigError: On any invalid field; the message names the flag and the value.
        """
        coeff = as_float(_flag("coeff"), self.coeff)
        if not math.isfinite(coeff) or coeff < 0:
            raise EDLConfigError(f"{_flag('coeff')} must be >= 0 and finite, got {self.coeff!r}")

        form = as_enum(_flag("form"), self.form, EDLForm)
        eps = as_float(_flag("eps"), self.eps)
        if not math.isfinite(eps) or eps < 0:
            raise EDLConfigError(f"{_flag('eps')} must be >= 0 and finite, got {self.eps!r}")
        if form is EDLForm.LOG and eps == 0:
            raise EDLConfigError(
                f"{_flag('eps')} must be > 0 with {_flag('form')} log, got {self.eps!r}"
            )

        if not isinstance(self.accumulate, bool):
            raise EDLConfigError(f"{_flag('accumulate')} must be a bool, got {self.accumulate!r}")

        window_decay = as_float(_flag("window_decay"), self.window_decay)
        if not 0.0 <= window_decay < 1.0:
            raise EDLConfigError(
                f"{_flag('window_decay')} must be in [0, 1), got {self.window_decay!r}"
            )

        label_map = self.label_map
        if isinstance(label_map, os.PathLike):
            label_map = os.fspath(label_map)
        if label_map is not None and (not isinstance(label_map, str) or not label_map.strip()):
            raise EDLConfigError(
                f"{_flag('label_map')} must be a non-empty path, got {self.label_map!r}"
            )

        values: dict[str, Any] = {
            "coeff": coeff,
            "form": form,
            "eps": eps,
            "scope": as_enum(_flag("scope"), self.scope, EDLScope),
            "aggregation": as_enum(_flag("aggregation"), self.aggregation, EDLAggregation),
            "layers": as_layers(self.layers),
            "label_map": label_map,
            "labels": as_enum(_flag("labels"), self.labels, EDLLabels),
            "random_seed": as_int(_flag("random_seed"), self.random_seed, minimum=0),
            "scores": as_enum(_flag("scores"), self.scores, EDLScores),
            "start_iter": as_int(_flag("start_iter"), self.start_iter, minimum=0),
            "warmup_iters": as_int(_flag("warmup_iters"), self.warmup_iters, minimum=0),
            "fused": as_enum(_flag("fused"), self.fused, EDLFused),
            "num_domains": (
                None
                if self.num_domains is None
                else as_int(_flag("num_domains"), self.num_domains, minimum=1)
            ),
        }
        values["domain_names"] = as_names(self.domain_names, values["num_domains"])
        values["window_decay"] = window_decay
        if window_decay > 0 and self.accumulate:
            raise EDLConfigError(
                f"{_flag('window_decay')} {window_decay} and {_flag('accumulate')} are "
                "exclusive: the window already holds the earlier micro-batches (detached)"
            )
        if window_decay > 0 and values["scope"] is not EDLScope.GLOBAL:
            raise EDLConfigError(
                f"{_flag('window_decay')} needs {_flag('scope')} global (one window per layer, "
                f"the same on every rank, checkpointed once), got {values['scope'].value}"
            )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_args(cls, args: Any) -> EDLConfig:
        """Build the config from an argparse namespace (Megatron's ``args``), duck-typed.

        Reads the ``args.moe_edl_*`` attributes that ``add_edl_args`` defines; a missing
        attribute takes the field's default. When ``args.num_layers`` is an int, the layers of
        ``--moe-edl-layers`` are checked against it.

        Args:
            args: Any object with ``moe_edl_*`` attributes.

        Returns:
            The validated config (``num_domains`` is ``None``).

        Raises:
            EDLConfigError: On any invalid value.
        """
        kwargs: dict[str, Any] = {}
        for field in FLAGS:
            if hasattr(args, _dest(field)):
                kwargs[field] = getattr(args, _dest(field))
        layers = kwargs.get("layers")
        if isinstance(layers, str):
            num_layers = getattr(args, "num_layers", None)
            if not isinstance(num_layers, int) or isinstance(num_layers, bool):
                num_layers = None
            kwargs["layers"] = parse_layers(layers, num_layers)
        return cls(**kwargs)


def add_edl_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--moe-edl-*`` flags, in one argument group, for ``extra_args_provider``.

    Defaults equal the ``EDLConfig`` defaults. Enum flags and ``--moe-edl-layers`` take plain
    strings; ``EDLConfig.from_args`` validates them and names the valid choices on error.

    Args:
        parser: Megatron's (or any) argument parser.

    Returns:
        The same parser, as Megatron's ``extra_args_provider`` expects.
    """
    default = {f.name: f.default for f in dataclasses.fields(EDLConfig)}
    group = parser.add_argument_group(title=ARGUMENT_GROUP_TITLE)
    group.add_argument(
        FLAGS["coeff"],
        type=float,
        default=default["coeff"],
        help="Weight (beta) of the expert divergence loss, per MoE layer; 0 disables EDL. "
        "Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["form"],
        type=str,
        default=default["form"].value,
        help=f"Per-pair loss: {choices(EDLForm)}. log = -log(JSD + eps) (the paper's), "
        "linear = -JSD. Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["eps"],
        type=float,
        default=default["eps"],
        help="Epsilon inside the log of the log form (> 0). Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["scope"],
        type=str,
        default=default["scope"].value,
        help=f"Ranks the per-domain statistics are summed over: {choices(EDLScope)}. "
        "global = tp x dp x cp (every rank of the step), local = tp x cp (one data-parallel "
        "replica). Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["aggregation"],
        type=str,
        default=default["aggregation"].value,
        help=f"Token weighting inside a domain mean: {choices(EDLAggregation)}. segment = "
        "every document segment weighs the same (the paper's), token = every token, "
        "sample = one label per sample. "
        "Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["accumulate"],
        action="store_true",
        default=default["accumulate"],
        help="Accumulate the statistics across the micro-batches of one global batch "
        "(earlier micro-batches enter detached).",
    )
    group.add_argument(
        FLAGS["layers"],
        type=str,
        default=default["layers"],
        help="1-based layer numbers EDL applies to, e.g. '1,3,5-8', or 'all'. "
        "Default: every MoE layer.",
    )
    group.add_argument(
        FLAGS["label_map"],
        type=str,
        default=default["label_map"],
        help="YAML file mapping the stored data labels to loss domains (groups, ignored "
        "labels). Default: use the stored ids as they are.",
    )
    group.add_argument(
        FLAGS["labels"],
        type=str,
        default=default["labels"].value,
        help=f"Label source: {choices(EDLLabels)}. random = the documents' labels randomly "
        "permuted (the paper's control). Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["random_seed"],
        type=int,
        default=default["random_seed"],
        help="Seed of the label permutation of --moe-edl-labels random. Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["scores"],
        type=str,
        default=default["scores"].value,
        help=f"Dense expert distribution of the loss and the routing telemetry: "
        f"{choices(EDLScores)}. router = the router's own normalised scores "
        "(--moe-router-score-function: softmax, or sigmoid divided by its sum), softmax = "
        "softmax of the logits whatever the score function. Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["start_iter"],
        type=int,
        default=default["start_iter"],
        help="0-based training iteration from which the EDL loss counts (before it: computed "
        "and logged with weight 0). Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["warmup_iters"],
        type=int,
        default=default["warmup_iters"],
        help="Iterations of linear warm-up of --moe-edl-coeff after --moe-edl-start-iter "
        "(0: full weight at once). Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["window_decay"],
        type=float,
        default=default["window_decay"],
        help="Decay (in [0, 1)) of the statistics window across micro-batches: the loss sees "
        "the current micro-batch's per-domain sums plus the decayed, detached sums of earlier "
        "ones (about 1/(1-decay) micro-batches); 0 = off. Global scope only; saved in "
        "checkpoints. Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["fused"],
        type=str,
        default=default["fused"].value,
        help=f"Run the EDL math compiled into a few fused kernels: {choices(EDLFused)}. "
        "auto = compiled on CUDA, eager on CPU; on = compiled everywhere (eager, with a "
        "warning, where torch.compile fails); off = eager. Default: %(default)s.",
    )
    return parser
