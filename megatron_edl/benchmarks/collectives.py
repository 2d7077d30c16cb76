"""The collectives an MoE layer issues per micro-batch, counted on every rank of a gloo group:
the worker of ``tools/benchmark_collectives.py`` (its docstring has the layouts and what the
counts must be), in the package so that the ranks spawned by
:func:`megatron_edl.benchmarks.gloo.run_distributed` import it however the tool was loaded.
"""

from __future__ import annotations

__all__ = ["CONFIGS", "LAYOUTS", "count_worker"]

# name -> (tensor parallel, expert parallel, EDL scope)
LAYOUTS = {
    "dp": (1, 1, "global"),
    "dp-local": (1, 1, "local"),
    "ep": (1, None, "global"),  # None: all ranks
    "tp": (None, 1, "global"),
}
CONFIGS = ("stock", "edl", "aux", "aux+edl")


def count_worker(rank: int, world: int, spec: dict) -> dict:
    """On every rank: per layout and config, the collectives of one forward+backward."""
    import dataclasses

    import torch

    from megatron_edl.benchmarks.moe_modules import (
        VARIANTS,
        CollectiveCounter,
        ModuleShape,
        build_moe_layer,
        init_megatron,
        random_router_labels,
        transformer_config,
    )

    torch.manual_seed(0)
    results: dict = {}
    for layout in spec["layouts"]:
        tp, ep, scope = LAYOUTS[layout]
        tp, ep = tp or world, ep or world
        init_megatron("cpu", tensor_parallel=tp, expert_parallel=ep)
        for domains in spec["domains"]:
            shape = ModuleShape(
                tokens=spec["tokens"], hidden=spec["hidden"], experts=spec["experts"],
                domains=domains, topk=spec["topk"], ffn_hidden=spec["hidden"], batch=2,
            )  # fmt: skip
            seq = shape.tokens // shape.batch
            hidden_sBH = torch.randn(seq // tp, shape.batch, shape.hidden, requires_grad=True)
            labels = random_router_labels(shape, seed=rank // tp, tp_rank=rank % tp, tp_size=tp)
            weights = None  # the same weights in every config: the same routing
            for name in CONFIGS:
                variant = VARIANTS[name]
                if variant.edl is not None:
                    variant = dataclasses.replace(variant, edl={**variant.edl, "scope": scope})
                config = transformer_config(
                    shape,
                    load_balancing=variant.load_balancing,
                    dtype=torch.float32,
                    tensor_model_parallel_size=tp,
                    sequence_parallel=tp > 1,
                    expert_model_parallel_size=ep,
                )
                layer = build_moe_layer(
                    config, variant.edl_config(), torch.device("cpu"), num_domains=domains
                )
                if weights is None:
                    weights = {k: p.detach().clone() for k, p in layer.named_parameters()}
                with torch.no_grad():
                    for k, p in layer.named_parameters():
                        p.copy_(weights[k])
                if variant.edl is not None:
                    layer.router.push_labels(labels)
                with CollectiveCounter() as counter:
                    output_sBH, _ = layer(hidden_sBH)
                    output_sBH.sum().backward()
                results[(layout, domains, name)] = dict(counter.calls)
    return results
