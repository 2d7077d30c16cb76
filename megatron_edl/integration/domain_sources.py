"""Where the indexed datasets' stored domain labels come from, per blend prefix.

The label source (:class:`LabelSource`: a ``<prefix>.domains`` sidecar or one domain per
prefix from a YAML file, :class:`PrefixDomains`), the resolved labels of a whole blend
(:class:`BlendDomains`), the file helpers that key the label cache, and
:func:`shared_per_node` (one reader per node). The resolution itself
(``resolve_blend_domains``) and its cache are in :mod:`megatron_edl.integration.dataset`.
"""

from __future__ import annotations

import atexit
import dataclasses
import fnmatch
import hashlib
import os
import pickle
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from megatron.core.datasets.gpt_dataset import (
    GPTDatasetConfig,
)

from megatron_edl.config import EDLConfigError
from megatron_edl.core.labels import load_strict_yaml
from megatron_edl.data.sidecar import SidecarMismatchError


class LabelSource(StrEnum):
    """Where the indexed datasets' stored labels come from."""

    SIDECAR = "sidecar"
    """``<prefix>.domains``, one id per sequence (``DomainGPTDataset``)."""
    PREFIX = "prefix"
    """One domain per blend prefix, from a YAML file (``DomainPerPrefixGPTDataset``)."""


_GLOB_CHARS = frozenset("*?[")


@dataclasses.dataclass(frozen=True)
class PrefixDomains:
    """One domain per blend prefix: the ``--moe-edl-domains-per-prefix`` YAML file.

    Format: a mapping of blend prefix -> domain name (``null``: the prefix is unlabelled)::

        # exact prefixes (as in --data-path, or the same file by absolute path) ...
        /data/pile/arxiv_text_document: science
        /data/pile/pubmed_text_document: science
        # ... or shell-style globs (fnmatch, case-sensitive), tried in file order
        "/data/pile/github_*": code
        "*/wikipedia_*": encyclopedia
        "*/ads_*": null

    The domain names are the stored labels of this mode: their ids follow the order in which
    the names first appear in the file (above: science 0, code 1, encyclopedia 2), so they are
    stable for a given file; a label map (``--moe-edl-label-map``) can regroup or drop them by
    name. A prefix takes the domain of its exact key if there is one (the same string, or the
    same absolute path; relative paths are relative to the working directory, as in
    ``--data-path``), otherwise of the first glob, in file order, that matches the prefix as
    written, normalised or made absolute; a prefix nothing matches is an error. Entries that
    match no prefix of the run are allowed (one file can serve several blends).
    """

    entries: tuple[tuple[str, str | None], ...]
    """``(prefix or glob, domain name or None)``, in file order."""

    source: str = "<dict>"
    """Where it came from (the file path), for error messages."""

    def __post_init__(self) -> None:
        if not self.entries:
            raise EDLConfigError(f"{self.source}: no prefix -> domain entries")
        for key, name in self.entries:
            if not isinstance(key, str) or not key.strip():
                raise EDLConfigError(
                    f"{self.source}: keys are dataset prefixes or globs, got {key!r}"
                )
            if name is not None and (not isinstance(name, str) or not name):
                raise EDLConfigError(
                    f"{self.source}: prefix {key!r}: the domain must be a name or null, "
                    f"got {name!r} (quote names such as yes/no/on/off or numbers)"
                )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> PrefixDomains:
        """Read the file (format: class docstring).

        Raises:
            EDLConfigError: If it cannot be read or parsed, has duplicate keys or bad entries;
                the message names the file.
        """
        source = os.fspath(path)
        try:
            data = load_strict_yaml(source, what="per-prefix domains")
        except OSError as err:
            raise EDLConfigError(f"{source}: cannot read the per-prefix domains: {err}") from err
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> PrefixDomains:
        """Build from the parsed YAML (a mapping of prefix or glob -> domain name or None)."""
        if not isinstance(data, Mapping):
            raise EDLConfigError(
                f"{source}: expected a mapping of dataset prefix -> domain name, "
                f"got {type(data).__name__}"
            )
        return cls(entries=tuple(data.items()), source=source)

    @property
    def vocabulary(self) -> dict[str, int]:
        """Domain name -> stored id, in order of first appearance."""
        vocabulary: dict[str, int] = {}
        for _, name in self.entries:
            if name is not None and name not in vocabulary:
                vocabulary[name] = len(vocabulary)
        return vocabulary

    def domain_of(self, prefix: str) -> str | None:
        """The domain name of a blend prefix (``None``: unlabelled).

        Raises:
            EDLConfigError: If no key matches the prefix.
        """
        forms = {prefix, os.path.normpath(prefix), os.path.abspath(prefix)}
        for key, name in self.entries:
            if _GLOB_CHARS.isdisjoint(key) and (
                key == prefix or os.path.abspath(key) == os.path.abspath(prefix)
            ):
                return name
        for key, name in self.entries:
            if not _GLOB_CHARS.isdisjoint(key) and any(
                fnmatch.fnmatchcase(form, key) for form in forms
            ):
                return name
        raise EDLConfigError(
            f"{self.source}: no entry matches the dataset prefix {prefix!r}; add it (or a glob "
            "matching it) with its domain name, or null to leave it unlabelled"
        )

    def stored_id(self, prefix: str) -> int:
        """Stored id of a prefix's domain (-1: unlabelled)."""
        name = self.domain_of(prefix)
        return -1 if name is None else self.vocabulary[name]


