"""The SSD gradient's finishing pass (`alloy.metal.ssd_chunked.BWD_FIN` / `bwd_finish`) on the GPU
(`pytest -m gpu`; skipped where no CUDA/Metal device): its 8-element-run lanes (switch `FIN_VEC` on)
against its single-element lanes (off) and float64 numpy, at the toy layer's per-head shape (24 heads of
64, chunk 128, bf16; T 500: not whole chunks) and at head dim 32 with float32 CH / dXw. The emulator
tests are tests/metal/test_ssd_finish_vec.py."""
import mlx.core as mx
import numpy as np
import pytest

from alloy import metal
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import arr, f64, pos, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")]


@pytest.mark.parametrize("p,cdt", [(64, mx.bfloat16), (32, mx.float32)])
def test_vector_lanes_match_the_scalar_lanes_and_float64(monkeypatch, p, cdt):
    """dx within bf16 rounding (1e-2) of float64 and of the other layout; the four sums within 1e-4."""
    rng = np.random.default_rng(p)
    b, l, h, g, K = 2, 500, 24, 1, 128
    nc = -(-l // K)
    x, dy = arr(rng, (b, l, h, p), mx.bfloat16), arr(rng, (b, l, h, p), mx.bfloat16)
    dtv, A = pos(rng, (b, l, h), 0.01, 0.6), -pos(rng, (h,), 0.3, 3.0)
    acs = mx.cumsum(mx.pad(dtv, [(0, 0), (0, nc * K - l), (0, 0)]).reshape(b, nc, K, h) * A, axis=2)
    CH, dXw = arr(rng, (b, nc, g, K, h * p), cdt), arr(rng, (b, nc, g, K, h * p), cdt)
    dXd, D = arr(rng, (b, nc, K, h, p)), arr(rng, (h,))
    args = (x, dy, dtv, acs, CH, dXw, dXd, D)
    monkeypatch.setattr(kern, "FIN_VEC", True)
    got = kern.bwd_finish(*args)
    monkeypatch.setattr(kern, "FIN_VEC", False)
    old = kern.bwd_finish(*args)

    def steps(v):
        v = f64(v)
        return np.pad(v, [(0, 0), (0, nc * K - l)] + [(0, 0)] * (v.ndim - 2)).reshape(b, nc, K, *v.shape[2:])
    xk, dyk, dtk, ac = steps(x), steps(dy), steps(dtv)[..., None], f64(acs)[..., None]
    ws = np.exp(ac[:, :, -1:] - ac)
    chh, dxw = f64(CH).reshape(b, nc, K, h, p), f64(dXw).reshape(b, nc, K, h, p)
    dX = dxw * ws + f64(dXd)
    sw = (dxw * dtk * xk * ws).sum(-1)
    want = ((dX * dtk + f64(D)[:, None] * dyk).reshape(b, nc * K, h, p)[:, :l],
            (dyk * np.exp(ac) * chh).sum(-1) - sw, sw, (dX * xk).sum(-1), (dyk * xk).sum(-1))
    for name, a, o, w in zip(("dx", "ra", "rw", "rx", "rd"), got, old, want):
        tol = 1e-2 if name == "dx" else 1e-4
        assert a.shape == o.shape and a.dtype == o.dtype, name
        assert rel_err(a, o) <= tol, (name, rel_err(a, o))
        assert rel_err(a, mx.array(w.astype(np.float32))) <= tol, name
