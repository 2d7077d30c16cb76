"""Configuration of EDL and of the variance/orthogonality losses: frozen dataclasses, flags, checks.

``EDLConfig`` is the single place the EDL options live. Megatron's argparse namespace feeds it
through ``add_edl_args`` (registered via ``extra_args_provider``) and ``EDLConfig.from_args``;
every field is validated once, in ``__post_init__``, and every user-facing error is an
``EDLConfigError`` (a ``ValueError``) whose message names the command-line flag and the bad value.
Checks that need the model's shape (is there an MoE at all, which layers are MoE layers) live in
``validate_against_model``.

``SpecializationConfig`` holds the options of the two losses of *Advancing Expert
Specialization* (method.md section 3; flags ``--moe-variance-loss-*``, ``--moe-ortho-loss-*``),
added by ``add_specialization_args`` in their own argument group, validated the same way and
checked against the model by ``validate_specialization_against_model``.

This module imports neither ``megatron`` nor ``torch``: the argparse namespace is duck-typed.
Specification: ``docs/method.md`` sections 2 and 3.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from megatron_edl.core.schedule import edl_coefficient

__all__ = [
    "EDLAggregation",
    "EDLConfig",
    "EDLConfigError",
    "EDLForm",
    "EDLFused",
    "EDLLabels",
    "EDLScope",
    "EDLScores",
    "FLAGS",
    "SPECIALIZATION_FLAGS",
    "SpecializationConfig",
    "VarianceAxis",
    "add_edl_args",
    "add_specialization_args",
    "check_supported",
    "parse_layers",
    "validate_against_model",
    "validate_specialization_against_model",
]

ARGUMENT_GROUP_TITLE = "expert divergence learning (megatron-edl)"
SPECIALIZATION_GROUP_TITLE = "expert specialization losses, arXiv 2505.22323 (megatron-edl)"


class EDLConfigError(ValueError):
    """A user-controlled EDL setting (flag, config field, label map) is invalid."""


class EDLForm(StrEnum):
    """Form of the per-pair loss (method.md section 2)."""

    LOG = "log"
    """The paper's ``-log(JSD + eps)``, averaged over domain pairs."""
    LINEAR = "linear"
    """``-JSD``, averaged over domain pairs (decision)."""


class EDLScope(StrEnum):
    """Which ranks' tokens the per-domain statistics are summed over."""

    GLOBAL = "global"
    """Every rank of the micro-batch step: Megatron's ``tp_dp_cp`` group (default)."""
    LOCAL = "local"
    """One data-parallel replica: the ``tp_cp`` group."""


class EDLAggregation(StrEnum):
    """How tokens are weighted inside a domain mean."""

    SEGMENT = "segment"
    """Every segment (run of one document inside a sample) weighs the same (the paper's)."""
    TOKEN = "token"
    """Every token weighs the same."""
    SAMPLE = "sample"
    """One label per sample; every sample weighs the same."""


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
        "coeff": "--moe-edl-coeff",
        "form": "--moe-edl-form",
        "eps": "--moe-edl-eps",
        "scope": "--moe-edl-scope",
        "aggregation": "--moe-edl-aggregation",
        "accumulate": "--moe-edl-accumulate",
        "layers": "--moe-edl-layers",
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
        coeff = _as_float("coeff", self.coeff)
        if not math.isfinite(coeff) or coeff < 0:
            raise EDLConfigError(f"{_flag('coeff')} must be >= 0 and finite, got {self.coeff!r}")

        form = _as_enum("form", self.form, EDLForm)
        eps = _as_float("eps", self.eps)
        if not math.isfinite(eps) or eps < 0:
            raise EDLConfigError(f"{_flag('eps')} must be >= 0 and finite, got {self.eps!r}")
        if form is EDLForm.LOG and eps == 0:
            raise EDLConfigError(
                f"{_flag('eps')} must be > 0 with {_flag('form')} log, got {self.eps!r}"
            )

        if not isinstance(self.accumulate, bool):
            raise EDLConfigError(f"{_flag('accumulate')} must be a bool, got {self.accumulate!r}")

        window_decay = _as_float("window_decay", self.window_decay)
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
            "scope": _as_enum("scope", self.scope, EDLScope),
            "aggregation": _as_enum("aggregation", self.aggregation, EDLAggregation),
            "layers": _as_layers(self.layers),
            "label_map": label_map,
            "labels": _as_enum("labels", self.labels, EDLLabels),
            "random_seed": _as_int("random_seed", self.random_seed, minimum=0),
            "scores": _as_enum("scores", self.scores, EDLScores),
            "start_iter": _as_int("start_iter", self.start_iter, minimum=0),
            "warmup_iters": _as_int("warmup_iters", self.warmup_iters, minimum=0),
            "fused": _as_enum("fused", self.fused, EDLFused),
            "num_domains": (
                None
                if self.num_domains is None
                else _as_int("num_domains", self.num_domains, minimum=1)
            ),
        }
        values["domain_names"] = _as_names(self.domain_names, values["num_domains"])
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


