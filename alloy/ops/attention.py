"""Scaled dot-product attention: causal, sliding-window, MHA / GQA / MQA, over a KV state.

    S = scale * Q K^T + mask ;  O = softmax(S) V          (softmax in float32)

Queries carry absolute positions ``q_pos`` and keys ``k_pos``; key j is visible to query i when

    k_pos[j] <= q_pos[i]   and   (window is None or q_pos[i] - k_pos[j] < window)

and, with a KV state, only slots that have been written (k_pos >= 0) count. Hkv divides Hq: query
head h reads KV head h // (Hq // Hkv) (GQA; Hkv == 1 is MQA).

Attention sinks (gpt-oss, DeepSeek-V4): a learned logit s_h per query head joins every row's softmax
as one extra column that carries no value, O = softmax([S, s_h])[:, :-1] V — a row may then put
weight "nowhere", and a row whose keys are all masked returns 0.

Shapes: q (B, Hq, T, D); k, v (B, Hkv, S, D); q_pos (B, T) int; k_pos (B, S) or (S,) int.
"""
from __future__ import annotations

import math

import mlx.core as mx


def visibility_mask(q_pos: mx.array, k_pos: mx.array, window: int | None = None) -> mx.array:
    """Boolean (B, 1, T, S) mask from positions (see module docstring); k_pos < 0 marks empty slots."""
    if k_pos.ndim == 1:
        k_pos = k_pos[None]
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :]
    m = (kp <= qp) & (kp >= 0)
    if window is not None:
        m = m & (qp - kp < window)
    return m


def attention_ref(q, k, v, *, scale: float | None = None, mask: mx.array | None = None,
                  sinks: mx.array | None = None) -> mx.array:
    """Reference attention. mask: None, or boolean / additive, broadcastable to (B, Hq, T, S);
    sinks: None or (Hq,) sink logits."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"attention: {Hq} query heads are not a multiple of {Hkv} KV heads")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # 1. share each KV head across its group of query heads
    k = mx.repeat(k, Hq // Hkv, axis=1)
    v = mx.repeat(v, Hq // Hkv, axis=1)
    # 2. scores in float32, masked
    s = (q.astype(mx.float32) * scale) @ k.astype(mx.float32).swapaxes(-1, -2)
    if mask is not None:
        if mask.dtype == mx.bool_:
            s = mx.where(mask, s, -mx.inf)
        else:
            s = s + mask.astype(mx.float32)
    # 3. softmax (over the keys and the sink column, which is then dropped) and weighted values
    if sinks is not None:
        sink = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, Hq, 1, 1), (*s.shape[:-1], 1))
        p = mx.softmax(mx.concatenate([s, sink], axis=-1), axis=-1)[..., :-1]
    else:
        p = mx.softmax(s, axis=-1)
    return (p @ v.astype(mx.float32)).astype(q.dtype)


def causal_mask(T: int, S: int | None = None, window: int | None = None) -> mx.array:
    """Boolean (T, S) mask for a plain forward: queries are the last T of S positions."""
    S = T if S is None else S
    qp = mx.arange(S - T, S)[:, None]
    kp = mx.arange(S)[None, :]
    m = kp <= qp
    if window is not None:
        m = m & (qp - kp < window)
    return m


def attention(q, k, v, *, scale: float | None = None, mask=None, sinks: mx.array | None = None,
              impl: str = "auto") -> mx.array:
    """Public attention. ``mask``: None, "causal", or a boolean/additive array; ``sinks``: (Hq,).

    "auto" uses ``mx.fast.scaled_dot_product_attention`` (native GQA, fp32 softmax).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if impl == "ref":
        if isinstance(mask, str):
            if mask != "causal":
                raise ValueError(f"attention: string mask must be 'causal', got {mask!r}")
            mask = causal_mask(q.shape[2], k.shape[2])
        return attention_ref(q, k, v, scale=scale, mask=mask, sinks=sinks)
    if impl not in ("auto", "fast"):
        raise ValueError(f"attention: impl must be 'auto', 'fast' or 'ref', got {impl!r}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if sinks is not None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks.astype(q.dtype))
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
