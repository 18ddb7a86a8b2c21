"""Initializers: explicit keys in, arrays out (no global RNG)."""
from __future__ import annotations

import math

import mlx.core as mx


def split(key: mx.array, n: int) -> list[mx.array]:
    """n independent keys from one."""
    return list(mx.random.split(key, n))


def normal(key, shape, std: float = 0.02, dtype=mx.float32) -> mx.array:
    return (mx.random.normal(shape, key=key) * std).astype(dtype)


def uniform(key, shape, low: float, high: float, dtype=mx.float32) -> mx.array:
    return mx.random.uniform(low, high, shape, key=key).astype(dtype)


def linear(key, d_in: int, d_out: int, std: float = 0.02, bias: bool = False) -> dict:
    """A linear layer stored HF-style: weight (d_out, d_in), optional zero bias (d_out,)."""
    p = {"weight": normal(key, (d_out, d_in), std)}
    if bias:
        p["bias"] = mx.zeros((d_out,))
    return p


def ones(shape) -> mx.array:
    return mx.ones(shape)


def inverse_softplus(y: mx.array) -> mx.array:
    """x with softplus(x) == y (y > 0)."""
    return y + mx.log(-mx.expm1(-y))


def dt_bias(key, n: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> mx.array:
    """Mamba's dt bias: softplus(bias) log-uniform in [dt_min, dt_max]."""
    u = mx.random.uniform(shape=(n,), key=key)
    dt = mx.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inverse_softplus(mx.maximum(dt, floor))


def conv1d(key, channels: int, width: int, bias: bool = True) -> dict:
    """Depthwise conv in the HF layout: weight (C, 1, K), uniform(+-1/sqrt(K)) like PyTorch."""
    bound = 1.0 / math.sqrt(width)
    p = {"weight": uniform(key, (channels, 1, width), -bound, bound)}
    if bias:
        p["bias"] = mx.zeros((channels,))
    return p
