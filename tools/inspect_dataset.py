#!/usr/bin/env python
"""Per-domain counts and consistency check of a domain-labelled Megatron dataset.

Usage::

    python tools/inspect_dataset.py data/corpus_text_document
    python tools/inspect_dataset.py data/corpus_text_document --show 0 --show 17 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/tokenizer

Exit status 0 when the index, the data and the domain sidecar agree, 1 otherwise. See
:mod:`megatron_edl.data.inspect`.
"""

import sys

from megatron_edl.data.inspect import main

if __name__ == "__main__":
    sys.exit(main())
