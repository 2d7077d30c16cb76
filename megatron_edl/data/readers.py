"""Input side of preprocessing: expanding ``--input`` patterns and streaming records in chunks.

Formats are recognised by content, not by name:

* Parquet (starts with ``PAR1``): read with pyarrow, one row group batch at a time; a record is
  a row as a ``dict`` (struct columns become nested dicts); its "line" is the 1-based row number.
* gzip (starts with ``1f 8b``): JSON Lines inside.
* anything else: JSON Lines, one record per ``\\n``-terminated line, kept as raw ``bytes``
  (decoding and parsing happen in the workers, so that bad lines are counted, not fatal here).

Memory is bounded by one chunk per reader (``chunk_records`` records or ``chunk_bytes`` bytes,
whichever comes first; a single longer line makes a chunk of its own).
"""

from __future__ import annotations

import glob
import gzip
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megatron_edl.core.labels import GLOB_CHARS

__all__ = ["Chunk", "InputError", "detect_format", "expand_inputs", "iter_chunks"]

_MAGIC_PARQUET = b"PAR1"
_MAGIC_GZIP = b"\x1f\x8b"
_MAGIC_ZSTD = b"\x28\xb5\x2f\xfd"


class InputError(ValueError):
    """An input file cannot be found or read as a whole (not a per-record problem)."""


@dataclass(frozen=True)
class Chunk:
    """Consecutive records of one input file: the unit of work sent to a worker.

    Attributes:
        path: The input file.
        file_index: Position of ``path`` in the expanded input list.
        first_line: 1-based line (JSONL) or row (Parquet) number of ``records[0]``.
        records: Raw lines without their ``\\n`` (JSONL) or row dicts (Parquet).
        num_bytes: Bytes of input the chunk covers (uncompressed line bytes; 0 for Parquet).
    """

    path: str
    file_index: int
    first_line: int
    records: list[bytes] | list[dict]
    num_bytes: int


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Expand ``--input`` values into a list of files, in a deterministic order.

    A value with glob characters (``* ? [``; ``**`` spans folders) expands to its matches,
    sorted; other values are taken as they are. The order of the values is kept.

    Args:
        patterns: File paths and glob patterns.

    Returns:
        The input files.

    Raises:
        InputError: if a pattern matches nothing, a path does not exist or is a folder, or one
            file is named twice (it would be preprocessed twice).
    """
    files: list[str] = []
    origin: dict[str, str] = {}
    for pattern in patterns:
        if GLOB_CHARS.intersection(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputError(f"--input {pattern!r} matches no file")
        elif os.path.isdir(pattern):
            raise InputError(f"--input {pattern!r} is a folder; give files or a glob")
        elif not os.path.exists(pattern):
            raise InputError(f"--input {pattern!r} does not exist")
        else:
            matches = [pattern]
        for path in matches:
            key = os.path.realpath(path)
            if key in origin:
                raise InputError(
                    f"input file {path!r} is named twice (by --input {origin[key]!r} and "
                    f"{pattern!r}); it would be preprocessed twice"
                )
            origin[key] = pattern
            files.append(path)
    return files


def detect_format(path: str) -> str:
    """``"parquet"``, ``"jsonl.gz"`` or ``"jsonl"``, from the file's first bytes.

    Args:
        path: An input file.

    Returns:
        The format name.

    Raises:
        InputError: for zstd-compressed input, which is not supported.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _MAGIC_PARQUET:
        return "parquet"
    if head[:2] == _MAGIC_GZIP:
        return "jsonl.gz"
    if head == _MAGIC_ZSTD:
        raise InputError(f"{path}: zstd-compressed input is not supported; decompress it first")
    return "jsonl"


def iter_chunks(
    path: str, file_index: int, *, chunk_records: int, chunk_bytes: int
) -> Iterator[Chunk]:
    """Stream the records of one input file in chunks.

    Args:
        path: The input file.
        file_index: Its position in the expanded input list (carried in each chunk).
        chunk_records: Most records per chunk.
        chunk_bytes: Most line bytes per chunk (JSONL; a longer line gets a chunk of its own).

    Yields:
        Chunks, in file order; an empty file yields none.

    Raises:
        InputError: if the file is damaged as a whole (truncated gzip, unreadable Parquet).
    """
    fmt = detect_format(path)
    if fmt == "parquet":
        yield from _iter_parquet(path, file_index, chunk_records)
    else:
        yield from _iter_jsonl(path, file_index, fmt == "jsonl.gz", chunk_records, chunk_bytes)


def _iter_jsonl(
    path: str, file_index: int, gzipped: bool, chunk_records: int, chunk_bytes: int
) -> Iterator[Chunk]:
    lines: list[bytes] = []
    num_bytes = 0
    first_line = 1
    line_no = 0
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if len(lines) >= chunk_records or (lines and num_bytes + len(line) > chunk_bytes):
                    yield Chunk(path, file_index, first_line, lines, num_bytes)
                    lines, num_bytes, first_line = [], 0, line_no
                lines.append(line[:-1] if line.endswith(b"\n") else line)
                num_bytes += len(line)
    except (EOFError, OSError, zlib.error) as e:
        raise InputError(f"{path}: unreadable after line {line_no}: {e}") from e
    if lines:
        yield Chunk(path, file_index, first_line, lines, num_bytes)


def _iter_parquet(path: str, file_index: int, chunk_records: int) -> Iterator[Chunk]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a listed requirement
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    first_line = 1
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=chunk_records):
            rows = batch.to_pylist()
            if rows:
                yield Chunk(path, file_index, first_line, rows, 0)
                first_line += len(rows)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: unreadable Parquet near row {first_line}: {e}") from e
