"""Small helpers shared by layer files."""
from __future__ import annotations

import mlx.core as mx


def dense(p: dict, x: mx.array) -> mx.array:
    """y = x W^T (+ b) for an HF-layout linear {"weight": (out, in), "bias"?: (out,)}."""
    y = x @ p["weight"].T
    if "bias" in p:
        y = y + p["bias"]
    return y


def dtype_of(name: str):
    return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[name]
