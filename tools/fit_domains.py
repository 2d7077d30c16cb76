"""Fit a topic model on a sample of a corpus: discovered domains for --domain-clusters.

The library is megatron_edl.data.domain_clusters (its docstring has the details); also installed
as ``megatron-edl-fit-domains``.

Usage:
    python tools/fit_domains.py --input 'corpus/*.jsonl.gz' --output clusters.edlc \\
        --num-clusters 32 --seed 0 --coarse-domains 4 --label-map-out label_map_coarse.yaml
    # then: python tools/preprocess_data.py ... --domain-clusters clusters.edlc
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_edl.data import domain_clusters  # noqa: E402 (after the path set-up)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fitting CLI; returns the exit status."""
    return domain_clusters.main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
