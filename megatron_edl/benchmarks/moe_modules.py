"""Megatron routers and MoE layers, stock or with EDL, for benchmarks on a one-process group.

The benchmark scripts build the *real* modules (megatron-core's ``TopKRouter`` and ``MoELayer``,
and :class:`~megatron_edl.integration.router.AuxLossTopKRouter` installed through
:func:`~megatron_edl.integration.spec.with_aux_loss_router`) the way the training loop does, on a
process group of one rank: gloo on CPU (with :mod:`megatron_edl.cpu` applied), NCCL on a GPU.
With one rank every collective is a local no-op, but it is still issued, so the EDL path does
exactly the work it does in training (packing, the all-reduce call, unpacking).

:class:`CollectiveCounter` counts the collectives a block of code issues, at the level where they
reach the process-group backend (every ``c10d`` operator, however Megatron calls it).

Shape legend: T tokens, H hidden, E experts, D domains, B samples, S sequence.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_edl.config import EDLConfig

__all__ = [
    "DEFAULT_VARIANTS",
    "CollectiveCounter",
    "ModuleShape",
    "RATIOS",
    "VARIANTS",
    "Variant",
    "build_moe_layer",
    "build_router",
    "init_megatron",
    "random_router_labels",
    "transformer_config",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModuleShape:
    """Sizes of one benchmarked router or MoE layer."""

    tokens: int
    """T, tokens per micro-batch seen by the layer (laid out as ``[T / batch, batch, H]``)."""
    hidden: int
    """H, the hidden size."""
    experts: int
    """E, routed experts."""
    domains: int
    """D, EDL domains."""
    topk: int = 8
    """Experts per token."""
    ffn_hidden: int = 0
    """Expert FFN hidden size (MoE layers only; 0: routers)."""
    batch: int = 4
    """Samples per micro-batch (T must be divisible by it)."""

    def __post_init__(self) -> None:
        if self.tokens % self.batch:
            raise ValueError(f"tokens ({self.tokens}) must be divisible by batch ({self.batch})")
        if self.topk > self.experts:
            raise ValueError(f"topk ({self.topk}) must be <= experts ({self.experts})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One configuration of the router's losses that a benchmark compares."""

    load_balancing: str
    """Megatron's ``moe_router_load_balancing_type`` (``"none"``, ``"aux_loss"``, ...)."""
    edl: dict[str, Any] | None = None
    """``EDLConfig`` fields, or ``None`` for the stock ``TopKRouter`` (the number of domains is
    the shape's, passed to the router builders as ``num_domains``)."""

    def edl_config(self) -> EDLConfig | None:
        """The ``EDLConfig`` of this variant (``None``: stock)."""
        if self.edl is None:
            return None
        return EDLConfig(**self.edl)


VARIANTS: dict[str, Variant] = {
    "stock": Variant(load_balancing="none"),
    "edl": Variant(load_balancing="none", edl={"coeff": 1e-2}),
    "aux": Variant(load_balancing="aux_loss"),
    "aux+edl": Variant(load_balancing="aux_loss", edl={"coeff": 1e-2}),
    "edl-eager": Variant(load_balancing="none", edl={"coeff": 1e-2, "fused": "off"}),
    "edl-fused": Variant(load_balancing="none", edl={"coeff": 1e-2, "fused": "on"}),
}
"""The configurations the router and MoE-layer benchmarks know (``--configs``). ``edl`` runs
the EDL math as ``--moe-edl-fused auto`` does (compiled on CUDA, eager on CPU); ``edl-eager``
and ``edl-fused`` force one path (``torch.compile`` takes tens of seconds on the first call, so
they are not in ``DEFAULT_VARIANTS``).

Extension point: a new router loss (e.g. the orthogonality or variance losses) adds its variants
here, with the ``EDLConfig`` fields that switch it on, and its ratios to ``RATIOS``."""

DEFAULT_VARIANTS: tuple[str, ...] = ("stock", "edl", "aux", "aux+edl")
"""What the router benchmark compares when ``--configs`` is not given."""

