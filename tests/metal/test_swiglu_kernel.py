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
