"""Preprocessing under hostile input (issue 26): each case a one-line error or a correct result.

Pipes and FIFOs (nothing lost, nothing blocks forever), label names the vocabulary cannot carry,
two runs extending one vocabulary at once, a full disk, literal file names with glob characters,
byte-identical stats under any hash seed, flags and files refused before any work, and a huge
document skipped without being tokenized whole. A fuzz test of the CLI closes the file.

Subprocesses (the CLI, forked runs) all have timeouts; everything else calls ``main`` in-process.
"""

from __future__ import annotations

import errno
import gzip
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import megatron_edl.data.preprocess as preprocess_module
from megatron_edl.data import readers
from megatron_edl.data.preprocess import build_megatron_tokenizer, main
from megatron_edl.data.preprocess_output import DatasetWriter
from megatron_edl.data.sidecar import read_sidecar
from megatron_edl.data.vocabulary import LabelVocabulary
from tests.helpers.data_helpers import (  # noqa: F401 (fixtures)
    DOMAIN_WORDS,
    make_corpus,
    tiny_tokenizer_args_fixture,
    tiny_tokenizer_dir_fixture,
    write_jsonl,
    write_parquet,
)

ROOT = Path(__file__).resolve().parents[3]
SUFFIXES = (".bin", ".idx", ".domains", ".stats.json")
TIMEOUT_S = 120
NUM_RECORDS = 2000


def argv_for(tokenizer_dir, inputs, prefix, *extra) -> list[str]:
    return [
        "--input", *map(str, inputs),
        "--output-prefix", str(prefix),
        "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tokenizer_dir),
        "--append-eod",
        "--domain-field", "meta.domain",
        *extra,
    ]  # fmt: skip


def corpus_bytes(num: int = NUM_RECORDS, seed: int = 21) -> bytes:
    records = make_corpus(num, seed=seed)
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def stats_of(prefix) -> dict:
    return json.loads(Path(f"{prefix}_text_document.stats.json").read_text())


def final_outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


class Feeder(threading.Thread):
    """Writes ``data`` into a pipe or FIFO, then closes it (a vanished reader is no error)."""

    def __init__(self, data: bytes, *, fd: int | None = None, path: str | None = None):
        super().__init__(daemon=True)
        self.data, self.fd, self.path = data, fd, path

    def run(self) -> None:
        fd = self.fd if self.fd is not None else os.open(self.path, os.O_WRONLY)
        try:
            with os.fdopen(fd, "wb") as f:
                for i in range(0, len(self.data), 1000):  # many small writes, as a program does
                    f.write(self.data[i : i + 1000])
                    f.flush()
        except BrokenPipeError:
            pass


# ---------------------------------------------------------------------------------------------
# 1, 13: pipes and FIFOs
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("compress", [False, True], ids=["jsonl", "jsonl.gz"])
def test_pipe_input_loses_no_record(tmp_path, tiny_tokenizer_dir, compress):
    data = corpus_bytes()
    payload = gzip.compress(data, mtime=0) if compress else data
    reference = tmp_path / ("ref.jsonl.gz" if compress else "ref.jsonl")
    reference.write_bytes(payload)
    assert main(argv_for(tiny_tokenizer_dir, [reference], tmp_path / "ref")) == 0

    read_fd, write_fd = os.pipe()
    feeder = Feeder(payload, fd=write_fd)
    feeder.start()
    try:
        argv = argv_for(tiny_tokenizer_dir, [f"/dev/fd/{read_fd}"], tmp_path / "pipe")
        assert main([*argv, "--on-invalid", "skip"]) == 0
    finally:
        os.close(read_fd)
        feeder.join(timeout=30)
    stats = stats_of(tmp_path / "pipe")
    assert stats["documents_in"] == stats["documents_written"] == NUM_RECORDS
    assert sum(stats["skipped"].values()) == 0
    assert stats["inputs"][0]["format"] == ("jsonl.gz" if compress else "jsonl")
    for suffix in (".bin", ".idx", ".domains"):
        got = Path(f"{tmp_path / 'pipe'}_text_document{suffix}").read_bytes()
        assert got == Path(f"{tmp_path / 'ref'}_text_document{suffix}").read_bytes(), suffix


