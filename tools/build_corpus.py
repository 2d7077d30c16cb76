"""Build the offline multi-domain corpus: labelled JSONL (train/valid), label vocabulary, label map.

Eight fine domains in three coarse groups (code, text, math) from what the machine already has:
Python and C sources, manual pages in English, German and French, license texts, and
mathematics generated with sympy. The library is megatron_edl.demo.corpus (its docstring has
the rules). Also installed as the console script ``megatron-edl-build-corpus``.

Usage:
    # what is on this machine (nothing is written)
    python tools/build_corpus.py --list

    # 1 MiB of text per domain, 10% validation, seed 1234
    python tools/build_corpus.py --output-dir data/corpus --max-bytes-per-domain 1M

    # a subset of domains; a source folder elsewhere; fail if any source is missing
    python tools/build_corpus.py --output-dir data/c --domains code/python text/en math/latex \\
        --root man=/opt/share/man --require-all

Then preprocess with domain labels:
    python tools/preprocess_data.py --input data/corpus/train.jsonl \\
        --output-prefix data/corpus_train --domain-field domain \\
        --label-vocab data/corpus/labels.yaml --append-eod \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer
"""

import sys

from megatron_edl.demo.corpus import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
