"""`swiglu(fused=True)` (float32 inside, written-out gradient) against autodiff of silu(gate) * up,
and the MLP's switch to it (`alloy.layers.mlp.FUSED_GATE`)."""
import mlx.core as mx
import numpy as np
import pytest

from alloy.ops import swiglu


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-6), (mx.bfloat16, 2e-2)])
def test_fused_swiglu_values_and_gradients(dtype, tol):
    g = (mx.random.normal((3, 5, 64), key=mx.random.key(0)) * 3).astype(dtype)
    u = mx.random.normal((3, 5, 64), key=mx.random.key(1)).astype(dtype)
    ct = mx.random.normal((3, 5, 64), key=mx.random.key(2)).astype(dtype)
    ref = lambda g, u: swiglu(g.astype(mx.float32), u.astype(mx.float32))  # noqa: E731  (float32 reference)
    y = swiglu(g, u, fused=True)
    assert y.dtype == dtype
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), np.array(ref(g, u)), rtol=tol, atol=tol)
    _, got = mx.vjp(lambda g, u: swiglu(g, u, fused=True), [g, u], [ct])
    _, want = mx.vjp(ref, [g, u], [ct.astype(mx.float32)])
    for a, b in zip(got, want):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), rtol=tol, atol=tol)


def test_mlp_fused_gate_switch(monkeypatch):
    from alloy.layers import mlp
    cfg = mlp.MLPSettings(d_model=16, d_ff=32)
    params = mlp.init(mx.random.key(3), cfg)
    x = mx.random.normal((2, 7, 16), key=mx.random.key(4))
    f = lambda p, x: (mlp.apply(p, x, None, cfg)[0] ** 2).sum()  # noqa: E731
    want = mx.value_and_grad(f, argnums=(0, 1))(params, x)
    monkeypatch.setattr(mlp, "_fused_gate", lambda: True)  # as on a GPU (the MLX-ops form here)
    calls = []
    real = mlp.swiglu
    monkeypatch.setattr(mlp, "swiglu", lambda *a, **k: calls.append(k) or real(*a, **k))
    got = mx.value_and_grad(f, argnums=(0, 1))(params, x)
    assert calls == [{"fused": True}]
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    np.testing.assert_allclose(np.array(got[1][1]), np.array(want[1][1]), rtol=1e-4, atol=1e-6)
    for k in ("gate_proj", "up_proj", "down_proj"):
        np.testing.assert_allclose(np.array(got[1][0][k]["weight"]), np.array(want[1][0][k]["weight"]),
                                   rtol=1e-4, atol=1e-6, err_msg=k)
