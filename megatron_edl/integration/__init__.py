"""Megatron integration: the only subpackage that imports ``megatron``."""
