"""The pipe gradient of the causal conv1d at 4 channels per thread (`alloy.metal.conv1d.BWD_PIPE4` /
`BWD_SPLIT_PIPE4`, picked by `BWD_PIPE_VW` = 4): on the CPU emulator, bit for bit equal to the VW 8
pipe gradient (dx, dstate and the float32 dweight / dbias shares: the same arithmetic per element,
the same tiles), and against the reference gradient (`causal_conv1d_ref` differentiated by MLX);
the plan's VW 4 rules; on a GPU (`pytest -m gpu`), VW 4 == VW 8 bit for bit at the toy Mamba-2
layer's shape."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

import alloy.metal as metal
from alloy.metal import conv1d as conv_mod
from alloy.metal import emulate
from alloy.metal.testing import DTYPES, arr, rel_err

conv_ops = importlib.import_module("alloy.ops.conv")  # alloy.ops re-exports a function of this name

TOL = {"f32": 1e-5, "bf16": 2e-2}  # as tests/metal/test_conv1d_split.py


@pytest.fixture
def emulated(monkeypatch):
    """The conv kernels on the emulator (unwritten output elements are NaN), behind a faked CUDA
    backend for the ops' dispatch; the pipe gradient switched on."""
    if not emulate.available():
        pytest.skip("no g++ for the CPU kernel emulator")
    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    monkeypatch.setattr(conv_mod, "BWD_VARIANT", "pipe")
    with emulate.patch(conv_mod, poison=True):
        yield


def case(seed, dt, T, widths, K=4, B=2):
    """x, weight, bias, state and the cotangents (dy0, dy1, dy2, dns), all nonzero."""
    rng = np.random.default_rng(seed)
    dtype, C = DTYPES[dt], sum(widths)
    x, w, b = arr(rng, (B, T, C), dtype), arr(rng, (C, K), dtype, 0.5), arr(rng, (C,), dtype)
    s = arr(rng, (B, K - 1, C), dtype)
    cts = [arr(rng, (B, T, c), dtype) for c in widths] + [arr(rng, (B, K - 1, C), dtype)]
    return x, w, b, s, cts


def launch(vw, split, x, w, b, s, cts, silu, widths):
    """The gradient kernel alone at `BWD_PIPE_VW` = vw -> (dx, dstate, dwb shares), the launches of
    each pipe gradient kernel (VW 8, VW 4) counted."""
    old = conv_mod.BWD_PIPE_VW
    conv_mod.BWD_PIPE_VW = vw
    try:
        if split:
            ks = (conv_mod.BWD_SPLIT, conv_mod.BWD_SPLIT_PIPE, conv_mod.BWD_SPLIT_PIPE4)
            dys, wd = cts[:3], widths
        else:
            ks = (conv_mod.BWD, conv_mod.BWD_PIPE, conv_mod.BWD_PIPE4)
            dys, wd = [mx.concatenate(cts[:3], axis=-1)], None
        before = [k.calls for k in ks[1:]]
        out = conv_mod._bwd_launch(ks, x, w, b, s, dys, cts[3], silu, wd)
        mx.eval(out)
        return out, [k.calls - n for k, n in zip(ks[1:], before)]
    finally:
        conv_mod.BWD_PIPE_VW = old


