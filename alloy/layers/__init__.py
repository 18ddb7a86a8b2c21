"""Layers: one file per mixer / FFN, each ``init / init_state / apply`` plus a registration."""
from alloy.layers.registry import (  # noqa: F401
    LayerSettings,
    LayerSpec,
    get_ffn,
    get_mixer,
    register_ffn,
    register_mixer,
    registered,
)
