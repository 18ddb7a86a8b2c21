"""The SSD diagonal blocks' gradient kernels (`alloy.metal.ssd_chunked.BWD_SCORES` / `BWD_DX`) on
the CPU emulator, against the MLX form they replace (`alloy.ops.ssd._diag_bwd_ops`), and the GPU
path's whole gradient with them and the state-passing kernel (`ssd_chunked_vjp_gpu`) against MLX
autodiff of `ssd_chunked`. Lengths that are not whole chunks, one or two 64-row tiles per chunk, head dims
below, at and above 64, grouped B / C. The GPU run is in tests/metal/test_kernels_gpu.py."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import DTYPES, arr, pos, rel_err

ssd_mod = importlib.import_module("alloy.ops.ssd")

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")


def inputs(rng, dt, b, l, h, g, p, n):
    dtype = DTYPES[dt]
    x = arr(rng, (b, l, h, p), dtype)
    dtv = pos(rng, (b, l, h), 0.01, 0.3)
    A = -pos(rng, (h,), 0.5, 4.0)
    B, C = arr(rng, (b, l, g, n), dtype), arr(rng, (b, l, g, n), dtype)
    D = arr(rng, (h,))
    s0 = arr(rng, (b, h, p, n))
    dy = arr(rng, (b, l, h, p), dtype)
    ds = arr(rng, (b, h, p, n))
    return x, dtv, A, B, C, D, s0, dy, ds


def chunked(v, K):
    b, l = v.shape[:2]
    pad = -l % K
    v = mx.pad(v.astype(mx.float32), [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    return v.reshape(b, (l + pad) // K, K, *v.shape[2:])


@pytest.mark.parametrize("tc", [False, True])
@pytest.mark.parametrize("dt,b,l,h,g,p,K", [("f32", 1, 40, 2, 1, 16, 32),
                                             ("f32", 2, 150, 4, 2, 80, 64),
                                             ("f32", 1, 200, 2, 1, 64, 128),
                                             ("bf16", 1, 130, 2, 2, 32, 128),
                                             ("f32", 1, 70, 8, 1, 16, 64)])
def test_diag_kernels_match_ops(monkeypatch, tc, dt, b, l, h, g, p, K):
    """BWD_SCORES (fp32 shared tiles) and BWD_SCORES_TC (warp tile products, X rounded to the input
    dtype: bf16 within 2e-2) with BWD_DX against the MLX form; the TC kernel where p allows."""
    if tc and p % 16:
        pytest.skip("BWD_SCORES_TC needs a head dim multiple of 16")
    monkeypatch.setattr(kern, "SCORES_TC", tc)
    rng = np.random.default_rng(K + l)
    x, dtv, A, B, C, _, _, dy, _ = inputs(rng, dt, b, l, h, g, p, 16)
    Bc, Cc, dtc = chunked(B, K), chunked(C, K), chunked(dtv, K)
    a = dtc * A
    acs = mx.cumsum(a, axis=2)
    CB = mx.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    X = chunked(x, K) * dtc[..., None]
    want = ssd_mod._diag_bwd_ops(CB, a, X, chunked(dy, K), h // g)
    with emulate.patch(kern, poison=True):
        got = kern.ssd_chunked_diag_bwd(CB, acs.transpose(0, 1, 3, 2), x, dtv, dy)
    for name, gv, wv in zip(("dX", "dacs", "dCB"), got, want):
        assert gv.shape == wv.shape and gv.dtype == mx.float32, name
        assert rel_err(gv, wv) <= (2e-2 if tc and dt == "bf16" else 1e-5), (name, rel_err(gv, wv))


@pytest.mark.parametrize("p", [32, 16])
def test_gpu_gradient_matches_autodiff(p):
    """Head dims with (32) and without (16) the adjoint pass's fused dS . H sums."""
    rng = np.random.default_rng(3)
    b, l, h, g, n, K = 1, 150, 4, 2, 16, 64
    prim = inputs(rng, "f32", b, l, h, g, p, n)
    x, dtv, A, B, C, D, s0, dy, ds = prim
    _, want = mx.vjp(lambda *a: list(ssd_mod.ssd_chunked(*a, K)), [x, dtv, A, B, C, D, s0], [dy, ds])
    with emulate.patch(kern, poison=True):
        got = ssd_mod.ssd_chunked_vjp_gpu(*prim, K)
    for i, (gv, wv) in enumerate(zip(got, want)):
        assert gv.shape == wv.shape, i
        assert rel_err(gv, wv) <= 1e-4, (i, rel_err(gv, wv))


