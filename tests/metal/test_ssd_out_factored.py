"""The chunk-output kernel with the decay factored below each warp's diagonal block
(`alloy.metal.ssd_chunked.CHUNK_OUT_TC_FX`, switch `OUT_FACTORED`) on the CPU emulator: y within the
tensor-core tolerance of the float64 reference and of CHUNK_OUT_TC_RM (whose mask entries it rounds
differently), over bf16 / fp16, head dims 16-128, chunks 32-256 (partial row blocks, lengths that are
not whole chunks), grouped B / C, and decays strong enough that exp(acs_l - acs_s) underflows float32
inside a chunk; and the switch's dispatch. The GPU run is tests/metal/test_ssd_out_factored_gpu.py."""
import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import F16, SSD_DIAG_CASES, pos, rel_err, ssd_diag_case, ssd_inputs, ssd_out_yo_case

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")

CASES = SSD_DIAG_CASES


def _run(kernel, args, K, p):
    CB, acs, x, dtv, Yo, D = args
    b, _, h, _ = x.shape
    nc = CB.shape[1]
    return emulate.run(kernel, [CB, acs, x, dtv, Yo, D], template=[("T", x.dtype), ("KC", K), ("PC", p)],
                       grid=(-(-K // 64), h, b * nc), threadgroup=128, poison=True,
                       output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


@pytest.mark.parametrize("dt,b,l,h,g,p,K", CASES)
def test_factored_out_matches_reference_and_row_tile_kernel(dt, b, l, h, g, p, K):
    rng = np.random.default_rng(l + p + K)
    (CB, acs, x, dtv, Yo, D, _), y_ref, _ = ssd_diag_case(rng, dt, b, l, h, g, p, K)
    args = (CB, acs, x, dtv, Yo, D)
    new, old = _run(kern.CHUNK_OUT_TC_FX, args, K, p), _run(kern.CHUNK_OUT_TC_RM, args, K, p)
    tol = 1e-2 if dt == "bf16" else 2e-3
    ref = mx.array(y_ref.astype(np.float32))
    assert new.dtype == x.dtype
    assert rel_err(new, ref) <= tol, rel_err(new, ref)
    assert rel_err(new, old) <= tol, rel_err(new, old)


def test_factored_out_under_strong_decay():
    """dt A down to -9 per step: across a 128-step chunk exp(acs_l - acs_s) spans far below float32's
    range; the factored entries must stay finite and match the reference (tiny entries rounding to 0)."""
    rng = np.random.default_rng(7)
    b, l, h, g, p, K = 1, 256, 2, 1, 32, 128
    (CB, acs, x, dtv, Yo, D, _), _, _ = ssd_diag_case(rng, "bf16", b, l, h, g, p, K)
    dtv = pos(rng, (b, l, h), 0.5, 3.0)
    A = mx.array([-3.0, -0.05])                 # one head decaying hard, one barely
    from alloy.metal.testing import chunk_time, f64
    acs = mx.cumsum(chunk_time(dtv, K) * A, axis=2).transpose(0, 1, 3, 2)
    new = _run(kern.CHUNK_OUT_TC_FX, (CB, acs, x, dtv, Yo, D), K, p)
    ac = f64(acs)
    nc = CB.shape[1]
    E = np.exp(ac[..., :, None] - ac[..., None, :]) * np.tril(np.ones((K, K)))
    M = np.repeat(f64(CB), h // g, axis=2) * E
    X = f64(chunk_time(x, K)) * f64(chunk_time(dtv, K))[..., None]
    Yh = f64(Yo).reshape(b, nc, g, K, h // g, p).transpose(0, 1, 3, 2, 4, 5).reshape(b, nc, K, h, p)
    y = (np.einsum("bchls,bcshp->bclhp", M, X) + np.exp(ac).transpose(0, 1, 3, 2)[..., None] * Yh
         + f64(D)[:, None] * f64(chunk_time(x, K))).reshape(b, nc * K, h, p)[:, :l]
    assert bool(mx.all(mx.isfinite(new.astype(mx.float32))))
    assert rel_err(new, mx.array(y.astype(np.float32))) <= 1e-2


@pytest.mark.parametrize("on", [True, False])
def test_switch_picks_the_factored_kernel(monkeypatch, on):
    for name, v in (("OUT_TC", True), ("OUT_FUSED_YO", False), ("OUT_TC_VEC_EPILOGUE", True),
                    ("TC_ROW_TILES", True), ("OUT_FACTORED", on)):
        monkeypatch.setattr(kern, name, v)
    b, l, h, g, p, n, K = 1, 100, 4, 2, 32, 16, 64
    dtype = F16["bf16"]
    x, dtv, A, B, C, D, s0, _, _ = ssd_inputs(np.random.default_rng(5), dtype, b, l, h, g, p, n)
    with emulate.patch(kern, poison=True):
        y, _ = kern.ssd_chunked(x, dtv, A, B, C, D, s0, K)
        used = (kern.CHUNK_OUT_TC_FX.calls, kern.CHUNK_OUT_TC_RM.calls)
    assert used == ((1, 0) if on else (0, 1)), used
    assert y.dtype == dtype


def _run_dx(kernel, CB, acs, dy, K, p):
    b, _, h, _ = dy.shape
    nc = CB.shape[1]
    return emulate.run(kernel, [CB, acs, dy], template=[("T", dy.dtype), ("KC", K), ("PC", p)],
                       grid=(-(-K // 64), h, b * nc), threadgroup=128, poison=True,
                       output_shapes=[(b, nc * K, h, p)], output_dtypes=[mx.float32])[0]


@pytest.mark.parametrize("dt,b,l,h,g,p,K", CASES)
def test_factored_dx_matches_reference_and_row_tile_kernel(dt, b, l, h, g, p, K):
    rng = np.random.default_rng(l + p + K + 1)
    (CB, acs, x, dtv, Yo, D, dy), _, dX_ref = ssd_diag_case(rng, dt, b, l, h, g, p, K)
    nc = CB.shape[1]
    new, old = _run_dx(kern.BWD_DX_TC_FX, CB, acs, dy, K, p), _run_dx(kern.BWD_DX_TC_RM, CB, acs, dy, K, p)
    tol = 1e-2 if dt == "bf16" else 2e-3
    ref = mx.array(dX_ref.reshape(b, nc * K, h, p).astype(np.float32))
    assert rel_err(new, ref) <= tol, rel_err(new, ref)
    assert rel_err(new, old) <= tol, rel_err(new, old)


@pytest.mark.parametrize("on", [True, False])
def test_switch_picks_the_factored_dx_kernel(monkeypatch, on):
    for name, v in (("DX_TC", True), ("TC_ROW_TILES", True), ("DX_FACTORED", on)):
        monkeypatch.setattr(kern, name, v)
    rng = np.random.default_rng(6)
    (CB, acs, x, dtv, Yo, D, dy), _, _ = ssd_diag_case(rng, "bf16", 1, 100, 2, 1, 32, 64)
    with emulate.patch(kern, poison=True):
        dX = kern.ssd_chunked_diag_bwd(CB, acs, x, dtv, dy)[0]
        used = (kern.BWD_DX_TC_FX.calls, kern.BWD_DX_TC_RM.calls)
    assert used == ((1, 0) if on else (0, 1)), used
    assert dX.dtype == mx.float32


@pytest.mark.parametrize("dt,g", [("bf16", 1), ("fp16", 2)])
def test_dx_in_input_dtype(monkeypatch, dt, g):
    """DX_HALF_OUT: BWD_DX_TC_FX writes dX in x's dtype (the float32 kernel's values rounded once), and
    the whole SSD gradient through BWD_FIN stays within 1e-2 of the float32-dX one (dx itself leaves in
    x's dtype either way)."""
    import importlib
    from alloy.metal.testing import ssd_chunked_autodiff
    ssd_mod = importlib.import_module("alloy.ops.ssd")
    for name, v in (("DX_TC", True), ("TC_ROW_TILES", True), ("DX_FACTORED", True), ("DX_DYS", False),
                    ("DX_FINISH_FUSED", False)):
        monkeypatch.setattr(kern, name, v)
    rng = np.random.default_rng(21 + g)
    b, l, h, p, n, K = 1, 150, 4, 32, 16, 64
    prim = ssd_inputs(rng, F16[dt], b, l, h, g, p, n)
    x, dtv, A, B, C, D, s0, dy, ds = prim
    (CB, acs, *_), _, _ = ssd_diag_case(rng, dt, b, l, h, g, p, K)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(kern, "DX_HALF_OUT", on)
        with emulate.patch(kern, poison=True):
            dX = kern.ssd_chunked_diag_bwd(CB, acs, x, dtv, dy)[0]
            got[on] = ssd_mod.ssd_chunked_vjp_gpu(*prim, K)
        assert dX.dtype == (x.dtype if on else mx.float32)
        got[on] = (dX,) + tuple(got[on])
    assert mx.array_equal(got[True][0], got[False][0].astype(x.dtype))   # the same values, rounded once
    want = ssd_chunked_autodiff(prim, K)
    for i, (a, c, w) in enumerate(zip(got[True][1:], got[False][1:], want)):
        assert a.shape == c.shape and a.dtype == c.dtype, i
        assert rel_err(a, c) <= 1e-2, (i, rel_err(a, c))
        assert rel_err(a, w) <= 3e-2, (i, rel_err(a, w))


YO_CASES = [("bf16", 1, 40, 2, 1, 32, 16, 32),    # chunk below the 64-row block, l not whole chunks
            ("fp16", 2, 150, 4, 2, 64, 32, 64),   # two groups of two heads
            ("bf16", 1, 200, 4, 2, 32, 32, 128),  # two row blocks per chunk, the last one partial in l
            ("bf16", 1, 300, 2, 1, 128, 128, 128)]  # head dim and d_state 128 (two steps along n)


@pytest.mark.parametrize("dt,b,l,h,g,p,n,K", YO_CASES)
def test_factored_out_with_yo_inside(dt, b, l, h, g, p, n, K):
    """CHUNK_OUT_YO_FX (Yo = C H in the kernel) against CHUNK_OUT_TC_FX fed the explicit Yo and against
    float64 (the inputs of tests/metal/test_ssd_out_yo.py)."""
    rng = np.random.default_rng(l + n + K)
    dtype = F16[dt]
    (CB, acs, x, dtv, C, starts, D), Yo, y_ref = ssd_out_yo_case(rng, dtype, b, l, h, g, p, n, K)
    nc = CB.shape[1]

    def launch(k, inputs):
        return emulate.run(k, inputs, template=[("T", dtype), ("KC", K), ("PC", p)], grid=(-(-K // 64), h, b * nc),
                           threadgroup=128, output_shapes=[x.shape], output_dtypes=[dtype], poison=True)[0]
    fused = launch(kern.CHUNK_OUT_YO_FX, [CB, acs, x, dtv, C, starts, D])
    explicit = launch(kern.CHUNK_OUT_TC_FX, [CB, acs, x, dtv, Yo, D])
    tol = 1e-2 if dt == "bf16" else 2e-3
    ref = mx.array(y_ref.astype(np.float32))
    assert fused.dtype == dtype
    assert rel_err(fused, ref) <= tol, rel_err(fused, ref)
    assert rel_err(fused, explicit) <= tol, rel_err(fused, explicit)


@pytest.mark.parametrize("on", [True, False])
def test_switch_picks_the_factored_yo_kernel(monkeypatch, on):
    for name, v in (("OUT_TC", True), ("OUT_FUSED_YO", False), ("OUT_TC_VEC_EPILOGUE", True),
                    ("TC_ROW_TILES", True), ("OUT_FACTORED", True), ("OUT_FX_YO", on)):
        monkeypatch.setattr(kern, name, v)
    b, l, h, g, p, n, K = 1, 100, 4, 2, 32, 16, 64
    dtype = F16["bf16"]
    x, dtv, A, B, C, D, s0, _, _ = ssd_inputs(np.random.default_rng(8), dtype, b, l, h, g, p, n)
    with emulate.patch(kern, poison=True):
        y, _ = kern.ssd_chunked(x, dtv, A, B, C, D, s0, K)
        used = (kern.CHUNK_OUT_YO_FX.calls, kern.CHUNK_OUT_TC_FX.calls)
    from alloy.ops import ssd_ref
    yr, _ = ssd_ref(x, dtv, A, B, C, D, s0)
    assert used == ((1, 0) if on else (0, 1)), used
    assert rel_err(y, yr) <= 3e-2, rel_err(y, yr)
