#!/usr/bin/env python
"""One-call GPU check: install from a wheel folder, then tests, benchmarks and training on CUDA.

For a machine with one H100/H200, CUDA and torch, no network and no megatron-core: the missing
Python packages come from a wheel folder built on any machine with PyPI access
(``make gpu-wheelhouse``: ``--build-wheelhouse DIR``, at most 60 MiB). Transformer Engine is too
large to carry, so everything runs on Megatron's local spec (``--transformer-impl local``), and
GPU tests that need TE skip themselves.

Steps (``make gpu-check``; each with a time limit, all together under 8 minutes):

1. ``install``: a virtual environment with ``--system-site-packages`` (it keeps the machine's
   torch) and the wheels installed with ``pip --no-index --no-deps``;
2. ``tests``: ``pytest -m gpu``;
3. ``kernels``: EDL kernel launches per router call, eager vs compiled (``count_edl_kernels``);
4. ``router``: router forward+backward on CUDA in bf16, stock vs eager and fused EDL;
5. ``moe_layer``: a full MoE layer on CUDA in bf16, stock vs EDL;
6. ``training``: Megatron's real training loop on one GPU, the tests' tiny MoE GPT scaled up
   (``TRAINING_SCALE``), baseline and EDL alternated: tokens/s and the ratio.

Results go to one folder (``--out``): each step's log, ``results.json`` (command, exit code,
seconds and the Markdown tables each step printed) and ``results.md``.

``--dry-run`` checks on CPU what can be checked without a GPU: the wheel folder is there, within
60 MiB and installable with ``--no-index --no-deps`` into an environment that holds only torch
and its own dependencies (a stand-in for the GPU machine); from that environment every step's
script imports (``--help``) and the GPU tests collect.

Usage:
    python tools/gpu_check.py --build-wheelhouse gpu-wheelhouse     # on a machine with PyPI
    python tools/gpu_check.py --wheelhouse gpu-wheelhouse --out gpu-check-results   # on the GPU
    python tools/gpu_check.py --wheelhouse gpu-wheelhouse --dry-run --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
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
TOTAL_BUDGET_S = 450  # the whole check: under 8 minutes with the venv and the reports

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

# The tests' tiny MoE GPT (tests/helpers/megatron_runs.TINY_MOE_GPT) scaled to a GPU: wider, longer
# sequences, more experts, bf16, local spec. Later flags override the tiny model's.
TRAINING_SCALE = (
    "--hidden-size 1024 --ffn-hidden-size 4096 --num-attention-heads 16 "
    "--moe-ffn-hidden-size 1024 --num-experts 16 --moe-router-topk 4 "
    "--seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 4 "
    "--global-batch-size 16 --num-layers 4 --bf16 --transformer-impl local"
)


# What the GPU steps import beyond the scripts' own module-level imports: the launcher and
# Megatron's training loop (started by the training benchmark), the fused EDL path.
DRY_RUN_IMPORTS = (
    "megatron_edl.pretrain_gpt",
    "megatron.training.training",
    "megatron.training.initialize",
    "megatron_edl.benchmarks.moe_modules",
    "megatron_edl.core.edl_fused",
)


@dataclasses.dataclass
class Step:
    """One step: a command run from the repository root with a time limit."""

    name: str
    argv: list[str]
    timeout_s: float
    what: str

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def gpu_test_files() -> list[str]:
    """The test modules with GPU-marked tests (the others may import what the wheels lack)."""
    tests = sorted((REPO / "tests").rglob("test_*.py"))
    return [str(p.relative_to(REPO)) for p in tests if "pytest.mark.gpu" in p.read_text()]


def steps(python: str) -> list[Step]:
    """The check's steps, run by ``python`` (the check's environment)."""
    tools = REPO / "tools"
    return [
        Step("tests", [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                       *gpu_test_files()], 120, "GPU-marked tests"),
        Step("kernels", [python, str(tools / "count_edl_kernels.py"), "--device", "cuda",
                         "--dtype", "bf16", "--tokens", "8192", "--experts", "64",
                         "--domains", "49"], 90, "EDL kernel launches per router call"),
        Step("router", [python, str(tools / "benchmark_router.py"), "--device", "cuda",
                        "--experts", "64", "256", "--domains", "49", "--repeats", "20",
                        "--configs", "stock", "edl-eager", "edl-fused"], 90,
             "router forward+backward, bf16"),
        Step("moe_layer", [python, str(tools / "benchmark_moe_layer.py"), "--device", "cuda",
                           "--tokens", "16384", "--hidden", "2048", "--ffn-hidden", "1024",
                           "--experts", "64", "--domains", "49", "--repeats", "10",
                           "--configs", "stock", "edl"],
             90, "MoE layer forward+backward, bf16"),
        Step("training", [python, str(tools / "benchmark_training.py"), "--device", "cuda",
                          "--rounds", "2", "--iters", "30", "--skip", "10",
                          "--extra", TRAINING_SCALE], 180,
             "training loop, one GPU, baseline vs EDL"),
    ]  # fmt: skip


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
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
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


def make_env(venv: Path, wheels: list[Path], *, torch_only_site: Path | None) -> str:
    """Create the check's environment and install ``wheels``; returns its python.

    On the GPU machine the venv sees the system's packages (``--system-site-packages``: the
    machine's torch). For the dry run, ``torch_only_site`` is a folder holding only torch and its
    dependencies (``torch_only_site``), added with a ``.pth`` file instead.
    """
    cmd = [sys.executable, "-m", "venv", "--without-pip", str(venv)]
    if torch_only_site is None:
        cmd.insert(3, "--system-site-packages")
    _run_checked(cmd)
    python = str(venv / "bin" / "python")
    if torch_only_site is not None:
        purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
        site = _run_checked([python, "-c", purelib])
        Path(site.strip(), "gpu_check_torch.pth").write_text(f"{torch_only_site}\n")
    # On the GPU machine the system's pip runs inside the venv; the dry run's venv sees no pip,
    # so this interpreter's pip installs into it (pip >= 22.3: --python).
    if torch_only_site is None:
        pip = [python, "-m", "pip"]
    else:
        pip = [sys.executable, "-m", "pip", "--python", python]
    _run_checked([*pip, "install", "--no-index", "--no-deps", "--quiet", *map(str, wheels)])
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


def _run_checked(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def run_step(step: Step, out: Path, env: dict[str, str], timeout_s: float) -> dict:
    """Run one step, its output to ``out/<name>.log``; returns its JSON record."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            step.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=timeout_s,
        )  # fmt: skip
        log, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out_text = exc.stdout or ""
        log = out_text.decode() if isinstance(out_text, bytes) else out_text
        log += f"\n[timed out after {timeout_s:.0f} s]"
        rc = 124
    (out / f"{step.name}.log").write_text(log)
    tables = read_tables(log)  # title -> rows (column -> cell)
    return {
        "step": step.name, "what": step.what, "command": step.command, "returncode": rc,
        "seconds": round(time.monotonic() - start, 1), "tables": tables,
        "tail": log.splitlines()[-15:] if rc else [],
    }  # fmt: skip


