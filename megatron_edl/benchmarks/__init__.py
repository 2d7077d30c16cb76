"""Support for the benchmark scripts in ``tools/benchmark_*.py`` (docs/BENCHMARKS.md).

* :mod:`megatron_edl.benchmarks.harness`: measuring two or more configurations alternately in one
  process (warm-up, repetitions, per-round ratios, median/min/max) and printing the results as
  Markdown tables that the smoke tests read back. Pure Python.
* :mod:`megatron_edl.benchmarks.moe_modules`: Megatron routers and MoE layers, stock or with EDL,
  built on a one-process group (gloo on CPU, NCCL on a GPU), and a counter of the collectives
  they issue. Imports megatron (only when imported itself).
* :mod:`megatron_edl.benchmarks.collectives`: the per-rank worker of the collectives count.
* :mod:`megatron_edl.benchmarks.gloo`: ``run_distributed``, a function on N local processes
  (gloo on CPU, NCCL on GPUs); also the tests' runner (``tests/helpers/distributed.py``).
* :mod:`megatron_edl.benchmarks.preprocessing`: generated labelled text, the tiny tokenizer's
  training text and one timed preprocessing run (also the tests' data fixtures).
* :mod:`megatron_edl.benchmarks.runs`: the tiny MoE GPT's flags, a free port, Megatron's log
  parsed per iteration (also the tests' end-to-end runs).

The scripts import the installed package (``make venv`` installs it in editable mode), so none
of them sets up ``sys.path``; only ``tools/gpu_check.py`` does (see there why).

Nothing here is imported by ``import megatron_edl``.
"""
