"""Diagonal linear recurrence: the parallel scan equals the sequential reference (values, states,
gradients)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import alloy  # noqa: F401
import mlx.core as mx

from alloy.ops.linear_scan import linear_scan, linear_scan_ref


def _inputs(seed, B, T, W):
    r = np.random.default_rng(seed)
    log_a = mx.array(-r.uniform(0.0, 3.0, (B, T, W)).astype(np.float32))
    x = mx.array(r.standard_normal((B, T, W)).astype(np.float32))
    h0 = mx.array(r.standard_normal((B, W)).astype(np.float32))
    return log_a, x, h0


@given(B=st.integers(1, 3), T=st.integers(1, 70), W=st.integers(1, 9), init=st.booleans(), seed=st.integers(0, 99))
def test_parallel_equals_sequential(B, T, W, init, seed):
    log_a, x, h0 = _inputs(seed, B, T, W)
    h0 = h0 if init else None
    y1, s1 = linear_scan_ref(log_a, x, h0)
    y2, s2 = linear_scan(log_a, x, h0)
    np.testing.assert_allclose(np.array(y2), np.array(y1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(s2), np.array(s1), rtol=1e-5, atol=1e-5)


@settings(max_examples=5)
@given(T=st.integers(2, 30), seed=st.integers(0, 99))
def test_gradients_equal_sequential(T, seed):
    log_a, x, h0 = _inputs(seed, 2, T, 3)
    w = mx.array(np.random.default_rng(seed).standard_normal((2, T, 3)).astype(np.float32))
    loss = lambda fn: lambda a, b, c: (fn(a, b, c)[0] * w).sum() + fn(a, b, c)[1].sum()  # noqa: E731
    g1 = mx.grad(loss(linear_scan_ref), argnums=(0, 1, 2))(log_a, x, h0)
    g2 = mx.grad(loss(linear_scan), argnums=(0, 1, 2))(log_a, x, h0)
    for a, b in zip(g2, g1):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)


def test_shape_and_impl_errors():
    log_a, x, _ = _inputs(0, 1, 4, 2)
    with pytest.raises(ValueError, match="must equal x shape"):
        linear_scan(log_a[:, :2], x)
    with pytest.raises(ValueError, match="impl must be"):
        linear_scan(log_a, x, impl="fast")