def write_reports(out: Path, results: dict) -> None:
    """``results.json`` and ``results.md`` in ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# GPU check ({'dry run' if results['dry_run'] else results['device']})",
        "",
        f"Machine: {results['machine']}. Megatron's local spec (no Transformer Engine).",
        "",
        "| step | what | exit | seconds |",
        "| --- | --- | --- | --- |",
    ]
    for r in results["steps"]:
        lines.append(f"| {r['step']} | {r['what']} | {r['returncode']} | {r['seconds']} |")
    for r in results["steps"]:
        lines += ["", f"## {r['step']}", "", f"`{r['command']}`", ""]
        for title, rows in r["tables"].items():
            columns = list(rows[0]) if rows else []
            lines += [f"### {title}", "", "| " + " | ".join(columns) + " |"]
            lines.append("| " + " | ".join("---" for _ in columns) + " |")
            lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in rows]
            lines.append("")
        if r["tail"]:
            lines += ["```", *r["tail"], "```"]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def dry_run_step(step: Step) -> Step:
    """The CPU stand-in of ``step``: import its script (``--help``) or collect its tests."""
    if step.name == "tests":
        return dataclasses.replace(step, argv=[*step.argv, "--collect-only"], timeout_s=180)
    script = next(a for a in step.argv if a.endswith(".py"))
    # The scripts start Megatron's training loop or build its modules only after parsing their
    # flags: import what the GPU run will import, then the script itself with --help.
    code = (
        f"import {', '.join(DRY_RUN_IMPORTS)}, runpy, sys; sys.argv = [{script!r}, '--help']; "
        f"runpy.run_path({script!r}, run_name='__main__')"
    )
    return dataclasses.replace(step, argv=[step.argv[0], "-c", code], timeout_s=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wheelhouse", type=Path, default=REPO / "gpu-wheelhouse")
    parser.add_argument("--out", type=Path, default=REPO / "gpu-check-results")
    parser.add_argument("--dry-run", action="store_true", help="CPU checks only (see above)")
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
    try:
        wheels = check_wheelhouse(args.wheelhouse)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        site = torch_only_site(tmp / "site") if args.dry_run else None
        python = make_env(tmp / "venv", wheels, torch_only_site=site)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONNOUSERSITE": "1"}
        env.pop("PYTHONHOME", None)
        if args.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            probe = [python, "-c", "import torch, sys; sys.exit(not torch.cuda.is_available())"]
            if subprocess.run(probe, env=env).returncode != 0:
                print("no CUDA device visible: use --dry-run on CPU", file=sys.stderr)
                return 2
        install = {**run_skipped(Step("install", [], 0, "wheels, --no-index --no-deps"))}
        install.update(returncode=0, seconds=round(time.monotonic() - start, 1))
        install.update(
            command="pip install --no-index --no-deps " + " ".join(w.name for w in wheels)
        )
        records = [install]
        for step in steps(python):
            step = dry_run_step(step) if args.dry_run else step
            left = TOTAL_BUDGET_S - (time.monotonic() - start)
            if left < 10:
                records.append({**run_skipped(step), "tail": ["skipped: time budget spent"]})
                continue
            record = run_step(step, args.out, env, min(step.timeout_s, left))
            records.append(record)
            print(f"[{step.name}] exit {record['returncode']} in {record['seconds']} s", flush=True)
        device = "cpu" if args.dry_run else "cuda"
        describe = (
            "from megatron_edl.benchmarks.harness import describe_machine as d; "
            f"print(d({device!r}))"
        )
        proc = subprocess.run([python, "-c", describe], env=env, capture_output=True, text=True)
        machine = proc.stdout.strip() or "unknown"
    results = {
        "dry_run": args.dry_run, "device": device,
        "machine": machine, "wheelhouse": str(args.wheelhouse),
        "seconds": round(time.monotonic() - start, 1), "steps": records,
    }  # fmt: skip
    write_reports(args.out, results)
    failed = [r["step"] for r in records if r["returncode"] != 0]
    print(f"results: {args.out / 'results.md'} ({results['seconds']} s)")
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run_skipped(step: Step) -> dict:
    """The JSON record of a step that did not run (exit code 125)."""
    return {"step": step.name, "what": step.what, "command": step.command, "returncode": 125,
            "seconds": 0.0, "tables": {}, "tail": []}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
