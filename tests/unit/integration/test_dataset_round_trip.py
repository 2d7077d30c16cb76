"""Labelled JSONL -> preprocessing CLI -> DomainGPTDataset samples, checked token by token.

Megatron's NullTokenizer reads text as space-separated token ids, so each document's tokens are
chosen from its domain's band of ids: the domain of every token can be read off the token itself,
independently of the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

from megatron_edl.config import LabelsConfig
from megatron_edl.integration.dataset import DomainGPTDataset
from tests.unit.integration.test_dataset import VOCAB, make_config

BAND, SEQ = 300, 64
NAMES = ["code", "prose", "math"]


def test_jsonl_to_samples_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(120):
            domain = int(rng.integers(0, 3))
            tokens = 1 + domain * BAND + rng.integers(0, BAND, size=int(rng.integers(3, 40)))
            f.write(
                json.dumps({"text": " ".join(map(str, tokens)), "meta": {"src": NAMES[domain]}})
            )
            f.write("\n")
    prefix = tmp_path / "out"
    cmd = [
        sys.executable, "tools/preprocess_data.py", "--input", str(corpus),
        "--output-prefix", str(prefix), "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(VOCAB), "--append-eod", "--workers", "2",
        "--domain-field", "meta.src",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    stats = json.loads((tmp_path / "out_text_document.stats.json").read_text())
    assert stats["documents_written"] == 120, stats
    config = make_config(
        tmp_path,
        sequence_length=SEQ,
        blend=([str(tmp_path / "out_text_document")], None),
        edl_labels=LabelsConfig(num_domains=3),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        DomainGPTDataset, [40, 0, 0], lambda: True, config
    ).build()
    eod = NullTokenizer(vocab_size=VOCAB).eod
    names = _names_by_id(tmp_path / "out_text_document")  # ids follow first appearance
    spans_three = 0
    for i in range(len(train)):
        sample = train[i]
        tokens_S, ids_S, w_S = sample["tokens"], sample["domain_ids"], sample["edl_weights"]
        body = tokens_S != eod
        stored_name_ids = (tokens_S[body] - 1) // BAND  # domain index in NAMES
        assert [names[int(j)] for j in ids_S[body]] == [NAMES[int(d)] for d in stored_name_ids]
        # The EOD token closing a document carries that document's label.
        for pos in torch.nonzero(~body).flatten().tolist():
            if pos > 0:
                assert ids_S[pos] == ids_S[pos - 1], (i, pos)
        segments = int((torch.diff(torch.nonzero(~body).flatten()) > 0).sum()) + 1
        # Each segment's weights sum to 1 (the last one may be cut short: still 1).
        assert float(w_S.sum()) == pytest.approx(round(float(w_S.sum())), abs=1e-4)
        spans_three += int((~body).sum()) >= 2 and segments >= 3
    assert spans_three > 0  # some samples cross 3+ documents


def _names_by_id(prefix) -> dict[int, str]:
    from megatron_edl.data.sidecar import read_sidecar

    _, vocabulary = read_sidecar(prefix)
    return {i: name for name, i in vocabulary.items()}
