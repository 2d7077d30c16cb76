"""Preprocessing under faults: killed workers, SIGTERM and SIGKILL of the main process.

Each fault runs the command-line tool in a subprocess (with a timeout: a hang fails the test)
and checks: a clear error, nothing under the final names unless the output is complete and
equal to an uninterrupted run's, no temporary folder left behind where the process could clean
up, and a rerun that writes byte-identical outputs. Fault times are random with fixed seeds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from megatron_edl.data import preprocess_workers
from megatron_edl.data.label_sources import PreprocessError
from megatron_edl.data.preprocess import main
from megatron_edl.data.readers import Chunk
from tests.helpers.data_helpers import (  # noqa: F401 (fixtures)
    make_corpus,
    tiny_tokenizer_dir_fixture,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[3]
SUFFIXES = (".bin", ".idx", ".domains", ".stats.json")
NUM_RECORDS = 1000
# A label callable that is slow enough (about 1.5 s of work per worker) for faults to land
# mid-run, and that kills its own worker on the record whose text is "die".
LABELS_MODULE = """\
import os, signal, time

def slow(record):
    time.sleep(0.003)
    return record["meta"]["domain"]

def deadly(record):
    if record["text"] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return record["meta"]["domain"]
"""
TIMEOUT_S = 90


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer_dir):
    """``(folder, argv of a run, reference outputs)``: the reference is an uninterrupted run."""
    folder = tmp_path_factory.mktemp("faults")
    (folder / "edl_fault_labels.py").write_text(LABELS_MODULE)
    src = write_jsonl(folder / "in.jsonl", make_corpus(NUM_RECORDS, seed=11))
    argv = [
        "--input", str(src),
        "--output-prefix", str(folder / "out" / "ds"),
        "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tiny_tokenizer_dir),
        "--append-eod",
        "--domain-callable", "edl_fault_labels:slow",
        "--chunk-size", "16",
    ]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(folder)  # the callable's module is found from the working folder, as python -m
    try:
        assert main([*argv, "--workers", "1"]) == 0
    finally:
        os.chdir(cwd)
    reference = outputs(folder / "out")
    assert set(reference) == {f"ds_text_document{s}" for s in SUFFIXES}
    return folder, argv, reference


def outputs(out: Path) -> dict[str, bytes]:
    """Every entry of the output folder (temporary folders included) -> its bytes."""
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in out.iterdir()}


def start(folder: Path, argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_edl.data.preprocess", *argv],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the test can clean up every worker
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """Wait (with a timeout: a hang fails) and make sure no process of its group survives."""
    try:
        _, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"preprocessing hung for {TIMEOUT_S} s")
    deadline = time.monotonic() + 10
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = _group_alive(process.pid)
    if orphans:
        os.killpg(process.pid, signal.SIGKILL)
    assert not orphans, "worker processes outlived the main process"
    return process.returncode, err


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(c) for c in path.read_text().split()]
    except OSError:
        return []


def wait_until_writing(process: subprocess.Popen, out: Path) -> None:
    """Until the run's temporary folder exists (its inputs are checked, tokenizing starts)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not any(p.name.startswith(".ds.edl-tmp-") for p in out.glob(".*")):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.02)


