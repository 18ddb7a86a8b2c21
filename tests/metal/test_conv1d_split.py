"""`alloy.ops.conv.causal_conv1d_split` on its kernel path, with the split kernels
(`alloy.metal.conv1d.KERNEL_SPLIT` / `BWD_SPLIT`) run on the CPU emulator behind a faked GPU backend:
the three outputs, the new state and the gradients against the reference path (`causal_conv1d_ref`
then `mx.split`), and bit for bit against the unsplit kernels (the same arithmetic); the reference
path on the CPU; the widths check. Skipped where no g++ is available."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

import alloy.metal as metal
from alloy.metal import conv1d as conv_mod
from alloy.metal import emulate
from alloy.metal.testing import DTYPES, arr, rel_err

conv_ops = importlib.import_module("alloy.ops.conv")  # alloy.ops re-exports a function of this name

TOL = {"f32": 1e-5, "bf16": 2e-2}  # as tests/metal/test_emulate.py: summation order; bf16: one rounding


@pytest.fixture
def emulated(monkeypatch):
    """The kernel path on the CPU: a faked CUDA backend for the dispatch, the conv kernels emulated
    (unwritten output elements are NaN)."""
    if not emulate.available():
        pytest.skip("no g++ for the CPU kernel emulator")
    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    with emulate.patch(conv_mod, poison=True):
        yield


def case(seed, dt, T, widths, K=4, B=2, state=True, bias=True):
    rng = np.random.default_rng(seed)
    dtype, C = DTYPES[dt], sum(widths)
    x, w = arr(rng, (B, T, C), dtype), arr(rng, (C, K), dtype, 0.5)
    b = arr(rng, (C,), dtype) if bias else None
    s = arr(rng, (B, K - 1, C), dtype) if state else None
    cts = [arr(rng, (B, T, c), dtype) for c in widths] + [arr(rng, (B, K - 1, C), dtype)]
    return x, w, b, s, cts


def vjp(op, x, w, b, s, cts):
    """mx.vjp of op(x, w, b, s) -> list of outputs w.r.t. the given (not None) arguments."""
    given = [a is not None for a in (x, w, b, s)]

    def f(*a):
        it = iter(a)
        return op(*(next(it) if g else None for g in given))
    return mx.vjp(f, [a for a in (x, w, b, s) if a is not None], cts)


def split_vjp(impl, x, w, b, s, cts, act, widths):
    """Outputs and the gradients w.r.t. every given argument of causal_conv1d_split(impl=impl)."""
    def op(*a):
        ys, ns = conv_ops.causal_conv1d_split(*a, act, widths=widths, impl=impl)
        return [*ys, ns]
    return vjp(op, x, w, b, s, cts)


@pytest.mark.parametrize("dt,T,widths,silu,state,bias", [
    ("f32", 19, (5, 3, 9), True, True, True),      # T not a multiple of the (16-step, small launch) tile
    ("bf16", 19, (5, 3, 9), True, False, True),    # no state: zeros
    ("f32", 2, (5, 3, 9), False, True, False),     # T < K - 1: the new state keeps part of the old
    ("bf16", 40, (1, 130, 9), False, True, True),  # two groups of channels; a boundary inside the second
    ("f32", 1, (16, 8, 8), True, True, True),      # one step (decode)
    ("bf16", 33, (64, 32, 32), True, True, False), # eight channels per thread
    ("f32", 2, (8, 8, 16), True, True, True),      # eight per thread, T < K - 1
    ("bf16", 21, (1000, 32, 24), False, True, True),  # two groups of threads, a boundary inside each
])
def test_split_kernels_match_reference_and_unsplit(emulated, dt, T, widths, silu, state, bias):
    x, w, b, s, cts = case(0, dt, T, widths, state=state, bias=bias)
    act = "silu" if silu else None
    (out, grads), (out_r, grads_r) = (split_vjp(i, x, w, b, s, cts, act, widths) for i in ("kernel", "ref"))
    for o, r in zip(out, out_r):
        assert o.shape == r.shape and o.dtype == r.dtype
    for o, r in zip(out[:3], out_r[:3]):
        assert rel_err(o, r) <= TOL[dt]
    assert rel_err(out[3], out_r[3]) == 0.0  # the new state is a shift of inputs
    for i, (g, r) in enumerate(zip(grads, grads_r)):
        assert g.shape == r.shape and g.dtype == r.dtype, i
        assert rel_err(g, r) <= TOL[dt], f"gradient of argument {i}: {rel_err(g, r):.3g}"
    # the unsplit kernel with the concatenated cotangent: the same numbers bit for bit
    out_u, grads_u = vjp(lambda *a: list(conv_ops.causal_conv1d(*a, act, impl="kernel")), x, w, b, s,
                         [mx.concatenate(cts[:3], axis=-1), cts[3]])
    assert mx.array_equal(mx.concatenate(out[:3], axis=-1), out_u[0]) and mx.array_equal(out[3], out_u[1])
    for g, u in zip(grads, grads_u):
        assert mx.array_equal(g, u)


def tail_vjp(impl, x, w, b, s, cts, act, widths, tail):
    """Outputs and gradients of causal_conv1d_split(impl=impl, tail=tail) (cts: y0, y1, y2, tail, new_state)."""
    def op(*a):
        ys, ns = conv_ops.causal_conv1d_split(*a, act, widths=widths, tail=tail, impl=impl)
        return [*ys, ns]
    return vjp(op, x, w, b, s, cts)


@pytest.mark.parametrize("dt,T,widths,tail,variant,vw", [
    ("f32", 19, (5, 3, 9), 3, "stream", 8),       # one channel per thread, a tail of any width
    ("bf16", 40, (64, 32, 32), 8, "stream", 8),   # eight channels per thread, two tiles of rows
    ("bf16", 40, (64, 32, 32), 8, "pipe", 8),     # the pipe kernels
    ("bf16", 70, (64, 32, 32), 24, "pipe", 4),    # the four-channel pipe gradient; tail of 24 as Mamba-2's dt
    ("f32", 21, (16, 8, 8), 4, "pipe", 4),        # rows of 36 columns: four per thread, not eight
    ("bf16", 2, (8, 8, 16), 8, "pipe", 8),        # T < K - 1
])
def test_split_with_tail_matches_reference(emulated, monkeypatch, dt, T, widths, tail, variant, vw):
    """x with `tail` columns past the conv's channels: the pieces, the passed-through tail, the new state
    and every gradient (the tail's cotangent lands in dx's last columns) as on the reference path; the
    conv part bit for bit the kernels' without a tail (x[..., :C], its own launch)."""
    for name, v in (("FWD_VARIANT", variant), ("BWD_VARIANT", variant), ("BWD_PIPE_VW", vw), ("MIN_ITEMS", 0)):
        monkeypatch.setattr(conv_mod, name, v)
    monkeypatch.setattr(conv_mod, "TILE", 16)
    rng = np.random.default_rng(7)
    C = sum(widths)
    x, w, b, s, cts = case(5, dt, T, widths)
    x = mx.concatenate([x, arr(rng, (2, T, tail), DTYPES[dt])], axis=-1)
    cts = cts[:3] + [arr(rng, (2, T, tail), DTYPES[dt])] + cts[3:]
    (out, grads), (out_r, grads_r) = (tail_vjp(i, x, w, b, s, cts, "silu", widths, tail) for i in ("kernel", "ref"))
    assert [o.shape for o in out] == [(2, T, c) for c in widths] + [(2, T, tail), (2, 3, C)]
    for o, r in zip(out, out_r):
        assert o.dtype == r.dtype and rel_err(o, r) <= TOL[dt]
    assert mx.array_equal(out[3], x[..., C:])
    for i, (g, r) in enumerate(zip(grads, grads_r)):
        assert g.shape == r.shape and g.dtype == r.dtype, i
        assert rel_err(g, r) <= TOL[dt], f"gradient of argument {i}: {rel_err(g, r):.3g}"
    assert mx.array_equal(grads[0][..., C:], cts[3])  # the tail's cotangent, copied
    out_n, grads_n = split_vjp("kernel", mx.contiguous(x[..., :C]), w, b, s, cts[:3] + cts[4:], "silu", widths)
    for o, n in zip(out[:3] + out[4:], out_n):
        assert mx.array_equal(o, n)
    assert mx.array_equal(grads[0][..., :C], grads_n[0])
    for g, n in zip(grads[1:], grads_n[1:]):
        assert mx.array_equal(g, n)


