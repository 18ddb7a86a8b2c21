"""Rotary position embedding (RoPE), full or partial.

For a head vector x (D,) at position t, the first ``dims`` features are rotated pairwise by
angles t * base^(-2i/dims), i < dims/2; the remaining D - dims features pass unchanged.
Pairs are (i, i + dims/2) ("rotate half", the Hugging Face / GPT-NeoX layout) or
(2i, 2i + 1) when ``traditional`` (the original GPT-J layout).
Positions are arrays: an ``offset`` of shape () or (B,) gives each row's first position;
``rope_at`` takes any (B, T) positions and may rotate the *last* features instead (DeepSeek-V4).
"""
from __future__ import annotations

import functools
import math

import mlx.core as mx


def rope_inv_freq(dims: int, base: float = 10000.0, rope_type: str = "default", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_position: int = 8192, beta_fast: float = 32.0,
                  beta_slow: float = 1.0) -> mx.array:
    """Inverse frequencies base^(-2i/dims), i < dims/2, optionally rescaled for long context:

    linear   every frequency / factor (positions interpolated)
    llama3   wavelengths 2*pi/f longer than original/low_freq_factor: f / factor; shorter than
             original/high_freq_factor: unchanged; in between: a smooth blend of the two
    yarn     (frequencies only; no attention temperature) pair i keeps f for i below the pair that
             turns beta_fast times over the original context, takes f / factor above the pair that
             turns beta_slow times, and a linear ramp in between (bounds floored / ceiled)
    """
    inv = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return inv / factor
    if rope_type == "yarn":
        def pair_turning(turns):  # the (fractional) pair index that turns `turns` times over the context
            return dims * math.log(original_max_position / (turns * 2 * math.pi)) / (2 * math.log(base))
        lo = max(math.floor(pair_turning(beta_fast)), 0)
        hi = min(math.ceil(pair_turning(beta_slow)), dims - 1)
        ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - lo) / ((hi - lo) or 0.001), 0.0, 1.0)
        return inv / factor * ramp + inv * (1 - ramp)
    if rope_type != "llama3":
        raise ValueError(f"rope: rope_type must be 'default', 'linear', 'llama3' or 'yarn', got {rope_type!r}")
    wavelen = 2 * math.pi / inv
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    scaled = mx.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return mx.where(medium, blended, scaled)


def rope_ref(x: mx.array, offset: mx.array | int, dims: int, base: float = 10000.0,
             traditional: bool = False, scale: float = 1.0, inv_freq: mx.array | None = None) -> mx.array:
    """x: (B, H, T, D); offset: int, () or (B,) int32; inv_freq (dims/2,) overrides ``base``.
    Returns x rotated, same dtype."""
    B, _, T, D = x.shape
    if dims > D or dims % 2:
        raise ValueError(f"rope: dims must be even and <= head dim {D}, got {dims}")
    # positions (B, T); the rotation itself is rope_at's
    pos = mx.broadcast_to(_positions(offset, T, scale), (B, T))
    return rope_at(x, pos, _freqs(dims, base, inv_freq), traditional)


def _positions(offset: mx.array | int, T: int, scale: float) -> mx.array:
    """(R, T) float32 positions of T steps from ``offset`` (int, () or (R,)), times ``scale``."""
    off = mx.array(offset, dtype=mx.int32) if not isinstance(offset, mx.array) else offset
    off = off.reshape(-1).astype(mx.float32)
    return (off[:, None] + mx.arange(T, dtype=mx.float32)[None, :]) * scale


def _freqs(dims: int, base: float, inv_freq: mx.array | None) -> mx.array:
    """``inv_freq``, or the plain base^(-2i/dims), i < dims/2."""
    return base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims) if inv_freq is None else inv_freq


def rope(x: mx.array, offset: mx.array | int, dims: int, base: float = 10000.0,
         traditional: bool = False, scale: float = 1.0, impl: str = "auto",
         inv_freq: mx.array | None = None) -> mx.array:
    """Public RoPE: ``mx.fast.rope`` (per-row offsets supported) or the reference. ``inv_freq``
    (from ``rope_inv_freq``) replaces the plain ``base`` frequencies."""
    if impl == "ref":
        return rope_ref(x, offset, dims, base, traditional, scale, inv_freq)
    if impl not in ("auto", "fast"):
        raise ValueError(f"rope: impl must be 'auto', 'fast' or 'ref', got {impl!r}")
    if isinstance(offset, mx.array):
        offset = offset.astype(mx.int32)
    if inv_freq is not None:  # mx.fast.rope takes the reciprocal frequencies
        return mx.fast.rope(x, dims, traditional=traditional, base=None, scale=scale, offset=offset,
                            freqs=1.0 / inv_freq)
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)


