"""The "pipe" variants of the causal conv1d kernels (`alloy.metal.conv1d.KERNEL_PIPE`, `BWD_PIPE` and
their split forms, picked by `FWD_VARIANT` / `BWD_VARIANT`) against the streaming kernels and the
reference. On the CPU emulator behind a faked GPU backend, through the public ops and mx.vjp: the
outputs, new state and every gradient equal the streaming kernels' bit for bit (the same arithmetic
in the same order) and match `causal_conv1d_ref` and its autodiff; split and unsplit, K 2 / 3 / 4,
tiles of whole batches (an odd and an even count: the ping-pong ends on either buffer), a partial
last batch, tiles shorter than K - 1, T < K - 1 and T = 1, with and without state / bias / SiLU,
fp32 and bf16, L2 prefetch on and off; one channel per thread (VW 1) keeps the streaming kernels.
On a GPU (`-m gpu`): the two variants at a Mamba-2-like split shape against each other and the
reference."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

import alloy.metal as metal
from alloy.metal import conv1d as conv_mod
from alloy.metal import emulate
from alloy.metal.testing import DTYPES, arr, rel_err

conv_ops = importlib.import_module("alloy.ops.conv")  # alloy.ops re-exports a function of this name

TOL = {"f32": 1e-5, "bf16": 2e-2}  # against the reference: summation order; bf16: one rounding


@pytest.fixture
def emulated(monkeypatch):
    """The kernel path on the CPU: a faked CUDA backend for the dispatch, the conv kernels emulated
    (unwritten output elements are NaN); yields the module's emulated kernels by name."""
    if not emulate.available():
        pytest.skip("no g++ for the CPU kernel emulator")
    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    monkeypatch.setattr(conv_mod, "BWD_PIPE_VW", 8)  # the 8-channel pipe gradients (VW 4: test_conv1d_bwd_vw4.py)
    with emulate.patch(conv_mod, poison=True):
        yield {k: getattr(conv_mod, k) for k in ("KERNEL", "BWD", "KERNEL_SPLIT", "BWD_SPLIT", "KERNEL_PIPE",
                                                 "BWD_PIPE", "KERNEL_SPLIT_PIPE", "BWD_SPLIT_PIPE")}


def case(seed, dt, B, T, C, K, state, bias, widths):
    rng = np.random.default_rng(seed)
    dtype = DTYPES[dt]
    x, w = arr(rng, (B, T, C), dtype), arr(rng, (C, K), dtype, 0.5)
    b = arr(rng, (C,), dtype) if bias else None
    s = arr(rng, (B, K - 1, C), dtype) if state else None
    cts = [arr(rng, (B, T, c), dtype) for c in (widths or (C,))] + [arr(rng, (B, K - 1, C), dtype)]
    return (x, w, b, s), cts


def run(impl, args, cts, act, widths):
    """Outputs and the gradients w.r.t. every given argument of the public op (split with widths)."""
    given = [a is not None for a in args]

    def f(*a):
        it = iter(a)
        full = [next(it) if g else None for g in given]
        if widths is None:
            return list(conv_ops.causal_conv1d(*full, act, impl=impl))
        ys, ns = conv_ops.causal_conv1d_split(*full, act, widths=widths, impl=impl)
        return [*ys, ns]
    return mx.vjp(f, [a for a in args if a is not None], cts)


def variant(monkeypatch, name):
    monkeypatch.setattr(conv_mod, "FWD_VARIANT", name)
    monkeypatch.setattr(conv_mod, "BWD_VARIANT", name)


@pytest.mark.parametrize("dt,B,T,widths,K,silu,state,bias,tile,ahead,pref", [
    ("bf16", 2, 40, (8, 8, 16), 4, True, True, True, 16, 4, 0),      # 4 whole batches a tile (even)
    ("f32", 2, 40, None, 4, True, True, True, 12, 4, 2),              # 3 whole batches (odd); prefetch
    ("bf16", 2, 23, (16, 8, 8), 3, False, True, False, 8, 3, 2),      # partial last batch, partial last tile
    ("f32", 1, 21, None, 2, True, False, True, 10, 2, 4),             # K 2; no state
    ("bf16", 2, 9, (8, 16, 8), 4, True, True, True, 2, 1, 0),         # tiles shorter than K - 1
    ("f32", 2, 2, (8, 8, 8), 4, True, True, True, 64, 4, 2),          # T < K - 1: new state keeps old inputs
    ("bf16", 2, 1, None, 3, True, True, True, 64, 4, 0),              # one step (decode with a batch)
    ("bf16", 3, 70, (1024, 32, 24), 4, True, True, True, 64, 4, 16),  # two groups of threads; default tile
])
def test_pipe_matches_stream_and_reference(emulated, monkeypatch, dt, B, T, widths, K, silu, state, bias, tile,
                                           ahead, pref):
    monkeypatch.setattr(conv_mod, "TILE", tile)
    monkeypatch.setattr(conv_mod, "MIN_ITEMS", 0)
    monkeypatch.setattr(conv_mod, "PIPE_AHEAD_FWD", ahead)
    monkeypatch.setattr(conv_mod, "PIPE_AHEAD_BWD", ahead)
    monkeypatch.setattr(conv_mod, "PREFETCH", pref)
    C = sum(widths) if widths else 8 * (3 + K)
    args, cts = case(K + T, dt, B, T, C, K, state, bias, widths)
    act = "silu" if silu else None
    assert conv_mod._plan(args[0], widths)[0] == 8
    variant(monkeypatch, "stream")
    out_s, grads_s = run("kernel", args, cts, act, widths)
    fwd, bwd = ("KERNEL_SPLIT_PIPE", "BWD_SPLIT_PIPE") if widths else ("KERNEL_PIPE", "BWD_PIPE")
    assert emulated[fwd].calls == emulated[bwd].calls == 0
    variant(monkeypatch, "pipe")
    out_p, grads_p = run("kernel", args, cts, act, widths)
    assert emulated[fwd].calls == emulated[bwd].calls == 1
    out_r, grads_r = run("ref", args, cts, act, widths)
    for p, s, r in zip(out_p, out_s, out_r):
        assert p.shape == r.shape and p.dtype == r.dtype
        assert mx.array_equal(p, s)
        assert rel_err(p, r) <= TOL[dt]
    assert mx.array_equal(out_p[-1], out_r[-1])  # the new state is a shift of inputs
    for i, (p, s, r) in enumerate(zip(grads_p, grads_s, grads_r)):
        assert p.shape == r.shape and p.dtype == r.dtype, i
        assert mx.array_equal(p, s), f"gradient of argument {i}: pipe != stream"
        assert rel_err(p, r) <= TOL[dt], f"gradient of argument {i}: {rel_err(p, r):.3g}"


