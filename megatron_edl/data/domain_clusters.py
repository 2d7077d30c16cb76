"""Discovered domains: a topic model fitted on a sample of the corpus, and the labels it assigns.

For corpora without topic labels. ``megatron-edl-fit-domains`` reads the inputs once (JSONL,
gzip JSONL, Parquet: the readers of preprocessing), keeps a seeded reservoir sample of at most
``--sample-documents`` documents (each cut to ``--max-chars`` characters), and fits scikit-learn's
``TfidfVectorizer`` (a bounded vocabulary of ``--max-features`` terms) and ``MiniBatchKMeans``
(``--num-clusters`` K) on it. Each cluster is named by its index and the top terms of its
centroid (``03-theorem-proof-lemma``); the names are the label vocabulary of
``tools/preprocess_data.py --domain-clusters MODEL``, which assigns every document to its nearest
centroid inside the preprocessing workers. Memory is flat in the corpus size: the fit sees the
bounded sample only, and assignment streams with the chunks of preprocessing.

Deterministic: the same inputs, settings and seed give the same file and the same labels (for
any number of preprocessing workers). A document with no term of the model's vocabulary (empty
after tokenisation) has no label: ``--on-missing`` applies (fail, counted skip, or a named
fallback).

Coarse level (``--coarse-domains G --label-map-out map.yaml``): the K centroids are grouped into
G domains by scikit-learn's agglomerative clustering (Ward linkage on the normalised centroids),
each named by the top terms of its members' size-weighted mean centroid (``g1-king-war``); the
label map YAML (``megatron_edl.core.labels``) sends every cluster name to its group, so one
preprocessed corpus serves both granularities (``--moe-edl-label-map map.yaml``). A fine -> coarse
map of your own is just such a YAML file.

Model file (one file, format version 1): the line ``EDLDOMAINS``, one line of JSON (format,
version, scikit-learn version, settings, cluster names, coarse groups, sample counts, size and
SHA-256 of the payload), then the payload: a pickle of the fitted vectorizer and k-means. Loading
checks the magic, the version and the checksum before unpickling; a corrupt file or another
version is refused with one line naming the file. As with any pickle, load only model files you
made.

Usage:
    megatron-edl-fit-domains --input 'corpus/*.jsonl.gz' --output clusters.edlc \\
        --num-clusters 32 --seed 0 --coarse-domains 4 --label-map-out label_map_coarse.yaml
    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --output-prefix data/c \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model ./tokenizer --append-eod \\
        --domain-clusters clusters.edlc --on-missing fallback:unclustered

Shape legend (suffixes of array names):
    N  documents
    K  clusters
    F  features (terms of the vectorizer's vocabulary)
    G  coarse domains
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megatron_edl.core.options import EDLConfigError
from megatron_edl.data.errors import DataError
from megatron_edl.data.readers import InputError, expand_inputs, iter_chunks

__all__ = [
    "FORMAT_VERSION",
    "DomainModel",
    "FitSettings",
    "fit_domain_model",
    "main",
    "sample_texts",
]

logger = logging.getLogger(__name__)

MAGIC = b"EDLDOMAINS\n"
FORMAT = "megatron-edl domain clusters"
FORMAT_VERSION = 1
_MAX_HEADER_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitSettings:
    """How the topic model is fitted (the flags of ``megatron-edl-fit-domains``)."""

    num_clusters: int = 16
    """K: clusters, i.e. fine domains."""
    seed: int = 0
    """Seed of the reservoir sample and of k-means."""
    json_key: str = "text"
    """The record field holding the text."""
    sample_documents: int = 20_000
    """Most documents in the fitting sample (a seeded reservoir over all inputs)."""
    max_chars: int = 10_000
    """Characters of each document kept in the sample (and read when assigning)."""
    max_features: int = 50_000
    """Vocabulary size of the vectorizer (the most frequent terms of the sample)."""
    min_df: int = 2
    """Terms in fewer sample documents are left out."""
    max_df: float = 0.5
    """Terms in a larger fraction of the sample documents are left out (too common to tell
    topics apart)."""
    stop_words: str | None = "english"
    """scikit-learn's stop-word list, or ``None``."""
    n_init: int = 3
    """k-means restarts (the best inertia wins)."""
    batch_size: int = 4096
    """Mini-batch size of k-means."""
    top_terms: int = 3
    """Terms in a cluster's name."""
    coarse_domains: int | None = None
    """G: groups of clusters for the coarse label map (``None``: no coarse level)."""

    def __post_init__(self) -> None:
        for flag, value, low in (
            ("--num-clusters", self.num_clusters, 2),
            ("--sample-documents", self.sample_documents, 1),
            ("--max-chars", self.max_chars, 1),
            ("--max-features", self.max_features, 1),
            ("--min-df", self.min_df, 1),
            ("--n-init", self.n_init, 1),
            ("--batch-size", self.batch_size, 1),
            ("--top-terms", self.top_terms, 1),
        ):
            if value < low:
                raise DataError(f"{flag} must be >= {low}, got {value}")
        if not 0.0 < self.max_df <= 1.0:
            raise DataError(f"--max-df must lie in (0, 1], got {self.max_df}")
        if self.coarse_domains is not None and not 2 <= self.coarse_domains < self.num_clusters:
            raise DataError(
                f"--coarse-domains must lie in [2, --num-clusters), got {self.coarse_domains}"
            )


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def record_text(raw: bytes | dict, json_key: str) -> str | None:
    """The text of one raw record (a JSONL line or a Parquet row), or ``None`` if it has none."""
    if isinstance(raw, bytes):
        try:
            raw = json.loads(raw)
        except ValueError:  # invalid JSON or UTF-8: preprocessing counts these, the fit skips
            return None
        if not isinstance(raw, dict):
            return None
    text = raw.get(json_key)
    return text if isinstance(text, str) and text.strip() else None