@pytest.mark.parametrize("tail", [-1, 17, 1.0, True])
def test_bad_tail_is_refused(tail):
    x, w, _, _, _ = case(4, "f32", 5, (2, 3, 4))
    x = mx.concatenate([x, x[..., :8]], axis=-1)  # 17 columns
    with pytest.raises(ValueError, match=r"tail must be an int in \[0, 17\)"):
        conv_ops.causal_conv1d_split(x, w, widths=(2, 3, 4), tail=tail)
    with pytest.raises(ValueError, match=r"widths must be three positive ints summing to the 10 channels of x "
                                         r"\(its 17 columns less a tail of 7\)"):
        conv_ops.causal_conv1d_split(x, w, widths=(2, 3, 4), tail=7)


@pytest.mark.parametrize("gradient_kernel", [True, False])
def test_split_gradient_of_unused_pieces(emulated, monkeypatch, gradient_kernel):
    """A loss that reads only some pieces (zero cotangents for the others), with the gradient kernel
    on and off (off: autodiff of the reference), matches the reference path's gradient."""
    monkeypatch.setattr(conv_ops, "GRADIENT_KERNEL", gradient_kernel)
    x, w, b, s, _ = case(1, "f32", 21, (6, 4, 4))

    def loss(impl):
        def f(x, w, b, s):
            (y0, _, y2), ns = conv_ops.causal_conv1d_split(x, w, b, s, "silu", widths=(6, 4, 4), impl=impl)
            return (y0 * y0).sum() + y2.sum() + (ns * ns).sum()
        return mx.grad(f, argnums=(0, 1, 2, 3))(x, w, b, s)
    for g, r in zip(loss("kernel"), loss("ref")):
        assert rel_err(g, r) <= TOL["f32"]


