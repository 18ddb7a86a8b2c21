"""Gated delta rule: chunked (WY/UT + affine scan over chunks) == sequential reference."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import alloy  # noqa: F401
import mlx.core as mx

from alloy.ops.gated_delta import (
    _unit_lower_inverse,
    gated_delta,
    gated_delta_chunked,
    gated_delta_ref,
    gated_delta_step,
)


def _inputs(seed, B, T, Hk, H, K, V, dtype=mx.float32):
    r = np.random.default_rng(seed)
    f = lambda *s: mx.array(r.standard_normal(s).astype(np.float32)).astype(dtype)  # noqa: E731
    q, k, v = f(B, T, Hk, K), f(B, T, Hk, K), f(B, T, H, V)
    g = mx.array(-r.uniform(0.001, 1.0, (B, T, H)).astype(np.float32))  # log decays <= 0
    beta = mx.array(r.uniform(0, 1, (B, T, H)).astype(np.float32))
    s0 = mx.array(r.standard_normal((B, H, K, V)).astype(np.float32))
    return q, k, v, g, beta, s0


def close(a, b, tol):
    np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), atol=tol, rtol=tol)


@given(B=st.integers(1, 2), T=st.integers(1, 40), hk=st.sampled_from([1, 2]), rep=st.sampled_from([1, 2]),
       K=st.sampled_from([4, 8]), V=st.sampled_from([4, 6]), C=st.integers(1, 17), init=st.booleans(),
       seed=st.integers(0, 99))
def test_chunked_equals_sequential_outputs_and_state(B, T, hk, rep, K, V, C, init, seed):
    q, k, v, g, beta, s0 = _inputs(seed, B, T, hk, hk * rep, K, V)
    s0 = s0 if init else None
    o1, s1 = gated_delta_ref(q, k, v, g, beta, s0)
    o2, s2 = gated_delta_chunked(q, k, v, g, beta, s0, chunk_size=C)
    close(o2, o1, 1e-4)  # fp32; summation order only
    close(s2, s1, 1e-4)


@settings(max_examples=6)
@given(T=st.integers(2, 20), C=st.integers(2, 8), seed=st.integers(0, 99))
def test_chunked_gradients_equal_sequential(T, C, seed):
    q, k, v, g, beta, s0 = _inputs(seed, 1, T, 1, 2, 4, 4)
    w_o = mx.array(np.random.default_rng(seed + 1).standard_normal((1, T, 2, 4)).astype(np.float32))

    def loss(fn, *args):
        o, s = fn(*args)
        return (o * w_o).sum() + (s * s).sum() * 0.1

    args = (q, k, v, g, beta, s0)
    ref = mx.grad(lambda *a: loss(gated_delta_ref, *a), argnums=tuple(range(6)))(*args)
    got = mx.grad(lambda *a: loss(lambda *b: gated_delta_chunked(*b, chunk_size=C), *a), argnums=tuple(range(6)))(*args)
    for a, b in zip(got, ref):
        close(a, b, 2e-3)


def test_split_sequence_with_state_equals_whole_and_step_equals_ref():
    q, k, v, g, beta, s0 = _inputs(3, 2, 12, 2, 4, 8, 8)
    o, s = gated_delta(q, k, v, g, beta, s0, chunk_size=4)
    o1, s1 = gated_delta(q[:, :7], k[:, :7], v[:, :7], g[:, :7], beta[:, :7], s0, chunk_size=4)
    o2, s2 = gated_delta(q[:, 7:], k[:, 7:], v[:, 7:], g[:, 7:], beta[:, 7:], s1, chunk_size=4)
    close(mx.concatenate([o1, o2], 1), o, 1e-4)
    close(s2, s, 1e-4)
    ostep, sstep = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0)
    oref, sref = gated_delta_ref(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], s0)
    close(ostep, oref[:, 0], 1e-6)
    close(sstep, sref, 1e-6)


def test_bf16_inputs_within_bf16_tolerance():
    q, k, v, g, beta, s0 = _inputs(5, 1, 24, 1, 2, 8, 8)
    o_ref, s_ref = gated_delta_ref(q, k, v, g, beta, s0)
    bf = lambda a: a.astype(mx.bfloat16)  # noqa: E731
    o, s = gated_delta_chunked(bf(q), bf(k), bf(v), g, beta, s0, chunk_size=8)
    assert o.dtype == mx.bfloat16 and s.dtype == mx.float32
    close(o, o_ref, 5e-2)
    close(s, s_ref, 5e-2)


def test_unit_lower_inverse_is_exact():
    r = np.random.default_rng(0)
    for C in (1, 2, 5, 8, 13):
        Lm = np.tril(r.standard_normal((C, C)), -1).astype(np.float32) * 0.3
        want = np.linalg.inv(np.eye(C, dtype=np.float32) + Lm)
        np.testing.assert_allclose(np.array(_unit_lower_inverse(mx.array(Lm))), want, atol=1e-5)


def test_bad_shapes_and_impl():
    q, k, v, g, beta, _ = _inputs(0, 1, 4, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="heads divisible by 2"):
        gated_delta(q, k, v, g, beta)
    q, k, v, g, beta, _ = _inputs(0, 1, 4, 1, 2, 4, 4)
    with pytest.raises(ValueError, match="g shape"):
        gated_delta(q, k, v, g[:, :2], beta)
    with pytest.raises(ValueError, match="impl must be"):
        gated_delta(q, k, v, g, beta, impl="fast")


@settings(max_examples=12)
@given(B=st.integers(1, 2), T=st.integers(1, 30), H=st.sampled_from([1, 2]), K=st.sampled_from([4, 8]),
       C=st.integers(1, 9), init=st.booleans(), seed=st.integers(0, 99))
def test_per_channel_decay_chunked_equals_sequential(B, T, H, K, C, init, seed):
    """Kimi Delta Attention: one decay per key channel, g (B, T, H, K)."""
    q, k, v, _, beta, s0 = _inputs(seed, B, T, H, H, K, 6)
    g = mx.array(-np.random.default_rng(seed + 7).uniform(0.001, 1.0, (B, T, H, K)).astype(np.float32))
    s0 = s0 if init else None
    o1, s1 = gated_delta_ref(q, k, v, g, beta, s0)
    o2, s2 = gated_delta_chunked(q, k, v, g, beta, s0, chunk_size=C)
    close(o2, o1, 1e-4)
    close(s2, s1, 1e-4)
    # a per-channel decay equal across channels is the per-head rule
    gh = g[..., :1]
    close(gated_delta_chunked(q, k, v, mx.broadcast_to(gh, g.shape), beta, s0, chunk_size=C)[0],
          gated_delta_ref(q, k, v, gh[..., 0], beta, s0)[0], 1e-4)


def test_per_channel_gradients_equal_sequential():
    q, k, v, _, beta, s0 = _inputs(3, 1, 9, 2, 2, 4, 4)
    g = mx.array(-np.random.default_rng(5).uniform(0.01, 1.0, (1, 9, 2, 4)).astype(np.float32))
    w_o = mx.array(np.random.default_rng(6).standard_normal((1, 9, 2, 4)).astype(np.float32))

    def loss(fn):
        return lambda *a: (fn(*a)[0] * w_o).sum() + (fn(*a)[1] ** 2).sum() * 0.1

    args = (q, k, v, g, beta, s0)
    ref = mx.grad(loss(gated_delta_ref), argnums=tuple(range(6)))(*args)
    got = mx.grad(loss(lambda *b: gated_delta_chunked(*b, chunk_size=4)), argnums=tuple(range(6)))(*args)
    for a, b in zip(got, ref):
        close(a, b, 2e-3)


def test_kernel_impl_names_shapes_past_32_bit_offsets(monkeypatch):
    """impl='kernel' with element offsets past 2^31 (the kernels' int indices) raises a ValueError
    naming the shapes (a GPU backend is faked: the check runs before any launch; the arrays stay
    lazy), and impl='auto' does not take the kernels there."""
    from alloy import metal
    from alloy.ops.gated_delta import kernel_applies

    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    B, T, H, K = 1, 2**16, 256, 128  # B * H * (T + chunk) * K >= 2^31
    q, k = mx.zeros((B, T, H, K), mx.bfloat16), mx.zeros((B, T, H, K), mx.bfloat16)
    v = mx.zeros((B, T, H, K), mx.bfloat16)
    g, beta = mx.zeros((B, T, H)), mx.zeros((B, T, H))
    with pytest.raises(ValueError, match="32-bit ints.*q \\(1, 65536, 256, 128\\)"):
        gated_delta(q, k, v, g, beta, impl="kernel")
    assert not kernel_applies(q, v)
    assert kernel_applies(q[:, :64, :8], v[:, :64, :8])