@pytest.mark.parametrize("in_dtype", [True, False])
def test_gpu_gradient_in_bf16_matches_float32_autodiff(monkeypatch, in_dtype):
    """bf16 inputs: the GPU path's gradient, with its batched products in bf16
    (`GRADIENT_PRODUCTS_IN_INPUT_DTYPE`) or in float32, against autodiff of `ssd_chunked` on the same
    values in float32 (bf16 rounding of the products and of dx / dB / dC: within 3e-2)."""
    monkeypatch.setattr(ssd_mod, "GRADIENT_PRODUCTS_IN_INPUT_DTYPE", in_dtype)
    rng = np.random.default_rng(5)
    b, l, h, g, p, n, K = 1, 150, 4, 2, 32, 16, 64
    prim = inputs(rng, "bf16", b, l, h, g, p, n)
    up = [v.astype(mx.float32) for v in prim]
    _, want = mx.vjp(lambda *a: list(ssd_mod.ssd_chunked(*a, K)), up[:7], up[7:])
    with emulate.patch(kern, poison=True):
        got = ssd_mod.ssd_chunked_vjp_gpu(*prim, K)
    for i, (gv, wv) in enumerate(zip(got, want)):
        assert gv.shape == wv.shape, i
        assert rel_err(gv, wv) <= 3e-2, (i, rel_err(gv, wv))


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("b,nc,g,n,r,p", [(2, 5, 1, 8, 2, 32), (1, 3, 2, 4, 3, 8), (1, 4, 1, 3, 1, 5)])
@pytest.mark.parametrize("reverse", [False, True])
def test_state_pass_matches_numpy(dt, b, nc, g, n, r, p, reverse):
    """PASS against a numpy sweep: the states entering each chunk, the final state and (head dims
    multiple of 32) the per-(chunk, head) sums with dot_with; eight elements per thread (whole
    warps over whole chunk states) and one (the other shapes)."""
    rng = np.random.default_rng(nc + p)
    dtype = DTYPES[dt]
    h = g * r
    states = arr(rng, (b, nc, g, n, r * p), dtype)
    decay = pos(rng, (b, nc, h), 0.2, 1.0)
    init = arr(rng, (b, h, p, n))
    other = arr(rng, (b, nc, g, n, r * p), dtype)
    dot = p % 32 == 0
    with emulate.patch(kern, poison=True):
        out = kern.state_pass(states, decay, init, dtype, reverse=reverse, dot_with=other if dot else None)
    S = np.array(states.astype(mx.float32)).reshape(b, nc, g, n, r, p)
    dc = np.array(decay).reshape(b, nc, g, r)
    s = np.array(init).reshape(b, g, r, p, n).transpose(0, 1, 4, 2, 3)  # (b, g, n, r, p)
    starts = np.zeros_like(S)
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):
        starts[:, c] = s
        s = dc[:, c][:, :, None, :, None] * s + S[:, c]
    starts = np.array(mx.array(starts).astype(dtype).astype(mx.float32))  # rounded as returned
    tol = 1e-5 if dt == "f32" else 1e-2
    np.testing.assert_allclose(np.array(out[0].astype(mx.float32)).reshape(starts.shape), starts, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.array(out[1]), s.transpose(0, 1, 3, 4, 2).reshape(b, h, p, n), rtol=1e-4, atol=1e-4)
    if dot:
        O = np.array(other.astype(mx.float32)).reshape(starts.shape)
        want = (starts * O).sum(axis=(3, 5)).reshape(b, nc, h)
        np.testing.assert_allclose(np.array(out[2]), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_kernel_path_gradient_reuses_the_forward_states(monkeypatch, dt):
    """The kernel path with GRADIENT = "kernels" (forward kernels returning the chunk-entry states,
    the gradient reusing them) against autodiff of the MLX chunked form; and the gradient with the
    forward's states equals the one that recomputes them."""
    rng = np.random.default_rng(11)
    b, l, h, g, p, n, K = 1, 150, 4, 2, 32, 16, 64
    prim = inputs(rng, dt, b, l, h, g, p, n)
    x, dtv, A, B, C, D, s0, dy, ds = prim
    up = [v.astype(mx.float32) for v in prim]
    _, want = mx.vjp(lambda *a: list(ssd_mod.ssd_chunked(*a, K)), up[:7], up[7:])
    monkeypatch.setattr(ssd_mod, "_VJP_CHUNK", None)
    ssd_mod._fused_chunked.cache_clear()
    with emulate.patch(kern, poison=True):
        f = ssd_mod._fused_chunked(K, "kernels", True)
        _, got = mx.vjp(lambda *a: list(f(*a)[:2]), [x, dtv, A, B, C, D, s0], [dy, ds])
        y, fs, starts = kern.ssd_chunked(x, dtv, A, B, C, D, s0, K, with_starts=True)
        reused = ssd_mod.ssd_chunked_vjp_gpu(*prim, K, starts=starts)
        fresh = ssd_mod.ssd_chunked_vjp_gpu(*prim, K)
    ssd_mod._fused_chunked.cache_clear()
    tol = 1e-4 if dt == "f32" else 3e-2
    for i, (gv, wv) in enumerate(zip(got, want)):
        assert gv.shape == wv.shape, i
        assert rel_err(gv, wv) <= tol, (i, rel_err(gv, wv))
    for i, (a, c) in enumerate(zip(reused, fresh)):
        assert rel_err(a, c) <= (1e-5 if dt == "f32" else 1e-2), (i, rel_err(a, c))
