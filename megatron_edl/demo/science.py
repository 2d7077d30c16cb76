"""The raw results behind docs/science.md, and the tables regenerated from them.

Usage:
    python -m megatron_edl.demo.science export --workdir runs/study-fresh \\
        --study examples/studies/fresh_seeds.yaml --out docs/science/fresh_seeds.json
    python -m megatron_edl.demo.science tables            # rewrite the tables in docs/science.md
    python -m megatron_edl.demo.science tables --check    # exit 1 if a table differs

``export`` takes a study's ``report/study.json`` (every run's own numbers: validation LM loss
overall and per domain, dense and hard I(D;E), the pruning curves) and adds the commit (HEAD at
export), the corpus fingerprint (SHA-256 of the train and validation JSONL) and the corpus's
per-domain document counts: a small JSON file per study beside docs/science.md. ``tables``
recomputes every study's tables (mean ± SE per arm, paired 95 % t-intervals against the
reference arm) from those runs alone and writes them between the markers
``<!-- tables:NAME -->`` and ``<!-- /tables:NAME -->`` of docs/science.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_edl.demo import study as st

__all__ = ["export", "main", "render_tables", "update_document"]

RESULTS_DIR = Path("docs") / "science"
DOCUMENT = Path("docs") / "science.md"
_DROPPED_RUN_KEYS = ("probe_per_layer",)  # per-layer detail: in the study's own report


def _corpus(workdir: Path) -> dict[str, Any]:
    corpus = workdir / "corpus"
    digest = hashlib.sha256()
    for name in ("train.jsonl", "valid.jsonl"):
        digest.update((corpus / name).read_bytes())
    meta = json.loads((corpus / "corpus.json").read_text(encoding="utf-8"))
    return {
        "sha256": digest.hexdigest(),
        "domains": [
            {k: d.get(k) for k in ("name", "group", "train_documents", "valid_documents", "bytes")}
            for d in meta["domains"]
        ],
    }


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def export(workdir: Path, study_path: Path, out: Path) -> dict[str, Any]:
    """Write the committed results file of one study (module docstring)."""
    report = json.loads((workdir / "report" / "study.json").read_text(encoding="utf-8"))
    runs = {
        name: {k: v for k, v in values.items() if k not in _DROPPED_RUN_KEYS}
        for name, values in report["runs"].items()
    }
    payload = {
        "study": study_path.as_posix(),
        "commit": _commit(),
        "corpus": _corpus(workdir),
        "seeds": report["seeds"],
        "arms": [[arm, flags] for arm, flags in report["arms"].items()],  # in file order
        "reference": report.get("reference") or next(iter(report["arms"])),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return payload


def render_tables(results: dict[str, Any]) -> str:
    """The study's tables, recomputed from its runs (:func:`megatron_edl.demo.study.aggregate`,
    :func:`~megatron_edl.demo.study.paired_differences`)."""
    arms = tuple((arm, tuple(flags)) for arm, flags in results["arms"])
    study = st.StudyConfig(
        quickstart=None,  # not needed by the tables
        seeds=tuple(results["seeds"]),
        arms=arms,
        reference=results["reference"],
    )
    table = st.aggregate(study, results["runs"])
    paired = st.paired_differences(study, results["runs"])
    corpus = results["corpus"]
    head = (
        f"Seeds {', '.join(map(str, study.seeds))}; corpus {corpus['sha256'][:12]} "
        f"({len(corpus['domains'])} domains); commit {str(results['commit'])[:12]}; "
        f"raw runs: docs/science/{Path(results['study']).stem}.json."
    )
    return "\n\n".join([head, st.study_tables(study, table), st.paired_table(study, paired)])


def update_document(document: Path, results_dir: Path, *, check: bool) -> list[str]:
    """Rewrite (or, with ``check``, compare) every marked table block; returns the stale names."""
    text = document.read_text(encoding="utf-8")
    stale = []
    for path in sorted(results_dir.glob("*.json")):
        name = path.stem
        pattern = re.compile(
            rf"(<!-- tables:{re.escape(name)} -->)(.*?)(<!-- /tables:{re.escape(name)} -->)",
            re.S,
        )
        match = pattern.search(text)
        if match is None:
            stale.append(f"{name} (no marker in {document})")
            continue
        fresh = "\n" + render_tables(json.loads(path.read_text(encoding="utf-8"))) + "\n"
        if match.group(2) != fresh:
            stale.append(name)
            text = text[: match.start(2)] + fresh + text[match.end(2) :]
    if not check:
        document.write_text(text, encoding="utf-8")
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write one study's results file")
    exp.add_argument("--workdir", type=Path, required=True)
    exp.add_argument("--study", type=Path, required=True)
    exp.add_argument("--out", type=Path, required=True)
    tab = sub.add_parser("tables", help="regenerate the tables of docs/science.md")
    tab.add_argument("--document", type=Path, default=DOCUMENT)
    tab.add_argument("--results", type=Path, default=RESULTS_DIR)
    tab.add_argument("--check", action="store_true", help="exit 1 if a table is stale")
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.workdir, args.study, args.out)
        return 0
    stale = update_document(args.document, args.results, check=args.check)
    if stale and args.check:
        print(f"stale tables in {args.document}: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
