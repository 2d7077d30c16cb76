"""Per-domain routing statistics of MoE layers: the data model and its on-disk format.

One :class:`RoutingStats` holds, for some MoE layers of one model at one step, sums over the
routed tokens of one interval (training telemetry: the iterations since the previous dump; the
evaluation probe: every evaluated token). Everything is a *sum over tokens*, so statistics of
token shards (ranks), of pipeline stages (layers), of dumps (steps) and of fine domains (coarse
groups) combine by addition; every metric of :mod:`megatron_edl.analysis.metrics` is a ratio of
these sums.

Arrays (``L`` layers, ``D`` domains, ``E`` routed experts), float64, exact integers where counts:

``topk_counts_LDE``
    Number of the domain's tokens whose top-k selection includes the expert (Megatron's
    ``routing_map`` after any capacity dropping). Σ_e = k · tokens when nothing is dropped.
``prob_sums_LDE``
    Σ_t p_t[e] over the domain's tokens, with p_t the dense softmax of the router logits over
    all experts, in fp32 (the distribution EDL uses; independent of the top-k score function).
``tokens_LD``
    Number of the domain's tokens (padding excluded).
``entropy_sums_LD``
    Σ_t H(p_t) over the domain's tokens (nats): the per-token routing entropy, summed.
``unlabelled_*``
    The same four sums (shapes ``LE``, ``LE``, ``L``, ``L``) for tokens without a domain label
    (id -1: e.g. documents a label map ignores). They count in the load balance, not in the
    per-domain metrics.
``lm_loss_sums_D``, ``lm_loss_tokens_D`` (optional, the probe's)
    Sum of the per-token LM loss (nats) over the domain's loss-masked tokens, and their number.

Token weighting: every token counts once (not the segment weighting the EDL loss may use), so the
shares are the OLMoE-style "fraction of the domain's tokens routed to e".

On disk, format version 1: a pair ``<stem>.npz`` (the arrays above, under these names) and
``<stem>.json`` (metadata)::

    {"format": "megatron-edl-routing-stats", "format_version": 1,
     "source": "train" | "probe", "step": 100, "num_iterations": 50,
     "layers": [1, 2], "domains": ["code", "math", "web"], "num_experts": 8, "topk": 2,
     "part": "l001",                      # the writer: "l<first layer>", one per pipeline stage
     "arrays": {"topk_counts_LDE": "<description>", ...},
     "run": {...}}                        # free-form: flags, checkpoint, ...

The JSON is written last and atomically (temporary name, then rename), so a stats directory read
while training is running holds only complete dumps. A run directory may hold several *parts*
per step (one per pipeline stage, each with its own layers): :func:`load_run` merges them.

Shape legend (suffixes of array names): L layers, D domains, E routed experts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_edl.core.labels import LabelMap

__all__ = [
    "ARRAY_DOCS",
    "atomic_write",
    "FORMAT",
    "FORMAT_VERSION",
    "RoutingStats",
    "UnreadableDumpWarning",
    "group_domains",
    "load_run",
    "merge_parts",
    "read_stats",
    "stats_file_stem",
    "sum_steps",
    "write_stats",
]

FORMAT = "megatron-edl-routing-stats"
FORMAT_VERSION = 1
SOURCES = ("train", "probe")

ARRAY_DOCS: Mapping[str, str] = {
    "topk_counts_LDE": "tokens of domain d whose top-k routing includes expert e (after dropping)",
    "prob_sums_LDE": "sum over domain d's tokens of the dense softmax routing probability of e",
    "tokens_LD": "tokens of domain d (padding excluded)",
    "entropy_sums_LD": "sum over domain d's tokens of the routing entropy H(p_t), nats",
    "unlabelled_topk_counts_LE": "topk_counts for tokens without a domain label (id -1)",
    "unlabelled_prob_sums_LE": "prob_sums for tokens without a domain label",
    "unlabelled_tokens_L": "tokens without a domain label",
    "unlabelled_entropy_sums_L": "entropy_sums for tokens without a domain label",
    "lm_loss_sums_D": "(optional) sum of per-token LM loss (nats) over domain d's loss tokens",
    "lm_loss_tokens_D": "(optional) number of domain d's loss-masked tokens",
}
_REQUIRED = tuple(name for name in ARRAY_DOCS if not name.startswith("lm_loss"))
_OPTIONAL = ("lm_loss_sums_D", "lm_loss_tokens_D")
_STEM_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class UnreadableDumpWarning(UserWarning):
    """:func:`load_run` skipped ``*.json`` files of a run directory that are not JSON."""


def _shape_of(name: str, num_layers: int, num_domains: int, num_experts: int) -> tuple[int, ...]:
    """Expected shape of array ``name`` from its suffix (``_LDE`` -> ``(L, D, E)``)."""
    sizes = {"L": num_layers, "D": num_domains, "E": num_experts}
    return tuple(sizes[c] for c in name.rsplit("_", 1)[1])


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class RoutingStats:
    """Per-domain routing sums of some MoE layers at one step (format: module docstring)."""

    step: int
    """Training iteration at the end of the interval (train), or of the checkpoint (probe)."""

    num_iterations: int
    """Iterations summed in this dump (train); 0 for a probe."""

    source: str
    """``"train"`` (telemetry during training) or ``"probe"`` (evaluation of a checkpoint)."""

    layers: tuple[int, ...]
    """1-based Megatron layer numbers of the MoE layers, strictly increasing (MTP layers follow
    the decoder's: ``num_layers + i``)."""

    domains: tuple[str, ...]
    """Domain names, in domain-id order."""

    num_experts: int
    """E, routed experts per layer."""

    topk: int
    """k, experts per token."""

    topk_counts_LDE: np.ndarray
    prob_sums_LDE: np.ndarray
    tokens_LD: np.ndarray
    entropy_sums_LD: np.ndarray
    unlabelled_topk_counts_LE: np.ndarray
    unlabelled_prob_sums_LE: np.ndarray
    unlabelled_tokens_L: np.ndarray
    unlabelled_entropy_sums_L: np.ndarray
    lm_loss_sums_D: np.ndarray | None = None
    lm_loss_tokens_D: np.ndarray | None = None

    run: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Free-form, JSON-serialisable description of the run (flags, checkpoint, ...)."""

    def __post_init__(self) -> None:
        """Normalise types and check shapes.

        Raises:
            ValueError: On a bad field; the message names it and its value.
        """
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        for name in ("step", "num_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        layers = tuple(int(layer) for layer in self.layers)
        if any(b <= a for a, b in zip(layers, layers[1:], strict=False)) or (
            layers and layers[0] < 1
        ):
            raise ValueError(f"layers must be strictly increasing and >= 1, got {layers}")
        domains = tuple(str(d) for d in self.domains)
        if not domains or len(set(domains)) != len(domains):
            raise ValueError(f"domains must be non-empty and unique, got {domains}")
        for name in ("num_experts", "topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.topk > self.num_experts:
            raise ValueError(f"topk ({self.topk}) exceeds num_experts ({self.num_experts})")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "domains", domains)
        object.__setattr__(self, "num_experts", int(self.num_experts))
        object.__setattr__(self, "topk", int(self.topk))
        if (self.lm_loss_sums_D is None) != (self.lm_loss_tokens_D is None):
            raise ValueError("lm_loss_sums_D and lm_loss_tokens_D must be given together")
        names = _REQUIRED + tuple(n for n in _OPTIONAL if getattr(self, n) is not None)
        for name in names:
            array = np.asarray(getattr(self, name), dtype=np.float64)
            want = _shape_of(name, len(layers), len(domains), self.num_experts)
            if array.shape != want:
                raise ValueError(f"{name} must have shape {want}, got {array.shape}")
            if not np.all(np.isfinite(array)) or np.any(array < 0):
                raise ValueError(f"{name} must be finite and >= 0")
            object.__setattr__(self, name, array)
        object.__setattr__(self, "run", dict(self.run))

    @property
    def num_domains(self) -> int:
        """D."""
        return len(self.domains)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array present, by its format name."""
        names = _REQUIRED + tuple(n for n in _OPTIONAL if getattr(self, n) is not None)
        return {name: getattr(self, name) for name in names}

    def metadata(self, *, part: str | None = None) -> dict[str, Any]:
        """The JSON metadata of the on-disk format."""
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "step": self.step,
            "num_iterations": self.num_iterations,
            "layers": list(self.layers),
            "domains": list(self.domains),
            "num_experts": self.num_experts,
            "topk": self.topk,
            "arrays": {name: ARRAY_DOCS[name] for name in self.arrays()},
            "run": dict(self.run),
        }
        if part is not None:
            meta["part"] = part
        return meta

    def select_layers(self, layers: Iterable[int]) -> RoutingStats:
        """The statistics of some of the layers.

        Args:
            layers: Layer numbers, each present in ``self.layers``.

        Returns:
            A new ``RoutingStats`` with those layers (in increasing order).

        Raises:
            ValueError: If a layer is not present.
        """
        wanted = sorted(set(int(layer) for layer in layers))
        missing = [layer for layer in wanted if layer not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} not in the statistics (layers {self.layers})")
        index = [self.layers.index(layer) for layer in wanted]
        per_layer = {n: a[index] for n, a in self.arrays().items() if not n.startswith("lm_")}
        return dataclasses.replace(self, layers=tuple(wanted), **per_layer)


