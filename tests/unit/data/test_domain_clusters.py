"""Labels for any corpus: discovered domains (fit + --domain-clusters) and a local classifier.

The corpus is generated from the word lists of tests/helpers/data_helpers.py: each document draws
from one domain's ten words plus common words, so the topics are separable by construction and the
right clustering is known.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from megatron_edl.core.labels import LabelMap
from megatron_edl.data.domain_clusters import (
    MAGIC,
    DomainModel,
    FitSettings,
    fit_from_inputs,
    sample_texts,
)
from megatron_edl.data.errors import DataError
from megatron_edl.data.preprocess import (
    ClassifierLabel,
    ClusterLabel,
    LabelPolicy,
    PreprocessConfig,
    PreprocessError,
    main,
    preprocess,
)
from megatron_edl.data.sidecar import read_sidecar
from tests.helpers.data_helpers import (  # noqa: F401 (fixtures)
    DOMAIN_WORDS,
    sentence,
    tiny_tokenizer_args_fixture,
    tiny_tokenizer_dir_fixture,
    write_jsonl,
    write_parquet,
)

ROOT = Path(__file__).resolve().parents[3]


def topic_corpus(num_documents: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    domains = list(DOMAIN_WORDS)
    return [
        {"text": sentence(rng, d, rng.randint(12, 30)), "topic": d}
        for d in (domains[rng.randrange(len(domains))] for _ in range(num_documents))
    ]


def fit(tmp_path: Path, inputs, name="model.edlc", **settings) -> Path:
    settings = {"num_clusters": 4, "seed": 0, **settings}
    model = fit_from_inputs([str(p) for p in inputs], FitSettings(**settings))
    path = tmp_path / name
    model.save(path)
    return path


def run(tokenizer_args, inputs, out: Path, source, **overrides):
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        inputs=tuple(str(p) for p in inputs),
        output_prefix=str(out / "ds"),
        label_source=source,
        append_eod=True,
        progress=False,
    )
    kwargs.update(overrides)
    stats = preprocess(PreprocessConfig(**kwargs), tokenizer_args)
    return stats["text"], str(out / "ds_text_document")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """400 topic documents (JSONL + Parquet halves) and a 4-cluster model with 2 groups."""
    folder = tmp_path_factory.mktemp("clusters")
    records = topic_corpus(400)
    inputs = [
        write_jsonl(folder / "a.jsonl", records[:200]),
        write_parquet(folder / "b.parquet", records[200:]),
    ]
    model = fit(folder, inputs, coarse_domains=2)
    return folder, records, inputs, model


# ---------------------------------------------------------------------------------------------
# Fit
# ---------------------------------------------------------------------------------------------


def test_clusters_recover_the_topics_with_readable_names(corpus, tiny_tokenizer_args):
    folder, records, inputs, model_path = corpus
    stats, prefix = run(tiny_tokenizer_args, inputs, folder / "out", ClusterLabel(str(model_path)))
    ids, vocabulary = read_sidecar(prefix)
    model = DomainModel.load(model_path)
    # The vocabulary is the model's names, id = cluster id; names are unique.
    assert vocabulary == {name: i for i, name in enumerate(model.names)}
    assert len(set(model.names)) == 4
    names = {i: n for n, i in vocabulary.items()}
    by_topic: dict[str, Counter] = defaultdict(Counter)
    for record, label_id in zip(records, ids.tolist(), strict=True):
        by_topic[record["topic"]][names[label_id]] += 1
    # Each topic lands in one cluster of its own, named by the topic's own words.
    assert all(len(clusters) == 1 for clusters in by_topic.values()), by_topic
    clusters = {topic: next(iter(c)) for topic, c in by_topic.items()}
    assert len(set(clusters.values())) == 4
    for topic, name in clusters.items():
        index, *terms = name.split("-")
        assert index.isdigit() and len(terms) == 3
        assert set(terms) <= set(DOMAIN_WORDS[topic]), (topic, name)
    assert stats["documents_written"] == 400
    assert stats["labels"]["source"]["kind"] == "clusters"
    assert model.header["sample"]["documents_seen"] == 400


def test_fit_is_deterministic_for_a_seed(corpus, tmp_path):
    _, _, inputs, model_path = corpus
    again = fit(tmp_path, inputs, coarse_domains=2)
    assert again.read_bytes() == model_path.read_bytes()
    # The reservoir sample is seeded and bounded.
    texts = (str(i) for i in range(1000))
    sample, seen = sample_texts(texts, 50, seed=3, max_chars=10)
    assert seen == 1000 and len(sample) == 50
    assert sample == sample_texts((str(i) for i in range(1000)), 50, seed=3, max_chars=10)[0]
    assert sample != sample_texts((str(i) for i in range(1000)), 50, seed=4, max_chars=10)[0]
    assert sample != [str(i) for i in range(50)]  # not just the first documents


def test_coarse_label_map_covers_every_cluster(corpus, tmp_path):
    _, _, _, model_path = corpus
    model = DomainModel.load(model_path)
    path = tmp_path / "map.yaml"
    model.write_label_map(path)
    vocabulary = {name: i for i, name in enumerate(model.names)}
    label_map = LabelMap.from_yaml(path, vocabulary)
    assert label_map.num_domains == 2
    table = label_map.lookup_table(len(model.names))
    assert (table >= 0).all()  # every cluster explicitly in a group (default: null is -1)
    assert sorted(set(table.tolist())) == [0, 1]
    # A fallback label outside the clusters takes no part in EDL.
    assert label_map.lookup_table(len(model.names) + 1)[-1] == -1
    # Without a coarse level there is no map.
    plain = DomainModel(dict(model.header, coarse=None), model.vectorizer, model.kmeans)
    with pytest.raises(DataError, match="--coarse-domains"):
        plain.label_map()


def test_fit_cli_and_tool(corpus, tmp_path, capsys):
    _, _, inputs, model_path = corpus
    tool = ROOT / "tools" / "fit_domains.py"
    spec = importlib.util.spec_from_file_location("fit_domains_tool", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, label_map = tmp_path / "cli.edlc", tmp_path / "map.yaml"
    argv = ["--input", *map(str, inputs), "--output", str(out), "--num-clusters", "4"]
    assert module.main([*argv, "--coarse-domains", "2", "--label-map-out", str(label_map)]) == 0
    printed = capsys.readouterr().out
    assert "Fitted 4 clusters on 400 of 400 documents" in printed
    assert out.read_bytes() == model_path.read_bytes()
    names = DomainModel.read_header(out)["names"]
    vocabulary = {name: i for i, name in enumerate(names)}
    assert LabelMap.from_yaml(label_map, vocabulary).num_domains == 2
    assert module.main([*argv, "--coarse-domains", "2"]) == 1
    assert "--coarse-domains and --label-map-out go together" in capsys.readouterr().err
    assert module.main([*argv[:-1], "1"]) == 1
    assert "--num-clusters must be >= 2, got 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Assign
# ---------------------------------------------------------------------------------------------


def test_same_labels_for_one_and_two_workers(corpus, tiny_tokenizer_args):
    folder, _, inputs, model_path = corpus
    outputs = {}
    for workers in (1, 2):
        _, prefix = run(
            tiny_tokenizer_args,
            inputs,
            folder / f"w{workers}",
            ClusterLabel(str(model_path)),
            workers=workers,
            chunk_records=32,
        )
        outputs[workers] = {
            suffix: Path(prefix + suffix).read_bytes() for suffix in (".bin", ".idx", ".domains")
        }
    assert outputs[1] == outputs[2]


def test_document_without_features_is_counted_or_falls_back(corpus, tiny_tokenizer_args):
    folder, records, _, model_path = corpus
    # "?!" has tokens for the tokenizer but no term for the vectorizer; "the" is a stop word.
    lines = [records[0], {"text": "?! ... ?!"}, records[1], {"text": "the the"}]
    src = write_jsonl(folder / "nofeat.jsonl", lines)
    source = ClusterLabel(str(model_path))
    with pytest.raises(PreprocessError, match=r"nofeat\.jsonl:2: no term of the domain model"):
        run(tiny_tokenizer_args, [src], folder / "f", source)
    stats, prefix = run(
        tiny_tokenizer_args, [src], folder / "s", source, on_missing=LabelPolicy("skip")
    )
    assert stats["skipped"]["missing_label"] == 2 and stats["documents_written"] == 2
    fallback = LabelPolicy("fallback", "unclustered")
    stats, prefix = run(tiny_tokenizer_args, [src], folder / "b", source, on_missing=fallback)
    ids, vocabulary = read_sidecar(prefix)
    assert vocabulary["unclustered"] == 4  # after the 4 clusters
    assert ids.tolist()[1] == ids.tolist()[3] == 4 and max(ids.tolist()[::2]) < 4
    assert stats["labels"]["relabelled_to_fallback"]["missing_label"] == 2


def test_corrupt_or_other_version_model_is_refused(corpus, tmp_path, tiny_tokenizer_dir, capsys):
    folder, _, inputs, model_path = corpus
    data = model_path.read_bytes()
    header_end = data.index(b"\n", len(MAGIC)) + 1
    header = json.loads(data[len(MAGIC) : header_end])
    other_version = json.dumps({**header, "version": 2}).encode() + b"\n"
    cases = {
        "flipped.edlc": data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:],
        "truncated.edlc": data[: len(data) // 2],
        "v2.edlc": MAGIC + other_version + data[header_end:],
        "other.edlc": b"PK\x03\x04 not a model",
        "header.edlc": MAGIC + b"{not json\n" + data[header_end:],
    }
    expected = {
        "flipped.edlc": "corrupt domain model (its payload checksum differs)",
        "truncated.edlc": "corrupt domain model",
        "v2.edlc": "domain model format version 2; this megatron-edl reads version 1",
        "other.edlc": "not a megatron-edl domain model",
        "header.edlc": "corrupt domain model header",
    }
    argv = [
        "--input", str(inputs[0]),
        "--output-prefix", str(tmp_path / "cli"),
        "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tiny_tokenizer_dir),
    ]  # fmt: skip
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=re.escape(expected[name])) as error:
            DomainModel.load(path)
        assert str(path) in str(error.value)
        assert main([*argv, "--domain-clusters", str(path)]) == 1
        # One line naming the file (the last of stderr: importing megatron may warn first).
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: {path}: ") and expected[name] in err, err
    assert not list(tmp_path.glob("cli*"))
    assert main([*argv, "--domain-clusters", str(tmp_path / "absent.edlc")]) == 1
    assert "--domain-clusters" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A local Hugging Face classifier
# ---------------------------------------------------------------------------------------------

CLASSES = {0: "topic/science", 1: "topic/history", 2: "topic/math"}


def make_tiny_classifier(folder: Path) -> Path:
    """A 1-layer BERT classifier with a word-level tokenizer, saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = sorted({w for record in topic_corpus(200) for w in record["text"].split()})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
        max_position_embeddings=64,
        num_labels=3,
        id2label=CLASSES,
        label2id={v: k for k, v in CLASSES.items()},
    )
    model = BertForSequenceClassification(config).eval()
    # Weights set by hand, so that the right class is known: a topic word's embedding is the
    # unit vector of its class; uniform attention (query, key = 0) averages the words into the
    # [CLS] position; layer norms, pooler and classifier keep the largest class coordinate. A
    # document is classified by the class with the most words in it.
    classes = {"en/science": 0, "en/history": 1, "zh/history": 1, "math": 2}
    eye = torch.eye(config.hidden_size)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        for topic, topic_words in DOMAIN_WORDS.items():
            for word in topic_words:
                model.bert.embeddings.word_embeddings.weight[vocab[word], classes[topic]] = 1.0
        layer = model.bert.encoder.layer[0]
        layer.attention.self.value.weight.copy_(eye)
        layer.attention.output.dense.weight.copy_(eye)
        model.bert.pooler.dense.weight.copy_(eye)
        model.classifier.weight.copy_(eye[:3])
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_classifier_labels_end_to_end(tmp_path, tiny_tokenizer_args, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = make_tiny_classifier(tmp_path / "classifier")
    records = topic_corpus(60, seed=2)
    src = write_jsonl(tmp_path / "in.jsonl", records)
    right = {"en/science": "topic/science", "math": "topic/math"}
    expected = [right.get(r["topic"], "topic/history") for r in records]
    outputs = {}
    for workers in (1, 2):
        source = ClassifierLabel(str(folder), batch_size=7, max_length=64)
        stats, prefix = run(
            tiny_tokenizer_args, [src], tmp_path / f"w{workers}", source, workers=workers
        )
        ids, vocabulary = read_sidecar(prefix)
        assert vocabulary == {name: i for i, name in CLASSES.items()}
        assert [CLASSES[i] for i in ids.tolist()] == expected
        assert stats["labels"]["source"]["kind"] == "classifier"
        outputs[workers] = Path(prefix + ".domains").read_bytes()
    assert outputs[1] == outputs[2]


def test_classifier_errors(tmp_path, tiny_tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", topic_corpus(3))
    argv = [
        "--input", str(src),
        "--output-prefix", str(tmp_path / "cli"),
        "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tiny_tokenizer_dir),
    ]  # fmt: skip
    assert main([*argv, "--domain-classifier", str(tmp_path / "absent")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*argv, "--domain-classifier", str(empty)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --domain-classifier {empty}: cannot read"), err
    assert main([*argv, "--domain-field", "topic", "--classifier-device", "cuda"]) == 1
    assert "--classifier-device needs --domain-classifier" in capsys.readouterr().err
