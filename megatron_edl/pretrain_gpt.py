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

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from typing import NoReturn  # noqa: E402

from megatron_edl.config.labels import EVAL_PER_DOMAIN_FLAG, MOCK_DOMAINS_FLAG  # noqa: E402
from megatron_edl.config.run import CONFIG_FLAG, CPU_FLAG  # noqa: E402

PROG = "megatron_edl.pretrain_gpt"

__all__ = [
    "CONFIG_FLAG",
    "CPU_FLAG",
    "EVAL_PER_DOMAIN_FLAG",
    "MOCK_DOMAINS_FLAG",
    "blend_prefixes_from_args",
    "check_cpu_args",
    "cpu_argv",
    "domain_labels_wanted",
    "edl_config_from_args",
    "escape_percent_in_help",
    "extra_args_provider",
    "install_edl",
    "labels_config_from_args",
    "main",
    "megatron_assertion_message",
    "refuse",
    "resolve_domains",
    "run_config_from_args",
    "use_wheel_dataset_helpers",
    "warn_thin_statistics",
]


def domain_labels_wanted(args) -> list[str]:
    """The flags that need per-token domain labels in the batch (empty: load none);
    :func:`megatron_edl.config.labels.label_reasons`."""
    from megatron_edl.config.labels import label_reasons

    return label_reasons(args)


def resolve_domains(args, labels) -> tuple[int, tuple[str, ...]]:
    """``num_domains`` and ``domain_names`` of a run that loads labels (``EDLRunConfig``'s
    ``resolve_domains``): from the label map, the data's label vocabulary, or the mock data.

    The loss domains are those the data and the label map use: the label map's ``domains``, or
    without one the stored ids the blend's sequences use, compacted (a large or retired id
    costs nothing; an id the sidecar's vocabulary does not name is refused naming the file;
    docs/launching.md, "Failure behaviour"). With the run's label options (label map, random
    control), so that a label map that does not cover the data fails here, before the model is
    built, mock data included; the results are cached for the dataset builds (same files, same
    label options). One rank per node reads the files and shares them (or its error) with the
    others (integration/dataset.py). With the EDL loss on, fewer than two loss domains in use
    are refused (:func:`megatron_edl.config.labels.check_loss_domains`).
    """
    import numpy as np

    from megatron_edl.config import EDLConfigError, LabelOrigin
    from megatron_edl.config.labels import check_loss_domains
    from megatron_edl.integration import dataset

    if labels.origin is LabelOrigin.MOCK:
        null_tokenizer = getattr(args, "tokenizer_type", None) == "NullTokenizer"
        vocab_size = getattr(args, "vocab_size", None) if null_tokenizer else None
        dataset.check_mock_domains(labels.mock_domains, vocab_size)
        num_domains = labels.mock_domains
        names = tuple(f"domain{i}" for i in range(num_domains))
        loss_ids = [dataset.mock_document_domains(num_domains, labels)]  # the map's cover
        vocabulary = None
    else:
        evaluation = dataset.evaluation_labels(labels)  # differs under the random control
        for label_options in [*([evaluation] if evaluation is not labels else []), labels]:
            blend = dataset.resolve_blend_domains(
                blend_prefixes_from_args(args),
                "prefix" if labels.domains_per_prefix else "sidecar",
                domains_per_prefix=labels.domains_per_prefix,
                labels=label_options,
                per_node=True,
            )
        vocabulary = blend.vocabulary
        loss_ids = list(blend.loss_ids.values())
        if blend.loss_domains is not None:  # no label map: the stored ids in use, compacted
            if not blend.loss_domains:
                raise EDLConfigError(
                    f"domain labels ({', '.join(labels.reasons)}): no sequence of the blend "
                    f"({', '.join(blend.prefixes)}) has a domain label (every id is -1)"
                )
            names_by_id = {stored: name for name, stored in vocabulary.items()}
            num_domains = len(blend.loss_domains)
            names = tuple(names_by_id.get(i, str(i)) for i in blend.loss_domains)
    if labels.label_map is not None:
        from megatron_edl.core.labels import LabelMap

        label_map = LabelMap.from_yaml(labels.label_map, vocabulary=vocabulary)
        num_domains, names = label_map.num_domains, tuple(label_map.domains)
    used = np.unique(np.concatenate([np.zeros(0, np.int64), *map(dataset.used_ids, loss_ids)]))
    check_loss_domains(labels, used.size)
    return num_domains, names


def run_config_from_args(args):
    """The run's :class:`~megatron_edl.config.EDLRunConfig`, built once from Megatron's parsed
    ``args`` and validated (domain names resolved by :func:`resolve_domains`)."""
    from megatron_edl.config import EDLRunConfig

    return EDLRunConfig.from_args(args, resolve_domains=resolve_domains)