@dataclasses.dataclass(frozen=True)
class BlendDomains:
    """The labels of every prefix of a blend, resolved together."""

    prefixes: tuple[str, ...]
    """The blend's prefixes in order of first appearance (train, valid, test blends)."""

    vocabulary: dict[str, int]
    """Stored label name -> id shared by the blend (reconciled sidecar vocabularies, or the
    per-prefix domain names)."""

    stored_ids: dict[str, np.ndarray]
    """Prefix -> stored id of every sequence, in the shared vocabulary's ids."""

    loss_ids: dict[str, np.ndarray]
    """Prefix -> loss domain id of every sequence (label map and random control applied)."""

    remapped: tuple[str, ...] = ()
    """Prefixes whose sidecar ids were remapped to the shared vocabulary."""

    loss_domains: tuple[int, ...] | None = None
    """Without a label map: the stored ids the blend's sequences use, ascending; loss id ``i``
    is stored id ``loss_domains[i]`` (the loss domains, compacted: a large or retired id costs
    nothing). ``None`` with a label map (its ``domains`` are the loss domains) or without label
    options (the loss ids are the stored ids)."""

    @property
    def num_stored_domains(self) -> int:
        """Stored label ids in use or named: ``max id + 1`` (the loss's D without a label map)."""
        top = max(self.vocabulary.values(), default=-1)
        for ids in self.stored_ids.values():
            if ids.size:
                top = max(top, int(ids.max()))
        return top + 1


def blend_prefixes(config: GPTDatasetConfig, extra: str | None = None) -> tuple[str, ...]:
    """Every dataset prefix of the config's ``blend``/``blend_per_split``, first appearance first.

    Args:
        config: The dataset config.
        extra: A prefix to include if the blends lack it (appended last).
    """
    blends = [config.blend] if config.blend is not None else list(config.blend_per_split or [])
    prefixes: list[str] = []
    for blend in blends:
        if blend is not None:
            prefixes.extend(p for p in blend[0] if p not in prefixes)
    if extra is not None and extra not in prefixes:
        prefixes.append(extra)
    return tuple(prefixes)


_INDEX_HEADER = b"MMIDIDX\x00\x00"
_JSONL_SUFFIXES = (".jsonl", ".json")
"""Blend entries that are SFT JSON Lines files (``SFTDataset``'s paths), not indexed prefixes."""


def label_files(prefix: str, source: LabelSource) -> tuple[str, ...]:
    """The files a prefix's labels depend on (their sizes and times key the label cache)."""
    if prefix.endswith(_JSONL_SUFFIXES):
        return (prefix,)
    return (
        (prefix + ".idx", prefix + ".domains")
        if source is LabelSource.SIDECAR
        else (prefix + ".idx",)
    )


def sequence_count(prefix: str) -> int:
    """Sequences of ``<prefix>.idx`` (from its header), or records (non-blank lines) of an SFT
    JSON Lines file."""
    if prefix.endswith(_JSONL_SUFFIXES):
        with open(prefix, "rb") as f:
            return sum(1 for line in f if line.strip())
    idx_path = f"{prefix}.idx"
    with open(idx_path, "rb") as f:
        header = f.read(34)
    if len(header) < 34 or header[:9] != _INDEX_HEADER:
        raise SidecarMismatchError(f"{idx_path}: not a Megatron .idx file")
    return struct.unpack_from("<Q", header, 18)[0]


def file_state(path: str | os.PathLike | None) -> tuple:
    if path is None:
        return (None,)
    try:
        st = os.stat(path)
    except OSError:
        return (os.fspath(path), None)
    return (os.fspath(path), st.st_size, st.st_mtime_ns)


