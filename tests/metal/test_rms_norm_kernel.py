"""The plain RMSNorm kernels (`alloy.metal.gated_norm` with GATE false) on the CPU emulator against
``mx.fast.rms_norm`` and its autodiff; ``rms_norm(impl="kernel")`` through the differentiable
wrapper behind a faked GPU backend. Rows not a multiple of the rows per warp / group, D with and
without 16-byte vectors, fp32 and bf16."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

import alloy.metal as metal
from alloy.metal import emulate
from alloy.metal import gated_norm as kern
from alloy.metal.testing import DTYPES, arr, rel_err

norm_ops = importlib.import_module("alloy.ops.norm")

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")
TOL = {"f32": 1e-5, "bf16": 2e-2}


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("rows,D", [(13, 64), (3, 768), (70, 256), (600, 256)])  # 600: dw shares summed in two passes
def test_plain_rms_norm_kernels_match_mlx(monkeypatch, dt, rows, D):
    rng = np.random.default_rng(rows + D)
    dtype = DTYPES[dt]
    x = arr(rng, (rows, D), dtype, 2.0)
    w = arr(rng, (D,), dtype)
    dy = arr(rng, (rows, D), dtype)
    eps = 1e-5
    want_y, (want_dx, want_dw) = mx.fast.rms_norm(x, w, eps), mx.vjp(
        lambda x, w: [mx.fast.rms_norm(x, w, eps)], [x, w], [dy])[1]
    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    norm_ops._rms_kernel.cache_clear()
    with emulate.patch(kern, poison=True):
        y = kern.rms_norm(x, w, eps)
        dx, dw = kern.rms_norm_vjp(x, w, eps, dy)
        y_op, (dx_op, dw_op) = norm_ops.rms_norm(x, w, eps, impl="kernel"), mx.vjp(
            lambda x, w: [norm_ops.rms_norm(x, w, eps, impl="kernel")], [x, w], [dy])[1]
    norm_ops._rms_kernel.cache_clear()
    for name, got, want in (("y", y, want_y), ("dx", dx, want_dx), ("dw", dw, want_dw),
                            ("y (op)", y_op, want_y), ("dx (op)", dx_op, want_dx), ("dw (op)", dw_op, want_dw)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert rel_err(got, want) <= TOL[dt], (name, rel_err(got, want))


def test_kernel_impl_is_refused_without_a_gpu():
    x = mx.ones((2, 64))
    with pytest.raises(ValueError, match="impl='kernel' needs a GPU"):
        norm_ops.rms_norm(x, mx.ones((64,)), impl="kernel")


@pytest.mark.parametrize("R", [1, 64, 80, 97, 4096, 2048 + 8])
def test_sum_rows_equals_one_reduction(R):
    """`sum_rows` (two column reductions where R has a divisor >= 8) == one sum over rows; R prime or
    small: one reduction."""
    from alloy.metal.prelude import sum_rows

    v = np.random.default_rng(R).standard_normal((R, 3, 40)).astype(np.float32)
    np.testing.assert_allclose(np.array(sum_rows(mx.array(v))), v.sum(0, dtype=np.float64), rtol=1e-5, atol=1e-4)
