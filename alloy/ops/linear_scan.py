"""Diagonal linear recurrence  h_t = a_t * h_{t-1} + x_t  (RG-LRU, and any gated linear RNN).

Shapes: log_a, x (B, T, W) with log_a <= 0; h0 (B, W) or None. Accumulates in float32.
``linear_scan_ref`` loops over time (the specification); ``linear_scan`` is the log-depth parallel
form (Hillis-Steele over (log a, x) pairs, the same primitive as the selective scan's).
"""
from __future__ import annotations

import mlx.core as mx

from alloy.ops.selective_scan import _scan_pairs

_F32 = mx.float32


def linear_scan_ref(log_a, x, h0=None):
    """Returns (h (B, T, W) in x.dtype, final state (B, W) float32)."""
    B, T, W = x.shape
    h = mx.zeros((B, W), _F32) if h0 is None else h0.astype(_F32)
    out = []
    for t in range(T):
        h = mx.exp(log_a[:, t].astype(_F32)) * h + x[:, t].astype(_F32)  # 1. decay, 2. add input
        out.append(h)
    return mx.stack(out, axis=1).astype(x.dtype), h


def linear_scan(log_a, x, h0=None, impl: str = "auto"):
    """Public linear scan: "ref" sequential, "auto" parallel (T == 1 is one fused step)."""
    if impl == "ref":
        return linear_scan_ref(log_a, x, h0)
    if impl != "auto":
        raise ValueError(f"linear_scan: impl must be 'auto' or 'ref', got {impl!r}")
    if log_a.shape != x.shape:
        raise ValueError(f"linear_scan: log_a shape {tuple(log_a.shape)} must equal x shape {tuple(x.shape)}")
    la, u = log_a.astype(_F32), x.astype(_F32)
    if h0 is not None:  # fold the initial state into the first input
        u = mx.concatenate([u[:, :1] + mx.exp(la[:, :1]) * h0.astype(_F32)[:, None], u[:, 1:]], axis=1)
    if x.shape[1] > 1:
        la, u = _scan_pairs(la, u, axis=1)
    return u.astype(x.dtype), u[:, -1]
