"""Set up megatron-edl on Megatron's parsed arguments, before ``pretrain``: :func:`install_edl`.

What a launcher calls between Megatron's argument parsing and ``pretrain``, ours
(:mod:`megatron_edl.pretrain_gpt`) and a patched Megatron-LM ``pretrain_gpt.py`` (patches/)
alike: :func:`extra_args_provider` (our flags next to Megatron's), then :func:`install_edl` (the
run config, the checkpoint checks, the domain resolution, the layer spec, the telemetry, the
metrics and the labelled data and step).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from megatron.training.utils import get_blend_and_blend_per_split

from megatron_edl import cpu
from megatron_edl.checkpoint import check_resume_checkpoint, check_window_state
from megatron_edl.config import EDLConfigError, EDLRunConfig, EDLScope, LabelOrigin, add_args
from megatron_edl.config.labels import check_loss_domains
from megatron_edl.config.run import CONFIG_FLAG, CPU_FLAG
from megatron_edl.core.labels import LabelMap
from megatron_edl.core.window import MIN_SEQUENCES_PER_DOMAIN, sequences_per_domain
from megatron_edl.integration import dataset, gpt, modelopt, spec, telemetry, workarounds
from megatron_edl.integration.losses import registry
from megatron_edl.integration.losses.edl import WINDOW_BUFFER

__all__ = [
    "blend_prefixes_from_args",
    "extra_args_provider",
    "install_edl",
    "resolve_domains",
    "run_config_from_args",
    "warn_thin_statistics",
]

# How the start-time warning names its source.
PROG = "megatron-edl"


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our flags next to Megatron's (``parse_and_validate_args(extra_args_provider=...)``):
    every megatron-edl flag (:func:`megatron_edl.config.add_args`), then ModelOpt's when
    installed."""
    parser = modelopt.add_args(add_args(parser))
    return workarounds.escape_percent_in_help(parser)


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
    Used by our launcher and by the patch of Megatron-LM's ``pretrain_gpt.py`` (patches/).

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
    if getattr(args, "cpu", False) and not cpu.applied():
        raise ValueError(f"{CPU_FLAG} needs the launcher: python -m megatron_edl.pretrain_gpt")
    if getattr(args, "config_yaml", None) is not None:
        raise ValueError(
            f"{CONFIG_FLAG} {args.config_yaml} was not expanded: it is read by "
            "python -m megatron_edl.pretrain_gpt (or expand it with python -m "
            "megatron_edl.yaml_config)"
        )
    check_resume_checkpoint(args)  # a damaged checkpoint under --load: refused, not loaded
    run = run_config_from_args(args)
    args.edl_run_config = run
    args.edl_config = run.edl
    args.labels_config = run.labels
    if run.labels is not None and run.edl.window_decay > 0:
        # A checkpoint without it, or with another domain count: say which flag.
        check_window_state(
            args, WINDOW_BUFFER, num_domains=run.labels.num_domains, num_experts=args.num_experts
        )
    if run.edl_loss:
        warn_thin_statistics(args, run.edl, run.labels.num_domains)
    if run.labels is not None:  # the routing telemetry needs the labels
        telemetry.install(run.telemetry, domains=run.labels.domain_names, args=args)
    if spec.aux_loss_router_needed(run):
        model_cfg.transformer_layer_spec = spec.layer_spec_provider(
            model_cfg.transformer_layer_spec, run
        )
        registry.register_run_metrics(run)
    if run.labels is None:  # no labels: the script's own data and step (label-free losses)
        return train_valid_test_datasets_provider, forward_step
    steps = gpt.LabelledSteps(args=args, edl=run.edl, labels=run.labels)
    return steps.train_valid_test_datasets_provider, steps.forward_step


def run_config_from_args(args):
    """The run's :class:`~megatron_edl.config.EDLRunConfig`, built once from Megatron's parsed
    ``args`` and validated (domain names resolved by :func:`resolve_domains`)."""
    return EDLRunConfig.from_args(args, resolve_domains=resolve_domains)


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
    others (:mod:`megatron_edl.integration.dataset`). With the EDL loss on, fewer than two loss
    domains in use are refused (:func:`megatron_edl.config.labels.check_loss_domains`).
    """
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
        label_map = LabelMap.from_yaml(labels.label_map, vocabulary=vocabulary)
        num_domains, names = label_map.num_domains, tuple(label_map.domains)
    used = np.unique(np.concatenate([np.zeros(0, np.int64), *map(dataset.used_ids, loss_ids)]))
    check_loss_domains(labels, used.size)
    return num_domains, names


def blend_prefixes_from_args(args) -> list[str]:
    """Every dataset prefix of ``--data-path``/``--*-data-path`` (in order of appearance)."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    prefixes: list[str] = []
    for part in [blend, *(blend_per_split or [])]:
        for prefix in part[0] if part else []:
            if prefix not in prefixes:
                prefixes.append(prefix)
    return prefixes


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
