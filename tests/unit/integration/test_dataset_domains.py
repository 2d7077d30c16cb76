"""The loss domains of labelled data at scale (issue 26, items 12 and 16).

Without a label map the loss domains are the stored ids the blend's sequences use, compacted:
a vocabulary with a large (retired) id costs nothing. An id the sidecar's own vocabulary does not
name (one flipped byte) is refused naming the file and the id. The labelled mock data refuses a
``--moe-edl-mock-domains`` its vocabulary cannot give a band of token ids each.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

from megatron_edl.config import EDLConfigError, LabelsConfig
from megatron_edl.data.sidecar import SidecarMismatchError, sidecar_path
from megatron_edl.integration.dataset import (
    DomainMockGPTLowLevelDataset,
    check_mock_domains,
    resolve_blend_domains,
)
from tests.unit.integration.test_dataset import write_prefix

RETIRED = 32639


def test_a_large_retired_id_is_compacted_away(tmp_path):
    vocabulary = {"code": 0, "prose": 1, "old": RETIRED}
    stored = np.array([0, RETIRED, -1, 0, RETIRED, RETIRED])
    prefix = write_prefix(tmp_path / "corpus", stored, vocabulary)
    blend = resolve_blend_domains([prefix], "sidecar", labels=LabelsConfig())
    assert blend.loss_domains == (0, RETIRED)  # "prose" is used by no sequence
    assert blend.loss_ids[prefix].tolist() == [0, 1, -1, 0, 1, 1]
    assert blend.stored_ids[prefix].tolist() == stored.tolist()
    assert blend.num_stored_domains == RETIRED + 1  # the stored space is unchanged


def test_compaction_spans_the_blend_and_the_random_control_keeps_it(tmp_path):
    a = write_prefix(tmp_path / "A", np.array([3, 3, 7]), {"x": 3, "y": 7}, seed=1)
    b = write_prefix(tmp_path / "B", np.array([7, 9, 9]), {"x": 3, "y": 7, "z": 9}, seed=2)
    blend = resolve_blend_domains([a, b], "sidecar", labels=LabelsConfig())
    assert blend.loss_domains == (3, 7, 9)
    assert blend.loss_ids[a].tolist() == [0, 0, 1] and blend.loss_ids[b].tolist() == [1, 2, 2]
    shuffled = resolve_blend_domains([a, b], "sidecar", labels=LabelsConfig(control="random"))
    together = np.concatenate([shuffled.loss_ids[a], shuffled.loss_ids[b]])
    assert sorted(together.tolist()) == [0, 0, 1, 1, 2, 2]


def test_a_flipped_sidecar_id_names_the_file_and_the_id(tmp_path):
    prefix = write_prefix(tmp_path / "corpus", np.array([0, 1, 2, 1]), {"a": 0, "b": 1, "c": 2})
    path = sidecar_path(prefix)
    data = bytearray(path.read_bytes())
    data[-2:] = np.int16(RETIRED).tobytes()  # the last sequence's id (int16 sidecar)
    path.write_bytes(bytes(data))
    message = rf"{re.escape(str(path))}: sequence 3 has domain id {RETIRED}, which the file's"
    with pytest.raises(SidecarMismatchError, match=message):
        resolve_blend_domains([prefix], "sidecar", labels=LabelsConfig())


def test_a_label_map_keeps_its_domains(tmp_path):
    prefix = write_prefix(tmp_path / "corpus", np.array([0, 1, 0]), {"a": 0, "b": 1, "c": 2})
    label_map = tmp_path / "map.yaml"
    label_map.write_text("domains: [one, two, three]\nmap: {a: one, b: two, c: three}\n")
    blend = resolve_blend_domains(
        [prefix], "sidecar", labels=LabelsConfig(label_map=str(label_map))
    )
    assert blend.loss_domains is None and blend.loss_ids[prefix].tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    ("domains", "vocab_size", "message"),
    [
        (0, 1024, "must be >= 1, got 0"),
        (100000, 1024, r"100000: each mock domain needs its own band .* at most 1022 bands"),
        (100001, None, "100001: the mock data has 100000 documents"),
    ],
)
def test_mock_domains_the_data_cannot_hold_name_the_flag(domains, vocab_size, message):
    with pytest.raises(EDLConfigError, match=rf"^--moe-edl-mock-domains {message}"):
        check_mock_domains(domains, vocab_size)
    check_mock_domains(1022, 1024)


def test_the_mock_dataset_refuses_too_many_domains_before_any_sample():
    with pytest.raises(EDLConfigError, match="--moe-edl-mock-domains 2000"):
        DomainMockGPTLowLevelDataset(NullTokenizer(vocab_size=1024), 2000)
    data = DomainMockGPTLowLevelDataset(NullTokenizer(vocab_size=1024), 1022)
    assert int(data[1021].max()) < 1024  # the last domain's band is inside the vocabulary
