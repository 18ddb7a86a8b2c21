"""The tensor-core chunked gated delta rule (`alloy.metal.gated_delta_wy`) on the CPU emulator:
its chunk-local prep kernel against the MLX chunked form's `_chunk_local`, and the whole forward
(prep + state pass + output matmuls) against the sequential reference, in float32 (the loop form of
the tile products: exact up to summation order) and bfloat16 (every product operand rounded once).
The GPU run of the same launchers is in tests/metal/test_kernels_gpu.py."""
import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import gated_delta_wy as wy
from alloy.metal.testing import DTYPES, arr, pos, rel_err
from alloy.ops.gated_delta import _chunk_local, gated_delta_ref

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")


def case(rng, dt, B=1, T=100, Hk=1, H=2, V=32, state=True):
    dtype = DTYPES[dt]
    q, k = arr(rng, (B, T, Hk, wy.KD), dtype), arr(rng, (B, T, Hk, wy.KD), dtype)
    v = arr(rng, (B, T, H, V), dtype)
    g = -pos(rng, (B, T, H), 0.01, 0.5)
    beta = pos(rng, (B, T, H), 0.05, 0.95)
    s0 = arr(rng, (B, H, wy.KD, V)) if state else mx.zeros((B, H, wy.KD, V))
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("dt,l2", [("f32", True), ("bf16", False)])
def test_prep_matches_chunk_local(dt, l2):
    rng = np.random.default_rng(0)
    q, k, v, g, beta, _ = case(rng, dt, T=70, Hk=1, H=2)
    if not l2:
        q, k = q * wy.KD ** -0.5, k * wy.KD ** -0.5
    with emulate.patch(wy, poison=True):
        w, u, kd, qd, attn, dlast = wy.prep(q, k, v, g, beta, l2)
    q_dec, k_dec, w_r, u_r, attn_r, last = _chunk_local(q, k, v, g, beta, l2, wy.CH)
    tol = 1e-5 if dt == "f32" else 3e-2
    for got, want in [(w, w_r), (u, u_r), (kd, k_dec), (qd, q_dec), (attn, attn_r)]:
        assert got.shape == want.shape and got.dtype == q.dtype
        assert rel_err(got, want) <= tol
    assert rel_err(dlast, mx.exp(last[..., 0])) <= 1e-5


@pytest.mark.parametrize("dt,B,T,Hk,H,V,state", [("f32", 1, 100, 1, 2, 32, True),
                                                   ("bf16", 2, 64, 2, 2, 64, False),
                                                   ("bf16", 1, 130, 1, 2, 32, True)])
def test_forward_matches_reference(dt, B, T, Hk, H, V, state):
    rng = np.random.default_rng(1)
    q, k, v, g, beta, s0 = case(rng, dt, B, T, Hk, H, V, state)
    with emulate.patch(wy, poison=True):
        o, s = wy.gated_delta_wy(q, k, v, g, beta, s0)
    orf, sr = gated_delta_ref(q, k, v, g, beta, s0)
    tol = 1e-4 if dt == "f32" else 3e-2
    assert o.dtype == v.dtype and s.dtype == mx.float32
    assert rel_err(o, orf) <= tol and rel_err(s, sr) <= tol


def test_applies():
    rng = np.random.default_rng(2)
    q, k, v, g, beta, _ = case(rng, "bf16")
    assert wy.applies(q, k, v, g)
    assert not wy.applies(q.astype(mx.float32), k, v, g)
    assert not wy.applies(q, k, v, mx.stack([g] * wy.KD, -1))
    assert not wy.applies(q[..., :64], k[..., :64], v, g)
    big = mx.zeros((1, 2**20, 32, wy.KD), mx.bfloat16)  # lazy, never evaluated: 2^32 elements per input
    assert not wy.applies(big, big, big, mx.zeros((1, 2**20, 32)))
