"""megatron-edl's labelled GPT step functions, around the upstream port.

:mod:`megatron_edl.integration.upstream_pretrain_gpt` holds Megatron-LM's ``pretrain_gpt.py``
step functions (stock behaviour, Megatron's args). This module wraps them for a run that loads
domain labels (``LabelsConfig``; the EDL loss is on, ``--moe-edl-eval-per-domain``, or the
routing telemetry): the batch also carries per-token domain ids and EDL weights, broadcast over
TP and split over CP like the tokens, on every pipeline stage; the forward step queues each
micro-batch's labels on the EDL routers before the forward, and the loss reports the validation
loss per domain. :class:`LabelledSteps` holds the run's resolved config and hands it to every
wrapper explicitly (the launcher's ``install_edl`` builds it); nothing here reads Megatron's
global args.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.parallel_state import get_context_parallel_group
from megatron.core.utils import get_batch_on_this_cp_rank
from megatron.training import print_rank_0

from megatron_edl.config import EDLConfig, LabelOrigin, LabelsConfig
from megatron_edl.integration import labels as edl_labels
from megatron_edl.integration import upstream_pretrain_gpt as upstream
from megatron_edl.integration.dataset import (
    DomainGPTDataset,
    DomainGPTDatasetConfig,
    DomainMockGPTDataset,
    DomainPerPrefixGPTDataset,
    DomainSFTDataset,
    evaluation_labels,
    mock_document_domains,
)
from megatron_edl.integration.internals import touch

__all__ = [
    "ALL_KEYS",
    "BATCH_KEYS",
    "SHARE_LINE",
    "LabelledSteps",
    "domain_loss_report",
    "install_share_logging",
]

BATCH_KEYS = upstream.BATCH_KEYS

ALL_KEYS = BATCH_KEYS + edl_labels.EDL_BATCH_KEYS


class _Tap:
    """The data iterator, remembering the loader batch the upstream ``get_batch`` takes (on TP
    rank 0): the labels ride in it next to the tokens."""

    def __init__(self, data_iterator) -> None:
        self._iterator = data_iterator
        self.taken: dict | None = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.taken = next(self._iterator)
        return self.taken


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LabelledSteps:
    """The dataset provider and forward step of a run with domain labels (``install_edl``).

    ``train_valid_test_datasets_provider`` and ``forward_step`` are what ``pretrain`` gets; the
    forward step is the upstream one with this object as its hooks
    (:class:`~megatron_edl.integration.upstream_pretrain_gpt.StepHooks`).
    """

    args: Any
    """Megatron's parsed args, for Megatron's own settings (micro-batch size, sequence length,
    parallel layout, ``--sft``/``--mock-data``, the current iteration); the same object the
    upstream functions read through ``get_args()``."""

    edl: EDLConfig
    """The EDL loss options (``enabled`` false: labels without the loss)."""

    labels: LabelsConfig
    """Where the labels come from and how they become loss domains, with the resolved
    domains."""

    # -- batch ---------------------------------------------------------------------------------

    def get_batch(self, data_iterator, vp_stage: int | None = None) -> dict[str, Any]:
        """The upstream batch plus this rank's domain labels, on every pipeline stage.

        Upstream's ``get_batch`` reads the loader's batch on TP rank 0 (or, on an intermediate
        stage without packed sequences, nothing: this reads it then, for the labels the stage's
        MoE layers need). The labels are broadcast over TP; with packed (THD) sequences they are
        flattened to ``[1, b * s]`` like the tokens and cut for CP by the same split (including
        the per-document one of ``--sft``), so every router sees the labels of its tokens.
        """
        tap = _Tap(data_iterator)
        batch = upstream.get_batch(tap, vp_stage)
        loaded = tap.taken
        if loaded is None and mpu.get_tensor_model_parallel_rank() == 0:
            loaded = next(data_iterator)  # a stage upstream gives no tokens: the labels only
        labels = self._broadcast_labels(loaded or {})
        if labels and batch.get("cu_seqlens") is not None:
            labels = {key: value.reshape(1, -1) for key, value in labels.items()}  # as the tokens
        batch = {**batch, **self._labels_on_this_cp_rank(labels, batch)}
        return {key: batch.get(key) for key in ALL_KEYS}

    def _broadcast_labels(self, batch: dict) -> dict[str, torch.Tensor]:
        """The EDL keys of TP rank 0's loader ``batch`` on every TP rank."""
        return edl_labels.broadcast_labels_over_tp(
            batch,
            tp_rank=mpu.get_tensor_model_parallel_rank(),
            src_rank=mpu.get_tensor_model_parallel_src_rank(),
            group=mpu.get_tensor_model_parallel_group(),
            micro_batch_size=self.args.micro_batch_size,
            seq_length=self.args.seq_length,
        )

    def _labels_on_this_cp_rank(self, labels: dict, batch: dict) -> dict[str, torch.Tensor]:
        """This CP rank's part of the (flattened) labels, cut exactly like the tokens.

        Megatron's ``get_batch_on_this_cp_rank`` picks the split: zig-zag over the whole
        sequence, or, for ``--sft`` packed sequences, per document with TE's THD partition
        indices; the per-document split only cuts its fixed sequence keys. So the labels go
        through the same function with the same packed-sequence metadata, riding in the
        ``tokens`` and ``labels`` slots. ``{}`` when there are no labels.
        """
        if not labels:
            return {}
        meta = {key: batch.get(key) for key in ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")}
        carrier = get_batch_on_this_cp_rank(
            {
                **meta,
                "tokens": labels[edl_labels.DOMAIN_IDS_KEY],
                "labels": labels[edl_labels.WEIGHTS_KEY],
            },
            is_hybrid_cp=False,  # refused with domain labels (LabelsConfig.from_args)
            cp_group=get_context_parallel_group(),
            use_per_sequence_balancing=upstream.per_sequence_cp_balancing(self.args),
        )
        return {
            edl_labels.DOMAIN_IDS_KEY: carrier["tokens"],
            edl_labels.WEIGHTS_KEY: carrier["labels"],
        }

    # -- forward and loss ----------------------------------------------------------------------

    def before_forward(self, model, batch: dict) -> None:
        """Queue the micro-batch's labels on the routers that consume them (EDL loss,
        telemetry)."""
        if not edl_labels.routers_wanting_labels(model):
            return
        ids_BS = batch[edl_labels.DOMAIN_IDS_KEY]
        if ids_BS is None:
            raise RuntimeError("EDL is on but this pipeline stage received no domain labels")
        args = self.args
        labels = edl_labels.router_labels(
            ids_BS,
            batch[edl_labels.WEIGHTS_KEY],
            sequence_parallel=args.sequence_parallel,
            tp_rank=mpu.get_tensor_model_parallel_rank(),
            tp_size=args.tensor_model_parallel_size,
            iteration=getattr(args, "curr_iteration", None),  # the step of the beta schedule
        )
        edl_labels.push_labels(model, labels)

    def loss_func(self, batch: dict, model):
        """The loss closure: upstream's, plus the per-domain report in evaluation."""
        return partial(
            self._loss, batch["loss_mask"], model=model, domain_ids=batch[edl_labels.DOMAIN_IDS_KEY]
        )

    def _loss(self, loss_mask, output_tensor, model=None, domain_ids=None):
        """Upstream's ``loss_func``; in evaluation (model in eval mode, labels present) the
        report also holds :func:`domain_loss_report`'s per-domain entries."""
        loss, num_tokens, report = upstream.loss_func(loss_mask, output_tensor, model=model)
        if domain_ids is not None and model is not None and not model.training:
            report.update(
                domain_loss_report(
                    output_tensor.view_as(loss_mask),
                    loss_mask,
                    domain_ids,
                    self.labels.domain_names,
                )
            )
        return loss, num_tokens, report

    def forward_step(self, data_iterator, model, return_schedule_plan: bool = False):
        """Upstream's ``forward_step`` with this object's hooks."""
        return upstream.forward_step(data_iterator, model, return_schedule_plan, hooks=self)

    # -- datasets ------------------------------------------------------------------------------

    def dataset_config(self) -> DomainGPTDatasetConfig:
        """Upstream's dataset config fields plus the label options."""
        kwargs = upstream.dataset_config_kwargs(self.args)
        cfg = self.labels
        if cfg.origin is LabelOrigin.MOCK:
            num_domains = cfg.mock_domains
            return DomainGPTDatasetConfig(
                **kwargs,
                edl_aggregation=str(cfg.aggregation),
                edl_num_domains=num_domains,
                edl_document_domains=mock_document_domains(num_domains, cfg),
                edl_eval_document_domains=mock_document_domains(
                    num_domains, evaluation_labels(cfg)
                ),
            )
        return DomainGPTDatasetConfig(
            **kwargs,
            edl_aggregation=str(cfg.aggregation),
            edl_labels=cfg,
            edl_domains_per_prefix=cfg.domains_per_prefix,
        )

    @staticmethod
    def is_dataset_built_on_rank(vp_stage=None, is_packed_sequence: bool = False) -> bool:
        """On TP rank 0 of every stage: intermediate stages hold MoE layers that need the
        domain labels, which stock Megatron never sends them."""
        return mpu.get_tensor_model_parallel_rank() == 0

    def train_valid_test_datasets_provider(self, train_val_test_num_samples, vp_stage=None):
        """Build the labelled train/valid/test datasets (``BlendedMegatronDatasetBuilder``)."""
        config = self.dataset_config()
        if self.args.sft:  # per-prefix domains (LabelsConfig.from_args checks the flags)
            dataset_type = DomainSFTDataset
        elif self.labels.origin is LabelOrigin.MOCK:
            dataset_type = DomainMockGPTDataset
        elif self.labels.origin is LabelOrigin.PREFIX:
            dataset_type = DomainPerPrefixGPTDataset
        else:
            dataset_type = DomainGPTDataset
        install_share_logging()
        print_rank_0("> building train, validation, and test datasets for GPT ...")
        built_here = partial(
            self.is_dataset_built_on_rank, vp_stage=vp_stage, is_packed_sequence=self.args.sft
        )
        datasets = BlendedMegatronDatasetBuilder(
            dataset_type, train_val_test_num_samples, built_here, config
        ).build()
        print_rank_0("> finished creating GPT datasets ...")
        return datasets

    # Megatron builds the data loaders on every rank and broadcasts nothing itself (read off
    # the bound method through its function).
    train_valid_test_datasets_provider.is_distributed = True


def domain_loss_report(
    losses_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor,
    domain_ids_BS: torch.Tensor,
    domain_names: tuple[str, ...] | list[str],
) -> dict[str, torch.Tensor]:
    """Per-domain LM loss entries for Megatron's evaluation, ``[numerator, denominator]`` each.

    Megatron's ``evaluate`` sums every ``[numerator, denominator]`` entry over micro-batches
    and the DP x CP group and prints ``numerator / denominator``. For each domain ``d``
    (``n_d`` = its loss-masked tokens, ``n`` = all loss-masked tokens, labelled or not)::

        "lm loss/<d>":     [sum_{t in d} mask_t * loss_t, n_d]  -> the domain's mean LM loss
        "token share/<d>": [n_d, n]                             -> its share of the tokens

    so ``sum_d share_d * loss_d`` is the overall ``lm loss`` when every token is labelled.
    Every domain has both entries on every rank and micro-batch (the reduction needs the same
    keys everywhere); a domain absent from the whole validation set prints ``nan``.

    Args:
        losses_BS: Per-token LM loss.
        loss_mask_BS: 1 for tokens in the loss, same shape.
        domain_ids_BS: Domain id per token (-1: unlabelled), same shape.
        domain_names: Name of each domain id.
    """
    if not (losses_BS.shape == loss_mask_BS.shape == domain_ids_BS.shape):
        raise ValueError(
            f"losses {tuple(losses_BS.shape)}, loss mask {tuple(loss_mask_BS.shape)} and "
            f"domain ids {tuple(domain_ids_BS.shape)} must have the same shape"
        )
    num_domains = len(domain_names)
    mask_T = loss_mask_BS.reshape(-1).float()
    ids_T = domain_ids_BS.reshape(-1)
    labelled_T = ids_T >= 0
    rows_T = torch.where(labelled_T, ids_T, 0)
    weight_T = mask_T * labelled_T
    sums_D = torch.zeros(num_domains, device=mask_T.device).index_add_(
        0, rows_T, losses_BS.reshape(-1).float().detach() * weight_T
    )
    tokens_D = torch.zeros(num_domains, device=mask_T.device).index_add_(0, rows_T, weight_T)
    total = mask_T.sum()
    report = {}
    for d, name in enumerate(domain_names):
        report[f"lm loss/{name}"] = torch.stack([sums_D[d], tokens_D[d]])
    for d, name in enumerate(domain_names):
        report[f"token share/{name}"] = torch.stack([tokens_D[d], total])
    return report


SHARE_LINE = "validation token shares |"
"""Start of the line with the ``token share/<d>`` entries, printed before Megatron's
``validation loss at ...`` line of the same evaluation (Megatron prints a PPL for every entry
of its line, meaningless for a share)."""


def install_share_logging() -> None:
    """Wrap Megatron's ``evaluate`` to log the ``token share/<d>`` entries on a line of their
    own, ``validation token shares | token share/<d> value: X | ...``, without a PPL.

    The entries leave ``total_loss_dict`` after the wrapped ``evaluate`` (and the hooks it may
    already carry, e.g. the telemetry probe's, which read them) returned. Installed once.
    """
    from megatron.training import training
    from megatron.training.utils import print_rank_last

    touch("evaluate-share-logging")

    evaluate = training.evaluate
    if getattr(evaluate, "_edl_shares", False):
        return

    def evaluate_logging_shares(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        total_loss_dict = result[0] if isinstance(result, tuple) else None
        if total_loss_dict:
            shares = [k for k in total_loss_dict if k.startswith("token share/")]
            if shares:
                line = "".join(f" {k} value: {float(total_loss_dict.pop(k)):.6E} |" for k in shares)
                print_rank_last(f" {SHARE_LINE}{line}")
        return result

    evaluate_logging_shares._edl_shares = True
    training.evaluate = evaluate_logging_shares
