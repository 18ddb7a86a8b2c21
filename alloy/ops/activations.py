"""Feed-forward activations: SwiGLU and friends."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up (Shazeer 2020). gate, up: (..., F)."""
    return nn.silu(gate) * up


def relu2(x: mx.array) -> mx.array:
    """Squared ReLU (Primer; Nemotron-H experts)."""
    r = mx.maximum(x, 0)
    return r * r


ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_tanh": nn.gelu_approx,
    "relu": nn.relu,
    "relu2": relu2,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
