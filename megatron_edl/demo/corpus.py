"""Build a multi-domain text corpus offline, from what a Linux machine with Python already has.

The quickstart needs real text with natural domain labels and no download. This module gathers
it from the machine (and from sympy, which torch installs), in eight fine domains grouped into
three coarse ones (three, so that expert loads can be drawn on a ternary plot):

=================  =======  ==========================================================
fine domain        coarse   sources (root names in brackets, see ``SourceRoots``)
=================  =======  ==========================================================
``code/python``    code     Python standard library sources, without tests [python_stdlib]
``code/c``         code     C headers [include]
``text/en``        text     English manual pages, sections 1/5/7/8 [man]; Python's
                            documentation topics (``pydoc_data``, part of the stdlib)
``text/de``        text     German manual pages [man]
``text/fr``        text     French manual pages [man]
``text/legal``     text     License texts [licenses]; packages' copyright files [doc]
``math/problems``  math     Worked problems in plain text, generated with sympy
``math/latex``     math     LaTeX derivations, generated with sympy
=================  =======  ==========================================================

Manual pages are turned into text by :mod:`megatron_edl.demo.roff`, the mathematics is generated
by :mod:`megatron_edl.demo.mathgen`. The German and French pages are those the base system
installs; some of their paragraphs are untranslated English.

How a domain is filled (all of it deterministic given ``seed`` and the machine's files):

1. Each source lists its files (sorted), groups them into *families* (a manual page's name
   prefix such as ``git`` or ``gcloud``, a header's top folder, a stdlib package), shuffles the
   files of each family and the order of the families with a generator seeded by
   ``(seed, domain, source)``, and yields the files round-robin over families. Thousands of
   near-identical pages of one family cannot crowd out the rest.
2. The domain takes one file from each of its sources in turn, converts it to text, and cuts it
   into documents at paragraph boundaries (about ``target_chars`` characters, at most
   ``max_chars``, documents under ``min_chars`` dropped), taking at most ``max_bytes_per_file``
   bytes of documents from one file.
3. Exact duplicates (same text, in any domain filled earlier) are dropped and counted.
4. It stops at ``max_bytes_per_domain`` UTF-8 bytes (plus at most one document) or at
   ``max_documents_per_domain`` documents: every domain gets the same budget.
5. Each document goes to the validation split when the first 64 bits of the SHA-256 of its
   text, as a fraction of 2^64, are below ``valid_fraction``: a document's split never depends
   on the seed, the caps or the other documents.

A source that is not on the machine (no such folder, no files, sympy not importable) is reported
as missing with the reason; a domain whose every source is missing is left out (and its label
with it). Nothing is dropped silently: ``corpus.json`` and the printed table count, per source,
the files found, used, skipped (alias pages, unreadable, empty) and the documents and bytes
taken, and per domain the duplicates dropped and the train/validation split. ``require_all``
turns any missing source into an error; fewer than two domains is always one.

Outputs, in ``output_dir``:

* ``train.jsonl`` and ``valid.jsonl``: one record per document, ``{"text", "domain", "group",
  "source"}``, shuffled (seeded). ``tools/preprocess_data.py --domain-field domain
  --label-vocab labels.yaml`` reads them.
* ``labels.yaml``: the label vocabulary (fine domain -> id, in the table's order, present
  domains only).
* ``label_map_coarse.yaml``: the training label map (``--moe-edl-label-map``) from fine labels to
  the three coarse domains (``megatron_edl.core.labels.LabelMap`` format).
* ``corpus.json``: the configuration, the per-source and per-domain counts, the output files.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import glob
import gzip
import hashlib
import json
import logging
import os
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_edl.config import EDLConfigError
from megatron_edl.data.errors import DataError

__all__ = [
    "DOMAINS",
    "CorpusConfig",
    "CorpusError",
    "CorpusReport",
    "DomainSpec",
    "SourceRoots",
    "build_corpus",
    "chunk_text",
    "main",
    "split_of",
]

logger = logging.getLogger(__name__)

TRAIN_FILE = "train.jsonl"
VALID_FILE = "valid.jsonl"
VOCABULARY_FILE = "labels.yaml"
COARSE_MAP_FILE = "label_map_coarse.yaml"
REPORT_FILE = "corpus.json"
FORMAT_VERSION = 1


class CorpusError(ValueError):
    """The corpus cannot be built as asked (bad setting, or too few sources on this machine)."""


# ----------------------------------------------------------------------------------------------
# Where sources live
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceRoots:
    """Folders the file sources read from; override one with ``--root NAME=PATH``."""

    python_stdlib: Path | None = None
    """Python's standard library; ``None``: this interpreter's (``sysconfig``)."""

    include: Path = Path("/usr/include")
    """C headers."""

    man: Path = Path("/usr/share/man")
    """Manual pages (``man1/``, ``de/man1/``, ...)."""

    licenses: Path = Path("/usr/share/common-licenses")
    """Full texts of common licenses."""

    doc: Path = Path("/usr/share/doc")
    """Package documentation (``<package>/copyright``)."""

    def get(self, name: str) -> Path:
        """The folder of root ``name``."""
        value = getattr(self, name)
        if value is None and name == "python_stdlib":
            return Path(sysconfig.get_paths()["stdlib"])
        return Path(value)

    def with_overrides(self, overrides: Mapping[str, str | os.PathLike]) -> SourceRoots:
        """A copy with some roots replaced.

        Args:
            overrides: Root name -> folder.

        Returns:
            The new roots.

        Raises:
            CorpusError: naming an unknown root.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise CorpusError(f"unknown source root(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **{k: Path(v) for k, v in overrides.items()})


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OpenedSource:
    """A source ready to read: its items, or why it has none.

    Attributes:
        items: ``(reference, text)`` pairs; ``text`` is ``None`` for a skipped file (an alias
            page, unreadable, not text).
        files_found: Files the source can read (``None`` for a generated source).
        missing: Why the source has nothing on this machine (``None`` if it is available).
    """

    items: Iterator[tuple[str, str | None]]
    files_found: int | None
    missing: str | None = None


def _read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_man_page(path: Path) -> str | None:
    from megatron_edl.demo.roff import roff_to_text

    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError:
        source = data.decode("latin-1")
    return roff_to_text(source)


def _first_part(path: str) -> str:
    return path.split("/", 1)[0]


def _page_family(path: str) -> str:
    """``man1/git-log.1.gz`` -> ``git``; ``man1/gcloud_ai_x.1.gz`` -> ``gcloud``."""
    name = path.rsplit("/", 1)[-1]
    return re.split(r"[-_.]", name, maxsplit=1)[0].lower() or name


def _interleave_families(
    paths: Sequence[str], family: Callable[[str], str], rng: random.Random
) -> list[str]:
    """Shuffle each family's members and the family order, then take members round-robin."""
    groups: dict[str, list[str]] = {}
    for path in sorted(paths):
        groups.setdefault(family(path), []).append(path)
    keys = sorted(groups)
    rng.shuffle(keys)
    queues = []
    for key in keys:
        rng.shuffle(groups[key])
        queues.append(groups[key])
    out: list[str] = []
    depth = 0
    while queues:
        out.extend(queue[depth] for queue in queues)
        depth += 1
        queues = [queue for queue in queues if len(queue) > depth]
    return out


@dataclasses.dataclass(frozen=True)
class FileSource:
    """Files under one root matching glob patterns, read and converted by ``reader``.

    Attributes:
        name: Short name (reports, document references).
        description: What the files are.
        root: Name of the root folder (a field of :class:`SourceRoots`).
        patterns: Globs relative to the root (``**`` spans folders).
        reader: File -> text, or ``None`` to skip the file (counted).
        family: Relative path -> family key (see the module docstring).
        exclude_parts: Path components that exclude a file (e.g. ``test``).
    """

    name: str
    description: str
    root: str
    patterns: tuple[str, ...]
    reader: Callable[[Path], str | None] = _read_text
    family: Callable[[str], str] = _first_part
    exclude_parts: frozenset[str] = frozenset()

    def open(self, roots: SourceRoots, rng: random.Random) -> OpenedSource:
        """List the files and return them in family-interleaved order (see the module doc)."""
        root = roots.get(self.root)
        if not root.is_dir():
            return OpenedSource(iter(()), 0, f"no folder {root} (root {self.root!r})")
        found = self._list(root)
        if not found:
            shown = ", ".join(self.patterns)
            return OpenedSource(iter(()), 0, f"no files match {shown} under {root}")
        ordered = _interleave_families(list(found), self.family, rng)

        def items() -> Iterator[tuple[str, str | None]]:
            for relative in ordered:
                try:
                    text = self.reader(root / relative)
                except (OSError, EOFError, ValueError) as err:  # unreadable: counted, skipped
                    logger.debug("skipping %s: %s", root / relative, err)
                    text = None
                yield f"{self.name}:{relative}", text

        return OpenedSource(items(), len(found))

    def _list(self, root: Path) -> list[str]:
        """Regular files (not links) matching a pattern, as ``/``-separated paths relative to
        ``root``; folders named in ``exclude_parts`` are never entered."""
        found: set[str] = set()
        for pattern in self.patterns:
            folder_pattern, _, name_pattern = pattern.rpartition("/")
            if folder_pattern == "**":
                folders = []
                for folder, subfolders, _ in os.walk(root):
                    subfolders[:] = sorted(d for d in subfolders if d not in self.exclude_parts)
                    folders.append(os.path.relpath(folder, root))
            elif folder_pattern:
                folders = [
                    os.path.relpath(p, root) for p in glob.glob(os.path.join(root, folder_pattern))
                ]
            else:
                folders = ["."]
            for folder in folders:
                if self.exclude_parts.intersection(Path(folder).parts):
                    continue
                try:
                    entries = list(os.scandir(os.path.join(root, folder)))
                except (NotADirectoryError, FileNotFoundError):
                    continue
                for entry in entries:
                    if entry.is_file(follow_symlinks=False) and fnmatch.fnmatch(
                        entry.name, name_pattern
                    ):
                        relative = entry.name if folder == "." else f"{folder}/{entry.name}"
                        found.add(relative.replace(os.sep, "/"))
        return sorted(found)


@dataclasses.dataclass(frozen=True)
class PydocTopicsSource:
    """Python's documentation topics (``pydoc_data.topics``: the language reference's sections)."""

    name: str = "pydoc-topics"
    description: str = "Python documentation topics (pydoc_data)"

    def open(self, roots: SourceRoots, rng: random.Random) -> OpenedSource:
        """One item per topic, in a seeded order."""
        try:
            from pydoc_data.topics import topics
        except ImportError as err:
            return OpenedSource(iter(()), 0, f"pydoc_data is not importable ({err})")
        names = sorted(topics)
        rng.shuffle(names)
        return OpenedSource(((f"{self.name}:{n}", topics[n]) for n in names), len(names))


@dataclasses.dataclass(frozen=True)
class GeneratedSource:
    """Documents from a generator function of a ``random.Random`` (endless).

    Attributes:
        name: Short name.
        description: What the documents are.
        generate: ``rng -> iterator of documents``.
        requires: Module that must be importable (else the source is missing).
    """

    name: str
    description: str
    generate: Callable[[random.Random], Iterator[str]]
    requires: str

    def open(self, roots: SourceRoots, rng: random.Random) -> OpenedSource:
        """The generator's documents, numbered."""
        import importlib.util

        if importlib.util.find_spec(self.requires) is None:
            return OpenedSource(iter(()), None, f"{self.requires} is not installed")
        documents = self.generate(rng)
        return OpenedSource(((f"{self.name}:{i}", text) for i, text in enumerate(documents)), None)


def _problems(rng: random.Random) -> Iterator[str]:
    from megatron_edl.demo.mathgen import problem_documents

    return problem_documents(rng)


def _derivations(rng: random.Random) -> Iterator[str]:
    from megatron_edl.demo.mathgen import latex_documents

    return latex_documents(rng)


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """A fine domain: its label, its coarse group and its sources (read in turn)."""

    name: str
    group: str
    description: str
    sources: tuple[FileSource | PydocTopicsSource | GeneratedSource, ...]


_MAN_EN = tuple(f"man{s}/*" for s in "1578")

DOMAINS: tuple[DomainSpec, ...] = (
    DomainSpec(
        "code/python",
        "code",
        "Python standard library sources",
        (
            FileSource(
                "python-stdlib",
                "Python standard library modules (no tests)",
                "python_stdlib",
                ("**/*.py",),
                exclude_parts=frozenset(
                    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
                ),
            ),
        ),
    ),
    DomainSpec(
        "code/c",
        "code",
        "C headers",
        (FileSource("c-headers", "C header files", "include", ("**/*.h",)),),
    ),
    DomainSpec(
        "text/en",
        "text",
        "English manual pages and Python documentation",
        (
            FileSource(
                "man-en", "English manual pages", "man", _MAN_EN, _read_man_page, _page_family
            ),
            PydocTopicsSource(),
        ),
    ),
    DomainSpec(
        "text/de",
        "text",
        "German manual pages",
        (
            FileSource(
                "man-de", "German manual pages", "man", ("de/man*/*",), _read_man_page, _page_family
            ),
        ),
    ),
    DomainSpec(
        "text/fr",
        "text",
        "French manual pages",
        (
            FileSource(
                "man-fr", "French manual pages", "man", ("fr/man*/*",), _read_man_page, _page_family
            ),
        ),
    ),
    DomainSpec(
        "text/legal",
        "text",
        "License texts",
        (
            FileSource("licenses", "Common license texts", "licenses", ("*",)),
            FileSource("copyright", "Packages' copyright files", "doc", ("*/copyright",)),
        ),
    ),
    DomainSpec(
        "math/problems",
        "math",
        "Worked math problems in plain text (generated with sympy)",
        (GeneratedSource("sympy-problems", "Worked problems (sympy)", _problems, "sympy"),),
    ),
    DomainSpec(
        "math/latex",
        "math",
        "LaTeX derivations (generated with sympy)",
        (GeneratedSource("sympy-latex", "LaTeX derivations (sympy)", _derivations, "sympy"),),
    ),
)
"""The catalogue (order = label ids)."""


# ----------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------


def chunk_text(text: str, *, target_chars: int, max_chars: int, min_chars: int) -> list[str]:
    """Cut ``text`` into documents at paragraph (blank line) boundaries.

    Paragraphs are joined until a document reaches ``target_chars``; a paragraph longer than
    ``max_chars`` is cut at line ends (a longer line is cut hard). Lines keep their indentation
    (code), trailing whitespace is removed, and documents shorter than ``min_chars`` are dropped.

    Args:
        text: The text of one file.
        target_chars: Characters after which a document is closed.
        max_chars: Most characters of a document.
        min_chars: Fewest characters of a kept document.

    Returns:
        The documents, in order.
    """
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line:
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    pieces: list[str] = []
    for paragraph in paragraphs:
        while len(paragraph) > max_chars:
            cut = paragraph.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(paragraph[:cut])
            paragraph = paragraph[cut:].lstrip("\n")
        if paragraph:
            pieces.append(paragraph)
    documents: list[str] = []
    buffer: list[str] = []
    size = 0
    for piece in pieces:
        if buffer and size + 2 + len(piece) > max_chars:
            documents.append("\n\n".join(buffer))
            buffer, size = [], 0
        buffer.append(piece)
        size += len(piece) + (2 if size else 0)
        if size >= target_chars:
            documents.append("\n\n".join(buffer))
            buffer, size = [], 0
    if buffer:
        documents.append("\n\n".join(buffer))
    return [doc for doc in documents if len(doc) >= min_chars]


def document_digest(text: str) -> bytes:
    """SHA-256 of a document's UTF-8 text (duplicates, split)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_of(text: str, valid_fraction: float) -> str:
    """``"valid"`` or ``"train"``: the document's split, from the hash of its text alone.

    The first 8 bytes of the SHA-256, as an integer u, put it in ``valid`` when
    ``u / 2**64 < valid_fraction``.
    """
    value = int.from_bytes(document_digest(text)[:8], "big")
    return "valid" if value < valid_fraction * 2**64 else "train"


# ----------------------------------------------------------------------------------------------
# Configuration and report
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """What to build (the flags of ``tools/build_corpus.py``)."""

    output_dir: Path
    """Folder of the outputs (created)."""

    seed: int = 1234
    """Seed of file selection, generated math and the output order."""

    max_bytes_per_domain: int = 1 << 20
    """UTF-8 bytes of documents per domain (train + validation); the balance cap. > 0."""

    max_documents_per_domain: int | None = None
    """Also stop a domain at this many documents; ``None``: no document cap."""

    valid_fraction: float = 0.1
    """Expected fraction of documents in the validation split; in [0, 1)."""

    max_bytes_per_file: int = 8 << 10
    """Bytes of documents taken from one file (more files, more variety). > 0."""

    target_chars: int = 1024
    """Characters after which a document is closed."""

    max_chars: int = 2048
    """Most characters per document."""

    min_chars: int = 128
    """Shorter documents are dropped."""

    domains: tuple[str, ...] | None = None
    """Fine domains to build (names from ``DOMAINS``); ``None``: all."""

    roots: SourceRoots = dataclasses.field(default_factory=SourceRoots)
    """Where the file sources are."""

    require_all: bool = False
    """Fail if any source of a selected domain is missing."""

    def __post_init__(self) -> None:
        if self.max_bytes_per_domain <= 0:
            raise CorpusError(
                f"--max-bytes-per-domain must be > 0, got {self.max_bytes_per_domain}"
            )
        if self.max_documents_per_domain is not None and self.max_documents_per_domain <= 0:
            raise CorpusError(
                f"--max-documents-per-domain must be > 0, got {self.max_documents_per_domain}"
            )
        if not 0.0 <= self.valid_fraction < 1.0:
            raise CorpusError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.max_bytes_per_file <= 0:
            raise CorpusError(f"--max-bytes-per-file must be > 0, got {self.max_bytes_per_file}")
        if not 0 < self.min_chars <= self.target_chars <= self.max_chars:
            raise CorpusError(
                "document sizes must satisfy 0 < min <= target <= max, got "
                f"min={self.min_chars}, target={self.target_chars}, max={self.max_chars}"
            )
        if self.domains is not None:
            known = [spec.name for spec in DOMAINS]
            unknown = [name for name in self.domains if name not in known]
            if unknown or not self.domains:
                raise CorpusError(f"--domains: unknown domain(s) {unknown}; known: {known}")

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (the roots resolved to folders)."""
        out = dataclasses.asdict(self)
        out["output_dir"] = os.fspath(self.output_dir)
        out["roots"] = {
            f.name: os.fspath(self.roots.get(f.name)) for f in dataclasses.fields(self.roots)
        }
        out["domains"] = list(self.domains) if self.domains is not None else None
        return out


@dataclasses.dataclass
class SourceReport:
    """Counts of one source of one domain."""

    name: str
    description: str
    missing: str | None
    files_found: int | None
    files_used: int = 0
    files_skipped: int = 0
    documents: int = 0
    bytes: int = 0


@dataclasses.dataclass
class DomainReport:
    """Counts of one fine domain."""

    name: str
    group: str
    description: str
    status: str
    """``full`` (the cap was reached), ``short`` (every source ran out first) or ``missing``."""
    sources: list[SourceReport]
    documents: int = 0
    bytes: int = 0
    train_documents: int = 0
    valid_documents: int = 0
    duplicates: int = 0


@dataclasses.dataclass
class CorpusReport:
    """What was built: per-domain and per-source counts, and the output files."""

    config: dict[str, Any]
    domains: list[DomainReport]
    outputs: dict[str, str]

    @property
    def present(self) -> list[DomainReport]:
        """Domains with documents, in catalogue order."""
        return [d for d in self.domains if d.status != "missing"]

    @property
    def missing_sources(self) -> list[tuple[str, SourceReport]]:
        """``(domain, source)`` of every source that is not on this machine."""
        return [(d.name, s) for d in self.domains for s in d.sources if s.missing]

    def to_json(self) -> dict[str, Any]:
        """The JSON document written to ``corpus.json``."""
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "domains": [dataclasses.asdict(d) for d in self.domains],
            "outputs": self.outputs,
        }

    def table(self) -> str:
        """A plain-text table: one line per domain, then one per missing source."""
        header = (
            f"{'domain':<15} {'group':<5} {'status':<7} {'docs':>6} {'train':>6} "
            f"{'valid':>5} {'KiB':>7} {'dups':>5}  sources (files used/found)"
        )
        lines = [header, "-" * len(header)]
        for d in self.domains:
            sources = ", ".join(
                f"{s.name} {s.files_used}/{s.files_found if s.files_found is not None else '-'}"
                for s in d.sources
                if not s.missing
            )
            lines.append(
                f"{d.name:<15} {d.group:<5} {d.status:<7} {d.documents:>6} "
                f"{d.train_documents:>6} {d.valid_documents:>5} {d.bytes / 1024:>7.0f} "
                f"{d.duplicates:>5}  {sources or '-'}"
            )
        for domain, source in self.missing_sources:
            lines.append(f"missing source {source.name} ({domain}): {source.missing}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Document:
    text: str
    domain: str
    group: str
    source: str
    split: str


def _fill_domain(
    spec: DomainSpec,
    config: CorpusConfig,
    seen: set[bytes],
    progress: Any,
) -> tuple[list[_Document], DomainReport]:
    opened = []
    reports = []
    for source in spec.sources:
        rng = random.Random(f"{config.seed}/{spec.name}/{source.name}")
        handle = source.open(config.roots, rng)
        opened.append(handle)
        reports.append(
            SourceReport(source.name, source.description, handle.missing, handle.files_found)
        )
    report = DomainReport(spec.name, spec.group, spec.description, "missing", reports)
    documents: list[_Document] = []
    active = [i for i, handle in enumerate(opened) if handle.missing is None]

    def full() -> bool:
        if report.bytes >= config.max_bytes_per_domain:
            return True
        cap = config.max_documents_per_domain
        return cap is not None and report.documents >= cap

    while active and not full():
        for i in list(active):
            if full():
                break
            try:
                ref, text = next(opened[i].items)
            except StopIteration:
                active.remove(i)
                continue
            source_report = reports[i]
            if text is None:
                source_report.files_skipped += 1
                continue
            chunks = chunk_text(
                text,
                target_chars=config.target_chars,
                max_chars=config.max_chars,
                min_chars=config.min_chars,
            )
            if not chunks:
                source_report.files_skipped += 1
                continue
            source_report.files_used += 1
            taken = 0
            for k, chunk in enumerate(chunks):
                if taken >= config.max_bytes_per_file or full():
                    break
                digest = document_digest(chunk)
                if digest in seen:
                    report.duplicates += 1
                    continue
                seen.add(digest)
                size = len(chunk.encode("utf-8"))
                split = split_of(chunk, config.valid_fraction)
                documents.append(_Document(chunk, spec.name, spec.group, f"{ref}#{k}", split))
                taken += size
                source_report.documents += 1
                source_report.bytes += size
                report.documents += 1
                report.bytes += size
                if split == "valid":
                    report.valid_documents += 1
                else:
                    report.train_documents += 1
                progress.update(size)
    if report.documents:
        report.status = "full" if full() else "short"
    return documents, report


def _write_jsonl(path: Path, documents: Sequence[_Document]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            record = {"text": doc.text, "domain": doc.domain, "group": doc.group}
            record["source"] = doc.source
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_label_files(output_dir: Path, present: Sequence[DomainReport]) -> None:
    import yaml

    from megatron_edl.core.labels import LabelMap
    from megatron_edl.data.vocabulary import LabelVocabulary

    vocabulary = LabelVocabulary({d.name: i for i, d in enumerate(present)}, source="corpus")
    vocabulary.to_yaml(output_dir / VOCABULARY_FILE)
    groups = list(dict.fromkeys(d.group for d in present))
    coarse = {"domains": groups, "map": {d.name: d.group for d in present}}
    path = output_dir / COARSE_MAP_FILE
    header = (
        "# Label map: the corpus's fine domains -> coarse loss domains "
        "(--moe-edl-label-map; format: megatron_edl.core.labels).\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(coarse, sort_keys=False, allow_unicode=True))
    LabelMap.from_yaml(tmp, vocabulary=vocabulary.as_dict())  # refuses a map it cannot read
    os.replace(tmp, path)


def build_corpus(config: CorpusConfig, *, show_progress: bool | None = None) -> CorpusReport:
    """Build the corpus (see the module docstring) and write its files.

    Args:
        config: What to build.
        show_progress: tqdm bars (``None``: only on a terminal).

    Returns:
        The report (also written to ``corpus.json``).

    Raises:
        CorpusError: if ``require_all`` and a source is missing, or fewer than two domains have
            documents.
    """
    from tqdm import tqdm

    specs = [s for s in DOMAINS if config.domains is None or s.name in config.domains]
    seen: set[bytes] = set()
    documents: list[_Document] = []
    reports: list[DomainReport] = []
    for spec in specs:
        with tqdm(
            total=config.max_bytes_per_domain,
            desc=f"{spec.name:<14}",
            unit="B",
            unit_scale=True,
            file=sys.stderr,
            disable=(not show_progress) if show_progress is not None else None,
            leave=True,
        ) as progress:
            docs, report = _fill_domain(spec, config, seen, progress)
        documents += docs
        reports.append(report)
        logger.info(
            "%s: %s, %d documents, %.0f KiB", spec.name, report.status, report.documents,
            report.bytes / 1024,
        )  # fmt: skip
    result = CorpusReport(config.to_json(), reports, {})
    if config.require_all and result.missing_sources:
        listed = "; ".join(f"{s.name} ({d}): {s.missing}" for d, s in result.missing_sources)
        raise CorpusError(f"--require-all: missing source(s): {listed}")
    if len(result.present) < 2:
        raise CorpusError(
            "fewer than two domains have documents on this machine:\n" + result.table()
        )

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    random.Random(f"{config.seed}/order").shuffle(documents)
    splits = {
        TRAIN_FILE: [d for d in documents if d.split == "train"],
        VALID_FILE: [d for d in documents if d.split == "valid"],
    }
    for name, docs in splits.items():
        _write_jsonl(output_dir / name, docs)
    _write_label_files(output_dir, result.present)
    result.outputs = {
        "train": TRAIN_FILE,
        "valid": VALID_FILE,
        "label_vocabulary": VOCABULARY_FILE,
        "label_map_coarse": COARSE_MAP_FILE,
    }
    tmp = output_dir / (REPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    os.replace(tmp, output_dir / REPORT_FILE)
    return result


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"512K"``, ``"2M"``, ``"1G"`` or a plain number of bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512K, 2M)")
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " ")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``tools/build_corpus.py`` / ``megatron-edl-build-corpus``."""
    parser = argparse.ArgumentParser(
        description=description or __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--output-dir", required=False, help="Folder of the outputs.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed (default 1234).")
    parser.add_argument(
        "--max-bytes-per-domain",
        type=parse_size,
        default=1 << 20,
        help="Bytes of text per domain, e.g. 512K, 2M (default 1M).",
    )
    parser.add_argument(
        "--max-documents-per-domain", type=int, default=None, help="Documents per domain."
    )
    parser.add_argument(
        "--valid-fraction", type=float, default=0.1, help="Validation share (default 0.1)."
    )
    parser.add_argument(
        "--max-bytes-per-file",
        type=parse_size,
        default=8 << 10,
        help="Bytes taken from one file (default 8K).",
    )
    parser.add_argument(
        "--document-chars",
        type=int,
        nargs=3,
        metavar=("MIN", "TARGET", "MAX"),
        default=(128, 1024, 2048),
        help="Document size in characters (default 128 1024 2048).",
    )
    parser.add_argument(
        "--domains", nargs="+", default=None, help="Fine domains to build (default: all)."
    )
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="Override a source folder: "
        + ", ".join(f.name for f in dataclasses.fields(SourceRoots))
        + ".",
    )
    parser.add_argument("--require-all", action="store_true", help="Fail if any source is missing.")
    parser.add_argument(
        "--list",
        action="store_true",
        help="Print the domains and whether each source is on this machine; build nothing.",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> CorpusConfig:
    """Turn parsed flags into a :class:`CorpusConfig`."""
    overrides = {}
    for item in args.root:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CorpusError(f"--root must be NAME=PATH, got {item!r}")
        overrides[name] = path
    min_chars, target_chars, max_chars = args.document_chars
    return CorpusConfig(
        output_dir=Path(args.output_dir or "."),
        seed=args.seed,
        max_bytes_per_domain=args.max_bytes_per_domain,
        max_documents_per_domain=args.max_documents_per_domain,
        valid_fraction=args.valid_fraction,
        max_bytes_per_file=args.max_bytes_per_file,
        min_chars=min_chars,
        target_chars=target_chars,
        max_chars=max_chars,
        domains=tuple(args.domains) if args.domains else None,
        roots=SourceRoots().with_overrides(overrides),
        require_all=args.require_all,
    )


def list_sources(config: CorpusConfig) -> str:
    """One line per source of each selected domain: available (files) or missing (why)."""
    lines = []
    for spec in DOMAINS:
        if config.domains is not None and spec.name not in config.domains:
            continue
        lines.append(f"{spec.name} ({spec.group}): {spec.description}")
        for source in spec.sources:
            handle = source.open(config.roots, random.Random(0))
            if handle.missing:
                state = f"MISSING: {handle.missing}"
            elif handle.files_found is None:
                state = "generated"
            else:
                state = f"{handle.files_found} files"
            lines.append(f"  {source.name:<15} {state}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Command-line entry point; returns the exit status (1 for a configuration problem)."""
    args = build_parser(description).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
        if args.list:
            print(list_sources(config))
            return 0
        if not args.output_dir:
            raise CorpusError("--output-dir is required (unless --list)")
        report = build_corpus(config)
    except (CorpusError, DataError, EDLConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.table())
    print(f"corpus written to {config.output_dir} ({REPORT_FILE}: counts and settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