def _choices(enum: type[StrEnum]) -> str:
    """``"a, b, c"``: the values of ``enum`` in definition order."""
    return ", ".join(member.value for member in enum)


def _as_enum[E: StrEnum](field: str, value: Any, enum: type[E]) -> E:
    """Convert an enum member or a (case-insensitive) string to ``enum``."""
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        try:
            return enum(value.strip().lower())
        except ValueError:
            pass
    raise EDLConfigError(f"unknown {_flag(field)} {value!r}; choose from {_choices(enum)}")


def _as_names(value: Any, num_domains: int | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise EDLConfigError(f"domain_names must be a sequence of non-empty strings, got {value!r}")
    names = tuple(value)
    if num_domains is not None and len(names) != num_domains:
        raise EDLConfigError(f"{len(names)} domain names {names} for {num_domains} domains")
    if len(set(names)) != len(names):
        raise EDLConfigError(f"domain names must be unique, got {names}")
    return names


def _as_float(field: str, value: Any) -> float:
    """Convert a real number or a numeric string to ``float`` (bools are rejected)."""
    if isinstance(value, bool):
        raise EDLConfigError(f"{_flag(field)} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise EDLConfigError(f"{_flag(field)} must be a number, got {value!r}") from None


def _as_int(field: str, value: Any, *, minimum: int) -> int:
    """Convert an integer (or a decimal string) to ``int`` and check ``value >= minimum``."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if number is None:
        raise EDLConfigError(f"{_flag(field)} must be an integer, got {value!r}")
    if number < minimum:
        raise EDLConfigError(f"{_flag(field)} must be >= {minimum}, got {value!r}")
    return number


def _as_layers(value: Any) -> tuple[int, ...] | None:
    """Normalise ``layers``: ``None``, a ``parse_layers`` spec, or a sequence of ints >= 1."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_layers(value)
    flag = _flag("layers")
    if not isinstance(value, Sequence):
        raise EDLConfigError(
            f"{flag} must be a sequence of layer numbers or a string spec, got {value!r}"
        )
    for layer in value:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 1:
            raise EDLConfigError(
                f"{flag}: layer numbers are 1-based integers, got {layer!r} in {value!r}"
            )
    if not value:
        raise EDLConfigError(
            f"{flag} lists no layer, got {value!r}; to disable EDL set {_flag('coeff')} 0"
        )
    return tuple(sorted(set(value)))


def parse_layers(spec: str | None, num_layers: int | None = None) -> tuple[int, ...] | None:
    """Parse the ``--moe-edl-layers`` syntax into sorted, unique 1-based layer numbers.

    ``"all"`` (any case) or ``None`` means every MoE layer and gives ``None``. Otherwise a
    comma-separated list of layer numbers and inclusive ranges ``a-b``; whitespace is ignored
    and overlaps are merged: ``"1,3,5-8"`` -> ``(1, 3, 5, 6, 7, 8)``.

    Args:
        spec: The flag's value.
        num_layers: The model's number of transformer layers; when given, layers above it are
            errors.

    Returns:
        The layer numbers, or ``None`` for every MoE layer.

    Raises:
        EDLConfigError: On a malformed token, a layer < 1, a reversed range, an empty list or a
            layer above ``num_layers``; the message names ``--moe-edl-layers`` and the token.
    """
    flag = _flag("layers")
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise EDLConfigError(f"{flag} must be a string, got {spec!r}")
    if spec.strip().lower() == "all":
        return None
    layers: set[int] = set()
    for raw_token in spec.split(","):
        token = "".join(raw_token.split())
        if not token:
            raise EDLConfigError(f"{flag}: empty entry in {spec!r}; expected e.g. '1,3,5-8'")
        first, sep, last = token.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise EDLConfigError(
                f"{flag}: bad entry {token!r} in {spec!r}; expected a layer number or a "
                f"range 'a-b' of 1-based layer numbers, or 'all'"
            )
        lo = int(first)
        hi = int(last) if sep else lo
        if lo < 1:
            raise EDLConfigError(f"{flag}: layer numbers are 1-based, got {token!r} in {spec!r}")
        if hi < lo:
            raise EDLConfigError(f"{flag}: reversed range {token!r} in {spec!r}")
        if num_layers is not None and hi > num_layers:
            raise EDLConfigError(
                f"{flag}: {token!r} in {spec!r} is beyond the model's {num_layers} layers"
            )
        layers.update(range(lo, hi + 1))
    return tuple(sorted(layers))


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
        help=f"Per-pair loss: {_choices(EDLForm)}. log = -log(JSD + eps) (the paper's), "
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
        help=f"Ranks the per-domain statistics are summed over: {_choices(EDLScope)}. "
        "global = tp x dp x cp (every rank of the step), local = tp x cp (one data-parallel "
        "replica). Default: %(default)s.",
    )
    group.add_argument(
        FLAGS["aggregation"],
        type=str,
        default=default["aggregation"].value,
        help=f"Token weighting inside a domain mean: {_choices(EDLAggregation)}. segment = "
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
        help=f"Label source: {_choices(EDLLabels)}. random = the documents' labels randomly "
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
        f"{_choices(EDLScores)}. router = the router's own normalised scores "
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
        help=f"Run the EDL math compiled into a few fused kernels: {_choices(EDLFused)}. "
        "auto = compiled on CUDA, eager on CPU; on = compiled everywhere (eager, with a "
        "warning, where torch.compile fails); off = eager. Default: %(default)s.",
    )
    return parser


# Megatron's CUDA-graph capture regions that contain the router (empty = the whole layer).
_GRAPH_MODULES_WITH_ROUTER = frozenset({"moe", "moe_router", "moe_preprocess"})


def check_supported(args: Any, reasons: Sequence[str]) -> None:
    """Refuse, at start, the Megatron settings domain labels cannot work with.

    Called by the launcher when labels are loaded (``reasons``: the flags that need them).
    Supported and tested: sigmoid/sqrtsoftplus score functions (``--moe-edl-scores``), expert
    bias and aux-loss-free balancing, ``--moe-router-fusion``, MTP layers. Refused:

    - CUDA graphs that capture the router (``--cuda-graph-impl`` other than ``none`` with
      ``--cuda-graph-modules`` empty, i.e. the whole layer, or naming ``moe``, ``moe_router``
      or ``moe_preprocess``; or ``full_iteration``): a replay would reuse the labels queued at
      capture time, and the queue is Python state a graph cannot hold;
    - ``--fim-data``: fill-in-the-middle reorders the tokens of a document, so the per-token
      labels would no longer be aligned (the FIM dataset carries none).

    Args:
        args: Megatron's parsed (and validated) arguments.
        reasons: The flags that load labels, for the message.

    Raises:
        EDLConfigError: On an unsupported combination; the message names both flags and values.
    """
    why = ", ".join(reasons)
    impl = getattr(args, "cuda_graph_impl", "none") or "none"
    if impl != "none":
        modules = [getattr(m, "name", str(m)) for m in getattr(args, "cuda_graph_modules", [])]
        captured = sorted(_GRAPH_MODULES_WITH_ROUTER.intersection(modules))
        if impl == "full_iteration" or not modules or captured:
            region = (
                "the whole iteration"
                if impl == "full_iteration"
                else f"--cuda-graph-modules {' '.join(captured)}"
                if captured
                else "the whole layer (empty --cuda-graph-modules)"
            )
            raise EDLConfigError(
                f"domain labels ({why}) cannot be used with --cuda-graph-impl {impl} capturing "
                f"{region}: a graph replay would reuse the labels of the capture. Capture only "
                "attn/mlp (--cuda-graph-modules attn) or set --cuda-graph-impl none"
            )
    if getattr(args, "fim_data", False):
        raise EDLConfigError(
            f"domain labels ({why}) cannot be used with --fim-data: fill-in-the-middle reorders "
            "the tokens of a document and its dataset carries no labels"
        )


def _moe_layer_numbers(num_layers: int, moe_layer_freq: int | Sequence[int]) -> tuple[int, ...]:
    """1-based numbers of the MoE layers, as Megatron's GPT layer specs derive them.

    An int N puts an MoE layer at every layer number ``l`` with ``(l - 1) % N == 0``; a list
    holds one 0/1 entry per layer (``--moe-layer-freq`` after Megatron's ``moe_freq_type``).
    """
    if isinstance(moe_layer_freq, int) and not isinstance(moe_layer_freq, bool):
        if moe_layer_freq < 1:
            raise EDLConfigError(f"--moe-layer-freq must be >= 1, got {moe_layer_freq!r}")
        return tuple(n for n in range(1, num_layers + 1) if (n - 1) % moe_layer_freq == 0)
    if isinstance(moe_layer_freq, Sequence) and not isinstance(moe_layer_freq, str):
        if len(moe_layer_freq) != num_layers or any(v not in (0, 1) for v in moe_layer_freq):
            raise EDLConfigError(
                f"--moe-layer-freq must be an int or a list of {num_layers} zeros and ones "
                f"(one per layer), got {list(moe_layer_freq)!r}"
            )
        return tuple(n for n, v in enumerate(moe_layer_freq, start=1) if v)
    raise EDLConfigError(
        f"--moe-layer-freq must be an int or a list of 0/1, got {moe_layer_freq!r}"
    )


def validate_against_model(
    cfg: EDLConfig,
    *,
    num_moe_experts: int | None,
    num_layers: int,
    moe_layer_freq: int | Sequence[int] = 1,
) -> tuple[int, ...]:
    """Check the EDL options against the model's shape.

    Args:
        cfg: The EDL config.
        num_moe_experts: Megatron's ``--num-experts`` (``None`` or 0 without MoE).
        num_layers: Megatron's ``--num-layers``.
        moe_layer_freq: Megatron's ``--moe-layer-freq``, after ``moe_freq_type``: an int N
            (an MoE layer every N layers, starting at layer 1) or one 0/1 per layer.

    Returns:
        The 1-based numbers of the layers EDL applies to (empty when EDL is disabled).

    Raises:
        EDLConfigError: EDL is enabled without MoE, ``--moe-edl-layers`` lists a layer that
            does not exist or is not an MoE layer, or the model has no MoE layer at all.
    """
    if not cfg.enabled:
        return ()
    coeff_flag, layers_flag = _flag("coeff"), _flag("layers")
    if not num_moe_experts:
        raise EDLConfigError(
            f"{coeff_flag} {cfg.coeff} enables EDL, which needs an MoE model, but "
            f"--num-experts is {num_moe_experts!r}; set --num-experts or {coeff_flag} 0"
        )
    if num_layers < 1:
        raise EDLConfigError(f"--num-layers must be >= 1, got {num_layers!r}")
    moe_layers = _moe_layer_numbers(num_layers, moe_layer_freq)
    if not moe_layers:
        raise EDLConfigError(
            f"{coeff_flag} {cfg.coeff} enables EDL, but --moe-layer-freq {moe_layer_freq!r} "
            "makes no layer an MoE layer"
        )
    if cfg.layers is None:
        return moe_layers
    beyond = [n for n in cfg.layers if n > num_layers]
    if beyond:
        raise EDLConfigError(
            f"{layers_flag} lists layers {beyond} beyond the model's {num_layers} layers "
            f"(--num-layers)"
        )
    dense = [n for n in cfg.layers if n not in moe_layers]
    if dense:
        raise EDLConfigError(
            f"{layers_flag} lists layers {dense} that are not MoE layers (--moe-layer-freq "
            f"{moe_layer_freq!r}); the MoE layers are {list(moe_layers)}"
        )
    return cfg.layers


# ---------------------------------------------------------------------------------------------
# Variance and orthogonality losses (method.md section 3)
# ---------------------------------------------------------------------------------------------


class VarianceAxis(StrEnum):
    """Axis of the variance loss (method.md section 3)."""

    TOKENS = "tokens"
    """Variance across tokens of each expert's post-top-k score column, averaged over experts
    (the paper's)."""
    EXPERTS = "experts"
    """Variance across experts of each token's dense softmax, averaged over tokens (the
    released code's)."""


SPECIALIZATION_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "variance_coeff": "--moe-variance-loss-coeff",
        "variance_axis": "--moe-variance-loss-axis",
        "ortho_coeff": "--moe-ortho-loss-coeff",
        "ortho_eps": "--moe-ortho-loss-eps",
        "auto_calibrate": "--moe-specialization-auto-calibrate",
        "variance_target": "--moe-variance-loss-target",
        "ortho_target": "--moe-ortho-loss-target",
    }
)
"""SpecializationConfig field -> command-line flag (argparse ``dest`` = the flag's name with
``-`` -> ``_``)."""


