#!/usr/bin/env python
"""Evaluation probe: per-domain routing statistics and LM loss of a checkpoint, no training.

Usage::

    torchrun --nproc-per-node 2 tools/probe.py --out probes/edl --cpu \\
        --config-yaml examples/configs/tiny_moe_cpu.yaml --load runs/edl/checkpoints --eval-iters 20
    torchrun --nproc-per-node 8 tools/probe.py --out probes/edl --load CKPT <flags>

See :mod:`megatron_edl.probe` and docs/telemetry.md.
"""

from megatron_edl.probe import main

if __name__ == "__main__":
    main()
