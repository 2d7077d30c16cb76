"""Pre-train a GPT (MoE) model with Megatron-Core: Megatron-LM's ``pretrain_gpt.py``, as a module.

Usage:
    torchrun --nproc-per-node 8 -m megatron_edl.pretrain_gpt <Megatron flags>
    torchrun --nproc-per-node 2 -m megatron_edl.pretrain_gpt --cpu <Megatron flags>
    python -m megatron_edl.pretrain_gpt --help

Every stock Megatron flag behaves as in ``pretrain_gpt.py`` (same defaults, e.g. the
``GPT2BPETokenizer`` tokenizer type). On top of that:

``--cpu``
    Run on CPU with gloo (tests, CI, the quickstart). Applies :mod:`megatron_edl.cpu` and sets the
    flags CPU needs (``--transformer-impl local --distributed-backend gloo --no-rope-fusion
    --no-persist-layer-norm --no-gradient-accumulation-fusion --use-cpu-initialization``); passing
    a conflicting value for one of them is an error. Without ``--cpu`` and without a visible GPU the
    launcher stops with a message instead of falling back silently.
"""

from __future__ import annotations

import time

_PROGRAM_START_TIME = time.time()

import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from typing import NoReturn  # noqa: E402

from megatron_edl.config.run import CPU_FLAG  # noqa: E402

PROG = "megatron_edl.pretrain_gpt"

__all__ = ["main", "refuse"]


class _Refused(Exception):
    """A start-time refusal: printed as one line, exit status 2 (like argparse)."""


def refuse(exc: BaseException) -> NoReturn:
    """Print ``exc`` as one ``error:`` line on stderr and exit with status 2, like argparse.

    Launch-time checks see the same arguments and files on every rank, so the line is printed
    once per node (``LOCAL_RANK`` 0, or no launcher); every rank exits.
    """
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def megatron_assertion_message(exc: AssertionError) -> str:
    """One line for a failed ``assert`` of Megatron's argument validation: its message, or the
    asserted source line when it has none, and where it is (file:line)."""
    import linecache
    import traceback

    frame = traceback.extract_tb(exc.__traceback__)[-1]
    what = str(exc) or (linecache.getline(frame.filename, frame.lineno).strip() or "assert")
    where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return f"invalid arguments (Megatron's {where}): {what}"


# Errors of the start-time checks (config expansion, flag checks, label resolution, EDL config):
# ValueError (EDLConfigError, CheckpointError, SidecarMismatchError, ...), and OSError for a
# file that cannot be read (its message names it).
_REFUSALS = (ValueError, OSError)


def main(argv: list[str] | None = None) -> None:
    """Launch Megatron's ``pretrain`` with megatron-edl (module docstring).

    A refusal of the start-time checks (a bad YAML config, a flag conflicting with ``--cpu``, an
    unsupported combination, a bad label file) is one ``error:`` line and exit status 2, before
    the model is built; errors after that (training) keep their traceback.
    """
    try:
        _main(argv)
    except _Refused as refusal:
        refuse(refusal.__cause__ or refusal)


def _main(argv: list[str] | None) -> None:
    from megatron_edl.yaml_config import expand_config_flag

    try:
        argv = expand_config_flag(list(sys.argv[1:] if argv is None else argv))
    except _REFUSALS as exc:
        raise _Refused from exc
    on_cpu = CPU_FLAG in argv
    wants_help = any(a in ("-h", "--help") for a in argv)

    import torch

    if on_cpu:
        from megatron_edl import cpu

        cpu.apply()
        argv = cpu.argv_with_cpu_flags(argv)
    elif not torch.cuda.is_available() and not wants_help:
        sys.exit(
            "megatron_edl.pretrain_gpt: no CUDA device is visible. Pass --cpu to run on CPU with "
            "gloo (tests and the quickstart), or run on a GPU node."
        )

    if int(os.environ.get("RANK", "0")) != 0:
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)

    from megatron.core.enums import ModelType
    from megatron.core.package_info import __version__ as mcore_version
    from megatron.core.utils import get_te_version, get_torch_version
    from megatron.training import inprocess_restart, pretrain, print_rank_0, set_startup_timestamps
    from megatron.training.argument_utils import (
        gpt_config_from_args,
        pretrain_cfg_container_from_args,
    )
    from megatron.training.arguments import parse_and_validate_args, parse_args

    from megatron_edl.integration import modelopt, workarounds
    from megatron_edl.integration import upstream_pretrain_gpt as upstream
    from megatron_edl.integration.install import extra_args_provider, install_edl

    main_entry_time = time.time()
    print_rank_0(f"> PyTorch version ................ {get_torch_version()}")
    print_rank_0(f"> Megatron-Core version .......... {mcore_version}")
    print_rank_0(f"> Transformer Engine version ... {get_te_version()}")
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=main_entry_time)
    workarounds.use_wheel_dataset_helpers()

    sys.argv = [sys.argv[0], *argv]
    if wants_help:
        # Megatron's in-process-restart wrapper parses the command line without our flags first.
        parse_args(extra_args_provider)
    run_pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    try:
        args = parse_and_validate_args(
            extra_args_provider=extra_args_provider,
            args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        )
    except AssertionError as exc:  # Megatron's validate_args checks flags with assert
        raise _Refused from ValueError(megatron_assertion_message(exc))
    try:
        if on_cpu:
            cpu.check_args(args)
        modelopt.maybe_enable(args)
        if modelopt.enabled(args):
            model_cfg = gpt_config_from_args(args, model_config_cls=modelopt.model_config_cls())
        else:
            model_cfg = gpt_config_from_args(args)
        datasets_provider, forward_step = install_edl(
            args, model_cfg, upstream.train_valid_test_datasets_provider, upstream.forward_step
        )
    except _REFUSALS as exc:
        raise _Refused from exc
    run_pretrain(
        pretrain_cfg_container_from_args(args, model_cfg),
        datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        store=store,
        get_embedding_ranks=upstream.get_embedding_ranks,
    )


if __name__ == "__main__":
    main()
