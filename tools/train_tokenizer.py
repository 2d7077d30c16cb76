"""Train a byte-level BPE tokenizer offline on JSONL text, in a form Megatron's builder loads.

The library is megatron_edl.demo.tokenizer; also installed as ``megatron-edl-train-tokenizer``.

Usage:
    python tools/train_tokenizer.py --input data/corpus/train.jsonl \\
        --output-dir data/tokenizer --vocab-size 4096
    # then: --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_edl.demo.tokenizer import main  # noqa: E402 (after the path set-up)

if __name__ == "__main__":
    sys.exit(main())
