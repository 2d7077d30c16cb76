"""Routing telemetry: per-domain routing statistics of every MoE layer, during training or
evaluation, written as versioned dumps (:mod:`megatron_edl.analysis.routing_stats`).

What each router does (one call from ``AuxLossTopKRouter.routing``, :meth:`RouterStats.observe`):
per micro-batch, with the domain labels the router consumed anyway (one FIFO entry per forward
feeds both the EDL loss and the statistics), it adds the packed per-domain sums of
:func:`megatron_edl.core.routing_sums.routing_sums` (top-k counts, dense probability mass,
routing entropy, tokens; float64) to a buffer on the router's device: no autograd, no host
synchronisation, no collective. Which forwards count:

* ``train`` phase (``--moe-edl-stats-interval N``): grad-enabled training forwards, i.e. each
  micro-batch once (under activation recompute: the recompute, as for the EDL loss);
* ``eval`` phase (the probe, ``--moe-edl-probe-dir``): evaluation forwards (model in eval
  mode), the loss-free forwards Megatron's ``evaluate`` runs.

Reduction and writing (:func:`dump_routing_stats`), once per dump: on every rank, the sums of
all its routers (every model chunk) are stacked into one ``(L, D+1, 2E+2)`` buffer and reduced
with ONE SUM all-reduce over the routers' ``tp_dp_cp`` group: every rank that holds tokens of the
same layers (data-parallel replicas, expert-parallel ranks, which are data-parallel ranks of the
router, context-parallel ranks, and tensor-parallel ranks under sequence parallelism). Without
sequence parallelism the TP ranks of a layer see the same tokens, so only TP rank 0 records and
the others add zeros: nothing is counted twice. The first rank of that group writes the file of
its pipeline stage (its layers, ``part = "l<first layer>"``); the reader joins the stages'
parts of a step (:func:`megatron_edl.analysis.routing_stats.load_run`). No collective spans
pipeline stages.

When dumps happen (Megatron has no callback API; these hooks wrap two functions of
``megatron.training.training`` that its loop looks up by module global at every call; registry
entries ``training-post-step-callbacks`` and ``training-evaluate`` of
:mod:`megatron_edl.integration.internals`):

* training: after ``post_training_step_callbacks(model, ..., iteration, ...)``, which ``train``
  calls once per completed iteration, after logging and evaluation and before checkpointing,
  on every rank. A dump is written when ``iteration % N == 0`` and after the last iteration
  (``--train-iters``), covering the iterations since the previous dump.
* probe: after the first call of ``evaluate(...)`` (the validation set; with ``--skip-train``,
  Megatron evaluates the loaded checkpoint and exits), with ``source = "probe"`` and the
  checkpoint's iteration as the step.

The routers are found through :func:`megatron_edl.integration.labels.label_consumers` (their
``routing_stats``), never by their class: this module imports no router, and a router hands
:meth:`RouterStats.observe` the label entry it consumed.

Shape legend: L layers, D domains, E experts, X = D + 1, F = 2E + 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from megatron_edl.analysis.routing_stats import RoutingStats, write_stats
from megatron_edl.config.telemetry import Phase, TelemetryConfig
from megatron_edl.core.routing_sums import num_packed_columns, routing_sums, unpack_routing_sums
from megatron_edl.distributed import sum_over_group
from megatron_edl.integration.internals import touch
from megatron_edl.integration.labels import DomainLabels, label_consumers
from megatron_edl.integration.losses.base import layer_index

__all__ = [
    "RouterStats",
    "StatsWriter",
    "dump_routing_stats",
    "install",
    "install_hooks",
    "per_domain_lm_loss",
]


class RouterStats:
    """The running per-domain routing sums of one router (packed, float64, on its device).

    Args:
        num_domains: D, the number of domains of the labels the router receives.
        phase: Which forwards count.
        records: Whether this rank records at all (``False`` on TP ranks > 0 without sequence
            parallelism, whose tokens TP rank 0 already counts); it still takes part in the
            reduction with zeros.
    """

    def __init__(self, *, num_domains: int, phase: Phase | str, records: bool = True) -> None:
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        self.num_domains = num_domains
        self.phase = Phase(phase)
        self.records = records
        self._sums_XF: torch.Tensor | None = None
        self.num_forwards = 0
        """Forwards recorded since the last :meth:`take`."""

    def counts_forward(self, *, training: bool, grad_enabled: bool) -> bool:
        """Whether a forward in this mode counts (and so consumes one entry of domain labels).

        Args:
            training: The router's ``training`` flag.
            grad_enabled: ``torch.is_grad_enabled()`` during the forward.

        Returns:
            ``True`` for the forwards of this statistics' phase.
        """
        if self.phase is Phase.TRAIN:
            return training and grad_enabled
        return not training

    def observe(
        self,
        *,
        training: bool,
        logits_TE: torch.Tensor,
        routing_map_TE: torch.Tensor,
        labels: DomainLabels,
        padding_mask: torch.Tensor | None = None,
        score_function: str = "softmax",
    ) -> None:
        """The router's one call per forward that consumed labels: record if the phase counts it.

        Args:
            training: The calling router's ``training`` flag.
            logits_TE: Its logits, ``(T, E)``.
            routing_map_TE: Its top-k selection, ``(T, E)``.
            labels: The queue entry it consumed for this forward.
            padding_mask: Megatron's padding mask (True = padding), or ``None``.
            score_function: Score function of the dense p_t (the router's
                ``edl_score_function``).
        """
        if self.counts_forward(training=training, grad_enabled=torch.is_grad_enabled()):
            self.record(
                logits_TE=logits_TE,
                routing_map_TE=routing_map_TE,
                domain_ids_T=labels.domain_ids_T,
                padding_mask=padding_mask,
                score_function=score_function,
            )

    def record(
        self,
        *,
        logits_TE: torch.Tensor,
        routing_map_TE: torch.Tensor,
        domain_ids_T: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        score_function: str = "softmax",
    ) -> None:
        """Add one router call's sums (no autograd, no sync, no collective).

        Args:
            logits_TE: The router logits of the local tokens, ``(T, E)``.
            routing_map_TE: The router's top-k selection, ``(T, E)`` bool.
            domain_ids_T: The tokens' domain ids (-1: none), ``(T,)``.
            padding_mask: Megatron's padding mask (True = padding), any shape with T elements.
            score_function: Score function of the dense p_t (the router's ``edl_score_function``).
        """
        self.num_forwards += 1
        if not self.records:
            return
        sums_XF = routing_sums(
            logits_TE=logits_TE,
            routing_map_TE=routing_map_TE,
            domain_ids_T=domain_ids_T,
            num_domains=self.num_domains,
            padding_T=padding_mask,
            score_function=score_function,
        )
        if self._sums_XF is None:
            self._sums_XF = torch.zeros(sums_XF.shape, dtype=torch.float64, device=sums_XF.device)
        self._sums_XF += sums_XF

    def take(self, num_experts: int, device: torch.device) -> torch.Tensor:
        """The sums since the last call (zeros if nothing was recorded), and reset.

        Args:
            num_experts: E (shape of the zeros).
            device: Device of the zeros.

        Returns:
            ``sums_XF``, float64, shape ``(D + 1, 2E + 2)``.
        """
        sums_XF = self._sums_XF
        if sums_XF is None:
            shape = (self.num_domains + 1, num_packed_columns(num_experts))
            sums_XF = torch.zeros(shape, dtype=torch.float64, device=device)
        self._sums_XF = None
        self.num_forwards = 0
        return sums_XF


def _layer_number(router) -> int:
    """Global layer number (MTP layers follow the decoder's, as the loss metrics count them)."""
    return layer_index(router.config, router.layer_number, is_mtp_layer=router.is_mtp_layer).layer


def _stats_routers(model_chunks: Iterable[torch.nn.Module]) -> list:
    routers = [
        router
        for chunk in model_chunks
        for router in label_consumers(chunk)
        if getattr(router, "routing_stats", None) is not None
    ]
    return sorted(routers, key=_layer_number)


def dump_routing_stats(
    model_chunks: Iterable[torch.nn.Module],
    *,
    directory: str | os.PathLike,
    step: int,
    num_iterations: int,
    source: str,
    domains: Sequence[str],
    run: Mapping[str, Any] | None = None,
    lm_loss: tuple[np.ndarray, np.ndarray] | None = None,
) -> str | None:
    """Reduce the routers' sums (one all-reduce per rank) and write this stage's part.

    A collective over the routers' ``tp_dp_cp`` group: every rank of the pipeline stage must
    call it at the same point. Resets the routers' sums.

    Args:
        model_chunks: This rank's model chunks (Megatron's ``model`` list).
        directory: Output directory.
        step: Step of the dump.
        num_iterations: Iterations the sums cover (0 for a probe).
        source: ``"train"`` or ``"probe"``.
        domains: Domain names, D of them.
        run: Free-form description of the run stored in the metadata.
        lm_loss: Optional ``(sums_D, tokens_D)`` of the per-domain LM loss (probe).

    Returns:
        The JSON path written by this rank, or ``None`` (not the writer, or no MoE router).
    """
    routers = _stats_routers(model_chunks)
    if not routers:
        return None
    first = routers[0]
    num_experts = first.config.num_moe_experts
    device = first.weight.device
    sums_LXF = torch.stack([r.routing_stats.take(num_experts, device) for r in routers])
    is_writer = sum_over_group(sums_LXF, first.tp_dp_cp_group)
    if not is_writer:
        return None
    layers = tuple(_layer_number(r) for r in routers)
    extra: dict[str, np.ndarray] = {}
    if lm_loss is not None:
        extra = {"lm_loss_sums_D": lm_loss[0], "lm_loss_tokens_D": lm_loss[1]}
    stats = RoutingStats(
        step=step,
        num_iterations=num_iterations,
        source=source,
        layers=layers,
        domains=tuple(domains),
        num_experts=num_experts,
        topk=first.topk,
        run=dict(run or {}),
        **unpack_routing_sums(sums_LXF.cpu().numpy(), num_experts),
        **extra,
    )
    return os.fspath(write_stats(stats, directory, part=f"l{layers[0]:03d}"))


@dataclasses.dataclass
class StatsWriter:
    """When to dump, where, and with which metadata; its methods are the training-loop hooks."""

    phase: Phase
    directory: str
    domains: tuple[str, ...]
    interval: int | None = None
    train_iters: int | None = None
    run: dict[str, Any] = dataclasses.field(default_factory=dict)
    iterations_since_dump: int = 0
    probe_done: bool = False

    def after_iteration(self, model_chunks, iteration: int) -> str | None:
        """Training hook: count the iteration and dump at the interval and at the end."""
        if self.phase is not Phase.TRAIN:
            return None
        self.iterations_since_dump += 1
        assert self.interval is not None
        due = iteration % self.interval == 0 or iteration == self.train_iters
        if not due:
            return None
        path = dump_routing_stats(
            model_chunks,
            directory=self.directory,
            step=iteration,
            num_iterations=self.iterations_since_dump,
            source="train",
            domains=self.domains,
            run=self.run,
        )
        self.iterations_since_dump = 0
        return path

    def before_evaluation(self, model_chunks) -> None:
        """Probe hook: start from empty sums."""
        if self.phase is Phase.EVAL and not self.probe_done:
            for router in _stats_routers(model_chunks):
                router.routing_stats.take(router.config.num_moe_experts, router.weight.device)

    def after_evaluation(self, model_chunks, step: int, lm_loss=None) -> str | None:
        """Probe hook: dump what the (first) evaluation routed."""
        if self.phase is not Phase.EVAL or self.probe_done:
            return None
        self.probe_done = True
        return dump_routing_stats(
            model_chunks,
            directory=self.directory,
            step=step,
            num_iterations=0,
            source="probe",
            domains=self.domains,
            run=self.run,
            lm_loss=lm_loss,
        )


class _Hooks:
    """What the wrapped Megatron functions call: the current writer (replaced on re-install)."""

    def __init__(self, writer: StatsWriter, get_iteration) -> None:
        self.writer = writer
        self.get_iteration = get_iteration


def install_hooks(writer: StatsWriter, get_iteration) -> None:
    """Wrap Megatron's ``post_training_step_callbacks`` and ``evaluate`` to call ``writer``.

    Installing again in the same process (tests) points the existing wrappers at the new
    writer instead of wrapping twice.

    Args:
        writer: The writer.
        get_iteration: Callable returning the checkpoint's iteration (``args.iteration``), the
            probe's step.
    """
    from megatron.training import training

    touch("training-post-step-callbacks")
    touch("training-evaluate")
    hooks = getattr(training.post_training_step_callbacks, "_edl_telemetry", None)
    if hooks is not None:
        hooks.writer, hooks.get_iteration = writer, get_iteration
        return
    hooks = _Hooks(writer, get_iteration)
    post_step = training.post_training_step_callbacks
    evaluate = training.evaluate

    @functools.wraps(post_step)
    def post_training_step_callbacks(model, optimizer, opt_param_scheduler, iteration, *a, **kw):
        result = post_step(model, optimizer, opt_param_scheduler, iteration, *a, **kw)
        hooks.writer.after_iteration(model, iteration)
        return result

    @functools.wraps(evaluate)
    def evaluate_with_probe(forward_step_func, data_iterator, model, *a, **kw):
        hooks.writer.before_evaluation(model)
        result = evaluate(forward_step_func, data_iterator, model, *a, **kw)
        total_loss_dict = result[0] if isinstance(result, tuple) else None
        lm_loss = per_domain_lm_loss(total_loss_dict, hooks.writer.domains)
        hooks.writer.after_evaluation(model, hooks.get_iteration(), lm_loss)
        return result

    post_training_step_callbacks._edl_telemetry = hooks
    training.post_training_step_callbacks = post_training_step_callbacks
    training.evaluate = evaluate_with_probe


def per_domain_lm_loss(
    total_loss_dict: Mapping[str, Any] | None, domains: Sequence[str]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-domain LM loss of Megatron's evaluation, in the dump's form.

    ``evaluate`` returns ratios: ``"lm loss/<d>"`` (the domain's mean loss) and ``"token
    share/<d>"`` (its share of the loss tokens; :func:`megatron_edl.integration.gpt.
    domain_loss_report`). The dump stores ``lm_loss_sums_D = share * mean`` and
    ``lm_loss_tokens_D = share``: token counts normalised by the total, so sums and ratios
    behave as for counts.

    Args:
        total_loss_dict: ``evaluate``'s first result (only the last pipeline stage has it).
        domains: Domain names.

    Returns:
        ``(sums_D, tokens_D)``, or ``None`` when the entries are missing.
    """
    if not total_loss_dict:
        return None
    keys = [(f"lm loss/{d}", f"token share/{d}") for d in domains]
    if not all(loss in total_loss_dict and share in total_loss_dict for loss, share in keys):
        return None
    share_D = np.array([float(total_loss_dict[share]) for _, share in keys])
    mean_D = np.array([float(total_loss_dict[loss]) for loss, _ in keys])
    present_D = share_D > 0
    return np.where(present_D, mean_D * share_D, 0.0), np.where(present_D, share_D, 0.0)


def _run_description(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "moe_edl_coeff", "moe_edl_label_map", "moe_edl_labels", "num_layers", "num_experts",
        "moe_router_topk", "tensor_model_parallel_size", "pipeline_model_parallel_size",
        "expert_model_parallel_size", "context_parallel_size", "data_parallel_size",
        "sequence_parallel", "micro_batch_size", "global_batch_size", "seq_length", "load",
        "mock_data", "data_path",
    )  # fmt: skip
    return {name: getattr(args, name, None) for name in names}


def install(
    config: TelemetryConfig, *, domains: Sequence[str], args: argparse.Namespace
) -> Phase | None:
    """Set up the telemetry ``config`` asks for: the writer and the training-loop hooks.

    Call once per process, before ``pretrain``.

    Args:
        config: The telemetry branch of the run config (resolved once from the flags).
        domains: The domain names of the labels (the dumps' domain axis).
        args: Megatron's parsed arguments, for Megatron's own settings only (``train_iters``,
            the current ``iteration``, the run description written into each dump).

    Returns:
        The phase the routers must record (to bind into the router builder), or ``None``.
    """
    if config.phase is None:
        return None
    writer = StatsWriter(
        phase=config.phase,
        directory=config.directory,
        domains=tuple(domains),
        interval=config.interval,
        train_iters=args.train_iters,
        run=_run_description(args),
    )
    install_hooks(writer, get_iteration=lambda: args.iteration)
    return config.phase
