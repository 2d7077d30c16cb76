"""Inspect and verify a domain-labelled dataset (``<prefix>.bin``/``.idx``/``.domains``).

* :func:`inspect_dataset`: sequences, documents and tokens, per-domain counts (sequences and
  tokens per stored domain id, with the label names), and every consistency problem found:
  the ``.idx`` against the ``.bin`` (pointers, sizes, document boundaries), the sidecar against
  the ``.idx`` (:func:`megatron_edl.data.sidecar.read_sidecar`'s checks: a damaged JSON block,
  ids below -1), the vocabulary's form and ids that the vocabulary does not name. A truncated
  ``.idx`` or an empty ``.bin`` is one problem line naming the file (megatron-core is not asked
  to map it).
* :func:`show_document`: the tokens of sequence ``N`` with its label, and the decoded text when
  a tokenizer is given (the command line builds one from Megatron's tokenizer flags).

Counts are per *sequence*, which is what ``GPTDataset`` calls a document and what the sidecar
labels; the preprocessing writes one sequence per document.

Command line: ``tools/inspect_dataset.py`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_edl.data.merge import VocabularyConflictError, check_vocabulary
from megatron_edl.data.sidecar import (
    IndexFileError,
    SidecarMismatchError,
    read_index_header,
    read_sidecar,
    sidecar_path,
)

__all__ = [
    "DatasetReport",
    "DocumentView",
    "DomainCount",
    "inspect_dataset",
    "main",
    "show_document",
]

UNLABELLED = -1


@dataclasses.dataclass(frozen=True)
class DomainCount:
    """Sequences and tokens of one stored domain id."""

    domain_id: int
    """Stored id (-1: unlabelled)."""

    names: tuple[str, ...]
    """Its label name(s) in the vocabulary (empty if unnamed)."""

    sequences: int
    """Sequences (GPTDataset documents) with this id."""

    tokens: int
    """Tokens in those sequences."""


@dataclasses.dataclass(frozen=True)
class DatasetReport:
    """What :func:`inspect_dataset` found."""

    prefix: str
    sequences: int
    documents: int
    tokens: int
    dtype: str
    """Token dtype of the ``.bin``."""
    vocabulary: dict[str, int] | None
    """The sidecar's vocabulary, ``None`` when the labels could not be loaded."""
    domains: tuple[DomainCount, ...]
    """Per stored id, in id order: every id of the vocabulary, then unnamed ids present."""
    problems: tuple[str, ...]
    """Consistency problems (empty: the dataset is consistent)."""

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)

    def format(self) -> str:
        """Human-readable table."""
        lines = [
            f"{self.prefix}: {self.sequences} sequences, {self.documents} documents, "
            f"{self.tokens} tokens ({self.dtype})"
        ]
        if self.domains:
            width = max(len(", ".join(d.names) or "-") for d in self.domains)
            width = max(width, len("label"))
            lines.append(f"  {'id':>5}  {'label':<{width}}  {'sequences':>10}  {'tokens':>12}")
            for d in self.domains:
                label = "(unlabelled)" if d.domain_id == UNLABELLED else ", ".join(d.names) or "-"
                lines.append(
                    f"  {d.domain_id:>5}  {label:<{width}}  {d.sequences:>10}  {d.tokens:>12}"
                )
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines.extend(f"  - {problem}" for problem in self.problems)
        else:
            lines.append("consistent: index, data and domain sidecar agree")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class DocumentView:
    """One sequence with its label."""

    index: int
    domain_id: int
    names: tuple[str, ...]
    tokens: list[int]
    text: str | None
    """Decoded text, when a tokenizer was given."""

    def format(self, max_tokens: int | None = None) -> str:
        """Human-readable form, tokens cut to ``max_tokens``."""
        label = "(unlabelled)" if self.domain_id == UNLABELLED else ", ".join(self.names) or "-"
        shown = self.tokens if max_tokens is None else self.tokens[:max_tokens]
        more = f" ... ({len(self.tokens)} tokens)" if len(shown) < len(self.tokens) else ""
        lines = [
            f"sequence {self.index}: domain {self.domain_id} {label}, {len(self.tokens)} tokens",
            f"  tokens: {shown}{more}",
        ]
        if self.text is not None:
            lines.append(f"  text: {self.text!r}")
        return "\n".join(lines)