def stats_file_stem(source: str, step: int, part: str | None = None) -> str:
    """The file name (without suffix) of a dump: ``routing-stats-train-step00000100-l001``
    (``part``: the telemetry writes ``l<first layer of the stage>``, zero-padded to 3 digits)."""
    stem = f"routing-stats-{source}-step{step:08d}"
    return stem if part is None else f"{stem}-{part}"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write ``path`` through ``write(binary_file)`` to a temporary name, then rename: a reader
    sees the old file or the complete new one, never a part; a failed ``write`` leaves nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_stats(
    stats: RoutingStats, directory: str | os.PathLike, *, part: str | None = None
) -> Path:
    """Write one dump as ``<stem>.npz`` + ``<stem>.json`` (JSON last, both atomic).

    Args:
        stats: The statistics.
        directory: Where to write (created if missing).
        part: Writer name for runs that write several parts per step (e.g. ``"pp01"``, the
            pipeline stage); ``None`` for a single part.

    Returns:
        The path of the JSON file.

    Raises:
        ValueError: If ``part`` holds characters other than letters, digits, ``_.-``.
    """
    if part is not None and not _STEM_RE.match(part):
        raise ValueError(f"part must match {_STEM_RE.pattern}, got {part!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = stats_file_stem(stats.source, stats.step, part)
    arrays = stats.arrays()
    atomic_write(directory / f"{stem}.npz", lambda f: np.savez(f, **arrays))
    meta = json.dumps(stats.metadata(part=part), indent=1, default=str).encode()
    json_path = directory / f"{stem}.json"
    atomic_write(json_path, lambda f: f.write(meta))
    return json_path


def read_stats(json_path: str | os.PathLike) -> RoutingStats:
    """Read one dump written by :func:`write_stats`.

    Args:
        json_path: The ``.json`` metadata file (the ``.npz`` lies next to it).

    Returns:
        The statistics.

    Raises:
        ValueError: If the file is not a routing-stats dump, has an unknown format version, its
            metadata has a wrong type, or its ``.npz`` is missing, truncated or does not match
            the metadata; the message names the file.
    """
    json_path = Path(json_path)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_path}: not a JSON file: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{json_path}: not a {FORMAT} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{json_path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this reader knows version {FORMAT_VERSION})"
        )
    npz_path = json_path.with_suffix(".npz")
    try:
        with np.load(npz_path) as data:
            arrays = {name: data[name] for name in data.files if name in ARRAY_DOCS}
    except FileNotFoundError:
        raise ValueError(f"{npz_path}: missing (the arrays of {json_path})") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as err:
        raise ValueError(
            f"{npz_path}: not a readable .npz archive (truncated or damaged): {err}"
        ) from None
    missing = [name for name in _REQUIRED if name not in arrays]
    if missing:
        raise ValueError(f"{npz_path}: missing arrays {missing}")
    try:
        return RoutingStats(
            step=meta["step"],
            num_iterations=meta["num_iterations"],
            source=meta["source"],
            layers=meta["layers"],
            domains=meta["domains"],
            num_experts=meta["num_experts"],
            topk=meta["topk"],
            run=meta.get("run", {}),
            **arrays,
        )
    except KeyError as err:
        raise ValueError(f"{json_path}: metadata field {err} is missing") from None
    except (ValueError, TypeError) as err:  # TypeError: e.g. "layers": 5, "topk": null
        raise ValueError(f"{json_path}: bad metadata: {err}") from None


