"""Run a Megatron-LM ``pretrain_gpt.py`` on CPU: ``python run_upstream_script.py SCRIPT FLAGS``.

For the tests of patches/: applies the CPU layer and the flags CPU needs (what ``--cpu`` does in
our launcher), skips the dataset-helper ``make`` the megatron-core wheel cannot run, puts the
script's directory on ``sys.path`` (for its ``gpt_builders``/``model_provider`` imports), and
runs the script as ``__main__``.
"""

from __future__ import annotations

import os
import runpy
import sys

from megatron_edl import cpu
from megatron_edl.integration.workarounds import use_wheel_dataset_helpers


def main() -> None:
    script, flags = sys.argv[1], sys.argv[2:]
    cpu.apply()
    use_wheel_dataset_helpers()
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.argv = [script, *cpu.argv_with_cpu_flags(flags)]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