def _index_problems(dataset: IndexedDataset, prefix: str) -> list[str]:
    """Consistency of the ``.idx`` with itself and with the ``.bin``."""
    problems = []
    lengths_N = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    pointers_N = np.asarray(dataset.index.sequence_pointers, dtype=np.int64)
    documents = np.asarray(dataset.document_indices, dtype=np.int64)
    itemsize = np.dtype(dataset.index.dtype).itemsize
    if (lengths_N < 0).any():
        problems.append(f"{prefix}.idx: negative sequence lengths")
    expected = np.concatenate([[0], np.cumsum(lengths_N)[:-1]]) * itemsize
    if lengths_N.size and not np.array_equal(pointers_N, expected):
        first = int(np.flatnonzero(pointers_N != expected)[0])
        problems.append(
            f"{prefix}.idx: sequence pointer {first} is {pointers_N[first]}, "
            f"expected {expected[first]} from the lengths"
        )
    bin_size = os.path.getsize(f"{prefix}.bin")
    if bin_size != int(lengths_N.sum()) * itemsize:
        problems.append(
            f"{prefix}.bin: {bin_size} bytes, but the index describes "
            f"{int(lengths_N.sum()) * itemsize} ({int(lengths_N.sum())} tokens)"
        )
    if (
        documents.size == 0
        or documents[0] != 0
        or documents[-1] != lengths_N.size
        or (np.diff(documents) < 0).any()
    ):
        problems.append(
            f"{prefix}.idx: document boundaries do not run from 0 to {lengths_N.size} in order"
        )
    return problems


def _check_files(prefix: str) -> None:
    for suffix in (".idx", ".bin"):
        path = prefix + suffix
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a folder, not a file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")


def _open_dataset(prefix: str) -> IndexedDataset:
    """megatron-core's reader of ``prefix`` without the tracebacks of a failed open.

    ``IndexedDataset.__del__`` deletes attributes that a failed ``__init__`` never set, so a
    failed open prints "Exception ignored in ... __del__" tracebacks after the error; here the
    missing attributes are set to ``None`` first. (Its ``.bin`` reader has the same flaw when the
    ``.bin`` cannot be mapped; callers check for an empty ``.bin`` before opening.)
    """
    dataset = IndexedDataset.__new__(IndexedDataset)
    try:
        dataset.__init__(prefix, multimodal=False, mmap=True)
    except BaseException:
        for name in ("bin_reader", "index"):
            if not hasattr(dataset, name):
                setattr(dataset, name, None)
        raise
    return dataset


def inspect_dataset(prefix: str | os.PathLike) -> DatasetReport:
    """Count a labelled dataset's sequences and tokens per domain and check its consistency.

    Args:
        prefix: The dataset prefix.

    Returns:
        The report; problems are collected in it, not raised.

    Raises:
        FileNotFoundError: If ``<prefix>.idx`` or ``<prefix>.bin`` is missing.
        IsADirectoryError: If one of them is a folder.
    """
    prefix = os.fspath(prefix)
    _check_files(prefix)
    try:
        header = read_index_header(f"{prefix}.idx")
    except IndexFileError as err:
        return DatasetReport(prefix, 0, 0, 0, "?", None, (), (str(err),))
    if os.path.getsize(f"{prefix}.bin") == 0:
        problem = (
            f"{prefix}.bin: empty (0 bytes, {header.sequences} sequences in the .idx); "
            "Megatron cannot memory-map an empty file"
        )
        dtype = np.dtype(header.dtype).name
        counts = (header.sequences, max(header.documents - 1, 0), 0)
        return DatasetReport(prefix, *counts, dtype, None, (), (problem,))
    try:
        dataset = _open_dataset(prefix)
    except (AssertionError, ValueError) as err:
        return DatasetReport(prefix, 0, 0, 0, "?", None, (), (f"{prefix}.idx: unreadable: {err}",))
    problems = _index_problems(dataset, prefix)
    lengths_N = np.asarray(dataset.sequence_lengths, dtype=np.int64)

    vocabulary: dict[str, int] | None = None
    domains: list[DomainCount] = []
    try:
        ids_N, raw_vocabulary = read_sidecar(prefix)
    except FileNotFoundError:
        problems.append(f"{sidecar_path(prefix)}: no domain sidecar")
    except SidecarMismatchError as err:
        problems.append(str(err))
    else:
        try:
            vocabulary = check_vocabulary(raw_vocabulary, str(sidecar_path(prefix)))
        except VocabularyConflictError as err:
            problems.append(str(err))
            vocabulary = None
        names_of: dict[int, list[str]] = {}
        for name, stored in (vocabulary or {}).items():
            names_of.setdefault(stored, []).append(name)
        present = np.unique(ids_N)
        unnamed = [int(i) for i in present if i >= 0 and int(i) not in names_of]
        if unnamed and vocabulary is not None:
            problems.append(
                f"{sidecar_path(prefix)}: domain id(s) {unnamed[:20]} have no name in its "
                "vocabulary"
            )
        all_ids = sorted(set(names_of) | {int(i) for i in present})
        sequences = np.bincount(ids_N + 1, minlength=max(all_ids, default=-1) + 2)
        tokens = np.bincount(ids_N + 1, weights=lengths_N, minlength=sequences.size)
        for stored in all_ids:
            domains.append(
                DomainCount(
                    domain_id=stored,
                    names=tuple(sorted(names_of.get(stored, []))),
                    sequences=int(sequences[stored + 1]),
                    tokens=int(tokens[stored + 1]),
                )
            )
    return DatasetReport(
        prefix=prefix,
        sequences=int(lengths_N.size),
        documents=int(len(dataset.document_indices) - 1),
        tokens=int(lengths_N.sum()),
        dtype=np.dtype(dataset.index.dtype).name,
        vocabulary=vocabulary,
        domains=tuple(domains),
        problems=tuple(problems),
    )


