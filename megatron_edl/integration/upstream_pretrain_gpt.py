"""Megatron-LM's ``pretrain_gpt.py`` step functions, ported to the installed megatron-core wheel.

Upstream: NVIDIA/Megatron-LM, tag ``core_v0.19.0``, file ``pretrain_gpt.py`` (the module-level
functions: ``get_batch``, ``loss_func``, ``forward_step``, ``is_dataset_built_on_rank``, the
dataset config and provider, ``get_embedding_ranks``). The wheel does not ship that script, so
this module re-implements it, keeping upstream's function names, order and behaviour: every
dataset kind (mock, indexed ``GPTDataset``, FIM, SFT), THD packed sequences, CP splitting, the
NaN/spiky-loss checks of the rerun state machine, cached-logits distillation and ModelOpt (when
installed). It reads Megatron's global args (``get_args()``), as upstream does. An upgrade of
megatron-core is upstream's diff between the two tags (``git diff core_v0.19.0 core_vNEW --
pretrain_gpt.py``), carried into this file (docs/CONTRIBUTING.md, "The upstream port"). Checked
against ``core_v0.19.0`` (commit 5be9626709af); ``tests/e2e/test_upstream_patch.py`` with
``MEGATRON_LM_DIR`` compares the upstream script, patched and not, with the launcher.

What differs from upstream, and why (megatron-edl's wrappers live in
:mod:`megatron_edl.integration.gpt`, not here):

* ``forward_step`` takes one keyword-only hook object, ``hooks`` (:class:`StepHooks`; ``None``:
  stock): where the batch comes from, a call between fetching it and the forward (inside the
  same timers), and the loss closure. megatron-edl passes its labelled batch, the push of the
  labels to the routers, and the per-domain loss report.
* ``get_batch`` copies the keys of :data:`BATCH_KEYS` only from the loader's batch: a dataset may
  add keys of its own (megatron-edl's domain labels), which the caller reads from the loader's
  batch itself.
* The dataset config's fields are built by :func:`dataset_config_kwargs` so that a wrapper can
  build a subclass of ``GPTDatasetConfig`` with the same fields.
* Written as a module of functions (no ``__main__`` block): the launcher is
  :mod:`megatron_edl.pretrain_gpt`. Upstream's ``core_gpt_dataset_config_from_args`` is
  :func:`gpt_dataset_config_from_args`; ``_cached_logits_loss`` and the ``modelopt`` module wrap
  the optional distillation and ModelOpt imports the wheel may lack.
"""

from __future__ import annotations

import json
from functools import lru_cache, partial
from typing import Any, Protocol

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

from megatron_edl.integration import modelopt

__all__ = [
    "BATCH_KEYS",
    "SPIKY_LOSS_FACTOR",
    "StepHooks",
    "dataset_config_kwargs",
    "forward_step",
    "get_batch",
    "get_embedding_ranks",
    "gpt_dataset_config_from_args",
    "is_dataset_built_on_rank",
    "loss_func",
    "packed_seq_params_from_batch",
    "stimer",
    "train_valid_test_datasets_provider",
]

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

# A loss this many times the largest loss seen so far counts as a spike (rerun state machine).
SPIKY_LOSS_FACTOR = 10

# Megatron's straggler detector (a process-wide singleton, reported by the training loop under
# --log-straggler): times the batch fetch and the forward, as the stock forward_step does.
stimer = StragglerDetector()


