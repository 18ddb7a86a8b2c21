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


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("rows,D", [(13, 64), (70, 256)])
def test_add_rms_norm_kernels_match_two_ops(monkeypatch, dt, rows, D):
    """The residual add fused in front of the norm (ADD_FWD / ADD_BWD, and `add_rms_norm(impl="kernel")`
    through its differentiable wrapper) == (x + r, mx.fast.rms_norm(x + r)) and their autodiff, with
    cotangents on both outputs (hs's own reaches both addends with the norm's)."""
    rng = np.random.default_rng(rows * D)
    dtype = DTYPES[dt]
    x, r = arr(rng, (rows, D), dtype, 2.0), arr(rng, (rows, D), dtype)
    w = arr(rng, (D,), dtype)
    dhs, dy = arr(rng, (rows, D), dtype), arr(rng, (rows, D), dtype)
    eps = 1e-5

    def two_ops(x, r, w):
        hs = x + r
        return [hs, mx.fast.rms_norm(hs, w, eps)]
    want, want_g = two_ops(x, r, w), mx.vjp(two_ops, [x, r, w], [dhs, dy])[1]
    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    norm_ops._add_rms_kernel.cache_clear()
    with emulate.patch(kern, poison=True):
        hs, y = kern.add_rms_norm(x, r, w, eps)
        d, dw = kern.add_rms_norm_vjp(hs, w, eps, dhs, dy)
        got_op = norm_ops.add_rms_norm(x, r, w, eps, impl="kernel")
        got_g = mx.vjp(lambda *a: list(norm_ops.add_rms_norm(*a, eps, impl="kernel")), [x, r, w], [dhs, dy])[1]
    norm_ops._add_rms_kernel.cache_clear()
    pairs = [("hs", hs, want[0]), ("y", y, want[1]), ("dx", d, want_g[0]), ("dw", dw, want_g[2]),
             ("hs (op)", got_op[0], want[0]), ("y (op)", got_op[1], want[1])]
    pairs += [(f"grad {n} (op)", g, wg) for n, g, wg in zip("xrw", got_g, want_g)]
    for name, got, want_v in pairs:
        assert got.shape == want_v.shape and got.dtype == want_v.dtype, name
        assert rel_err(got, want_v) <= TOL[dt], (name, rel_err(got, want_v))


@pytest.mark.parametrize("ffn", ["mlp", "none"])
def test_stack_with_fused_add_norm_matches_unfused(monkeypatch, ffn):
    """A hybrid stack on the emulated norm kernels (faked GPU backend): the residual adds carried into
    the next norm (`alloy.layers.stack.FUSED_ADD_NORM`) give the logits and every parameter gradient
    of the unfused order (add, then norm)."""
    from alloy.layers import stack
    from alloy.model import build

    cfg = {"name": "m", "vocab_size": 61, "d_model": 64, "layer_types": ["mamba2", "attention", "mamba2"],
           "ffn_types": [ffn] * 3, "dtype": "float32", "tie_embeddings": True,
           "mixers": {"mamba2": {"d_state": 16, "head_dim": 16}, "attention": {"n_heads": 4, "n_kv_heads": 2}},
           **({"ffns": {"mlp": {"d_ff": 128}}} if ffn == "mlp" else {})}
    tokens = mx.array(np.random.default_rng(2).integers(0, 61, (2, 12)))

    def run(fused):
        monkeypatch.setattr(stack, "FUSED_ADD_NORM", fused)
        m = build(cfg)  # make_apply reads the switch
        params = m.init(mx.random.key(4))
        loss = lambda p: m.apply(p, tokens)[0].astype(mx.float32).square().mean()  # noqa: E731
        return m.apply(params, tokens)[0], mx.grad(loss)(params)

    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    norm_ops._rms_kernel.cache_clear()
    norm_ops._add_rms_kernel.cache_clear()
    calls = []
    real = kern.add_rms_norm
    monkeypatch.setattr(kern, "add_rms_norm", lambda *a: calls.append(1) or real(*a))
    # every other kernel path off: only the norms (plain, fused and Mamba-2's gated) run as kernels
    from alloy.layers import mlp
    monkeypatch.setattr(importlib.import_module("alloy.ops.ssd"), "kernel_applies", lambda *a: False)
    monkeypatch.setattr(importlib.import_module("alloy.ops.conv"), "kernel_applies", lambda *a: False)
    monkeypatch.setattr(mlp, "FUSED_GATE", False)
    monkeypatch.setattr(importlib.import_module("alloy.layers.attention"), "ROPE_KERNEL", False)
    with emulate.patch(kern, poison=True):
        y1, g1 = run(True)
        n_fused = len(calls)
        y0, g0 = run(False)
    norm_ops._rms_kernel.cache_clear()
    norm_ops._add_rms_kernel.cache_clear()
    assert n_fused > 0 and len(calls) == n_fused
    assert rel_err(y1, y0) <= 1e-5
    from mlx.utils import tree_flatten
    for (name, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g0)):
        assert rel_err(a, b) <= 1e-4, (name, rel_err(a, b))
