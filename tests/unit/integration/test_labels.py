"""Labels are sliced exactly like the tokens: Megatron's CP split and the SP slice of the router."""

from __future__ import annotations

import torch

from tests.helpers.distributed import run_distributed


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


def _labels(num_tokens: int, first_id: int = 0):
    from megatron_edl.integration.labels import DomainLabels

    ids_T = torch.arange(first_id, first_id + num_tokens)
    return DomainLabels(domain_ids_T=ids_T, weights_T=torch.ones(num_tokens))


def test_label_queue_is_fifo_and_checks_the_token_count():
    import pytest

    from megatron_edl.integration.labels import LabelQueue

    queue = LabelQueue()
    first, second = _labels(4), _labels(4, first_id=10)
    queue.push(first)
    queue.push(second)
    assert len(queue) == 2
    assert queue.pop(4) is first and queue.pop(4) is second
    with pytest.raises(RuntimeError, match="router 7 has no domain labels"):
        queue.pop(4, consumer="router 7")
    queue.push(_labels(3))
    with pytest.raises(ValueError, match="router 7 sees 4 tokens but got 3 domain labels"):
        queue.pop(4, consumer="router 7")
    queue.push(first)
    queue.clear()
    assert len(queue) == 0


def test_push_labels_reaches_consumers_by_base_class_only():
    from megatron_edl.integration.labels import (
        LabelConsumer,
        LabelQueue,
        label_consumers,
        push_labels,
        routers_wanting_labels,
    )

    class Consumer(torch.nn.Module, LabelConsumer):
        def __init__(self, wants: bool) -> None:
            super().__init__()
            self.label_queue = LabelQueue()
            self.wants = wants

        def wants_labels(self, grad_enabled: bool) -> bool:
            return self.wants and grad_enabled

    model = torch.nn.Sequential(Consumer(True), torch.nn.Linear(2, 2), Consumer(False))
    assert label_consumers(model) == [model[0], model[2]]
    labels = _labels(5)
    push_labels(model, labels)
    assert [len(c.label_queue) for c in (model[0], model[2])] == [1, 0]
    with torch.no_grad():
        assert routers_wanting_labels(model) == []


def test_labels_module_imports_nothing_of_ours_and_the_integration_has_no_cycles():
    import ast
    from pathlib import Path

    import megatron_edl

    root = Path(megatron_edl.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in (root / "integration").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps.update(n for n in names if n.startswith("megatron_edl"))
        graph[f"megatron_edl.integration.{path.stem}"] = deps
    assert graph["megatron_edl.integration.labels"] == set()
    assert not any("router" in d for d in graph["megatron_edl.integration.telemetry"])

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    cycles = sorted(m for m in graph if m in reachable(m))
    assert not cycles, f"import cycles through {cycles}"
