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


# ---------------------------------------------------------------- the pipelined gradient (BWD_PIPE)
# (D, G, PIPE_COLS): the row split SPL and the group exchange each gives (`kern._pipe_split`)
PIPE_CASES = [
    (256, None, 8),    # 8 columns per lane, one chunk: SPL 1
    (768, None, 8),    # one group over 3 warps (statistics exchanged in shared memory): SPL 3
    (512, 256, 8),     # one whole group per warp: SPL 2, no exchange
    (1536, 768, 8),    # two groups, each over 3 of the 6 warps
    (256, 64, 8),      # one column per lane (G not a multiple of 256), 4 groups per lane: SPL 1
    (256, 128, 2),     # one column per lane, a group over 2 of the 4 warps
    (96, 32, 64),      # three groups per lane, SPL 1
    (96, None, 1),     # one column per warp's lane, SPL 3
]
# (norm_before_gate, PIPE_PREFETCH, PIPE_KEEP_SIG, dtype)
PIPE_OPTS = [(False, True, True, "bf16"), (True, True, False, "f32"), (False, False, False, "f32"),
             (True, False, True, "bf16")]


def _pipe(monkeypatch, cols, prefetch=True, ksg=True, rows=8, warps=8, on=True):
    monkeypatch.setattr(kern, "BWD_PIPE", on)
    monkeypatch.setattr(kern, "PIPE_COLS", cols)
    monkeypatch.setattr(kern, "PIPE_PREFETCH", prefetch)
    monkeypatch.setattr(kern, "PIPE_KEEP_SIG", ksg)
    monkeypatch.setattr(kern, "PIPE_ROWS", rows)
    monkeypatch.setattr(kern, "PIPE_WARPS", warps)


@pytest.mark.parametrize("opts", PIPE_OPTS)
@pytest.mark.parametrize("D,G,cols", PIPE_CASES)
def test_pipelined_gated_norm_gradient_matches_ref_and_old_kernel(monkeypatch, D, G, cols, opts):
    """BWD_PIPE_K (rows split over SPL warps, the next row's loads in flight or not, sigmoid kept or
    recomputed) == the autodiff of `gated_rms_norm_ref` and the per-warp BWD kernel, for 37 rows
    (ragged against the 8 rows per group and the rows per team), both gate positions."""
    nbg, prefetch, ksg, dt = opts
    Gv = D if G is None else G
    assert kern._pipe_split(D, Gv, 8 if Gv % 256 == 0 else 1) is not None
    rng = np.random.default_rng(D + cols)
    dtype = DTYPES[dt]
    x, z, w, dy = arr(rng, (37, D), dtype), arr(rng, (37, D), dtype), arr(rng, (D,), dtype), arr(rng, (37, D), dtype)
    _, want = mx.vjp(lambda x, z, w: norm_ops.gated_rms_norm_ref(x, z, w, 1e-5, G, nbg), [x, z, w], [dy])
    calls = []
    with emulate.patch(kern, poison=True):
        real = kern.BWD_PIPE_K  # the emulated kernel, counted (emulate.patch puts the real one back)
        kern.BWD_PIPE_K = lambda *a, **k: calls.append(1) or real(*a, **k)
        _pipe(monkeypatch, cols, prefetch, ksg)
        got = kern.gated_rms_norm_vjp(x, z, w, 1e-5, G, nbg, dy)
        monkeypatch.setattr(kern, "BWD_PIPE", False)
        old = kern.gated_rms_norm_vjp(x, z, w, 1e-5, G, nbg, dy)
    assert calls == [1]
    for name, g, r, o in zip(("dx", "dz", "dw"), got, want, old):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert rel_err(g, r) <= 3 * TOL[dt], (name, rel_err(g, r))
        assert rel_err(g, o) <= (1e-5 if dt == "f32" else 1e-2), (name, rel_err(g, o))


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("D,cols,prefetch", [(768, 8, True), (768, 24, False), (96, 8, True), (64, 1, False)])
def test_pipelined_plain_and_add_norm_gradients_match_mlx(monkeypatch, add, D, cols, prefetch):
    """ADD_BWD_PIPE_K / BWD_PIPE_K without a gate (a plain RMSNorm's gradient, with and without the
    residual add's cotangent) == mx.fast.rms_norm's autodiff, 45 rows (ragged), bf16."""
    rng = np.random.default_rng(D + cols)
    dtype = DTYPES["bf16"]
    x, w = arr(rng, (45, D), dtype, 2.0), arr(rng, (D,), dtype)
    dhs, dy = arr(rng, (45, D), dtype), arr(rng, (45, D), dtype)
    _, (want_dx, want_dw) = mx.vjp(lambda x, w: [mx.fast.rms_norm(x, w, 1e-5)], [x, w], [dy])
    if add:
        want_dx = want_dx + dhs
    with emulate.patch(kern, poison=True):
        _pipe(monkeypatch, cols, prefetch, rows=16, warps=4)
        dx, dw = (kern.add_rms_norm_vjp(x, w, 1e-5, dhs, dy) if add else kern.rms_norm_vjp(x, w, 1e-5, dy))
    for name, got, want in (("dx", dx, want_dx), ("dw", dw, want_dw)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert rel_err(got, want) <= TOL["bf16"], (name, rel_err(got, want))


def test_pipe_split_choices():
    """The toy shapes' splits (D 1536 gated: 6 warps of 8 columns; D 768: 3), the fallback where no
    split fits (the per-warp kernel runs)."""
    assert kern._pipe_split(1536, 1536, 8) == 6 and kern._pipe_split(768, 768, 8) == 3
    assert kern._pipe_split(1536, 768, 8) == 6 and kern._pipe_split(96, 32, 1) == 1
    assert kern._pipe_split(32 * 8 * 64, 32 * 8 * 64, 8) is None


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_pipelined_gradient_barriers_under_serial_schedules(monkeypatch, schedule):
    """One thread at a time, switching only at barriers (forward / reverse thread order): the group
    statistics exchanged between a row's warps (two rows in flight in the parity buffers) and the
    teams' dw sum are ordered by barriers, not by luck. D 768 over 3 warps, 2 teams, 21 rows."""
    rng = np.random.default_rng(3)
    x, z, w, dy = arr(rng, (21, 768)), arr(rng, (21, 768)), arr(rng, (768,)), arr(rng, (21, 768))
    _, want = mx.vjp(lambda x, z, w: norm_ops.gated_rms_norm_ref(x, z, w, 1e-5, None, False), [x, z, w], [dy])
    with emulate.patch(kern, poison=True, schedule=schedule):
        _pipe(monkeypatch, 8, rows=8, warps=6)
        got = kern.gated_rms_norm_vjp(x, z, w, 1e-5, None, False, dy)
    for name, g, r in zip(("dx", "dz", "dw"), got, want):
        assert rel_err(g, r) <= 3 * TOL["f32"], (name, rel_err(g, r))
