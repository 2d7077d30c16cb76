"""Generated labelled text and one timed preprocessing run, for the preprocessing benchmarks
(``tools/benchmark_preprocess.py``, ``tools/benchmark_domain_labels.py``) and the tests' data
fixtures (``tests/helpers/data_helpers.py``).

The text draws from a few small word lists, one per "domain", so that a BPE trained on it has
structure to learn; non-ASCII on purpose (a byte-level tokenizer encodes any text, emoji too).
Nothing here downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import time
from pathlib import Path

__all__ = [
    "DOMAINS",
    "DOMAIN_WORDS",
    "cpu_seconds",
    "generate_corpus",
    "run_once",
    "sentence",
    "tiny_tokenizer_texts",
    "tokenizer_args",
]

DOMAIN_WORDS: dict[str, list[str]] = {
    "en/science": "atom energy proton quantum theory cell gene orbit lens field".split(),
    "en/history": "empire king war treaty castle dynasty revolution army crown throne".split(),
    "zh/history": "历史 王朝 皇帝 战争 长城 朝代 文化 古代 城市 人民".split(),
    "math": "theorem proof lemma integral matrix prime group ring vector sum".split(),
}
_COMMON_WORDS = "the a of and in is to was by with ünïcödé 😀".split()
DOMAINS = tuple(DOMAIN_WORDS)


def sentence(rng: random.Random, domain: str, num_words: int) -> str:
    """A random sentence mixing the domain's words with common words."""
    words = DOMAIN_WORDS[domain] + _COMMON_WORDS
    return " ".join(rng.choice(words) for _ in range(num_words))


def tiny_tokenizer_texts() -> list[str]:
    """The text the tiny test/benchmark tokenizer is trained on (1,200 sentences, seed 0)."""
    rng = random.Random(0)
    return [sentence(rng, domain, 16) for domain in DOMAIN_WORDS for _ in range(300)]


def tokenizer_args(tokenizer_dir: str | os.PathLike) -> argparse.Namespace:
    """Megatron's tokenizer flags (its own parser group) selecting a Hugging Face tokenizer
    folder."""
    from megatron.training.arguments import _add_tokenizer_args

    parser = _add_tokenizer_args(argparse.ArgumentParser())
    return parser.parse_args(
        ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir)]
    )


def generate_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write labelled JSONL of about ``size_mb`` MiB (documents of 20-800 words).

    Args:
        path: Output file.
        size_mb: Target size in MiB.
        seed: Random seed.

    Returns:
        The number of documents.
    """
    rng = random.Random(seed)
    target = int(size_mb * 2**20)
    written = documents = 0
    with open(path, "wb") as f:
        while written < target:
            domain = DOMAINS[rng.randrange(len(DOMAINS))]
            record = {"text": sentence(rng, domain, rng.randint(20, 800)), "meta": {"src": domain}}
            line = json.dumps(record, ensure_ascii=False).encode() + b"\n"
            f.write(line)
            written += len(line)
            documents += 1
    return documents


def run_once(
    corpus: Path,
    out_dir: Path,
    tok_args: argparse.Namespace,
    domains: bool,
    workers: int,
    keep: bool = False,
    label_source=None,
):
    """One preprocessing run; returns ``(seconds, CPU seconds, tokens written)``.

    Labels from the corpus's field ``meta.src`` (``domains``), or from ``label_source`` if given.
    Removes its output unless ``keep`` (then it is ``out_dir / "bench_text_document"``).
    """
    from megatron_edl.data.preprocess import FieldLabel, PreprocessConfig, preprocess

    if label_source is None and domains:
        label_source = FieldLabel("meta.src")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = PreprocessConfig(
        inputs=(str(corpus),),
        output_prefix=str(out_dir / "bench"),
        label_source=label_source,
        append_eod=True,
        workers=workers,
        progress=False,
    )
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    stats = preprocess(config, tok_args)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    if not keep:
        shutil.rmtree(out_dir)
    return seconds, cpu, stats["text"]["tokens_written"]


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its reaped children (pool workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total
