"""The domain sidecar: one domain id per sequence of a Megatron indexed dataset.

``<prefix>.bin``/``<prefix>.idx`` stay exactly what megatron-core's ``IndexedDatasetBuilder``
writes (stock Megatron reads them unchanged); the labels live next to them in
``<prefix>.domains``, aligned to the index's *sequences* (``GPTDataset`` treats sequences as its
documents; our preprocessing writes one sequence per document).

Format, version 1 (little-endian)::

    offset  size  field
    0       8     magic b"EDLDOM\\x00\\x01"
    8       8     <Q  format version (1)
    16      1     <B  dtype code of the ids (Megatron's DType codes: 3 = int16, 4 = int32)
    17      8     <Q  sequence count N (must equal the .idx's)
    25      8     <Q  document count (must equal the .idx's)
    33      8     <Q  size in bytes of the .idx file it was written for
    41      32    sha256 of the .idx's first and last MiB (fingerprint of that index)
    73      8     <Q  length L of the JSON block
    81      L     JSON: {"vocabulary": {"<label name>": <id>, ...}}
    81+L    N*s   domain ids, one per sequence, in the dtype (-1 = unlabelled)

Loading checks the magic, the version, the counts, the size and the fingerprint against the
``.idx``, that the JSON block is UTF-8 JSON holding a ``"vocabulary"`` object, and that no id is
below -1, and raises :class:`SidecarMismatchError` naming the file and the field that differs (or
the first bad sequence), so a sidecar from another run, or an edited, damaged or truncated one,
is an error, never a silent mislabel.

:func:`read_index_header` checks a Megatron ``.idx`` before anything maps it: its header and that
the file is long enough for the arrays the header describes (megatron-core maps a short file and
fails deep inside with a traceback per half-built object).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"EDLDOM\x00\x01"
VERSION = 1
SUFFIX = ".domains"
_DTYPES = {3: np.int16, 4: np.int32}
_HEADER = struct.Struct("<8sQBQQQ32sQ")
_FINGERPRINT_SPAN = 1 << 20
INDEX_MAGIC = b"MMIDIDX\x00\x00"
"""The first bytes of every Megatron ``.idx`` file."""
_INDEX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents
INDEX_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
"""Megatron's ``DType`` codes of the token dtype in an ``.idx`` header."""


class SidecarMismatchError(ValueError):
    """The sidecar does not belong to the index next to it (or is damaged)."""


class IndexFileError(ValueError):
    """A Megatron ``.idx`` file that cannot be read (not an index, unknown version, truncated)."""


@dataclasses.dataclass(frozen=True)
class IndexHeader:
    """The header of a Megatron ``.idx`` file (:func:`read_index_header`)."""

    dtype: type[np.number]
    """Token dtype of the ``.bin``."""
    sequences: int
    """Sequence count (GPTDataset's documents)."""
    documents: int
    """Document count: the length of the document-index array, the leading 0 included."""
    size: int
    """Size of the ``.idx`` in bytes."""

    @property
    def arrays_offset(self) -> int:
        """Where the sequence lengths start."""
        return _INDEX_HEADER.size

    @property
    def needed_size(self) -> int:
        """Bytes the header and its arrays take (lengths int32, pointers and documents int64)."""
        return _INDEX_HEADER.size + 12 * self.sequences + 8 * self.documents