@pytest.mark.timeout(TIMEOUT_S)
def test_named_fifo_with_a_late_writer_loses_no_record(tmp_path, tiny_tokenizer_dir):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    feeder = Feeder(corpus_bytes(), path=str(fifo))
    timer = threading.Timer(0.5, feeder.start)  # the writer comes after the reader opened
    timer.start()
    try:
        assert main(argv_for(tiny_tokenizer_dir, [fifo], tmp_path / "f")) == 0
    finally:
        timer.join(timeout=30)
        feeder.join(timeout=30)
    stats = stats_of(tmp_path / "f")
    assert stats["documents_in"] == stats["documents_written"] == NUM_RECORDS


@pytest.mark.timeout(TIMEOUT_S)
def test_fifo_without_a_writer_is_refused_not_waited_on_forever(
    tmp_path, tiny_tokenizer_dir, capsys, monkeypatch
):
    monkeypatch.setattr(readers, "FIFO_WRITER_TIMEOUT_S", 0.5)
    fifo = tmp_path / "lonely.fifo"
    os.mkfifo(fifo)
    start = time.monotonic()
    assert main(argv_for(tiny_tokenizer_dir, [fifo], tmp_path / "out" / "f")) == 1
    assert time.monotonic() - start < 30
    line = error_line(capsys)
    assert f"--input '{fifo}': no process opened this FIFO for writing within 0.5 s" in line
    assert final_outputs(tmp_path / "out") == []


@pytest.mark.timeout(TIMEOUT_S)
def test_parquet_through_a_pipe_is_refused_in_one_line(tmp_path, tiny_tokenizer_dir, capsys):
    payload = write_parquet(tmp_path / "a.parquet", make_corpus(20, seed=1)).read_bytes()
    read_fd, write_fd = os.pipe()
    feeder = Feeder(payload, fd=write_fd)
    feeder.start()
    try:
        assert main(argv_for(tiny_tokenizer_dir, [f"/dev/fd/{read_fd}"], tmp_path / "o" / "p")) == 1
    finally:
        os.close(read_fd)
        feeder.join(timeout=30)
    assert "Parquet from a pipe or FIFO is not supported" in error_line(capsys)


