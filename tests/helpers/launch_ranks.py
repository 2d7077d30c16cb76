"""Start the ranks of a CPU training run as forks of a server that has imported torch and Megatron.

    launch_ranks(nproc, module, argv, env, timeout_s, cwd) -> (returncode, log)

What torchrun does for a single node, less its cost: each rank gets torchrun's environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and runs ``python -m module *argv`` as ``__main__``, in a fork of the gloo
runner's fork server (:func:`megatron_edl.benchmarks.gloo.forkserver_context`), so no rank pays
the imports of torch and Megatron again. The environment a rank sees is ``env`` exactly; its
stdout and stderr go to one file per rank, and the log is rank 0's output followed by the
others' in rank order. The return code is torchrun's rule: 0 when every rank exits 0, else the
first failing rank's status (-9 when the run was killed after ``timeout_s``). Once a rank fails,
the others get 10 s to exit and are then killed, as torchrun stops a failed group.

The tests that exercise torchrun itself (``tests/e2e/test_pretrain_cpu.py``'s launcher check,
the fault tests, Slurm) start it for real.
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
import time
from pathlib import Path

from megatron_edl.benchmarks.gloo import forkserver_context
from megatron_edl.benchmarks.runs import free_port

__all__ = ["launch_ranks"]

# Seconds the other ranks get to exit once one rank failed (torchrun stops the group too).
FAILED_GROUP_GRACE_S = 10.0


def _rank_main(module: str, argv: list[str], env: dict[str, str], log: str, cwd: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the rank's streams
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [module, *argv]
    sys.modules.pop(module, None)  # the server's import of it; it runs afresh as __main__
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def launch_ranks(
    nproc: int,
    module: str,
    argv: list[str],
    env: dict[str, str],
    timeout_s: float,
    cwd: Path | None = None,
) -> tuple[int, str]:
    """Run ``python -m module *argv`` on ``nproc`` local ranks (module docstring)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    ctx = forkserver_context()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ranks_") as logs:
        paths = [os.path.join(logs, f"rank{r}.log") for r in range(nproc)]
        procs = []
        for rank in range(nproc):
            rank_env = {
                **env,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "GROUP_RANK": "0",
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            proc = ctx.Process(
                target=_rank_main,
                args=(module, argv, rank_env, paths[rank], str(cwd or os.getcwd())),
            )  # not a daemon: Megatron's checkpointing starts processes of its own
            proc.start()
            procs.append(proc)
        returncode = _wait(procs, timeout_s)
        log = "".join(Path(p).read_text(errors="replace") for p in paths if os.path.exists(p))
    if returncode == -9:
        log += f"\n[timed out after {timeout_s}s]"
    return returncode, log


def _wait(procs, timeout_s: float) -> int:
    """Torchrun's return code for ``procs`` (module docstring); every process is gone after."""
    deadline = time.monotonic() + timeout_s
    failed: int | None = None
    try:
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                return -9 if failed is None else failed
            if failed is None:
                codes = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if codes:
                    failed = codes[0]
                    deadline = min(deadline, time.monotonic() + FAILED_GROUP_GRACE_S)
            time.sleep(0.05)
        if failed is None:
            failed = next((p.exitcode for p in procs if p.exitcode != 0), 0)
        return failed
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
