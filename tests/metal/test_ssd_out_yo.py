"""The SSD forward's chunk-output kernel with the off-diagonal term inside it
(`alloy.metal.ssd_chunked.CHUNK_OUT_YO_TC`, switch `OUT_FUSED_YO`) on the CPU emulator: against
CHUNK_OUT_TC fed the explicit Yo = C H (today's batched matmul) and against float64 numpy, over
lengths that are not whole chunks, chunks of one and two 64-row blocks (and below one), two groups,
head dims 32 / 64, d_state 16 / 32, bf16 and fp16; and `ssd_chunked` with the switch on and off.
The GPU run is tests/metal/test_ssd_out_yo_gpu.py."""
import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import F16, arr, chunk_time as chunked, f64, pos, rel_err
from alloy.metal.testing import ssd_out_yo_case as out_case
from alloy.ops import ssd_ref

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")


@pytest.fixture(autouse=True)
def _switch_on(monkeypatch):
    """The kernel under test is off by default (slower in the toy step, docs/benchmarks.md session 9):
    these tests turn OUT_FUSED_YO on (a test that compares on and off sets it itself)."""
    monkeypatch.setattr(kern, "OUT_FUSED_YO", True)


def launch(k, inputs, dtype, K, p, h, b, nc, out_shape):
    return emulate.run(k, inputs, template=[("T", dtype), ("KC", K), ("PC", p)], grid=(-(-K // 64), h, b * nc),
                       threadgroup=128, output_shapes=[out_shape], output_dtypes=[dtype], poison=True)[0]


CASES = [("bf16", 1, 40, 2, 1, 32, 16, 32),    # chunk below the 64-row block, l not whole chunks
         ("fp16", 2, 150, 4, 2, 64, 32, 64),   # one row block per chunk, two groups of two heads
         ("bf16", 1, 200, 4, 2, 32, 32, 128),  # two row blocks per chunk, the last one partial in l
         ("fp16", 1, 100, 2, 2, 64, 16, 80),   # a partial second row block (chunk 80)
         ("bf16", 1, 70, 3, 1, 64, 80, 32)]    # d_state 80: a partial second step of 64 along n


@pytest.mark.parametrize("dt,b,l,h,g,p,n,K", CASES)
def test_fused_yo_matches_explicit_yo_and_float64(dt, b, l, h, g, p, n, K):
    """CHUNK_OUT_YO_TC (C and the chunk-entry states straight into the accumulators) against
    CHUNK_OUT_TC fed the explicit Yo (within 1e-2 bf16, 2e-3 fp16: both round y once, the explicit
    Yo is also rounded) and against float64 numpy (the same bounds; the operands are those of
    CHUNK_OUT_TC)."""
    dtype = F16[dt]
    rng = np.random.default_rng(l + p + n)
    (CB, acs, x, dtv, C, starts, D), Yo, y_ref = out_case(rng, dtype, b, l, h, g, p, n, K)
    nc = CB.shape[1]
    fused = launch(kern.CHUNK_OUT_YO_TC, [CB, acs, x, dtv, C, starts, D], dtype, K, p, h, b, nc, x.shape)
    today = launch(kern.CHUNK_OUT_TC, [CB, acs, x, dtv, Yo, D], dtype, K, p, h, b, nc, x.shape)
    want = mx.array(y_ref.astype(np.float32))
    tol = 1e-2 if dt == "bf16" else 2e-3
    assert fused.dtype == dtype
    assert rel_err(today, want) <= tol, rel_err(today, want)
    assert rel_err(fused, want) <= tol, rel_err(fused, want)
    assert rel_err(fused, today) <= tol, rel_err(fused, today)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_fused_yo_rounds_once(dt):
    """With x = 0, y = exp(acs_l) (C H)_l alone: the fused kernel never rounds Yo, so every element
    is the float64 value rounded once to the input dtype (within half an ulp of it, plus float32
    accumulation), which the explicit Yo (rounded, scaled in float32, rounded again) is not."""
    dtype = F16[dt]
    rng = np.random.default_rng(9)
    b, l, h, g, p, n, K = 1, 100, 2, 1, 32, 32, 64
    nc = -(-l // K)
    (CB, acs, x, dtv, C, starts, D), Yo, y_ref = out_case(rng, dtype, b, l, h, g, p, n, K, x_scale=0.0)
    fused = launch(kern.CHUNK_OUT_YO_TC, [CB, acs, x, dtv, C, starts, D], dtype, K, p, h, b, nc, x.shape)
    today = launch(kern.CHUNK_OUT_TC, [CB, acs, x, dtv, Yo, D], dtype, K, p, h, b, nc, x.shape)
    bits, emin = (7, -126) if dt == "bf16" else (10, -14)  # stored mantissa bits, smallest normal exponent
    ulp = 2.0 ** (np.maximum(np.floor(np.log2(np.abs(y_ref) + 1e-300)), emin) - bits)
    ulps = lambda v: np.abs(f64(v) - y_ref) / ulp  # noqa: E731
    # seen: fused 0.4997 (bf16) / 0.503 (fp16: float32 accumulation in the margin), explicit Yo 1.34 / 1.31
    assert ulps(fused).max() <= 0.51, ulps(fused).max()
    assert ulps(today).max() > 1.0  # the double rounding this removes (a check that the test can fail)


def ssd_case(rng, dtype, b, l, h, g, p, n):
    x = arr(rng, (b, l, h, p), dtype)
    dtv, A = pos(rng, (b, l, h), 0.01, 0.3), -pos(rng, (h,), 0.5, 4.0)
    B, C = arr(rng, (b, l, g, n), dtype, 0.5), arr(rng, (b, l, g, n), dtype, 0.5)
    D, s0 = arr(rng, (h,)), arr(rng, (b, h, p, n))
    return x, dtv, A, B, C, D, s0


@pytest.mark.parametrize("dt,p,n,K,fused", [("bf16", 32, 16, 64, True), ("fp16", 64, 32, 128, True),
                                           ("bf16", 32, 8, 64, False),    # d_state not a multiple of 16
                                           ("bf16", 32, 16, 40, False)])  # chunk not a multiple of 16
def test_ssd_chunked_switch(monkeypatch, dt, p, n, K, fused):
    """`ssd_chunked` with OUT_FUSED_YO on launches CHUNK_OUT_YO_TC (no Yo matmul) where CHUNK_OUT_TC
    applies and d_state is a multiple of 16, else what it launches with the switch off; y within the
    16-bit rounding of the switch-off path and of `ssd_ref`, the final state and (with_starts) the
    chunk-entry states identical."""
    dtype = F16[dt]
    rng = np.random.default_rng(p + n + K)
    b, l, h, g = 1, 100, 4, 2
    args = ssd_case(rng, dtype, b, l, h, g, p, n)
    res = {}
    monkeypatch.setattr(kern, "TC_ROW_TILES", False)  # the row-tile kernel: test_ssd_tc_rows.py
    for on in (False, True):
        monkeypatch.setattr(kern, "OUT_FUSED_YO", on)
        with emulate.patch(kern, poison=True):
            res[on] = kern.ssd_chunked(*args, K, with_starts=True)
            used = (kern.CHUNK_OUT_YO_TC.calls, kern.CHUNK_OUT_TC.calls, kern.OUT.calls)
        want = (1, 0, 0) if on and fused else (0, 1, 0) if K % 16 == 0 else (0, 0, 1)
        assert used == want, (on, used)
    (y1, s1, h1), (y0, s0, h0) = res[True], res[False]
    tol = 1e-2 if dt == "bf16" else 2e-3
    assert y1.dtype == dtype and h1.shape == (b, -(-l // K), g, n, (h // g) * p) and h1.dtype == dtype
    assert rel_err(y1, y0) <= tol, rel_err(y1, y0)
    assert mx.array_equal(s1, s0) and mx.array_equal(h1, h0)
    yr, sr = ssd_ref(*[v.astype(mx.float32) for v in args])
    assert rel_err(y1, yr) <= 3e-2, rel_err(y1, yr)
    assert rel_err(s1, sr) <= 3e-2, rel_err(s1, sr)
    with emulate.patch(kern, poison=True):  # with_starts=False: the same y and final state, two results
        monkeypatch.setattr(kern, "OUT_FUSED_YO", True)
        out = kern.ssd_chunked(*args, K)
    assert len(out) == 2 and mx.array_equal(out[0], y1) and mx.array_equal(out[1], s1)
