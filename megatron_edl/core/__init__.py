"""Pure math: torch only. Nothing here imports ``megatron`` or ``torch.distributed``."""
