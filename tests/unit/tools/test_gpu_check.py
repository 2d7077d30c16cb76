"""``tools/gpu_check.py`` without running it: the budget adds up, the flags follow the machine's
imports, the rehearsal differs from the GPU run only in device and sizes, and the training sizes
are what the check says (parameters counted by Megatron, memory within one 80 GB GPU).

The rehearsal itself (every step's command on CPU) runs in ``tests/e2e/test_gpu_check.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _load(name: str):
    """A script of tools/ as a module (registered first: its dataclasses need that)."""
    module_name = f"_tools_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


gpu_check = _load("gpu_check")
PROFILES = [
    gpu_check.Machine(te=te, apex_grad_accum=apex, fused_softmax=softmax)
    for te, apex, softmax in itertools.product((False, True), repeat=3)
]
TORCH_ONLY = gpu_check.Machine(te=False, apex_grad_accum=False, fused_softmax=False)
NGC = gpu_check.Machine(te=True, apex_grad_accum=True, fused_softmax=True)


def _ids(machine) -> str:
    return "-".join(k for k, v in vars(machine).items() if v) or "torch-only"


@pytest.mark.parametrize("machine", PROFILES, ids=_ids)
def test_budget_adds_up_to_eight_minutes(machine):
    steps = gpu_check.plan("python", machine, rehearsal=False)
    assert gpu_check.TOTAL_BUDGET_S <= 8 * 60
    assert gpu_check.budget(steps) <= gpu_check.TOTAL_BUDGET_S, [(s.name, s.limit_s) for s in steps]
    for step in steps:
        assert step.limit_s > 0
        if "--timeout" in step.argv:  # the training steps: a run's limit inside the step's
            per_run = float(step.argv[step.argv.index("--timeout") + 1])
            assert 0 < per_run < step.limit_s, step.name


@pytest.mark.parametrize("machine", PROFILES, ids=_ids)
def test_flags_follow_what_the_machine_imports(machine):
    flags = gpu_check.model_flags(machine)
    assert flags[:5] == ["--bf16", "--moe-router-dtype", "fp32", "--transformer-impl", "local"]
    assert ("--no-rope-fusion" in flags) is not machine.te
    assert ("--no-gradient-accumulation-fusion" in flags) is not machine.apex_grad_accum
    assert ("--no-masked-softmax-fusion" in flags) is not machine.fused_softmax
    names = [s.name for s in gpu_check.plan("python", machine, rehearsal=False)]
    assert ("training_te" in names) is machine.te
    if machine.te:
        te = gpu_check.model_flags(machine, te_spec=True)
        assert te[3:7] == [
            "--transformer-impl", "transformer_engine",
            "--moe-grouped-gemm", "--moe-permute-fusion",
        ]  # fmt: skip
    else:
        with pytest.raises(ValueError, match="te_spec=True needs Transformer Engine"):
            gpu_check.model_flags(machine, te_spec=True)


def test_torch_only_flags_are_those_the_cpu_path_sets():
    """The launcher's --cpu sets --no-rope-fusion and --no-gradient-accumulation-fusion for the
    same reasons (no TE, no apex): the check derives both on a torch-only machine."""
    from megatron_edl.cpu import CPU_FLAGS

    flags = gpu_check.model_flags(TORCH_ONLY)
    for flag in ("--no-rope-fusion", "--no-gradient-accumulation-fusion"):
        assert flag in [f for f, _, _, _ in CPU_FLAGS] and flag in flags
    assert "--transformer-impl" in flags and flags[flags.index("--transformer-impl") + 1] == "local"


@pytest.mark.parametrize("machine", PROFILES, ids=_ids)
def test_the_rehearsal_runs_the_same_commands_at_a_tiny_size_on_cpu(machine):
    gpu = gpu_check.plan("python", machine, rehearsal=False)
    cpu = gpu_check.plan("python", machine, rehearsal=True)
    assert [s.name for s in gpu] == [s.name for s in cpu]
    for g, c in zip(gpu, cpu, strict=True):
        assert (g.entry, g.shared) == (c.entry, c.shared), g.name
        if g.name != "tests":
            assert g.size[:2] == ("--device", "cuda") and c.size[:2] == ("--device", "cpu")
        assert c.argv[: len(c.argv) - len(c.size)] == g.argv[: len(g.argv) - len(g.size)]


def _megatron_args(flags: list[str], monkeypatch, *, te: bool):
    """Megatron's parse_args + validate_args on ``flags`` for one GPU (rank 0 of 1)."""
    import torch
    from megatron.training import arguments
    from megatron.training.arguments import parse_args, validate_args

    from megatron_edl.integration.install import extra_args_provider

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt", *flags])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))  # H100
    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)
    if te:  # TE's version checks, as on a machine with TE 2.x installed
        monkeypatch.setattr(arguments, "is_te_min_version", lambda *_, **__: True)
    args = parse_args(extra_args_provider)
    args.world_size, args.rank = 1, 0
    validate_args(args, {"tokenizer_type": "NullTokenizer"})
    return args


