"""Importing this module registers every built-in layer kind."""
from alloy.layers import attention, gated_deltanet, mamba1, mamba2, mlp, moe, parallel, short_conv  # noqa: F401
