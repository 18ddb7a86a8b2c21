"""Causal depthwise 1-D convolution with a carried state (the short conv of Mamba / GDN).

    xp = concat(state, x) along time          state: the last K-1 inputs seen so far
    y_t = b + sum_k w[:, k] * xp[t + k]       k = 0 .. K-1 (w[:, K-1] multiplies the newest input)
    new_state = xp[-(K-1):]

Shapes: x (B, T, C); weight (C, K) (the HF (C, 1, K) layout squeezed); bias (C,) or None;
state (B, K-1, C) or None (zeros). ``activation`` is None or "silu".
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def _activate(y, activation):
    if activation is None:
        return y
    if activation == "silu":
        return nn.silu(y)
    raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")


def causal_conv1d_ref(x, weight, bias=None, state=None, activation=None):
    """Returns (y (B, T, C) in x.dtype, new_state (B, K-1, C) in x.dtype)."""
    B, T, C = x.shape
    if weight.ndim == 3:
        weight = weight.reshape(weight.shape[0], weight.shape[-1])
    if weight.shape[0] != C:
        raise ValueError(f"causal_conv1d: weight has {weight.shape[0]} channels, x has {C}")
    K = weight.shape[1]
    if state is None:
        state = mx.zeros((B, K - 1, C), dtype=x.dtype)
    xp = mx.concatenate([state.astype(x.dtype), x], axis=1)  # (B, T+K-1, C)
    w = weight.astype(mx.float32)
    y = mx.zeros((B, T, C), dtype=mx.float32)
    for k in range(K):  # loop over the kernel width, not over time
        y = y + xp[:, k:k + T].astype(mx.float32) * w[:, k]
    if bias is not None:
        y = y + bias.astype(mx.float32)
    new_state = xp[:, T:] if K > 1 else xp[:, :0]
    return _activate(y, activation).astype(x.dtype), new_state


def causal_conv1d(x, weight, bias=None, state=None, activation=None, impl: str = "auto"):
    """Public causal depthwise conv1d (see module docstring)."""
    if impl not in ("auto", "ref"):
        raise ValueError(f"causal_conv1d: impl must be 'auto' or 'ref', got {impl!r}")
    return causal_conv1d_ref(x, weight, bias, state, activation)