@pytest.mark.timeout(TIMEOUT_S)
def test_cli_subprocess_reads_all_of_stdin(tmp_path, tiny_tokenizer_dir):
    data = corpus_bytes()
    lines = data.splitlines(keepends=True)
    lines[7] = b"{not json\n"  # one bad record: counted, not a misleading "line 1" error
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    prefix = tmp_path / "stdin"
    argv = argv_for(tiny_tokenizer_dir, ["/dev/stdin"], prefix, "--on-invalid", "skip")
    result = subprocess.run(
        [sys.executable, "-m", "megatron_edl.data.preprocess", *argv],
        input=b"".join(lines),
        capture_output=True,
        env=env,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    stats = stats_of(prefix)
    assert stats["documents_in"] == NUM_RECORDS
    assert stats["documents_written"] == NUM_RECORDS - 1
    assert stats["skipped"]["invalid_json"] == 1
    assert stats["inputs"][0]["documents_in"] == NUM_RECORDS


# ---------------------------------------------------------------------------------------------
# 2: label names the vocabulary cannot round-trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "char", ["\x7f", "\x85", "\u2028", "\x00", "\x1b", "\u200b", "\ufeff"], ids=repr
)
def test_extend_vocab_refuses_unprintable_label_names(tmp_path, tiny_tokenizer_dir, capsys, char):
    lines = [
        {"text": "the proof", "meta": {"domain": "math"}},
        {"text": "a theorem", "meta": {"domain": f"en/sci{char}ence"}},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    vocab = tmp_path / "v.yaml"
    argv = argv_for(tiny_tokenizer_dir, [src], tmp_path / "out" / "ds")
    argv += ["--label-vocab", str(vocab), "--extend-vocab"]
    assert main(argv) == 1
    line = error_line(capsys)
    assert re.search(rf"{re.escape(str(src))}:2: label .* non-printable character U\+", line), line
    assert not vocab.exists() and final_outputs(tmp_path / "out") == []
    # Counted under --on-unknown skip; the vocabulary written reads back.
    assert main([*argv, "--on-unknown", "skip"]) == 0
    assert LabelVocabulary.from_yaml(vocab).as_dict() == {"math": 0}
    assert stats_of(tmp_path / "out" / "ds")["skipped"]["invalid_label"] == 1


# ---------------------------------------------------------------------------------------------
# 3: two runs extending one vocabulary at the same time
# ---------------------------------------------------------------------------------------------

# Each run's label callable waits, on its first record, until the other run has started
# labelling too: both have read the vocabulary before either writes it.
BARRIER_MODULE = """\
import os, time

_started = set()

def label(record):
    run = record["run"]
    if run not in _started:
        _started.add(run)
        open(f"{run}.started", "w").close()
        other = {"a": "b", "b": "a"}[run]
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{other}.started") and time.monotonic() < deadline:
            time.sleep(0.01)
    return record["label"]
"""


def _run_in_child(folder: str, argv: list[str]) -> None:
    os.chdir(folder)
    code = 3
    try:
        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_concurrent_extend_vocab_runs_agree_on_ids(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "edl_barrier_labels.py").write_text(BARRIER_MODULE)
    vocab = tmp_path / "v.yaml"
    LabelVocabulary({"shared": 0}).to_yaml(vocab)
    labels = {"a": ["shared", "both", "only_a"], "b": ["only_b", "both", "shared"]}
    children = {}
    for run, names in labels.items():
        records = [{"text": f"text {i}", "run": run, "label": names[i % 3]} for i in range(60)]
        src = write_jsonl(tmp_path / f"{run}.jsonl", records)
        argv = argv_for(tiny_tokenizer_dir, [src], tmp_path / run, "--chunk-size", "8")
        argv[argv.index("--domain-field") : argv.index("--domain-field") + 2] = [
            "--domain-callable",
            "edl_barrier_labels:label",
        ]
        argv += ["--label-vocab", str(vocab), "--extend-vocab"]
        child = multiprocessing.get_context("fork").Process(
            target=_run_in_child, args=(str(tmp_path), argv)
        )
        child.start()
        children[run] = (child, records)
    for child, _ in children.values():
        child.join(timeout=TIMEOUT_S)
        if child.is_alive():
            child.kill()
            child.join()
    assert [c.exitcode for c, _ in children.values()] == [0, 0]
    final = LabelVocabulary.from_yaml(vocab).as_dict()
    assert sorted(final) == ["both", "only_a", "only_b", "shared"]
    assert final["shared"] == 0 and sorted(final.values()) == [0, 1, 2, 3]
    names = {i: n for n, i in final.items()}
    for run, (_, records) in children.items():
        ids, vocabulary = read_sidecar(str(tmp_path / f"{run}_text_document"))
        # The dataset's ids are the file's (the run that finished first knew fewer labels).
        assert set(labels[run]) <= set(vocabulary)
        assert all(final[name] == i for name, i in vocabulary.items()), vocabulary
        assert [names[i] for i in ids.tolist()] == [r["label"] for r in records]
        domains = stats_of(tmp_path / run)["domains"]
        assert all(final[name] == d["id"] for name, d in domains.items()), domains


# ---------------------------------------------------------------------------------------------
# 5: a full disk
# ---------------------------------------------------------------------------------------------


class FullDisk:
    """A token file on a disk that fills up after ``limit`` bytes; its close fails too."""

    def __init__(self, real, limit: int) -> None:
        self.real, self.limit, self.written, self.full = real, limit, 0, False

    def write(self, data) -> int:
        if self.written + len(data) > self.limit:
            self.full = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.real.write(data)

    def close(self) -> None:
        self.real.close()
        if self.full:  # the buffered tail cannot be flushed either
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_disk_full_is_one_line_and_leaves_nothing_behind(
    tmp_path, tiny_tokenizer_dir, capsys, monkeypatch
):
    src = write_jsonl(tmp_path / "in.jsonl", make_corpus(300, seed=3))
    real_init = DatasetWriter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.builder.data_file = FullDisk(self.builder.data_file, limit=2000)

    monkeypatch.setattr(DatasetWriter, "__init__", init)
    out = tmp_path / "out"
    assert main(argv_for(tiny_tokenizer_dir, [src], out / "ds")) == 1
    line = error_line(capsys)
    assert f"--output-prefix '{out / 'ds'}': cannot write the outputs" in line
    assert "No space left on device" in line
    assert final_outputs(out) == []  # no temporary folder, nothing under a final name


def test_disk_full_for_the_vocabulary_names_it(tmp_path, tiny_tokenizer_dir, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", make_corpus(30, seed=3))
    vocab = tmp_path / "v.yaml"
    LabelVocabulary({"math": 0}).to_yaml(vocab)
    before = vocab.read_bytes()

    def full(self, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(LabelVocabulary, "to_yaml", full)
    out = tmp_path / "out"
    argv = argv_for(tiny_tokenizer_dir, [src], out / "ds", "--label-vocab", str(vocab))
    assert main([*argv, "--extend-vocab"]) == 1
    line = error_line(capsys)
    assert f"--label-vocab '{vocab}': cannot write the extended vocabulary" in line
    assert vocab.read_bytes() == before and final_outputs(out) == []


# ---------------------------------------------------------------------------------------------
# 8, 9: literal names with glob characters; stats independent of the hash seed
# ---------------------------------------------------------------------------------------------


def test_literal_file_name_with_glob_characters(tmp_path, tiny_tokenizer_dir):
    literal = write_jsonl(tmp_path / "data[1].jsonl", make_corpus(5, seed=1))
    write_jsonl(tmp_path / "data1.jsonl", make_corpus(9, seed=2))  # what the glob matches
    assert main(argv_for(tiny_tokenizer_dir, [literal], tmp_path / "lit")) == 0
    stats = stats_of(tmp_path / "lit")
    assert stats["documents_in"] == 5 and stats["inputs"][0]["path"] == str(literal)
    # Without the literal file, the value is a glob again.
    literal.unlink()
    assert main(argv_for(tiny_tokenizer_dir, [literal], tmp_path / "glob")) == 0
    assert stats_of(tmp_path / "glob")["documents_in"] == 9


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_stats_are_byte_identical_under_any_hash_seed(tmp_path, tiny_tokenizer_dir):
    records = make_corpus(40, seed=4)
    records[3]["meta"]["domain"] = "not/in/vocab"
    del records[5]["meta"]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    vocab = tmp_path / "v.yaml"
    names = sorted({"other", *DOMAIN_WORDS})
    LabelVocabulary({name: i for i, name in enumerate(names)}).to_yaml(vocab)
    outputs = []
    for seed in ("0", "3"):  # these two seeds order the frozenset of label problems differently
        env = dict(os.environ, PYTHONHASHSEED=seed)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        argv = argv_for(tiny_tokenizer_dir, [src], tmp_path / "s")
        argv += ["--label-vocab", str(vocab), "--on-unknown", "fallback:other"]
        argv += ["--on-missing", "fallback:other"]
        result = subprocess.run(
            [sys.executable, "-m", "megatron_edl.data.preprocess", *argv],
            capture_output=True,
            env=env,
            timeout=TIMEOUT_S,
        )
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        outputs.append(Path(f"{tmp_path / 's'}_text_document.stats.json").read_bytes())
    assert outputs[0] == outputs[1]
    relabelled = json.loads(outputs[0])["labels"]["relabelled_to_fallback"]
    assert relabelled == {"invalid_label": 0, "missing_label": 1, "unknown_label": 1}


# ---------------------------------------------------------------------------------------------
# 13: flags and files refused before any work
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if reading the input or starting workers begins."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(preprocess_module, "iter_chunks", refuse)
    monkeypatch.setattr(preprocess_module, "ProcessPoolExecutor", refuse)


def test_workers_have_an_upper_bound(tmp_path, tiny_tokenizer_dir, capsys, no_work):
    src = write_jsonl(tmp_path / "in.jsonl", make_corpus(5))
    limit = 4 * (os.cpu_count() or 1)
    argv = argv_for(tiny_tokenizer_dir, [src], tmp_path / "o" / "w")
    assert main([*argv, "--workers", "100000"]) == 1
    line = error_line(capsys)
    assert f"--workers 100000 is more than 4 x the {os.cpu_count()} CPUs" in line
    assert f"({limit})" in line


@pytest.mark.parametrize("case", ["folder", "latin-1", "missing folder", "read-only folder"])
def test_vocabulary_problems_are_refused_before_any_work(
    tmp_path, tiny_tokenizer_dir, capsys, monkeypatch, no_work, case
):
    src = write_jsonl(tmp_path / "in.jsonl", make_corpus(5))
    extend: list[str] = []
    if case == "folder":
        vocab = tmp_path / "vocab.yaml"
        vocab.mkdir()
        expected = f"--label-vocab '{vocab}' is a folder, not a label vocabulary file"
    elif case == "latin-1":
        vocab = tmp_path / "vocab.yaml"
        vocab.write_bytes("labels:\n  caf\xe9: 0\n".encode("latin-1"))
        expected = f"{vocab}: the label vocabulary is not UTF-8 text"
    elif case == "missing folder":
        vocab = tmp_path / "absent" / "vocab.yaml"
        extend = ["--extend-vocab"]
        expected = f"--label-vocab '{vocab}': folder {vocab.parent} does not exist"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        vocab = folder / "vocab.yaml"
        extend = ["--extend-vocab"]
        expected = f"--label-vocab '{vocab}': folder {folder} is not writable"
        real_access = os.access  # root writes anywhere: the check asks os.access, as for others

        def access(path, mode, **kwargs):
            if os.fspath(path) == str(folder) and mode & os.W_OK:
                return False
            return real_access(path, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)
    argv = argv_for(tiny_tokenizer_dir, [src], tmp_path / "o" / "v", "--label-vocab", str(vocab))
    assert main([*argv, *extend]) == 1
    assert expected in error_line(capsys)
    assert final_outputs(tmp_path / "o") == []


def test_path_map_folder_or_not_utf8_is_one_line(tmp_path, tiny_tokenizer_dir, capsys, no_work):
    src = write_jsonl(tmp_path / "in.jsonl", make_corpus(5))
    (tmp_path / "map_dir").mkdir()
    latin = tmp_path / "map.yaml"
    latin.write_bytes('"*.jsonl": caf\xe9\n'.encode("latin-1"))
    for path_map, expected in [
        (tmp_path / "map_dir", "is a folder, not a path map file"),
        (latin, "the path map is not UTF-8 text"),
        (tmp_path / "absent.yaml", "--domain-from-path"),
    ]:
        argv = argv_for(tiny_tokenizer_dir, [src], tmp_path / "o" / "m")
        i = argv.index("--domain-field")
        argv[i : i + 2] = ["--domain-from-path", str(path_map)]
        assert main(argv) == 1
        line = error_line(capsys)
        assert str(path_map) in line and expected in line, line


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--tokenizer-type", "HuggingFaceTokenizer"], "--tokenizer-type HuggingFaceTokenizer "
         "needs --tokenizer-model"),
        (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/no/such.model"],
         "--tokenizer-model '/no/such.model' does not exist"),
        (["--tokenizer-type", "GPT2BPETokenizer"], "needs --vocab-file"),
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "./no_such_dir"],
         "--tokenizer-model './no_such_dir' does not exist"),
        ([], "--tokenizer-type is required"),
    ],
)  # fmt: skip
def test_tokenizer_flags_are_checked_before_any_work(
    tmp_path, capsys, monkeypatch, no_work, flags, expected
):
    def no_build(*args, **kwargs):
        raise AssertionError("the tokenizer was built before its flags were checked")

    monkeypatch.setattr(preprocess_module, "expand_inputs", no_build)
    argv = ["--input", "x.jsonl", "--output-prefix", str(tmp_path / "t"), "--domain-field", "d"]
    assert main([*argv, *flags]) == 1
    assert expected in error_line(capsys)