@dataclass(frozen=True, kw_only=True)
class SpecializationConfig:
    """Options of the variance and orthogonality losses; see ``SPECIALIZATION_FLAGS``.

    Both are independent of EDL and of each other: each is on when its coefficient is > 0.
    """

    variance_coeff: float = 0.0
    """γ, the weight of L_v per MoE layer (summed over layers). 0 disables it; >= 0, finite."""

    variance_axis: VarianceAxis = VarianceAxis.TOKENS
    """``tokens`` (the paper's) or ``experts`` (the released code's)."""

    ortho_coeff: float = 0.0
    """β, the weight of L_o per MoE layer (summed over layers). 0 disables it; >= 0, finite."""

    ortho_eps: float = 1e-6
    """ε in the denominator of L_o; > 0, finite."""

    auto_calibrate: bool = False
    """Replace each enabled coefficient, once per MoE layer at its first training forward, by
    ``target / |L_0|`` (L_0: the term's first value), as the released code does; the same
    value on every rank. A run resumed from a checkpoint calibrates again."""

    variance_target: float = 1e-3
    """|γ · L_v| at the first step under ``auto_calibrate``; > 0, finite."""

    ortho_target: float = 1e-4
    """|β · L_o| at the first step under ``auto_calibrate``; > 0, finite."""

    @property
    def variance_enabled(self) -> bool:
        """Whether the variance loss is on (``variance_coeff > 0``)."""
        return self.variance_coeff > 0

    @property
    def ortho_enabled(self) -> bool:
        """Whether the orthogonality loss is on (``ortho_coeff > 0``)."""
        return self.ortho_coeff > 0

    @property
    def enabled(self) -> bool:
        """Whether either loss is on."""
        return self.variance_enabled or self.ortho_enabled

    def __post_init__(self) -> None:
        """Validate and normalise every field.

        Raises:
            EDLConfigError: On any invalid field; the message names the flag and the value.
        """
        flags = SPECIALIZATION_FLAGS
        values: dict[str, Any] = {}
        for field in ("variance_coeff", "ortho_coeff"):
            value = _as_float(flags[field], getattr(self, field))
            if not math.isfinite(value) or value < 0:
                raise EDLConfigError(
                    f"{flags[field]} must be >= 0 and finite, got {getattr(self, field)!r}"
                )
            values[field] = value
        for field in ("ortho_eps", "variance_target", "ortho_target"):
            value = _as_float(flags[field], getattr(self, field))
            if not math.isfinite(value) or value <= 0:
                raise EDLConfigError(
                    f"{flags[field]} must be > 0 and finite, got {getattr(self, field)!r}"
                )
            values[field] = value
        values["variance_axis"] = _as_enum(flags["variance_axis"], self.variance_axis, VarianceAxis)
        if not isinstance(self.auto_calibrate, bool):
            raise EDLConfigError(
                f"{flags['auto_calibrate']} must be a bool, got {self.auto_calibrate!r}"
            )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_args(cls, args: Any) -> SpecializationConfig:
        """Build the config from an argparse namespace (Megatron's ``args``), duck-typed.

        Args:
            args: Any object with the attributes ``add_specialization_args`` defines; a
                missing attribute takes the field's default.

        Returns:
            The validated config.

        Raises:
            EDLConfigError: On any invalid value.
        """
        kwargs: dict[str, Any] = {}
        for field, flag in SPECIALIZATION_FLAGS.items():
            dest = flag.removeprefix("--").replace("-", "_")
            if hasattr(args, dest):
                kwargs[field] = getattr(args, dest)
        return cls(**kwargs)


