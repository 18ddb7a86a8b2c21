"""The SSD gradient's finishing pass (`alloy.metal.ssd_chunked.BWD_FIN` / `bwd_finish`) on the CPU
emulator, in both of its lane layouts: 8-element runs per lane (16-byte loads, switch `FIN_VEC` on, head
dims that 8 divides: 8, 4 and 1 lanes per row) and single elements over 8 lanes (the first layout: other
head dims, or `FIN_VEC` off). Against float64 numpy of BWD_FIN's definitions and against each other, over
lengths that are not whole chunks, one and two heads per group, CH / dXw in the input dtype and in
float32, x in bf16 / fp16 / float32."""
import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import arr, f64, pos, rel_err

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")

DT = {"bf16": mx.bfloat16, "fp16": mx.float16, "f32": mx.float32}


def fin_case(rng, dtype, chdtype, b, l, h, g, p, K):
    """bwd_finish's inputs (x, dy (b, l, h, p) and CH, dXw (b, c, g, K, r p) in their dtypes, dt (b, l, h),
    acs (b, c, K, h), dXd (b, c, K, h, p), D (h,) float32) and float64 references of dx, ra, rw, rx, rd."""
    nc, r = -(-l // K), h // g
    x, dy = arr(rng, (b, l, h, p), dtype), arr(rng, (b, l, h, p), dtype)
    dtv, A = pos(rng, (b, l, h), 0.01, 0.3), -pos(rng, (h,), 0.5, 4.0)
    dtc = mx.pad(dtv, [(0, 0), (0, nc * K - l), (0, 0)]).reshape(b, nc, K, h)
    acs = mx.cumsum(dtc * A, axis=2)
    CH, dXw = arr(rng, (b, nc, g, K, r * p), chdtype), arr(rng, (b, nc, g, K, r * p), chdtype)
    dXd, D = arr(rng, (b, nc, K, h, p)), arr(rng, (h,))

    def steps(v):  # (b, l, ...) -> (b, c, K, ...) float64, zero past the end
        v = f64(v)
        return np.pad(v, [(0, 0), (0, nc * K - l)] + [(0, 0)] * (v.ndim - 2)).reshape(b, nc, K, *v.shape[2:])

    def heads(v):  # (b, c, g, K, r p) -> (b, c, K, h, p)
        return f64(v).reshape(b, nc, g, K, r, p).transpose(0, 1, 3, 2, 4, 5).reshape(b, nc, K, h, p)
    xk, dyk, dtk, ac = steps(x), steps(dy), steps(dtv)[..., None], f64(acs)[..., None]
    ws = np.exp(ac[:, :, -1:] - ac)
    dX = heads(dXw) * ws + f64(dXd)
    sw = (heads(dXw) * dtk * xk * ws).sum(-1)
    want = {"dx": (dX * dtk + f64(D)[:, None] * dyk).reshape(b, nc * K, h, p)[:, :l],
            "ra": (dyk * np.exp(ac) * heads(CH)).sum(-1) - sw, "rw": sw,
            "rx": (dX * xk).sum(-1), "rd": (dyk * xk).sum(-1)}
    return (x, dy, dtv, acs, CH, dXw, dXd, D), want


NAMES = ("dx", "ra", "rw", "rx", "rd")
CASES = [  # dtype of x, of CH / dXw; b, l, h, g, p, K
    ("bf16", "bf16", 1, 40, 4, 1, 64, 32),    # 8 lanes per row, L not whole chunks
    ("bf16", "f32", 2, 20, 4, 2, 64, 16),     # CH / dXw float32 (float4 loads), two heads per group
    ("bf16", "bf16", 1, 10, 3, 1, 64, 16),    # idle lanes in the last group (48 rows of 8 lanes)
    ("fp16", "fp16", 1, 50, 2, 2, 32, 32),    # 4 lanes per row, one head per group of two
    ("f32", "f32", 1, 24, 2, 1, 32, 16),      # float32 x (float4 loads everywhere)
    ("bf16", "bf16", 1, 20, 2, 2, 24, 16),    # 1 lane per row over three runs of 8
    ("bf16", "bf16", 1, 30, 4, 2, 12, 16),    # 12: single elements over 8 lanes
    ("f32", "bf16", 1, 18, 2, 1, 12, 16),     # 12, float32 x, CH / dXw bf16
]


def run_fin(args, vec):
    kern.FIN_VEC = vec
    with emulate.patch(kern, poison=True):
        return kern.bwd_finish(*args)


@pytest.mark.parametrize("dt,cdt,b,l,h,g,p,K", CASES)
def test_finish_matches_float64_in_both_lane_layouts(monkeypatch, dt, cdt, b, l, h, g, p, K):
    """Both layouts against float64 numpy (dx within its dtype's rounding: bf16 1e-2, fp16 2e-3, float32
    1e-5; the sums within 1e-5), each other (dx equal, the sums within 1e-5, summed in another order),
    padded steps' sums zero, every output written (poisoned outputs)."""
    monkeypatch.setattr(kern, "FIN_VEC", True)
    rng = np.random.default_rng(l + p + h)
    args, want = fin_case(rng, DT[dt], DT[cdt], b, l, h, g, p, K)
    vec, _ = kern.fin_lanes(p)
    assert vec == (p % 8 == 0)
    got = run_fin(args, True)
    old = run_fin(args, False)
    tol = {"bf16": 1e-2, "fp16": 2e-3, "f32": 1e-5}[dt]
    for name, gv, ov in zip(NAMES, got, old):
        w = mx.array(want[name].astype(np.float32))
        assert gv.shape == w.shape and gv.dtype == (args[0].dtype if name == "dx" else mx.float32), name
        assert rel_err(gv, w) <= (tol if name == "dx" else 1e-5), (name, rel_err(gv, w))
        assert rel_err(gv, ov) <= (0.0 if name == "dx" else 1e-5), (name, rel_err(gv, ov))
    if l % K:  # steps past the end: all four sums zero
        for v in got[1:]:
            assert not np.array(v.reshape(b, -1, h)[:, l:]).any()


def test_lane_layout_per_head_dim(monkeypatch):
    """8-element runs over the largest power of two lanes (at most 32) dividing P / 8; 8 lanes of single
    elements for other head dims or with FIN_VEC off."""
    monkeypatch.setattr(kern, "FIN_VEC", True)
    assert [kern.fin_lanes(p) for p in (64, 32, 24, 128, 512, 12, 4)] == [
        (True, 8), (True, 4), (True, 1), (True, 16), (True, 32), (False, 8), (False, 8)]
    monkeypatch.setattr(kern, "FIN_VEC", False)
    assert kern.fin_lanes(64) == (False, 8)
