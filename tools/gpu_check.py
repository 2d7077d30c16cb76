#!/usr/bin/env python
"""One-call GPU check: install, then tests, benchmarks and training on one CUDA GPU.

For a machine with one H100/H200, CUDA and torch, no network and no megatron-core: the missing
Python packages come from a wheel folder built on any machine with PyPI access
(``make gpu-wheelhouse``: ``--build-wheelhouse DIR``, at most 60 MiB). Where megatron-core is
already installed (an NGC container after ``pip install -e .``), ``--no-install`` skips that.

Megatron's flags come from what the check's Python can import, as the launcher's ``--cpu`` path
sets them for CPU (``model_flags``): without Transformer Engine ``--transformer-impl local
--no-rope-fusion``; without apex's ``fused_weight_gradient_mlp_cuda``
``--no-gradient-accumulation-fusion``; without apex's fused softmax kernels
``--no-masked-softmax-fusion``. Everything runs in bf16, the routers in fp32
(``--moe-router-dtype fp32``).

Steps (``make gpu-check``; each with a time limit; the limits, the install's and the reports'
add up to at most 8 minutes, ``TOTAL_BUDGET_S``):

1. ``install``: a virtual environment with ``--system-site-packages`` (the machine's torch) and
   the wheels installed with ``pip --no-index --no-deps``; then the import probe;
2. ``tests``: ``pytest -m gpu``;
3. ``kernels``: EDL kernel launches per router call, eager vs compiled (``count_edl_kernels``);
4. ``router``: router forward+backward, stock vs eager and fused EDL;
5. ``moe_layer``: a full MoE layer, stock vs EDL;
6. ``training_small`` / ``training_large``: Megatron's real training loop on one GPU, local
   spec, baseline then EDL, at 220 M and 631 M total parameters (``SIZES``; the large one with
   32 experts): tokens/s, the ratio and peak allocated memory;
7. ``training_te`` (only where Transformer Engine imports): the large model on the TE spec
   with grouped GEMM and permute fusion, baseline then EDL.

Results go to one folder (``--out``): each step's log, ``results.json`` (machine, flags, each
step's command, exit code, seconds, tables, and what its numbers cover) and ``results.md``.

``--dry-run`` is the rehearsal, on CPU: every step's real command at a tiny size with the same
flags (``--device cpu``; the training steps through the launcher's ``--cpu`` with the check's
model flags; the GPU tests skip), so a flag Megatron refuses fails here, in CI. Steps whose
rehearsal commands are identical (the two local-spec training sizes) run once. With a wheel
folder it first installs it into an environment holding only torch and its dependencies (a
stand-in for the GPU machine); with ``--no-install`` the steps run with this interpreter.

Usage:
    python tools/gpu_check.py --build-wheelhouse gpu-wheelhouse     # on a machine with PyPI
    python tools/gpu_check.py --wheelhouse gpu-wheelhouse --out gpu-check-results   # on the GPU
    python tools/gpu_check.py --no-install --out gpu-check-results  # megatron-core installed
    python tools/gpu_check.py --dry-run --no-install --out /tmp/gpu-dry   # CPU rehearsal (CI)
    python tools/gpu_check.py --wheelhouse gpu-wheelhouse --dry-run --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The one path set-up left in tools/, on purpose: the GPU machine has a copy of this repository
# and the wheel folder (megatron-core and what it needs, WHEEL_DISTRIBUTIONS), not megatron-edl
# installed, and this script runs with the machine's own python before any environment exists.
# So the package is imported from the repository: here, and in every step (PYTHONPATH=REPO in
# main()). Where it is installed from this checkout (make venv), the insert changes nothing.
sys.path.insert(0, str(REPO))

from megatron_edl.benchmarks.harness import read_tables  # noqa: E402 (after the path set-up)

MAX_WHEELHOUSE_MIB = 60
TOTAL_BUDGET_S = 480  # the whole check, install and reports included: 8 minutes
INSTALL_LIMIT_S = 40  # venv, wheels (no network, no build) and the import probe
REPORT_LIMIT_S = 10  # describing the machine, writing results.json and results.md
REHEARSAL_LIMIT_S = 240  # per step on CPU (inductor compiles C++ there; not part of the budget)

# Distributions a torch-only machine lacks: megatron-core (and what it imports), the launcher's
# YAML configs, and pytest for the GPU tests. Pinned to the versions installed here.
WHEEL_DISTRIBUTIONS = (
    "megatron-core",
    "packaging",
    "pyyaml",
    "einops",
    "pytest",
    "pluggy",
    "iniconfig",
    "pygments",
    "pytest-timeout",
)

# What the check's Python can import decides Megatron's flags (model_flags); run by the probe.
PROBE = """
import importlib, json
def can(*names):
    try:
        for name in names:
            importlib.import_module(name)
        return True
    except Exception:  # ImportError, or a broken build's OSError / RuntimeError
        return False
