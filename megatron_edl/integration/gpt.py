"""GPT pre-training step functions for ``megatron.training.pretrain`` (megatron-core 0.19).

The functions Megatron-LM's ``pretrain_gpt.py`` defines at the top level (batch fetching, loss,
forward step, dataset provider, embedding ranks), written against the installed
``megatron-core`` wheel, which does not ship that script. Behaviour is stock: every dataset kind
(mock, indexed ``GPTDataset``, FIM, SFT), THD packed sequences, CP splitting, the NaN/spiky-loss
checks of the rerun state machine, cached-logits distillation and ModelOpt (when installed).
With domain labels on (an ``EDLConfig`` the launcher stores as ``args.edl_config``: the EDL loss
is on, or ``--moe-edl-eval-per-domain``), the batch also carries per-token domain ids and EDL
weights, broadcast over TP and split over CP like the tokens, on every pipeline stage;
:func:`forward_step` queues each training micro-batch's labels on the EDL routers before the
forward (EDL loss on), and :func:`loss_func` reports the validation loss per domain. With labels
off every function behaves exactly as stock.
"""

from __future__ import annotations

import json
from functools import lru_cache, partial

import torch
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.parallel_state import (
    get_context_parallel_group,
    get_hybrid_data_context_parallel_groups,
)
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.transformer.multi_token_prediction import get_mtp_ranks, mtp_on_this_rank
from megatron.core.utils import (
    StragglerDetector,
    flatten_batch_for_packed_sequences,
    get_attr_wrapped_model,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
)
from megatron.training import get_args, get_timers, print_rank_0
from megatron.training.arguments import core_transformer_config_from_args
from megatron.training.datasets.fim_dataset import GPTFIMDataset, GPTFIMDatasetConfig
from megatron.training.datasets.sft_dataset import SFTDataset
from megatron.training.training import update_seqlen_stats_from_cu_seqlens
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from megatron_edl.config import EDLConfig
from megatron_edl.integration import labels as edl_labels
from megatron_edl.integration import modelopt
from megatron_edl.integration.dataset import (
    DomainGPTDataset,
    DomainGPTDatasetConfig,
    DomainMockGPTDataset,
    DomainPerPrefixGPTDataset,
    DomainSFTDataset,
    evaluation_labels,
    mock_document_domains,
)

# The fields get_batch returns, in this order (alphabetical, as Megatron's callers unpack them).
BATCH_KEYS = (
    "attention_mask",
    "cu_seqlens",
    "cu_seqlens_padded",
    "hybrid_cp_group",
    "labels",
    "local_cp_size",
    "loss_mask",
    "max_seqlen",
    "position_ids",
    "tokens",
)

ALL_KEYS = BATCH_KEYS + edl_labels.EDL_BATCH_KEYS

# A loss this many times the largest loss seen so far counts as a spike (rerun state machine).
SPIKY_LOSS_FACTOR = 10

# Megatron's straggler detector (a process-wide singleton, reported by the training loop under
# --log-straggler): times the batch fetch and the forward, as the stock forward_step does.
stimer = StragglerDetector()


def edl_config() -> EDLConfig | None:
    """The run's EDL configuration (set on Megatron's args by the launcher), or ``None``."""
    return getattr(get_args(), "edl_config", None)


def _mtp_on_this_rank(args, vp_stage: int | None) -> bool:
    config = core_transformer_config_from_args(args)
    return mtp_on_this_rank(
        layout=config.pipeline_model_parallel_layout,
        mtp_num_layers=config.mtp_num_layers,
        ignore_virtual=False,
        vp_stage=vp_stage,
    )


