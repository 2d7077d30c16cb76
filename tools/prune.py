#!/usr/bin/env python
"""Domain expert pruning of a checkpoint: per-domain LM loss with m experts kept per domain.

Usage::

    python tools/prune.py --out prune/edl --nproc 2 -- --cpu --config-yaml MODEL.yaml \\
        --load runs/edl/checkpoints --train-data-path data/train --valid-data-path data/valid \\
        --moe-edl-eval-per-domain --eval-iters 20
    python tools/prune.py --out prune/edl --export code --keep 4 -- <the same flags>

``--export DOMAIN --keep M`` also writes a stock Megatron checkpoint with only DOMAIN's M experts
per MoE layer (``OUT/export-DOMAIN-mM``, or ``--export-dir``); load it with ``--num-experts M``.
See :mod:`megatron_edl.prune` and docs/method.md section 6.
"""

from megatron_edl.prune import main

if __name__ == "__main__":
    main()
