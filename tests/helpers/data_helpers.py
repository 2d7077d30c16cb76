"""Shared data fixtures: a tiny tokenizer trained offline, and labelled corpus writers.

Nothing here downloads. The tokenizer is a byte-level BPE trained with HF ``tokenizers`` on
generated sentences and saved as ``tokenizer.json`` + ``tokenizer_config.json``, which
megatron's builder loads with ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``
(transformers' ``AutoTokenizer`` from a local folder, with ``HF_HUB_OFFLINE=1``).

Use the fixtures from a test module by importing the fixture functions; tests then ask for
``tiny_tokenizer_dir`` / ``tiny_tokenizer_args``::

    from tests.helpers.data_helpers import (  # noqa: F401 (fixtures)
        tiny_tokenizer_args_fixture,
        tiny_tokenizer_dir_fixture,
    )

Plain functions (``train_tiny_tokenizer``, ``tokenizer_args``, ``make_corpus``, ``write_jsonl``,
``write_parquet``) work without pytest.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

# The word lists, sentences and tokenizer flags, shared with the preprocessing benchmarks.
from megatron_edl.benchmarks.preprocessing import (
    DOMAIN_WORDS,
    sentence,
    tokenizer_args,
)
from megatron_edl.demo.tokenizer import train_tiny_tokenizer


@pytest.fixture(scope="session", name="tiny_tokenizer_dir")
def tiny_tokenizer_dir_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterable[Path]:
    """Folder of the tiny tokenizer; sets ``HF_HUB_OFFLINE=1`` for the session."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))
    patch.undo()


@pytest.fixture(scope="session", name="tiny_tokenizer_args")
def tiny_tokenizer_args_fixture(tiny_tokenizer_dir: Path) -> argparse.Namespace:
    """Megatron tokenizer flags (a Namespace) that load the tiny tokenizer."""
    return tokenizer_args(tiny_tokenizer_dir)


def make_corpus(
    num_documents: int,
    seed: int = 0,
    label_field: Sequence[str] = ("meta", "domain"),
    domains: Sequence[str] = tuple(DOMAIN_WORDS),
    max_words: int = 40,
) -> list[dict]:
    """Labelled records: ``{"text": ..., "meta": {"domain": name}, "id": i}``.

    Args:
        num_documents: Number of records.
        seed: Random seed (the corpus is a pure function of the arguments).
        label_field: Nested keys under which the label is stored.
        domains: Labels to draw from (keys of ``DOMAIN_WORDS``).
        max_words: Longest document, in words (at least 1).

    Returns:
        The records.
    """
    rng = random.Random(seed)
    records = []
    for i in range(num_documents):
        domain = domains[rng.randrange(len(domains))]
        record: dict = {"text": sentence(rng, domain, rng.randint(1, max_words)), "id": i}
        node = record
        for key in label_field[:-1]:
            node = node.setdefault(key, {})
        node[label_field[-1]] = domain
        records.append(record)
    return records


def write_jsonl(
    path: str | os.PathLike, records: Iterable[Mapping | str | bytes], gz: bool = False
) -> Path:
    """Write records as JSON Lines; ``str``/``bytes`` items are written verbatim as lines.

    Args:
        path: Output file.
        records: Dicts (dumped as JSON with non-ASCII kept) or raw lines (for bad-input tests).
        gz: Gzip the file.

    Returns:
        The path.
    """
    lines = []
    for record in records:
        if isinstance(record, bytes):
            lines.append(record)
        elif isinstance(record, str):
            lines.append(record.encode("utf-8"))
        else:
            lines.append(json.dumps(record, ensure_ascii=False).encode("utf-8"))
    data = b"".join(line + b"\n" for line in lines)
    path = Path(path)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_parquet(path: str | os.PathLike, records: Sequence[Mapping], row_group_size: int = 64):
    """Write records as a Parquet file (nested dicts become struct columns).

    Args:
        path: Output file.
        records: Dicts with the same keys.
        row_group_size: Rows per row group (small, so readers cross row groups in tests).

    Returns:
        The path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    pq.write_table(pa.Table.from_pylist(list(records)), path, row_group_size=row_group_size)
    return path


def write_labelled_prefix(prefix, domains: list[int], names: dict[str, int], seed: int = 0) -> None:
    """An indexed dataset (``prefix``.bin/.idx) and its ``.domains`` sidecar whose document i
    (domain ``domains[i]`` = d) has tokens in d's vocabulary band [1 + 300 d, 301 + 300 d)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_edl.data.sidecar import write_sidecar

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for domain in domains:
        length = int(rng.integers(8, 80))
        tokens = 1 + domain * 300 + rng.integers(0, 300, size=length)
        builder.add_document(torch.from_numpy(np.append(tokens, 1023)), [length + 1])
    builder.finalize(f"{prefix}.idx")
    write_sidecar(prefix, np.asarray(domains), names)
