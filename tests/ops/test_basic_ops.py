"""Norms, RoPE, conv, attention and loss against independent references and invariants."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import alloy  # noqa: F401
import mlx.core as mx

from alloy.ops.activations import activation, swiglu
from alloy.ops.attention import attention, attention_ref, causal_mask, visibility_mask
from alloy.ops.conv import causal_conv1d, causal_conv1d_ref
from alloy.ops.loss import cross_entropy
from alloy.ops.norm import gated_rms_norm, rms_norm, rms_norm_ref
from alloy.ops.rope import rope, rope_ref

RNG = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return mx.array(RNG.standard_normal(shape).astype(np.float32) * scale)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.array(a, dtype=np.float32), np.array(b, dtype=np.float32), rtol=tol, atol=tol)


# -- norms --------------------------------------------------------------------------------------
def test_rms_norm_matches_numpy_and_fast():
    x, w = randn(3, 5, 16), randn(16)
    xn = np.array(x)
    want = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6) * np.array(w)
    close(rms_norm_ref(x, w, 1e-6), want)
    close(rms_norm(x, w, 1e-6), want)


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("group", [None, 4])
def test_gated_rms_norm_gate_orders(before, group):
    x, z, w = randn(2, 3, 16), randn(2, 3, 16), randn(16)
    xn, zn, wn = np.array(x), np.array(z), np.array(w)
    silu = zn / (1 + np.exp(-zn))
    h = xn if before else xn * silu
    g = 16 if group is None else group
    hg = h.reshape(2, 3, 16 // g, g)
    hg = hg / np.sqrt((hg ** 2).mean(-1, keepdims=True) + 1e-6)
    want = hg.reshape(2, 3, 16) * wn
    if before:
        want = want * silu
    close(gated_rms_norm(x, z, w, 1e-6, group_size=group, norm_before_gate=before), want)


def test_gated_rms_norm_bad_group():
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm(randn(1, 2, 10), None, None, group_size=4)


# -- rope ---------------------------------------------------------------------------------------
@given(T=st.integers(1, 9), dims=st.sampled_from([4, 8, 16]), trad=st.booleans(),
       offs=st.lists(st.integers(0, 50), min_size=2, max_size=2))
def test_rope_fast_equals_ref_with_per_row_offsets(T, dims, trad, offs):
    x = randn(2, 3, T, 16)
    off = mx.array(offs, dtype=mx.int32)
    close(rope(x, off, dims, 10000.0, trad), rope_ref(x, off, dims, 10000.0, trad), 1e-4)


def test_rope_partial_keeps_tail_and_is_relative():
    q, k = randn(1, 1, 1, 16), randn(1, 1, 1, 16)
    out = rope_ref(q, 7, 8)
    close(out[..., 8:], q[..., 8:])  # features past rope dims are untouched
    # <rope(q, m), rope(k, n)> depends only on m - n
    dots = [float((rope_ref(q, m, 16) * rope_ref(k, m - 3, 16)).sum()) for m in (3, 10, 40)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
    assert abs(float((q * k).sum()) - dots[0]) > 1e-3  # and it does rotate


# -- conv ---------------------------------------------------------------------------------------
def test_causal_conv1d_matches_numpy():
    x, w, b = randn(2, 7, 3), randn(3, 4), randn(3)
    xn, wn = np.array(x), np.array(w)
    want = np.zeros((2, 7, 3), np.float32)
    for t in range(7):
        for k in range(4):
            src = t - 3 + k
            if src >= 0:
                want[:, t] += xn[:, src] * wn[:, k]
    want += np.array(b)
    y, st_ = causal_conv1d_ref(x, w, b)
    close(y, want)
    close(st_, xn[:, -3:])


@given(T=st.integers(1, 12), cut=st.integers(0, 12), K=st.integers(1, 5))
def test_causal_conv1d_split_with_state_equals_whole(T, cut, K):
    cut = min(cut, T)
    x, w, b = randn(2, T, 5), randn(5, 1, K), randn(5)
    whole, s_whole = causal_conv1d(x, w, b, activation="silu")
    y1, s1 = causal_conv1d(x[:, :cut], w, b, activation="silu")
    y2, s2 = causal_conv1d(x[:, cut:], w, b, state=s1, activation="silu")
    close(mx.concatenate([y1, y2], axis=1), whole)
    close(s2, s_whole)


# -- attention ----------------------------------------------------------------------------------
@given(T=st.integers(1, 12), window=st.integers(1, 14), hkv=st.sampled_from([1, 2, 4]))
def test_sliding_window_equals_full_attention_with_window_mask(T, window, hkv):
    q, k, v = randn(2, 4, T, 8), randn(2, hkv, T, 8), randn(2, hkv, T, 8)
    full = causal_mask(T)
    win = causal_mask(T, window=window)
    # independent construction of the window mask
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    np.testing.assert_array_equal(np.array(win), (j <= i) & (i - j < window))
    close(attention(q, k, v, mask=win), attention_ref(q, k, v, mask=mx.array((j <= i) & (i - j < window))), 1e-4)
    if window >= T:  # a window covering everything is full causal attention
        close(attention(q, k, v, mask=win), attention(q, k, v, mask=full), 1e-5)


@given(T=st.integers(1, 10), hkv=st.sampled_from([1, 2, 3, 6]))
def test_gqa_equals_mha_with_repeated_kv(T, hkv):
    q, k, v = randn(2, 6, T, 8), randn(2, hkv, T, 8), randn(2, hkv, T, 8)
    rep = 6 // hkv
    mha = attention(q, mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1), mask="causal")
    close(attention(q, k, v, mask="causal"), mha, 1e-5)
    close(attention(q, k, v, mask="causal", impl="ref"), mha, 1e-5)


def test_visibility_mask_over_a_cache():
    q_pos = mx.array([[3, 4], [0, 1]])  # rows at different positions
    m = np.array(visibility_mask(q_pos, mx.arange(6), window=2))[:, 0]
    np.testing.assert_array_equal(m[0], [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(m[1], [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])


def test_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="not a multiple"):
        attention(randn(1, 3, 2, 4), randn(1, 2, 2, 4), randn(1, 2, 2, 4))


# -- activations and loss -----------------------------------------------------------------------
def test_swiglu_and_unknown_activation():
    g, u = randn(4), randn(4)
    gn = np.array(g)
    close(swiglu(g, u), gn / (1 + np.exp(-gn)) * np.array(u))
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        activation("nope")


def test_cross_entropy_with_mask_matches_numpy():
    logits, tgt = randn(2, 5, 7), mx.array(RNG.integers(0, 7, (2, 5)))
    mask = mx.array(RNG.integers(0, 2, (2, 5)).astype(bool))
    ln, tn, mn = np.array(logits, dtype=np.float64), np.array(tgt), np.array(mask)
    lse = np.log(np.exp(ln).sum(-1))
    per = lse - np.take_along_axis(ln, tn[..., None], -1)[..., 0]
    close(cross_entropy(logits, tgt, mask), (per * mn).sum() / max(mn.sum(), 1), 1e-5)
    close(cross_entropy(logits, tgt), per.mean(), 1e-5)


def _llama3_inv_freq_numpy(dims, base, factor, low, high, orig):
    """Llama 3's published frequency rescaling, written out independently in numpy."""
    inv = base ** (-np.arange(0, dims, 2) / dims)
    out = []
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < orig / high:
            out.append(f)
        elif wavelen > orig / low:
            out.append(f / factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def test_rope_scaling_frequencies_and_fast_path():
    from alloy.ops.rope import rope_inv_freq
    for dims in (8, 16, 64):
        got = np.array(rope_inv_freq(dims, 10000.0, "llama3", 8.0, 1.0, 4.0, 64))
        np.testing.assert_allclose(got, _llama3_inv_freq_numpy(dims, 10000.0, 8.0, 1.0, 4.0, 64), rtol=1e-5)
    np.testing.assert_allclose(np.array(rope_inv_freq(8, 100.0, "linear", 4.0)),
                               100.0 ** (-np.arange(0, 8, 2) / 8) / 4.0, rtol=1e-6)
    x = randn(2, 3, 5, 16)
    inv = rope_inv_freq(16, 10000.0, "llama3", 8.0, 1.0, 4.0, 64)
    off = mx.array([3, 40], dtype=mx.int32)
    close(rope(x, off, 16, inv_freq=inv), rope_ref(x, off, 16, inv_freq=inv), 1e-4)
    with pytest.raises(ValueError, match="rope_type must be"):
        rope_inv_freq(8, 1e4, "longrope")
