#!/usr/bin/env python
"""Expert-specialization report (HTML, PNG, CSV, JSON) from routing-statistics dumps.

Usage::

    python tools/report.py --out report baseline=runs/base/routing_stats edl=runs/edl/routing_stats
    python tools/report.py --out report --label-map coarse.yaml --layers 1,4 --window 5 \\
        base=runs/base/routing_stats edl=runs/edl/routing_stats probe=probes/edl

See :mod:`megatron_edl.analysis.report` and docs/telemetry.md.
"""

import sys

from megatron_edl.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
