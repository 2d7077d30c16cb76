"""``megatron_edl.pretrain_gpt`` with Megatron's timers reading CPU time: for benchmarks only.

Usage (what ``tools/benchmark_training.py --clock cpu`` runs)::

    torchrun --nproc-per-node 1 -m megatron_edl.benchmarks.cpu_clock_pretrain --cpu <flags>

Megatron's ``Timer`` (``megatron/core/timers.py``) reads ``time.time()``, so on a machine whose
cores other processes share, ``elapsed time per iteration`` also counts the time slices they
take. Here the module's clock is ``time.process_time()`` (user + system CPU seconds of the
process, all its threads) instead: the logged time is the work of the iteration. With one torch
thread (``OMP_NUM_THREADS=1``) and one process it is exactly the compute of the step; spin-waits
of extra threads would count too. Nothing else changes.
"""

from __future__ import annotations

import time
import types


def main() -> None:
    from megatron.core import timers

    timers.time = types.SimpleNamespace(time=time.process_time)
    from megatron_edl.pretrain_gpt import main as pretrain_main

    pretrain_main()


if __name__ == "__main__":
    main()
