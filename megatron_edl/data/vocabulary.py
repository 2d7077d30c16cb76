"""The label vocabulary: stable integer ids for hierarchical domain label names.

Preprocessing stores one integer per document (the ``.domains`` sidecar); the vocabulary says
which name each integer stands for. Names are hierarchical, ``/``-separated (``en/science``,
``zh/history``, ``math``), so that a training-side label map (``megatron_edl.core.labels``)
can send fine labels to coarse loss domains with globs such as ``"en/*"``.

File format (YAML)::

    # label name -> id; ids are stable: never renumber or reuse an id
    labels:
      en/science: 0
      en/history: 1
      zh/history: 2
      math: 3

Rules:

* ``labels`` is the only top-level key; each entry maps a name to a non-negative integer id.
  Names and ids are unique; ids need not be contiguous (a retired label keeps its id reserved).
* A name is a non-empty string of ``/``-separated non-empty parts without surrounding
  whitespace, and without the glob characters ``* ? [ ]`` (label maps treat those as patterns).
  Every character is printable (``str.isprintable``; the space is the only blank allowed): no
  control characters (NUL, ESC, DEL U+007F, NEL U+0085), no line or paragraph separators
  (U+2028, U+2029), no format characters (zero-width space, joiners, BOM), none unassigned or
  private-use. YAML would turn some of these into other characters or refuse the file, and the
  others look like a different name. Quote names that YAML would read as something else
  (``"yes"``, ``"7"``).
* Extending (``--extend-vocab``) appends new names with ids ``max id + 1, max id + 2, ...`` in
  the order the labels are first met in the input (deterministic for a given input and flags)
  and rewrites the file atomically (comments in the file are not kept). The rewrite happens
  under an exclusive lock on ``FILE.lock`` (:class:`VocabularyLock`), after reading the file
  again: two runs extending one file at the same time both end with the ids of that file.

Errors are ``DataError`` (a ``ValueError``) naming the file and the entry.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from megatron_edl.core.labels import GLOB_CHARS, load_strict_yaml
from megatron_edl.core.options import EDLConfigError
from megatron_edl.data.errors import DataError

__all__ = [
    "LabelVocabulary",
    "VocabularyLock",
    "label_name_problem",
    "load_yaml_file",
]

logger = logging.getLogger(__name__)

_NOT_IN_NAMES = GLOB_CHARS | {"]"}
"""A name never looks like a glob: no glob character, nor the ``]`` that closes a class."""
SURROGATE = re.compile("[\ud800-\udfff]")
"""An unpaired surrogate: a ``str`` that is not valid UTF-8 (from a ``\\udXXX`` JSON escape)."""
_MAX_ID = 2**31 - 1  # the sidecar stores ids as int16 or int32


def label_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a label name, or ``None`` if it can.

    Args:
        name: A candidate label name.

    Returns:
        A short reason (for error messages), or ``None`` for a valid name.
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if SURROGATE.search(name):
        return "has an unpaired surrogate (not valid UTF-8)"
    if name != name.strip():
        return "has leading or trailing whitespace"
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        return (
            f"has the non-printable character U+{ord(bad):04X} (control, line separator, "
            "format or unassigned characters cannot be label names)"
        )
    if _NOT_IN_NAMES.intersection(name):
        return "contains a glob character (* ? [ ])"
    if any(not part for part in name.split("/")):
        return "has an empty '/'-separated part"
    return None


class LabelVocabulary:
    """A mutable name -> id mapping with the vocabulary rules of the module docstring.

    Args:
        ids: Initial ``name -> id`` entries (validated).
        source: Where the entries come from, for error messages (a file path or a description).

    Raises:
        DataError: if a name or an id breaks the rules.
    """

    def __init__(self, ids: Mapping[str, int] | None = None, *, source: str = "<vocabulary>"):
        self.source = source
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        for name, label_id in (ids or {}).items():
            self._insert(name, label_id)

    def _insert(self, name: object, label_id: object) -> None:
        problem = label_name_problem(name)
        if problem is not None:
            raise DataError(f"{self.source}: label name {name!r} {problem}")
        if isinstance(label_id, bool) or not isinstance(label_id, int):
            raise DataError(
                f"{self.source}: id of label {name!r} must be an integer, got {label_id!r}"
            )
        if not 0 <= label_id <= _MAX_ID:
            raise DataError(
                f"{self.source}: id of label {name!r} must lie in [0, {_MAX_ID}], got {label_id}"
            )
        if name in self._ids:
            raise DataError(f"{self.source}: label {name!r} is listed twice")
        if label_id in self._names:
            raise DataError(
                f"{self.source}: id {label_id} is given to both {self._names[label_id]!r} "
                f"and {name!r}"
            )
        self._ids[name] = label_id
        self._names[label_id] = name

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> LabelVocabulary:
        """Load a vocabulary file (format in the module docstring).

        Args:
            path: The YAML file.

        Returns:
            The vocabulary, with ``source`` set to the path.

        Raises:
            FileNotFoundError: if the file does not exist.
            DataError: if the file is not a valid vocabulary.
        """
        source = os.fspath(path)
        data = load_yaml_file(path, what="label vocabulary")
        if data is None:
            data = {"labels": {}}
        if not isinstance(data, dict) or set(data) != {"labels"}:
            keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise DataError(
                f"{source}: a label vocabulary has exactly one top-level key 'labels' "
                f"(a mapping of name -> id), got {keys}"
            )
        labels = data["labels"] if data["labels"] is not None else {}
        if not isinstance(labels, dict):
            raise DataError(
                f"{source}: 'labels' must map names to ids, got a {type(labels).__name__}"
            )
        return cls(labels, source=source)

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write the vocabulary atomically (temporary file in the same folder, then rename).

        Args:
            path: Destination file; its parent folder must exist.
        """
        path = Path(path)
        lines = [
            "# Label vocabulary (megatron-edl): label name -> stable id.",
            "# Ids are stored in .domains sidecars: never renumber or reuse one.",
            "labels:",
        ]
        for name, label_id in sorted(self._ids.items(), key=lambda item: item[1]):
            lines.append(f"  {_yaml_scalar(name)}: {label_id}")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, name: str) -> int | None:
        """The id of ``name``, or ``None`` if it is not in the vocabulary."""
        return self._ids.get(name)

    def add(self, name: str) -> int:
        """Append ``name`` with the next free id (``max id + 1``) and return that id.

        Args:
            name: A new, valid label name.

        Returns:
            The new id.

        Raises:
            DataError: if the name is invalid or already present.
        """
        label_id = max(self._names, default=-1) + 1
        self._insert(name, label_id)
        return label_id

    def name_of(self, label_id: int) -> str:
        """The name of ``label_id`` (``KeyError`` if unknown)."""
        return self._names[label_id]

    def as_dict(self) -> dict[str, int]:
        """A copy of the ``name -> id`` entries, in id order."""
        return dict(sorted(self._ids.items(), key=lambda item: item[1]))

    @property
    def num_ids(self) -> int:
        """``max id + 1`` (0 when empty): the size of an id-indexed table."""
        return max(self._names, default=-1) + 1

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __repr__(self) -> str:
        return f"LabelVocabulary({self.as_dict()!r}, source={self.source!r})"