def test_split_launchers_equal_unsplit_launchers():
    """The kernel launchers themselves (no op, no autodiff): split == unsplit bit for bit."""
    if not emulate.available():
        pytest.skip("no g++ for the CPU kernel emulator")
    widths = (5, 3, 9)
    x, w, b, s, cts = case(2, "bf16", 19, widths)
    with emulate.patch(conv_mod, poison=True):
        *ys, ns = conv_mod.causal_conv1d_split(x, w, b, s, True, widths)
        y, ns_u = conv_mod.causal_conv1d(x, w, b, s, True)
        got = conv_mod.causal_conv1d_split_vjp(x, w, b, s, *cts, True, widths)
        want = conv_mod.causal_conv1d_vjp(x, w, b, s, mx.concatenate(cts[:3], axis=-1), cts[3], True)
    assert [a.shape for a in ys] == [(2, 19, c) for c in widths]
    assert mx.array_equal(mx.concatenate(ys, axis=-1), y) and mx.array_equal(ns, ns_u)
    for g, u in zip(got, want):
        assert g.dtype == u.dtype and mx.array_equal(g, u)


def test_reference_path_is_conv_then_split():
    """Without a GPU (this CPU), impl="auto" is the reference: causal_conv1d, then mx.split."""
    x, w, b, s, _ = case(3, "f32", 7, (2, 3, 4))
    ys, ns = conv_ops.causal_conv1d_split(x, w, b, s, "silu", widths=(2, 3, 4))
    y, ns_r = conv_ops.causal_conv1d(x, w, b, s, "silu")
    assert [a.shape for a in ys] == [(2, 7, 2), (2, 7, 3), (2, 7, 4)]
    for a, r in zip(ys, mx.split(y, [2, 5], axis=-1)):
        assert mx.array_equal(a, r)
    assert mx.array_equal(ns, ns_r)


@pytest.mark.parametrize("widths", [(2, 3), (2, 3, 3), (0, 5, 4), (2, 3, 4, 0), (2.0, 3, 4), (True, 4, 4), 9])
def test_bad_widths_are_refused(widths):
    x, w, _, _, _ = case(4, "f32", 5, (2, 3, 4))
    with pytest.raises(ValueError, match=r"widths must be three positive ints summing to the 9 channels.*got"):
        conv_ops.causal_conv1d_split(x, w, widths=widths)


