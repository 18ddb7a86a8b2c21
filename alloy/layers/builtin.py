"""Importing this module registers every built-in layer kind."""
from alloy.layers import attention, mamba1, mamba2, mlp  # noqa: F401
