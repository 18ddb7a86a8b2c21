"""Learning-rate schedules: pure functions of the step, an ``mx.array``, returning an ``mx.array``.

Each ``make_*`` returns ``schedule(step) -> lr`` (float32 scalar). The step is an array so a
compiled train step sees one trace for every step value; nothing here branches on its value
(``mx.where`` picks the phase).

    constant:        lr(s) = peak                                  (after warmup)
    linear:          lr(s) = peak + (end - peak) * p               p = (s - warmup) / (total - warmup)
    warmup + cosine: lr(s) = end + (peak - end) * (1 + cos(pi p)) / 2
    warmup (all):    lr(s) = peak * (s + 1) / warmup               for s < warmup

``p`` is clipped to [0, 1], so steps past ``total`` stay at ``end``.
"""
from __future__ import annotations

import math

import mlx.core as mx

__all__ = ["constant", "linear", "warmup_cosine", "make_schedule", "SCHEDULES"]


def _check(peak, warmup, total=None, end=None):
    if not isinstance(peak, (int, float)) or peak < 0:
        raise ValueError(f"schedule: peak lr must be a non-negative number, got {peak!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"schedule: warmup must be a non-negative int, got {warmup!r}")
    if total is not None and (not isinstance(total, int) or total <= warmup):
        raise ValueError(f"schedule: total steps must be an int > warmup ({warmup}), got {total!r}")
    if end is not None and (not isinstance(end, (int, float)) or end < 0):
        raise ValueError(f"schedule: end lr must be a non-negative number, got {end!r}")


def _warm(step, peak: float, warmup: int, after):
    s = step.astype(mx.float32)
    if warmup == 0:
        return after(s)
    return mx.where(s < warmup, peak * (s + 1.0) / warmup, after(s))


def _progress(s, warmup: int, total: int):
    return mx.clip((s - warmup) / float(total - warmup), 0.0, 1.0)


def constant(peak: float, warmup: int = 0):
    """``peak`` after a linear warmup of ``warmup`` steps."""
    _check(peak, warmup)
    return lambda step: _warm(step, peak, warmup, lambda s: mx.full(s.shape, peak, mx.float32))


def linear(peak: float, total: int, warmup: int = 0, end: float = 0.0):
    """Warmup, then a straight line from ``peak`` at ``warmup`` to ``end`` at ``total``."""
    _check(peak, warmup, total, end)
    return lambda step: _warm(
        step, peak, warmup, lambda s: peak + (end - peak) * _progress(s, warmup, total))


def warmup_cosine(peak: float, total: int, warmup: int = 0, end: float = 0.0):
    """Warmup, then a half cosine from ``peak`` at ``warmup`` to ``end`` at ``total``."""
    _check(peak, warmup, total, end)
    return lambda step: _warm(
        step, peak, warmup,
        lambda s: end + (peak - end) * 0.5 * (1.0 + mx.cos(math.pi * _progress(s, warmup, total))))


SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(kind: str, peak: float, total: int, warmup: int = 0, end: float = 0.0):
    """The schedule named ``kind`` (one of ``SCHEDULES``)."""
    if kind == "cosine":
        return warmup_cosine(peak, total, warmup, end)
    if kind == "linear":
        return linear(peak, total, warmup, end)
    if kind == "constant":
        return constant(peak, warmup)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