def test_a_tokenizer_megatron_cannot_build_is_one_line(tmp_path, capsys):
    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    src = write_jsonl(tmp_path / "in.jsonl", make_corpus(5))
    assert main(argv_for(broken, [src], tmp_path / "o" / "t")) == 1
    line = error_line(capsys)
    assert "cannot build the tokenizer of --tokenizer-type HuggingFaceTokenizer " in line
    assert str(broken) in line


# ---------------------------------------------------------------------------------------------
# 18: a huge document under --max-document-tokens is not tokenized whole
# ---------------------------------------------------------------------------------------------


class RecordingTokenizer:
    """The real tokenizer, remembering the longest text it was asked to tokenize."""

    def __init__(self, real) -> None:
        self.real, self.longest = real, 0

    def tokenize(self, text):
        self.longest = max(self.longest, len(text))
        return self.real.tokenize(text)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_huge_document_is_skipped_without_tokenizing_it(
    tmp_path, tiny_tokenizer_dir, tiny_tokenizer_args, monkeypatch
):
    recording = RecordingTokenizer(build_megatron_tokenizer(tiny_tokenizer_args))
    monkeypatch.setattr(preprocess_module, "build_megatron_tokenizer", lambda args: recording)
    huge = "word " * 400_000  # 2 MB on one line
    records = make_corpus(20, seed=5)
    records.insert(7, {"text": huge, "meta": {"domain": "math"}})
    src = write_jsonl(tmp_path / "in.jsonl", records)
    argv = argv_for(tiny_tokenizer_dir, [src], tmp_path / "h", "--max-document-tokens", "1000")
    assert main(argv) == 0
    stats = stats_of(tmp_path / "h")
    assert stats["skipped"]["too_long"] == 1 and stats["documents_written"] == 20
    assert 0 < recording.longest < 64 * 1000  # the huge text never reached the tokenizer


