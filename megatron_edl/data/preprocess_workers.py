"""Worker side of the preprocessor: decode, parse, tokenize and label chunks of records.

A pool of worker processes (``--workers N``) runs :class:`RecordEncoder` on chunks; the main
process (``megatron_edl.data.preprocess``) takes the results in input order through
:func:`ordered_map`, which also reports dead workers (a broken pool) instead of waiting.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_edl.data.errors import DataError
from megatron_edl.data.label_sources import Labeler, PreprocessError, SkipReason
from megatron_edl.data.readers import Chunk
from megatron_edl.data.vocabulary import (
    SURROGATE,
)

MAX_CHARS_PER_TOKEN = 64
"""With ``--max-document-tokens L``, a text of more than ``64 L`` characters is ``too_long``
without being tokenized. Real text averages 3-5 characters per token; 64 is more than the
longest tokens of common vocabularies (runs of spaces or punctuation) hold, so such a text has
more than ``L`` tokens with any of them."""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a worker needs to build its encoder (picklable)."""

    tokenizer_args: argparse.Namespace
    json_keys: tuple[str, ...]
    append_eod: bool
    max_document_tokens: int | None
    label_source: Labeler | None
    dtype: str


@dataclass
class ChunkResult:
    """A worker's answer for one chunk.

    ``statuses[i]`` is ``None`` for a record to write, else a :class:`SkipReason`; records with
    status ``None`` or a label problem carry tokens. ``tokens[k]`` concatenates those records'
    tokens for json key ``k`` and ``lengths[k][i]`` is record ``i``'s count (0 without tokens).
    """

    path: str
    file_index: int
    first_line: int
    statuses: list[SkipReason | None]
    labels: list[str | None]
    messages: dict[int, str]
    lengths: list[list[int]]
    tokens: list[np.ndarray]
    num_bytes: int


def _label_name(value: object) -> tuple[str | None, str | None]:
    """``(name, None)``, ``(None, None)`` for no label, or ``(None, problem)``."""
    if value is None or value == "":
        return None, None
    if isinstance(value, str):
        return value, None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    return None, f"label {value!r} is a {type(value).__name__}, expected a string"