def _gpu_run_flags(step) -> tuple[list[str], int]:
    """The Megatron flags of ``step``'s EDL run (benchmark_training's composition) and its
    number of iterations."""
    from megatron_edl.benchmarks.runs import TINY_MOE_GPT

    bench = _load("benchmark_training")
    argv = step.argv
    extra = [argv[i + 1] for i, a in enumerate(argv) if a == "--extra"]
    iters = argv[argv.index("--iters") + 1]
    flags = [*TINY_MOE_GPT, *shlex.split(" ".join(extra)), *bench.EDL_FLAGS]
    flags += ["--train-iters", iters, "--log-interval", "1", "--log-memory-interval", iters]
    return flags, int(iters)


@pytest.mark.parametrize("machine", [TORCH_ONLY, NGC], ids=_ids)
def test_gpu_training_flags_pass_megatron_argument_checks(machine, monkeypatch):
    """The GPU-size runs cannot be rehearsed on CPU at their size (nor the TE pair at all):
    Megatron's argument validation runs on their exact flags here."""
    steps = [
        s for s in gpu_check.plan("python", machine, rehearsal=False) if s.name.startswith("train")
    ]
    assert {s.name for s in steps} >= {"training_small", "training_large"}
    for step in steps:
        flags, iters = _gpu_run_flags(step)
        args = _megatron_args(flags, monkeypatch, te=step.name == "training_te")
        assert args.bf16 and args.moe_router_dtype == "fp32"
        assert args.train_iters == iters and args.log_memory_interval == iters
        if step.name == "training_te":
            assert args.transformer_impl == "transformer_engine"
            assert args.moe_grouped_gemm and args.moe_permute_fusion


def test_the_large_size_has_500m_parameters_32_experts_and_fits_one_80gb_gpu(monkeypatch):
    from megatron.training.theoretical_memory_usage import report_theoretical_memory

    large = next(s for s in gpu_check.SIZES if s.name == "large")
    total, active = large.parameters()
    assert total >= 500e6 and large.experts >= 32 and active < total
    step = next(
        s for s in gpu_check.plan("python", TORCH_ONLY, rehearsal=False)
        if s.name == "training_large"
    )  # fmt: skip
    flags, _ = _gpu_run_flags(step)
    args = _megatron_args(flags, monkeypatch, te=False)
    args.padded_vocab_size = large.vocab  # 1024, a multiple of 128: no padding
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        weights_mb, activations_mb, _ = report_theoretical_memory(
            args, num_microbatches=large.global_batch // large.micro_batch, verbose=True
        )
    text = out.getvalue()
    megatron_total = float(
        re.search(r"Total number of parameters in billions:\s*([\d.]+)", text)[1]
    )
    megatron_active = float(re.search(r"active parameters in billions:\s*([\d.]+)", text)[1])
    assert megatron_total == pytest.approx(total / 1e9, abs=0.005), text
    assert megatron_active == pytest.approx(active / 1e9, abs=0.005), text
    # The local spec's unfused attention keeps the bf16 scores and probabilities of one
    # micro-batch per layer (b * heads * s^2 each), which Megatron's estimate leaves out.
    scores_mb = 2 * 2 * large.micro_batch * large.heads * large.seq**2 * large.layers / 2**20
    assert weights_mb + activations_mb + scores_mb < 0.5 * 80 * 1024, (weights_mb, activations_mb)


def test_step_records_say_what_they_cover():
    for step in gpu_check.plan("python", NGC, rehearsal=False):
        assert step.covers and step.what, step.name
        if step.name.startswith("training"):
            assert gpu_check.ONE_GPU in step.covers
            assert "peak memory" in step.covers