class StepHooks(Protocol):
    """The hook points of :func:`forward_step` (not upstream's; see the module docstring)."""

    def get_batch(self, data_iterator, vp_stage: int | None) -> dict[str, Any]:
        """The micro-batch (a superset of :data:`BATCH_KEYS`), instead of :func:`get_batch`."""

    def before_forward(self, model, batch: dict[str, Any]) -> None:
        """Called after the batch fetch, inside the batch-generator timer and ``stimer``."""

    def loss_func(self, batch: dict[str, Any], model):
        """The loss closure the schedule calls with the output tensor, instead of
        ``partial(loss_func, batch["loss_mask"], model=model)``."""


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

    Intermediate pipeline stages receive no data (unless packed sequences need their metadata).
    Only the keys of :data:`BATCH_KEYS` are taken from the loader's batch.
    """
    args = get_args()
    has_cu_seqlens = args.sft or args.dataloader_inter_document_masking
    mtp_here = _mtp_on_this_rank(args, vp_stage)
    edge_stage = is_first_or_last_pipeline_stage(vp_stage)
    if not edge_stage and not mtp_here and not has_cu_seqlens:
        return dict.fromkeys(BATCH_KEYS)

    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch: dict = {}
    if tp_rank == 0:
        loaded = next(data_iterator)
        for key in BATCH_KEYS:
            value = loaded.get(key)
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
    batch = flatten_batch_for_packed_sequences(batch)

    if not edge_stage and not mtp_here:
        # Intermediate stage with packed sequences: the THD metadata only.
        keep = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")
        return {key: batch.get(key) if key in keep else None for key in BATCH_KEYS}

    batch = get_batch_on_this_cp_rank(
        batch,
        is_hybrid_cp=args.hybrid_context_parallel,
        cp_group=get_context_parallel_group(),
        hybrid_cp_group_func=get_hybrid_data_context_parallel_groups,
        use_per_sequence_balancing=per_sequence_cp_balancing(args),
    )
    return {key: batch.get(key) for key in BATCH_KEYS}


def per_sequence_cp_balancing(args) -> bool:
    """Megatron's choice of CP split for packed sequences (per sequence unless ``--sft``)."""
    return args.dataloader_inter_document_masking and not args.sft


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


def loss_func(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    model=None,
):
    """Masked sum of per-token LM losses.

    Returns:
        ``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens], ...})``, the contract of
        Megatron's schedules (they divide by the token count across DP).
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


def forward_step(
    data_iterator, model, return_schedule_plan: bool = False, *, hooks: StepHooks | None = None
):
    """One micro-batch forward; returns the output and the loss closure the schedule calls.

    ``hooks`` (not upstream's): where the batch comes from, a call before the forward, and the
    loss closure (:class:`StepHooks`); ``None``: stock.
    """
    args = get_args()
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    with stimer(bdata=True):
        vp_stage = get_attr_wrapped_model(model, "vp_stage")
        if hooks is None:
            batch = get_batch(data_iterator, vp_stage)
        else:
            batch = hooks.get_batch(data_iterator, vp_stage)
        packed_seq_params = packed_seq_params_from_batch(batch, args.seq_length)
        if hooks is not None:
            hooks.before_forward(model, batch)
    timers("batch-generator").stop()

    tokens, position_ids = batch["tokens"], batch["position_ids"]
    attention_mask, labels, loss_mask = batch["attention_mask"], batch["labels"], batch["loss_mask"]
    if hooks is None:
        loss_closure = partial(loss_func, loss_mask, model=model)
    else:
        loss_closure = hooks.loss_func(batch, model)
    if return_schedule_plan:
        if not args.overlap_moe_expert_parallel_comm:
            raise ValueError("a schedule plan needs --overlap-moe-expert-parallel-comm")
        plan = model.build_schedule_plan(
            tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask
        )
        return plan, loss_closure
    with stimer:
        output_tensor = model(
            tokens,
            position_ids,
            attention_mask,
            labels=labels,
            loss_mask=loss_mask,
            packed_seq_params=packed_seq_params,
        )
    return output_tensor, loss_closure


def is_dataset_built_on_rank(vp_stage=None, is_packed_sequence: bool = False) -> bool:
    """Datasets live on TP rank 0 of the stages that read tokens (or MTP stages)."""
    if mpu.get_tensor_model_parallel_rank() != 0:
        return False
    if is_packed_sequence:
        return True
    args = get_args()
    return is_first_or_last_pipeline_stage(vp_stage) or _mtp_on_this_rank(args, vp_stage)


def dataset_config_kwargs(args) -> dict[str, Any]:
    """The fields of the ``GPTDatasetConfig`` Megatron's flags describe (upstream's
    ``data_args``)."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if args.per_dataset_sequences_path is not None:
        with open(args.per_dataset_sequences_path) as f:
            sequences_per_dataset = json.load(f)
    return dict(
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


def gpt_dataset_config_from_args(args) -> GPTDatasetConfig:
    """The ``GPTDatasetConfig`` (or FIM config) Megatron's flags describe."""
    kwargs = dataset_config_kwargs(args)
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
    if args.sft:
        dataset_type, packed = SFTDataset, True
    elif args.mock_data:
        dataset_type, packed = MockGPTDataset, False
    elif args.fim_data:
        dataset_type, packed = GPTFIMDataset, False
    else:
        dataset_type, packed = GPTDataset, False
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
