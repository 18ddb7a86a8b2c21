"""The SSD's chunk products CB = C Bᵀ on tensor cores (`alloy.metal.ssd_cb.CB_TC` / `chunk_cb`, switch
`alloy.metal.ssd_chunked.CB_TC`) on the CPU emulator: against float64 numpy per chunk (the products of
16-bit inputs are exact in float32, only the float32 summation order differs from the old float32
matmul), 16 x 16 tiles above the diagonal exactly zero, every output element written (outputs
poisoned with NaN), zeros past the end of the sequence; bf16 / fp16, one or two groups, chunks 16-128
(one or two row blocks, partial ones), lengths that are not whole chunks; and the SSD forward and
gradient (`ssd_chunked`, `ssd_chunked_vjp_gpu`) with the switch on and off. The GPU run is
tests/metal/test_ssd_cb_gpu.py."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate, ssd_cb
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import F16, arr, chunk_time, f64, rel_err, ssd_chunked_autodiff, ssd_inputs

ssd_mod = importlib.import_module("alloy.ops.ssd")

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")

CASES = [("bf16", 1, 40, 1, 16, 16),      # one warp per group, L not whole chunks
         ("fp16", 2, 64, 2, 32, 32),      # two sequences, two groups, whole chunks
         ("bf16", 1, 150, 2, 64, 64),     # a partial last chunk, one 64-row block
         ("bf16", 2, 128, 1, 48, 64),     # n not a multiple of the 64-wide staging step
         ("fp16", 1, 100, 1, 16, 48),     # a chunk of three row tiles
         ("bf16", 1, 300, 1, 80, 128),    # two row blocks, two column halves, n = 64 + 16
         ("bf16", 1, 90, 2, 16, 80)]      # a second row block of one row tile


def tile_mask(K):
    """(K, K): True on the 16 x 16 tiles at or below the diagonal (those CB_TC takes products for)."""
    t = np.arange(K) // 16
    return t[None, :] <= t[:, None]


def reference(B, C, K):
    """float64 C Bᵀ per chunk (b, c, g, K, K), the chunks zero-padded past the end."""
    return np.einsum("bclgn,bcsgn->bcgls", f64(chunk_time(C, K)), f64(chunk_time(B, K)))


@pytest.mark.parametrize("dt,b,l,g,n,K", CASES)
def test_chunk_cb_matches_float64_and_zeroes_the_upper_tiles(dt, b, l, g, n, K):
    rng = np.random.default_rng(l + n + K)
    B, C = arr(rng, (b, l, g, n), F16[dt]), arr(rng, (b, l, g, n), F16[dt])
    with emulate.patch(ssd_cb, poison=True):  # outputs start as NaN: every element must be written
        CB = ssd_cb.chunk_cb(B, C, K)
        assert ssd_cb.CB_TC.calls == 1
    nc = -(-l // K)
    assert CB.shape == (b, nc, g, K, K) and CB.dtype == mx.float32
    got, want = np.array(CB), reference(B, C, K)
    assert np.isfinite(got).all()
    m = tile_mask(K)
    # exact products, float32 sums of n terms: relative to the largest entry, a few float32 ulps
    err = np.abs(got - want)[..., m].max() / np.abs(want).max()
    assert err <= 1e-6, err
    assert (got[..., ~m] == 0).all()  # above the diagonal: zeros, no products
    if nc * K > l:                      # past the end of the sequence: zero rows and columns
        last = got[:, -1]
        assert (last[..., l - (nc - 1) * K:, :] == 0).all() and (last[..., :, l - (nc - 1) * K:] == 0).all()
    # the float32 matmul it replaces, on the tiles the consumers read: the same products, summed in another order
    old = np.array(chunk_time(C, K).transpose(0, 1, 3, 2, 4) @ chunk_time(B, K).transpose(0, 1, 3, 4, 2))
    assert np.abs(got - old)[..., m].max() <= 1e-6 * np.abs(old).max()


def test_fits_and_bad_arguments():
    assert ssd_cb.cb_tc_fits(mx.bfloat16, 128, 128) and ssd_cb.cb_tc_fits(mx.float16, 16, 256)
    for args in ((mx.float32, 128, 128), (mx.bfloat16, 256, 128), (mx.bfloat16, 72, 128),
                 (mx.bfloat16, 128, 8), (mx.bfloat16, 128, 272), (mx.bfloat16, 0, 16)):
        assert not ssd_cb.cb_tc_fits(*args), args
    B = mx.zeros((1, 32, 1, 16), mx.bfloat16)
    with pytest.raises(ValueError, match="chunk_cb"):
        ssd_cb.chunk_cb(B, B.astype(mx.float16), 16)
    with pytest.raises(ValueError, match="chunk_cb"):
        ssd_cb.chunk_cb(B.astype(mx.float32), B.astype(mx.float32), 16)


@pytest.mark.parametrize("dt,g,n,K", [("bf16", 1, 32, 64), ("fp16", 2, 16, 32)])
def test_ssd_forward_and_gradient_with_the_switch_on_and_off(monkeypatch, dt, g, n, K):
    """`ssd_chunked` (y, final state, the saved CB) and `ssd_chunked_vjp_gpu` (which recomputes CB when
    not handed it) launch CB_TC with the switch on and not off; on and off agree within the 16-bit
    rounding of the products downstream (1e-2; the saved CB within float32 summation order), and the
    gradient is near float32 autodiff of `ssd_chunked` (3e-2, as tests/metal/test_ssd_bwd.py)."""
    rng = np.random.default_rng(3 + n + K)
    b, l, h, p = 1, 150, 4, 32
    prim = ssd_inputs(rng, F16[dt], b, l, h, g, p, n)
    want = ssd_chunked_autodiff(prim, K)
    got, calls = {}, {}
    for on in (True, False):
        monkeypatch.setattr(kern, "CB_TC", on)
        with emulate.patch(kern, poison=True):
            fwd = kern.ssd_chunked(*prim[:7], K, with_starts=True, with_saved=True)
            grads = ssd_mod.ssd_chunked_vjp_gpu(*prim, K)
            calls[on] = kern.CB_TC_KERNEL.calls
        got[on] = (fwd, grads)
    assert calls == {True: 2, False: 0}, calls
    (y1, s1, _, cb1, _), g1 = got[True]
    (y0, s0, _, cb0, _), g0 = got[False]
    m = tile_mask(K)
    assert cb1.shape == cb0.shape and cb1.dtype == cb0.dtype == mx.float32
    assert np.abs(np.array(cb1) - np.array(cb0))[..., m].max() <= 1e-6 * float(mx.abs(cb0).max())
    assert rel_err(y1, y0) <= 1e-2 and rel_err(s1, s0) <= 1e-5, (rel_err(y1, y0), rel_err(s1, s0))
    for i, (a, c, w) in enumerate(zip(g1, g0, want)):
        assert a.shape == w.shape and a.dtype == c.dtype, i
        assert rel_err(a, c) <= 1e-2, (i, rel_err(a, c))
        assert rel_err(a, w) <= 3e-2, (i, rel_err(a, w))


def test_float32_inputs_keep_the_matmul(monkeypatch):
    """float32 B / C (or a chunk CB_TC does not take) leave CB to the float32 matmul, switch on."""
    monkeypatch.setattr(kern, "CB_TC", True)
    rng = np.random.default_rng(1)
    prim = ssd_inputs(rng, mx.float32, 1, 40, 2, 1, 16, 16)
    with emulate.patch(kern, poison=True):
        kern.ssd_chunked(*prim[:7], 16)
        ssd_mod.ssd_chunked_vjp_gpu(*prim, 16)
        assert kern.CB_TC_KERNEL.calls == 0
