"""The EDL loss branch of the config tree: ``EDLConfig``, its enums and its ``--moe-edl-*`` flags.

``EDLConfig`` holds the options of the Expert Divergence Loss (docs/method.md section 2) and
nothing else; its ``coeff`` turns the loss on (``coeff == 0``: off). The label options the loss
shares with the datasets and the routing telemetry (the label map, the random control, the token
weighting ``--moe-edl-aggregation``, the resolved ``num_domains``/``domain_names``) are fields of
:class:`megatron_edl.config.labels.LabelsConfig`, with their flags in the labels argument group.

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
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from megatron_edl.config.convert import as_enum, as_float, as_int, choices
from megatron_edl.config.layers import COEFF_FLAG, LAYERS_FLAG, as_layers, parse_layers
from megatron_edl.core.options import EDLConfigError, EDLForm
from megatron_edl.core.schedule import edl_coefficient

__all__ = [
    "ARGUMENT_GROUP_TITLE",
    "FLAGS",
    "EDLConfig",
    "EDLFused",
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
        "accumulate": "--moe-edl-accumulate",
        "layers": LAYERS_FLAG,
        "scores": "--moe-edl-scores",
        "start_iter": "--moe-edl-start-iter",
        "warmup_iters": "--moe-edl-warmup-iters",
        "window_decay": "--moe-edl-window-decay",
        "fused": "--moe-edl-fused",
    }
)
"""EDLConfig field -> command-line flag, for every field (the label flags, ``--moe-edl-label-map``,
``--moe-edl-labels``, ``--moe-edl-random-seed`` and ``--moe-edl-aggregation``, are
``megatron_edl.config.labels.LABEL_FLAGS``). The namespace attribute is the flag's argparse
``dest``, e.g. ``--moe-edl-coeff`` -> ``args.moe_edl_coeff``."""


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
    stored values always have the annotated types. Use ``dataclasses.replace`` to derive a copy;
    it validates again.
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

    accumulate: bool = False
    """Accumulate the statistics across the micro-batches of one global batch; the earlier
    micro-batches enter detached."""

    layers: tuple[int, ...] | None = None
    """1-based Megatron layer numbers EDL applies to, sorted and unique; ``None`` means every
    MoE layer."""

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

        values: dict[str, Any] = {
            "coeff": coeff,
            "form": form,
            "eps": eps,
            "scope": as_enum(_flag("scope"), self.scope, EDLScope),
            "layers": as_layers(self.layers),
            "scores": as_enum(_flag("scores"), self.scores, EDLScores),
            "start_iter": as_int(_flag("start_iter"), self.start_iter, minimum=0),
            "warmup_iters": as_int(_flag("warmup_iters"), self.warmup_iters, minimum=0),
            "fused": as_enum(_flag("fused"), self.fused, EDLFused),
        }
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
            The validated config.

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