def get_batch(data_iterator, vp_stage: int | None = None) -> dict[str, torch.Tensor | None]:
    """Fetch one micro-batch on TP rank 0, broadcast it over TP, then slice it for this CP rank.

    Intermediate pipeline stages receive no data (unless packed sequences need their metadata,
    or their MoE layers need domain labels). With packed (THD) sequences, the domain labels are
    flattened to ``[1, b * s]`` like the tokens and cut for CP by the same split (including the
    per-document one of ``--sft``), so every router sees the labels of its tokens.
    """
    args = get_args()
    has_cu_seqlens = args.sft or args.dataloader_inter_document_masking
    mtp_here = _mtp_on_this_rank(args, vp_stage)
    edge_stage = is_first_or_last_pipeline_stage(vp_stage)
    if not edge_stage and not mtp_here and not has_cu_seqlens:
        if edl_config() is not None:  # its MoE layers may need the domain labels
            return _get_edl_labels_only(data_iterator, args)
        return dict.fromkeys(ALL_KEYS)

    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch: dict = {}
    next_batch: dict = {}
    if tp_rank == 0:
        batch = next_batch = next(data_iterator)
        for key in BATCH_KEYS:
            value = batch.get(key)
            batch[key] = value.cuda(non_blocking=True) if value is not None else None

    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=has_cu_seqlens,
        is_hybrid_cp=args.hybrid_context_parallel,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=mtp_here,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    labels = _broadcast_edl_labels(next_batch, args) if edl_config() is not None else {}
    for key in edl_labels.EDL_BATCH_KEYS:  # TP rank 0's loader copies; `labels` is split below
        batch.pop(key, None)
    batch = flatten_batch_for_packed_sequences(batch)
    if labels and batch.get("cu_seqlens") is not None:
        labels = {key: value.reshape(1, -1) for key, value in labels.items()}  # as the tokens

    if not edge_stage and not mtp_here:
        # Intermediate stage with packed sequences: the THD metadata (and, with domain labels,
        # this CP rank's labels for its MoE layers).
        keep = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")
        out = {key: batch.get(key) if key in keep else None for key in ALL_KEYS}
        return out | _labels_on_this_cp_rank(labels, batch, args)

    batch = get_batch_on_this_cp_rank(
        batch,
        is_hybrid_cp=args.hybrid_context_parallel,
        cp_group=get_context_parallel_group(),
        hybrid_cp_group_func=get_hybrid_data_context_parallel_groups,
        use_per_sequence_balancing=_per_sequence_cp_balancing(args),
    )
    batch.update(_labels_on_this_cp_rank(labels, batch, args))
    return {key: batch.get(key) for key in ALL_KEYS}


def _per_sequence_cp_balancing(args) -> bool:
    """Megatron's choice of CP split for packed sequences (per sequence unless ``--sft``)."""
    return args.dataloader_inter_document_masking and not args.sft


def _labels_on_this_cp_rank(labels: dict, batch: dict, args) -> dict[str, torch.Tensor]:
    """This CP rank's part of the (flattened) labels, cut exactly like the tokens.

    Megatron's ``get_batch_on_this_cp_rank`` picks the split: zig-zag over the whole sequence,
    or, for ``--sft`` packed sequences, per document with TE's THD partition indices; the
    per-document split only cuts its fixed sequence keys. So the labels go through the same
    function with the same packed-sequence metadata, riding in the ``tokens`` and ``labels``
    slots. ``{}`` when there are no labels.
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
        is_hybrid_cp=False,  # refused with domain labels (edl_config_from_args)
        cp_group=get_context_parallel_group(),
        use_per_sequence_balancing=_per_sequence_cp_balancing(args),
    )
    return {
        edl_labels.DOMAIN_IDS_KEY: carrier["tokens"],
        edl_labels.WEIGHTS_KEY: carrier["labels"],
    }


def _broadcast_edl_labels(batch: dict, args) -> dict[str, torch.Tensor]:
    """The EDL keys of TP rank 0's ``batch`` on every TP rank."""
    return edl_labels.broadcast_labels_over_tp(
        batch,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        src_rank=mpu.get_tensor_model_parallel_src_rank(),
        group=mpu.get_tensor_model_parallel_group(),
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
    )


def _get_edl_labels_only(data_iterator, args) -> dict[str, torch.Tensor | None]:
    """Labels for a stage that gets no tokens: read the batch, keep the EDL keys, slice for CP."""
    batch = next(data_iterator) if mpu.get_tensor_model_parallel_rank() == 0 else {}
    labels = _labels_on_this_cp_rank(_broadcast_edl_labels(batch, args), {}, args)
    return {key: labels.get(key) for key in ALL_KEYS}


@lru_cache(maxsize=1)
def _cached_logits_loss(logprobs_dir, threads, prefetch, msc_depth, alpha, ignore_errors):
    from megatron.training.distillation import LossFuncCallable

    return LossFuncCallable(
        logprobs_dir=logprobs_dir,
        decode_threads=threads,
        prefetch_factor=prefetch,
        msc_prefetch_depth=msc_depth,
        kd_loss_alpha=alpha,
        ignore_errors=ignore_errors,
    )


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