def used_ids(ids_N: np.ndarray) -> np.ndarray:
    """The distinct ids >= 0 of ``ids_N``, ascending, in O(N) (the caller bounds the ids)."""
    labelled_N = ids_N[ids_N >= 0]
    if not labelled_N.size:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.bincount(labelled_N.astype(np.int64)))


def compact_ids(ids_N: np.ndarray, used: np.ndarray) -> np.ndarray:
    """``ids_N`` with stored id ``used[i]`` replaced by ``i`` (-1 stays -1); ``used`` ascending
    and holding every id >= 0 of ``ids_N``."""
    table = np.full(int(used[-1]) + 1 if used.size else 1, -1, dtype=np.int64)
    table[used] = np.arange(used.size)
    ids_N = np.asarray(ids_N, dtype=np.int64)
    return np.where(ids_N >= 0, table[np.maximum(ids_N, 0)], -1)


def check_named_ids(ids_N: np.ndarray, vocabulary: Mapping[str, int], source: str) -> None:
    """Refuse stored ids >= 0 that ``vocabulary`` does not name (a flipped byte, or a sidecar of
    another vocabulary), naming ``source``, the id and its first sequence.

    Raises:
        SidecarMismatchError: On an id the vocabulary does not name.
    """
    named = np.zeros(max(vocabulary.values(), default=0) + 1, dtype=bool)
    named[list(vocabulary.values())] = True
    ids_N = np.asarray(ids_N, dtype=np.int64)
    inside_N = (ids_N >= 0) & (ids_N < named.size)
    bad_N = (ids_N >= named.size) | (inside_N & ~named[np.where(inside_N, ids_N, 0)])
    if bad_N.any():
        first = int(np.flatnonzero(bad_N)[0])
        known = sorted(set(vocabulary.values()))
        shown = f"{known[:10]}{' ...' if len(known) > 10 else ''}" if known else "none"
        raise SidecarMismatchError(
            f"{source}: sequence {first} has domain id {int(ids_N[first])}, which the file's "
            f"label vocabulary does not name (its ids: {shown}; "
            f"{int(bad_N.sum())} sequence(s) have such ids): the file is damaged or was "
            "written with another vocabulary"
        )


def compact(ids_N: np.ndarray) -> np.ndarray:
    top = int(ids_N.max()) if ids_N.size else 0
    return ids_N.astype(np.int16 if top < np.iinfo(np.int16).max else np.int32)


SHARED_WAIT_S = 3600.0
"""How long a local rank waits for local rank 0's labels (it reads every file of the blend)."""


def shared_per_node(compute: Callable[[], Any], key: object) -> Any:
    """``compute()`` on local rank 0 of a multi-process launch; the others read its result.

    Local rank 0 runs ``compute`` and pickles ``("ok", result)`` or ``("error", exception)``
    atomically to ``<tmp>/megatron-edl-<uid>/labels-<host>-<parent pid>-<restart>-<hash>.pkl``
    (the ranks of one launch on a node share their parent: torchrun's agent or Slurm's step
    daemon; ``hash`` covers ``key``). The other local ranks poll for that file (at most
    :data:`SHARED_WAIT_S`) and return the result or raise the exception. A successful result's
    file is removed when local rank 0 exits, which cannot happen before the others have read it
    when, as in the launcher, every rank then meets in a collective (Megatron's
    ``init_process_group``); an error's file stays (local rank 0 stops at once). Without
    ``LOCAL_RANK`` or with ``WORLD_SIZE`` 1, ``compute()`` runs here.

    Args:
        compute: Reads the files; every local rank must call this with an equal ``key``.
        key: What the result depends on (its ``repr`` is hashed).

    Returns:
        ``compute()``'s result.

    Raises:
        The exception ``compute`` raised on local rank 0; ``TimeoutError`` after waiting
        :data:`SHARED_WAIT_S` for it.
    """
    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return compute()
    folder = Path(tempfile.gettempdir()) / f"megatron-edl-{os.getuid()}"
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    path = folder / f"labels-{socket.gethostname()}-{os.getppid()}-{restart}-{digest}.pkl"
    if int(os.environ["LOCAL_RANK"]) == 0:
        try:
            outcome = ("ok", compute())
        except Exception as e:
            outcome = ("error", e)
        folder.mkdir(mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, delete=False) as f:
            pickle.dump(outcome, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(f.name, path)
        if outcome[0] == "error":
            raise outcome[1]
        atexit.register(path.unlink, missing_ok=True)
        return outcome[1]
    deadline = time.monotonic() + SHARED_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"local rank 0 did not publish the blend's labels ({path}) in {SHARED_WAIT_S} s"
            )
        time.sleep(0.05)
    with open(path, "rb") as f:
        status, value = pickle.load(f)
    if status == "error":
        raise value
    return value