def check_rerun(folder: Path, argv: list[str], reference: dict[str, bytes]) -> None:
    """A rerun (in this process) writes the reference outputs, and cleans up stale folders."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main([*argv, "--workers", "2"]) == 0
    finally:
        os.chdir(cwd)
    assert outputs(folder / "out") == reference


def check_final_names(out: Path, reference: dict[str, bytes]) -> None:
    """Final names: absent, or (the ``.idx`` is the commit point) the complete reference."""
    found = {n: b for n, b in outputs(out).items() if not n.startswith(".")}
    if "ds_text_document.idx" in found:
        assert found == reference
    else:
        assert "ds_text_document.stats.json" not in found


def fresh_output(folder: Path) -> Path:
    out = folder / "out"
    for p in out.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return out


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_worker_killed_on_a_record_is_an_error_naming_the_chunk(corpus):
    folder, argv, reference = corpus
    out = fresh_output(folder)
    src = write_jsonl(
        folder / "deadly.jsonl",
        [*make_corpus(40, seed=2), {"text": "die", "meta": {"domain": "math"}}],
    )
    argv_deadly = [a if a != "edl_fault_labels:slow" else "edl_fault_labels:deadly" for a in argv]
    argv_deadly[argv_deadly.index("--input") + 1] = str(src)
    code, err = finish(start(folder, [*argv_deadly, "--workers", "2"]))
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "error: a worker process was killed by SIGKILL while tokenizing chunk(s) "
    )
    assert "deadly.jsonl:33-41" in last  # chunks of 16 records: the chunk of line 41
    assert outputs(out) == {}  # no temporary folder, no output
    check_rerun(folder, argv, reference)


def _echo_chunk(task):
    """Stands in for the worker's encoder: returns the chunk's first line."""
    return task[0].first_line


@pytest.mark.timeout(TIMEOUT_S)
def test_pool_broken_between_a_result_and_the_next_submit(monkeypatch):
    """A worker killed after the last result was taken breaks the pool for the next ``submit``:
    that is the same one error (the random-point test below met this race), not a traceback."""
    monkeypatch.setattr(preprocess_workers, "_encode_in_worker", _echo_chunk)
    chunks = [Chunk("in.jsonl", 0, 1 + 16 * i, [b"{}"] * 16, 0) for i in range(3)]
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    try:
        results = preprocess_workers.ordered_map(pool, ((c, None) for c in chunks), window=1)
        assert next(results) == 1  # nothing is in flight now
        (worker,) = list(pool._processes)  # the pool's private table: no public accessor
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not pool._broken:  # the pool's manager thread notices the death
            assert time.monotonic() < deadline, "the pool never noticed its dead worker"
            time.sleep(0.01)
        with pytest.raises(PreprocessError) as raised:
            next(results)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    assert str(raised.value) == (
        "a worker process was killed by SIGKILL while tokenizing chunk(s) in.jsonl:17-32 "
        "(out of memory? try fewer --workers or a smaller --chunk-size); nothing was written"
    )


@pytest.mark.timeout(4 * TIMEOUT_S)
@pytest.mark.parametrize("seed", [0])
def test_worker_killed_at_a_random_point(corpus, seed):
    folder, argv, reference = corpus
    out = fresh_output(folder)
    process = start(folder, [*argv, "--workers", "2"])
    wait_until_writing(process, out)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    workers = children(process.pid)
    if workers:
        os.kill(random.Random(seed).choice(workers), signal.SIGKILL)
    code, err = finish(process)
    if code == 0:  # finished before the kill
        assert outputs(out) == reference
    else:
        assert code == 1
        assert "error: a worker process was killed by SIGKILL while tokenizing chunk(s) " in err
        assert outputs(out) == {}
    check_rerun(folder, argv, reference)


@pytest.mark.timeout(4 * TIMEOUT_S)
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_removes_temporaries(corpus, workers):
    folder, argv, reference = corpus
    out = fresh_output(folder)
    process = start(folder, [*argv, "--workers", str(workers)])
    wait_until_writing(process, out)
    time.sleep(random.Random(workers).uniform(0.0, 0.5))
    process.send_signal(signal.SIGTERM)
    code, err = finish(process)
    assert code in (0, 128 + signal.SIGTERM), err
    if code != 0:
        assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    assert not [p for p in outputs(out) if p.startswith(".")], "temporary folder left behind"
    check_final_names(out, reference)
    check_rerun(folder, argv, reference)


@pytest.mark.timeout(4 * TIMEOUT_S)
@pytest.mark.parametrize("seed", [0])
def test_sigkill_of_the_main_process(corpus, seed):
    folder, argv, reference = corpus
    out = fresh_output(folder)
    process = start(folder, [*argv, "--workers", "2"])
    wait_until_writing(process, out)
    time.sleep(random.Random(seed).uniform(0.0, 1.0))
    process.kill()
    code, _ = finish(process)  # the workers die with it
    assert code in (0, -signal.SIGKILL)
    check_final_names(out, reference)
    check_rerun(folder, argv, reference)  # also removes the killed run's temporary folder


def test_stats_of_the_reference_are_complete(corpus):
    _, _, reference = corpus
    stats = json.loads(reference["ds_text_document.stats.json"])
    assert stats["documents_in"] == stats["documents_written"] == NUM_RECORDS