RATIOS: tuple[tuple[str, str], ...] = (
    ("edl", "stock"),
    ("aux", "stock"),
    ("aux+edl", "aux"),
    ("edl-eager", "stock"),
    ("edl-fused", "stock"),
    ("edl-fused", "edl-eager"),
)
"""``(numerator, denominator)``: the ratios the benchmarks print (those whose two variants ran).
``aux / stock`` is the cost of Megatron's own load-balancing loss: the reference kind of work."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_megatron(
    device: str, *, tensor_parallel: int = 1, expert_parallel: int = 1
) -> torch.device:
    """Process group (if none yet: one rank) and Megatron's model-parallel state on ``device``.

    On CPU applies :mod:`megatron_edl.cpu` and uses gloo; on ``cuda`` uses NCCL. A process
    group that already exists (several ranks, e.g. under
    ``tests/helpers/distributed.run_distributed``) is used as it is. Also sets Megatron's
    micro-batch calculator to one micro-batch per data-parallel rank (the EDL router reads it).

    Returns:
        The ``torch.device`` to build and run on.

    Raises:
        ValueError: On ``cuda`` without a visible GPU, or an unknown device.
    """
    from megatron.core import num_microbatches_calculator, parallel_state

    dev = torch.device(device)
    if dev.type == "cpu":
        from megatron_edl import cpu

        cpu.apply()
        backend = "gloo"
    elif dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no GPU is visible")
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend, rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        expert_model_parallel_size=expert_parallel,
        create_gloo_process_groups=False,
    )
    dp = parallel_state.get_data_parallel_world_size()
    num_microbatches_calculator.destroy_num_microbatches_calculator()
    num_microbatches_calculator.init_num_microbatches_calculator(
        0, None, global_batch_size=dp, micro_batch_size=1, data_parallel_size=dp
    )
    return dev


def transformer_config(
    shape: ModuleShape, *, load_balancing: str, dtype: torch.dtype, **overrides: Any
):
    """Megatron ``TransformerConfig`` of a one-layer MoE of ``shape``.

    Args:
        shape: The sizes.
        load_balancing: ``"none"`` or a Megatron load-balancing type (``"aux_loss"``, ...);
            with one, ``moe_aux_loss_coeff`` is 1e-2.
        dtype: Parameter dtype (fp32 on CPU, bf16 on a GPU).
        **overrides: Further ``TransformerConfig`` fields.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = not torch.cuda.is_available()
    fields = {
        "num_layers": 1,
        "hidden_size": shape.hidden,
        "num_attention_heads": 8,
        "num_moe_experts": shape.experts,
        "moe_router_topk": shape.topk,
        "moe_ffn_hidden_size": shape.ffn_hidden or None,
        "ffn_hidden_size": shape.ffn_hidden or 4 * shape.hidden,
        "moe_router_load_balancing_type": load_balancing,
        "moe_aux_loss_coeff": 0.0 if load_balancing == "none" else 1e-2,
        "moe_token_dispatcher_type": "alltoall",
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
        "add_bias_linear": False,
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "use_cpu_initialization": on_cpu,
        "gradient_accumulation_fusion": False,
        "bias_activation_fusion": False,
        **overrides,
    }
    return TransformerConfig(**fields)


def build_router(
    config, edl_config: EDLConfig | None, device: torch.device, *, num_domains: int | None = None
) -> torch.nn.Module:
    """Megatron's ``TopKRouter`` (``edl_config=None``) or an ``AuxLossTopKRouter``, layer 1.

    Args:
        num_domains: The number of loss domains of the ``AuxLossTopKRouter``.

    Raises:
        ValueError: If EDL is on and ``num_domains`` is ``None``.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_edl.integration.router import AuxLossTopKRouter

    pg = ProcessGroupCollection.use_mpu_process_groups()
    if edl_config is None:
        router = TopKRouter(config=config, pg_collection=pg)
    else:
        router = AuxLossTopKRouter(
            config=config, pg_collection=pg, run_config=_run_config(edl_config, num_domains)
        )
    router.set_layer_number(1)
    return router.to(device).train()


def build_moe_layer(
    config, edl_config: EDLConfig | None, device: torch.device, *, num_domains: int | None = None
) -> torch.nn.Module:
    """Megatron's ``MoELayer`` from its own MLP spec, with the EDL router installed if asked
    (``num_domains``: the number of loss domains of its router).

    The Transformer Engine spec on a GPU when TE is installed, the local spec (``SequentialMLP``
    experts) otherwise; the router is swapped exactly as the training launcher does
    (:func:`~megatron_edl.integration.spec.with_aux_loss_router`).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_edl.integration.spec import with_aux_loss_router

    use_te = device.type == "cuda" and _have_transformer_engine()
    spec = get_mlp_module_spec(
        use_te=use_te, num_experts=config.num_moe_experts, moe_grouped_gemm=use_te
    )
    if edl_config is not None:
        spec = with_aux_loss_router(spec, _run_config(edl_config, num_domains))
    # The spec is a builder (a functools.partial of MoELayer binding its submodules).
    layer = spec(
        config=config,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        layer_number=1,
    )
    layer.router.set_layer_number(1)
    return layer.to(device).train()


