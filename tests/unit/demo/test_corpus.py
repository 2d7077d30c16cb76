"""The offline corpus builder (megatron_edl.demo.corpus), its roff converter and math generator."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_edl.core.labels import LabelMap
from megatron_edl.data.vocabulary import LabelVocabulary, label_name_problem
from megatron_edl.demo import corpus
from megatron_edl.demo.corpus import (
    DOMAINS,
    CorpusConfig,
    CorpusError,
    SourceRoots,
    build_corpus,
    chunk_text,
    split_of,
)
from megatron_edl.demo.mathgen import latex_documents, problem_documents
from megatron_edl.demo.roff import roff_to_text

TINY = dict(max_bytes_per_domain=12 << 10, max_bytes_per_file=4 << 10, valid_fraction=0.2)
OUTPUTS = ("train.jsonl", "valid.jsonl", "labels.yaml", "label_map_coarse.yaml", "corpus.json")


def read_records(directory: Path) -> dict[str, list[dict]]:
    return {
        split: [json.loads(line) for line in (directory / f"{split}.jsonl").open()]
        for split in ("train", "valid")
    }


def available(spec: corpus.DomainSpec, roots: SourceRoots) -> bool:
    return any(s.open(roots, random.Random(0)).missing is None for s in spec.sources)


# ---------------------------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------------------------


def test_catalogue_has_five_fine_domains_in_three_groups():
    names = [spec.name for spec in DOMAINS]
    assert len(names) == len(set(names)) >= 5
    assert [label_name_problem(n) for n in names] == [None] * len(names)
    groups = Counter(spec.group for spec in DOMAINS)
    assert set(groups) == {"code", "text", "math"}
    assert all(spec.name.startswith(spec.group + "/") for spec in DOMAINS)


# ---------------------------------------------------------------------------------------------
# Building: real sources of this machine, tiny cap
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, corpus.CorpusReport]:
    out = tmp_path_factory.mktemp("corpus")
    return out, build_corpus(CorpusConfig(output_dir=out, seed=7, **TINY), show_progress=False)


def test_domains_present_and_labels_right(built):
    out, report = built
    roots = SourceRoots()
    expected = [spec.name for spec in DOMAINS if available(spec, roots)]
    # Always there: the stdlib, pydoc's topics and sympy (a torch dependency).
    assert {"code/python", "text/en", "math/problems", "math/latex"} <= set(expected)
    assert [d.name for d in report.present] == expected
    assert all(d.status == "full" for d in report.present)

    records = read_records(out)
    spec_of = {spec.name: spec for spec in DOMAINS}
    per_domain: Counter = Counter()
    for split, items in records.items():
        for record in items:
            spec = spec_of[record["domain"]]
            assert record["group"] == spec.group
            source_name = record["source"].split(":", 1)[0]
            assert source_name in [s.name for s in spec.sources]
            assert split_of(record["text"], TINY["valid_fraction"]) == split
            per_domain[record["domain"]] += len(record["text"].encode())
    assert sorted(per_domain) == sorted(expected)
    # The cap: reached, overshot by at most one document.
    cap = TINY["max_bytes_per_domain"]
    assert all(cap <= size <= cap + 4 * 2048 for size in per_domain.values())
    for d in report.present:
        assert d.bytes == per_domain[d.name]
        assert d.train_documents == sum(r["domain"] == d.name for r in records["train"])
        assert d.valid_documents == sum(r["domain"] == d.name for r in records["valid"])
        assert d.documents == sum(s.documents for s in d.sources)

    # No document twice, in any domain or split.
    texts = [r["text"] for items in records.values() for r in items]
    assert len(texts) == len(set(texts))

    # The label files: the vocabulary numbers the present domains in catalogue order; the
    # coarse map sends each to its group.
    vocabulary = LabelVocabulary.from_yaml(out / "labels.yaml").as_dict()
    assert vocabulary == {name: i for i, name in enumerate(expected)}
    label_map = LabelMap.from_yaml(out / "label_map_coarse.yaml", vocabulary=vocabulary)
    assert list(label_map.domains) == ["code", "text", "math"]
    table = label_map.lookup_table(len(vocabulary))
    for name, stored in vocabulary.items():
        assert label_map.domains[table[stored]] == spec_of[name].group

    manifest = json.loads((out / "corpus.json").read_text())
    assert manifest["format_version"] == 1
    assert [d["name"] for d in manifest["domains"]] == [d.name for d in report.domains]


def test_deterministic_across_runs_and_seed_changes_selection(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    build_corpus(CorpusConfig(output_dir=again, seed=7, **TINY), show_progress=False)
    for name in OUTPUTS:
        if name == "corpus.json":  # holds the output folder
            a = json.loads((out / name).read_text())
            b = json.loads((again / name).read_text())
            a["config"].pop("output_dir"), b["config"].pop("output_dir")
            assert a == b
        else:
            assert (out / name).read_bytes() == (again / name).read_bytes(), name

    other = tmp_path / "other"
    build_corpus(
        CorpusConfig(output_dir=other, seed=8, domains=("code/python", "math/latex"), **TINY),
        show_progress=False,
    )
    first = {r["text"] for items in read_records(out).values() for r in items}
    second = read_records(other)
    # Another seed draws other files and other generated problems ...
    assert any(r["text"] not in first for items in second.values() for r in items)
    # ... but a document that both runs contain lands in the same split (its hash decides).
    for split, items in second.items():
        for record in items:
            assert split_of(record["text"], TINY["valid_fraction"]) == split


def test_split_by_hash_is_stable():
    texts = [f"document number {i}\n" * (i % 5 + 1) for i in range(2000)]
    valid = [t for t in texts if split_of(t, 0.1) == "valid"]
    assert 140 <= len(valid) <= 260  # ~10%
    # The hash alone decides: the first 8 bytes of SHA-256 against the fraction of 2^64.
    for text in texts[:50]:
        u = int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)
        assert split_of(text, 0.1) == ("valid" if u < 0.1 * 2**64 else "train")
    # Monotone in the fraction; 0 means no validation.
    assert {t for t in texts if split_of(t, 0.05) == "valid"} <= set(valid)
    assert all(split_of(t, 0.0) == "train" for t in texts)


def test_document_cap(tmp_path):
    report = build_corpus(
        CorpusConfig(
            output_dir=tmp_path,
            domains=("math/problems", "code/python"),
            max_documents_per_domain=5,
            **TINY,
        ),
        show_progress=False,
    )
    assert [d.documents for d in report.present] == [5, 5]


# ---------------------------------------------------------------------------------------------
# Missing sources: reported, never silent
# ---------------------------------------------------------------------------------------------


def _fake_man_tree(root: Path) -> None:
    page = ".TH DEMO 1\n.SH NAME\ndemo \\- ein Beispiel\n.SH BESCHREIBUNG\n" + (
        "Dieses Programm zeigt \\fBnichts\\fR an, aber es tut das gr\\(:undlich.\n" * 8
    )
    for i in range(3):
        folder = root / "de" / "man1"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"demo{i}.1.gz").write_bytes(gzip.compress((page + f"Seite {i}.\n").encode()))
    alias = root / "de" / "man1" / "alias.1.gz"
    alias.write_bytes(gzip.compress(b".so man1/demo0.1\n"))


def test_missing_sources_are_reported_and_fallbacks_used(tmp_path):
    man = tmp_path / "man"
    _fake_man_tree(man)
    roots = SourceRoots().with_overrides({"man": man, "doc": tmp_path / "no-such-folder"})
    config = CorpusConfig(
        output_dir=tmp_path / "out",
        roots=roots,
        domains=("text/en", "text/de", "text/fr", "text/legal", "math/latex"),
        **TINY,
    )
    report = build_corpus(config, show_progress=False)
    by_name = {d.name: d for d in report.domains}

    # French pages: none in the tree -> the domain is missing, with the reason.
    assert by_name["text/fr"].status == "missing"
    assert "no files match fr/man*/*" in by_name["text/fr"].sources[0].missing
    # English pages are missing too, but pydoc's topics fill the domain (the fallback).
    en = {s.name: s for s in by_name["text/en"].sources}
    assert en["man-en"].missing and not en["pydoc-topics"].missing
    assert by_name["text/en"].status == "full" and en["pydoc-topics"].documents > 0
    # German: the three pages of the tree, the alias page skipped and counted; too little
    # text for the cap, so the domain is short, not silently padded.
    de = by_name["text/de"]
    assert de.status == "short"
    assert (de.sources[0].files_found, de.sources[0].files_used) == (4, 3)
    assert de.sources[0].files_skipped == 1
    # Legal: license texts only; the copyright files' folder does not exist.
    legal = {s.name: s for s in by_name["text/legal"].sources}
    assert "no folder" in legal["copyright"].missing
    assert by_name["text/legal"].status == "full"

    missing = {(d, s.name) for d, s in report.missing_sources}
    assert missing == {("text/en", "man-en"), ("text/fr", "man-fr"), ("text/legal", "copyright")}
    assert "missing source man-fr (text/fr)" in report.table()
    vocabulary = yaml.safe_load((tmp_path / "out" / "labels.yaml").read_text())["labels"]
    assert list(vocabulary) == ["text/en", "text/de", "text/legal", "math/latex"]
    records = read_records(tmp_path / "out")
    assert {r["domain"] for items in records.values() for r in items} == set(vocabulary)
    german = [r["text"] for r in records["train"] + records["valid"] if r["domain"] == "text/de"]
    assert german and all("gründlich" in t and "\\f" not in t for t in german)

    with pytest.raises(CorpusError, match=r"--require-all: missing source\(s\): man-en"):
        build_corpus(
            CorpusConfig(output_dir=tmp_path / "strict", roots=roots, require_all=True, **TINY),
            show_progress=False,
        )
    with pytest.raises(CorpusError, match="fewer than two domains"):
        build_corpus(
            CorpusConfig(
                output_dir=tmp_path / "few", roots=roots, domains=("text/fr", "code/python"), **TINY
            ),
            show_progress=False,
        )


def test_cli_list_and_errors(tmp_path, capsys):
    assert corpus.main(["--list", "--root", f"man={tmp_path}"]) == 0
    listed = capsys.readouterr().out
    assert "man-de          MISSING: no files match de/man*/*" in listed
    assert "sympy-latex     generated" in listed
    assert corpus.main(["--output-dir", str(tmp_path), "--root", "nope=/x"]) == 1
    assert "unknown source root(s) ['nope']" in capsys.readouterr().err
    assert corpus.main(["--output-dir", str(tmp_path), "--domains", "text/xx"]) == 1
    assert "unknown domain(s) ['text/xx']" in capsys.readouterr().err
    with pytest.raises(CorpusError, match="--valid-fraction must be in"):
        CorpusConfig(output_dir=tmp_path, valid_fraction=1.0)
    assert corpus.parse_size("512K") == 512 * 1024 and corpus.parse_size("2M") == 2 << 20


# ---------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------


def test_chunk_text_by_hand():
    a, b, c = "a" * 30, "b" * 30, "c" * 30
    text = f"{a}\n\n{b}\n\n\n{c}\n"
    # Paragraphs join (with one blank line) until the target is reached.
    assert chunk_text(text, target_chars=50, max_chars=100, min_chars=1) == [
        f"{a}\n\n{b}",
        c,
    ]
    # Never beyond max: a paragraph of lines is cut at a line end; a document under min drops.
    lines = "\n".join(["x" * 9] * 5)  # 49 chars
    assert chunk_text(lines, target_chars=20, max_chars=20, min_chars=1) == [
        "x" * 9 + "\n" + "x" * 9,
        "x" * 9 + "\n" + "x" * 9,
        "x" * 9,
    ]
    assert (
        chunk_text(lines, target_chars=20, max_chars=20, min_chars=10)
        == ["x" * 9 + "\n" + "x" * 9] * 2
    )
    # Indentation is kept (code), trailing spaces are not.
    code = "def f():   \n    return 1\n"
    expected = ["def f():\n    return 1"]
    assert chunk_text(code, target_chars=10, max_chars=100, min_chars=1) == expected


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from("ab \n"), max_size=400),
    target=st.integers(1, 60),
    extra=st.integers(0, 60),
)
def test_chunk_text_properties(text, target, extra):
    max_chars = target + extra
    docs = chunk_text(text, target_chars=target, max_chars=max_chars, min_chars=1)
    assert all(0 < len(d) <= max_chars for d in docs)
    assert all(d == d.strip("\n") and "\n\n\n" not in d for d in docs)
    # Nothing but whitespace is lost, and the order is kept.
    assert "".join(re.findall(r"\S", "".join(docs))) == "".join(re.findall(r"\S", text))


# ---------------------------------------------------------------------------------------------
# Manual pages to text
# ---------------------------------------------------------------------------------------------


def test_roff_to_text_by_hand():
    source = "\n".join(
        [
            '.\\" a comment line',
            '.TH LS 1 "2024" "coreutils"',
            ".de XX",
            "defined macro body: dropped",
            "..",
            ".SH NAME",
            'ls \\- list directory contents \\" trailing comment',
            ".SH DESCRIPTION",
            "List information about the",
            ".B FILEs",
            "(the current",
            "directory by default).",
            ".PP",
            ".BR ls (1)",
            "and \\fIdir\\fP; caf\\('e \\(aa \\[u00E9] \\(:u \\(em \\*(lqquoted\\*(rq",
            ".TP",
            "\\fB\\-a\\fR, \\fB\\-\\-all\\fR",
            "do not ignore entries",
            ".if n \\{\\",
            "conditional body: dropped",
            ".\\}",
            ".nf",
            "  keep   this",
            "  layout",
            ".fi",
            ".TS",
            "tab(;);",
            "l l.",
            "one;two",
            ".TE",
        ]
    )
    assert roff_to_text(source) == "\n".join(
        [
            "NAME",
            "ls - list directory contents",
            "",
            "DESCRIPTION",
            "List information about the FILEs (the current directory by default).",
            "",
            "ls(1) and dir; café \u00b4 é ü \u2014 \u201cquoted\u201d",
            "",
            "-a, --all",
            "do not ignore entries",
            "",
            "  keep   this",
            "  layout",
            "",
            "one;two",
        ]
    )
    assert roff_to_text(".so man1/other.1\n") is None
    assert roff_to_text('.\\" header\n.so man1/other.1\n') is None
    assert roff_to_text(".Dd May 1\n.Sh NAME\n.Nm ls\n.Op Fl a Ar dir\n") == "NAME\nls -a dir"


# ---------------------------------------------------------------------------------------------
# Generated mathematics
# ---------------------------------------------------------------------------------------------


def test_math_documents_are_deterministic_and_correct():
    first = [next(problem_documents(random.Random(3))) for _ in range(2)]
    assert first[0] == first[1]
    docs = [d for d, _ in zip(problem_documents(random.Random(1)), range(40), strict=False)]
    text = "\n".join(docs)
    assert len(set(docs)) == len(docs)
    # Every linear equation's stated answer satisfies its equation.
    equations = re.findall(r"Solve for x: (.+) = (-?\d+)\.\n(?:.*\n){2}.*Answer: x = (-?\d+)", text)
    assert equations
    for lhs, rhs, answer in equations:
        assert eval(lhs.replace("x", f"({answer})")) == int(rhs)  # noqa: S307 (test data)
    latex = [d for d, _ in zip(latex_documents(random.Random(1)), range(20), strict=False)]
    assert all(d.startswith("\\section*{Worked derivations") for d in latex)
    assert all(d.count("\\begin{align*}") == d.count("\\end{align*}") for d in latex)