print(json.dumps({
    "te": can("transformer_engine.pytorch"),
    "apex_grad_accum": can("fused_weight_gradient_mlp_cuda"),
    "fused_softmax": can("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"),
}))
"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Machine:
    """What the check's Python imports (``PROBE``)."""

    te: bool
    """``transformer_engine.pytorch``: the TE spec, RoPE fusion, grouped GEMM, permute fusion."""
    apex_grad_accum: bool
    """apex's ``fused_weight_gradient_mlp_cuda`` (Megatron's linear layers' wgrad fusion)."""
    fused_softmax: bool
    """apex's ``scaled_masked_softmax_cuda`` and ``scaled_upper_triang_masked_softmax_cuda``
    (the local spec's fused softmax in bf16)."""


def model_flags(machine: Machine, *, te_spec: bool = False) -> list[str]:
    """Megatron's flags for ``machine``: bf16 with an fp32 router, the spec, and each fusion only
    where it imports.

    Without TE, RoPE fusion stops Megatron ("apply_rope_fusion is not available"); without apex,
    gradient-accumulation fusion stops it ("fused_weight_gradient_mlp_cuda module is not
    found") and the masked-softmax fusion fails at the first bf16 forward (``import
    scaled_masked_softmax_cuda``). The launcher's ``--cpu`` path sets the same three for CPU.
    """
    if te_spec and not machine.te:
        raise ValueError("te_spec=True needs Transformer Engine (machine.te is False)")
    flags = ["--bf16", "--moe-router-dtype", "fp32"]  # bf16 with an fp32 router, as MoE recipes
    if te_spec:
        flags += [
            "--transformer-impl", "transformer_engine", "--moe-grouped-gemm",
            "--moe-permute-fusion",
        ]  # fmt: skip
    else:
        flags += ["--transformer-impl", "local"]
    if not machine.te:
        flags.append("--no-rope-fusion")
    if not machine.apex_grad_accum:
        flags.append("--no-gradient-accumulation-fusion")
    if not machine.fused_softmax:
        flags.append("--no-masked-softmax-fusion")
    return flags


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSize:
    """A training size on the GPU: the tests' tiny MoE GPT (``TINY_MOE_GPT``) scaled up.

    Every layer is an MoE layer with SwiGLU experts, RMSNorm, no biases, untied embeddings and
    full multi-head attention; the vocabulary is the mock data's 1024 tokens.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    experts: int
    topk: int
    expert_ffn: int
    seq: int
    micro_batch: int
    global_batch: int
    vocab: int = 1024

    def flags(self) -> list[str]:
        return [
            "--num-layers", str(self.layers), "--hidden-size", str(self.hidden),
            "--ffn-hidden-size", str(4 * self.hidden), "--num-attention-heads", str(self.heads),
            "--num-experts", str(self.experts), "--moe-router-topk", str(self.topk),
            "--moe-ffn-hidden-size", str(self.expert_ffn), "--seq-length", str(self.seq),
            "--max-position-embeddings", str(self.seq), "--micro-batch-size",
            str(self.micro_batch), "--global-batch-size", str(self.global_batch),
            "--vocab-size", str(self.vocab),
        ]  # fmt: skip

    def parameters(self) -> tuple[int, int]:
        """(total, active) parameter counts from the config, as docs/launching.md counts them.

        Per layer: attention 4·h² (Q, K, V, output), E experts of 3·h·f (gate, up, down), a
        router of h·E, two RMSNorm weights of h; plus embeddings 2·V·h and the final norm h.
        Active counts top-k experts per layer.
        """
        h, f = self.hidden, self.expert_ffn
        shared = 4 * h * h + h * self.experts + 2 * h
        outside = 2 * self.vocab * h + h
        total = outside + self.layers * (shared + self.experts * 3 * h * f)
        active = outside + self.layers * (shared + self.topk * 3 * h * f)
        return total, active

    def tokens_per_iteration(self) -> int:
        return self.global_batch * self.seq


SIZES = (
    ModelSize(name="small", layers=4, hidden=1024, heads=16, experts=16, topk=4, expert_ffn=1024,
              seq=2048, micro_batch=4, global_batch=16),
    ModelSize(name="large", layers=6, hidden=1024, heads=16, experts=32, topk=4, expert_ffn=1024,
              seq=2048, micro_batch=2, global_batch=8),
)  # fmt: skip

# One GPU, one process: what none of the numbers can cover.
ONE_GPU = (
    "One GPU, one process: no expert parallelism, so no all-to-all dispatch across ranks and no "
    "all-reduce of EDL's per-domain statistics; no NCCL traffic between GPUs; no tensor, "
    "pipeline or data parallelism."
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Step:
    """One step: a command run from the repository root with a time limit.

    ``argv`` is ``[python, *entry, *shared, *size]``: ``shared`` is the same on the GPU and in the
    rehearsal, ``size`` is the device and the sizes (tiny in the rehearsal).
    """

    name: str
    what: str
    covers: str
    limit_s: int
    python: str
    entry: tuple[str, ...]
    shared: tuple[str, ...]
    size: tuple[str, ...]

    @property
    def argv(self) -> list[str]:
        return [self.python, *self.entry, *self.shared, *self.size]

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def gpu_test_files() -> list[str]:
    """The test modules with GPU-marked tests (the others may import what the wheels lack)."""
    tests = sorted((REPO / "tests").rglob("test_*.py"))
    return [str(p.relative_to(REPO)) for p in tests if "pytest.mark.gpu" in p.read_text()]


def _training_step(
    name: str, size: ModelSize, machine: Machine, python: str, *, rehearsal: bool, te_spec: bool
) -> Step:
    spec = "TE spec, grouped GEMM, permute fusion" if te_spec else "local spec"
    total, active = size.parameters()
    limit_s = 90 if size.name == "large" else 80
    if rehearsal:  # the tests' tiny MoE GPT (TINY_MOE_GPT) as it is, 3 iterations per run
        run = ("--device", "cpu", "--rounds", "1", "--iters", "3", "--skip", "1")
        run += ("--timeout", str(REHEARSAL_LIMIT_S // 2))
    else:
        run = ("--device", "cuda", "--rounds", "1", "--iters", "20", "--skip", "5")
        # Per run: what the step leaves after a quick first run (the step's limit caps both).
        run += ("--timeout", str(limit_s - 10), "--extra", shlex.join(size.flags()))
    return Step(
        name=name,
        what=f"training loop, {size.name} model ({total / 1e6:.0f} M parameters, "
        f"{active / 1e6:.0f} M active, {size.experts} experts), {spec}, baseline then EDL",
        covers=(
            f"Megatron's real training loop (mock data, Adam, bf16) on one GPU: iteration time "
            f"(median of 15 iterations after 5 warm-up), tokens/s ({size.tokens_per_iteration()} "
            f"tokens per iteration), the EDL / baseline ratio of one run each, and peak memory "
            f"(torch.cuda.max_memory_allocated at the last iteration: the caching allocator's "
            f"reserve, the CUDA context and NCCL buffers are not in it). {ONE_GPU}"
        ),
        limit_s=limit_s,
        python=python,
        entry=(str(REPO / "tools" / "benchmark_training.py"),),
        shared=("--memory", "--extra", shlex.join(model_flags(machine, te_spec=te_spec))),
        size=run,
    )


def plan(python: str, machine: Machine, *, rehearsal: bool) -> list[Step]:
    """The check's steps for ``machine``, run by ``python``; ``rehearsal``: their CPU stand-ins."""
    tools = REPO / "tools"
    dev = ("--device", "cpu") if rehearsal else ("--device", "cuda")
    once = ("--repeats", "1", "--warmup", "0")
    steps = [
        Step(
            name="tests", what="GPU-marked tests",
            covers="pytest -m gpu: the GPU-marked tests one GPU can run (the two-GPU tests skip, "
            "so do the TE-only tests without TE). On CPU every test skips.",
            limit_s=60, python=python, entry=("-m", "pytest"),
            shared=("-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_test_files()), size=(),
        ),
        Step(
            name="kernels", what="EDL kernel launches per router call, eager vs compiled",
            covers="The EDL math of one router call (no all-reduce) with torch.compile: kernel "
            "launches counted by the profiler, and its time. Not the router or the layer.",
            limit_s=30, python=python, entry=(str(tools / "count_edl_kernels.py"),),
            shared=("--dtype", "bf16"),
            size=(*dev, "--tokens", "256", "--experts", "8", "--domains", "3", *once)
            if rehearsal
            else (*dev, "--tokens", "8192", "--experts", "64", "--domains", "49",
                  "--repeats", "10"),
        ),
        Step(
            name="router", what="router forward+backward, stock vs eager and fused EDL, bf16",
            covers="One router (gating GEMM, top-k, aux loss, EDL) forward and backward; the "
            "EDL all-reduce is not in it (one rank).",
            limit_s=30, python=python, entry=(str(tools / "benchmark_router.py"),),
            shared=("--dtype", "bf16", "--configs", "stock", "edl-eager", "edl-fused"),
            size=(*dev, "--tokens", "256", "--hidden", "64", "--topk", "2", "--experts", "8",
                  "--domains", "3", *once)
            if rehearsal
            else (*dev, "--experts", "64", "256", "--domains", "49", "--repeats", "10"),
        ),
        Step(
            name="moe_layer", what="MoE layer forward+backward, stock vs EDL, bf16",
            covers="One MoE layer (router, dispatch, experts, combine) on one GPU; with TE "
            "installed the TE spec with grouped GEMM. No expert parallelism, no all-to-all.",
            limit_s=30, python=python, entry=(str(tools / "benchmark_moe_layer.py"),),
            shared=("--dtype", "bf16", "--configs", "stock", "edl"),
            size=(*dev, "--tokens", "256", "--hidden", "64", "--ffn-hidden", "64", "--topk", "2",
                  "--experts", "8", "--domains", "3", *once)
            if rehearsal
            else (*dev, "--tokens", "16384", "--hidden", "2048", "--ffn-hidden", "1024",
                  "--experts", "64", "--domains", "49", "--repeats", "10"),
        ),
    ]  # fmt: skip
    for size in SIZES:
        steps.append(
            _training_step(
                f"training_{size.name}", size, machine, python, rehearsal=rehearsal, te_spec=False
            )
        )
    if machine.te:
        steps.append(
            _training_step("training_te", SIZES[-1], machine, python, rehearsal=rehearsal,
                           te_spec=True)
        )  # fmt: skip
    return steps


def budget(steps: list[Step]) -> int:
    """Seconds the check may take on the GPU: install, every step's limit, reports."""
    return INSTALL_LIMIT_S + sum(s.limit_s for s in steps) + REPORT_LIMIT_S


def build_wheelhouse(dest: Path, pip: list[str] | None = None) -> list[Path]:
    """Build (or download) one wheel per ``WHEEL_DISTRIBUTIONS`` entry into ``dest``.

    Versions are pinned to this environment's; ``pip wheel --no-deps`` takes a published wheel
    when there is one and builds one otherwise.

    Raises:
        RuntimeError: If pip fails or the folder exceeds ``MAX_WHEELHOUSE_MIB``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{d}=={importlib.metadata.version(d)}" for d in WHEEL_DISTRIBUTIONS]
    pip = pip or [sys.executable, "-m", "pip"]
    cmd = [*pip, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), *pins]
    _run_checked(cmd, timeout_s=600)
    check_wheelhouse(dest)
    return sorted(dest.glob("*.whl"))


def check_wheelhouse(folder: Path) -> list[Path]:
    """The wheels of ``folder``: one per required distribution, within the size limit.

    Raises:
        RuntimeError: Naming the folder and what is wrong.
    """
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"no wheels in {folder}: run `make gpu-wheelhouse` first")
    names = {_normalise(w.name.split("-")[0]) for w in wheels}
    missing = [d for d in WHEEL_DISTRIBUTIONS if _normalise(d) not in names]
    if missing:
        raise RuntimeError(f"{folder} lacks wheels of {', '.join(missing)}")
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    if mib > MAX_WHEELHOUSE_MIB:
        raise RuntimeError(f"{folder} holds {mib:.1f} MiB of wheels, over {MAX_WHEELHOUSE_MIB}")
    return wheels


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def make_env(
    venv: Path, wheels: list[Path], *, torch_only_site: Path | None, timeout_s: float
) -> str:
    """Create the check's environment and install ``wheels``; returns its python.

    On the GPU machine the venv sees the system's packages (``--system-site-packages``: the
    machine's torch). For the dry run, ``torch_only_site`` is a folder holding only torch and its
    dependencies (``torch_only_site``), added with a ``.pth`` file instead.
    """
    deadline = time.monotonic() + timeout_s
    cmd = [sys.executable, "-m", "venv", "--without-pip", str(venv)]
    if torch_only_site is None:
        cmd.insert(3, "--system-site-packages")
    _run_checked(cmd, timeout_s=deadline - time.monotonic())
    python = str(venv / "bin" / "python")
    if torch_only_site is not None:
        purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
        site = _run_checked([python, "-c", purelib], timeout_s=deadline - time.monotonic())
        Path(site.strip(), "gpu_check_torch.pth").write_text(f"{torch_only_site}\n")
    # On the GPU machine the system's pip runs inside the venv; the dry run's venv sees no pip,
    # so this interpreter's pip installs into it (pip >= 22.3: --python).
    if torch_only_site is None:
        pip = [python, "-m", "pip"]
    else:
        pip = [sys.executable, "-m", "pip", "--python", python]
    install = [*pip, "install", "--no-index", "--no-deps", "--quiet", *map(str, wheels)]
    _run_checked(install, timeout_s=deadline - time.monotonic())
    return python


def torch_only_site(dest: Path) -> Path:
    """A folder of links to torch and the distributions it requires (recursively), nothing else.

    Stands in for a GPU machine's site-packages in the dry run.
    """
    dest.mkdir(parents=True, exist_ok=True)
    todo, seen = ["torch", "numpy"], set()
    while todo:
        name = _normalise(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0])
        root = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or []}
        for top in tops:
            source, link = root / top, dest / top
            if top.endswith(".pth") or top == ".." or link.exists() or not source.exists():
                continue
            link.symlink_to(source)
    return dest


def _run_checked(cmd: list[str], *, timeout_s: float, env: dict | None = None) -> str:
    if timeout_s <= 0:
        raise RuntimeError(f"no time left for {shlex.join(cmd)}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{shlex.join(cmd)} ran past {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def probe(python: str, env: dict[str, str], timeout_s: float) -> Machine:
    """What ``python`` imports (``PROBE``)."""
    out = _run_checked([python, "-c", PROBE], timeout_s=timeout_s, env=env)
    return Machine(**json.loads(out.strip().splitlines()[-1]))


def run_step(step: Step, out: Path, env: dict[str, str], timeout_s: float) -> dict:
    """Run one step, its output to ``out/<name>.log``; returns its JSON record.

    The step runs in a session of its own, killed as a whole when it ends: a training process a
    timed-out run leaves behind (torchrun's workers) must not hold the GPU for the next step.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        step.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        log, _ = proc.communicate(timeout=30)
        log = (log or "") + f"\n[timed out after {timeout_s:.0f} s]"
        rc = 124
    finally:
        _kill_session(proc.pid)
    (out / f"{step.name}.log").write_text(log)
    return {
        **_record(step), "returncode": rc, "seconds": round(time.monotonic() - start, 1),
        "tables": read_tables(log), "tail": log.splitlines()[-15:] if rc else [],
    }  # fmt: skip


def _kill_session(pid: int) -> None:
    """SIGKILL every process left in the session (and process group) ``pid`` leads."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left
        os.killpg(pid, signal.SIGKILL)


def _record(step: Step) -> dict:
    return {
        "step": step.name, "what": step.what, "covers": step.covers, "command": step.command,
        "limit_s": step.limit_s, "returncode": 125, "seconds": 0.0, "tables": {}, "tail": [],
    }  # fmt: skip


def run_steps(
    steps: list[Step], out: Path, env: dict[str, str], *, deadline: float | None, jobs: int
) -> list[dict]:
    """Run ``steps``; on the GPU one at a time within ``deadline`` (monotonic seconds).

    In the rehearsal (``deadline`` None) each step has ``REHEARSAL_LIMIT_S``, ``jobs`` run at
    once, and a step whose command equals an earlier one's is not run again: its record is the
    earlier step's, marked ``same_as``.
    """
    first: dict[str, Step] = {}
    unique = []
    for step in steps:
        if step.command in first:
            continue
        first[step.command] = step
        unique.append(step)

    records: dict[str, dict] = {}
    if deadline is None:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {
                pool.submit(run_step, step, out, env, REHEARSAL_LIMIT_S): step for step in unique
            }
            for future in concurrent.futures.as_completed(futures):
                record = future.result()
                records[futures[future].name] = record
                print(f"[{record['step']}] exit {record['returncode']} in {record['seconds']} s")
    else:
        for step in unique:
            left = deadline - time.monotonic()
            if left < 10:
                records[step.name] = {**_record(step), "tail": ["skipped: time budget spent"]}
                continue
            records[step.name] = record = run_step(step, out, env, min(step.limit_s, left))
            print(f"[{step.name}] exit {record['returncode']} in {record['seconds']} s")
    result = []
    for step in steps:
        same = first[step.command]
        if same is step:
            result.append(records[step.name])
        else:
            result.append({**records[same.name], **_record(step), "same_as": same.name,
                           "returncode": records[same.name]["returncode"]})  # fmt: skip
    return result


def write_reports(out: Path, results: dict) -> None:
    """``results.json`` and ``results.md`` in ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    title = "dry run on CPU: tiny sizes, no GPU numbers" if results["dry_run"] else "one GPU"
    lines = [
        f"# GPU check ({title})",
        "",
        f"Machine: {results['machine']}.",
        f"Imports: {results['imports']}. Megatron flags derived from them: "
        f"`{results['flags']}` (TE pair: {results['te_pair']}).",
        "",
        ONE_GPU,
        "",
        "| size | total parameters (from the config) | active | experts |",
        "| --- | --- | --- | --- |",
    ]
    for size in results["sizes"]:
        lines.append(
            f"| {size['name']} | {size['total']:,} | {size['active']:,} | {size['experts']} |"
        )
    lines += ["", "| step | what | exit | seconds | limit |", "| --- | --- | --- | --- | --- |"]
    for r in results["steps"]:
        exit_code = f"{r['returncode']} (same command as {r['same_as']})" if "same_as" in r else (
            r["returncode"]
        )  # fmt: skip
        lines.append(
            f"| {r['step']} | {r['what']} | {exit_code} | {r['seconds']} | {r['limit_s']} |"
        )
    for r in results["steps"]:
        lines += ["", f"## {r['step']}", "", f"`{r['command']}`", "", f"Covers: {r['covers']}", ""]
        for title, rows in r["tables"].items():
            columns = list(rows[0]) if rows else []
            lines += [f"### {title}", "", "| " + " | ".join(columns) + " |"]
            lines.append("| " + " | ".join("---" for _ in columns) + " |")
            lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in rows]
            lines.append("")
        if r["tail"]:
            lines += ["```", *r["tail"], "```"]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wheelhouse", type=Path, default=REPO / "gpu-wheelhouse")
    parser.add_argument("--out", type=Path, default=REPO / "gpu-check-results")
    parser.add_argument("--dry-run", action="store_true", help="the CPU rehearsal (see above)")
    parser.add_argument(
        "--no-install", action="store_true",
        help="run the steps with this interpreter (megatron-core installed) instead of the wheels",
    )  # fmt: skip
    parser.add_argument(
        "--steps", nargs="+", metavar="STEP", help="run only these steps (default: all)"
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="rehearsal steps run at once (the GPU runs one)"
    )
    parser.add_argument(
        "--build-wheelhouse", type=Path, metavar="DIR", help="build the wheel folder and exit"
    )
    args = parser.parse_args(argv)
    if args.build_wheelhouse:
        wheels = build_wheelhouse(args.build_wheelhouse)
        mib = sum(w.stat().st_size for w in wheels) / 2**20
        print(f"{len(wheels)} wheels, {mib:.1f} MiB in {args.build_wheelhouse}")
        return 0

    start = time.monotonic()
    wheels = []
    if not args.no_install:
        try:
            wheels = check_wheelhouse(args.wheelhouse)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONHOME", None)
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        install_deadline = start + INSTALL_LIMIT_S * (4 if args.dry_run else 1)
        try:
            if args.no_install:
                python = sys.executable
            else:
                site = torch_only_site(tmp / "site") if args.dry_run else None
                python = make_env(
                    tmp / "venv", wheels, torch_only_site=site,
                    timeout_s=install_deadline - time.monotonic(),
                )  # fmt: skip
            machine = probe(python, env, install_deadline - time.monotonic())
        except RuntimeError as error:
            print(f"error: install: {error}", file=sys.stderr)
            return 1
        if not args.dry_run:
            check = [python, "-c", "import torch, sys; sys.exit(not torch.cuda.is_available())"]
            if subprocess.run(check, env=env, timeout=60).returncode != 0:
                print("no CUDA device visible: use --dry-run on CPU", file=sys.stderr)
                return 2
        install = {
            "step": "install", "what": "this interpreter" if args.no_install else
            "wheels, --no-index --no-deps; import probe",
            "covers": "the environment the steps run in", "limit_s": INSTALL_LIMIT_S,
            "command": "(none)" if args.no_install else
            "pip install --no-index --no-deps " + " ".join(w.name for w in wheels),
            "returncode": 0, "seconds": round(time.monotonic() - start, 1), "tables": {},
            "tail": [],
        }  # fmt: skip
        steps = plan(python, machine, rehearsal=args.dry_run)
        if args.steps:
            unknown = sorted(set(args.steps) - {s.name for s in steps})
            if unknown:
                print(f"error: no step {', '.join(unknown)} on this machine", file=sys.stderr)
                return 2
            steps = [s for s in steps if s.name in args.steps]
        deadline = None if args.dry_run else start + TOTAL_BUDGET_S - REPORT_LIMIT_S
        records = [install, *run_steps(steps, args.out, env, deadline=deadline, jobs=args.jobs)]
        device = "cpu" if args.dry_run else "cuda"
        describe = (
            "from megatron_edl.benchmarks.harness import describe_machine as d; "
            f"print(d({device!r}))"
        )
        try:
            proc = subprocess.run(
                [python, "-c", describe], env=env, capture_output=True, text=True, timeout=60
            )
            machine_line = proc.stdout.strip() or "unknown"
        except subprocess.TimeoutExpired:
            machine_line = "unknown (describe_machine ran past 60 s)"
    imports = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in vars(machine).items())
    results = {
        "dry_run": args.dry_run, "device": device, "machine": machine_line,
        "imports": imports, "flags": " ".join(model_flags(machine)),
        "te_pair": "training_te" if machine.te else "not run: Transformer Engine does not import",
        "sizes": [
            {"name": s.name, "total": s.parameters()[0], "active": s.parameters()[1],
             "experts": s.experts}
            for s in SIZES
        ],
        "budget_s": budget(plan(python, machine, rehearsal=False)), "limit_s": TOTAL_BUDGET_S,
        "seconds": round(time.monotonic() - start, 1), "steps": records,
    }  # fmt: skip
    write_reports(args.out, results)
    failed = [r["step"] for r in records if r["returncode"] != 0]
    print(f"results: {args.out / 'results.md'} ({results['seconds']} s)")
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
