"""Optional NVIDIA ModelOpt support, active only when ``megatron.post_training`` is importable.

``megatron.post_training`` ships with a Megatron-LM source checkout (NGC containers put one on
``PYTHONPATH``), not with the ``megatron-core`` wheel; it needs ``nvidia-modelopt``. Without it
every function here is a no-op, so the CPU path never imports modelopt.
"""

from __future__ import annotations

import argparse

try:
    from megatron.post_training.arguments import add_modelopt_args
    from megatron.post_training.loss_func import loss_func as _modelopt_loss_func
    from megatron.post_training.model_builder import ModelOptModelConfig
    from megatron.post_training.utils import maybe_enable_modelopt

    AVAILABLE = True
except ImportError:  # no Megatron-LM checkout or no nvidia-modelopt
    AVAILABLE = False


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ModelOpt's flags when available."""
    return add_modelopt_args(parser) if AVAILABLE else parser


def maybe_enable(args) -> None:
    """Let ModelOpt inspect the parsed args (it sets ``args.modelopt_enabled``)."""
    if AVAILABLE:
        maybe_enable_modelopt(args)


def enabled(args) -> bool:
    return AVAILABLE and bool(getattr(args, "modelopt_enabled", False))


def model_config_cls():
    """ModelOpt's ``GPTModelConfig`` subclass, or ``None`` for the stock one."""
    return ModelOptModelConfig if AVAILABLE else None


def loss_func(loss_mask, output_tensor, model=None):
    return _modelopt_loss_func(loss_mask, output_tensor, model=model)