def rope_at(x: mx.array, positions: mx.array, inv_freq: mx.array, traditional: bool = False,
            tail: bool = False) -> mx.array:
    """Rotate x (B, H, T, D) at explicit positions (B, T) (any numbers, negative included: a
    rotation by -p undoes one by p). The rotated features are the first 2*len(inv_freq), or the
    last ones with ``tail``; pairs as in ``rope_ref``. Computed in float32, returns x's dtype."""
    dims = 2 * inv_freq.shape[0]
    D = x.shape[-1]
    if dims > D:
        raise ValueError(f"rope_at: {dims} rotary dims exceed head dim {D}")
    ang = (positions.astype(mx.float32)[..., None] * inv_freq.astype(mx.float32))[:, None]  # (B, 1, T, dims/2)
    return rope_rotate(x, mx.cos(ang), mx.sin(ang), traditional, tail)


def rope_rotate(x: mx.array, cos: mx.array, sin: mx.array, traditional: bool = False,
                tail: bool = False) -> mx.array:
    """Rotate x (B, H, T, D) by angles given as cos / sin tables broadcastable to (B, H, T, dims/2):
    the first dims features (the last with ``tail``), pairs as in ``rope_ref``, in float32; returns
    x's dtype."""
    dims, D = 2 * cos.shape[-1], x.shape[-1]
    keep, xr = (x[..., :D - dims], x[..., D - dims:]) if tail else (x[..., dims:], x[..., :dims])
    xr = xr.astype(mx.float32)
    if traditional:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(xr.shape)
    else:
        a, b = xr[..., : dims // 2], xr[..., dims // 2:]
        out = mx.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    out = out.astype(x.dtype)
    return mx.concatenate([keep, out] if tail else [out, keep], axis=-1)


def rope_tables(T: int, offset: mx.array | int, dims: int, base: float = 10000.0, scale: float = 1.0,
                inv_freq: mx.array | None = None, attention_factor: float = 1.0) -> tuple[mx.array, mx.array]:
    """float32 (cos, sin) tables (R, T, dims/2) of the angles ``rope_ref`` rotates by: R = 1 for an int
    or a () / (1,) offset, else B (an offset per row). ``attention_factor`` (YaRN's temperature)
    multiplies both, i.e. scales the rotated features."""
    ang = _positions(offset, T, scale)[..., None] * _freqs(dims, base, inv_freq).astype(mx.float32)
    cos, sin = mx.cos(ang), mx.sin(ang)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def rope_heads(x: mx.array, offset: mx.array | int, dims: int, base: float = 10000.0,
               traditional: bool = False, scale: float = 1.0, inv_freq: mx.array | None = None,
               attention_factor: float = 1.0, tables: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """RoPE of head vectors in the projection layout: x (B, T, H, D) -> rotated (B, H, T, D), as
    ``rope(x.transpose(0, 2, 1, 3), ...)`` with the rotated features then times ``attention_factor``.

    On a GPU backend, a prefill / training call (T > 1) is one pass of `alloy.metal.rope` (rotation and
    layout change together, contiguous output; its gradient one pass back) over the angle tables of
    ``rope_tables`` (``tables``: those, made once for several calls such as q and k); elsewhere, and
    for a decode step (whose transpose is free), the transpose + ``rope`` path."""
    B, T, H, D = x.shape
    if dims > D or dims % 2:
        raise ValueError(f"rope_heads: dims must be even and <= head dim {D}, got {dims}")
    from alloy import metal
    from alloy.metal import rope as kernels

    if metal.backend() is not None and T > 1:
        cos, sin = tables if tables is not None else rope_tables(T, offset, dims, base, scale, inv_freq,
                                                                 attention_factor)
        if kernels.applies(x, dims, cos):
            return _rope_heads_kernel(bool(traditional))(x, mx.stop_gradient(cos), mx.stop_gradient(sin))[0]
    y = rope(x.transpose(0, 2, 1, 3), offset, dims, base, traditional, scale, inv_freq=inv_freq)
    return y if attention_factor == 1.0 else scale_rotated(y, dims, attention_factor)


def scale_rotated(x: mx.array, dims: int, factor: float) -> mx.array:
    """x with its first ``dims`` features (the rotated ones) multiplied by ``factor`` (YaRN's
    temperature applied after the rotation)."""
    if dims == x.shape[-1]:
        return x * factor
    return mx.concatenate([x[..., :dims] * factor, x[..., dims:]], axis=-1)


def _rope_heads_tables_ref(x, cos, sin, traditional: bool):
    """The kernel's math in MLX ops (its `differentiable` slow path): x (B, T, H, D), tables (R, T, dims/2)."""
    return rope_rotate(x.transpose(0, 2, 1, 3), cos[:, None], sin[:, None], traditional)


@functools.lru_cache(maxsize=None)
def _rope_heads_kernel(traditional: bool):
    from alloy import metal
    from alloy.metal import rope as kernels

    return metal.differentiable(
        lambda x, c, s: (kernels.rope_heads(x, c, s, traditional),),
        lambda x, c, s: (_rope_heads_tables_ref(x, c, s, traditional),),
        lambda x, c, s, dy: kernels.rope_heads_vjp(x, c, s, dy, traditional))
