"""Train a byte-level BPE tokenizer offline (HF ``tokenizers``) in a form Megatron loads.

The folder written holds ``tokenizer.json`` (the trained tokenizer) and
``tokenizer_config.json`` (``PreTrainedTokenizerFast``, EOS/BOS/UNK = ``<|endoftext|>``), which
megatron-core's tokenizer builder loads with::

    --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR

(transformers' ``AutoTokenizer.from_pretrained(DIR)``; nothing is downloaded, set
``HF_HUB_OFFLINE=1`` to make sure). The tokenizer is byte-level, so every text has an encoding;
the end-of-document token ``<|endoftext|>`` has id 0 and is what ``--append-eod`` appends.

Usage:
    megatron-edl-train-tokenizer --input data/corpus/train.jsonl --output-dir data/tokenizer \\
        --vocab-size 4096
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

__all__ = ["EOD_TOKEN", "jsonl_texts", "main", "train_bpe_tokenizer", "train_tiny_tokenizer"]

EOD_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str],
    directory: str | os.PathLike,
    *,
    vocab_size: int,
    min_frequency: int = 0,
    show_progress: bool = False,
) -> Path:
    """Train a byte-level BPE on ``texts`` and save it where ``AutoTokenizer`` can load it.

    Args:
        texts: Training text (any iterable; read once).
        directory: Folder to write ``tokenizer.json`` and ``tokenizer_config.json`` into
            (created).
        vocab_size: Target vocabulary size, special token and the 256 byte symbols included
            (the result is smaller when the text has fewer merges to offer).
        min_frequency: Pairs seen fewer times are not merged.
        show_progress: The trainer's progress bar.

    Returns:
        The folder.

    Raises:
        ValueError: if ``vocab_size`` cannot hold the byte alphabet and the special token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be >= {len(alphabet) + 1}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD_TOKEN,
        "bos_token": EOD_TOKEN,
        "unk_token": EOD_TOKEN,
        "model_max_length": 1 << 30,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def train_tiny_tokenizer(directory: str | os.PathLike, vocab_size: int = 512) -> Path:
    """The tiny byte-level BPE of the tests and benchmarks, trained on the spot.

    :func:`train_bpe_tokenizer` on generated text
    (:func:`megatron_edl.benchmarks.preprocessing.tiny_tokenizer_texts`: 1,200 sentences, seed 0).

    Args:
        directory: Folder to write ``tokenizer.json`` and ``tokenizer_config.json`` into.
        vocab_size: Target vocabulary size (the result may be smaller: the corpus is tiny).

    Returns:
        The folder.
    """
    from megatron_edl.benchmarks.preprocessing import tiny_tokenizer_texts

    return train_bpe_tokenizer(tiny_tokenizer_texts(), directory, vocab_size=vocab_size)


def jsonl_texts(paths: Sequence[str | os.PathLike], key: str = "text") -> Iterator[str]:
    """The ``key`` field of every record of JSON Lines files, in order.

    Raises:
        ValueError: naming the file and line of a record that is not an object with a string
            ``key``.
    """
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                text = record.get(key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{os.fspath(path)}:{number}: no string field {key!r}")
                yield text


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``megatron-edl-train-tokenizer``); returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files to train on.")
    parser.add_argument("--output-dir", required=True, help="Folder of the tokenizer files.")
    parser.add_argument("--vocab-size", type=int, default=4096, help="Default 4096.")
    parser.add_argument("--min-frequency", type=int, default=2, help="Default 2.")
    parser.add_argument("--json-key", default="text", help="Text field (default text).")
    args = parser.parse_args(argv)
    try:
        directory = train_bpe_tokenizer(
            jsonl_texts(args.input, args.json_key),
            args.output_dir,
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            show_progress=sys.stderr.isatty(),
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    print(f"tokenizer with {len(size)} tokens written to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