def _run_config(edl_config: EDLConfig, num_domains: int | None):
    """The run config of an EDL router with ``num_domains`` loss domains."""
    from megatron_edl.config import EDLRunConfig, LabelsConfig

    return EDLRunConfig(labels=LabelsConfig(num_domains=num_domains), edl=edl_config)


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def random_router_labels(
    shape: ModuleShape,
    *,
    unlabelled: float = 0.1,
    seed: int = 0,
    tp_rank: int = 0,
    tp_size: int = 1,
):
    """Domain labels of one micro-batch in the router's token order, with segment weights.

    Each of the ``batch`` rows of ``T / batch`` tokens is packed with documents of 32 to 1024
    tokens, each of a random domain in [0, D), or unlabelled (-1) with probability
    ``unlabelled``; the weights are 1 / (document length within the row), as the labelled
    datasets produce them. With ``tp_size > 1`` the micro-batch is the whole ``[batch, T /
    batch]`` one and the result is this TP rank's sequence-parallel slice.

    Returns:
        A :class:`~megatron_edl.integration.labels.DomainLabels` (CPU tensors).
    """
    from megatron_edl.core.edl import segment_weights_from_ids
    from megatron_edl.integration.labels import router_labels

    gen = torch.Generator().manual_seed(seed)
    seq = shape.tokens // shape.batch
    doc_BS = torch.empty(shape.batch, seq, dtype=torch.int64)
    domain_BS = torch.empty(shape.batch, seq, dtype=torch.int64)
    doc = 0
    for b in range(shape.batch):
        pos = 0
        while pos < seq:
            length = min(int(torch.randint(32, 1025, (1,), generator=gen)), seq - pos)
            labelled = float(torch.rand(1, generator=gen)) >= unlabelled
            domain = int(torch.randint(0, shape.domains, (1,), generator=gen)) if labelled else -1
            doc_BS[b, pos : pos + length] = doc
            domain_BS[b, pos : pos + length] = domain
            pos += length
            doc += 1
    weights_BS = segment_weights_from_ids(segment_ids_BS=doc_BS)
    return router_labels(
        domain_BS, weights_BS, sequence_parallel=tp_size > 1, tp_rank=tp_rank, tp_size=tp_size
    )


class CollectiveCounter(TorchDispatchMode):
    """Counts the ``c10d`` collectives issued inside a ``with`` block, with their sizes.

    Works at the dispatcher, where every ``torch.distributed`` collective becomes a ``c10d``
    operator call (``c10d.allreduce_``, ``c10d._allgather_base_``, ``c10d.alltoall_base_``...),
    so it sees the calls Megatron makes through saved aliases (``dist_all_gather_func``) too.

    Attributes:
        calls: operator name -> list of ``(elements, bytes)`` of the input tensors of each call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            tensors = _tensors_of(args[0]) if args else []
            elements = sum(t.numel() for t in tensors)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            self.calls[func.__name__.split(".")[0]].append((elements, nbytes))
        return func(*args, **(kwargs or {}))


def _tensors_of(arg) -> list[torch.Tensor]:
    if isinstance(arg, torch.Tensor):
        return [arg]
    if isinstance(arg, list | tuple):
        return [t for item in arg for t in _tensors_of(item)]
    return []
