"""Token-level cross-entropy with a loss mask."""
from __future__ import annotations

import mlx.core as mx


def cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array | None = None,
                  reduction: str = "mean") -> mx.array:
    """logits (..., V); targets (...) int; mask (...) bool/0-1 or None.

    loss_i = logsumexp(logits_i) - logits_i[target_i], computed in float32.
    reduction "mean": sum(loss * mask) / max(sum(mask), 1); "sum"; "none": per token (masked to 0).
    """
    lf = logits.astype(mx.float32)
    lse = mx.logsumexp(lf, axis=-1)
    tgt = mx.take_along_axis(lf, targets[..., None].astype(mx.int32), axis=-1)[..., 0]
    loss = lse - tgt
    if mask is not None:
        m = mask.astype(mx.float32)
        loss = loss * m
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        denom = loss.size if mask is None else mx.maximum(mask.astype(mx.float32).sum(), 1.0)
        return loss.sum() / denom
    raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
