"""The label vocabulary file (megatron_edl.data.vocabulary): name rules, round trip, lock.

Issue 26: names with characters the YAML file cannot carry back (DEL, NEL, line separators) were
accepted, so ``--extend-vocab`` wrote a vocabulary that the next run could not read; invisible
characters (NUL, ESC, zero-width) were accepted too. A vocabulary that is a folder or not UTF-8
gave a traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_edl.data.errors import DataError
from megatron_edl.data.vocabulary import LabelVocabulary, VocabularyLock, label_name_problem

# Each was accepted before issue 26; the first three broke the file's round trip.
UNPRINTABLE = {
    "DEL": "\x7f",
    "NEL": "\x85",
    "LINE SEPARATOR": "\u2028",
    "PARAGRAPH SEPARATOR": "\u2029",
    "NUL": "\x00",
    "ESC": "\x1b",
    "TAB": "\t",
    "ZERO WIDTH SPACE": "\u200b",
    "ZERO WIDTH JOINER": "\u200d",
    "BOM": "\ufeff",
    "PRIVATE USE": "\ue000",
    "NONCHARACTER": "\uffff",
}


@pytest.mark.parametrize("char", UNPRINTABLE.values(), ids=UNPRINTABLE.keys())
def test_unprintable_characters_are_no_label_names(tmp_path, char):
    name = f"en/sci{char}ence"
    problem = label_name_problem(name)
    assert problem is not None and f"U+{ord(char):04X}" in problem
    with pytest.raises(DataError, match="non-printable character"):
        LabelVocabulary().add(name)
    # A file holding one (written by an older version, or by hand) is refused by name.
    path = tmp_path / "v.yaml"
    path.write_text('labels:\n  "en/sci' + f"\\u{ord(char):04x}" + 'ence": 0\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"v\.yaml: label name .* non-printable"):
        LabelVocabulary.from_yaml(path)


def test_printable_names_keep_working():
    for name in ("en/science", "Pile-CC", "Ubuntu IRC", "zh/历史", "émoji/🙂", "a b/c d"):
        assert label_name_problem(name) is None, name


@settings(max_examples=200, deadline=None)
@given(names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6, unique=True))
def test_every_valid_name_round_trips_through_the_file(tmp_path_factory, names):
    valid = [n for n in names if label_name_problem(n) is None]
    vocab = LabelVocabulary()
    for name in valid:
        vocab.add(name)
    path = tmp_path_factory.mktemp("rt") / "v.yaml"
    vocab.to_yaml(path)
    assert LabelVocabulary.from_yaml(path).as_dict() == vocab.as_dict()


def test_a_folder_or_non_utf8_vocabulary_is_one_named_error(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(DataError, match=r"dir\.yaml: is a folder, not a label vocabulary"):
        LabelVocabulary.from_yaml(tmp_path / "dir.yaml")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("labels:\n  caf\xe9: 0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.yaml: the label vocabulary is not UTF-8"):
        LabelVocabulary.from_yaml(latin)
    with pytest.raises(FileNotFoundError):
        LabelVocabulary.from_yaml(tmp_path / "absent.yaml")


def _hold_lock(path: str, ready: str, seconds: float) -> None:
    with VocabularyLock(path):
        open(ready, "w").close()
        time.sleep(seconds)
    os._exit(0)


def test_lock_excludes_another_process_and_times_out_by_name(tmp_path):
    path = str(tmp_path / "v.yaml")
    ready = str(tmp_path / "ready")
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(path, ready, 1.5))
    holder.start()
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ready) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.path.exists(ready), "the lock holder did not start"
        with pytest.raises(DataError, match=r"v\.yaml\.lock: another run held"):
            VocabularyLock(path, timeout_s=0.2).acquire()
        start = time.monotonic()
        lock = VocabularyLock(path, timeout_s=30)
        with lock:  # waits for the holder to let go
            assert not holder.is_alive() or time.monotonic() - start > 0.5
        lock.close()
    finally:
        holder.join(timeout=30)
        if holder.is_alive():
            holder.kill()
    assert holder.exitcode == 0


def test_lock_file_in_a_missing_folder_is_one_named_error(tmp_path):
    with pytest.raises(DataError, match=r"cannot create the lock file .*nope/v\.yaml\.lock"):
        VocabularyLock(tmp_path / "nope" / "v.yaml")