def edl_config_from_args(args):
    """The run's ``EDLConfig`` (the loss options; ``enabled`` says whether the loss is on), after
    every check of :func:`run_config_from_args` passed. (Its ``edl`` branch.)"""
    return run_config_from_args(args).edl


def labels_config_from_args(args):
    """The run's ``LabelsConfig``, or ``None`` when no domain labels are needed.

    A config is returned whenever :func:`domain_labels_wanted` names a reason. ``num_domains``
    and ``domain_names`` are filled in from the label map, the data's vocabulary, or the mock
    data. (The ``labels`` branch of :func:`run_config_from_args`.)
    """
    return run_config_from_args(args).labels


def blend_prefixes_from_args(args) -> list[str]:
    """Every dataset prefix of ``--data-path``/``--*-data-path`` (in order of appearance)."""
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    prefixes: list[str] = []
    for part in [blend, *(blend_per_split or [])]:
        for prefix in part[0] if part else []:
            if prefix not in prefixes:
                prefixes.append(prefix)
    return prefixes


def install_edl(args, model_cfg, train_valid_test_datasets_provider, forward_step):
    """Set up megatron-edl on parsed ``args`` and the model config, before ``pretrain``.

    Builds the run's :class:`~megatron_edl.config.EDLRunConfig` once
    (:func:`run_config_from_args`) and hands it explicitly to what needs it: the layer spec
    (the router losses), the telemetry, and megatron-edl's dataset provider and forward step. With
    no megatron-edl flag it changes nothing and returns the two functions it was given: stock
    training. With a loss of the registry on (:mod:`megatron_edl.integration.losses.registry`:
    EDL, the label-free variance and orthogonality losses) or the routing telemetry
    (``--moe-edl-stats-interval``, the probe: :mod:`megatron_edl.integration.telemetry`, whose
    training-loop hooks it also installs), it installs the router (and a layer-hooked loss's MoE
    layer) bound to the run config into ``model_cfg.transformer_layer_spec``
    (:func:`megatron_edl.integration.spec.layer_spec_provider`) and registers the enabled losses'
    metrics for Megatron's log. With domain labels wanted it returns megatron-edl's dataset
    provider and forward step (stock behaviour plus the labels;
    :mod:`megatron_edl.integration.gpt`), bound to the run's config, otherwise the given ones.
    Used by this launcher and by the patch of Megatron-LM's ``pretrain_gpt.py`` (patches/).

    Also stores ``args.edl_run_config`` and its ``edl`` and ``labels`` branches
    (``args.edl_config``, ``args.labels_config``), for inspection; megatron-edl's step functions
    never read them back.

    Returns:
        ``(train_valid_test_datasets_provider, forward_step)`` to pass to ``pretrain``.

    Raises:
        ValueError: ``--cpu`` or ``--config-yaml`` reached a script that does not handle them
            (only ``python -m megatron_edl.pretrain_gpt`` does).
        CheckpointError: the checkpoint under ``--load`` is incomplete
            (:func:`megatron_edl.checkpoint.check_resume_checkpoint`).
    """
    from megatron_edl import cpu

    if getattr(args, "cpu", False) and not cpu.applied():
        raise ValueError(f"{CPU_FLAG} needs the launcher: python -m megatron_edl.pretrain_gpt")
    if getattr(args, "config_yaml", None) is not None:
        raise ValueError(
            f"{CONFIG_FLAG} {args.config_yaml} was not expanded: it is read by "
            "python -m megatron_edl.pretrain_gpt (or expand it with python -m "
            "megatron_edl.yaml_config)"
        )
    from megatron_edl.checkpoint import check_resume_checkpoint

    check_resume_checkpoint(args)  # a damaged checkpoint under --load: refused, not loaded
    run = run_config_from_args(args)
    args.edl_run_config = run
    args.edl_config = run.edl
    args.labels_config = run.labels
    if run.labels is not None and run.edl.window_decay > 0:
        from megatron_edl.checkpoint import check_window_state
        from megatron_edl.integration.losses.edl import WINDOW_BUFFER

        # A checkpoint without it, or with another domain count: say which flag.
        check_window_state(
            args, WINDOW_BUFFER, num_domains=run.labels.num_domains, num_experts=args.num_experts
        )
    if run.edl_loss:
        warn_thin_statistics(args, run.edl, run.labels.num_domains)
    if run.labels is not None:  # the routing telemetry needs the labels
        from megatron_edl.integration import telemetry

        telemetry.install(run.telemetry, domains=run.labels.domain_names, args=args)
    from megatron_edl.integration import spec
    from megatron_edl.integration.losses import registry

    if spec.aux_loss_router_needed(run):
        model_cfg.transformer_layer_spec = spec.layer_spec_provider(
            model_cfg.transformer_layer_spec, run
        )
        registry.register_run_metrics(run)
    if run.labels is None:  # no labels: the script's own data and step (label-free losses)
        return train_valid_test_datasets_provider, forward_step
    from megatron_edl.integration import gpt

    steps = gpt.LabelledSteps(args=args, edl=run.edl, labels=run.labels)
    return steps.train_valid_test_datasets_provider, steps.forward_step


