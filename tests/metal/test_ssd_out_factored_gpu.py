"""The SSD chunk products with the decay factored below each warp's diagonal block (switches
`alloy.metal.ssd_chunked.OUT_FACTORED` / `DX_FACTORED`: CHUNK_OUT_TC_FX / BWD_DX_TC_FX) on the GPU
(`pytest -m gpu`; skipped where no CUDA/Metal device): at the toy shape (b 2, 24 heads of 64, d_state
128, one group, chunk 128, bf16) and lengths that are not whole chunks, `ssd_chunked`'s y and
`ssd_chunked_diag_bwd`'s dX with the switches on against off (the row-tile kernels) and y against
`ssd_ref`, the launches counted; and the whole SSD gradient with them on against off."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

from alloy import metal
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import Counted, arr, chunk_time, pos, rel_err
from alloy.ops import ssd_ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")]

NAMES = ("CHUNK_OUT_TC_FX", "BWD_DX_TC_FX", "CHUNK_OUT_TC_RM", "BWD_DX_TC_RM")


def _inputs(rng, b, l, h, g, p, n):
    x, dy = arr(rng, (b, l, h, p), mx.bfloat16), arr(rng, (b, l, h, p), mx.bfloat16)
    dt = pos(rng, (b, l, h), 0.01, 0.6)
    A = -pos(rng, (h,), 0.3, 3.0)
    B, C = arr(rng, (b, l, g, n), mx.bfloat16, 0.5), arr(rng, (b, l, g, n), mx.bfloat16, 0.5)
    D, s0, ds = arr(rng, (h,)), arr(rng, (b, h, p, n), scale=0.1), arr(rng, (b, h, p, n), scale=0.1)
    return x, dy, dt, A, B, C, D, s0, ds


def _switches(monkeypatch, on):
    for name, v in (("OUT_TC", True), ("DX_TC", True), ("OUT_FUSED_YO", False), ("OUT_TC_VEC_EPILOGUE", True),
                    ("TC_ROW_TILES", True), ("DX_FINISH_FUSED", False), ("DX_DYS", False),
                    ("OUT_FACTORED", on), ("DX_FACTORED", on)):
        monkeypatch.setattr(kern, name, v)
    ks = {k: Counted(getattr(kern, k)) for k in NAMES}
    for k, c in ks.items():
        monkeypatch.setattr(kern, k, c)
    return ks


@pytest.mark.parametrize("l,p,K", [(2048, 64, 128), (1000, 64, 128), (300, 128, 64), (200, 32, 80)])
def test_factored_kernels_on_gpu(monkeypatch, l, p, K):
    rng = np.random.default_rng(l + p + 3)
    b, h, g, n = 2, 24 if p == 64 else 4, 1, 128
    x, dy, dt, A, B, C, D, s0, _ = _inputs(rng, b, l, h, g, p, n)
    CB = mx.einsum("bclgn,bcsgn->bcgls", chunk_time(C, K), chunk_time(B, K))
    acs = mx.cumsum(chunk_time(dt, K) * A, axis=2).transpose(0, 1, 3, 2)
    got = {}
    for on in (True, False):
        ks = _switches(monkeypatch, on)
        y, _ = kern.ssd_chunked(x, dt, A, B, C, D, s0, K)
        dX = kern.ssd_chunked_diag_bwd(CB, acs, x, dt, dy)[0]
        mx.eval(y, dX)
        used = tuple(c.calls for c in ks.values())
        assert used == ((1, 1, 0, 0) if on else (0, 0, 1, 1)), (on, used)
        got[on] = (y, dX)
        monkeypatch.undo()
    for name, a, c in zip(("y", "dX"), got[True], got[False]):
        assert a.dtype == c.dtype, name
        assert rel_err(a, c) <= 1e-2, (name, rel_err(a, c))
    yr, _ = ssd_ref(x, dt, A, B, C, D, s0)
    assert rel_err(got[True][0], yr) <= 6e-2, rel_err(got[True][0], yr)


@pytest.mark.parametrize("l", [2048, 1000])
def test_gradient_with_factored_kernels_on_gpu(monkeypatch, l):
    ssd_mod = importlib.import_module("alloy.ops.ssd")
    rng = np.random.default_rng(l + 9)
    b, h, p, g, n, K = 2, 24, 64, 1, 128, 128
    x, dy, dt, A, B, C, D, s0, ds = _inputs(rng, b, l, h, g, p, n)
    got = {}
    for on in (True, False):
        ks = _switches(monkeypatch, on)
        got[on] = ssd_mod.ssd_chunked_vjp_gpu(x, dt, A, B, C, D, s0, dy, ds, K)
        mx.eval(got[on])
        assert ks["BWD_DX_TC_FX"].calls == (1 if on else 0)
        monkeypatch.undo()
    for i, (a, c) in enumerate(zip(got[True], got[False])):
        assert a.shape == c.shape and a.dtype == c.dtype, i
        assert rel_err(a, c) <= 1e-2, (i, rel_err(a, c))


def test_gradient_with_dx_in_input_dtype_on_gpu(monkeypatch):
    """DX_HALF_OUT (BWD_DX_TC_FX writing dX in bf16 for BWD_FIN) against float32 dX, toy shape."""
    ssd_mod = importlib.import_module("alloy.ops.ssd")
    rng = np.random.default_rng(31)
    b, l, h, p, g, n, K = 2, 2048, 24, 64, 1, 128, 128
    x, dy, dt, A, B, C, D, s0, ds = _inputs(rng, b, l, h, g, p, n)
    got = {}
    for on in (True, False):
        _switches(monkeypatch, True)
        monkeypatch.setattr(kern, "DX_HALF_OUT", on)
        got[on] = ssd_mod.ssd_chunked_vjp_gpu(x, dt, A, B, C, D, s0, dy, ds, K)
        mx.eval(got[on])
        monkeypatch.undo()
    for i, (a, c) in enumerate(zip(got[True], got[False])):
        assert a.shape == c.shape and a.dtype == c.dtype, i
        assert rel_err(a, c) <= 1e-2, (i, rel_err(a, c))


@pytest.mark.parametrize("l", [2048, 1000])
def test_factored_out_with_yo_inside_on_gpu(monkeypatch, l):
    """OUT_FX_YO (CHUNK_OUT_YO_FX: Yo = C H inside the factored kernel) against the explicit Yo, toy shape."""
    rng = np.random.default_rng(l + 41)
    b, h, p, g, n, K = 2, 24, 64, 1, 128, 128
    x, _, dt, A, B, C, D, s0, _ = _inputs(rng, b, l, h, g, p, n)
    got = {}
    for on in (True, False):
        _switches(monkeypatch, True)
        monkeypatch.setattr(kern, "OUT_FX_YO", on)
        fused = Counted(kern.CHUNK_OUT_YO_FX)
        monkeypatch.setattr(kern, "CHUNK_OUT_YO_FX", fused)
        got[on], _ = kern.ssd_chunked(x, dt, A, B, C, D, s0, K)
        mx.eval(got[on])
        assert fused.calls == (1 if on else 0)
        monkeypatch.undo()
    assert rel_err(got[True], got[False]) <= 1e-2, rel_err(got[True], got[False])
    yr, _ = ssd_ref(x, dt, A, B, C, D, s0)
    assert rel_err(got[True], yr) <= 6e-2, rel_err(got[True], yr)
