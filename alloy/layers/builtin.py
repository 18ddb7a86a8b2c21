"""Importing this module registers every built-in layer kind."""
from alloy.layers import (  # noqa: F401
    attention, dsv4, gated_deltanet, kda, lightning, mla, mamba1, mamba2, mlp, moe, parallel, rglru, short_conv)