def warn_thin_statistics(args, cfg, num_domains: int) -> float:
    """Warn (rank 0, stderr) when the EDL statistics hold few sequences per domain.

    With about one document per domain in a micro-batch step, p̄_j is a single document's
    routing and the loss pushes documents apart, not domains (docs/method.md section 5). The
    estimate is :func:`megatron_edl.core.window.sequences_per_domain`.

    Args:
        args: Megatron's parsed arguments (batch sizes, data-parallel size).
        cfg: The ``EDLConfig`` (scope, accumulation, window).
        num_domains: The number of loss domains (``LabelsConfig.num_domains``).

    Returns:
        The estimated sequences per domain.
    """
    from megatron_edl.config import EDLScope
    from megatron_edl.core.window import MIN_SEQUENCES_PER_DOMAIN, sequences_per_domain

    data_parallel = getattr(args, "data_parallel_size", None) or 1
    sequences = args.micro_batch_size
    if cfg.scope == EDLScope.GLOBAL:
        sequences *= data_parallel
    if cfg.accumulate and args.global_batch_size:  # every micro-batch of the global batch
        sequences *= args.global_batch_size // (args.micro_batch_size * data_parallel)
    estimate = sequences_per_domain(
        sequences=sequences, num_domains=num_domains, decay=cfg.window_decay
    )
    if estimate < MIN_SEQUENCES_PER_DOMAIN and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{PROG}: warning: the EDL statistics hold about {estimate:.1f} sequences per domain "
            f"({sequences} sequences per micro-batch step over {num_domains} domains, window "
            f"decay {cfg.window_decay}): each domain mean is a few documents' routing. Raise "
            "--micro-batch-size, use --moe-edl-window-decay or coarser labels "
            "(--moe-edl-label-map)",
            file=sys.stderr,
            flush=True,
        )
    return estimate


def cpu_argv(argv: list[str]) -> list[str]:
    """Prepend the flags CPU mode needs; a user's conflicting value is caught after parsing."""
    from megatron_edl.cpu import CPU_FLAGS

    injected: list[str] = []
    for flag, value, _, _ in CPU_FLAGS:
        injected += [flag] if value is None else [flag, value]
    return injected + argv


def check_cpu_args(args) -> None:
    """Raise ``ValueError`` naming the flag if parsed args contradict CPU mode."""
    from megatron_edl.cpu import CPU_FLAGS

    for flag, value, attr, required in CPU_FLAGS:
        got = getattr(args, attr)
        if got != required:
            shown = flag if value is None else f"{flag} {value}"
            raise ValueError(f"--cpu needs {shown}, but the command line sets {attr}={got!r}")


def escape_percent_in_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``--help`` work: escape lone ``%`` in help strings argparse cannot format.

    megatron-core 0.19.2 has one (``--moe-paged-stash-buffer-size-factor-cuda``), which makes
    ``--help`` raise ``ValueError: unsupported format character``.
    """
    from megatron_edl.integration.internals import touch

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


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our flags next to Megatron's (``parse_and_validate_args(extra_args_provider=...)``):
    every megatron-edl flag (:func:`megatron_edl.config.add_args`), then ModelOpt's when
    installed."""
    from megatron_edl.config import add_args
    from megatron_edl.integration import modelopt

    parser = modelopt.add_args(add_args(parser))
    return escape_percent_in_help(parser)


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

    from megatron_edl.integration.internals import touch

    touch("dataset-helpers-compile")
    dataset_utils.compile_helpers = lambda: None


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
        argv = cpu_argv(argv)
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

    from megatron_edl.integration import modelopt
    from megatron_edl.integration import upstream_pretrain_gpt as upstream

    main_entry_time = time.time()
    print_rank_0(f"> PyTorch version ................ {get_torch_version()}")
    print_rank_0(f"> Megatron-Core version .......... {mcore_version}")
    print_rank_0(f"> Transformer Engine version ... {get_te_version()}")
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=main_entry_time)
    use_wheel_dataset_helpers()

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
            check_cpu_args(args)
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
