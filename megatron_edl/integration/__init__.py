"""Megatron integration: the router, the training step, the launcher's model and data wiring.

Together with ``megatron_edl.data`` (which uses megatron-core's dataset and tokenizer classes to
write and read Megatron's indexed format) the only code that imports ``megatron``.
"""