def add_specialization_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the variance and orthogonality loss flags, in one argument group.

    Defaults equal the ``SpecializationConfig`` defaults; ``SpecializationConfig.from_args``
    validates the values.

    Args:
        parser: Megatron's (or any) argument parser.

    Returns:
        The same parser, as Megatron's ``extra_args_provider`` expects.
    """
    default = {f.name: f.default for f in dataclasses.fields(SpecializationConfig)}
    flags = SPECIALIZATION_FLAGS
    group = parser.add_argument_group(title=SPECIALIZATION_GROUP_TITLE)
    group.add_argument(
        flags["variance_coeff"],
        type=float,
        default=default["variance_coeff"],
        help="Weight (gamma) of the variance loss L_v = -Var(routing scores), per MoE layer; "
        "0 disables it. Default: %(default)s.",
    )
    group.add_argument(
        flags["variance_axis"],
        type=str,
        default=default["variance_axis"].value,
        help=f"Axis of the variance: {_choices(VarianceAxis)}. tokens = across tokens of each "
        "expert's post-top-k score (the paper's), experts = across experts of each token's dense "
        "softmax (the released code's). Default: %(default)s.",
    )
    group.add_argument(
        flags["ortho_coeff"],
        type=float,
        default=default["ortho_coeff"],
        help="Weight (beta) of the orthogonality loss on each token's k raw expert outputs, per "
        "MoE layer; 0 disables it. Default: %(default)s.",
    )
    group.add_argument(
        flags["ortho_eps"],
        type=float,
        default=default["ortho_eps"],
        help="Epsilon in the denominator of the orthogonality loss (> 0). Default: %(default)s.",
    )
    group.add_argument(
        flags["auto_calibrate"],
        action="store_true",
        default=default["auto_calibrate"],
        help="Once per MoE layer, at the first training step, replace each enabled coefficient "
        "by target / |first value of its loss| (the released code's calibration).",
    )
    group.add_argument(
        flags["variance_target"],
        type=float,
        default=default["variance_target"],
        help="Auto-calibration target of |gamma * L_v|. Default: %(default)s.",
    )
    group.add_argument(
        flags["ortho_target"],
        type=float,
        default=default["ortho_target"],
        help="Auto-calibration target of |beta * L_o|. Default: %(default)s.",
    )
    return parser


def validate_specialization_against_model(
    cfg: SpecializationConfig,
    *,
    num_moe_experts: int | None,
    moe_router_topk: int,
    token_dispatcher_type: str,
    flex_dispatcher_backend: str = "deepep",
    apply_probs_on_input: bool = False,
) -> None:
    """Check the variance and orthogonality options against the model.

    Args:
        cfg: The config.
        num_moe_experts: Megatron's ``--num-experts``.
        moe_router_topk: Megatron's ``--moe-router-topk``.
        token_dispatcher_type: Megatron's ``--moe-token-dispatcher-type``.
        flex_dispatcher_backend: Megatron's ``--moe-flex-dispatcher-backend`` (read with
            ``flex`` only).
        apply_probs_on_input: Megatron's ``--moe-apply-probs-on-input``.

    Raises:
        EDLConfigError: A loss is on without MoE; or the orthogonality loss is on with top-1
            routing (it is identically 0), with the ``flex`` dispatcher on a backend other than
            ``deepep`` (``hybridep`` and ``ncclep`` keep the token layout inside opaque
            handles), or with the gate applied to the expert input (the raw outputs are then
            unknown).
    """
    flags = SPECIALIZATION_FLAGS
    for field, on in (("variance_coeff", cfg.variance_enabled), ("ortho_coeff", cfg.ortho_enabled)):
        if on and not num_moe_experts:
            raise EDLConfigError(
                f"{flags[field]} {getattr(cfg, field)} needs an MoE model, but --num-experts is "
                f"{num_moe_experts!r}"
            )
    if not cfg.ortho_enabled:
        return
    flag = flags["ortho_coeff"]
    if moe_router_topk < 2:
        raise EDLConfigError(
            f"{flag} needs --moe-router-topk >= 2 (the loss compares a token's experts), got "
            f"{moe_router_topk!r}"
        )
    if token_dispatcher_type not in ("allgather", "alltoall", "flex"):
        raise EDLConfigError(
            f"{flag} supports --moe-token-dispatcher-type allgather, alltoall and flex, got "
            f"{token_dispatcher_type!r}"
        )
    if token_dispatcher_type == "flex" and flex_dispatcher_backend != "deepep":
        raise EDLConfigError(
            f"{flag} supports the flex token dispatcher with the deepep backend only (hybridep "
            "and ncclep keep the token layout inside opaque handles), got "
            f"--moe-flex-dispatcher-backend {flex_dispatcher_backend}"
        )
    if apply_probs_on_input:
        raise EDLConfigError(
            f"{flag} cannot be combined with --moe-apply-probs-on-input (the raw expert outputs "
            "are not available then)"
        )
