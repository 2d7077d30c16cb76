"""Train a byte-level BPE tokenizer offline on JSONL text, in a form Megatron's builder loads.

The library is megatron_edl.demo.tokenizer; also installed as ``megatron-edl-train-tokenizer``.

Usage:
    python tools/train_tokenizer.py --input data/corpus/train.jsonl \\
        --output-dir data/tokenizer --vocab-size 4096
    # then: --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer
"""

import sys

from megatron_edl.demo.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
