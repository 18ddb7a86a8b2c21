"""The SSD diagonal blocks' gradient kernels (`alloy.metal.ssd_chunked.BWD_SCORES` / `BWD_DX`) on
the CPU emulator, against the MLX form they replace (`alloy.ops.ssd._diag_bwd_ops`), and the GPU
path's whole gradient with them and the state-passing kernel (`ssd_chunked_vjp_gpu`) against MLX
autodiff of `ssd_chunked`. Lengths that are not whole chunks, one or two 64-row tiles per chunk, head dims
below, at and above 64, grouped B / C. The chunk products on tensor cores (`CHUNK_OUT_TC` /
`BWD_DX_TC`, bf16 / fp16) against float64 references and the CUDA-core OUT / BWD_DX. The GPU run is
in tests/metal/test_kernels_gpu.py."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import DTYPES, F16, arr, pos, rel_err, ssd_inputs
from alloy.metal.testing import chunk_time as chunked
from alloy.metal.testing import ssd_diag_case as diag_case

ssd_mod = importlib.import_module("alloy.ops.ssd")

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")


def inputs(rng, dt, b, l, h, g, p, n):
    return ssd_inputs(rng, DTYPES[dt], b, l, h, g, p, n)


@pytest.mark.parametrize("tc", [False, True])
@pytest.mark.parametrize("dt,b,l,h,g,p,K", [("f32", 1, 40, 2, 1, 16, 32),
                                             ("f32", 2, 150, 4, 2, 80, 64),
                                             ("f32", 1, 200, 2, 1, 64, 128),
                                             ("bf16", 1, 130, 2, 2, 32, 128),
                                             ("f32", 1, 70, 8, 1, 16, 64)])
def test_diag_kernels_match_ops(monkeypatch, tc, dt, b, l, h, g, p, K):
    """BWD_SCORES (fp32 shared tiles) with BWD_DX, and BWD_SCORES_TC with BWD_DX_TC (warp tile
    products, operands rounded to the input dtype: bf16 within 2e-2), against the MLX form; the TC
    kernels where p allows."""
    if tc and p % 16:
        pytest.skip("BWD_SCORES_TC needs a head dim multiple of 16")
    monkeypatch.setattr(kern, "SCORES_TC", tc)
    monkeypatch.setattr(kern, "DX_TC", tc)
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


@pytest.mark.parametrize("tc", [False, True])
@pytest.mark.parametrize("in_dtype", [True, False])
def test_gpu_gradient_in_bf16_matches_float32_autodiff(monkeypatch, in_dtype, tc):
    """bf16 inputs: the GPU path's gradient, with its batched products in bf16
    (`GRADIENT_PRODUCTS_IN_INPUT_DTYPE`) or in float32, and dX of the diagonal blocks on tensor cores
    (`DX_TC`) or not, against autodiff of `ssd_chunked` on the same values in float32 (bf16 rounding
    of the products and of dx / dB / dC: within 3e-2)."""
    monkeypatch.setattr(ssd_mod, "GRADIENT_PRODUCTS_IN_INPUT_DTYPE", in_dtype)
    monkeypatch.setattr(kern, "DX_TC", tc)
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
@pytest.mark.parametrize("b,nc,g,n,r,p,cblk", [(2, 5, 1, 8, 2, 32, 4), (1, 3, 2, 4, 3, 8, 4), (1, 4, 1, 3, 1, 5, 4),
                                               (1, 1, 1, 4, 2, 32, 4), (1, 3, 1, 4, 2, 32, 4), (1, 9, 2, 4, 1, 32, 4),
                                               (1, 7, 1, 4, 2, 32, 2), (1, 11, 1, 4, 2, 32, 8)])
@pytest.mark.parametrize("reverse", [False, True])
def test_state_pass_matches_numpy(monkeypatch, dt, b, nc, g, n, r, p, cblk, reverse):
    """PASS against a numpy sweep: the states entering each chunk, the final state and (head dims
    multiple of 32) the per-(chunk, head) sums with dot_with; eight elements per thread (whole
    warps over whole chunk states) and one (the other shapes). Eight per thread: blocks of CBLK 2 / 4 /
    8 chunks (`PASS_CBLK`) with nc = 1, nc < CBLK and nc not a multiple of CBLK."""
    monkeypatch.setattr(kern, "PASS_CBLK", cblk)
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


@pytest.mark.parametrize("dt,b,l,h,p,K", [("bf16", 2, 150, 3, 16, 64), ("f32", 1, 200, 2, 64, 128),
                                           ("bf16", 1, 40, 2, 5, 32), ("f32", 1, 70, 3, 12, 16)])
def test_prep_matches_numpy(dt, b, l, h, p, K):
    """PREP (acs by one warp's scan, xs = dt x exp(acs_end - acs) in 8-column units where p % 8 == 0,
    single columns otherwise) against numpy: a length that is not whole chunks (padding steps give 0),
    one to several row sweeps per chunk."""
    rng = np.random.default_rng(l + p)
    dtype = DTYPES[dt]
    x = arr(rng, (b, l, h, p), dtype)
    dtv = pos(rng, (b, l, h), 0.01, 0.3)
    A = -pos(rng, (h,), 0.5, 4.0)
    nc = -(-l // K)
    acs, xs, decay = emulate.run(kern.PREP, [x, dtv, A], template=[("T", dtype), ("KC", K), ("TB", 8)],
                                 grid=(1, h, b * nc), threadgroup=-(-p // 32) * 32, poison=True,
                                 output_shapes=[(b, nc, h, K), (b, nc, K, h, p), (b, nc, h)],
                                 output_dtypes=[mx.float32, dtype, mx.float32])
    dtc = np.array(chunked(dtv, K))                                  # (b, nc, K, h), padding 0
    xc = np.array(chunked(x, K))                                     # (b, nc, K, h, p)
    a = np.cumsum(dtc * np.array(A), axis=2)
    want_xs = xc * (dtc * np.exp(a[:, :, -1:] - a))[..., None]
    np.testing.assert_allclose(np.array(acs), a.transpose(0, 1, 3, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(decay), np.exp(a[:, :, -1]), rtol=1e-5, atol=1e-6)
    tol = 1e-5 if dt == "f32" else 1e-2
    np.testing.assert_allclose(np.array(xs.astype(mx.float32)), want_xs, rtol=tol, atol=tol)


@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_kernel_path_gradient_reuses_the_forward_states(monkeypatch, dt):
    """The kernel path with GRADIENT = "kernels" (forward kernels returning the chunk-entry states,
    the gradient reusing them) against autodiff of the MLX chunked form; and the gradient with the
    forward's states equals the one that recomputes them; with REUSE_FORWARD_PRODUCTS the forward's CB
    and decayed dt x are reused as well (`_fused_chunked(..., reuse_products=True)`), same gradient."""
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
        fp = ssd_mod._fused_chunked(K, "kernels", True, True)
        _, got_p = mx.vjp(lambda *a: list(fp(*a)[:2]), [x, dtv, A, B, C, D, s0], [dy, ds])
        y, fs, starts, CB, Xw = kern.ssd_chunked(x, dtv, A, B, C, D, s0, K, with_saved=True)
        reused = ssd_mod.ssd_chunked_vjp_gpu(*prim, K, starts=starts)
        reused_p = ssd_mod.ssd_chunked_vjp_gpu(*prim, K, starts=starts, CB=CB, Xw=Xw)
        fresh = ssd_mod.ssd_chunked_vjp_gpu(*prim, K)
    ssd_mod._fused_chunked.cache_clear()
    tol = 1e-4 if dt == "f32" else 3e-2
    for i, (gv, wv) in enumerate(zip(got, want)):
        assert gv.shape == wv.shape, i
        assert rel_err(gv, wv) <= tol, (i, rel_err(gv, wv))
    for i, (gv, wv) in enumerate(zip(got_p, want)):
        assert rel_err(gv, wv) <= tol, (i, rel_err(gv, wv))
    for i, (a, a2, c) in enumerate(zip(reused, reused_p, fresh)):
        assert rel_err(a, c) <= (1e-5 if dt == "f32" else 1e-2), (i, rel_err(a, c))
        assert rel_err(a2, c) <= (1e-5 if dt == "f32" else 1e-2), (i, rel_err(a2, c))


# ---------------------------------------------------------------- the chunk products on tensor cores
TC_CASES = [("bf16", 1, 40, 2, 1, 16, 32),     # chunk below the 64-row block, L not whole chunks
            ("fp16", 2, 150, 4, 2, 64, 64),    # two heads per group
            ("bf16", 1, 300, 3, 1, 64, 256),   # four row blocks per chunk, three heads per group
            ("bf16", 1, 100, 2, 2, 128, 80),   # a partial second row block, head dim 128
            ("fp16", 1, 96, 6, 2, 32, 48)]


@pytest.mark.parametrize("dt,b,l,h,g,p,K", TC_CASES)
def test_chunk_products_on_tensor_cores(dt, b, l, h, g, p, K):
    """CHUNK_OUT_TC / BWD_DX_TC (the mask and X = dt x / dy tiles rounded to the input dtype, warp tile
    products) against float64 references of OUT / BWD_DX and against those CUDA-core kernels: bf16
    operands within 1e-2 (fp16 2e-3; seen: 3.2e-3 / 3e-4) of the reference, the CUDA-core kernels within 1e-2 (y: one
    rounding to the input dtype) and 1e-5 (dX float32)."""
    rng = np.random.default_rng(l + p)
    (CB, acs, x, dtv, Yo, D, dy), y_ref, dX_ref = diag_case(rng, dt, b, l, h, g, p, K)
    nt, nc = -(-K // 64), CB.shape[1]
    dtype = x.dtype
    launch = dict(grid=(nt, h, b * nc), threadgroup=128, poison=True)
    old = [("T", dtype), ("KC", K), ("PC", p), ("CG", -(-p // 64)), ("SB", 32)]
    new = [("T", dtype), ("KC", K), ("PC", p)]
    ys = {name: emulate.run(k, [CB, acs, x, dtv, Yo, D], template=t, output_shapes=[x.shape],
                            output_dtypes=[dtype], **launch)[0]
          for name, k, t in (("out", kern.OUT, old), ("tc", kern.CHUNK_OUT_TC, new))}
    dXs = {name: emulate.run(k, [CB, acs, dy], template=t, output_shapes=[(b, nc * K, h, p)],
                             output_dtypes=[mx.float32], **launch)[0].reshape(dX_ref.shape)
           for name, k, t in (("out", kern.BWD_DX, old), ("tc", kern.BWD_DX_TC, new))}
    tol = 1e-2 if dt == "bf16" else 2e-3
    for name, got, want, t_old in (("y", ys, y_ref, 1e-2), ("dX", dXs, dX_ref, 1e-5)):
        want = mx.array(want.astype(np.float32))
        assert got["tc"].dtype == got["out"].dtype, name
        assert rel_err(got["out"], want) <= t_old, (name, rel_err(got["out"], want))
        assert rel_err(got["tc"], want) <= tol, (name, rel_err(got["tc"], want))
        assert rel_err(got["tc"], got["out"]) <= tol, (name, rel_err(got["tc"], got["out"]))


@pytest.mark.parametrize("dt,p,K,tc", [("bf16", 32, 64, True), ("fp16", 16, 32, True), ("bf16", 8, 64, False),
                                       ("f32", 32, 64, False), ("bf16", 32, 40, False)])
def test_switches_pick_the_tensor_core_kernels(monkeypatch, dt, p, K, tc):
    """With OUT_TC / DX_TC on, `ssd_chunked` and `ssd_chunked_diag_bwd` launch CHUNK_OUT_TC / BWD_DX_TC
    for 16-bit inputs with head dim and chunk multiples of 16 (and OUT / BWD_DX otherwise), with the
    results of the switches off (within the bf16 / fp16 operand rounding)."""
    monkeypatch.setattr(kern, "OUT_FUSED_YO", False)  # CHUNK_OUT_YO_TC has its own tests (test_ssd_out_yo.py)
    monkeypatch.setattr(kern, "TC_ROW_TILES", False)  # the row-tile kernels: test_ssd_tc_rows.py
    rng = np.random.default_rng(p + K)
    b, l, h, g, n = 1, 100, 4, 2, 16
    dtype = {**F16, "f32": mx.float32}[dt]
    x, dy = arr(rng, (b, l, h, p), dtype), arr(rng, (b, l, h, p), dtype)
    dtv, A = pos(rng, (b, l, h), 0.01, 0.3), -pos(rng, (h,), 0.5, 4.0)
    B, C = arr(rng, (b, l, g, n), dtype), arr(rng, (b, l, g, n), dtype)
    D, s0 = arr(rng, (h,)), arr(rng, (b, h, p, n))
    Bc, Cc, dtc = chunked(B, K), chunked(C, K), chunked(dtv, K)
    CB = mx.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    acs = mx.cumsum(dtc * A, axis=2).transpose(0, 1, 3, 2)
    res = {}
    for on in (False, True):
        monkeypatch.setattr(kern, "OUT_TC", on)
        monkeypatch.setattr(kern, "DX_TC", on)
        with emulate.patch(kern, poison=True):
            y, _ = kern.ssd_chunked(x, dtv, A, B, C, D, s0, K)
            dX = kern.ssd_chunked_diag_bwd(CB, acs, x, dtv, dy)[0]
            used = (kern.CHUNK_OUT_TC.calls, kern.BWD_DX_TC.calls, kern.OUT.calls, kern.BWD_DX.calls)
        assert used == ((1, 1, 0, 0) if on and tc else (0, 0, 1, 1)), used
        res[on] = (y, dX)
    tol = 1e-2 if tc else 0.0
    for a, c in zip(res[True], res[False]):
        assert rel_err(a, c) <= tol, rel_err(a, c)


@pytest.mark.parametrize("dt,l,g,p,K", [("bf16", 130, 2, 32, 128), ("bf16", 100, 1, 16, 80), ("f32", 200, 1, 64, 192)])
def test_scores_zero_tiles_replace_the_fill(monkeypatch, dt, l, g, p, K):
    """With SCORES_ZERO_TILES the groups above the diagonal write their tiles' zeros and the launch has
    no zero-fill (outputs poisoned with NaN in the emulator: an unwritten element would show): the
    same dCB and dacs as with the fill, bit for bit (chunks of 2-3 tiles, a partial last tile)."""
    monkeypatch.setattr(kern, "SCORES_TC", True)
    rng = np.random.default_rng(K + l + p)
    b, h = 1, 4
    x, dtv, A, B, C, _, _, dy, _ = inputs(rng, dt, b, l, h, g, p, 16)
    Bc, Cc, dtc = chunked(B, K), chunked(C, K), chunked(dtv, K)
    acs = mx.cumsum(dtc * A, axis=2).transpose(0, 1, 3, 2)
    CB = mx.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(kern, "SCORES_ZERO_TILES", on)
        with emulate.patch(kern, poison=True):
            got[on] = kern.ssd_chunked_diag_bwd(CB, acs, x, dtv, dy, with_dx=False)[1:]
    for name, a, c in zip(("dacs", "dCB"), got[True], got[False]):
        assert mx.array_equal(a, c), name
