"""Input side of preprocessing: expanding ``--input`` patterns and streaming records in chunks.

Formats are recognised by content, not by name:

* Parquet (starts with ``PAR1``): read with pyarrow, one row group batch at a time; a record is
  a row as a ``dict`` (struct columns become nested dicts); its "line" is the 1-based row number.
* gzip (starts with ``1f 8b``): JSON Lines inside.
* anything else: JSON Lines, one record per ``\\n``-terminated line, kept as raw ``bytes``
  (decoding and parsing happen in the workers, so that bad lines are counted, not fatal here).

Memory is bounded by one chunk per reader (``chunk_records`` records or ``chunk_bytes`` bytes,
whichever comes first; a single longer line makes a chunk of its own).

Each input is read once, as a stream: the format comes from the first bytes of the very stream
that is then consumed (:func:`probe_input` keeps them), so a pipe, ``/dev/stdin``, a process
substitution ``<(zcat a.jsonl.gz)`` or a named FIFO loses nothing. Such a stream is opened when
the inputs are checked, before any work; Parquet needs a seekable file and is refused from one.
A FIFO that no process opens for writing within :data:`FIFO_WRITER_TIMEOUT_S` is refused, rather
than blocking in ``open()`` forever.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import select
import stat
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from megatron_edl.core.labels import GLOB_CHARS

__all__ = [
    "FIFO_WRITER_TIMEOUT_S",
    "Chunk",
    "InputError",
    "InputFile",
    "detect_format",
    "expand_inputs",
    "iter_chunks",
    "probe_input",
]

_MAGIC_PARQUET = b"PAR1"
_MAGIC_GZIP = b"\x1f\x8b"
_MAGIC_ZSTD = b"\x28\xb5\x2f\xfd"
_HEAD_BYTES = 4  # the longest magic number

FIFO_WRITER_TIMEOUT_S = 60.0
"""Seconds to wait for a process to open a FIFO input for writing before refusing it."""


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

    A value that names an existing file is taken literally, even with glob characters in its
    name (``data[1].jsonl``); otherwise a value with glob characters (``* ? [``; ``**`` spans
    folders) expands to its matches, sorted. The order of the values is kept.

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
        if os.path.isdir(pattern):
            raise InputError(f"--input {pattern!r} is a folder; give files or a glob")
        if os.path.exists(pattern):
            matches = [pattern]  # a literal name first: 'data[1].jsonl' is that file
        elif GLOB_CHARS.intersection(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputError(f"--input {pattern!r} matches no file")
        else:
            raise InputError(f"--input {pattern!r} does not exist")
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


class InputFile:
    """One input file, its format and, for a stream that can be read only once, the stream.

    Made by :func:`probe_input`. A regular file is opened again by :meth:`open`; a pipe, FIFO
    or device is opened once, by :func:`probe_input`, and :meth:`open` hands over that stream
    with its first bytes (those the format was read from) put back in front.

    Attributes:
        path: The input file, as given.
        format: ``"parquet"``, ``"jsonl.gz"`` or ``"jsonl"``.
    """

    def __init__(self, path: str, fmt: str, stream: BinaryIO | None = None) -> None:
        self.path = path
        self.format = fmt
        self._stream = stream
        self._is_stream = stream is not None

    def open(self) -> BinaryIO:
        """A binary stream of the whole file, from its first byte.

        Raises:
            InputError: if the input is a stream that was already read.
        """
        if not self._is_stream:
            return open(self.path, "rb")
        if self._stream is None:
            raise InputError(f"--input {self.path!r} is a pipe or FIFO and was already read")
        stream, self._stream = self._stream, None
        return stream

    def close(self) -> None:
        """Close a stream that was opened by :func:`probe_input` and not handed over."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class _PrefixedReader(io.RawIOBase):
    """A raw stream that yields ``head`` first, then reads from the file descriptor ``fd``."""

    def __init__(self, head: bytes, fd: int) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._fd = fd

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return os.readv(self._fd, [buffer])

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _format_of(head: bytes, path: str) -> str:
    if head == _MAGIC_PARQUET:
        return "parquet"
    if head[:2] == _MAGIC_GZIP:
        return "jsonl.gz"
    if head == _MAGIC_ZSTD:
        raise InputError(f"{path}: zstd-compressed input is not supported; decompress it first")
    return "jsonl"


