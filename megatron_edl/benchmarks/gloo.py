"""A small gloo multi-process runner for distributed tests on CPU (and the collectives benchmark).

    run_distributed(fn, world_size, *args, timeout_s=120, backend="gloo", **kwargs)
        -> list of fn's return values

Starts ``world_size`` processes, each initialising ``torch.distributed`` with gloo (CUDA hidden)
on a free local port, or with nccl on GPU ``rank`` (``backend="nccl"``, for tests marked
``gpu``), then calls ``fn(rank, world_size, *args, **kwargs)``. ``fn`` must be importable by the
children (a module-level function of a test module); pass expected tensors in through ``args``
and assert inside ``fn``. A rank that raises sends its traceback back and the runner raises
:class:`DistributedTestError` with every failing rank's traceback; a run still going after
``timeout_s`` (a hang in a collective, typically) is killed and reported as such, so a hang fails
the test instead of blocking CI.

gloo ranks are forks of one clean server process that has imported torch and Megatron once
(:func:`forkserver_context`): no state leaks from the caller, and no rank pays the imports again.
nccl ranks are fresh interpreters (``spawn``), since a fork must not inherit CUDA state.

The tests import it as ``tests.helpers.distributed``; ``tools/benchmark_collectives.py`` counts the
collectives of an MoE layer on its ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from megatron_edl.benchmarks.runs import free_port


class DistributedTestError(AssertionError):
    """One or more ranks failed, or the run timed out."""


# Imported once by the fork server; every child starts with them in sys.modules.
PRELOAD = (
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.models.gpt",
    "megatron.training",
    "megatron_edl.integration.install",
)


def forkserver_context() -> mp.context.BaseContext:
    """The ``forkserver`` start method with :data:`PRELOAD` imported by the server.

    The server is a fresh interpreter started on first use (it shares nothing with the caller
    but ``sys.path`` and the environment of that moment) and runs no torch operation, so its
    forks start with no thread pool and no process group.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def _worker(fn, rank, world_size, port, args, kwargs, results, timeout_s, backend):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    if backend == "gloo":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args, **kwargs)
        # Plain pickle copies tensor data; the queue's own reducer would share it through file
        # descriptors that vanish when this process exits before the parent reads them.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo (or nccl) ranks.

    Returns:
        The per-rank return values (must be picklable), indexed by rank.

    Raises:
        DistributedTestError: a rank raised (tracebacks included) or the run exceeded
            ``timeout_s`` seconds (the ranks that did not report are named).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = forkserver_context() if backend == "gloo" else mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, args, kwargs, results, timeout_s, backend),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    reports: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(reports) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                    time.sleep(0.5)  # give a crashing rank's report time to arrive
                    if results.empty():
                        break
                continue
            reports[rank] = (ok, pickle.loads(value) if ok else value)
            if not ok:
                deadline = min(deadline, time.monotonic() + 10)  # others may hang now
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(reports.items()) if not ok]
    missing = sorted(set(range(world_size)) - set(reports))
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        failures.append(
            f"ranks {missing} did not report within {timeout_s:.0f} s "
            f"(hang or crash; exit codes {codes})"
        )
    if failures:
        raise DistributedTestError(
            f"{fn.__module__}.{fn.__qualname__} failed on {world_size} ranks:\n"
            + "\n".join(failures)
        )
    return [reports[r][1] for r in range(world_size)]


@contextlib.contextmanager
def count_all_reduce() -> Iterator[list[int]]:
    """Record the numel of every ``torch.distributed.all_reduce`` issued inside the block."""
    import torch.distributed as dist

    real = dist.all_reduce
    calls: list[int] = []

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = real