@pytest.mark.parametrize("widths,C", [((5, 3, 9), 17), (None, 70)])
def test_one_channel_per_thread_keeps_the_streaming_kernels(emulated, monkeypatch, widths, C):
    """VW 1 (channel counts not in whole groups of 8): the pipe switch launches the streaming
    kernels, with the reference's results."""
    variant(monkeypatch, "pipe")
    args, cts = case(5, "f32", 2, 19, C, 4, True, True, widths)
    assert conv_mod._plan(args[0], widths)[0] == 1
    out, grads = run("kernel", args, cts, "silu", widths)
    out_r, grads_r = run("ref", args, cts, "silu", widths)
    stream, pipe = ("KERNEL_SPLIT", "BWD_SPLIT"), ("KERNEL_SPLIT_PIPE", "BWD_SPLIT_PIPE")
    if widths is None:
        stream, pipe = ("KERNEL", "BWD"), ("KERNEL_PIPE", "BWD_PIPE")
    assert [emulated[k].calls for k in stream + pipe] == [1, 1, 0, 0]
    for a, r in zip(out + grads, out_r + grads_r):
        assert rel_err(a, r) <= TOL["f32"]


def test_pipe_forward_launch_bounds_follow_group(emulated, monkeypatch):
    """The pipe forward is built with launch bounds (GROUP, FWD_MIN_GROUPS): a launch with another
    group size (which CUDA would refuse) is stopped with a message instead."""
    assert conv_mod.KERNEL_SPLIT_PIPE.launch_bounds == (conv_mod.GROUP, conv_mod.FWD_MIN_GROUPS)
    monkeypatch.setattr(conv_mod, "GROUP", conv_mod.GROUP // 2)
    (x, w, b, s), _ = case(6, "f32", 2, 5, 16, 4, True, True, None)
    with pytest.raises(ValueError, match="built for groups of"):
        conv_mod.causal_conv1d(x, w, b, s, True)
    variant(monkeypatch, "stream")
    conv_mod.causal_conv1d(x, w, b, s, True)


def test_unknown_variant_is_refused(monkeypatch):
    monkeypatch.setattr(conv_mod, "BWD_VARIANT", "fast")
    x = mx.zeros((2, 5, 8))
    with pytest.raises(ValueError, match="variant must be one of"):
        conv_mod._template(x, 4, True, None, conv_mod.BWD_VARIANT)


@pytest.mark.gpu
@pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")
@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_pipe_matches_stream_on_gpu(monkeypatch, dt):
    """On the GPU at a Mamba-2-like split (1536, 128, 128 channels), T not a multiple of the tile:
    the pipe kernels against the streaming ones (the same arithmetic: equal up to the compiler's
    choice of fused multiply-adds) and both against the reference's values and autodiff."""
    widths = (1536, 128, 128)
    args, cts = case(7, dt, 2, 300, sum(widths), 4, True, True, widths)
    variant(monkeypatch, "stream")
    out_s, grads_s = run("kernel", args, cts, "silu", widths)
    variant(monkeypatch, "pipe")
    out_p, grads_p = run("kernel", args, cts, "silu", widths)
    out_r, grads_r = run("ref", args, cts, "silu", widths)
    same = 1e-6 if dt == "f32" else 1e-2  # bf16: an fp32 ulp may flip a rounding
    for p, s, r in zip(out_p + grads_p, out_s + grads_s, out_r + grads_r):
        assert rel_err(p, s) <= same
        assert rel_err(p, r) <= (2e-4 if dt == "f32" else 3e-2)
