"""Tests of ``megatron_edl.core.labels``: the YAML label map and the random-label control.

Shape legend: N documents.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megatron_edl.config import EDLConfigError
from megatron_edl.core.edl import IGNORE_DOMAIN
from megatron_edl.core.labels import LabelMap, permute_document_labels

VOCAB = {"en/sports": 0, "en/ads": 1, "zh/news": 2, "math": 3, "en/news": 4, "zh/ads": 5}
THREE = ["english", "chinese", "math"]


def _map(mapping: dict, vocabulary: dict | None = VOCAB, **extra) -> LabelMap:
    return LabelMap.from_dict({"domains": THREE, "map": mapping, **extra}, vocabulary)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "label_map.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Matching rules
# ---------------------------------------------------------------------------------------------


def test_docstring_example() -> None:
    m = _map({"en/*": "english", "zh/*": "chinese", "math": "math", "en/ads": None, "zh/ads": None})
    assert m.domains == ("english", "chinese", "math")
    assert m.num_domains == 3
    np.testing.assert_array_equal(m.lookup_table(6), [0, -1, 1, 2, 0, -1])


def test_exact_key_wins_over_glob_in_any_order() -> None:
    # The exact key comes after the glob in file order and still wins.
    m = _map({"en/*": "english", "en/ads": "math", "zh/*": "chinese", "math": "math"})
    assert m.lookup_table(6)[1] == 2
    m = _map({"en/ads": "math", "en/*": "english", "zh/*": "chinese", "math": "math"})
    assert m.lookup_table(6)[1] == 2


def test_first_glob_in_file_order_wins() -> None:
    m = _map({"*/ads": None, "en/*": "english", "zh/*": "chinese", "math": "math"})
    np.testing.assert_array_equal(m.lookup_table(6), [0, -1, 1, 2, 0, -1])
    m = _map({"en/*": "english", "*/ads": None, "zh/*": "chinese", "math": "math"})
    np.testing.assert_array_equal(m.lookup_table(6), [0, 0, 1, 2, 0, -1])


def test_glob_character_classes() -> None:
    m = _map({"[ez]?/ads": None, "*": "english"})
    np.testing.assert_array_equal(m.lookup_table(6), [0, -1, 0, 0, 0, -1])


def test_null_ignores() -> None:
    m = _map({"en/*": None, "*": "chinese"})
    np.testing.assert_array_equal(m.apply(np.array([0, 1, 2, 4])), [-1, -1, 1, -1])


def test_default_domain_and_default_null() -> None:
    m = _map({"math": "math"}, default="english")
    np.testing.assert_array_equal(m.lookup_table(6), [0, 0, 0, 2, 0, 0])
    m = _map({"math": "math"}, default=None)
    np.testing.assert_array_equal(m.lookup_table(6), [-1, -1, -1, 2, -1, -1])
    # Without vocabulary a default covers ids that no integer key names.
    m = LabelMap.from_dict({"domains": THREE, "map": {0: "math"}, "default": "chinese"})
    np.testing.assert_array_equal(m.lookup_table(3), [2, 1, 1])


def test_uncovered_labels_error_lists_them() -> None:
    m = _map({"en/*": "english", "math": "math"})
    with pytest.raises(EDLConfigError) as info:
        m.lookup_table(6)
    message = str(info.value)
    assert "does not cover 2 stored label(s)" in message
    assert "2 ('zh/news')" in message and "5 ('zh/ads')" in message
    assert "<dict>" in message
    # The covered subset passes; an uncovered id in the data fails.
    m.check_covers([0, 1, 3, 4, -1])
    with pytest.raises(EDLConfigError, match=r"5 \('zh/ads'\)"):
        m.check_covers(np.array([0, 5, 5]))
    with pytest.raises(EDLConfigError, match=r"does not cover 1 stored label\(s\) of the data: 7"):
        m.check_covers(torch.tensor([0, 7]))


def test_uncovered_list_is_truncated() -> None:
    m = LabelMap.from_dict({"domains": ["a"], "map": {0: "a"}})
    with pytest.raises(EDLConfigError, match=r"does not cover 99 .* and 79 more"):
        m.lookup_table(100)


def test_integer_keys_and_digit_strings() -> None:
    m = LabelMap.from_dict({"domains": THREE, "map": {0: "english", 1: None, "2": "math"}})
    np.testing.assert_array_equal(m.lookup_table(3), [0, -1, 2])
    # Integer keys refer to stored ids also with a vocabulary.
    m = _map({0: "math", "*": "english"})
    np.testing.assert_array_equal(m.lookup_table(6), [2, 0, 0, 0, 0, 0])


def test_conflicting_exact_keys_for_one_id() -> None:
    with pytest.raises(EDLConfigError, match=r"'math' and 3 both name stored id 3"):
        _map({"math": "math", 3: "english", "*": "english"})
    _map({"math": "math", 3: "math", "*": "english"})  # same target: fine


@pytest.mark.parametrize(
    ("mapping", "vocabulary", "message"),
    [
        ({"en/*": "englsh"}, VOCAB, "map key 'en/*': unknown domain 'englsh'"),
        ({"math": 2}, VOCAB, "map key 'math': the target must be a domain name or null, got 2"),
        ({"mth": "math"}, VOCAB, "map key 'mth' is not a label name of the vocabulary"),
        ({"fr/*": "english"}, VOCAB, "map key 'fr/*': the glob matches no label name"),
        ({"en/*": "english"}, None, "map key 'en/*' is a glob over label names"),
        ({"math": "math"}, None, "map key 'math' is a label name, which needs a vocabulary"),
        ({-2: "math"}, None, "map key -2: stored ids are >= 0"),
        ({True: "math"}, None, "map key True: keys are stored label ids"),
        ({1.5: "math"}, None, "map key 1.5: keys are stored label ids"),
    ],
)
def test_bad_map_entries_name_key(mapping: dict, vocabulary: dict | None, message: str) -> None:
    with pytest.raises(EDLConfigError) as info:
        _map(mapping, vocabulary)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "a label map must be a mapping"),
        ({"map": {}}, "missing 'domains'"),
        ({"domains": [], "map": {}}, "'domains' is empty"),
        ({"domains": "abc", "map": {}}, "'domains' must be a list"),
        ({"domains": ["a", "a"], "map": {}}, "duplicate domain 'a'"),
        ({"domains": ["a", False], "map": {}}, "domain names must be non-empty strings"),
        ({"domains": ["a"], "map": [1]}, "'map' must be a mapping"),
        ({"domains": ["a"], "mapping": {}}, "unknown top-level key(s) 'mapping'"),
        ({"domains": ["a"], "map": {}, "default": "b"}, "'default': unknown domain 'b'"),
    ],
)
def test_bad_structure(data: object, message: str) -> None:
    with pytest.raises(EDLConfigError) as info:
        LabelMap.from_dict(data, source="maps/x.yaml")  # type: ignore[arg-type]
    assert str(info.value).startswith("maps/x.yaml: ")
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# lookup_table / apply
# ---------------------------------------------------------------------------------------------


def test_apply_numpy_keeps_minus_one_and_shape() -> None:
    m = _map({"en/*": "english", "zh/*": "chinese", "math": "math"})
    ids = np.array([[0, 1, -1], [3, 2, 5]], dtype=np.int32)
    out = m.apply(ids)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, [[0, 0, -1], [2, 1, 1]])
    np.testing.assert_array_equal(m.apply([4, -1]), [0, -1])
    np.testing.assert_array_equal(m.apply(np.full(3, -1)), [-1, -1, -1])
    assert m.apply(np.zeros(0, dtype=np.int64)).shape == (0,)


def test_apply_torch_keeps_minus_one_device_and_shape() -> None:
    m = _map({"en/*": "english", "zh/*": "chinese", "math": "math"})
    ids = torch.tensor([[0, 1, -1], [3, 2, 5]], dtype=torch.int32)
    out = m.apply(ids)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64
    assert out.device == ids.device
    torch.testing.assert_close(out, torch.tensor([[0, 0, -1], [2, 1, 1]]))
    torch.testing.assert_close(m.apply(torch.full((4,), -1)), torch.full((4,), -1))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_apply_errors(as_tensor: bool) -> None:
    m = _map({"en/*": "english", "math": "math"})

    def wrap(values: list[int]) -> object:
        return torch.tensor(values) if as_tensor else np.array(values)

    with pytest.raises(EDLConfigError, match=r"2 \('zh/news'\)"):
        m.apply(wrap([0, 2, -1]))
    with pytest.raises(EDLConfigError, match="stored id -2 is invalid"):
        m.apply(wrap([0, -2]))
    with pytest.raises(EDLConfigError, match="must be integers"):
        m.apply(torch.tensor([0.0]) if as_tensor else np.array([0.0]))


def test_lookup_table_agrees_with_apply_and_is_a_copy() -> None:
    m = _map({"en/*": "english", "zh/*": "chinese", "math": "math"})
    table = m.lookup_table(6)
    assert table.dtype == np.int64 and table.shape == (6,)
    np.testing.assert_array_equal(m.apply(np.arange(6)), table)
    table[:] = 99  # must not poison the cache
    np.testing.assert_array_equal(m.apply(np.arange(6)), [0, 0, 1, 2, 0, 1])
    assert m.lookup_table(0).shape == (0,)
    with pytest.raises(EDLConfigError, match="num_stored must be an integer >= 0"):
        m.lookup_table(-1)


def test_identity() -> None:
    m = LabelMap.identity(4)
    assert m.domains == ("0", "1", "2", "3")
    np.testing.assert_array_equal(m.lookup_table(4), [0, 1, 2, 3])
    np.testing.assert_array_equal(m.apply(np.array([3, -1, 0])), [3, -1, 0])
    with pytest.raises(EDLConfigError, match="does not cover 1 stored label"):
        m.apply(np.array([4]))
    assert LabelMap.identity(2, names=["en", "zh"]).domains == ("en", "zh")
    with pytest.raises(EDLConfigError, match="num_stored >= 1"):
        LabelMap.identity(0)


def test_49_topics_to_3_groups() -> None:
    """The paper's two labellings from one corpus: 24 English + 24 Chinese topics + math."""
    names = [f"en/topic{i:02d}" for i in range(24)] + [f"zh/topic{i:02d}" for i in range(24)]
    vocabulary = {name: i for i, name in enumerate([*names, "math"])}
    coarse = LabelMap.from_dict(
        {"domains": THREE, "map": {"en/*": "english", "zh/*": "chinese", "math": "math"}},
        vocabulary,
    )
    expected = np.array([0] * 24 + [1] * 24 + [2])
    np.testing.assert_array_equal(coarse.lookup_table(49), expected)
    fine = LabelMap.identity(49)
    doc_ids = np.array([0, 23, 24, 47, 48, -1])
    np.testing.assert_array_equal(fine.apply(doc_ids), doc_ids)
    np.testing.assert_array_equal(coarse.apply(doc_ids), [0, 0, 1, 1, 2, -1])
    assert (coarse.num_domains, fine.num_domains) == (3, 49)