@pytest.mark.parametrize("dt,T,silu,split,ahead", [
    ("bf16", 40, True, True, 2),    # tiles of 16 (the small launch's TILE_MIN): 16, 16, 8 steps
    ("bf16", 40, False, True, 2),   # no activation
    ("f32", 37, True, True, 3),     # a partial last batch in every tile (16 = 5 x 3 + 1; 5 = 3 + 2)
    ("bf16", 37, True, False, 2),   # the unsplit kernels
    ("f32", 2, True, True, 2),      # T < K - 1: dstate takes part of dns, one short tile
])
def test_vw4_equals_vw8_bit_for_bit(emulated, monkeypatch, dt, T, silu, split, ahead):
    monkeypatch.setattr(conv_mod, "PIPE_AHEAD_BWD", ahead)
    widths = (32, 8, 8)
    x, w, b, s, cts = case(0, dt, T, widths)
    assert conv_mod._plan(x, widths, 4) == (4, 16) and conv_mod._plan(x, widths, 8) == (8, 16)
    (got, n4), (want, n8) = (launch(vw, split, x, w, b, s, cts, silu, widths) for vw in (4, 8))
    assert n4 == [0, 1] and n8 == [1, 0]  # each took its own kernel
    for name, g, r in zip(("dx", "dstate", "dwb"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert np.isfinite(np.array(g.astype(mx.float32))).all(), name  # every element written
        assert mx.array_equal(g, r), f"{name}: max |d| {mx.abs(g.astype(mx.float32) - r.astype(mx.float32)).max()}"


def split_vjp(impl, x, w, b, s, cts, act, widths):
    """Outputs and gradients (x, weight, bias, state) of causal_conv1d_split(impl=impl)."""
    def op(x, w, b, s):
        ys, ns = conv_ops.causal_conv1d_split(x, w, b, s, act, widths=widths, impl=impl)
        return [*ys, ns]
    return mx.vjp(op, [x, w, b, s], cts)


@pytest.mark.parametrize("dt,T,widths,silu", [
    ("bf16", 40, (32, 8, 8), True),
    ("f32", 40, (32, 8, 8), False),
    ("f32", 21, (36, 4, 8), True),   # multiples of 4, not of 8: VW 4 where VW 8 would take VW 1
])
def test_vw4_gradient_matches_reference(emulated, monkeypatch, dt, T, widths, silu):
    monkeypatch.setattr(conv_mod, "BWD_PIPE_VW", 4)
    x, w, b, s, cts = case(1, dt, T, widths)
    act = "silu" if silu else None
    calls = conv_mod.BWD_SPLIT_PIPE4.calls
    (_, grads), (_, grads_r) = (split_vjp(i, x, w, b, s, cts, act, widths) for i in ("kernel", "ref"))
    assert conv_mod.BWD_SPLIT_PIPE4.calls == calls + 1
    for i, (g, r) in enumerate(zip(grads, grads_r)):
        assert g.shape == r.shape and g.dtype == r.dtype, i
        assert rel_err(g, r) <= TOL[dt], f"gradient of argument {i}: {rel_err(g, r):.3g}"


def test_plan_vw4():
    """VW 4 where C and every split width are multiples of 4 and x has more than one row, with the
    tiles VW 8 would take; 4 channels per thread only for the pipe gradient."""
    z = lambda B, T, C: mx.zeros((B, T, C), mx.bfloat16)  # noqa: E731
    toy = z(16, 2048, 1792)
    assert conv_mod._plan(toy, (1536, 128, 128), 4) == (4, conv_mod.TILE)
    assert conv_mod._plan(toy, (1532, 132, 128), 4) == (4, conv_mod.TILE)
    assert conv_mod._plan(toy, (1534, 130, 128), 4)[0] == 1
    assert conv_mod._plan(z(1, 1, 72), None, 4)[0] == 1 and conv_mod._plan(z(2, 1, 72), None, 4)[0] == 4
    for shape in ((16, 2048, 1792), (1, 40, 72), (1, 4096, 4352), (2, 300, 800), (4, 512, 1024)):
        assert conv_mod._plan(z(*shape), None, 4)[1] == conv_mod._plan(z(*shape), None, 8)[1], shape
    with pytest.raises(ValueError, match="8 or 4"):
        conv_mod._plan(toy, None, 2)
    with pytest.raises(ValueError, match="pipe kernel"):
        conv_mod._template(toy, 4, True, None, "stream", 2, vec=4)


def test_bwd_pipe_vw_switch(monkeypatch):
    """A bad BWD_PIPE_VW is refused; with BWD_VARIANT "stream" it is ignored (the streaming kernel
    at VW 8); the VW 4 kernels are registered for the nvcc compile check."""
    x, w, b, s, cts = case(2, "bf16", 5, (8, 8, 8))
    taken = []
    fake = lambda name: lambda *a, **k: taken.append(name) or (None, None, None)  # noqa: E731
    ks = (fake("stream"), fake("pipe8"), fake("pipe4"))
    monkeypatch.setattr(conv_mod, "BWD_PIPE_VW", 2)
    with pytest.raises(ValueError, match="BWD_PIPE_VW"):
        conv_mod._bwd_launch(ks, x, w, b, s, cts[:3], cts[3], True, (8, 8, 8))
    monkeypatch.setattr(conv_mod, "BWD_PIPE_VW", 4)
    for variant in ("stream", "pipe"):
        monkeypatch.setattr(conv_mod, "BWD_VARIANT", variant)
        conv_mod._bwd_launch(ks, x, w, b, s, cts[:3], cts[3], True, (8, 8, 8))
    assert taken == ["stream", "pipe4"]
    assert {conv_mod.BWD_PIPE4.name, conv_mod.BWD_SPLIT_PIPE4.name} <= set(metal.KERNELS)


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")
@pytest.mark.parametrize("silu,tile64", [(True, True), (True, False), (False, True)])
def test_gpu_vw4_equals_vw8_toy_layer(monkeypatch, silu, tile64):
    """The toy Mamba-2 layer's conv gradient (B 2 of 16, T 2048, C 1792 split 1536 / 128 / 128, K 4,
    bf16): VW 4 == VW 8 bit for bit, the kernel alone and the whole split VJP; and near the reference
    gradient (float32). tile64: the 64-step tiles of the toy's B 16 launch (MIN_ITEMS 0), else the
    plan's for B 2 (16 steps)."""
    monkeypatch.setattr(conv_mod, "BWD_VARIANT", "pipe")
    if tile64:
        monkeypatch.setattr(conv_mod, "MIN_ITEMS", 0)
    widths = (1536, 128, 128)
    x, w, b, s, cts = case(3, "bf16", 2048, widths)
    assert conv_mod._plan(x, widths, 4) == (4, 64 if tile64 else 16)
    ks = (conv_mod.BWD_SPLIT, conv_mod.BWD_SPLIT_PIPE, conv_mod.BWD_SPLIT_PIPE4)
    res = {}
    for vw in (8, 4):
        monkeypatch.setattr(conv_mod, "BWD_PIPE_VW", vw)
        kern = conv_mod._bwd_launch(ks, x, w, b, s, cts[:3], cts[3], silu, widths)
        full = conv_mod.causal_conv1d_split_vjp(x, w, b, s, *cts, silu, widths)
        mx.eval(kern, full)
        res[vw] = (*kern, *full)
    for i, (g, r) in enumerate(zip(res[4], res[8])):
        assert g.shape == r.shape and g.dtype == r.dtype, i
        assert mx.array_equal(g, r), f"output {i}: max |d| {mx.abs(g.astype(mx.float32) - r.astype(mx.float32)).max()}"
    monkeypatch.setattr(conv_mod, "BWD_PIPE_VW", 4)
    act = "silu" if silu else None
    _, grads = split_vjp("kernel", x, w, b, s, cts, act, widths)
    f32 = [a.astype(mx.float32) for a in (x, w, b, s, *cts)]  # the reference in float32
    _, grads_r = split_vjp("ref", *f32[:4], f32[4:], act, widths)
    for i, (g, r) in enumerate(zip(grads, grads_r)):
        assert rel_err(g, r) <= 3e-2, f"gradient of argument {i}: {rel_err(g, r):.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")
@pytest.mark.parametrize("vw", [4, 8])
def test_gpu_tail_toy_layer(monkeypatch, vw):
    """Mamba-2's dt passed through the conv at the toy shape (B 2, T 2048, x 1792 + 24 columns, bf16,
    MIN_ITEMS 0: the toy's 64-step tiles): the pieces, the tail and every gradient equal bit for bit
    the tail-free kernels on x[..., :1792] (dx's last 24 columns: the tail's cotangent, copied)."""
    monkeypatch.setattr(conv_mod, "BWD_VARIANT", "pipe")
    monkeypatch.setattr(conv_mod, "MIN_ITEMS", 0)
    monkeypatch.setattr(conv_mod, "BWD_PIPE_VW", vw)
    widths, tail = (1536, 128, 128), 24
    x, w, b, s, cts = case(4, "bf16", 2048, widths)
    rng = np.random.default_rng(5)
    xt = mx.concatenate([x, arr(rng, (2, 2048, tail), mx.bfloat16)], axis=-1)
    dtail = arr(rng, (2, 2048, tail), mx.bfloat16)

    def run(xin, cot, tail):
        def f(*a):
            ys, ns = conv_ops.causal_conv1d_split(*a, "silu", widths=widths, tail=tail, impl="kernel")
            return [*ys, ns]
        return mx.vjp(f, [xin, w, b, s], cot)
    (out, grads), (out_n, grads_n) = run(xt, cts[:3] + [dtail, cts[3]], tail), run(x, cts, 0)
    mx.eval(out, grads, out_n, grads_n)
    assert mx.array_equal(out[3], xt[..., 1792:])
    for o, n in zip(out[:3] + out[4:], out_n):
        assert mx.array_equal(o, n)
    assert grads[0].shape == (2, 2048, 1792 + tail)
    assert mx.array_equal(grads[0][..., 1792:], dtail) and mx.array_equal(grads[0][..., :1792], grads_n[0])
    for g, n in zip(grads[1:], grads_n[1:]):
        assert mx.array_equal(g, n)
