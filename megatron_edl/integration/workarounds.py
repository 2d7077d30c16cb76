"""megatron-core 0.19 workarounds of the launchers, each registered in
:mod:`megatron_edl.integration.internals` (the one list of what an upgrade must re-check).

The other version-bound places are the CPU layer's patches (:mod:`megatron_edl.cpu`, its own
registry) and the port of Megatron-LM's step functions
(:mod:`megatron_edl.integration.upstream_pretrain_gpt`, tagged ``core_v0.19.0``).
"""

from __future__ import annotations

import argparse
import os

from megatron_edl.integration.internals import touch

__all__ = ["escape_percent_in_help", "use_wheel_dataset_helpers"]


def escape_percent_in_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``--help`` work: escape lone ``%`` in help strings argparse cannot format.

    megatron-core 0.19.2 has one (``--moe-paged-stash-buffer-size-factor-cuda``), which makes
    ``--help`` raise ``ValueError: unsupported format character``.
    """
    touch("argparse-formatter")
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help:
            continue
        try:
            formatter._expand_help(action)
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")
    return parser


def use_wheel_dataset_helpers() -> None:
    """Skip ``make`` of the dataset helpers when the installed megatron-core is a wheel.

    ``initialize._compile_dependencies`` runs ``make -C megatron/core/datasets`` on rank 0 and
    exits on failure; the 0.19 wheel ships a compiled ``helpers_cpp`` but no Makefile, so that
    ``make`` always fails. With a source checkout (Makefile present) Megatron's step is kept.
    """
    from megatron.core.datasets import utils as dataset_utils

    makefile = os.path.join(os.path.dirname(dataset_utils.__file__), "Makefile")
    if os.path.exists(makefile):
        return
    from megatron.core.datasets import helpers_cpp  # noqa: F401  (fails loudly if missing)

    touch("dataset-helpers-compile")
    dataset_utils.compile_helpers = lambda: None
