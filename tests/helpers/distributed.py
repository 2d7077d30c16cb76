"""The tests' gloo multi-process runner: :mod:`megatron_edl.benchmarks.gloo` (its docstring has
the rules), shared with ``tools/benchmark_collectives.py``.

    run_distributed(fn, world_size, *args, timeout_s=120, backend="gloo", **kwargs)
        -> list of fn's return values
"""

from megatron_edl.benchmarks.gloo import (
    DistributedTestError,
    count_all_reduce,
    free_port,
    run_distributed,
)

__all__ = ["DistributedTestError", "count_all_reduce", "free_port", "run_distributed"]
