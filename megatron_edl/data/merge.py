"""Merge domain-labelled dataset shards into one dataset, and reconcile label vocabularies.

A corpus is preprocessed one shard per node (``<shard>.bin``/``.idx``/``.domains``); this module
joins the shards into one prefix. The tokens go through megatron-core's own
``IndexedDatasetBuilder.add_index`` (what Megatron-LM's ``tools/merge_datasets.py`` does), so
the merged ``.bin``/``.idx`` are byte-identical to writing all documents in one pass. The
sidecars' domain ids are concatenated in the same order.

Vocabularies (label name -> stored id) are reconciled by *name* (:func:`reconcile_vocabularies`):

1. If every shard has the same vocabulary, ids are kept as they are.
2. Otherwise shards are taken in order; the names that share one id in a shard (aliases) form a
   group. A group some of whose names already have a merged id takes that id; a new group keeps
   its own id when no other name has it yet, else gets the smallest unused id. Each shard's ids
   are then remapped to the merged ones, so the same name always ends with the same id, and two
   shards that use one id for different names are separated.
3. Refused, with :class:`VocabularyConflictError` naming the shard: a malformed vocabulary
   (names must be non-empty strings, ids integers >= 0); a shard that gives two names different
   ids where an earlier shard made them aliases (its two labels would collapse into one); a shard
   whose data uses an id its vocabulary does not name while the vocabularies differ (an unnamed
   id cannot be matched by name).

Output is atomic: everything is written under temporary names next to the output and renamed
into place only when complete (``.bin``, ``.domains``, then ``.idx`` last, so a reader never
finds an index without its data); a failure (a full disk included) removes the temporary files
and is one :class:`MergeError` naming the output.

Inputs are checked before anything is written, and every refusal names the file: paths are
compared by real path (an input reached through a linked folder, or listed twice through two
paths, is refused); an output prefix that names a folder, lies below a file, or is in a folder
that cannot be written; a truncated ``.idx``, a ``.bin`` of the wrong size, a file that is a
folder; a damaged sidecar (ids below -1, a broken JSON block). A folder named like a prefix is
Megatron's index cache (``PREFIX/cache/``) and is left alone.

Command line: ``tools/merge_datasets.py`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_edl.data.sidecar import (
    SUFFIX,
    IndexFileError,
    read_index_header,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)

__all__ = [
    "MergeError",
    "MergeResult",
    "VocabularyConflictError",
    "VocabularyMerge",
    "check_vocabulary",
    "find_prefixes",
    "main",
    "merge_datasets",
    "reconcile_vocabularies",
]

_DATASET_SUFFIXES = (".bin", SUFFIX, ".idx")  # rename order: the index goes last


class MergeError(ValueError):
    """The shards cannot be merged (missing files, token dtypes differ, output exists, ...)."""


class VocabularyConflictError(MergeError):
    """Label vocabularies that are malformed or cannot be reconciled by name."""


@dataclasses.dataclass(frozen=True)
class VocabularyMerge:
    """The reconciled vocabulary of several sources and how to remap each source's ids."""

    vocabulary: dict[str, int]
    """Merged label name -> id."""

    remaps: tuple[dict[int, int], ...]
    """Per source, stored id -> merged id, for every id the source's vocabulary names."""

    @property
    def changed(self) -> tuple[int, ...]:
        """Indices of the sources whose ids change."""
        return tuple(
            i for i, remap in enumerate(self.remaps) if any(a != b for a, b in remap.items())
        )

    def remap(self, source: int, ids_N: np.ndarray) -> np.ndarray:
        """Merged ids of source ``source``'s stored ids (-1, unlabelled, stays -1).

        Args:
            source: Index of the source, in the order given to :func:`reconcile_vocabularies`.
            ids_N: Its stored ids.

        Returns:
            int64 array of the merged ids (ids the vocabulary does not name pass unchanged;
            reconciliation refuses them unless no id changes).
        """
        ids_N = np.asarray(ids_N, dtype=np.int64)
        remap = self.remaps[source]
        if ids_N.size == 0 or all(a == b for a, b in remap.items()):
            return ids_N.copy()
        size = max(max(remap), int(ids_N.max())) + 1
        table = np.arange(size, dtype=np.int64)
        table[list(remap)] = list(remap.values())
        return np.where(ids_N >= 0, table[np.maximum(ids_N, 0)], -1)


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_datasets` wrote."""

    prefix: str
    """The merged dataset's prefix."""

    shards: tuple[str, ...]
    """The shard prefixes, in merge order."""

    sequences: int
    """Sequences (GPTDataset's documents) in the merged index."""

    documents: int
    """Documents in the merged index."""

    tokens: int
    """Tokens in the merged ``.bin``."""

    vocabulary: dict[str, int]
    """The merged vocabulary."""

    remapped: tuple[str, ...]
    """Shards whose domain ids were remapped to the merged vocabulary."""


def check_vocabulary(vocabulary: Any, source: str) -> dict[str, int]:
    """Validate a label vocabulary (label name -> stored id).

    Args:
        vocabulary: The parsed vocabulary, e.g. from a sidecar's JSON block.
        source: Where it came from (a path), for error messages.

    Returns:
        The vocabulary as a plain ``dict[str, int]``.

    Raises:
        VocabularyConflictError: If it is not a mapping of non-empty strings to integers >= 0.
    """
    if not isinstance(vocabulary, Mapping):
        raise VocabularyConflictError(
            f"{source}: the vocabulary must map label names to ids, got {type(vocabulary).__name__}"
        )
    out: dict[str, int] = {}
    for name, stored in vocabulary.items():
        if (
            not isinstance(name, str)
            or not name
            or isinstance(stored, bool)
            or not isinstance(stored, int | np.integer)
            or stored < 0
        ):
            raise VocabularyConflictError(
                f"{source}: malformed vocabulary entry {name!r}: {stored!r} "
                "(expected a non-empty label name -> an integer id >= 0)"
            )
        out[name] = int(stored)
    return out


def reconcile_vocabularies(
    vocabularies: Sequence[Mapping[str, int]],
    sources: Sequence[str],
    present_ids: Sequence[np.ndarray] | None = None,
) -> VocabularyMerge:
    """Merge vocabularies by label name (rules: module docstring).

    Args:
        vocabularies: One vocabulary per source, in merge order.
        sources: A name per source (its path), for error messages.
        present_ids: Optionally, the stored ids each source's data uses; ids a source's
            vocabulary does not name are then refused when the vocabularies differ.

    Returns:
        The merged vocabulary and the per-source remaps.

    Raises:
        VocabularyConflictError: On a malformed vocabulary or an irreconcilable input; the
            message names the source and the labels.
        ValueError: If the argument lengths differ.
    """
    if len(vocabularies) != len(sources) or (
        present_ids is not None and len(present_ids) != len(sources)
    ):
        raise ValueError(
            f"{len(vocabularies)} vocabularies, {len(sources)} sources and "
            f"{'no' if present_ids is None else len(present_ids)} id sets: lengths must agree"
        )
    checked = [check_vocabulary(v, s) for v, s in zip(vocabularies, sources, strict=True)]
    if not checked:
        return VocabularyMerge(vocabulary={}, remaps=())
    if all(v == checked[0] for v in checked):
        identity = {i: i for i in checked[0].values()}
        return VocabularyMerge(vocabulary=dict(checked[0]), remaps=(identity,) * len(checked))

    if present_ids is not None:
        for vocabulary, source, ids in zip(checked, sources, present_ids, strict=True):
            ids = np.unique(np.asarray(ids, dtype=np.int64))
            unnamed = sorted(set(ids[ids >= 0].tolist()) - set(vocabulary.values()))
            if unnamed:
                raise VocabularyConflictError(
                    f"{source}: its data uses domain id(s) {unnamed[:20]} that its vocabulary "
                    "does not name, and the vocabularies differ, so they cannot be matched by "
                    "name"
                )

    merged: dict[str, int] = {}
    used: set[int] = set()
    remaps: list[dict[int, int]] = []
    for vocabulary, source in zip(checked, sources, strict=True):
        groups: dict[int, list[str]] = {}
        for name, stored in vocabulary.items():
            groups.setdefault(stored, []).append(name)
        remap: dict[int, int] = {}
        for stored in sorted(groups):
            names = groups[stored]
            known = {merged[name] for name in names if name in merged}
            if len(known) > 1:
                raise VocabularyConflictError(
                    f"{source}: labels {sorted(names)} share id {stored} here, but earlier "
                    f"sources gave them different ids {sorted(known)}"
                )
            if known:
                new = known.pop()
            elif stored not in used:
                new = stored
            else:
                new = next(i for i in range(len(used) + 1) if i not in used)
            for name in names:
                merged[name] = new
            used.add(new)
            remap[stored] = new
        targets: dict[int, int] = {}
        for stored, new in remap.items():
            if new in targets:
                clash = sorted(groups[targets[new]] + groups[stored])
                raise VocabularyConflictError(
                    f"{source}: labels {clash} have different ids here ({targets[new]} and "
                    f"{stored}) but earlier sources made them one label (id {new}); merging "
                    "would collapse them"
                )
            targets[new] = stored
        remaps.append(remap)
    return VocabularyMerge(vocabulary=merged, remaps=tuple(remaps))


def find_prefixes(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Expand inputs into dataset prefixes: a directory gives all its ``*.idx`` prefixes, sorted.

    A folder ``P`` next to ``P.idx`` is the folder Megatron's ``GPTDataset`` writes its index
    cache into (``P/cache/GPTDataset_indices``), so ``P`` is taken as the prefix.

    Args:
        inputs: Dataset prefixes and/or directories holding shards.

    Returns:
        The prefixes, in the given order (directories expanded in sorted name order).

    Raises:
        MergeError: If a directory holds no ``.idx`` file, or is also a dataset prefix while it
            holds ``.idx`` files (which is meant cannot be told).
    """
    prefixes: list[str] = []
    for item in map(os.fspath, inputs):
        if not os.path.isdir(item):
            prefixes.append(item)
            continue
        found = sorted(str(p.with_suffix("")) for p in Path(item).glob("*.idx"))
        if os.path.isfile(item + ".idx"):
            if found:
                raise MergeError(
                    f"{item} is both a dataset prefix ({item}.idx) and a folder holding .idx "
                    f"files ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); "
                    "list the shards one by one"
                )
            prefixes.append(item)
        elif found:
            prefixes.extend(found)
        else:
            raise MergeError(f"{item}: directory holds no .idx file to merge")
    return prefixes


@dataclasses.dataclass(frozen=True)
class _Shard:
    """What the merge needs of a shard's ``.idx``/``.bin`` (from :func:`_check_shard`)."""

    dtype: type[np.number]
    sequences: int
    documents: int
    tokens: int


def _check_shard(prefix: str) -> _Shard:
    """Check that ``prefix.idx`` and ``prefix.bin`` form a dataset Megatron can append.

    Raises:
        MergeError: Naming the file: an unreadable or truncated ``.idx``, document boundaries
            out of order, or a ``.bin`` whose size is not what the ``.idx`` describes.
    """
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    try:
        header = read_index_header(idx_path)
        with open(idx_path, "rb") as f:
            f.seek(header.arrays_offset)
            lengths_N = np.fromfile(f, dtype=np.int32, count=header.sequences)
            f.seek(header.arrays_offset + 12 * header.sequences)
            documents = np.fromfile(f, dtype=np.int64, count=header.documents)
        bin_size = os.path.getsize(bin_path)
    except IndexFileError as err:
        raise MergeError(str(err)) from None
    except OSError as err:
        raise MergeError(f"{err.filename or idx_path}: cannot read: {err.strerror}") from None
    if (
        documents.size == 0
        or documents[0] != 0
        or documents[-1] != header.sequences
        or (np.diff(documents) < 0).any()
    ):
        raise MergeError(
            f"{idx_path}: document boundaries do not run from 0 to {header.sequences} in order"
        )
    tokens = int(lengths_N.sum(dtype=np.int64))
    itemsize = np.dtype(header.dtype).itemsize
    if (lengths_N < 0).any() or bin_size != tokens * itemsize:
        raise MergeError(
            f"{bin_path}: {bin_size} bytes, but {idx_path} describes {tokens * itemsize} "
            f"({tokens} tokens of {np.dtype(header.dtype).name})"
        )
    return _Shard(header.dtype, header.sequences, header.documents - 1, tokens)


def _file_id(path: str) -> tuple[int, int]:
    """``(device, inode)`` of ``path`` (links followed): equal for one file reached two ways."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _check_paths(shards: Sequence[str], output: str, overwrite: bool) -> None:
    """Refuse what would overwrite an input, merge a shard twice or write somewhere odd."""
    if not output:
        raise MergeError("the output prefix is empty")
    folder_like = output.endswith(("/", os.sep)) or os.path.basename(output) in ("", ".", "..")
    if not folder_like and os.path.isdir(output):
        # Megatron's index cache (<prefix>/cache/) lives in a folder named like the prefix.
        folder_like = not os.path.isfile(output + ".idx") and os.listdir(output) != ["cache"]
    if folder_like:
        example = os.path.join(output, "merged")
        raise MergeError(
            f"{output}: the output prefix names a folder; give a prefix of files, e.g. {example}"
        )
    ancestor = os.path.dirname(os.path.abspath(output))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise MergeError(f"{output}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MergeError(f"{ancestor}: folder is not writable (output prefix {output})")
    for suffix in _DATASET_SUFFIXES:
        if os.path.lexists(output + suffix) and not os.path.isfile(output + suffix):
            kind = "folder" if os.path.isdir(output + suffix) else "not a regular file"
            raise MergeError(
                f"{output}{suffix} is a {kind}, not a file; remove it or choose another output "
                "prefix"
            )

    seen: dict[tuple[int, int], str] = {}  # (device, inode) of a shard's .idx -> the shard
    inputs: dict[tuple[int, int], str] = {}  # (device, inode) of every input file -> its path
    real_output = os.path.realpath(output)
    for shard in shards:
        for suffix in (".bin", ".idx", SUFFIX):
            path = shard + suffix
            if os.path.isdir(path):
                raise MergeError(f"{path} is a folder, not a file (shard {shard})")
            if not os.path.isfile(path):
                what = "domain sidecar" if suffix == SUFFIX else "file"
                raise MergeError(f"{path}: missing {what} of shard {shard}")
            inputs.setdefault(_file_id(path), path)
        key = _file_id(shard + ".idx")
        if key in seen:
            raise MergeError(
                f"shard listed twice: {seen[key]} and {shard} are the same files "
                f"({os.path.realpath(shard + '.idx')})"
            )
        seen[key] = shard
        if os.path.realpath(shard) == real_output:
            raise MergeError(
                f"{shard}: a shard cannot also be the output prefix ({output}; both are "
                f"{real_output})"
            )
    for suffix in _DATASET_SUFFIXES:
        if os.path.isfile(output + suffix) and _file_id(output + suffix) in inputs:
            raise MergeError(
                f"{output}{suffix} is {inputs[_file_id(output + suffix)]} (the same file): a "
                "shard cannot also be the output"
            )
    existing = [output + s for s in _DATASET_SUFFIXES if os.path.exists(output + s)]
    if existing and not overwrite:
        raise MergeError(f"output exists: {', '.join(existing)} (pass overwrite to replace it)")


def _remove_quietly(paths: Sequence[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def merge_datasets(
    shard_prefixes: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    *,
    overwrite: bool = False,
    require_same_vocabulary: bool = False,
) -> MergeResult:
    """Merge labelled shards (``.bin``/``.idx``/``.domains``) into ``output_prefix``, atomically.

    Paths are compared by their real path (symbolic links resolved), so a shard reached
    through two paths, or the output reached through a linked folder, is recognised. Empty
    shards (0 sequences) add nothing; at least one shard must hold data.

    Args:
        shard_prefixes: The shards' prefixes, in the order their documents are concatenated.
        output_prefix: Prefix of the merged dataset (its directory is created if needed).
        overwrite: Replace an existing dataset at ``output_prefix`` (default: refuse).
        require_same_vocabulary: Refuse shards whose vocabularies differ instead of remapping.

    Returns:
        A :class:`MergeResult`.

    Raises:
        MergeError: On no shards, a missing, truncated or inconsistent file, a shard listed
            twice or equal to the output, an output prefix that names a folder, lies below a
            file or in a folder that cannot be written, token dtypes that differ, only empty
            shards, an existing output without ``overwrite``, or a failed write (disk full,
            ...; nothing is then left under the final names). Each message names the file.
        VocabularyConflictError: On malformed or irreconcilable vocabularies (or different ones
            with ``require_same_vocabulary``).
        SidecarMismatchError: If a shard's sidecar does not match its index, or is damaged (an
            id below -1, a broken JSON block).
    """
    shards = [os.fspath(p) for p in shard_prefixes]
    output = os.fspath(output_prefix)
    if not shards:
        raise MergeError("no shards to merge")
    _check_paths(shards, output, overwrite)

    checked = {shard: _check_shard(shard) for shard in shards}
    dtypes = {shard: info.dtype for shard, info in checked.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{s}: {np.dtype(d).name}" for s, d in dtypes.items())
        raise MergeError(f"shards have different token dtypes ({listed}); re-tokenise to one")
    dtype = dtypes[shards[0]]
    if all(info.sequences == 0 for info in checked.values()):
        many = len(shards) > 1
        raise MergeError(
            f"{', '.join(shards)}: empty shard{'s' if many else ''} (0 sequences), nothing to "
            "merge (Megatron cannot read an empty dataset)"
        )

    try:
        labels = [read_sidecar(shard) for shard in shards]
    except OSError as err:
        raise MergeError(f"{err.filename}: cannot read: {err.strerror}") from None
    reconciled = reconcile_vocabularies(
        [vocabulary for _, vocabulary in labels],
        [str(sidecar_path(shard)) for shard in shards],
        [ids for ids, _ in labels],
    )
    if require_same_vocabulary and any(v != labels[0][1] for _, v in labels):
        differing = [s for s, (_, v) in zip(shards, labels, strict=True) if v != labels[0][1]]
        raise VocabularyConflictError(
            f"vocabularies differ from {shards[0]}'s in {', '.join(differing)} "
            "(require_same_vocabulary)"
        )
    ids_N = np.concatenate([reconciled.remap(i, ids) for i, (ids, _) in enumerate(labels)])
    sequences = sum(info.sequences for info in checked.values())
    documents = sum(info.documents for info in checked.values())
    tokens = sum(info.tokens for info in checked.values())

    tmp = f"{output}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp_files = [tmp + s for s in _DATASET_SUFFIXES] + [str(sidecar_path(tmp)) + ".tmp"]
    moved: list[str] = []
    try:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        for shard in shards:
            builder.add_index(shard)
        builder.finalize(tmp + ".idx")
        write_sidecar(tmp, ids_N, reconciled.vocabulary)
        header = read_index_header(tmp + ".idx")
        assert (header.sequences, header.documents - 1) == (sequences, documents), header
        assert os.path.getsize(tmp + ".bin") == tokens * np.dtype(dtype).itemsize
        if overwrite:  # never leave a new .bin next to an old .idx
            _remove_quietly([output + ".idx"])
        for suffix in _DATASET_SUFFIXES:
            os.replace(tmp + suffix, output + suffix)
            moved.append(output + suffix)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        state = (
            f"only {', '.join(moved)} replaced, the dataset is incomplete"
            if moved
            else "nothing was written under the final names"
        )
        raise MergeError(
            f"{output}: writing the merged dataset failed: {err.strerror or err}{where}; {state}"
        ) from None
    finally:
        _remove_quietly(tmp_files)
    return MergeResult(
        prefix=output,
        shards=tuple(shards),
        sequences=sequences,
        documents=documents,
        tokens=tokens,
        vocabulary=dict(reconciled.vocabulary),
        remapped=tuple(shards[i] for i in reconciled.changed),
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tools/merge_datasets.py``."""
    parser = argparse.ArgumentParser(
        description="Merge domain-labelled Megatron dataset shards (.bin/.idx/.domains) into one "
        "dataset; label vocabularies are reconciled by name."
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PREFIX_OR_DIR",
        help="Shard prefixes, in merge order, and/or directories (all their *.idx prefixes, "
        "sorted by name).",
    )
    parser.add_argument(
        "--output-prefix", required=True, help="Prefix of the merged .bin/.idx/.domains."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing dataset at the output."
    )
    parser.add_argument(
        "--require-same-vocabulary",
        action="store_true",
        help="Refuse shards with different label vocabularies instead of remapping their ids.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the merge command line; returns the exit status (0 ok, 1 refused)."""
    args = build_parser().parse_args(argv)
    try:
        result = merge_datasets(
            find_prefixes(args.input),
            args.output_prefix,
            overwrite=args.overwrite,
            require_same_vocabulary=args.require_same_vocabulary,
        )
    except (MergeError, ValueError) as err:
        print(f"merge_datasets: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. a shard that cannot be read; the message names the file
        print(f"merge_datasets: error: {err}", file=sys.stderr)
        return 1
    print(
        f"merged {len(result.shards)} shards into {result.prefix}: {result.sequences} sequences, "
        f"{result.documents} documents, {result.tokens} tokens, "
        f"{len(result.vocabulary)} labels"
    )
    for shard in result.remapped:
        print(f"  remapped domain ids of {shard} to the merged vocabulary")
    return 0