def test_long_document_within_the_character_bound_is_still_counted_exactly(
    tmp_path, tiny_tokenizer_dir
):
    # 3,000 characters: below 64 x 100, but more than 100 tokens: tokenized, then too_long.
    records = [{"text": "word " * 600, "meta": {"domain": "math"}}, *make_corpus(3, seed=6)]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    argv = argv_for(tiny_tokenizer_dir, [src], tmp_path / "e", "--max-document-tokens", "100")
    assert main(argv) == 0
    assert stats_of(tmp_path / "e")["skipped"]["too_long"] == 1


# ---------------------------------------------------------------------------------------------
# Fuzz: any records, encodings and labels: a correct result or one line naming file and line
# ---------------------------------------------------------------------------------------------

_MAGIC = (b"\x1f\x8b", b"PAR1", b"\x28\xb5\x2f\xfd")
_LABEL_TEXT = st.one_of(
    st.sampled_from(["math", "en/science", "other", "new/one", "zh/历史"]),
    st.text(max_size=8),  # any code point: controls, separators, glob characters, ...
)
_LABEL = st.one_of(
    _LABEL_TEXT,
    st.none(),
    st.integers(-3, 3),
    st.booleans(),
    st.lists(st.text(max_size=2), max_size=2),
)
_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["the proof of a theorem", "", " "]),
    st.none(),
    st.integers(),
)
_GOOD = st.fixed_dictionaries(
    {
        "text": st.one_of(
            st.sampled_from(["the proof", "history of science"]), st.text(min_size=1)
        ),
        "meta": st.fixed_dictionaries(
            {"domain": st.one_of(st.sampled_from(["math", "other", "a/b"]), _LABEL_TEXT)}
        ),
    }
)
_RECORD = st.one_of(
    st.fixed_dictionaries({"text": _TEXT, "meta": st.fixed_dictionaries({"domain": _LABEL})}),
    st.fixed_dictionaries({"text": _TEXT, "meta": st.one_of(st.none(), st.integers())}),
    st.fixed_dictionaries({"body": _TEXT}),
    # Raw bytes: invalid UTF-8, broken JSON, extra line breaks (but no magic number: a first
    # line starting with one makes a gzip, zstd or Parquet file, an input error of its own).
    st.binary(max_size=16).filter(lambda b: not b.startswith(_MAGIC)),
    st.just([1, 2]),  # JSON, not an object
)
_ENCODING = st.sampled_from(["utf-8"] * 4 + ["utf-16", "latin-1", "gzip", "no final newline"])
_POLICY = st.sampled_from(["skip", "fallback:other", "fail"])  # hypothesis favours the first


