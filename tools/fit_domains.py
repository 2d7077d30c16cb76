"""Fit a topic model on a sample of a corpus: discovered domains for --domain-clusters.

The library is megatron_edl.data.domain_clusters (its docstring has the details); also installed
as ``megatron-edl-fit-domains``.

Usage:
    python tools/fit_domains.py --input 'corpus/*.jsonl.gz' --output clusters.edlc \\
        --num-clusters 32 --seed 0 --coarse-domains 4 --label-map-out label_map_coarse.yaml
    # then: python tools/preprocess_data.py ... --domain-clusters clusters.edlc
"""

import sys

from megatron_edl.data.domain_clusters import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
