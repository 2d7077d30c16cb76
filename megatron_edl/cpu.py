"""CPU compatibility layer: run megatron-core 0.19 and ``megatron.training.pretrain`` on CPU/gloo.

Megatron-Core hard-codes CUDA in places that have nothing to do with the math (stream objects,
``device=torch.cuda.current_device()`` allocations, RNG bookkeeping, a ``cuda`` requirement in
``initialize_megatron``). This module patches exactly those places so that the *unmodified*
training loop (``pretrain`` -> ``train`` -> ``train_step`` -> ``forward_backward_func``, DDP or the
distributed optimizer, ``finalize_model_grads``, MoE aux-loss scaling and logging, checkpointing)
runs on a machine without a GPU. It exists for tests, CI and the CPU quickstart only.

Rules:

* It is never imported by ``import megatron_edl`` nor on a GPU run; :func:`apply` refuses to run
  when CUDA is available.
* Every patch is an entry of :data:`PATCHES` that says what it changes, why, which parallel
  layouts need it and what would let it go. Patches can be switched off one by one, by name,
  through :func:`apply`'s ``disable`` argument or the ``MEGATRON_EDL_CPU_DISABLE`` environment
  variable (comma-separated names). ``tests/unit/test_cpu.py`` switches each one off in turn and
  reports which are still needed, so a megatron-core upgrade shows what broke and what can go.
* Only what CPU needs is here. Fixes that a GPU run needs as well (for instance the wheel's
  missing dataset-helper Makefile, or the ``%`` in a 0.19.2 help string) live in
  :mod:`megatron_edl.integration.workarounds`.

Known semantic differences from a GPU run (harmless for the tests, documented in docs/cpu-mode.md):
the model-parallel RNG tracker is a no-op, so dropout inside TP regions draws from the one CPU
generator; and timers measure CPU wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode

DISABLE_ENV = "MEGATRON_EDL_CPU_DISABLE"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CpuPatch:
    """One documented monkeypatch of torch/megatron for CPU runs."""

    name: str
    """Stable identifier, used to switch the patch off (``MEGATRON_EDL_CPU_DISABLE``)."""
    what: str
    """What is replaced."""
    why: str
    """The failure without it (file and call site in megatron-core 0.19.2)."""
    layouts: str
    """Which runs need it: ``"all"`` or a condition such as ``"TP>1"``."""
    speed_only: bool = False
    """True if runs succeed without it, only slower (the ablation test skips such patches)."""
    remove_when: str
    """What change upstream (or here) would make the patch unnecessary."""
    apply: Callable[[], None]


class _NoOpStream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: every method is a no-op.

    Methods return another stand-in, so chains such as ``stream.record_event().synchronize()``
    work.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: _NoOpStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device arguments (``device=0``).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device requests to CPU for every torch call made in this thread."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads.py asserts param.grad.type() == 'torch.cuda.FloatTensor'.
            cpu_type = func(*args)
            return cpu_type.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = torch.device("cpu")
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple(
                torch.device("cpu") if i > 0 and _is_cuda_device(a) else a
                for i, a in enumerate(args)
            )
        return func(*args, **kwargs)


def _patch_no_torch_compile() -> None:
    import torch._dynamo

    torch._dynamo.config.disable = True


def _patch_cuda_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda *args, **kwargs: None


def _patch_cuda_streams() -> None:
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NoOpStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _patch_cuda_rng_state() -> None:
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda *args, **kwargs: None


def _patch_checkpoint_rng_state() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None


_MODE: list[_CudaToCpuMode] = []


def _patch_device_redirect() -> None:
    mode = _CudaToCpuMode()
    mode.__enter__()
    _MODE.append(mode)


def _patch_rng_tracker_fork() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.CudaRNGStatesTracker.fork = lambda self, name="model-parallel-rng": (
        contextlib.nullcontext()
    )


def _patch_allow_no_cuda() -> None:
    from megatron.training import initialize, training

    training.initialize_megatron = functools.partial(
        initialize.initialize_megatron, allow_no_cuda=True
    )


def _patch_device_count_in_init() -> None:
    from megatron.training import initialize

    original = initialize._initialize_distributed

    @functools.wraps(original)
    def _initialize_distributed(*args, **kwargs):
        saved = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.device_count = saved

    initialize._initialize_distributed = _initialize_distributed


def _patch_device_arch() -> None:
    from megatron.training import arguments

    # Hopper: the value only selects defaults that are irrelevant on CPU.
    arguments.get_device_arch_version = lambda: 9
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def _patch_split_sizes_to_numpy() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Same contract as the original for non-tensors (ints, None): returned unchanged.
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_torch_norm_sequence_parallel() -> None:
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        norm = original_new(
            cls, dataclasses.replace(config, sequence_parallel=False), *args, **kwargs
        )
        for param in norm.parameters():
            # Same tag TE/apex norms carry: finalize_model_grads all-reduces these grads over TP.
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch(
        name="no_torch_compile",
        what="torch._dynamo is disabled: functions megatron wraps with torch.compile "
        "(megatron/core/jit.py jit_fuser) run eagerly",
        why="on CPU, inductor compiles C++ kernels for the fused bias-SwiGLU/dropout-add "
        "warm-up in initialize.set_jit_fusion_options: ~27 s per process on 2 cores, longer "
        "than the whole tiny run; numerics are those of the eager functions",
        layouts="all (speed only)",
        remove_when="compilation on CPU becomes cheap, or megatron skips the warm-up on CPU",
        speed_only=True,
        apply=_patch_no_torch_compile,
    ),
    CpuPatch(
        name="cuda_current_device",
        what="torch.cuda.current_device() returns the CPU device; torch.cuda.set_device is a no-op",
        why="megatron allocates with device=torch.cuda.current_device() everywhere "
        "(first: training/initialize.py MoEAuxLossAutoScaler.set_loss_scale; router gating "
        "moves a CPU router weight to it) -> 'Found no NVIDIA driver'",
        layouts="all",
        remove_when="megatron-core takes the device from its parameters/inputs",
        apply=_patch_cuda_device,
    ),
    CpuPatch(
        name="cuda_streams",
        what="torch.cuda.Stream/Event/current_stream/stream/synchronize become no-ops",
        why="MoE token dispatchers and the pipeline schedules create streams and events; "
        "Timers call torch.cuda.synchronize (core/timers.py)",
        layouts="all",
        remove_when="megatron-core guards stream use with torch.cuda.is_available()",
        apply=_patch_cuda_streams,
    ),
    CpuPatch(
        name="cuda_rng_state",
        what="torch.cuda.get_rng_state returns the CPU state; set_rng_state is a no-op",
        why="the rerun state machine (default --rerun-mode validate_results) and checkpoint "
        "saving read the CUDA RNG state (rerun_state_machine.py _save_state, "
        "checkpointing.py get_rng_state)",
        layouts="all",
        remove_when="megatron-core skips CUDA RNG state when no device is present",
        apply=_patch_cuda_rng_state,
    ),
    CpuPatch(
        name="checkpoint_rng_state",
        what="megatron.core.tensor_parallel.random._get_cuda_rng_state returns the CPU state; "
        "_set_cuda_rng_state is a no-op",
        why="activation recompute (tensor_parallel.checkpoint, CheckpointWithoutOutput) saves "
        "and restores the CUDA RNG state through torch.cuda.random.get_rng_state -> "
        "'Found no NVIDIA driver' (random.py _get_all_rng_states)",
        layouts="activation recompute (--recompute-granularity full|selective)",
        remove_when="megatron-core skips the CUDA RNG state when no device is present",
        apply=_patch_checkpoint_rng_state,
    ),
    CpuPatch(
        name="device_redirect",
        what="a global TorchFunctionMode rewrites device='cuda'/cuda:N/int device arguments to "
        "CPU, makes Tensor.cuda()/pin_memory() identities, and makes Tensor.type() report "
        "torch.cuda.* types",
        why="~100 hard-coded device='cuda' and .cuda() sites in megatron.training and "
        "megatron.core (loss reduction, grad norm, timestamps, causal mask); clip_grads.py "
        "asserts grad.type() == 'torch.cuda.FloatTensor'",
        layouts="all",
        remove_when="megatron-core derives devices from tensors instead of hard-coding cuda",
        apply=_patch_device_redirect,
    ),
    CpuPatch(
        name="rng_tracker_fork",
        what="CudaRNGStatesTracker.fork is a null context",
        why="the CUDA RNG tracker is never seeded on CPU (_set_random_seed skips "
        "model_parallel_cuda_manual_seed without devices), so fork() raises "
        "'cuda rng state model-parallel-rng is not added' (dot_product_attention.py)",
        layouts="all",
        remove_when="megatron-core seeds a CPU generator in the tracker when no GPU is present",
        apply=_patch_rng_tracker_fork,
    ),
    CpuPatch(
        name="allow_no_cuda",
        what="megatron.training.training.initialize_megatron gets allow_no_cuda=True",
        why="pretrain() does not pass allow_no_cuda -> 'Megatron requires CUDA.' "
        "(initialize.py initialize_megatron)",
        layouts="all",
        remove_when="pretrain() forwards allow_no_cuda",
        apply=_patch_allow_no_cuda,
    ),
    CpuPatch(
        name="device_count_in_init",
        what="torch.cuda.device_count() reports 1 during initialize._initialize_distributed",
        why="mpu.initialize_model_parallel only runs if device_count > 0 -> "
        "'pipeline_model parallel group is not initialized'",
        layouts="all",
        remove_when="_initialize_distributed initialises model parallelism without devices",
        apply=_patch_device_count_in_init,
    ),
    CpuPatch(
        name="device_arch",
        what="megatron.training.arguments.get_device_arch_version returns 9 (Hopper)",
        why="validate_args queries torch.cuda.get_device_properties when TP or CP > 1 "
        "(arguments.py)",
        layouts="TP>1 or CP>1",
        remove_when="validate_args tolerates the absence of a device",
        apply=_patch_device_arch,
    ),
    CpuPatch(
        name="split_sizes_to_numpy",
        what="moe_utils.maybe_move_tensor_to_cpu(as_numpy=True) always returns numpy",
        why="the alltoall dispatcher's split sizes become numpy only if tensor.is_cuda; on CPU "
        "they stay tensors and all_to_all_single rejects them (mappings.py)",
        layouts="EP>1 or TP>1 with the alltoall dispatcher",
        remove_when="maybe_move_tensor_to_cpu converts CPU tensors when as_numpy=True",
        apply=_patch_split_sizes_to_numpy,
    ),
    CpuPatch(
        name="torch_norm_sequence_parallel",
        what="WrappedTorchNorm is built without sequence_parallel and its parameters are tagged "
        "sequence_parallel=True",
        why="without TE/apex the torch norm asserts 'sequence parallel not supported', yet MoE "
        "with TP>1 requires SP; the tag makes finalize_model_grads all-reduce the norm grads "
        "over TP, as for TE norms (torch_norm.py)",
        layouts="TP>1",
        remove_when="WrappedTorchNorm supports sequence parallelism",
        apply=_patch_torch_norm_sequence_parallel,
    ),
)

PATCH_NAMES: tuple[str, ...] = tuple(p.name for p in PATCHES)

_APPLIED: list[str] = []


def disabled_from_env() -> set[str]:
    """Patch names listed in ``MEGATRON_EDL_CPU_DISABLE`` (validated)."""
    raw = os.environ.get(DISABLE_ENV, "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    unknown = sorted(names - set(PATCH_NAMES))
    if unknown:
        raise ValueError(
            f"{DISABLE_ENV}={raw!r} names unknown CPU patches {unknown}; "
            f"known: {', '.join(PATCH_NAMES)}"
        )
    return names


def apply(disable: Iterable[str] = ()) -> list[str]:
    """Apply every patch not in ``disable`` (nor in ``MEGATRON_EDL_CPU_DISABLE``); idempotent.

    Returns:
        The names of the patches now active, in application order.

    Raises:
        RuntimeError: if CUDA is available (this layer is for CPU-only machines).
        ValueError: if a disabled name is not a known patch.
    """
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_edl.cpu refuses to load on a machine where CUDA is available: "
            "run without --cpu to train on the GPU"
        )
    disable = set(disable) | disabled_from_env()
    unknown = sorted(disable - set(PATCH_NAMES))
    if unknown:
        raise ValueError(f"unknown CPU patches {unknown}; known: {', '.join(PATCH_NAMES)}")
    for patch in PATCHES:
        if patch.name in disable or patch.name in _APPLIED:
            continue
        patch.apply()
        _APPLIED.append(patch.name)
    return list(_APPLIED)


def applied() -> list[str]:
    """Names of the patches applied in this process."""
    return list(_APPLIED)


# Flags the launcher's CPU mode sets (never the user): (flag, value or None for a switch,
# attribute it sets, the value the attribute must have). Each was shown necessary by removing it.
CPU_FLAGS: tuple[tuple[str, str | None, str, object], ...] = (
    ("--transformer-impl", "local", "transformer_impl", "local"),
    ("--distributed-backend", "gloo", "distributed_backend", "gloo"),
    ("--no-rope-fusion", None, "apply_rope_fusion", False),
    ("--no-persist-layer-norm", None, "no_persist_layer_norm", True),
    ("--no-gradient-accumulation-fusion", None, "gradient_accumulation_fusion", False),
    # Not strictly required, but without the CUDA RNG tracker TP shards would otherwise be
    # initialised from the same seed.
    ("--use-cpu-initialization", None, "use_cpu_initialization", True),
)


def argv_with_cpu_flags(argv: list[str]) -> list[str]:
    """``argv`` with :data:`CPU_FLAGS` prepended; a user's conflicting value is caught after
    parsing (:func:`check_args`)."""
    injected: list[str] = []
    for flag, value, _, _ in CPU_FLAGS:
        injected += [flag] if value is None else [flag, value]
    return injected + argv


def check_args(args) -> None:
    """Raise ``ValueError`` naming the flag if parsed args contradict CPU mode."""
    for flag, value, attr, required in CPU_FLAGS:
        got = getattr(args, attr)
        if got != required:
            shown = flag if value is None else f"{flag} {value}"
            raise ValueError(f"--cpu needs {shown}, but the command line sets {attr}={got!r}")
