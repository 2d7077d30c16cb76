"""The CPU compatibility layer (megatron_edl.cpu) and the launcher's CPU mode."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from megatron_edl import cpu
from tests.helpers.megatron_runs import LAYOUTS, TINY_MOE_GPT, run_pretrain


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_import_is_light():
    """`import megatron_edl` pulls in neither megatron, the CPU layer, nor TE/apex/modelopt."""
    proc = _python(
        "import sys, megatron_edl\n"
        "heavy = ('megatron.', 'megatron_edl.cpu', 'transformer_engine', 'apex', 'modelopt')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy) or m == 'megatron'))\n"
        "print(megatron_edl.__version__)"
    )
    assert proc.returncode == 0, proc.stderr
    loaded, version = proc.stdout.splitlines()
    assert loaded == "[]"
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)


def test_refuses_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(cpu.torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="refuses to load"):
        cpu.apply()
    assert cpu.applied() == []


def test_unknown_patch_name_is_named(monkeypatch):
    monkeypatch.setenv(cpu.DISABLE_ENV, "cuda_streams,no_such_patch")
    with pytest.raises(ValueError, match="no_such_patch"):
        cpu.apply()


def test_patches_are_documented():
    assert len(set(cpu.PATCH_NAMES)) == len(cpu.PATCHES)
    for patch in cpu.PATCHES:
        assert patch.layouts, patch.name
        for field in ("what", "why", "remove_when"):
            assert len(getattr(patch, field)) > 10, (patch.name, field)


def test_cpu_flags_are_injected_and_checked():
    argv = cpu.argv_with_cpu_flags(["--num-layers", "2"])
    assert argv[-2:] == ["--num-layers", "2"]
    assert argv[argv.index("--transformer-impl") + 1] == "local"
    good = argparse.Namespace(**{attr: value for _, _, attr, value in cpu.CPU_FLAGS})
    cpu.check_args(good)
    bad = argparse.Namespace(**{**vars(good), "transformer_impl": "transformer_engine"})
    with pytest.raises(ValueError, match="--transformer-impl local.*transformer_engine"):
        cpu.check_args(bad)


def test_help_works():
    """megatron-core 0.19.2's --help crashes on a '%' in one help string; ours does not."""
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_edl.pretrain_gpt", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--cpu" in proc.stdout
    assert "--moe-paged-stash-buffer-size-factor-cuda" in proc.stdout
    assert "--num-experts" in proc.stdout


def test_without_cpu_flag_and_gpu_the_launcher_says_what_to_do():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_edl.pretrain_gpt", "--num-layers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode != 0
    assert "Pass --cpu" in proc.stderr


# The run that exercises each patch's code: EP=2 with the alltoall dispatcher and a checkpoint
# save (RNG state, dist-ckpt), TP=2 with sequence parallelism, or DP=2 with full recompute.
PROBES = {
    "cuda_current_device": "ep2_alltoall_save",
    "cuda_streams": "ep2_alltoall_save",
    "cuda_rng_state": "ep2_alltoall_save",
    "device_redirect": "ep2_alltoall_save",
    "rng_tracker_fork": "ep2_alltoall_save",
    "allow_no_cuda": "ep2_alltoall_save",
    "device_count_in_init": "ep2_alltoall_save",
    "device_arch": "tp2_sp",
    "split_sizes_to_numpy": "ep2_alltoall_save",
    "checkpoint_rng_state": "dp2_recompute",
    "torch_norm_sequence_parallel": "tp2_sp",
}


def test_every_patch_has_a_probe_run():
    assert set(PROBES) == {p.name for p in cpu.PATCHES if not p.speed_only}


def _probe_flags(name: str, tmp_path) -> list[str]:
    flags = [*TINY_MOE_GPT, "--train-iters", "3"]
    if PROBES[name] == "tp2_sp":
        return [*flags, *LAYOUTS["tp2_sp"]]
    if PROBES[name] == "dp2_recompute":
        return [
            *flags, "--recompute-granularity", "full",
            "--recompute-method", "uniform", "--recompute-num-layers", "1",
        ]  # fmt: skip
    return [*flags, *LAYOUTS["ep2_alltoall"], "--save", str(tmp_path), "--save-interval", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROBES))
def test_patch_is_still_needed(name, tmp_path):
    """Ablation: with this one patch off, the run it covers must break.

    If this fails after a megatron-core upgrade, the patch is no longer needed: delete it (the
    same runs with every patch on pass in test_pretrain_cpu.py).
    """
    result = run_pretrain(
        2, _probe_flags(name, tmp_path), env={cpu.DISABLE_ENV: name}, timeout_s=180
    )
    broke = result.returncode != 0 or sorted(result.iterations) != [1, 2, 3]
    assert broke, f"CPU patch {name!r} looks unnecessary with this megatron-core: the run passed"