def show_document(
    prefix: str | os.PathLike, index: int, decode: Callable[[list[int]], str] | None = None
) -> DocumentView:
    """Sequence ``index`` of the dataset with its domain label.

    Args:
        prefix: The dataset prefix.
        index: The sequence number (negative counts from the end).
        decode: Optional token ids -> text (e.g. a Megatron tokenizer's ``detokenize``).

    Returns:
        The :class:`DocumentView`.

    Raises:
        IndexError: If ``index`` is out of range (the message gives the range).
        SidecarMismatchError: If the sidecar does not match the index.
        IndexFileError: If the ``.idx`` is not a readable Megatron index.
        FileNotFoundError: If a file is missing.
    """
    prefix = os.fspath(prefix)
    _check_files(prefix)
    read_index_header(f"{prefix}.idx")
    dataset = _open_dataset(prefix)
    count = len(dataset.sequence_lengths)
    if not -count <= index < count:
        raise IndexError(f"{prefix}: sequence {index} out of range; it has {count} sequences")
    index %= count
    ids_N, vocabulary = read_sidecar(prefix)
    domain_id = int(ids_N[index])
    names = tuple(sorted(name for name, stored in vocabulary.items() if stored == domain_id))
    tokens = [int(t) for t in dataset[index]]
    text = decode(tokens) if decode is not None else None
    return DocumentView(index=index, domain_id=domain_id, names=names, tokens=tokens, text=text)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tools/inspect_dataset.py`` (with Megatron's tokenizer flags)."""
    from megatron.training.arguments import _add_tokenizer_args

    parser = argparse.ArgumentParser(
        description="Per-domain counts and consistency check of a domain-labelled Megatron "
        "dataset (.bin/.idx/.domains); optionally show sequences with their labels."
    )
    parser.add_argument("prefix", help="Dataset prefix (without .bin/.idx/.domains).")
    parser.add_argument(
        "--show",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="Show sequence N with its label (repeatable); decoded when a tokenizer is given.",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="Token ids printed per shown sequence."
    )
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    # Megatron's own tokenizer flags (--tokenizer-type, --tokenizer-model, --vocab-file, ...),
    # as Megatron-LM's tools/preprocess_data.py adds them.
    _add_tokenizer_args(parser)
    return parser


def _decoder_from_args(args: argparse.Namespace) -> Callable[[list[int]], str] | None:
    """``detokenize`` of the tokenizer Megatron's flags describe, or ``None`` without one."""
    if args.tokenizer_type is None:
        return None
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    args.pad_vocab_size = False  # no model here: the tokenizer's own vocabulary
    return build_tokenizer(args).detokenize


def main(argv: Sequence[str] | None = None) -> int:
    """Run the inspect command line; returns 0 when consistent, 1 on problems or bad input."""
    args = build_parser().parse_args(argv)
    # Importing megatron.training logs INFO to stdout; keep stdout for the report (and --json).
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        report = inspect_dataset(args.prefix)
    except OSError as err:  # missing, a folder, no permission: the message names the file
        print(f"inspect_dataset: error: {err}", file=sys.stderr)
        return 1
    views: list[DocumentView] = []
    status = 0 if report.ok else 1
    if args.show and report.ok:
        decode = _decoder_from_args(args)
        for n in args.show:
            try:
                views.append(show_document(args.prefix, n, decode))
            except (IndexError, ValueError, OSError) as err:
                print(f"inspect_dataset: error: {err}", file=sys.stderr)
                status = 1
    elif args.show:
        print("inspect_dataset: not showing sequences of an inconsistent dataset", file=sys.stderr)
    if args.json:
        out = report.to_dict()
        out["shown"] = [dataclasses.asdict(view) for view in views]
        print(json.dumps(out, indent=2))
    else:
        print(report.format())
        for view in views:
            print(view.format(args.max_tokens))
    return status