def read_index_header(idx_path: str | os.PathLike) -> IndexHeader:
    """Read and check the header of a Megatron ``.idx`` file.

    Args:
        idx_path: The ``.idx`` file.

    Returns:
        Its :class:`IndexHeader`.

    Raises:
        IndexFileError: Naming the file, if it is a folder, lacks the magic, has another version
            or token dtype code, or is shorter than the arrays its header describes.
        OSError: If it cannot be opened (missing, no permission).
    """
    if os.path.isdir(idx_path):
        raise IndexFileError(f"{idx_path} is a folder, not a file")
    with open(idx_path, "rb") as f:
        header = f.read(_INDEX_HEADER.size)
        size = os.fstat(f.fileno()).st_size
    if len(header) < _INDEX_HEADER.size:
        raise IndexFileError(f"{idx_path}: not a Megatron .idx file (only {size} bytes)")
    magic, version, code, sequences, documents = _INDEX_HEADER.unpack(header)
    if magic != INDEX_MAGIC:
        raise IndexFileError(f"{idx_path}: not a Megatron .idx file (magic {magic!r})")
    if version != 1:
        raise IndexFileError(f"{idx_path}: .idx format version {version}, Megatron writes 1")
    if code not in INDEX_DTYPES:
        raise IndexFileError(f"{idx_path}: unknown token dtype code {code} in the .idx header")
    result = IndexHeader(INDEX_DTYPES[code], sequences, documents, size)
    if size < result.needed_size:
        raise IndexFileError(
            f"{idx_path}: truncated: {size} bytes, but its header describes {sequences} "
            f"sequences and {documents} document indices ({result.needed_size} bytes)"
        )
    return result


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}{SUFFIX}")


def index_fingerprint(idx_path: str | os.PathLike) -> tuple[int, bytes]:
    """``(size, sha256 of the first and last MiB)`` of an ``.idx`` file."""
    size = os.path.getsize(idx_path)
    digest = hashlib.sha256()
    with open(idx_path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_SPAN))
        if size > _FINGERPRINT_SPAN:
            f.seek(max(_FINGERPRINT_SPAN, size - _FINGERPRINT_SPAN))
            digest.update(f.read())
    return size, digest.digest()


def index_counts(idx_path: str | os.PathLike) -> tuple[int, int]:
    """``(sequences, documents)`` of a Megatron ``.idx`` file, from its header.

    The header (megatron-core's ``indexed_dataset._IndexWriter``): magic ``b"MMIDIDX\\x00\\x00"``
    (9 bytes), ``<Q`` version, ``<B`` dtype code, ``<Q`` sequence count, ``<Q`` document count.
    The one reader of that header in the package (sidecars, labelled datasets).

    Raises:
        SidecarMismatchError: The file is too short or lacks the magic.
    """
    with open(idx_path, "rb") as f:
        header = f.read(_INDEX_HEADER.size)
    if len(header) < _INDEX_HEADER.size:
        raise SidecarMismatchError(f"{idx_path}: not a Megatron .idx file (too short)")
    magic, _version, _dtype, sequences, documents = _INDEX_HEADER.unpack(header)
    if magic != INDEX_MAGIC:
        raise SidecarMismatchError(f"{idx_path}: not a Megatron .idx file (magic {magic!r})")
    return sequences, documents


def _dtype_code(num_ids: int) -> int:
    return 3 if num_ids <= np.iinfo(np.int16).max else 4


def write_sidecar(
    prefix: str | os.PathLike,
    domain_ids_N: np.ndarray,
    vocabulary: Mapping[str, int],
) -> Path:
    """Write ``<prefix>.domains`` for the finished ``<prefix>.idx``, atomically.

    Args:
        prefix: The dataset prefix (``<prefix>.idx`` must exist and be final).
        domain_ids_N: One domain id per sequence of the index (-1 = unlabelled).
        vocabulary: Label name -> id, stored in the sidecar for inspection and label maps.

    Returns:
        The sidecar's path.

    Raises:
        SidecarMismatchError: if the number of ids differs from the index's sequence count.
        ValueError: if an id is < -1 or not in the vocabulary's id range.
    """
    idx_path = f"{os.fspath(prefix)}.idx"
    sequences, documents = index_counts(idx_path)
    ids_N = np.asarray(domain_ids_N)
    if ids_N.shape != (sequences,):
        raise SidecarMismatchError(
            f"{idx_path} has {sequences} sequences but {ids_N.shape[0]} domain ids were given"
        )
    num_ids = max(vocabulary.values(), default=-1) + 1
    if ids_N.size and (ids_N.min() < -1 or ids_N.max() >= max(num_ids, 1)):
        raise ValueError(
            f"domain ids must lie in [-1, {num_ids}) (the vocabulary's ids), "
            f"got [{ids_N.min()}, {ids_N.max()}]"
        )
    code = _dtype_code(num_ids)
    size, fingerprint = index_fingerprint(idx_path)
    block = json.dumps({"vocabulary": dict(vocabulary)}, sort_keys=True).encode()
    path = sidecar_path(prefix)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(
            _HEADER.pack(MAGIC, VERSION, code, sequences, documents, size, fingerprint, len(block))
        )
        f.write(block)
        f.write(ids_N.astype(_DTYPES[code]).tobytes())
    os.replace(tmp, path)
    return path


