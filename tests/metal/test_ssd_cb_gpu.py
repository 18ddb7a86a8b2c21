"""The SSD's chunk products on tensor cores (`alloy.metal.ssd_cb.chunk_cb`, switch
`alloy.metal.ssd_chunked.CB_TC`) on the GPU (`pytest -m gpu`; skipped where no CUDA/Metal device), at
the toy shape (b 16, T 2048, one group, d_state 128, chunk 128, bf16) and a length that is not whole
chunks: CB against the float32 matmul it replaces and float64 (the tiles the consumers read; the upper
tiles zero, every element finite), and the SSD forward and gradient (`ssd` through autodiff, and
`ssd_chunked_vjp_gpu` recomputing CB) with the switch on and off, the launches counted."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

from alloy import metal
from alloy.metal import ssd_cb
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import Counted, arr, chunk_time, f64, pos, rel_err
from alloy.ops import ssd, ssd_ref

ssd_mod = importlib.import_module("alloy.ops.ssd")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")]


def tile_mask(K):
    t = np.arange(K) // 16
    return t[None, :] <= t[:, None]


@pytest.mark.parametrize("b,l,g,n,K", [(16, 2048, 1, 128, 128), (2, 1000, 2, 64, 64), (1, 300, 1, 256, 32)])
def test_chunk_cb_matches_the_matmul_on_gpu(b, l, g, n, K):
    rng = np.random.default_rng(l + n)
    B, C = arr(rng, (b, l, g, n), mx.bfloat16, 0.5), arr(rng, (b, l, g, n), mx.bfloat16, 0.5)
    CB = ssd_cb.chunk_cb(B, C, K)
    Bc, Cc = chunk_time(B, K).transpose(0, 1, 3, 2, 4), chunk_time(C, K).transpose(0, 1, 3, 2, 4)
    old = Cc @ Bc.swapaxes(-1, -2)  # ssd_chunked's float32 product (exact products of bf16 inputs)
    got, want = np.array(CB), np.array(old)
    assert got.shape == want.shape and CB.dtype == mx.float32 and np.isfinite(got).all()
    m = tile_mask(K)
    scale = np.abs(want).max()  # float32 sums of exact products in two orders (tensor-core mma vs the GEMM's)
    assert np.abs(got - want)[..., m].max() <= 1e-5 * scale, np.abs(got - want)[..., m].max() / scale
    assert (got[..., ~m] == 0).all()
    ref = np.matmul(f64(Cc[:2]), f64(Bc[:2]).swapaxes(-1, -2))  # float64 on two sequences
    assert np.abs(got[:2] - ref)[..., m].max() <= 1e-5 * scale


@pytest.mark.parametrize("b,l", [(16, 2048), (2, 1000)])
def test_ssd_forward_and_gradient_with_the_switch_on_and_off_on_gpu(monkeypatch, b, l):
    """The toy layer's SSD (24 heads of 64, one group, d_state 128, chunk 128, bf16): y, the final state
    and every gradient of sum(y * ct) through `ssd(impl="kernel")` (the forward's CB handed to the
    gradient), and `ssd_chunked_vjp_gpu` called without CB (recomputing it), with CB_TC on and off;
    on and off within the bf16 rounding downstream of CB (1e-2), y near `ssd_ref`."""
    rng = np.random.default_rng(l + 3)
    h, p, g, n, K = 24, 64, 1, 128, 128
    x, dy = arr(rng, (b, l, h, p), mx.bfloat16), arr(rng, (b, l, h, p), mx.bfloat16)
    dt = pos(rng, (b, l, h), 0.01, 0.6)
    A = -pos(rng, (h,), 0.3, 3.0)
    B, C = arr(rng, (b, l, g, n), mx.bfloat16, 0.5), arr(rng, (b, l, g, n), mx.bfloat16, 0.5)
    D, s0, ds = arr(rng, (h,)), arr(rng, (b, h, p, n), scale=0.1), arr(rng, (b, h, p, n), scale=0.1)
    args = (x, dt, A, B, C, D, s0)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(kern, "CB_TC", on)
        counted = Counted(kern.CB_TC_KERNEL)
        monkeypatch.setattr(kern, "CB_TC_KERNEL", counted)
        y, s = ssd(*args, chunk_size=K, impl="kernel")
        loss = lambda *a: (ssd(*a, chunk_size=K, impl="kernel")[0] * dy).astype(mx.float32).sum()  # noqa: E731
        grads = mx.grad(loss, argnums=tuple(range(7)))(*args)
        direct = ssd_mod.ssd_chunked_vjp_gpu(x, dt, A, B, C, D, s0, dy, ds, K)
        mx.eval(y, s, grads, direct)
        got[on] = (y, s, grads, direct, counted.calls)
        monkeypatch.undo()
    assert got[True][4] >= 3 and got[False][4] == 0, (got[True][4], got[False][4])
    assert rel_err(got[True][0], got[False][0]) <= 1e-2 and rel_err(got[True][1], got[False][1]) <= 1e-4
    for which in (2, 3):
        for i, (a, c) in enumerate(zip(got[True][which], got[False][which])):
            assert a.shape == c.shape and a.dtype == c.dtype, (which, i)
            assert rel_err(a, c) <= 1e-2, (which, i, rel_err(a, c))
    yr, _ = ssd_ref(*(v[:2] if v.ndim > 1 else v for v in args))  # two sequences
    assert rel_err(got[True][0][:2], yr) <= 6e-2, rel_err(got[True][0][:2], yr)