class RecordEncoder:
    """Turns chunks of raw records into token arrays and raw label names (one per process)."""

    def __init__(self, spec: EncoderSpec, tokenizer: Any = None) -> None:
        self.spec = spec
        self.tokenizer = tokenizer or build_megatron_tokenizer(spec.tokenizer_args)
        self.eod = self.tokenizer.eod if spec.append_eod else None
        self.dtype = np.dtype(spec.dtype)
        self.label_fn = spec.label_source.bind() if spec.label_source is not None else None
        self.batched = getattr(spec.label_source, "batched", False)
        self.missing_message = (
            spec.label_source.missing_message() if spec.label_source is not None else ""
        )

    def encode_chunk(self, chunk: Chunk, file_label: str | None) -> ChunkResult:
        num_keys = len(self.spec.json_keys)
        statuses: list[SkipReason | None] = []
        labels: list[str | None] = []
        messages: dict[int, str] = {}
        lengths: list[list[int]] = [[] for _ in range(num_keys)]
        flat: list[list[int]] = [[] for _ in range(num_keys)]
        values: dict[int, object] = {}  # raw label of each record to label
        pending: dict[int, str] = {}  # text of each record a batched source labels
        for i, raw in enumerate(chunk.records):
            try:
                status, detail, record, text, ids = self._encode(raw)
                if status is None and self.label_fn is not None:
                    if self.batched:
                        pending[i] = text
                    else:
                        values[i] = self.label_fn(record, text, file_label)
            except Exception as e:  # a user callable or the tokenizer failed: stop, with place
                raise PreprocessError(
                    f"{chunk.path}:{chunk.first_line + i}: {type(e).__name__}: {e}"
                ) from e
            statuses.append(status)
            labels.append(None)
            if detail is not None:
                messages[i] = detail
            for k in range(num_keys):
                if ids is None:
                    lengths[k].append(0)
                else:
                    lengths[k].append(len(ids[k]))
                    flat[k].extend(ids[k])
        if pending:
            try:
                values.update(zip(pending, self.label_fn(list(pending.values())), strict=True))
            except Exception as e:  # the model failed on this chunk: stop, with place
                first, last = chunk.first_line + min(pending), chunk.first_line + max(pending)
                raise PreprocessError(
                    f"{chunk.path}:{first}-{last}: {type(e).__name__}: {e}"
                ) from e
        for i, value in values.items():
            name, problem = _label_name(value)
            if problem is not None:
                statuses[i], messages[i] = SkipReason.INVALID_LABEL, problem
            elif name is not None and SURROGATE.search(name):  # as for text: not a UTF-8 record
                detail = f"label {name!r} has an unpaired surrogate (not valid UTF-8)"
                statuses[i], messages[i] = SkipReason.INVALID_UTF8, detail
            elif name is None:
                statuses[i], messages[i] = SkipReason.MISSING_LABEL, self.missing_message
            else:
                labels[i] = name
        tokens = [np.array(f, dtype=self.dtype) for f in flat]
        return ChunkResult(
            chunk.path,
            chunk.file_index,
            chunk.first_line,
            statuses,
            labels,
            messages,
            lengths,
            tokens,
            chunk.num_bytes,
        )

    def _encode(
        self, raw: bytes | dict
    ) -> tuple[SkipReason | None, str | None, dict | None, str, list[list[int]] | None]:
        """``(status, detail message, record, text of the first json key, token ids per key or
        None)``; labelling is left to :meth:`encode_chunk`."""
        if isinstance(raw, bytes):
            if not raw.strip():
                return SkipReason.BLANK_LINE, None, None, "", None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return SkipReason.INVALID_UTF8, f"invalid UTF-8 at byte {e.start}", None, "", None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return SkipReason.INVALID_JSON, f"invalid JSON: {e}", None, "", None
            if not isinstance(record, dict):
                detail = f"expected a JSON object, got a {type(record).__name__}"
                return SkipReason.INVALID_JSON, detail, None, "", None
            may_have_surrogates = b"\\ud" in raw or b"\\uD" in raw
        else:
            record, may_have_surrogates = raw, False
        ids_per_key = []
        first_text = ""
        for key in self.spec.json_keys:
            text = record.get(key)
            if text is None:
                where = "is null" if key in record else "is absent"
                return SkipReason.MISSING_TEXT, f"json key {key!r} {where}", None, "", None
            if not isinstance(text, str):
                detail = f"json key {key!r} is a {type(text).__name__}, expected a string"
                return SkipReason.INVALID_TEXT, detail, None, "", None
            if may_have_surrogates and SURROGATE.search(text):
                detail = f"json key {key!r} has an unpaired surrogate escape (not valid UTF-8)"
                return SkipReason.INVALID_UTF8, detail, None, "", None
            limit = self.spec.max_document_tokens
            if limit is not None and len(text) > limit * MAX_CHARS_PER_TOKEN:
                # Longer than any tokenization of it could fit: skipped without tokenizing the
                # whole text, whose cost (a 20 MB line: gigabytes) is what the limit bounds.
                detail = (
                    f"json key {key!r}: {len(text)} characters > {MAX_CHARS_PER_TOKEN} x "
                    f"--max-document-tokens {limit} (not tokenized)"
                )
                return SkipReason.TOO_LONG, detail, None, "", None
            ids = self.tokenizer.tokenize(text) if text else ()
            if len(ids) == 0:
                return SkipReason.EMPTY_TEXT, f"json key {key!r} has no tokens", None, "", None
            ids = list(ids)
            if self.eod is not None:
                ids.append(self.eod)
            if limit is not None and len(ids) > limit:
                detail = f"json key {key!r}: {len(ids)} tokens > --max-document-tokens {limit}"
                return SkipReason.TOO_LONG, detail, None, "", None
            if not ids_per_key:
                first_text = text
            ids_per_key.append(ids)
        return None, None, record, first_text, ids_per_key


# Per-process state of pool workers (set by the pool initializer; unused in the main process).
_WORKER_ENCODER: RecordEncoder | None = None
_WORKER_INIT_ERROR: BaseException | None = None


def init_worker(spec: EncoderSpec) -> None:
    global _WORKER_ENCODER, _WORKER_INIT_ERROR
    # The main process stops the workers (SIGTERM) and handles Ctrl-C for them; a worker must
    # not outlive it either (Linux: SIGKILL when the main process dies, even by SIGKILL).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    try:
        _WORKER_ENCODER = RecordEncoder(spec)
    except BaseException as e:  # reported by the first task: a failing initializer would
        _WORKER_INIT_ERROR = e  # break the pool without saying why


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _encode_in_worker(task: tuple[Chunk, str | None]) -> ChunkResult:
    if _WORKER_INIT_ERROR is not None:
        raise _WORKER_INIT_ERROR
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode_chunk(*task)


def ordered_map(
    pool: ProcessPoolExecutor, items: Iterable[tuple[Chunk, str | None]], window: int
) -> Iterator[ChunkResult]:
    """The workers' results for ``items``, in order, with at most ``window`` chunks in flight.

    Raises:
        PreprocessError: if a worker process died (killed by a signal, e.g. SIGKILL from the
            out-of-memory killer, or exited): names the signal and the chunks in flight. The
            pool reports its breakage on the next result or on the next submit, whichever comes
            first; both give this error.
    """
    pending: deque = deque()

    def failed_in_flight() -> list[Chunk]:
        return [c for c, f in pending if f.done() and f.exception() is not None]

    def result() -> ChunkResult:
        chunk, future = pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise _broken_pool_error(pool, [chunk, *failed_in_flight()]) from e

    for item in items:
        try:
            future = pool.submit(_encode_in_worker, item)
        except BrokenProcessPool as e:
            # The pool broke after the last result was taken: the chunks it lost are the ones
            # in flight that failed (the pool fails them all), else the one not submitted.
            raise _broken_pool_error(pool, failed_in_flight() or [item[0]]) from e
        pending.append((item[0], future))
        if len(pending) >= window:
            yield result()
    while pending:
        yield result()


