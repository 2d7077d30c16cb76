"""patches/: the patch applies to Megatron-LM's pretrain_gpt.py and trains like our launcher.

Needs a Megatron-LM checkout at the tag the patch names (``MEGATRON_LM_DIR``; skipped with the
reason otherwise: the upstream script is not on PyPI). Through the real training loop on CPU:

* the unpatched upstream script and our launcher with EDL off print the same losses, digit for
  digit (our launcher is stock when EDL is off);
* the patched upstream script with EDL off is the same again, and with EDL on it prints the same
  LM and EDL losses as our launcher with the same flags.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.megatron_runs import TINY_MOE_GPT, run_pretrain

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "patches" / "megatron-lm-core_v0.19.0-pretrain_gpt.patch"
CHECK = ROOT / "patches" / "check_patch.sh"
UPSTREAM = os.environ.get("MEGATRON_LM_DIR")
UPSTREAM_FILES = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py")

needs_upstream = pytest.mark.skipif(
    not UPSTREAM or not (Path(UPSTREAM) / "pretrain_gpt.py").is_file(),
    reason="set MEGATRON_LM_DIR to a Megatron-LM checkout at tag core_v0.19.0 (the upstream "
    "pretrain_gpt.py is not distributed on PyPI)",
)


def test_patch_header_names_the_tag_and_the_change():
    header = PATCH.read_text().split("\n---\n", 1)[0]
    assert "core_v0.19.0" in header and "install_edl" in header and "Apply:" in header


@needs_upstream
def test_patch_applies_to_upstream():
    result = subprocess.run(["bash", str(CHECK), UPSTREAM], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def upstream_copies(tmp_path_factory):
    """The upstream script as it is, and patched (``patch -p1``), in two directories."""
    dirs = {}
    for name in ("stock", "patched"):
        target = tmp_path_factory.mktemp(name)
        for file in UPSTREAM_FILES:
            shutil.copy(Path(UPSTREAM) / file, target / file)
        dirs[name] = target
    subprocess.run(
        ["patch", "--batch", "-p1", "-d", str(dirs["patched"]), "-i", str(PATCH)], check=True
    )
    return dirs


def _upstream(directory: Path, flags: list[str]):
    script = str(directory / "pretrain_gpt.py")
    return run_pretrain(
        1, flags, entry=(str(ROOT / "tests" / "helpers" / "run_upstream_script.py"), script)
    )


EDL_ON = ["--moe-edl-coeff", "0.5", "--moe-edl-mock-domains", "3"]


@needs_upstream
@pytest.mark.slow
def test_patched_upstream_trains_like_the_launcher(upstream_copies):
    flags = [*TINY_MOE_GPT, "--train-iters", "3"]
    ours_off = run_pretrain(1, flags)
    ours_on = run_pretrain(1, [*flags, *EDL_ON])
    stock = _upstream(upstream_copies["stock"], flags)
    patched_off = _upstream(upstream_copies["patched"], flags)
    patched_on = _upstream(upstream_copies["patched"], [*flags, *EDL_ON])
    for run in (ours_off, ours_on, stock, patched_off, patched_on):
        assert sorted(run.iterations) == [1, 2, 3], run.describe()
    for name in ("lm loss", "load_balancing_loss", "grad norm"):
        assert stock.losses(name) == ours_off.losses(name), name
        assert patched_off.losses(name) == ours_off.losses(name), name
    for name in ("lm loss", "edl_loss", "grad norm"):
        assert patched_on.losses(name) == ours_on.losses(name), name
    assert max(ours_on.losses("edl_loss")) > 0