def loss_func(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    model=None,
    domain_ids: torch.Tensor | None = None,
):
    """Masked sum of per-token LM losses.

    Returns:
        ``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens], ...})``, the contract of
        Megatron's schedules (they divide by the token count across DP). In evaluation with
        domain labels (``domain_ids`` given, model in eval mode), the report also holds
        :func:`domain_loss_report`'s per-domain entries.
    """
    args = get_args()
    if args.logits_load_dir is not None:
        cached = _cached_logits_loss(
            args.logits_load_dir,
            args.logits_load_decode_threads,
            args.logits_load_prefetch_factor,
            args.logits_load_msc_prefetch_depth,
            args.logits_load_kd_loss_alpha,
            args.logits_load_ignore_errors,
        )
        loss, num_tokens, report = cached(loss_mask, output_tensor, model=model)
    elif modelopt.enabled(args):
        loss, num_tokens, report = modelopt.loss_func(loss_mask, output_tensor, model=model)
    else:
        mask_T = loss_mask.view(-1).float()
        loss = torch.sum(output_tensor.view(-1).float() * mask_T)
        num_tokens = mask_T.sum().clone().detach().to(torch.int)
        report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    if domain_ids is not None and model is not None and not model.training:
        cfg = edl_config()
        report.update(
            domain_loss_report(
                output_tensor.view_as(loss_mask), loss_mask, domain_ids, cfg.domain_names
            )
        )

    rerun = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun.validate_result(
                result=loss,
                rejection_func=reject,
                message=f"found {what} in local forward loss calculation",
                tolerance=0.0,
                fatal=True,
            )
    if args.check_for_spiky_loss:
        rerun.validate_result(
            result=loss,
            rejection_func=partial(
                rerun.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR, context="loss"
            ),
            message="Spiky loss",
            tolerance=0.0,
            fatal=False,
        )
    return loss, num_tokens, report


