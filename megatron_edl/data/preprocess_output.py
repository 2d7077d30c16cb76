"""Output side of the preprocessor: dataset writers, temporary folders, signals, the commit.

Outputs are written under a temporary folder next to the output prefix and moved into place
by :func:`commit_dataset` (the ``.idx`` last) while SIGINT/SIGTERM are held back
(:func:`signals_deferred`); see ``megatron_edl.data.preprocess`` for the fault model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# The preprocessor's logger: its messages read as the CLI's, as before the split.
logger = logging.getLogger("megatron_edl.data.preprocess")


class DatasetWriter:
    """One json key's output: builder, ids and per-domain counts, under a temporary prefix."""

    def __init__(self, tmp_prefix: str, final_prefix: str, dtype: np.dtype) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.tmp_prefix = tmp_prefix
        self.final_prefix = final_prefix
        self.builder = IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype.type)
        self.domain_ids = array("i")
        self.tokens_written = 0
        self.domain_documents: Counter[int] = Counter()
        self.domain_tokens: Counter[int] = Counter()

    def add(self, tokens: np.ndarray, label_id: int | None) -> None:
        n = len(tokens)
        self.builder.add_document(tokens, [n])
        self.tokens_written += n
        if label_id is not None:
            self.domain_ids.append(label_id)
            self.domain_documents[label_id] += 1
            self.domain_tokens[label_id] += n

    def close(self) -> None:
        """Close the token file, ignoring a failing flush (disk full): clean-up must go on.

        The file is closed all the same (``io`` closes the descriptor after a failed flush);
        it lies in the temporary folder, which the caller removes next.
        """
        with contextlib.suppress(OSError):
            self.builder.data_file.close()


def tmp_dir_prefix(base: str, pid: int) -> str:
    """Name prefix of a run's temporary folder: host and process id find stale ones."""
    return f".{base}.edl-tmp-{socket.gethostname()}-{pid}-"


def remove_stale_temporaries(out_dir: str, base: str) -> None:
    """Remove temporary folders of earlier runs on this host whose process no longer exists.

    A run stopped by SIGKILL (or a power loss) cannot clean up; its folder holds partial
    outputs only (nothing under the final names depends on it).
    """
    head = tmp_dir_prefix(base, 0)[: -len("0-")]
    for name in os.listdir(out_dir):
        pid_text = name[len(head) :].split("-", 1)[0] if name.startswith(head) else ""
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            logger.warning("Removing %s, left by an interrupted run", os.path.join(out_dir, name))
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):  # noqa: N818 (like KeyboardInterrupt: not an Exception)
    """The run was stopped by SIGINT or SIGTERM; raised by :func:`main`'s handler."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_DEFERRED_SIGNALS: list[int] | None = None  # during a commit: the signals that arrived


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold :func:`main`'s SIGINT and SIGTERM back for the block, then raise the first.

    Its handler (:func:`raise_interrupted`) records a signal that arrives meanwhile instead of
    raising, whichever thread the operating system delivered it to.
    """
    global _DEFERRED_SIGNALS
    _DEFERRED_SIGNALS = []
    try:
        yield
    finally:
        arrived, _DEFERRED_SIGNALS = _DEFERRED_SIGNALS, None
    if arrived:
        raise Interrupted(arrived[0])


def raise_interrupted(signum: int, frame: object) -> None:
    if _DEFERRED_SIGNALS is not None:
        _DEFERRED_SIGNALS.append(signum)
        return
    raise Interrupted(signum)


def commit_dataset(tmp_prefix: str, final_prefix: str, *, with_sidecar: bool) -> None:
    """Move a finished dataset into place; the ``.idx`` goes last (the commit point).

    An old ``.idx`` under the final name is removed first, so no reader ever pairs an old index
    with new tokens; a new sidecar next to an old index fails its fingerprint check. Only
    SIGKILL (or a crash) between these renames leaves a new ``.bin`` without ``.idx``: no
    dataset, until a rerun replaces it.
    """
    Path(f"{final_prefix}.idx").unlink(missing_ok=True)
    os.replace(f"{tmp_prefix}.bin", f"{final_prefix}.bin")
    if with_sidecar:
        os.replace(f"{tmp_prefix}.domains", f"{final_prefix}.domains")
    else:
        Path(f"{final_prefix}.domains").unlink(missing_ok=True)  # stale: from an older run
    os.replace(f"{tmp_prefix}.idx", f"{final_prefix}.idx")
    os.replace(f"{tmp_prefix}.stats.json", f"{final_prefix}.stats.json")