@pytest.mark.parametrize("dt_in_conv", [False, True])
def test_mamba2_layer_with_the_split_kernel(monkeypatch, dt_in_conv):
    """The Mamba-2 layer with its conv on the split kernels (emulated; the rest of the layer on the
    CPU reference paths): output, carried conv state and every gradient as on the reference path;
    dt_in_conv: in_proj as two products, dt passed through the conv (`mamba2.DT_IN_CONV`)."""
    if not emulate.available():
        pytest.skip("no g++ for the CPU kernel emulator")
    from mlx.utils import tree_flatten

    from alloy.layers import mamba2
    real = mamba2.causal_conv1d_split

    def conv_on_kernel(*a, **k):  # only this call sees a GPU backend; its gradient runs the emulated kernel
        with monkeypatch.context() as m:
            m.setattr(metal, "backend", lambda: "cuda")
            return real(*a, impl="kernel", **k)
    cfg = mamba2.Mamba2Settings(d_model=32, d_state=16, head_dim=8, n_groups=2, chunk_size=8)
    params = mamba2.init(mx.random.key(0), cfg)
    x = mx.random.normal((2, 21, 32), key=mx.random.key(1))
    state = {**mamba2.init_state(cfg, 2, 32), "conv": mx.random.normal((2, 3, cfg.conv_dim), key=mx.random.key(2))}

    def loss(p, x):
        y, s = mamba2.apply(p, x, state, cfg)
        return (y * y).sum() + (s["conv"] * s["conv"]).sum() + s["ssm"].sum()
    want = mx.value_and_grad(loss, argnums=(0, 1))(params, x)
    calls = []
    with emulate.patch(conv_mod, poison=True):
        monkeypatch.setattr(mamba2, "causal_conv1d_split", lambda *a, **k: calls.append(k) or conv_on_kernel(*a, **k))
        if dt_in_conv:  # the layer's rule for the fold, as on a GPU, at this small size
            monkeypatch.setattr(mamba2, "conv_kernel_applies", lambda *a: True)
            monkeypatch.setattr(mamba2, "SPLIT_IN_PROJ_MIN_ROWS", 1)
        got = mx.value_and_grad(loss, argnums=(0, 1))(params, x)
    assert calls and all(k.get("tail", 0) == (cfg.n_heads if dt_in_conv else 0) for k in calls)
    assert rel_err(got[0], want[0]) <= TOL["f32"]
    for (name, g), (_, r) in zip(tree_flatten(got[1]), tree_flatten(want[1])):
        assert rel_err(g, r) <= TOL["f32"], name


@pytest.mark.parametrize("widths", [(5, 3, 9), (8, 16, 24)])
@pytest.mark.parametrize("tile,dt,T", [(2, "f32", 9), (6, "bf16", 40), (8, "f32", 16), (64, "bf16", 70)])
def test_tile_lengths(emulated, monkeypatch, tile, widths, dt, T):
    """Tiles of other lengths than the default's (`TILE`; `MIN_ITEMS` 0 keeps it): shorter than
    K - 1 (later tiles' windows reach into the state), not a multiple of `AHEAD`, T a whole number
    of tiles, the 64-step tile with a partial second one; one and eight channels per thread. Forward
    and gradient, split and unsplit, against the reference."""
    monkeypatch.setattr(conv_mod, "TILE", tile)
    monkeypatch.setattr(conv_mod, "MIN_ITEMS", 0)
    x, w, b, s, cts = case(3, dt, T, widths)
    assert conv_mod._plan(x, widths) == (8 if widths[0] % 8 == 0 else 1, tile)
    (out, grads), (out_r, grads_r) = (split_vjp(i, x, w, b, s, cts, "silu", widths) for i in ("kernel", "ref"))
    for o, r in zip(out, out_r):
        assert rel_err(o, r) <= TOL[dt]
    for i, (g, r) in enumerate(zip(grads, grads_r)):
        assert rel_err(g, r) <= TOL[dt], f"gradient of argument {i}: {rel_err(g, r):.3g}"
    out_u, grads_u = vjp(lambda *a: list(conv_ops.causal_conv1d(*a, "silu", impl="kernel")), x, w, b, s,
                         [mx.concatenate(cts[:3], axis=-1), cts[3]])
    assert mx.array_equal(mx.concatenate(out[:3], axis=-1), out_u[0]) and mx.array_equal(out[3], out_u[1])
    for g, u in zip(grads, grads_u):
        assert mx.array_equal(g, u)


def test_plan():
    """VW 8 only where C and every split width are multiples of 8 and x has more than one row; the
    tile halves from TILE (not below TILE_MIN) while there would be fewer than MIN_ITEMS work items."""
    z = lambda B, T, C: mx.zeros((B, T, C), mx.bfloat16)  # noqa: E731
    assert conv_mod._plan(z(16, 2048, 1792), (1536, 128, 128)) == (8, conv_mod.TILE)  # the toy Mamba-2 layer
    assert conv_mod._plan(z(16, 2048, 1792), (1532, 132, 128))[0] == 1
    assert conv_mod._plan(z(2, 5, 70), None)[0] == 1
    assert conv_mod._plan(z(1, 1, 72), None)[0] == 1 and conv_mod._plan(z(2, 1, 72), None)[0] == 8
    assert conv_mod._plan(z(1, 40, 72), None) == (8, conv_mod.TILE_MIN)
    vw, tile = conv_mod._plan(z(1, 4096, 4352), None)
    assert (vw, tile) == (8, 16) and 4096 // tile * 4352 // vw >= conv_mod.MIN_ITEMS