def _encode(records: list, encoding: str) -> bytes:
    lines = []
    for record in records:
        if isinstance(record, bytes):
            lines.append(record)
        else:
            text = json.dumps(record, ensure_ascii=False)
            codec = {"utf-16": "utf-16", "latin-1": "latin-1"}.get(encoding, "utf-8")
            errors = "surrogatepass" if codec == "utf-8" else "replace"
            lines.append(text.encode(codec, errors=errors))
    data = b"".join(line + b"\n" for line in lines)
    if encoding == "no final newline":
        data = data[:-1]
    return gzip.compress(data, mtime=0) if encoding == "gzip" else data


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    good=st.lists(_GOOD, max_size=4),  # so that runs succeed too
    hostile=st.lists(_RECORD, max_size=4),
    rng=st.randoms(use_true_random=False),
    encoding=_ENCODING,
    on_invalid=st.sampled_from(["skip", "fail"]),
    on_unknown=_POLICY,
    on_missing=_POLICY,
    extend=st.booleans(),
)
def test_fuzz_cli_accounts_for_every_record_or_names_file_and_line(
    tmp_path_factory, tiny_tokenizer_dir, capsys, good, hostile, rng, encoding, on_invalid,
    on_unknown, on_missing, extend
):  # fmt: skip
    records = good + hostile
    rng.shuffle(records)
    folder = tmp_path_factory.mktemp("fuzz")
    src = folder / ("in.jsonl.gz" if encoding == "gzip" else "in.jsonl")
    payload = _encode(records, encoding)
    src.write_bytes(payload)
    vocab = folder / "v.yaml"
    LabelVocabulary({"math": 0, "other": 1}).to_yaml(vocab)
    out = folder / "out"
    argv = argv_for(tiny_tokenizer_dir, [src], out / "ds", "--label-vocab", str(vocab))
    argv += ["--on-invalid", on_invalid, "--on-unknown", on_unknown, "--on-missing", on_missing]
    argv += ["--extend-vocab"] if extend else []
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    LabelVocabulary.from_yaml(vocab)  # still loads, whatever happened
    if code == 0:
        stats = stats_of(out / "ds")
        data = gzip.decompress(payload) if encoding == "gzip" else payload
        num_lines = len(data.split(b"\n")) - (1 if data.endswith(b"\n") or not data else 0)
        assert stats["documents_in"] == num_lines
        assert stats["documents_in"] == stats["documents_written"] + sum(stats["skipped"].values())
        assert final_outputs(out) == sorted(f"ds_text_document{s}" for s in SUFFIXES)
    else:
        assert code == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(rf"{re.escape(str(src))}:\d+: ", lines[0]) or (
            "no document to write" in lines[0]
        ), lines[0]
        assert final_outputs(out) == []  # no partial output, no temporary folder
