"""Training under faults: a run killed by SIGKILL while saving resumes from the last complete
checkpoint with the losses of an uninterrupted run (EDL and telemetry on); a damaged
checkpoint is refused before the model is built."""

from __future__ import annotations

import re
import shutil
import types

import pytest

from megatron_edl.analysis.routing_stats import load_run
from megatron_edl.checkpoint import TRACKER, CheckpointError, check_resume_checkpoint
from tests.helpers.megatron_runs import TINY_MOE_GPT, run_pretrain, run_pretrain_killed

pytestmark = pytest.mark.slow

SCHEDULE = [
    "--train-iters", "6", "--lr-decay-iters", "6",
    "--moe-edl-coeff", "0.5", "--moe-edl-mock-domains", "3", "--moe-edl-stats-interval", "2",
]  # fmt: skip


def _load_args(folder):
    return types.SimpleNamespace(load=str(folder), ckpt_step=None, ckpt_format="torch_dist")


def test_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path):
    reference = run_pretrain(
        1, [*TINY_MOE_GPT, *SCHEDULE, "--save", str(tmp_path / "ref"), "--save-interval", "6"]
    )
    assert sorted(reference.iterations) == list(range(1, 7)), reference.describe()

    ckpt = tmp_path / "ckpt"
    save = ["--save", str(ckpt), "--save-interval", "2"]
    killed = run_pretrain_killed(
        1,
        [*TINY_MOE_GPT, *SCHEDULE, *save],
        kill_after=lambda line: re.search(r"saving checkpoint at iteration\s+4 ", line) is not None,
    )
    assert killed.returncode == -9 and sorted(killed.iterations) == [1, 2, 3, 4], killed.describe()
    assert (ckpt / TRACKER).read_text().strip() == "2"  # iteration 4 was not complete

    # The CUDA RNG tracker is empty on CPU: --no-load-rng (docs/cpu-mode.md).
    resumed = run_pretrain(
        1, [*TINY_MOE_GPT, *SCHEDULE, *save, "--load", str(ckpt), "--no-load-rng"]
    )
    assert resumed.returncode == 0, resumed.describe()
    assert sorted(resumed.iterations) == [3, 4, 5, 6], resumed.describe()
    for step in (3, 4, 5, 6):
        got, ref = resumed.iterations[step], reference.iterations[step]
        assert got["grad norm"] == ref["grad norm"], (step, got, ref)
    # The second logged iteration after a resume is Megatron's mean of two (its accumulator is
    # not reset; tests/e2e/test_pretrain_cpu.py): compare the others.
    for step in (3, 5, 6):
        for name in ("lm loss", "edl_loss"):
            got, ref = resumed.iterations[step][name], reference.iterations[step][name]
            assert got == pytest.approx(ref, rel=1e-6), (step, name, got, ref)
    steps = sorted({d.step for d in load_run(ckpt / "routing_stats")})
    assert steps == [2, 4, 6]
    check_resume_checkpoint(_load_args(ckpt))  # complete

    # Damaged copies of the complete checkpoint of iteration 6 are refused, one line each.
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    folder = damaged / "iter_0000006"
    shard = sorted(folder.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(
        CheckpointError, match=rf"iter_0000006 is incomplete: {shard.name} has 1000"
    ):
        check_resume_checkpoint(_load_args(damaged))
    refused = run_pretrain(1, [*TINY_MOE_GPT, *SCHEDULE, "--load", str(damaged), "--no-load-rng"])
    assert refused.returncode != 0 and not refused.iterations, refused.describe()
    assert f"{shard.name} has 1000 bytes" in refused.log
    assert "building GPT model" not in refused.log and "loading checkpoint" not in refused.log
    (folder / ".metadata").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=r"\.metadata is unreadable"):
        check_resume_checkpoint(_load_args(damaged))
    (folder / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: no \.metadata"):
        check_resume_checkpoint(_load_args(damaged))
    shutil.rmtree(folder)
    with pytest.raises(CheckpointError, match=r"iter_0000006 does not exist"):
        check_resume_checkpoint(_load_args(damaged))