def iter_texts(inputs: Sequence[str], json_key: str) -> Iterator[str]:
    """Every non-empty text of the inputs, in input order (records without one are left out)."""
    for index, path in enumerate(expand_inputs(inputs)):
        for chunk in iter_chunks(path, index, chunk_records=1024, chunk_bytes=4 << 20):
            for raw in chunk.records:
                text = record_text(raw, json_key)
                if text is not None:
                    yield text


def sample_texts(
    texts: Iterator[str], size: int, seed: int, max_chars: int
) -> tuple[list[str], int]:
    """A seeded uniform reservoir sample (Algorithm R) of at most ``size`` texts.

    Returns:
        ``(sample, texts seen)``; each sampled text cut to ``max_chars`` characters.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        if seen < size:
            sample.append(text[:max_chars])
        else:
            j = rng.randrange(seen + 1)
            if j < size:
                sample[j] = text[:max_chars]
        seen += 1
    return sample, seen


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class DomainModel:
    """A fitted topic model: vectorizer, k-means, cluster names (and optional coarse groups).

    Attributes:
        names: Cluster names, in cluster id order (the label vocabulary, id = cluster id).
        coarse: Coarse domain name of every cluster, or ``None``.
        header: The file's JSON header (settings, versions, sample counts).
    """

    def __init__(self, header: dict[str, Any], vectorizer: Any, kmeans: Any) -> None:
        self.header = header
        self.names: list[str] = list(header["names"])
        self.coarse: list[str] | None = header.get("coarse")
        self.max_chars = int(header["settings"]["max_chars"])
        self.vectorizer = vectorizer
        self.kmeans = kmeans

    def assign(self, texts: Sequence[str]) -> list[str | None]:
        """The cluster name of each text; ``None`` for a text without any known term."""
        if not texts:
            return []
        features_NF = self.vectorizer.transform([t[: self.max_chars] for t in texts])
        cluster_N = self.kmeans.predict(features_NF)
        has_terms_N = np.diff(features_NF.indptr) > 0
        return [
            self.names[k] if ok else None
            for k, ok in zip(cluster_N.tolist(), has_terms_N.tolist(), strict=True)
        ]

    def label_map(self) -> dict[str, Any]:
        """The coarse label map (``megatron_edl.core.labels`` format): cluster -> group."""
        if self.coarse is None:
            raise DataError("this domain model has no coarse level (fit with --coarse-domains)")
        return {
            "domains": list(dict.fromkeys(self.coarse)),
            "map": dict(zip(self.names, self.coarse, strict=True)),
            "default": None,
        }

    def write_label_map(self, path: str | os.PathLike) -> None:
        """Write :meth:`label_map` as YAML (loads with ``LabelMap.from_yaml``)."""
        text = (
            f"# Coarse label map of the domain model {self.header['settings']['num_clusters']} "
            "clusters -> groups (megatron-edl-fit-domains); use with --moe-edl-label-map.\n"
            "# default: documents with another label (a --on-missing fallback) take no part "
            "in EDL.\n"
        )
        text += yaml.safe_dump(self.label_map(), sort_keys=False, allow_unicode=True)
        Path(path).write_text(text, encoding="utf-8")

    # ------------------------------------------------------------------------------------------
    # File
    # ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the model file (format in the module docstring), atomically."""
        payload = pickle.dumps(
            {"vectorizer": self.vectorizer, "kmeans": self.kmeans}, protocol=pickle.HIGHEST_PROTOCOL
        )
        header = {
            **self.header,
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        }
        line = json.dumps(header, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
        tmp = Path(f"{os.fspath(path)}.tmp")
        tmp.write_bytes(MAGIC + line + payload)
        os.replace(tmp, path)

    @staticmethod
    def read_header(path: str | os.PathLike) -> dict[str, Any]:
        """The file's JSON header, after checking its magic and format version.

        Raises:
            DataError: naming the file, if it is not a domain model of this version.
        """
        with open(path, "rb") as f:
            return _read_header(f, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DomainModel:
        """Load and check a model file.

        Raises:
            DataError: one line naming the file, if it is missing, corrupt or of another
                format version.
        """
        name = os.fspath(path)
        try:
            with open(path, "rb") as f:
                header = _read_header(f, name)
                payload = f.read()
        except OSError as e:
            raise DataError(f"{name}: cannot read the domain model: {e}") from e
        digest = hashlib.sha256(payload).hexdigest()
        if len(payload) != header.get("payload_bytes") or digest != header.get("payload_sha256"):
            raise DataError(f"{name}: corrupt domain model (its payload checksum differs)")
        try:
            parts = pickle.loads(payload)
            vectorizer, kmeans = parts["vectorizer"], parts["kmeans"]
        except Exception as e:  # a payload that hashes right but does not unpickle
            raise DataError(f"{name}: corrupt domain model payload: {e}") from e
        import sklearn

        if header.get("sklearn") != sklearn.__version__:
            logger.warning(
                "%s was fitted with scikit-learn %s, this is %s",
                name,
                header.get("sklearn"),
                sklearn.__version__,
            )
        return cls(header, vectorizer, kmeans)


def _read_header(f: Any, name: str) -> dict[str, Any]:
    if f.read(len(MAGIC)) != MAGIC:
        raise DataError(
            f"{name}: not a megatron-edl domain model (no {MAGIC.strip().decode()} magic)"
        )
    line = f.readline(_MAX_HEADER_BYTES)
    try:
        header = json.loads(line)
    except ValueError as e:
        raise DataError(f"{name}: corrupt domain model header: {e}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DataError(f"{name}: corrupt domain model header (format is not {FORMAT!r})")
    if header.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{name}: domain model format version {header.get('version')!r}; this megatron-edl "
            f"reads version {FORMAT_VERSION} (fit it again with megatron-edl-fit-domains)"
        )
    names = header.get("names")
    if not isinstance(names, list) or not names or not isinstance(header.get("settings"), dict):
        raise DataError(f"{name}: corrupt domain model header (no cluster names)")
    return header


# ----------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------


def _top_terms(weights_F: np.ndarray, terms_F: np.ndarray, count: int) -> list[str]:
    order_F = np.argsort(-weights_F, kind="stable")[:count]
    return [str(terms_F[i]) for i in order_F if weights_F[i] > 0]


def fit_domain_model(texts: Sequence[str], settings: FitSettings, *, seen: int = 0) -> DomainModel:
    """Fit the vectorizer and k-means on a sample; name the clusters (and the coarse groups).

    Args:
        texts: The sample (:func:`sample_texts`).
        settings: The fit's settings.
        seen: Documents the sample was drawn from (recorded in the header).

    Returns:
        The model.

    Raises:
        DataError: if the sample has fewer documents with terms than clusters.
    """
    import sklearn
    from sklearn.cluster import AgglomerativeClustering, MiniBatchKMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(
        max_features=settings.max_features,
        min_df=settings.min_df,
        max_df=settings.max_df,
        stop_words=settings.stop_words,
        sublinear_tf=True,
        dtype=np.float32,
    )
    try:
        features_NF = vectorizer.fit_transform(texts)
    except ValueError as e:  # no term survives min_df / max_df / stop words
        raise DataError(f"the fitting sample ({len(texts)} documents) leaves no terms: {e}") from e
    has_terms_N = np.diff(features_NF.indptr) > 0
    usable = int(has_terms_N.sum())
    if usable < settings.num_clusters:
        raise DataError(
            f"--num-clusters {settings.num_clusters}: only {usable} sample documents have terms"
        )
    kmeans = MiniBatchKMeans(
        n_clusters=settings.num_clusters,
        random_state=settings.seed,
        n_init=settings.n_init,
        batch_size=settings.batch_size,
    )
    kmeans.fit(features_NF[has_terms_N])
    sizes_K = np.bincount(kmeans.labels_, minlength=settings.num_clusters)
    terms_F = vectorizer.get_feature_names_out()
    centers_KF = kmeans.cluster_centers_
    width = len(str(settings.num_clusters - 1))
    names = [
        "-".join([f"{k:0{width}d}", *_top_terms(centers_KF[k], terms_F, settings.top_terms)])
        for k in range(settings.num_clusters)
    ]
    coarse = None
    if settings.coarse_domains is not None:
        norms_K = np.linalg.norm(centers_KF, axis=1, keepdims=True)
        unit_KF = centers_KF / np.maximum(norms_K, 1e-12)
        group_K = AgglomerativeClustering(
            n_clusters=settings.coarse_domains, linkage="ward"
        ).fit_predict(unit_KF)
        # Groups numbered by their first cluster, so the numbering follows the cluster ids.
        order = list(dict.fromkeys(group_K.tolist()))
        group_names = {}
        for g, raw in enumerate(order):
            members_K = group_K == raw
            mean_F = (sizes_K[members_K, None] * centers_KF[members_K]).sum(axis=0)
            group_names[raw] = "-".join([f"g{g}", *_top_terms(mean_F, terms_F, settings.top_terms)])
        coarse = [group_names[g] for g in group_K.tolist()]
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sklearn": sklearn.__version__,
        "settings": dataclasses.asdict(settings),
        "names": names,
        "coarse": coarse,
        "sample": {
            "documents_seen": seen,
            "documents": len(texts),
            "characters": sum(map(len, texts)),
            "documents_with_terms": usable,
            "cluster_documents": sizes_K.tolist(),
            "features": len(terms_F),
        },
    }
    return DomainModel(header, vectorizer, kmeans)


def fit_from_inputs(inputs: Sequence[str], settings: FitSettings) -> DomainModel:
    """Sample the inputs (:func:`sample_texts`) and fit (:func:`fit_domain_model`)."""
    texts, seen = sample_texts(
        iter_texts(inputs, settings.json_key),
        settings.sample_documents,
        settings.seed,
        settings.max_chars,
    )
    if not texts:
        raise DataError(f"--input {list(inputs)}: no record has a text in {settings.json_key!r}")
    return fit_domain_model(texts, settings, seen=seen)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``megatron-edl-fit-domains``."""
    defaults = FitSettings()
    parser = argparse.ArgumentParser(
        description=description or __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--input", nargs="+", required=True, help="Files or globs (JSONL/Parquet).")
    parser.add_argument("--output", required=True, help="The model file to write.")
    parser.add_argument("--json-key", default=defaults.json_key, help="Field of the text.")
    parser.add_argument("--num-clusters", type=int, default=defaults.num_clusters)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--sample-documents", type=int, default=defaults.sample_documents)
    parser.add_argument("--max-chars", type=int, default=defaults.max_chars)
    parser.add_argument("--max-features", type=int, default=defaults.max_features)
    parser.add_argument("--min-df", type=int, default=defaults.min_df)
    parser.add_argument("--max-df", type=float, default=defaults.max_df)
    parser.add_argument(
        "--stop-words",
        default=defaults.stop_words,
        help="scikit-learn's stop-word list ('english') or 'none'.",
    )
    parser.add_argument("--n-init", type=int, default=defaults.n_init)
    parser.add_argument("--top-terms", type=int, default=defaults.top_terms)
    parser.add_argument(
        "--coarse-domains",
        type=int,
        default=None,
        help="Also group the clusters into this many coarse domains (needs --label-map-out).",
    )
    parser.add_argument("--label-map-out", help="Write the coarse label map YAML here.")
    return parser


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Command-line entry point (``megatron-edl-fit-domains``, ``tools/fit_domains.py``)."""
    args = build_parser(description).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if (args.coarse_domains is None) != (args.label_map_out is None):
            raise DataError("--coarse-domains and --label-map-out go together")
        settings = FitSettings(
            num_clusters=args.num_clusters,
            seed=args.seed,
            json_key=args.json_key,
            sample_documents=args.sample_documents,
            max_chars=args.max_chars,
            max_features=args.max_features,
            min_df=args.min_df,
            max_df=args.max_df,
            stop_words=None if args.stop_words in (None, "none") else args.stop_words,
            n_init=args.n_init,
            top_terms=args.top_terms,
            coarse_domains=args.coarse_domains,
        )
        start = time.perf_counter()
        model = fit_from_inputs(args.input, settings)
        model.save(args.output)
        if args.label_map_out:
            model.write_label_map(args.label_map_out)
    except (DataError, EDLConfigError, InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sample = model.header["sample"]
    print(
        f"Fitted {len(model.names)} clusters on {sample['documents']} of "
        f"{sample['documents_seen']} documents ({sample['features']} terms) in "
        f"{time.perf_counter() - start:.1f} s: {args.output}"
    )
    coarse = model.coarse or [""] * len(model.names)
    for name, size, group in zip(model.names, sample["cluster_documents"], coarse, strict=True):
        print(f"  {name}: {size} sample documents{f' -> {group}' if group else ''}")
    if args.label_map_out:
        print(f"Coarse label map: {args.label_map_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
