"""Domain labels for EDL: the label map (stored ids -> loss domains) and the random-label control.

The data stores one fine-grained label per document (e.g. 49 topics). The *label map* turns
those stored ids into the ids the loss uses, 0..D-1, or into -1 (``IGNORE_DOMAIN``: the tokens
take no part in EDL). One preprocessed corpus then serves every labelling the paper compares
(49 fine labels, 3 coarse groups, some labels ignored), chosen by a small YAML file
(``--moe-edl-label-map``)::

    # loss domains, in id order (0, 1, 2)
    domains: [english, chinese, math]
    # stored label (its integer id, or its name when a vocabulary is given; shell-style globs
    # such as "en/*" allowed on names) -> loss domain name, or null to ignore those tokens
    map:
      "en/*": english
      "zh/*": chinese
      math: math
      "en/ads": null
    # optional: where stored labels that no key matches go (a domain name, or null = ignore);
    # without it, such labels are an error that lists them
    # default: null

Rules for a stored id ``i`` (with name ``vocabulary^-1[i]`` when a vocabulary is given):

1. An *exact* key wins: an integer key (``7: math``) is the stored id itself; a string key
   that is a name of the vocabulary refers to that name's id; a decimal string that is not a
   name (``"7"``, as JSON keys are always strings) is the stored id.
2. Otherwise the first *glob* key, in file order, whose pattern matches the id's name
   (``fnmatch`` syntax, case-sensitive: ``*``, ``?``, ``[...]``). Globs need a vocabulary.
3. Otherwise ``default``, if the file has one.
4. Otherwise the id is *uncovered*: ``lookup_table``, ``apply`` and ``check_covers`` raise an
   error that lists every uncovered id (with its name).

Right-hand sides are names from ``domains`` or ``null``. Mistakes are errors that name the file
and the key: an unknown domain name, a name key missing from the vocabulary, a glob matching no
name, a name key without a vocabulary, a duplicate key, two exact keys for one id with
different domains, YAML booleans (``yes``/``no``/``on``/``off``: quote them).

The random-label control (``--moe-edl-labels random``, the paper's ablation) is
``permute_document_labels``: the labels are shuffled across documents with a seeded
permutation, which keeps every label's frequency but breaks the link between text and label.

Everything here is pure (numpy, torch, pyyaml); errors are ``EDLConfigError`` (a
``ValueError``), since label maps are user input.

Shape legend (suffixes of array names):
    N  documents
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, overload

import numpy as np
import torch
import yaml

from megatron_edl.core.edl import IGNORE_DOMAIN
from megatron_edl.core.options import EDLConfigError

__all__ = ["GLOB_CHARS", "LabelMap", "load_strict_yaml", "permute_document_labels"]

_TOP_LEVEL_KEYS = ("domains", "map", "default")
GLOB_CHARS = frozenset("*?[")
"""Characters that make a string a shell-style glob (``fnmatch``; a lone ``]`` is literal). The
one definition for every YAML file of labels and inputs: label maps, path-label files, prefix
labels, input file lists; label names may contain none of them (nor ``]``,
:func:`megatron_edl.data.vocabulary.label_name_problem`)."""
_UNCOVERED = -2  # lookup-table sentinel, never returned to callers
_MAX_LISTED = 20  # uncovered ids listed in full in an error message


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate mapping keys (which it would silently drop)."""


def _construct_unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def load_strict_yaml(path: str | os.PathLike, *, what: str = "YAML file") -> Any:
    """Parse a YAML file with ``safe_load`` rules, rejecting duplicate mapping keys.

    Args:
        path: The file.
        what: What the file is, for the error message (e.g. ``"label map"``).

    Returns:
        The parsed document (``None`` for an empty file).

    Raises:
        OSError: if the file cannot be read (``FileNotFoundError`` if it does not exist).
        EDLConfigError: naming the file, if it is a folder, is not UTF-8 text, is not valid
            YAML or repeats a key.
    """
    if os.path.isdir(path):
        raise EDLConfigError(f"{os.fspath(path)}: the {what} is a folder, not a YAML file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EDLConfigError(
            f"{os.fspath(path)}: the {what} is not UTF-8 text (byte {data[err.start]:#04x} at "
            f"offset {err.start})"
        ) from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise EDLConfigError(f"{os.fspath(path)}: invalid YAML in the {what}: {err}") from None