def _broken_pool_error(pool: ProcessPoolExecutor, lost: list[Chunk]) -> PreprocessError:
    """The one error of a broken pool: how its workers ended and where (``file:first-last``)."""
    where = ", ".join(f"{c.path}:{c.first_line}-{c.first_line + len(c.records) - 1}" for c in lost)
    return PreprocessError(
        f"a worker process {_dead_workers(pool)} while tokenizing chunk(s) {where} "
        "(out of memory? try fewer --workers or a smaller --chunk-size); nothing was written"
    )


def _dead_workers(pool: ProcessPoolExecutor) -> str:
    """How the pool's workers ended, e.g. ``"was killed by SIGKILL"``.

    A broken pool terminates (SIGTERM) its remaining workers, so another cause is preferred.
    Shuts the pool down and reads its process table (``_processes``; no public accessor in
    Python 3.12).
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=True)  # the broken pool's workers are joined: every exit code is known
    codes = [p.exitcode for p in processes]
    codes = [c for c in codes if c not in (None, 0)]
    if not codes:
        return "died"
    code = next((c for c in codes if c != -signal.SIGTERM), codes[0])
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now: cancel queued chunks and terminate running ones (no waiting)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    pool.shutdown(wait=True)


# Megatron-core's build_tokenizer: the files each --tokenizer-type reads (none: NullTokenizer).
_MODEL_TOKENIZERS = (
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
    "SFTTokenizer",
)
_FILE_FLAGS = {
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),  # without them megatron downloads GPT-2's
    "BertWordPieceLowerCase": ("vocab_file",),
    "BertWordPieceCase": ("vocab_file",),
}


def check_tokenizer_flags(tokenizer_args: argparse.Namespace) -> None:
    """Check the ``--tokenizer-*`` flags without building the tokenizer (before any work).

    Args:
        tokenizer_args: Parsed tokenizer flags.

    Raises:
        DataError: naming the flag, for a missing ``--tokenizer-type``, a missing
            ``--tokenizer-model`` / ``--vocab-file`` / ``--merge-file`` that the type needs, or
            a local file or folder given by them that does not exist.
    """
    kind = getattr(tokenizer_args, "tokenizer_type", None)
    if kind is None:
        raise DataError("--tokenizer-type is required (e.g. HuggingFaceTokenizer)")
    needed = ("tokenizer_model",) if kind in _MODEL_TOKENIZERS else _FILE_FLAGS.get(kind, ())
    for name in needed:
        if getattr(tokenizer_args, name, None) is None:
            flag = "--" + name.replace("_", "-")
            raise DataError(f"--tokenizer-type {kind} needs {flag}")
    for name in ("tokenizer_model", "vocab_file", "merge_file"):
        value = getattr(tokenizer_args, name, None)
        if value is None or os.path.exists(value):
            continue
        # A Hugging Face model may be a hub id ("gpt2", "org/model"): only a path is checked.
        hub_id = kind == "HuggingFaceTokenizer" and name == "tokenizer_model"
        if not hub_id or os.path.isabs(value) or value.startswith((".", "~")):
            raise DataError(f"--{name.replace('_', '-')} {value!r} does not exist")


def build_megatron_tokenizer(tokenizer_args: argparse.Namespace) -> Any:
    """Megatron's tokenizer for the ``--tokenizer-*`` flags, as megatron's own tool builds it.

    Args:
        tokenizer_args: Parsed tokenizer flags (megatron's ``TokenizerConfig`` fields).

    Returns:
        A megatron-core tokenizer (``tokenize``, ``eod``, ``vocab_size``).

    Raises:
        DataError: naming the flags, if they are incomplete (:func:`check_tokenizer_flags`)
            or megatron cannot build the tokenizer from them.
    """
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    check_tokenizer_flags(tokenizer_args)
    args = copy.copy(tokenizer_args)
    # The dummy values megatron-LM's tools/preprocess_data.py sets (used for vocab padding).
    for name, value in (
        ("rank", 1),
        ("make_vocab_size_divisible_by", 128),
        ("tensor_model_parallel_size", 1),
        ("vocab_extra_ids", 0),
    ):
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    try:
        return build_tokenizer(args)
    except Exception as e:  # megatron's and the libraries' errors, asserts included
        given = " ".join(
            f"--{name.replace('_', '-')} {getattr(args, name)}"
            for name in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
            if getattr(args, name, None) is not None
        )
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"cannot build the tokenizer of {given}: {reason}") from e
