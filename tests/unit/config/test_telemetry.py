"""``megatron_edl.config.telemetry``: the dump directory is checked at start (issue 26, item 16).

The dumps create their directory at the first dump, after training started; an unusable one
must be refused before the model is built, naming the flag that set it.
"""

from __future__ import annotations

import argparse
import os

import pytest

from megatron_edl.config.telemetry import TelemetryConfig, check_writable_directory


def _args(**values) -> argparse.Namespace:
    defaults = dict(
        moe_edl_stats_interval=10, moe_edl_probe_dir=None, moe_edl_stats_dir=None,
        save=None, tensorboard_dir=None, skip_train=False, eval_iters=0,
    )  # fmt: skip
    return argparse.Namespace(**{**defaults, **values})


def test_a_new_directory_below_a_writable_one_passes(tmp_path) -> None:
    cfg = TelemetryConfig.from_args(_args(moe_edl_stats_dir=str(tmp_path / "a" / "b")))
    assert cfg.directory == str(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()  # nothing is created at start


@pytest.mark.parametrize(
    ("below", "flag", "message"),
    [
        ("", "--moe-edl-stats-dir", "the statistics directory is a file"),
        ("sub", "--moe-edl-stats-dir", "the statistics directory lies below the file"),
    ],
)
def test_a_file_in_the_way_names_the_flag(tmp_path, below, flag, message) -> None:
    blocker = tmp_path / "stats"
    blocker.write_text("not a folder")
    directory = str(blocker / below) if below else str(blocker)
    with pytest.raises(ValueError, match=f"{flag} {directory}: {message}"):
        TelemetryConfig.from_args(_args(moe_edl_stats_dir=directory))


def test_the_derived_directory_names_save(tmp_path) -> None:
    blocker = tmp_path / "ckpt"
    blocker.write_text("")
    with pytest.raises(ValueError, match="^--save .*routing_stats: .*lies below the file"):
        TelemetryConfig.from_args(_args(save=str(blocker)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only folder")
def test_a_read_only_folder_is_refused(tmp_path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable .*created in"):
            check_writable_directory(folder / "stats", "--moe-edl-stats-dir")
    finally:
        folder.chmod(0o700)
