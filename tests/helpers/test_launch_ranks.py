"""The forked-rank launcher itself: torchrun's environment, the log, the return code, a hung group.

Run as ``python -m tests.helpers.test_launch_ranks MODE`` on each rank by the tests below.
"""

from __future__ import annotations

import os
import sys
import time

from tests.helpers.launch_ranks import launch_ranks

MODULE = "tests.helpers.test_launch_ranks"


def _rank(mode: str) -> None:
    rank = int(os.environ["RANK"])
    print(f"rank {rank} of {os.environ['WORLD_SIZE']} local {os.environ['LOCAL_RANK']}")
    print(f"marker {os.environ.get('LAUNCH_TEST_MARKER')} home {os.environ.get('HOME')}")
    print(f"cwd {os.getcwd()} argv {sys.argv[1:]}")
    if mode == "fail_rank1" and rank == 1:
        sys.exit(3)
    if mode == "fail_rank1":
        time.sleep(600)  # rank 0 waits for a peer that is gone, as in a collective


def test_every_rank_gets_torchruns_environment_and_exactly_env(tmp_path):
    env = {"LAUNCH_TEST_MARKER": "m1", "PATH": os.environ["PATH"]}
    rc, log = launch_ranks(3, MODULE, ["ok", "x"], env, timeout_s=60, cwd=tmp_path)
    assert rc == 0, log
    lines = [line for line in log.splitlines() if line.startswith("rank ")]
    assert lines == [f"rank {r} of 3 local {r}" for r in range(3)]  # rank order
    assert log.count("marker m1 home None") == 3  # the caller's HOME did not leak in
    assert log.count(f"cwd {tmp_path} argv ['ok', 'x']") == 3


def test_a_failed_rank_gives_its_status_and_stops_the_group():
    start = time.monotonic()
    rc, log = launch_ranks(2, MODULE, ["fail_rank1"], {}, timeout_s=120)
    assert rc == 3, log
    assert time.monotonic() - start < 60  # the sleeping rank was stopped, not waited for


def test_a_run_past_its_timeout_is_killed():
    rc, log = launch_ranks(1, MODULE, ["fail_rank1"], {}, timeout_s=3)
    assert rc == -9 and "[timed out after 3s]" in log, log


if __name__ == "__main__":
    _rank(sys.argv[1])
