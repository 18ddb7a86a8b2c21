"""The SSD gradient's dX of the diagonal blocks fused with its finishing pass
(`alloy.metal.ssd_chunked.BWD_DX_FIN_TC` / `bwd_dx_finish`: BWD_DX_TC, the products C_l H_c and
B_l dS_c, and BWD_FIN in one kernel) on the CPU emulator: against float64 numpy and against the
unfused kernels it replaces, over lengths that are not whole chunks, chunks of one and two 64-row
blocks (and one below a block), grouped heads, head dims 32 / 64, d_state 16 / 32 / 48 / 80, bf16 and
fp16; and the whole `ssd_chunked_vjp_gpu` gradient with the switch `DX_FINISH_FUSED` on and off.
The GPU run is in tests/metal/test_ssd_dx_finish_gpu.py."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import F16, arr, chunk_time as chunked, f64, pos, rel_err, ssd_chunked_autodiff, ssd_inputs

ssd_mod = importlib.import_module("alloy.ops.ssd")

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")


@pytest.fixture(autouse=True)
def _switch_on(monkeypatch):
    """The kernel under test is off by default (slower in the toy step, docs/benchmarks.md session 9):
    these tests turn DX_FINISH_FUSED on (a test that compares on and off sets it itself)."""
    monkeypatch.setattr(kern, "DX_FINISH_FUSED", True)


def fin_case(rng, dt, b, l, h, g, p, n, K):
    """The fused kernel's inputs (CB (b, c, g, K, K) f32 = C B^T per chunk, acs (b, c, K, h) f32, x / dy
    (b, l, h, p), dt (b, l, h), B / C (b, l, g, n) and dS / Hs (b, c, g, n, r p) in dtype, D (h,) f32)
    and float64 numpy references of dx, ra, rw, rx, rd (BWD_FIN's definitions, padded steps zero)."""
    dtype = F16[dt]
    nc, r = -(-l // K), h // g
    x, dy = arr(rng, (b, l, h, p), dtype), arr(rng, (b, l, h, p), dtype)
    dtv, A = pos(rng, (b, l, h), 0.01, 0.3), -pos(rng, (h,), 0.5, 4.0)
    B, C = arr(rng, (b, l, g, n), dtype, 0.5), arr(rng, (b, l, g, n), dtype, 0.5)
    dS, Hs = arr(rng, (b, nc, g, n, r * p), dtype), arr(rng, (b, nc, g, n, r * p), dtype)
    D = arr(rng, (h,))
    Bc, Cc, dtc = chunked(B, K), chunked(C, K), chunked(dtv, K)
    CB = mx.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    acs = mx.cumsum(dtc * A, axis=2)                                      # (b, c, K, h)
    ac, dtk = f64(acs).transpose(0, 1, 3, 2), f64(dtc)                    # (b, c, h, K), (b, c, K, h)
    E = np.exp(ac[..., :, None] - ac[..., None, :]) * np.tril(np.ones((K, K)))    # (b, c, h, l, s)
    M = np.repeat(f64(CB), r, axis=2) * E
    xk, dyk = f64(chunked(x, K)), f64(chunked(dy, K))                     # (b, c, K, h, p), zero padded
    dXd = np.einsum("bchls,bclhp->bcshp", M, dyk)

    def heads(S):  # (b, c, g, n, r p) -> (b, c, g, n, r, p)
        return f64(S).reshape(b, nc, g, n, r, p)
    CH = np.einsum("bckgn,bcgnrp->bckgrp", f64(Cc), heads(Hs)).reshape(b, nc, K, h, p)
    dXw = np.einsum("bckgn,bcgnrp->bckgrp", f64(Bc), heads(dS)).reshape(b, nc, K, h, p)
    ws = np.exp(ac[..., -1:] - ac).transpose(0, 1, 3, 2)[..., None]     # (b, c, K, h, 1)
    eo = np.exp(ac).transpose(0, 1, 3, 2)[..., None]
    dX = dXw * ws + dXd
    dx = dX * dtk[..., None] + f64(D)[:, None] * dyk
    sw = (dXw * dtk[..., None] * xk * ws).sum(-1)
    want = {"dx": dx.reshape(b, nc * K, h, p)[:, :l], "ra": (dyk * eo * CH).sum(-1) - sw, "rw": sw,
            "rx": (dX * xk).sum(-1), "rd": (dyk * xk).sum(-1)}
    return (CB, acs, x, dtv, dy, B, C, dS, Hs, D), want


CASES = [("bf16", 1, 40, 2, 1, 32, 16, 32),     # chunk below the 64-row block (two idle warps), L < K
         ("bf16", 1, 100, 2, 1, 64, 80, 64),    # one row block per chunk, L not whole chunks, n 64 + 16
         ("fp16", 1, 150, 4, 2, 32, 48, 128),   # two row blocks, two heads per group, n not a multiple of 64
         ("bf16", 2, 70, 4, 2, 64, 16, 128)]    # batch 2, a chunk ending inside the first row block


@pytest.mark.parametrize("dt,b,l,h,g,p,n,K", CASES)
def test_fused_kernel_matches_float64_and_the_unfused_kernels(dt, b, l, h, g, p, n, K):
    """BWD_DX_FIN_TC against float64 numpy (operands in the input dtype, the mask rounded to it as in
    BWD_DX_TC: bf16 within 1e-2, fp16 2e-3) and against BWD_DX_TC + the two products (rounded to the
    input dtype, as the batched matmuls it replaces) + BWD_FIN within 1e-2; padded steps give zeros."""
    rng = np.random.default_rng(l + p + n)
    (CB, acs, x, dtv, dy, B, C, dS, Hs, D), want = fin_case(rng, dt, b, l, h, g, p, n, K)
    assert kern.dx_finish_fits(x.dtype, x.dtype, p, K, n)
    with emulate.patch(kern, poison=True):
        got = kern.bwd_dx_finish(CB, acs, x, dtv, dy, B, C, dS, Hs, D)
        assert kern.BWD_DX_FIN_TC.calls == 1
        # the unfused path: dX of the diagonal blocks, the products in the input dtype, BWD_FIN
        nc = CB.shape[1]
        (dXd,) = kern.BWD_DX_TC([CB, acs.transpose(0, 1, 3, 2), dy], template=[("T", x.dtype), ("KC", K), ("PC", p)],
                                grid=(-(-K // 64), h, b * nc), threadgroup=128,
                                output_shapes=[(b, nc * K, h, p)], output_dtypes=[mx.float32])
        Bg, Cg = (chunked(v, K).astype(x.dtype).transpose(0, 1, 3, 2, 4) for v in (B, C))   # (b, c, g, K, n)
        old = kern.bwd_finish(x, dy, dtv, acs, Cg @ Hs, Bg @ dS, dXd.reshape(b, nc, K, h, p), D)
    tol = 1e-2 if dt == "bf16" else 2e-3
    for name, gv, ov in zip(("dx", "ra", "rw", "rx", "rd"), got, old):
        w = mx.array(want[name].astype(np.float32))
        assert gv.shape == w.shape and gv.dtype == (x.dtype if name == "dx" else mx.float32), name
        assert rel_err(gv, w) <= tol, (name, rel_err(gv, w))
        assert rel_err(gv, ov) <= 1e-2, (name, rel_err(gv, ov))
    pad = -l % K
    if pad:  # steps past the end: all four sums zero
        for v in got[1:]:
            assert not np.array(v).reshape(b, -1, h)[:, l:].any()


@pytest.mark.parametrize("dt,p,n,K", [("bf16", 32, 16, 64), ("fp16", 64, 32, 128)])
def test_gradient_with_the_switch_on_and_off(monkeypatch, dt, p, n, K):
    """The whole `ssd_chunked_vjp_gpu` gradient with DX_FINISH_FUSED on (BWD_DX_FIN_TC launched, BWD_DX_TC
    and BWD_FIN not) equals the one with it off within the 16-bit rounding of the products it keeps in
    float32 (1e-2), and both match autodiff of `ssd_chunked` in float32 on the same values (3e-2, as
    tests/metal/test_ssd_bwd.py)."""
    rng = np.random.default_rng(p + n)
    b, l, h, g = 1, 150, 4, 2
    prim = ssd_inputs(rng, F16[dt], b, l, h, g, p, n)
    want = ssd_chunked_autodiff(prim, K)
    got = {}
    monkeypatch.setattr(kern, "TC_ROW_TILES", False)  # the row-tile kernel: test_ssd_tc_rows.py
    for on in (True, False):
        monkeypatch.setattr(kern, "DX_FINISH_FUSED", on)
        with emulate.patch(kern, poison=True):
            got[on] = ssd_mod.ssd_chunked_vjp_gpu(*prim, K)
            used = (kern.BWD_DX_FIN_TC.calls, kern.BWD_DX_TC.calls, kern.BWD_FIN.calls)
        assert used == ((1, 0, 0) if on else (0, 1, 1)), used
    for i, (a, c, w) in enumerate(zip(got[True], got[False], want)):
        assert a.shape == w.shape and a.dtype == c.dtype, i
        assert rel_err(a, c) <= 1e-2, (i, rel_err(a, c))
        assert rel_err(a, w) <= 3e-2, (i, rel_err(a, w))


@pytest.mark.parametrize("dt,op,p,K,n,fits", [("bf16", "bf16", 64, 128, 128, True),
                                              ("bf16", "f32", 64, 128, 128, False),   # float32 products
                                              ("bf16", "bf16", 64, 128, 24, False),   # n not a multiple of 16
                                              ("bf16", "bf16", 8, 128, 16, False),    # head dim below 16
                                              ("f32", "f32", 64, 128, 16, False)])
def test_fused_path_applies_where_bwd_dx_tc_does(dt, op, p, K, n, fits):
    dtypes = {**F16, "f32": mx.float32}
    assert kern.dx_finish_fits(dtypes[dt], dtypes[op], p, K, n) == fits