def merge_parts(parts: Sequence[RoutingStats]) -> RoutingStats:
    """Join the parts of one step that hold different layers (pipeline stages).

    Args:
        parts: Dumps of one source and step, with the same domains, experts and k, and
            disjoint layers.

    Returns:
        One ``RoutingStats`` with every layer, in increasing order. The optional LM-loss
        arrays are taken from the part that has them (summed if several do).

    Raises:
        ValueError: If the parts disagree or share a layer.
    """
    if not parts:
        raise ValueError("merge_parts needs at least one part")
    first = parts[0]
    for other in parts[1:]:
        for name in ("source", "step", "domains", "num_experts", "topk", "num_iterations"):
            if getattr(other, name) != getattr(first, name):
                raise ValueError(
                    f"cannot merge parts with different {name}: "
                    f"{getattr(first, name)!r} and {getattr(other, name)!r}"
                )
    layers = [layer for part in parts for layer in part.layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"parts of step {first.step} share layers: {sorted(layers)}")
    order = np.argsort(layers, kind="stable")
    merged: dict[str, Any] = {"lm_loss_sums_D": None, "lm_loss_tokens_D": None}
    for name in _REQUIRED:
        merged[name] = np.concatenate([getattr(part, name) for part in parts])[order]
    with_loss = [part for part in parts if part.lm_loss_sums_D is not None]
    if with_loss:
        merged["lm_loss_sums_D"] = sum(part.lm_loss_sums_D for part in with_loss)
        merged["lm_loss_tokens_D"] = sum(part.lm_loss_tokens_D for part in with_loss)
    return dataclasses.replace(
        first,
        layers=tuple(int(layers[i]) for i in order),
        **merged,
    )


