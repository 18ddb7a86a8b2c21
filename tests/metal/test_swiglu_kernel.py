"""The SwiGLU kernels (`alloy.metal.swiglu`) on the CPU emulator against the MLX form they replace
(`swiglu(fused=True)` off the GPU: float32 inside, written-out gradient), and that form's gradient
against autodiff. Element counts with and without eight-element vectors, fp32 and bf16."""
import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import swiglu as kern
from alloy.ops import swiglu

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 64), (2, 7, 9), (1, 300, 24)])
def test_swiglu_kernels_match_mlx_form(dtype, shape):
    g = (mx.random.normal(shape, key=mx.random.key(0)) * 3).astype(dtype)
    u = mx.random.normal(shape, key=mx.random.key(1)).astype(dtype)
    dy = mx.random.normal(shape, key=mx.random.key(2)).astype(dtype)
    want_h = swiglu(g, u, fused=True)
    _, (want_dg, want_du) = mx.vjp(lambda g, u: swiglu(g, u, fused=True), [g, u], [dy])
    with emulate.patch(kern, poison=True):
        h = kern.swiglu(g, u)
        dg, du = kern.swiglu_vjp(g, u, dy)
    # both compute in float32 and round once: equal up to one rounding of the output dtype
    tol = 1e-6 if dtype == mx.float32 else 8e-3
    for name, got, want in (("h", h, want_h), ("dgate", dg, want_dg), ("dup", du, want_du)):
        assert got.shape == want.shape and got.dtype == dtype, name
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)),
                                   rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 128), (2, 7, 18), (1, 300, 48)])
def test_packed_swiglu_kernels_match_the_halves(dtype, shape):
    """gu (..., 2F) with gate and up side by side: the packed kernels == swiglu(fused=True) of the two
    halves, and the gradient comes back in gu's layout (dgate | dup). F = 64, 9 (no vectors), 24."""
    gu = (mx.random.normal(shape, key=mx.random.key(3)) * 3).astype(dtype)
    dy = mx.random.normal((*shape[:-1], shape[-1] // 2), key=mx.random.key(4)).astype(dtype)
    g, u = mx.split(gu, 2, axis=-1)
    want_h = swiglu(g, u, fused=True)
    _, (want_dg, want_du) = mx.vjp(lambda g, u: swiglu(g, u, fused=True), [g, u], [dy])
    with emulate.patch(kern, poison=True):
        h = kern.swiglu_packed(gu)
        (dgu,) = kern.swiglu_packed_vjp(gu, dy)
    tol = 1e-6 if dtype == mx.float32 else 8e-3
    want_dgu = mx.concatenate([want_dg, want_du], axis=-1)
    for name, got, want in (("h", h, want_h), ("dgu", dgu, want_dgu)):
        assert got.shape == want.shape and got.dtype == dtype, name
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)),
                                   rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("bias", [False, True])
def test_mlp_with_stacked_gate_up_equals_two_projections(monkeypatch, bias):
    """The MLP's packed path (one matmul against [W_gate; W_up], the packed kernels, behind a faked GPU
    backend on the emulator) == the two-projection path: output and every parameter's gradient."""
    import alloy.metal as metal
    from alloy.layers import mlp

    cfg = mlp.MLPSettings(d_model=32, d_ff=64, bias=bias)
    params = mlp.init(mx.random.key(5), cfg)
    x = mx.random.normal((2, 600, 32), key=mx.random.key(6))
    ct = mx.random.normal((2, 600, 32), key=mx.random.key(7))

    def run(packed):
        monkeypatch.setattr(mlp, "PACKED_GATE_UP", packed)
        y = mlp.apply(params, x, None, cfg)[0]
        return y, mx.grad(lambda p, x: (mlp.apply(p, x, None, cfg)[0] * ct).sum(), argnums=(0, 1))(params, x)

    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    monkeypatch.setattr(metal, "PACK_INPUTS", False)
    from alloy.ops import activations
    activations._swiglu_kernel.cache_clear()
    activations._swiglu_packed_kernel.cache_clear()
    with emulate.patch(kern, poison=True):
        y1, (g1, dx1) = run(True)
        y0, (g0, dx0) = run(False)
    activations._swiglu_kernel.cache_clear()
    activations._swiglu_packed_kernel.cache_clear()
    np.testing.assert_allclose(np.array(y1), np.array(y0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(dx1), np.array(dx0), rtol=1e-4, atol=1e-4)
    for name in ("gate_proj", "up_proj", "down_proj"):
        for leaf in g0[name]:
            np.testing.assert_allclose(np.array(g1[name][leaf]), np.array(g0[name][leaf]), rtol=1e-4, atol=1e-4,
                                       err_msg=f"{name}.{leaf}")
