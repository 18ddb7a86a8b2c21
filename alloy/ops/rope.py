"""Rotary position embedding (RoPE), full or partial.

For a head vector x (D,) at position t, the first ``dims`` features are rotated pairwise by
angles t * base^(-2i/dims), i < dims/2; the remaining D - dims features pass unchanged.
Pairs are (i, i + dims/2) ("rotate half", the Hugging Face / GPT-NeoX layout) or
(2i, 2i + 1) when ``traditional`` (the original GPT-J layout).
Positions are arrays: an ``offset`` of shape () or (B,) gives each row's first position.
"""
from __future__ import annotations

import mlx.core as mx


def rope_ref(x: mx.array, offset: mx.array | int, dims: int, base: float = 10000.0,
             traditional: bool = False, scale: float = 1.0) -> mx.array:
    """x: (B, H, T, D); offset: int, () or (B,) int32. Returns x rotated, same dtype."""
    B, _, T, D = x.shape
    if dims > D or dims % 2:
        raise ValueError(f"rope: dims must be even and <= head dim {D}, got {dims}")
    off = mx.array(offset, dtype=mx.int32) if not isinstance(offset, mx.array) else offset
    off = mx.broadcast_to(off.reshape(-1), (B,)).astype(mx.float32)
    # 1. positions (B, T) and angles (B, T, dims/2)
    pos = (off[:, None] + mx.arange(T, dtype=mx.float32)[None, :]) * scale
    inv_freq = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    ang = pos[:, :, None] * inv_freq[None, None, :]
    cos, sin = mx.cos(ang)[:, None], mx.sin(ang)[:, None]  # (B, 1, T, dims/2)
    xr, rest = x[..., :dims].astype(mx.float32), x[..., dims:]
    # 2. pair up features and rotate each pair
    if traditional:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(xr.shape)
    else:
        a, b = xr[..., : dims // 2], xr[..., dims // 2:]
        out = mx.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return mx.concatenate([out.astype(x.dtype), rest], axis=-1)


def rope(x: mx.array, offset: mx.array | int, dims: int, base: float = 10000.0,
         traditional: bool = False, scale: float = 1.0, impl: str = "auto") -> mx.array:
    """Public RoPE: ``mx.fast.rope`` (per-row offsets supported) or the reference."""
    if impl == "ref":
        return rope_ref(x, offset, dims, base, traditional, scale)
    if impl not in ("auto", "fast"):
        raise ValueError(f"rope: impl must be 'auto', 'fast' or 'ref', got {impl!r}")
    if isinstance(offset, mx.array):
        offset = offset.astype(mx.int32)
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)
