"""Manifold-constrained hyper-connections (mHC; Xie et al. 2026, DeepSeek-V4): the residual stream is
n parallel streams h (B, T, n, D). Around every sub-block f (mixer or FFN), from the streams
themselves (flattened to n*D, RMS-normalised without a weight):

    [a, b, c] = rms(h) W^T                       W: ((2 + n) * n, n * D), split n | n | n*n
    pre  = sigmoid(s0 * a + base_a) + eps        (n,)     collapse weights
    post = 2 * sigmoid(s1 * b + base_b)          (n,)     expand weights
    M    = sinkhorn(softmax_rows(s2 * c + base_c) + eps)   (n, n) doubly stochastic
    x    = sum_j pre_j h_j                        the sub-block's input (then its own RMSNorm)
    h'_k = post_k f(x) + sum_j M_jk h_j

``sinkhorn`` divides by column sums once, then alternates rows and columns (iters - 1 times), each
with eps added to the sum. At the top of the stack the streams are collapsed once more by a head
with its own (n, n*D) projection, base and one scale: x = sum_j (sigmoid(s * a + base) + eps)_j h_j.
The weights are computed in float32. Params per sub-block {"fn", "base", "scale"}.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.ops.norm import rms_norm
from alloy.params import init as I


def init(key, n: int, d_model: int, std: float) -> dict:
    m = (2 + n) * n
    return {"fn": I.normal(key, (m, n * d_model), std), "base": mx.zeros((m,)), "scale": mx.ones((3,))}


def init_head(key, n: int, d_model: int, std: float) -> dict:
    return {"fn": I.normal(key, (n, n * d_model), std), "base": mx.zeros((n,)), "scale": mx.ones((1,))}


def sinkhorn(a: mx.array, iters: int, eps: float) -> mx.array:
    """(..., n, n) positive -> doubly stochastic: columns, then (rows, columns) iters - 1 times."""
    a = a / (a.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        a = a / (a.sum(axis=-1, keepdims=True) + eps)
        a = a / (a.sum(axis=-2, keepdims=True) + eps)
    return a


def _mix_logits(p, h, norm_eps):
    B, T, n, D = h.shape
    flat = rms_norm(h.reshape(B, T, n * D).astype(mx.float32), None, norm_eps)
    return flat @ p["fn"].astype(mx.float32).T


def weights(p, h, iters: int, eps: float, norm_eps: float):
    """Streams h (B, T, n, D) -> (pre (B,T,n), post (B,T,n), M (B,T,n,n)), float32."""
    n = h.shape[2]
    z = _mix_logits(p, h, norm_eps)
    s, base = p["scale"].astype(mx.float32), p["base"].astype(mx.float32)
    a, b, c = mx.split(z, [n, 2 * n], axis=-1)
    ba, bb, bc = mx.split(base, [n, 2 * n])
    pre = mx.sigmoid(a * s[0] + ba) + eps
    post = 2 * mx.sigmoid(b * s[1] + bb)
    logits = (c * s[2] + bc).reshape(*c.shape[:-1], n, n)
    return pre, post, sinkhorn(mx.softmax(logits, axis=-1) + eps, iters, eps)


def collapse(pre, h):
    """sum_j pre_j h_j, in h's dtype."""
    return (pre[..., None] * h.astype(mx.float32)).sum(axis=2).astype(h.dtype)


def expand(post, M, h, y):
    """h'_k = post_k y + sum_j M_jk h_j (in h's dtype)."""
    mixed = mx.einsum("btjk,btjd->btkd", M.astype(h.dtype), h)
    return post.astype(h.dtype)[..., None] * y[..., None, :] + mixed


def head(p, h, eps: float, norm_eps: float):
    """The final collapse of the streams (B, T, n, D) -> (B, T, D)."""
    z = _mix_logits(p, h, norm_eps)
    pre = mx.sigmoid(z * p["scale"].astype(mx.float32) + p["base"].astype(mx.float32)) + eps
    return collapse(pre, h)