def load_yaml_file(path: str | os.PathLike, *, what: str) -> Any:
    """:func:`load_strict_yaml`, with a one-line error naming the file for an unreadable one.

    Args:
        path: The YAML file.
        what: What the file is, for the error message (``"label vocabulary"``).

    Returns:
        The parsed document (``None`` for an empty file).

    Raises:
        FileNotFoundError: if the file does not exist.
        DataError: naming the file, if it is a folder, cannot be read, is not UTF-8 or not
            valid YAML.
    """
    source = os.fspath(path)
    if os.path.isdir(source):
        raise DataError(f"{source}: is a folder, not a {what} file")
    try:
        return load_strict_yaml(path, what=what)
    except FileNotFoundError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(
            f"{source}: the {what} is not UTF-8 text (byte {e.start}: {e.reason})"
        ) from None
    except OSError as e:
        raise DataError(f"{source}: cannot read the {what}: {e.strerror or e}") from None
    except EDLConfigError as e:  # the strict parser's own errors (duplicate key, bad YAML)
        raise DataError(str(e)) from None


class VocabularyLock:
    """An exclusive ``fcntl.flock`` on ``VOCAB.lock``, beside a vocabulary file.

    Opening the lock file (at construction) is the up-front check that the file's folder can
    be written; :meth:`acquire` waits for another run's update to end (the operating system
    releases the lock of a process that dies). The lock file stays (removing it would race).

    Args:
        vocab_path: The vocabulary file (need not exist yet).
        timeout_s: Seconds :meth:`acquire` waits before it gives up.

    Raises:
        DataError: naming the lock file, if it cannot be created or opened.
    """

    def __init__(self, vocab_path: str | os.PathLike, timeout_s: float = 600.0) -> None:
        self.path = f"{os.fspath(vocab_path)}.lock"
        self.timeout_s = timeout_s
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError as e:
            raise DataError(
                f"cannot create the lock file {self.path} beside the label vocabulary: "
                f"{e.strerror or e}"
            ) from None

    def acquire(self) -> None:
        """Take the lock, waiting at most ``timeout_s``.

        Raises:
            DataError: naming the lock file, when the wait times out.
        """
        assert self._fd is not None, "the lock was closed"
        deadline = time.monotonic() + self.timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if not waiting:
                logger.info("Waiting for %s: another run is updating the vocabulary", self.path)
                waiting = True
            if time.monotonic() >= deadline:
                raise DataError(
                    f"{self.path}: another run held the label vocabulary's lock for over "
                    f"{self.timeout_s:g} s; is it stuck?"
                )
            time.sleep(0.05)

    def release(self) -> None:
        """Release the lock (if held)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock file (releasing the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> VocabularyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _yaml_scalar(name: str) -> str:
    """``name`` as a double-quoted YAML key (a JSON string is one) that reads back unchanged."""
    return json.dumps(name, ensure_ascii=False)