def detect_format(path: str) -> str:
    """``"parquet"``, ``"jsonl.gz"`` or ``"jsonl"``, from the file's first bytes.

    Reads the file; for a pipe or FIFO, use :func:`probe_input`, which keeps what it read.

    Args:
        path: An input file.

    Returns:
        The format name.

    Raises:
        InputError: for zstd-compressed input, which is not supported.
    """
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    return _format_of(head, path)


def probe_input(path: str) -> InputFile:
    """Find the format of an input; open it now if it is a stream that can be read only once.

    A regular file's first bytes are read and the file closed. Anything else (a pipe, a FIFO,
    ``/dev/stdin``, a character device) is opened once, without blocking: a FIFO waits at most
    :data:`FIFO_WRITER_TIMEOUT_S` for a writer. Its first bytes are kept for the reader.

    Args:
        path: An input file.

    Returns:
        The input, with its format (and its stream, if it is not a regular file).

    Raises:
        InputError: for zstd input, Parquet from a stream, a FIFO without a writer, or an input
            that cannot be opened; each naming the file.
    """
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            return InputFile(path, detect_format(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open() waits for no writer
    except OSError as e:
        raise InputError(f"--input {path!r}: cannot open: {e.strerror or e}") from e
    try:
        head = _first_bytes(fd, path, fifo=stat.S_ISFIFO(mode))
        fmt = _format_of(head, path)
        if fmt == "parquet":
            raise InputError(
                f"--input {path!r}: Parquet from a pipe or FIFO is not supported (it needs a "
                "seekable file); write it to a file first"
            )
    except BaseException:
        os.close(fd)
        raise
    stream = io.BufferedReader(_PrefixedReader(head, fd))
    return InputFile(path, fmt, stream)


def _first_bytes(fd: int, path: str, *, fifo: bool) -> bytes:
    """Up to :data:`_HEAD_BYTES` first bytes of a stream opened non-blocking; leaves it blocking.

    On a FIFO with no writer a read returns end-of-file at once; a writer that has it open but
    wrote nothing yet makes the read fail with ``EAGAIN``, and one that came and went without
    writing shows as ``POLLHUP``: both end the wait. Without either, the wait ends after
    :data:`FIFO_WRITER_TIMEOUT_S` with an error.
    """
    head = b""
    if fifo:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + FIFO_WRITER_TIMEOUT_S
        while True:
            try:
                head = os.read(fd, _HEAD_BYTES)
            except BlockingIOError:
                break  # a writer has the FIFO open; it has written nothing yet
            if head or poller.poll(0):  # data, or a writer came and went (end of file)
                break
            if time.monotonic() >= deadline:
                raise InputError(
                    f"--input {path!r}: no process opened this FIFO for writing within "
                    f"{FIFO_WRITER_TIMEOUT_S:g} s; start the writer first, or give a file"
                )
            poller.poll(50)  # wakes early when a writer's first bytes arrive
    os.set_blocking(fd, True)
    while len(head) < _HEAD_BYTES:
        more = os.read(fd, _HEAD_BYTES - len(head))
        if not more:
            break
        head += more
    return head


def iter_chunks(
    source: str | InputFile, file_index: int, *, chunk_records: int, chunk_bytes: int
) -> Iterator[Chunk]:
    """Stream the records of one input file in chunks.

    Args:
        source: The input file (a path, probed here, or the result of :func:`probe_input`).
        file_index: Its position in the expanded input list (carried in each chunk).
        chunk_records: Most records per chunk.
        chunk_bytes: Most line bytes per chunk (JSONL; a longer line gets a chunk of its own).

    Yields:
        Chunks, in file order; an empty file yields none.

    Raises:
        InputError: if the file is damaged as a whole (truncated gzip, unreadable Parquet).
    """
    source = probe_input(source) if isinstance(source, str) else source
    if source.format == "parquet":
        yield from _iter_parquet(source.path, file_index, chunk_records)
        return
    try:
        stream = source.open()
    except OSError as e:
        raise InputError(f"--input {source.path!r}: cannot open: {e.strerror or e}") from e
    with stream:
        yield from _iter_jsonl(
            source.path, stream, file_index, source.format == "jsonl.gz", chunk_records, chunk_bytes
        )


def _iter_jsonl(
    path: str,
    stream: BinaryIO,
    file_index: int,
    gzipped: bool,
    chunk_records: int,
    chunk_bytes: int,
) -> Iterator[Chunk]:
    lines: list[bytes] = []
    num_bytes = 0
    first_line = 1
    line_no = 0
    try:
        with gzip.GzipFile(fileobj=stream, mode="rb") if gzipped else stream as f:
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