def load_run(path: str | os.PathLike) -> list[RoutingStats]:
    """Every dump of a run: its parts merged per (source, step), sorted by source and step.

    Args:
        path: A directory (its ``*.json`` dumps, not recursive) or one dump's ``.json``.

    Returns:
        One ``RoutingStats`` per (source, step); training dumps first, then probes.

    Warns:
        UnreadableDumpWarning: Once per directory, naming and counting its ``*.json`` files that
            are empty, truncated or not UTF-8 JSON (skipped; the dumps are written atomically,
            so such a file is damaged, not in progress).

    Raises:
        ValueError: If ``path`` does not exist or holds no dump, or a dump cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.is_dir():
        files = []
        unreadable = []
        for candidate in sorted(path.glob("*.json")):
            if not candidate.is_file():
                continue
            try:
                head = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                unreadable.append(candidate.name)
                continue
            if isinstance(head, dict) and head.get("format") == FORMAT:
                files.append(candidate)
        if unreadable:
            warnings.warn(
                f"{path}: skipped {len(unreadable)} unreadable dump file(s) (empty, truncated or "
                f"not UTF-8 JSON): {', '.join(unreadable)}",
                UnreadableDumpWarning,
                stacklevel=2,
            )
    else:
        files = [path]
    if not files:
        raise ValueError(f"{path}: no {FORMAT} dumps (*.json) found")
    by_key: dict[tuple[int, int], list[RoutingStats]] = {}
    for file in files:
        stats = read_stats(file)
        by_key.setdefault((SOURCES.index(stats.source), stats.step), []).append(stats)
    return [merge_parts(by_key[key]) for key in sorted(by_key)]


def sum_steps(dumps: Sequence[RoutingStats]) -> RoutingStats:
    """Statistics over several intervals: the sums of the dumps (e.g. the last N of a run).

    Args:
        dumps: Dumps with the same layers, domains, experts, k and source.

    Returns:
        Their sum, labelled with the last step and the total number of iterations.

    Raises:
        ValueError: If the dumps disagree.
    """
    if not dumps:
        raise ValueError("sum_steps needs at least one dump")
    first = dumps[0]
    for other in dumps[1:]:
        for name in ("source", "layers", "domains", "num_experts", "topk"):
            if getattr(other, name) != getattr(first, name):
                raise ValueError(
                    f"cannot sum dumps with different {name}: "
                    f"{getattr(first, name)!r} and {getattr(other, name)!r}"
                )
    summed = {name: sum(getattr(d, name) for d in dumps) for name in _REQUIRED}
    if all(d.lm_loss_sums_D is not None for d in dumps):
        summed["lm_loss_sums_D"] = sum(d.lm_loss_sums_D for d in dumps)
        summed["lm_loss_tokens_D"] = sum(d.lm_loss_tokens_D for d in dumps)
    else:
        summed["lm_loss_sums_D"] = summed["lm_loss_tokens_D"] = None
    return dataclasses.replace(
        first,
        step=max(d.step for d in dumps),
        num_iterations=sum(d.num_iterations for d in dumps),
        **summed,
    )


def group_domains(
    stats: RoutingStats, label_map: str | os.PathLike | Mapping[str, Any]
) -> RoutingStats:
    """Group the dump's domains (e.g. fine labels into coarse ones) with a training label map.

    The dump's domains play the part of the stored labels: domain ``i`` (name ``domains[i]``)
    is stored id ``i``, so the map's integer keys are dump indices and its name keys and globs
    match the dump's domain names: the same YAML file as ``--moe-edl-label-map``
    (:class:`megatron_edl.core.labels.LabelMap`). Rows of one group are summed (every array is
    a sum over tokens); domains the map sends to ``null`` join the unlabelled sums.

    Args:
        stats: The statistics.
        label_map: Path of the YAML label map, or its parsed form (``domains``/``map``/...).

    Returns:
        Statistics over the map's domains.

    Raises:
        EDLConfigError: If the map is invalid or does not cover a domain of the dump (the
            message names the file and the domains).
    """
    vocabulary = {name: index for index, name in enumerate(stats.domains)}
    if isinstance(label_map, Mapping):
        bound = LabelMap.from_dict(label_map, vocabulary)
    else:
        bound = LabelMap.from_yaml(label_map, vocabulary)
    table_D = bound.lookup_table(stats.num_domains)  # coarse id per dump domain, -1 = ignored
    num_groups = bound.num_domains
    # One-hot (D, G) grouping matrix; ignored domains have an all-zero row.
    onehot_DG = np.zeros((stats.num_domains, num_groups))
    labelled = table_D >= 0
    onehot_DG[np.flatnonzero(labelled), table_D[labelled]] = 1.0
    ignored_D = (~labelled).astype(np.float64)

    grouped: dict[str, Any] = {
        "topk_counts_LDE": np.einsum("lde,dg->lge", stats.topk_counts_LDE, onehot_DG),
        "prob_sums_LDE": np.einsum("lde,dg->lge", stats.prob_sums_LDE, onehot_DG),
        "tokens_LD": stats.tokens_LD @ onehot_DG,
        "entropy_sums_LD": stats.entropy_sums_LD @ onehot_DG,
        "unlabelled_topk_counts_LE": stats.unlabelled_topk_counts_LE
        + np.einsum("lde,d->le", stats.topk_counts_LDE, ignored_D),
        "unlabelled_prob_sums_LE": stats.unlabelled_prob_sums_LE
        + np.einsum("lde,d->le", stats.prob_sums_LDE, ignored_D),
        "unlabelled_tokens_L": stats.unlabelled_tokens_L + stats.tokens_LD @ ignored_D,
        "unlabelled_entropy_sums_L": stats.unlabelled_entropy_sums_L
        + stats.entropy_sums_LD @ ignored_D,
    }
    if stats.lm_loss_sums_D is not None:
        grouped["lm_loss_sums_D"] = stats.lm_loss_sums_D @ onehot_DG
        grouped["lm_loss_tokens_D"] = stats.lm_loss_tokens_D @ onehot_DG
    return dataclasses.replace(stats, domains=tuple(bound.domains), **grouped)
