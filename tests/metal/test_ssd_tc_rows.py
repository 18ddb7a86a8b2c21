"""The SSD chunk products with row-major data tiles (`alloy.metal.ssd_chunked.CHUNK_OUT_TC_RM` /
`BWD_DX_TC_RM`, switch `TC_ROW_TILES`: dt x / dy tiles stored [k][p] and read as b-operands by
`mma16_f`, BWD_DX's mask tile in CB's layout read by `lda16t`) on the CPU emulator: bit-identical to
CHUNK_OUT_TC / BWD_DX_TC (same operands, same products) and within the tensor-core tolerance of the
float64 references, over bf16 / fp16, head dims 16-128, chunks 32-256 (partial row blocks, lengths
that are not whole chunks), grouped B / C; and the switch's dispatch. The GPU run (where mma16_f /
lda16t are ldmatrix.trans) is tests/metal/test_ssd_tc_rows_gpu.py."""
import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import (F16, SSD_DIAG_CASES, arr, chunk_time, pos, rel_err, ssd_chunked_autodiff,
                                 ssd_diag_case, ssd_inputs)

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")

CASES = SSD_DIAG_CASES


@pytest.mark.parametrize("dt,b,l,h,g,p,K", CASES)
def test_row_tiles_bit_identical_and_reference(dt, b, l, h, g, p, K):
    rng = np.random.default_rng(l + p + K)
    (CB, acs, x, dtv, Yo, D, dy), y_ref, dX_ref = ssd_diag_case(rng, dt, b, l, h, g, p, K)
    nc = CB.shape[1]
    launch = dict(template=[("T", x.dtype), ("KC", K), ("PC", p)], grid=(-(-K // 64), h, b * nc),
                  threadgroup=128, poison=True)
    ys = [emulate.run(k, [CB, acs, x, dtv, Yo, D], output_shapes=[x.shape], output_dtypes=[x.dtype], **launch)[0]
          for k in (kern.CHUNK_OUT_TC_RM, kern.CHUNK_OUT_TC)]
    dXs = [emulate.run(k, [CB, acs, dy], output_shapes=[(b, nc * K, h, p)], output_dtypes=[mx.float32],
                       **launch)[0] for k in (kern.BWD_DX_TC_RM, kern.BWD_DX_TC)]
    tol = 1e-2 if dt == "bf16" else 2e-3
    for name, (new, old), ref in (("y", ys, y_ref), ("dX", dXs, dX_ref.reshape(b, nc * K, h, p))):
        assert new.dtype == old.dtype, name
        assert mx.array_equal(new, old), (name, float(mx.abs(new.astype(mx.float32) - old.astype(mx.float32)).max()))
        assert rel_err(new, mx.array(ref.astype(np.float32))) <= tol, (name, rel_err(new, mx.array(ref.astype(np.float32))))


@pytest.mark.parametrize("on", [True, False])
def test_switch_picks_the_row_tile_kernels(monkeypatch, on):
    """`ssd_chunked` / `ssd_chunked_diag_bwd` launch the row-tile kernels with TC_ROW_TILES on and the
    transposed-tile ones with it off (OUT_TC / DX_TC on, the 16-byte epilogue, no fused Yo)."""
    for name, v in (("OUT_TC", True), ("DX_TC", True), ("OUT_FUSED_YO", False), ("OUT_TC_VEC_EPILOGUE", True),
                    ("TC_ROW_TILES", on), ("OUT_FACTORED", False), ("DX_FACTORED", False)):
        monkeypatch.setattr(kern, name, v)
    rng = np.random.default_rng(5)
    b, l, h, g, p, n, K = 1, 100, 4, 2, 32, 16, 64
    dtype = F16["bf16"]
    x, dy = arr(rng, (b, l, h, p), dtype), arr(rng, (b, l, h, p), dtype)
    dtv, A = pos(rng, (b, l, h), 0.01, 0.3), -pos(rng, (h,), 0.5, 4.0)
    B, C = arr(rng, (b, l, g, n), dtype), arr(rng, (b, l, g, n), dtype)
    D, s0 = arr(rng, (h,)), arr(rng, (b, h, p, n))
    CB = mx.einsum("bclgn,bcsgn->bcgls", chunk_time(C, K), chunk_time(B, K))
    acs = mx.cumsum(chunk_time(dtv, K) * A, axis=2).transpose(0, 1, 3, 2)
    with emulate.patch(kern, poison=True):
        y, _ = kern.ssd_chunked(x, dtv, A, B, C, D, s0, K)
        dX = kern.ssd_chunked_diag_bwd(CB, acs, x, dtv, dy)[0]
        used = (kern.CHUNK_OUT_TC_RM.calls, kern.BWD_DX_TC_RM.calls, kern.CHUNK_OUT_TC.calls, kern.BWD_DX_TC.calls)
    assert used == ((1, 1, 0, 0) if on else (0, 0, 1, 1)), used
    assert y.dtype == dtype and dX.dtype == mx.float32


@pytest.mark.parametrize("dt,b,l,h,g,p,K", CASES[:4])
def test_dx_kernel_writing_dys(dt, b, l, h, g, p, K):
    """BWD_DX_TC_DYS (`bwd_dx_dys`): dX bit-identical to BWD_DX_TC_RM's, and dys = dy exp(acs) in the
    gradient's (b, c, g, K, h/g p) layout equal to the MLX expression it replaces within one rounding
    to the 16-bit dtype (exp may differ by an ulp), zeros past L."""
    rng = np.random.default_rng(l + p + K + 1)
    (CB, acs, x, dtv, Yo, D, dy), _, _ = ssd_diag_case(rng, dt, b, l, h, g, p, K)
    nc = CB.shape[1]
    with emulate.patch(kern, poison=True):
        dX, dys = kern.bwd_dx_dys(CB, acs, dy, g)
    (old,) = emulate.run(kern.BWD_DX_TC_RM, [CB, acs, dy], template=[("T", dy.dtype), ("KC", K), ("PC", p)],
                         grid=(-(-K // 64), h, b * nc), threadgroup=128, output_shapes=[(b, nc * K, h, p)],
                         output_dtypes=[mx.float32], poison=True)
    assert mx.array_equal(dX, old.reshape(dX.shape))
    r = h // g
    want = (chunk_time(dy, K) * mx.exp(acs.transpose(0, 1, 3, 2))[..., None]).astype(dy.dtype)  # (b, c, K, h, p)
    want = want.reshape(b, nc, K, g, r * p).transpose(0, 1, 3, 2, 4)
    assert dys.dtype == dy.dtype and dys.shape == (b, nc, g, K, r * p)
    assert rel_err(dys, want) <= (1e-2 if dt == "bf16" else 2e-3), rel_err(dys, want)
    pad = nc * K - l
    if pad:
        assert float(mx.abs(dys.transpose(0, 1, 3, 2, 4).reshape(b, nc * K, -1)[:, l:].astype(mx.float32)).max()) == 0.0


@pytest.mark.parametrize("dt,g", [("bf16", 1), ("fp16", 2)])
def test_gradient_with_dys_from_the_dx_kernel(monkeypatch, dt, g):
    """`ssd_chunked_vjp_gpu` with DX_DYS on launches BWD_DX_TC_DYS (and no BWD_DX_TC_RM) and matches the
    gradient with it off within the 16-bit rounding of dys (1e-2), both near autodiff of `ssd_chunked`
    in float32 (3e-2, as tests/metal/test_ssd_bwd.py)."""
    import importlib
    ssd_mod = importlib.import_module("alloy.ops.ssd")
    rng = np.random.default_rng(11 + g)
    b, l, h, p, n, K = 1, 150, 4, 32, 16, 64
    prim = ssd_inputs(rng, F16[dt], b, l, h, g, p, n)
    want = ssd_chunked_autodiff(prim, K)
    for name, v in (("DX_TC", True), ("TC_ROW_TILES", True), ("DX_FINISH_FUSED", False), ("DX_FACTORED", False)):
        monkeypatch.setattr(kern, name, v)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(kern, "DX_DYS", on)
        with emulate.patch(kern, poison=True):
            got[on] = ssd_mod.ssd_chunked_vjp_gpu(*prim, K)
            used = (kern.BWD_DX_TC_DYS.calls, kern.BWD_DX_TC_RM.calls)
        assert used == ((1, 0) if on else (0, 1)), (on, used)
    for i, (a, c, w) in enumerate(zip(got[True], got[False], want)):
        assert a.shape == w.shape and a.dtype == c.dtype, i
        assert rel_err(a, c) <= 1e-2, (i, rel_err(a, c))
        assert rel_err(a, w) <= 3e-2, (i, rel_err(a, w))