class LabelMap:
    """Maps the stored label ids of the data to loss domain ids (0..D-1) or -1 (ignored).

    Build one with ``from_yaml``, ``from_dict`` or ``identity``; the module docstring gives the
    file format and the matching rules. Instances are immutable in use; the lookup table is
    built lazily and cached.
    """

    def __init__(
        self,
        *,
        domains: Sequence[str],
        entries: Sequence[tuple[int | str, str | None]],
        default: str | None,
        has_default: bool,
        vocabulary: Mapping[str, int] | None = None,
        source: str = "<dict>",
    ) -> None:
        """Validate a parsed label map; prefer ``from_yaml`` / ``from_dict`` / ``identity``.

        Args:
            domains: Loss domain names, in id order; unique, non-empty strings.
            entries: The ``map`` section as ``(key, domain name or None)`` pairs, in file order.
            default: Domain of stored labels no key matches (``None``: ignore them); used only
                when ``has_default``.
            has_default: Whether the file has a ``default``.
            vocabulary: Stored label name -> stored id, needed by name and glob keys.
            source: Where the map came from (file path), for error messages.

        Raises:
            EDLConfigError: On any mistake in the map; the message names ``source`` and the key.
        """
        self.source = source
        self.domains: tuple[str, ...] = self._check_domains(domains)
        domain_ids = {name: index for index, name in enumerate(self.domains)}
        self.vocabulary: Mapping[str, int] | None = (
            None if vocabulary is None else self._check_vocabulary(vocabulary)
        )
        self._names_of: dict[int, list[str]] = {}
        for name, stored in (self.vocabulary or {}).items():
            self._names_of.setdefault(stored, []).append(name)

        self._entries: tuple[tuple[int | str, str | None], ...] = tuple(entries)
        self._exact: dict[int, int] = {}
        exact_key_of: dict[int, int | str] = {}
        self._globs: list[tuple[str, int]] = []
        for key, target in self._entries:
            loss_id = self._resolve_target(f"map key {key!r}", target, domain_ids)
            if self._is_glob(key):
                assert isinstance(key, str)
                self._add_glob(key, loss_id)
                continue
            stored = self._exact_stored_id(key)
            if stored in self._exact and self._exact[stored] != loss_id:
                raise self._error(
                    f"map keys {exact_key_of[stored]!r} and {key!r} both name stored id "
                    f"{stored} but map it to different domains"
                )
            self._exact[stored] = loss_id
            exact_key_of[stored] = key
        self._has_default = has_default
        self._default = (
            self._resolve_target("'default'", default, domain_ids) if has_default else None
        )
        self._table_cache = np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------------------------------
    # Constructors
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], vocabulary: Mapping[str, int] | None = None
    ) -> LabelMap:
        """Read a label map from a YAML file (format: module docstring).

        Args:
            path: The YAML file.
            vocabulary: Stored label name -> stored id, for name and glob keys.

        Returns:
            The label map.

        Raises:
            EDLConfigError: If the file cannot be read or parsed, or the map is invalid; the
                message names the path (and the key).
        """
        source = os.fspath(path)
        try:
            data = load_strict_yaml(source, what="label map")
        except OSError as err:
            raise EDLConfigError(f"{source}: cannot read the label map: {err}") from err
        return cls.from_dict(data, vocabulary, source=source)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        vocabulary: Mapping[str, int] | None = None,
        *,
        source: str = "<dict>",
    ) -> LabelMap:
        """Build a label map from the parsed form of the YAML file.

        Args:
            data: Mapping with ``domains``, ``map`` and optionally ``default``.
            vocabulary: Stored label name -> stored id, for name and glob keys.
            source: Name used in error messages (``from_yaml`` passes the file path).

        Returns:
            The label map.

        Raises:
            EDLConfigError: If the map is invalid; the message names ``source`` and the key.
        """
        if not isinstance(data, Mapping):
            raise EDLConfigError(
                f"{source}: a label map must be a mapping with keys "
                f"{', '.join(_TOP_LEVEL_KEYS)}, got {type(data).__name__}"
            )
        unknown = [key for key in data if key not in _TOP_LEVEL_KEYS]
        if unknown:
            raise EDLConfigError(
                f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                f"expected {', '.join(_TOP_LEVEL_KEYS)}"
            )
        if "domains" not in data:
            raise EDLConfigError(f"{source}: missing 'domains' (the list of loss domain names)")
        domains = data["domains"]
        if not isinstance(domains, Sequence) or isinstance(domains, str):
            raise EDLConfigError(f"{source}: 'domains' must be a list of names, got {domains!r}")
        mapping = data.get("map") or {}
        if not isinstance(mapping, Mapping):
            raise EDLConfigError(
                f"{source}: 'map' must be a mapping of stored label -> domain, got {mapping!r}"
            )
        return cls(
            domains=domains,
            entries=list(mapping.items()),
            default=data.get("default"),
            has_default="default" in data,
            vocabulary=vocabulary,
            source=source,
        )

    @classmethod
    def identity(cls, num_stored: int, names: Sequence[str] | None = None) -> LabelMap:
        """The map that keeps every stored id: stored id i -> loss domain i, for i < num_stored.

        Args:
            num_stored: Number of stored labels (>= 1).
            names: Domain names (default ``"0"``, ``"1"``, ...), ``num_stored`` of them.

        Returns:
            The identity label map; ids >= ``num_stored`` are uncovered.

        Raises:
            EDLConfigError: If ``num_stored < 1`` or ``names`` has the wrong length.
        """
        if isinstance(num_stored, bool) or not isinstance(num_stored, int) or num_stored < 1:
            raise EDLConfigError(f"identity label map needs num_stored >= 1, got {num_stored!r}")
        names = [str(i) for i in range(num_stored)] if names is None else list(names)
        if len(names) != num_stored:
            raise EDLConfigError(
                f"identity label map: {len(names)} names for {num_stored} stored labels"
            )
        return cls(
            domains=names,
            entries=list(zip(range(num_stored), names, strict=True)),
            default=None,
            has_default=False,
            source="<identity>",
        )

    def to_dict(self) -> dict[str, Any]:
        """The map in the YAML file's form; ``from_dict(to_dict(), vocabulary)`` rebuilds it.

        Returns:
            ``{"domains": [...], "map": {...}}`` plus ``"default"`` when the map has one.
        """
        out: dict[str, Any] = {"domains": list(self.domains), "map": dict(self._entries)}
        if self._has_default:
            out["default"] = None if self._default == IGNORE_DOMAIN else self.domains[self._default]
        return out

    # ------------------------------------------------------------------------------------------
    # Queries
    # ------------------------------------------------------------------------------------------

    @property
    def num_domains(self) -> int:
        """D, the number of loss domains."""
        return len(self.domains)

    def lookup_table(self, num_stored: int) -> np.ndarray:
        """Loss domain id (or -1) of every stored id ``0..num_stored-1``.

        Args:
            num_stored: Number of stored label ids the table covers.

        Returns:
            int64 array of shape ``(num_stored,)``, values in ``[-1, num_domains)``.

        Raises:
            EDLConfigError: If some stored id in range is uncovered (the message lists them).
        """
        if isinstance(num_stored, bool) or not isinstance(num_stored, int) or num_stored < 0:
            raise EDLConfigError(f"num_stored must be an integer >= 0, got {num_stored!r}")
        table = self._table(num_stored)
        self._raise_uncovered(np.flatnonzero(table == _UNCOVERED))
        return table.copy()

    def check_covers(self, stored_ids_present: Iterable[int]) -> None:
        """Check that every stored id present in the data is covered by the map.

        Args:
            stored_ids_present: Stored ids that occur in the data (repeats allowed; -1, the
                unlabelled id, is allowed and needs no cover). Numpy arrays and tensors work.

        Raises:
            EDLConfigError: If an id is < -1, or some ids are uncovered (the message lists them).
        """
        if isinstance(stored_ids_present, torch.Tensor):
            present = stored_ids_present.detach().cpu().numpy()
        elif isinstance(stored_ids_present, np.ndarray):
            present = stored_ids_present
        else:
            present = np.fromiter((int(i) for i in stored_ids_present), dtype=np.int64)
        if present.size and not np.issubdtype(present.dtype, np.integer):
            raise EDLConfigError(f"stored ids must be integers, got {present.dtype}")
        ids = np.unique(present.astype(np.int64).ravel())
        self._check_not_below_ignore(ids)
        ids = ids[ids >= 0]
        if ids.size == 0:
            return
        table = self._table(int(ids.max()) + 1)
        self._raise_uncovered(ids[table[ids] == _UNCOVERED])

    @overload
    def apply(self, stored_ids: torch.Tensor) -> torch.Tensor: ...
    @overload
    def apply(self, stored_ids: np.ndarray | Sequence[int]) -> np.ndarray: ...

    def apply(self, stored_ids: torch.Tensor | np.ndarray | Sequence[int]) -> Any:
        """Map stored ids to loss domain ids, elementwise; -1 (unlabelled) stays -1.

        Args:
            stored_ids: Integer ids of any shape: a torch tensor (any device), a numpy array or
                a sequence.

        Returns:
            Loss ids of the same shape, int64: a tensor on the input's device for a tensor
            input, a numpy array otherwise.

        Raises:
            EDLConfigError: On float ids, ids < -1 or ids the map does not cover (one host
                sync for tensors).
        """
        if isinstance(stored_ids, torch.Tensor):
            if stored_ids.is_floating_point() or stored_ids.is_complex():
                raise EDLConfigError(f"stored ids must be integers, got {stored_ids.dtype}")
            ids_t = stored_ids.long()
            if ids_t.numel() == 0 or int(ids_t.max()) < 0:
                self._check_not_below_ignore(ids_t.detach().cpu().numpy())
                return torch.full_like(ids_t, IGNORE_DOMAIN)
            self._check_not_below_ignore(np.array([int(ids_t.min())]))
            table_t = torch.from_numpy(self._table(int(ids_t.max()) + 1)).to(ids_t.device)
            out_t = torch.where(ids_t >= 0, table_t[ids_t.clamp_min(0)], IGNORE_DOMAIN)
            if bool((out_t == _UNCOVERED).any()):
                self.check_covers(torch.unique(ids_t[out_t == _UNCOVERED]))
            return out_t

        ids = np.asarray(stored_ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise EDLConfigError(f"stored ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        self._check_not_below_ignore(ids)
        if ids.size == 0 or int(ids.max()) < 0:
            return np.full(ids.shape, IGNORE_DOMAIN, dtype=np.int64)
        table = self._table(int(ids.max()) + 1)
        out = np.where(ids >= 0, table[np.maximum(ids, 0)], IGNORE_DOMAIN)
        if (out == _UNCOVERED).any():
            self.check_covers(np.unique(ids[out == _UNCOVERED]))
        return out

    def __repr__(self) -> str:
        default = "<none>"
        if self._has_default:
            default = (
                "null" if self._default == IGNORE_DOMAIN else repr(self.domains[self._default])
            )
        return (
            f"LabelMap(source={self.source!r}, domains={list(self.domains)!r}, "
            f"{len(self._exact)} exact key(s), {len(self._globs)} glob(s), default={default})"
        )

    # ------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------

    def _error(self, message: str) -> EDLConfigError:
        return EDLConfigError(f"{self.source}: {message}")

    def _check_domains(self, domains: Sequence[Any]) -> tuple[str, ...]:
        if not domains:
            raise self._error("'domains' is empty; list the loss domain names in id order")
        seen: set[str] = set()
        for name in domains:
            if not isinstance(name, str) or not name:
                raise self._error(
                    f"domain names must be non-empty strings, got {name!r} in 'domains' "
                    "(quote names such as yes/no/on/off/null or numbers)"
                )
            if name in seen:
                raise self._error(f"duplicate domain {name!r} in 'domains'")
            seen.add(name)
        return tuple(domains)

    def _check_vocabulary(self, vocabulary: Mapping[str, int]) -> Mapping[str, int]:
        for name, stored in vocabulary.items():
            if not isinstance(name, str) or (
                isinstance(stored, bool) or not isinstance(stored, int | np.integer) or stored < 0
            ):
                raise self._error(
                    f"vocabulary entries must be name -> stored id >= 0, got {name!r}: {stored!r}"
                )
        return {name: int(stored) for name, stored in vocabulary.items()}

    def _resolve_target(self, where: str, target: Any, domain_ids: Mapping[str, int]) -> int:
        """Loss id of a right-hand side (``where`` names it): a domain name, or None (ignore)."""
        if target is None:
            return IGNORE_DOMAIN
        if not isinstance(target, str):
            raise self._error(
                f"{where}: the target must be a domain name or null, got {target!r} "
                "(quote names such as yes/no/on/off)"
            )
        if target not in domain_ids:
            raise self._error(
                f"{where}: unknown domain {target!r}; domains are {', '.join(self.domains)}"
            )
        return domain_ids[target]

    def _is_glob(self, key: Any) -> bool:
        return (
            isinstance(key, str)
            and not (self.vocabulary is not None and key in self.vocabulary)
            and not GLOB_CHARS.isdisjoint(key)
        )

    def _add_glob(self, pattern: str, loss_id: int) -> None:
        if self.vocabulary is None:
            raise self._error(
                f"map key {pattern!r} is a glob over label names, which needs a vocabulary of "
                "the stored labels (name -> id); without one, use integer ids"
            )
        if not any(fnmatch.fnmatchcase(name, pattern) for name in self.vocabulary):
            raise self._error(f"map key {pattern!r}: the glob matches no label name")
        self._globs.append((pattern, loss_id))

    def _exact_stored_id(self, key: Any) -> int:
        """Stored id named by an exact (non-glob) key."""
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise self._error(
                f"map key {key!r}: keys are stored label ids (integers) or names "
                "(quote names such as yes/no/on/off)"
            )
        if isinstance(key, int):
            if key < 0:
                raise self._error(f"map key {key!r}: stored ids are >= 0")
            return key
        if self.vocabulary is not None and key in self.vocabulary:
            return self.vocabulary[key]
        if key.strip().isascii() and key.strip().isdigit():  # not "²" (int() refuses it)
            return int(key)
        if self.vocabulary is None:
            raise self._error(
                f"map key {key!r} is a label name, which needs a vocabulary of the stored "
                "labels (name -> id); without one, use integer ids"
            )
        raise self._error(f"map key {key!r} is not a label name of the vocabulary")

    def _resolve(self, stored: int) -> int:
        """Loss id of one stored id, or ``_UNCOVERED``."""
        if stored in self._exact:
            return self._exact[stored]
        names = self._names_of.get(stored, ())
        for pattern, loss_id in self._globs:
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                return loss_id
        if self._has_default:
            assert self._default is not None
            return self._default
        return _UNCOVERED

    def _table(self, size: int) -> np.ndarray:
        """Cached table of ``_resolve`` over ``0..size-1`` (with ``_UNCOVERED`` entries)."""
        cached = self._table_cache.size
        if cached < size:
            extra = np.fromiter(
                (self._resolve(i) for i in range(cached, size)), dtype=np.int64, count=size - cached
            )
            self._table_cache = np.concatenate([self._table_cache, extra])
        return self._table_cache[:size]

    def _check_not_below_ignore(self, ids: np.ndarray) -> None:
        if ids.size and int(ids.min()) < IGNORE_DOMAIN:
            raise self._error(
                f"stored id {int(ids.min())} is invalid: ids are >= 0, or -1 for unlabelled"
            )

    def _raise_uncovered(self, uncovered: np.ndarray) -> None:
        if uncovered.size == 0:
            return
        listed = []
        for stored in uncovered[:_MAX_LISTED].tolist():
            names = self._names_of.get(stored)
            listed.append(f"{stored} ({', '.join(map(repr, names))})" if names else str(stored))
        more = f" and {uncovered.size - _MAX_LISTED} more" if uncovered.size > _MAX_LISTED else ""
        raise self._error(
            f"the label map does not cover {uncovered.size} stored label(s) of the data: "
            f"{', '.join(listed)}{more}; add them to 'map' or set a 'default' "
            "(a domain, or null to ignore them)"
        )


def permute_document_labels(doc_labels_N: np.ndarray, seed: int) -> np.ndarray:
    """The random-label control: shuffle the labels across documents with a seeded permutation.

    Decision (the paper only says "random domain labels"): the labelled documents' labels are
    permuted among themselves, so every label keeps its frequency (in documents) while the link
    between a document's text and its label is broken. Unlabelled documents (-1) stay
    unlabelled, in place, so padding and ignored text stay out of the loss exactly as with the
    real labels. Apply it to the *loss* ids (after the label map), so ``null``-mapped documents
    stay ignored. All segments of one document keep sharing its (new) label. Deterministic
    given ``seed`` (numpy ``default_rng``), independent of platform and process.

    Args:
        doc_labels_N: One integer label per document, shape ``(N,)``, values >= -1.
        seed: Seed of the permutation (``--moe-edl-random-seed``), >= 0.

    Returns:
        New array of the same shape and dtype: -1 where the input is -1, the labelled entries
        a permutation of the input's labelled entries.

    Raises:
        EDLConfigError: If the labels are not a 1-D integer array, contain a value < -1, or the
            seed is not an integer >= 0.
    """
    labels_N = np.asarray(doc_labels_N)
    if labels_N.ndim != 1 or (labels_N.size and not np.issubdtype(labels_N.dtype, np.integer)):
        raise EDLConfigError(
            f"doc_labels_N must be a 1-D integer array, got shape {labels_N.shape} "
            f"and dtype {labels_N.dtype}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise EDLConfigError(f"--moe-edl-random-seed must be an integer >= 0, got {seed!r}")
    if labels_N.size and int(labels_N.min()) < IGNORE_DOMAIN:
        raise EDLConfigError(
            f"document label {int(labels_N.min())} is invalid: labels are >= 0, or -1 for "
            "unlabelled"
        )
    out_N = labels_N.copy()
    labelled_N = labels_N != IGNORE_DOMAIN
    out_N[labelled_N] = np.random.default_rng(int(seed)).permutation(labels_N[labelled_N])
    return out_N