def packed_seq_params_from_batch(batch: dict, seq_length: int) -> PackedSeqParams | None:
    """THD ``PackedSeqParams`` for a batch that carries ``cu_seqlens``; ``None`` otherwise."""
    cu_seqlens = batch["cu_seqlens"]
    if cu_seqlens is None:
        return None
    cu_seqlens = cu_seqlens.squeeze(0)  # the batch keeps it as [1, N]; TE wants 1-D
    padded = batch["cu_seqlens_padded"]
    padded = padded.squeeze(0) if padded is not None else None
    update_seqlen_stats_from_cu_seqlens(cu_seqlens)
    # Attention runs over the padded boundaries when they exist (as upstream does).
    effective = padded if padded is not None else cu_seqlens
    max_seqlen = int(batch["max_seqlen"].item())
    local_cp_size = batch["local_cp_size"]
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=effective,
        cu_seqlens_kv=effective,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
        local_cp_size=int(local_cp_size.item()) if local_cp_size is not None else None,
        cp_group=batch["hybrid_cp_group"],
        tokens_per_sample=seq_length,
    )


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch forward; returns the output and the loss closure the schedule calls."""
    args = get_args()
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    with stimer(bdata=True):
        batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
        packed_seq_params = packed_seq_params_from_batch(batch, args.seq_length)
        cfg = edl_config()
        if cfg is not None and edl_labels.routers_wanting_labels(model):  # EDL loss, telemetry
            _push_edl_labels(model, batch, args)
    timers("batch-generator").stop()

    tokens, position_ids = batch["tokens"], batch["position_ids"]
    attention_mask, labels, loss_mask = batch["attention_mask"], batch["labels"], batch["loss_mask"]
    domain_ids = batch[edl_labels.DOMAIN_IDS_KEY]
    if return_schedule_plan:
        if not args.overlap_moe_expert_parallel_comm:
            raise ValueError("a schedule plan needs --overlap-moe-expert-parallel-comm")
        plan = model.build_schedule_plan(
            tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask
        )
        return plan, partial(loss_func, loss_mask, model=model, domain_ids=domain_ids)
    with stimer:
        output_tensor = model(
            tokens,
            position_ids,
            attention_mask,
            labels=labels,
            loss_mask=loss_mask,
            packed_seq_params=packed_seq_params,
        )
    return output_tensor, partial(loss_func, loss_mask, model=model, domain_ids=domain_ids)


def _push_edl_labels(model, batch: dict, args) -> None:
    ids_BS = batch[edl_labels.DOMAIN_IDS_KEY]
    if ids_BS is None:
        raise RuntimeError("EDL is on but this pipeline stage received no domain labels")
    labels = edl_labels.router_labels(
        ids_BS,
        batch[edl_labels.WEIGHTS_KEY],
        sequence_parallel=args.sequence_parallel,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        tp_size=args.tensor_model_parallel_size,
        iteration=getattr(args, "curr_iteration", None),  # the step of the beta schedule
    )
    edl_labels.push_labels(model, labels)


def is_dataset_built_on_rank(vp_stage=None, is_packed_sequence: bool = False) -> bool:
    """Datasets live on TP rank 0 of the stages that read tokens or labels (or MTP stages).

    With EDL on, on TP rank 0 of every stage: intermediate stages hold MoE layers that need the
    domain labels, which stock Megatron never sends them.
    """
    if mpu.get_tensor_model_parallel_rank() != 0:
        return False
    if is_packed_sequence or edl_config() is not None:  # EDL: every stage needs labels
        return True
    args = get_args()
    return is_first_or_last_pipeline_stage(vp_stage) or _mtp_on_this_rank(args, vp_stage)


def gpt_dataset_config_from_args(args) -> GPTDatasetConfig:
    """The ``GPTDatasetConfig`` (or FIM config) Megatron's flags describe."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if args.per_dataset_sequences_path is not None:
        with open(args.per_dataset_sequences_path) as f:
            sequences_per_dataset = json.load(f)
    kwargs = dict(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        fast_cache_load=args.dataloader_fast_cache_load,
        sequences_per_dataset=sequences_per_dataset,
        defer_npy_index_mmap=args.dataloader_defer_npy_index_mmap,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
        hybrid_context_parallel=args.hybrid_context_parallel,
        inter_document_masking=args.dataloader_inter_document_masking,
    )
    cfg = edl_config()
    if cfg is not None:
        if args.mock_data:
            return DomainGPTDatasetConfig(
                **kwargs,
                edl_aggregation=str(cfg.aggregation),
                edl_num_domains=args.moe_edl_mock_domains,
                edl_document_domains=mock_document_domains(args.moe_edl_mock_domains, cfg),
                edl_eval_document_domains=mock_document_domains(
                    args.moe_edl_mock_domains, evaluation_labels(cfg)
                ),
            )
        return DomainGPTDatasetConfig(
            **kwargs,
            edl_aggregation=str(cfg.aggregation),
            edl_config=cfg,
            edl_domains_per_prefix=args.moe_edl_domains_per_prefix,
        )
    if not args.fim_data:
        return GPTDatasetConfig(**kwargs)
    return GPTFIMDatasetConfig(
        **kwargs,
        fim_rate=args.fim_rate,
        fim_spm_rate=args.fim_spm_rate,
        fim_extra_tokens={
            "prefix": args.fim_prefix_token,
            "middle": args.fim_middle_token,
            "suffix": args.fim_suffix_token,
            "pad": args.fim_pad_token,
            "eod": args.fim_eod_token,
        },
        fim_split_sample=args.fim_split_sample,
        fim_fragment_rate=args.fim_fragment_rate,
        fim_no_prefix=args.fim_no_prefix,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Build the train/valid/test datasets with Megatron's ``BlendedMegatronDatasetBuilder``."""
    args = get_args()
    config = gpt_dataset_config_from_args(args)
    if edl_config() is not None:
        packed = args.sft
        if args.sft:  # per-prefix domains (edl_config_from_args checks the flags)
            dataset_type = DomainSFTDataset
        elif args.mock_data:
            dataset_type = DomainMockGPTDataset
        elif args.moe_edl_domains_per_prefix:
            dataset_type = DomainPerPrefixGPTDataset
        else:
            dataset_type = DomainGPTDataset
    elif args.sft:
        dataset_type, packed = SFTDataset, True
    elif args.mock_data:
        dataset_type, packed = MockGPTDataset, False
    elif args.fim_data:
        dataset_type, packed = GPTFIMDataset, False
    else:
        dataset_type, packed = GPTDataset, False
    if edl_config() is not None:
        install_share_logging()
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    built_here = partial(is_dataset_built_on_rank, vp_stage=vp_stage, is_packed_sequence=packed)
    datasets = BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, built_here, config
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


# Megatron builds the data loaders on every rank and broadcasts nothing itself.
train_valid_test_datasets_provider.is_distributed = True


def get_embedding_ranks(pp_ranks: list[int]) -> list[int]:
    """Ranks holding embeddings: first stage, last stage when tied, and MTP stages."""
    ranks = {pp_ranks[0]}
    if len(pp_ranks) > 1:
        args = get_args()
        if not args.untie_embeddings_and_output_weights:
            ranks.add(pp_ranks[-1])
        ranks.update(get_mtp_ranks(pp_ranks, core_transformer_config_from_args(args)))
    return sorted(ranks)
