#!/usr/bin/env python
"""Merge domain-labelled Megatron dataset shards (.bin/.idx/.domains) into one dataset.

Usage::

    python tools/merge_datasets.py --input shards/ --output-prefix data/corpus_text_document
    python tools/merge_datasets.py --input s0 s1 s2 --output-prefix merged [--overwrite]

See :mod:`megatron_edl.data.merge` for the vocabulary rules.
"""

import sys

from megatron_edl.data.merge import main

if __name__ == "__main__":
    sys.exit(main())