def read_sidecar(prefix: str | os.PathLike) -> tuple[np.ndarray, dict[str, int]]:
    """Load and verify ``<prefix>.domains`` against ``<prefix>.idx``.

    Returns:
        ``(domain_ids_N int64 array, vocabulary)``.

    Raises:
        FileNotFoundError: if the sidecar is missing.
        SidecarMismatchError: naming the file and the field, if it does not match the index, or
            naming the file (and the sequence) if its JSON block or an id is damaged.
    """
    path = sidecar_path(prefix)
    idx_path = f"{os.fspath(prefix)}.idx"
    if path.is_dir():
        raise SidecarMismatchError(f"{path} is a folder, not a domain sidecar")
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise SidecarMismatchError(f"{path}: truncated header ({len(data)} bytes)")
    magic, version, code, sequences, documents, size, fingerprint, block_len = _HEADER.unpack_from(
        data
    )
    if magic != MAGIC:
        raise SidecarMismatchError(f"{path}: not a domain sidecar (magic {magic!r})")
    if version != VERSION:
        raise SidecarMismatchError(f"{path}: format version {version}, this reader knows {VERSION}")
    if code not in _DTYPES:
        raise SidecarMismatchError(f"{path}: unknown dtype code {code}")
    idx_sequences, idx_documents = index_counts(idx_path)
    checks = (
        ("sequence count", sequences, idx_sequences),
        ("document count", documents, idx_documents),
    )
    for field, ours, theirs in checks:
        if ours != theirs:
            raise SidecarMismatchError(f"{path}: {field} {ours} != {theirs} in {idx_path}")
    if (size, fingerprint) != index_fingerprint(idx_path):
        raise SidecarMismatchError(
            f"{path} was written for another {idx_path} (size or content fingerprint differs)"
        )
    start = _HEADER.size + block_len
    dtype = np.dtype(_DTYPES[code])
    if len(data) != start + sequences * dtype.itemsize:
        raise SidecarMismatchError(
            f"{path}: {len(data)} bytes, expected {start + sequences * dtype.itemsize}"
        )
    vocabulary = _vocabulary_block(path, data[_HEADER.size : start])
    ids_N = np.frombuffer(data, dtype=dtype, offset=start, count=sequences).astype(np.int64)
    below = np.flatnonzero(ids_N < -1)
    if below.size:
        first = int(below[0])
        raise SidecarMismatchError(
            f"{path}: sequence {first} (document index {first}) has domain id {ids_N[first]}, "
            f"below -1 (the unlabelled id); {below.size} sequence(s) have such ids: the file is "
            "damaged"
        )
    return ids_N, vocabulary


def _vocabulary_block(path: Path, block: bytes) -> Any:
    """The ``"vocabulary"`` of a sidecar's JSON block (its entries are checked by the callers)."""
    try:
        parsed = json.loads(block.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise SidecarMismatchError(
            f"{path}: the JSON block is not UTF-8 (byte {_HEADER.size + err.start} of the file): "
            "the file is damaged"
        ) from None
    except json.JSONDecodeError as err:
        raise SidecarMismatchError(
            f"{path}: the JSON block is not valid JSON ({err.msg} at byte "
            f"{_HEADER.size + err.pos} of the file): the file is damaged"
        ) from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("vocabulary"), dict):
        raise SidecarMismatchError(
            f'{path}: the JSON block holds no "vocabulary" object (keys: '
            f"{sorted(parsed)[:5] if isinstance(parsed, dict) else type(parsed).__name__}): "
            "the file is damaged"
        )
    return parsed["vocabulary"]
