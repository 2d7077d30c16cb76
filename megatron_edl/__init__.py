"""megatron-edl: Expert Divergence Learning for MoE pre-training on NVIDIA Megatron-Core.

Importing the package is cheap and side-effect free: it pulls in neither ``megatron``, nor the
CPU compatibility layer (:mod:`megatron_edl.cpu`), nor transformer-engine, apex or modelopt.

Subpackages:
    core         pure math (torch only: no ``megatron``, no ``torch.distributed``)
    integration  Megatron integration (the only place that imports ``megatron``)
    data         domain-labelled data
    analysis     telemetry readers, metrics and plots
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
