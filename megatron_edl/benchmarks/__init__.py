"""Support for the benchmark scripts in ``tools/benchmark_*.py`` (docs/BENCHMARKS.md).

* :mod:`megatron_edl.benchmarks.harness`: measuring two or more configurations alternately in one
  process (warm-up, repetitions, per-round ratios, median/min/max) and printing the results as
  Markdown tables that the smoke tests read back. Pure Python.
* :mod:`megatron_edl.benchmarks.moe_modules`: Megatron routers and MoE layers, stock or with EDL,
  built on a one-process group (gloo on CPU, NCCL on a GPU), and a counter of the collectives
  they issue. Imports megatron (only when imported itself).

Nothing here is imported by ``import megatron_edl``.
"""
