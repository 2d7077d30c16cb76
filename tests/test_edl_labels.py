"""Labels are sliced exactly like the tokens: Megatron's CP split and the SP slice of the router."""

from __future__ import annotations

import torch

from tests.distributed import run_distributed


def _cp_split_worker(rank: int, world_size: int) -> None:
    from megatron_edl import cpu

    cpu.apply()
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    parallel_state.initialize_model_parallel(context_parallel_size=world_size)
    tokens_BS = torch.arange(2 * 16).view(2, 16)
    batch = {
        "tokens": tokens_BS.clone(),
        "domain_ids": tokens_BS.clone(),
        "edl_weights": tokens_BS.float(),
    }
    out = get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
    )
    assert out["tokens"].shape == (2, 8)
    assert torch.equal(out["domain_ids"], out["tokens"])
    assert torch.equal(out["edl_weights"], out["tokens"].float())
    parallel_state.destroy_model_parallel()


def test_cp_split_slices_labels_like_tokens():
    run_distributed(_cp_split_worker, 2)


def _sp_slice_worker(rank: int, world_size: int) -> None:
    from megatron_edl import cpu

    cpu.apply()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

    from megatron_edl.integration.labels import router_labels

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    b, s = 3, 8
    ids_BS = torch.arange(b * s).view(b, s)
    # What a router of a sequence-parallel layer sees: the embedding layout [s, b, h], scattered
    # over TP along s, then flattened s-major by the router.
    hidden_SBH = ids_BS.t().unsqueeze(-1).float().contiguous()
    seen_T = scatter_to_sequence_parallel_region(hidden_SBH).reshape(-1).long()
    labels = router_labels(
        ids_BS, ids_BS.float(), sequence_parallel=True, tp_rank=rank, tp_size=world_size
    )
    assert torch.equal(labels.domain_ids_T, seen_T), (labels.domain_ids_T, seen_T)
    assert torch.equal(labels.weights_T, seen_T.float())
    parallel_state.destroy_model_parallel()


def test_sp_slice_matches_megatrons_scatter():
    run_distributed(_sp_slice_worker, 2)