# ---------------------------------------------------------------------------------------------
# YAML files
# ---------------------------------------------------------------------------------------------


def test_yaml_file_and_round_trip(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        # loss domains, in id order (0, 1, 2)
        domains: [english, chinese, math]
        map:
          "en/*": english
          "zh/*": chinese
          math: math
          "en/ads": null
          7: math
        default: null
        """,
    )
    m = LabelMap.from_yaml(path, VOCAB)
    assert m.source == str(path)
    np.testing.assert_array_equal(m.lookup_table(8), [0, -1, 1, 2, 0, 1, -1, 2])
    again_path = tmp_path / "again.yaml"
    again_path.write_text(yaml.safe_dump(m.to_dict(), sort_keys=False), encoding="utf-8")
    again = LabelMap.from_yaml(again_path, VOCAB)
    assert again.to_dict() == m.to_dict()
    assert list(again.to_dict()["map"]) == ["en/*", "zh/*", "math", "en/ads", 7]
    np.testing.assert_array_equal(again.lookup_table(8), m.lookup_table(8))


def test_yaml_errors_name_path_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "domains: [english]\nmap:\n  'en/*': englsh\n")
    with pytest.raises(EDLConfigError) as info:
        LabelMap.from_yaml(path, VOCAB)
    assert str(path) in str(info.value) and "'en/*'" in str(info.value)


def test_yaml_duplicate_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "domains: [a, b]\nmap:\n  0: a\n  0: b\n")
    with pytest.raises(EDLConfigError, match=r"label_map\.yaml: invalid YAML .*duplicate key 0"):
        LabelMap.from_yaml(path)


def test_yaml_boolean_domain_needs_quotes(tmp_path: Path) -> None:
    path = _write(tmp_path, "domains: [yes, no]\nmap: {0: 'yes'}\n")
    with pytest.raises(EDLConfigError, match="quote names"):
        LabelMap.from_yaml(path)


def test_yaml_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(EDLConfigError, match="cannot read the label map"):
        LabelMap.from_yaml(tmp_path / "missing.yaml")
    path = _write(tmp_path, "domains: [a\n")
    with pytest.raises(EDLConfigError, match="invalid YAML"):
        LabelMap.from_yaml(path)


# ---------------------------------------------------------------------------------------------
# permute_document_labels
# ---------------------------------------------------------------------------------------------


def _docs(n: int = 200) -> np.ndarray:
    labels_N = np.random.default_rng(0).integers(-1, 5, size=n).astype(np.int32)
    assert (labels_N == -1).any()
    return labels_N


def test_permute_keeps_label_multiset_and_unlabelled_in_place() -> None:
    labels_N = _docs()
    out_N = permute_document_labels(labels_N, seed=1234)
    assert out_N.dtype == labels_N.dtype and out_N.shape == labels_N.shape
    np.testing.assert_array_equal(out_N == IGNORE_DOMAIN, labels_N == IGNORE_DOMAIN)
    np.testing.assert_array_equal(np.sort(out_N), np.sort(labels_N))
    assert (out_N != labels_N).any()


def test_permute_deterministic_and_seed_dependent() -> None:
    labels_N = _docs()
    before = labels_N.copy()
    first = permute_document_labels(labels_N, seed=7)
    np.testing.assert_array_equal(first, permute_document_labels(labels_N, seed=7))
    assert not np.array_equal(first, permute_document_labels(labels_N, seed=8))
    np.testing.assert_array_equal(labels_N, before)  # input untouched


def test_permute_edge_cases_and_errors() -> None:
    assert permute_document_labels(np.zeros(0, dtype=np.int64), seed=0).shape == (0,)
    np.testing.assert_array_equal(permute_document_labels(np.array([-1, -1]), 3), [-1, -1])
    with pytest.raises(EDLConfigError, match="document label -2 is invalid"):
        permute_document_labels(np.array([0, -2]), seed=0)
    with pytest.raises(EDLConfigError, match="1-D integer array"):
        permute_document_labels(np.array([[0, 1]]), seed=0)
    with pytest.raises(EDLConfigError, match="1-D integer array"):
        permute_document_labels(np.array([0.5]), seed=0)
    with pytest.raises(EDLConfigError, match="--moe-edl-random-seed must be an integer >= 0"):
        permute_document_labels(np.array([0, 1]), seed=-1)


# ---------------------------------------------------------------------------------------------
# Unreadable files name the file (issue 26, item 16)
# ---------------------------------------------------------------------------------------------


def test_a_label_map_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_bytes("domains: [caf\u00e9]\nmap: {0: caf\u00e9}\n".encode("latin-1"))
    message = rf"{path}: the label map is not UTF-8 text \(byte 0xe9"
    with pytest.raises(EDLConfigError, match=message):
        LabelMap.from_yaml(path)


def test_a_label_map_that_is_a_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(EDLConfigError, match=rf"{tmp_path}: the label map is a folder"):
        LabelMap.from_yaml(tmp_path)


def test_a_superscript_digit_key_is_a_named_error() -> None:
    # "\u00b2".isdigit() is True, but int() refuses it: a name without a vocabulary.
    with pytest.raises(EDLConfigError, match="needs a vocabulary"):
        LabelMap.from_dict({"domains": ["a"], "map": {"\u00b2": "a"}})
