"""GPU kernels against their references (`pytest -m gpu`; skipped where no CUDA/Metal device).

Every kernel: outputs and final states vs the `_ref` (or the op it replaces) over random shapes
with T = 1, T not a multiple of the chunk, batch > 1, groups > 1, fp32 and bf16; gradients of
the fast path vs the reference's. Tolerances (max |fast - ref| / max(|ref|, 1)):
fp32 2e-4 (SSD chunked 2e-3: matmuls may run in TF32), bf16 3e-2 (one bf16 rounding of
operands and outputs; SSD chunked 6e-2: bf16 matmul operands, as the Triton kernels).
"""
import importlib

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from alloy import metal
from alloy.metal.testing import DTYPES, arr, assert_decode_matches, assert_grads_match, pos, rel_err
from alloy.ops import (causal_conv1d, causal_conv1d_ref, selective_scan, selective_scan_ref,
                       selective_scan_step, ssd, ssd_chunked, ssd_ref, ssd_step)

ssd_mod = importlib.import_module("alloy.ops.ssd")  # the package re-exports a function named ssd

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")]

TOL = {"f32": 2e-4, "bf16": 3e-2}
TOL_SSD = {"f32": 2e-3, "bf16": 6e-2}


# ---------------------------------------------------------------- conv1d + SiLU
@given(b=st.integers(1, 3), T=st.sampled_from([1, 2, 3, 15, 16, 17, 40]), C=st.integers(1, 70),
       K=st.sampled_from([2, 3, 4]), dt=st.sampled_from(["f32", "bf16"]), bias=st.booleans(),
       state=st.booleans(), silu=st.booleans(), seed=st.integers(0, 2**16))
def test_conv1d_kernel_matches_ref(b, T, C, K, dt, bias, state, silu, seed):
    rng = np.random.default_rng(seed)
    dtype, act = DTYPES[dt], ("silu" if silu else None)
    x = arr(rng, (b, T, C), dtype)
    w = arr(rng, (C, K), dtype, 0.5)
    bv = arr(rng, (C,), dtype) if bias else None
    s = arr(rng, (b, K - 1, C), dtype) if state else None
    y, ns = causal_conv1d(x, w, bv, s, act, impl="kernel")
    yr, nsr = causal_conv1d_ref(x, w, bv, s, act)
    assert y.dtype == yr.dtype and ns.dtype == nsr.dtype
    assert rel_err(y, yr) <= TOL[dt]
    assert rel_err(ns, nsr) == 0.0  # the new state is a copy of inputs


def test_conv1d_empty_input_returns_the_carried_state():
    """T = 0 (an empty split of a prompt) launches nothing; the state passes through unchanged."""
    rng = np.random.default_rng(4)
    x, w, s = arr(rng, (2, 0, 5)), arr(rng, (5, 4)), arr(rng, (2, 3, 5))
    for impl in ("auto", "kernel"):
        y, ns = causal_conv1d(x, w, None, s, "silu", impl=impl)
        assert y.shape == (2, 0, 5) and rel_err(ns, s) == 0.0


def test_conv1d_kernel_gradients_and_3d_weight():
    rng = np.random.default_rng(0)
    x, w, bv, s = arr(rng, (2, 19, 24)), arr(rng, (24, 1, 4)), arr(rng, (24,)), arr(rng, (2, 3, 24))
    ct = arr(rng, (2, 19, 24))
    assert_grads_match(lambda *a, impl: causal_conv1d(*a, "silu", impl=impl), (x, w, bv, s), (ct,),
                       "kernel", "ref", 1e-5)


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("C", [72, 70])
@pytest.mark.parametrize("T,tile", [(2, 64), (19, 64), (300, 64), (300, 16), (70, 6)])
def test_conv1d_gradient_kernel_matches_autodiff(monkeypatch, dt, C, T, tile):
    """alloy.ops.conv.GRADIENT_KERNEL on: the kernel path's gradient is the BWD kernel's (tiles of
    `tile` steps; eight channels per thread at C = 72, one at C = 70)."""
    import alloy.ops.conv as conv_ops
    from alloy.metal import conv1d as conv_mod
    monkeypatch.setattr(conv_ops, "GRADIENT_KERNEL", True)
    monkeypatch.setattr(conv_mod, "TILE", tile)
    monkeypatch.setattr(conv_mod, "MIN_ITEMS", 0)
    rng = np.random.default_rng(1)
    dtype = DTYPES[dt]
    x, w, bv, s = arr(rng, (2, T, C), dtype), arr(rng, (C, 1, 4), dtype), arr(rng, (C,), dtype), arr(rng, (2, 3, C), dtype)
    ct = arr(rng, (2, T, C), dtype)
    used = []
    real = conv_mod.causal_conv1d_vjp
    monkeypatch.setattr(conv_mod, "causal_conv1d_vjp", lambda *a: used.append(1) or real(*a))
    assert_grads_match(lambda *a, impl: causal_conv1d(*a, "silu", impl=impl), (x, w, bv, s), (ct,),
                       "kernel", "ref", 1e-5 if dt == "f32" else 3e-2)
    assert used  # the gradient came from the kernel


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("nbg,G", [(False, None), (False, 256), (True, None)])
def test_gated_rms_norm_kernels_match_ref(dt, nbg, G):
    """The fused gated RMSNorm (forward and gradient) against the reference and its autodiff."""
    from alloy.ops.norm import gated_rms_norm
    rng = np.random.default_rng(2)
    dtype = DTYPES[dt]
    x, z, w = arr(rng, (4, 301, 1536), dtype), arr(rng, (4, 301, 1536), dtype), arr(rng, (1536,), dtype)
    ct = arr(rng, (4, 301, 1536), dtype)
    y = gated_rms_norm(x, z, w, 1e-5, G, nbg, impl="kernel")
    assert rel_err(y, gated_rms_norm(x, z, w, 1e-5, G, nbg, impl="ref")) <= TOL[dt]
    assert_grads_match(lambda *a, impl: (gated_rms_norm(*a, 1e-5, G, nbg, impl=impl),), (x, z, w), (ct,),
                       "kernel", "ref", 1e-4 if dt == "f32" else 3e-2)


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("D", [768, 96])
def test_plain_rms_norm_kernels_match_mlx(dt, D):
    """rms_norm(impl="kernel") (the gated-norm kernels without a gate) against mx.fast.rms_norm:
    values and gradients, with (D = 768) and without 16-byte vectors."""
    from alloy.ops.norm import rms_norm
    rng = np.random.default_rng(4)
    dtype = DTYPES[dt]
    x, w, ct = arr(rng, (4, 301, D), dtype), arr(rng, (D,), dtype), arr(rng, (4, 301, D), dtype)
    assert rel_err(rms_norm(x, w, 1e-5, impl="kernel"), rms_norm(x, w, 1e-5, impl="fast")) <= TOL[dt]
    assert_grads_match(lambda *a, impl: (rms_norm(*a, 1e-5, impl=impl),), (x, w), (ct,), "kernel", "fast",
                       1e-4 if dt == "f32" else 3e-2)


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("D", [768, 96])
def test_add_rms_norm_kernels_match_mlx(dt, D):
    """add_rms_norm(impl="kernel") (the residual add fused in front of the norm) against the two MLX
    ops: both outputs and the gradients of both addends and the weight, cotangents on both outputs."""
    from alloy.ops.norm import add_rms_norm
    rng = np.random.default_rng(5)
    dtype = DTYPES[dt]
    x, r, w = arr(rng, (4, 301, D), dtype, 2.0), arr(rng, (4, 301, D), dtype), arr(rng, (D,), dtype)
    cts = (arr(rng, (4, 301, D), dtype), arr(rng, (4, 301, D), dtype))
    for got, want in zip(add_rms_norm(x, r, w, 1e-5, impl="kernel"), add_rms_norm(x, r, w, 1e-5, impl="fast")):
        assert rel_err(got, want) <= TOL[dt]
    assert_grads_match(lambda *a, impl: add_rms_norm(*a, 1e-5, impl=impl), (x, r, w), cts, "kernel", "fast",
                       1e-4 if dt == "f32" else 3e-2)


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 301, 4096), (3, 7, 18)])
def test_packed_swiglu_kernels_match_autodiff(dt, shape):
    """swiglu_packed on the GPU (gate and up the halves of one array; eight-element vectors at F = 2048,
    none at F = 9) against autodiff of silu(gate) * up in float32; the gradient in gu's layout."""
    from alloy.ops import swiglu, swiglu_packed
    rng = np.random.default_rng(6)
    dtype = DTYPES[dt]
    gu, ct = arr(rng, shape, dtype, 2.0), arr(rng, (*shape[:-1], shape[-1] // 2), dtype)
    ref = lambda gu: (swiglu(*mx.split(gu.astype(mx.float32), 2, axis=-1)),)  # noqa: E731
    assert rel_err(swiglu_packed(gu), ref(gu)[0]) <= TOL[dt]
    (got,) = mx.vjp(lambda gu: (swiglu_packed(gu),), [gu], [ct])[1]
    (want,) = mx.vjp(ref, [gu], [ct.astype(mx.float32)])[1]
    assert got.dtype == dtype and got.shape == gu.shape and rel_err(got, want) <= TOL[dt]


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 301, 2048), (3, 7, 9)])
def test_swiglu_kernels_match_autodiff(monkeypatch, dt, shape):
    """swiglu(fused=True) on the GPU takes the kernels (`alloy.metal.swiglu`), with and without
    eight-element vectors; values and gradients against autodiff of silu(gate) * up in float32."""
    from alloy.metal import swiglu as kern
    from alloy.ops import swiglu
    rng = np.random.default_rng(3)
    dtype = DTYPES[dt]
    g, u, ct = (arr(rng, shape, dtype, 2.0), arr(rng, shape, dtype), arr(rng, shape, dtype))
    launches = []
    real = kern._launch
    monkeypatch.setattr(kern, "_launch", lambda k, a, n: launches.append(k.name) or real(k, a, n))
    ref = lambda g, u: (swiglu(g.astype(mx.float32), u.astype(mx.float32)),)  # noqa: E731
    fused = lambda g, u: (swiglu(g, u, fused=True),)  # noqa: E731
    assert rel_err(fused(g, u)[0], ref(g, u)[0]) <= TOL[dt]
    launches.clear()
    _, got = mx.vjp(fused, [g, u], [ct])
    _, want = mx.vjp(ref, [g, u], [ct.astype(mx.float32)])
    mx.eval(got)
    assert launches.count("alloy_swiglu") == 1 and launches.count("alloy_swiglu_bwd") == 1, launches
    for a, b in zip(got, want):
        assert a.dtype == dtype and rel_err(a, b) <= TOL[dt]


# ---------------------------------------------------------------- Mamba-2 SSD
def ssd_inputs(rng, b, l, g, r, p, n, dtype, state=True):
    h = g * r
    x = arr(rng, (b, l, h, p), dtype)
    dt = pos(rng, (b, l, h), 0.01, 0.6)
    A = -pos(rng, (h,), 0.3, 3.0)
    B = arr(rng, (b, l, g, n), dtype, 0.5)
    C = arr(rng, (b, l, g, n), dtype, 0.5)
    D = arr(rng, (h,))
    h0 = arr(rng, (b, h, p, n)) if state else None
    return x, dt, A, B, C, D, h0


@given(b=st.integers(1, 3), g=st.sampled_from([1, 2]), r=st.sampled_from([1, 3]),
       p=st.sampled_from([1, 5, 16]), n=st.sampled_from([1, 7, 33, 128]),
       dt=st.sampled_from(["f32", "bf16"]), seed=st.integers(0, 2**16))
def test_ssd_step_kernel_matches_ops(b, g, r, p, n, dt, seed):
    rng = np.random.default_rng(seed)
    x, dtv, A, B, C, D, h0 = ssd_inputs(rng, b, 1, g, r, p, n, DTYPES[dt])
    y, s = ssd(x, dtv, A, B, C, D, h0, impl="kernel")
    yr, sr = ssd_step(x[:, 0], dtv[:, 0], A, B[:, 0], C[:, 0], D, h0)
    assert s.dtype == mx.float32 and y.dtype == x.dtype
    assert rel_err(y[:, 0], yr) <= TOL[dt]
    assert rel_err(s, sr) <= 2e-5


@given(b=st.integers(1, 2), l=st.sampled_from([1, 2, 15, 16, 33, 70]), g=st.sampled_from([1, 2]),
       r=st.sampled_from([1, 2]), p=st.sampled_from([3, 8]), n=st.sampled_from([4, 16]),
       chunk=st.sampled_from([16, 32]), dt=st.sampled_from(["f32", "bf16"]),
       state=st.booleans(), seed=st.integers(0, 2**16))
def test_ssd_chunked_kernel_matches_ref(b, l, g, r, p, n, chunk, dt, state, seed):
    rng = np.random.default_rng(seed)
    x, dtv, A, B, C, D, h0 = ssd_inputs(rng, b, l, g, r, p, n, DTYPES[dt], state)
    y, s = ssd(x, dtv, A, B, C, D, h0, chunk_size=chunk, impl="kernel")
    yr, sr = ssd_ref(x, dtv, A, B, C, D, h0)
    assert y.dtype == x.dtype and s.dtype == mx.float32
    assert rel_err(y, yr) <= TOL_SSD[dt]
    assert rel_err(s, sr) <= TOL_SSD[dt]


@pytest.mark.parametrize("tc", [False, True])
def test_ssd_kernel_at_model_shape_and_under_compile(monkeypatch, tc):
    """tc: the diagonal blocks' output on tensor cores (`alloy.metal.ssd_chunked.OUT_TC`)."""
    monkeypatch.setattr(importlib.import_module("alloy.metal.ssd_chunked"), "OUT_TC", tc)
    rng = np.random.default_rng(1)
    x, dtv, A, B, C, D, h0 = ssd_inputs(rng, 1, 300, 1, 8, 64, 128, mx.bfloat16)
    f = mx.compile(lambda *a: ssd(*a, chunk_size=256, impl="kernel"))
    y, s = f(x, dtv, A, B, C, D, h0)
    yr, sr = ssd_ref(x, dtv, A, B, C, D, h0)
    assert rel_err(y, yr) <= TOL_SSD["bf16"] and rel_err(s, sr) <= TOL_SSD["bf16"]


@pytest.mark.parametrize("mode", ["autodiff", "explicit", "kernels", "kernels-tc"])
@pytest.mark.parametrize("b,l,g,r,p,n,chunk,tol", [(2, 37, 2, 2, 4, 8, 16, 1e-3), (1, 300, 1, 3, 64, 32, 256, 1e-2)])
def test_ssd_kernel_gradients_match_ref(monkeypatch, mode, b, l, g, r, p, n, chunk, tol):
    """Each gradient of the kernel path (alloy.ops.ssd.GRADIENT), at a small shape and at one with
    two 64-row tiles per chunk (T = 300: chunks of 128) and head dim 64 ("kernels-tc": the diagonal
    blocks' scores on tensor cores, `alloy.metal.ssd_chunked.SCORES_TC`). The larger shape's tolerance
    covers MLX-CUDA's float32 matmuls, which run as TF32 (autodiff / explicit failed 1e-3 there on
    an H100; the kernels' own products are float32)."""
    monkeypatch.setattr(ssd_mod, "GRADIENT", mode.removesuffix("-tc"))
    monkeypatch.setattr(importlib.import_module("alloy.metal.ssd_chunked"), "SCORES_TC", mode.endswith("-tc"))
    rng = np.random.default_rng(2)
    args = ssd_inputs(rng, b, l, g, r, p, n, mx.float32)
    ct = arr(rng, (b, l, g * r, p))
    cs = arr(rng, (b, g * r, p, n))
    assert_grads_match(lambda *a, impl: ssd(*a, chunk_size=chunk, impl=impl), args, (ct, cs), "kernel", "ref", tol)


@pytest.mark.parametrize("tc,products,chunk_tc", [(False, False, False), (True, False, False), (True, True, False),
                                                  (True, True, True), (False, False, True)])
def test_ssd_kernel_gradient_in_bf16_matches_written_out_ops(monkeypatch, tc, products, chunk_tc):
    """bf16 inputs at a model-like shape (head dim 64, d_state 128, two 64-row tiles per chunk): the
    kernels' gradient ("kernels", with the scores on tensor cores when tc, the batched products in
    bf16 when products, the forward's diagonal output and dX on tensor cores when chunk_tc: OUT_TC /
    DX_TC) against the written-out MLX ops ("explicit")."""
    kern = importlib.import_module("alloy.metal.ssd_chunked")
    monkeypatch.setattr(kern, "SCORES_TC", tc)
    monkeypatch.setattr(kern, "OUT_TC", chunk_tc)
    monkeypatch.setattr(kern, "DX_TC", chunk_tc)
    monkeypatch.setattr(ssd_mod, "GRADIENT_PRODUCTS_IN_INPUT_DTYPE", products)
    rng = np.random.default_rng(7)
    args = ssd_inputs(rng, 2, 300, 1, 4, 64, 128, mx.bfloat16)
    ct = arr(rng, (2, 300, 4, 64), mx.bfloat16)
    grads = {}
    for mode in ("explicit", "kernels"):
        monkeypatch.setattr(ssd_mod, "GRADIENT", mode)
        loss = lambda *a: (ssd(*a, chunk_size=256, impl="kernel")[0] * ct).astype(mx.float32).sum()  # noqa: E731
        grads[mode] = mx.grad(loss, argnums=tuple(range(len(args))))(*args)
    for i, (a, b) in enumerate(zip(grads["kernels"], grads["explicit"])):
        assert rel_err(a, b) <= 3e-2, f"gradient of argument {i}: relative error {rel_err(a, b):.3g}"


@pytest.mark.parametrize("dt,b,l,g,r,p,n,chunk", [("bf16", 2, 300, 1, 3, 64, 128, 256),
                                                 ("bf16", 1, 200, 2, 2, 128, 32, 128),
                                                 ("fp16", 1, 70, 1, 4, 16, 16, 32),
                                                 ("fp16", 2, 100, 2, 1, 32, 16, 80)])
def test_ssd_chunk_products_on_tensor_cores(monkeypatch, dt, b, l, g, r, p, n, chunk):
    """`alloy.metal.ssd_chunked.CHUNK_OUT_TC` / `BWD_DX_TC` (switches OUT_TC / DX_TC; the mask tile and
    dt x rounded to the input dtype) launched by `ssd_chunked` / `ssd_chunked_diag_bwd` against the
    CUDA-core OUT / BWD_DX (within 1e-2) and y against `ssd_ref`."""
    kern = importlib.import_module("alloy.metal.ssd_chunked")
    rng = np.random.default_rng(l + p)
    dtype = {"bf16": mx.bfloat16, "fp16": mx.float16}[dt]
    x, dtv, A, B, C, D, h0 = ssd_inputs(rng, b, l, g, r, p, n, dtype)
    dy = arr(rng, x.shape, dtype)
    K, nc = chunk, -(-l // chunk)

    def pad(v):  # (b, l, ...) -> (b, c, K, ...) float32, zeros past l
        v = mx.pad(v.astype(mx.float32), [(0, 0), (0, nc * K - l)] + [(0, 0)] * (v.ndim - 2))
        return v.reshape(b, nc, K, *v.shape[2:])
    CB = mx.einsum("bclgn,bcsgn->bcgls", pad(C), pad(B))
    acs = mx.cumsum(pad(dtv) * A, axis=2).transpose(0, 1, 3, 2)
    got = {}
    for on in (False, True):
        monkeypatch.setattr(kern, "OUT_TC", on)
        monkeypatch.setattr(kern, "DX_TC", on)
        y, s = kern.ssd_chunked(x, dtv, A, B, C, D, h0, K)
        got[on] = (y, kern.ssd_chunked_diag_bwd(CB, acs, x, dtv, dy)[0])
    yr, _ = ssd_ref(x, dtv, A, B, C, D, h0)
    assert got[True][0].dtype == dtype and rel_err(got[True][0], yr) <= TOL_SSD["bf16"]
    for name, a, c in zip(("y", "dX"), got[True], got[False]):
        assert rel_err(a, c) <= 1e-2, (name, rel_err(a, c))


# ---------------------------------------------------------------- Mamba-1 selective scan
def ss_inputs(rng, b, l, d, n, dtype, gate, state):
    x = arr(rng, (b, l, d), dtype)
    dt = pos(rng, (b, l, d), 0.01, 0.6)
    A = -pos(rng, (d, n), 0.3, 3.0)
    B = arr(rng, (b, l, n), dtype, 0.5)
    C = arr(rng, (b, l, n), dtype, 0.5)
    D = arr(rng, (d,))
    z = arr(rng, (b, l, d), dtype) if gate else None
    h0 = arr(rng, (b, d, n)) if state else None
    return x, dt, A, B, C, D, z, h0


@given(b=st.integers(1, 3), d=st.integers(1, 40), n=st.sampled_from([1, 5, 16, 40]),
       dt=st.sampled_from(["f32", "bf16"]), gate=st.booleans(), state=st.booleans(),
       seed=st.integers(0, 2**16))
def test_selective_scan_step_kernel_matches_ops(b, d, n, dt, gate, state, seed):
    rng = np.random.default_rng(seed)
    x, dtv, A, B, C, D, z, h0 = ss_inputs(rng, b, 1, d, n, DTYPES[dt], gate, state)
    y, s = selective_scan(x, dtv, A, B, C, D, z, h0, impl="kernel")
    yr, sr = selective_scan_step(x[:, 0], dtv[:, 0], A, B[:, 0], C[:, 0], D,
                                 None if z is None else z[:, 0], h0)
    assert rel_err(y[:, 0], yr) <= TOL[dt]
    assert rel_err(s, sr) <= 2e-5


@given(b=st.integers(1, 2), l=st.sampled_from([2, 3, 17, 64, 65]), d=st.integers(1, 40),
       n=st.sampled_from([1, 5, 16, 40]), dt=st.sampled_from(["f32", "bf16"]), gate=st.booleans(),
       state=st.booleans(), seed=st.integers(0, 2**16))
def test_selective_scan_kernel_matches_ref(b, l, d, n, dt, gate, state, seed):
    rng = np.random.default_rng(seed)
    x, dtv, A, B, C, D, z, h0 = ss_inputs(rng, b, l, d, n, DTYPES[dt], gate, state)
    y, s = selective_scan(x, dtv, A, B, C, D, z, h0, impl="kernel")
    yr, sr = selective_scan_ref(x, dtv, A, B, C, D, z, h0)
    assert y.dtype == x.dtype and s.dtype == mx.float32
    assert rel_err(y, yr) <= TOL[dt]
    assert rel_err(s, sr) <= 1e-4


def test_selective_scan_kernel_gradients_match_ref():
    rng = np.random.default_rng(3)
    args = ss_inputs(rng, 2, 21, 6, 5, mx.float32, True, True)
    ct = arr(rng, (2, 21, 6))
    cs = arr(rng, (2, 6, 5))
    assert_grads_match(selective_scan, args, (ct, cs), "kernel", "ref", 1e-3)


def test_auto_dispatch_takes_the_kernels_on_gpu():
    # the package re-exports functions named like these modules: import the modules themselves
    assert importlib.import_module("alloy.ops.conv").kernel_applies(mx.ones((1, 4, 8)), mx.ones((8, 4)))
    assert importlib.import_module("alloy.ops.ssd").kernel_applies(mx.ones((1, 4, 2, 8)))
    assert importlib.import_module("alloy.ops.selective_scan").kernel_applies(mx.ones((1, 4, 8)), mx.ones((8, 16)))


# ---------------------------------------------------------------- fused Mamba-2 decode step
@given(b=st.integers(1, 3), g=st.sampled_from([1, 2]), r=st.sampled_from([1, 3]), p=st.sampled_from([8, 64]),
       n=st.sampled_from([16, 128]), K=st.sampled_from([2, 4]), bias=st.booleans(),
       lim=st.sampled_from([(0.0, float("inf")), (0.05, 0.3)]), dt=st.sampled_from(["f32", "bf16"]),
       seed=st.integers(0, 2**16))
def test_mamba2_step_kernel_matches_ref(b, g, r, p, n, K, bias, lim, dt, seed):
    from alloy.ops.ssd import mamba2_step, mamba2_step_ref
    rng = np.random.default_rng(seed)
    dtype, H = DTYPES[dt], g * r
    DI, CD = H * p, H * p + 2 * g * n
    zx = arr(rng, (b, DI + CD + H), dtype)
    w, cb = arr(rng, (CD, 1, K), dtype, 0.5), (arr(rng, (CD,), dtype) if bias else None)
    cs = arr(rng, (b, K - 1, CD), dtype)
    dtb, alog, D = arr(rng, (H,), scale=0.5), pos(rng, (H,), -1.0, 2.0), arr(rng, (H,))
    ss = arr(rng, (b, H, p, n))
    got = mamba2_step(zx, w, cb, cs, dtb, alog, D, lim, ss, impl="kernel")
    want = mamba2_step_ref(zx, w.reshape(CD, K), cb, cs, dtb, alog, D, lim, ss)
    assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype == dtype
    assert rel_err(got[0], want[0]) <= TOL[dt]
    assert rel_err(got[1], want[1]) == 0.0  # the conv state is a shift of inputs
    assert rel_err(got[2], want[2]) <= 2e-5 if dt == "f32" else 1e-2


def test_mamba2_model_decode_on_gpu_matches_general_path():
    """A bf16 Mamba-2 model's compiled decode (fused step) against the same steps through the general
    path (a `valid` entry in the state routes the layer there), token by token."""
    from alloy.model import as_config, build
    cfg = as_config({"name": "m", "vocab_size": 97, "d_model": 128, "layer_types": ["mamba2"] * 3,
                     "ffn_types": ["none"] * 3, "dtype": "bfloat16", "tie_embeddings": True,
                     "mixers": {"mamba2": {"d_state": 32, "head_dim": 32, "n_groups": 2}}})
    m = build(cfg)
    params = m.init(mx.random.key(0))
    prompt = mx.array(np.random.default_rng(1).integers(0, 97, (2, 9)))
    fused, general = m.init_state(2, 32), m.init_state(2, 32)
    lf, fused = m.apply(params, prompt, fused)
    lg, general = m.apply(params, prompt, general)
    step = mx.compile(m.apply)
    tok = mx.argmax(lf[:, -1], -1)[:, None]
    for _ in range(6):
        lf, fused = step(params, tok, fused)
        general = {**general, "layers": [{**s, "mixer": {**s["mixer"], "valid": mx.array([1, 1])}}
                                         for s in general["layers"]]}
        lg, general = m.apply(params, tok, general)
        general = {**general, "layers": [{**s, "mixer": {k: v for k, v in s["mixer"].items() if k != "valid"}}
                                         for s in general["layers"]]}
        assert rel_err(lf, lg) <= 3e-2
        tok = mx.argmax(lg[:, -1], -1)[:, None]


@pytest.mark.parametrize("groups", [None, 3])
@pytest.mark.parametrize("batch,n_groups,rms,bias,dtype,d_conv", [
    (1, 1, True, True, "bfloat16", 4), (3, 2, True, False, "float32", 4), (2, 1, False, True, "bfloat16", 2),
    (4, 2, True, True, "float16", 3)])
def test_mamba2_stack_decode_matches_per_layer_path(monkeypatch, groups, batch, n_groups, rms, bias, dtype, d_conv):
    """The persistent whole-stack decode kernel (`prepare_decode` params) against the per-layer fused
    path, token by token under compile: logits and every layer's states; with the default grid (one
    group per SM) and a 3-group grid (many rows and phases per group)."""
    from alloy.layers.stack import prepare_decode
    from alloy.metal import mamba2_stack
    from alloy.model import as_config, build
    if groups:
        monkeypatch.setenv("ALLOY_PERSISTENT_GROUPS", str(groups))
    mamba2_stack.resident_groups.cache_clear()
    calls = []
    monkeypatch.setattr(mamba2_stack, "launch", lambda *a, _f=mamba2_stack.launch, **k: calls.append(1) or _f(*a, **k))
    try:
        cfg = as_config({"name": "m", "vocab_size": 97, "d_model": 128, "layer_types": ["mamba2"] * 4,
                         "ffn_types": ["none"] * 4, "dtype": dtype, "tie_embeddings": True,
                         "mixers": {"mamba2": {"d_state": 64, "head_dim": 32, "n_groups": n_groups, "rms_norm": rms,
                                               "conv_bias": bias, "d_conv": d_conv}}})
        m = build(cfg)
        params = m.init(mx.random.key(0))
        prepared = prepare_decode(cfg, params)
        assert "decode_stack" in prepared
        prompt = mx.array(np.random.default_rng(1).integers(0, 97, (batch, 9)))
        logits, state = m.apply(params, prompt, m.init_state(batch, 32))
        assert_decode_matches(mx.compile(m.apply), prepared, params, mx.argmax(logits[:, -1], -1)[:, None], state,
                              steps=5, tol=2e-4 if dtype == "float32" else 3e-2)
        assert calls, "the whole-stack kernel did not run"
    finally:
        monkeypatch.delenv("ALLOY_PERSISTENT_GROUPS", raising=False)
        mamba2_stack.resident_groups.cache_clear()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("types,stretches", [
    (["attention", "mamba2", "mamba2", "mamba2", "attention", "mamba2"], ["1"]),
    (["mamba2", "mamba2", "mamba2", "attention", "mamba2", "mamba2", "attention", "mamba2"], ["0", "4"]),
], ids=["one-stretch", "two-stretches"])
def test_hybrid_mamba2_stretches_decode_in_one_launch_each(monkeypatch, dtype, types, stretches):
    """A hybrid whose Mamba-2 stretches sit between attention + MLP blocks: each stretch runs through
    the persistent kernel (one launch per stretch and token, each with its own barrier scratch),
    against the per-layer path under compile. Two stretches need `alloy.layers.stack.MULTI_STRETCH`:
    session 4 saw wrong logits there with one shared-shape scratch; this case decides whether
    MULTI_STRETCH can be switched on."""
    from alloy.layers import stack
    from alloy.metal import mamba2_stack
    from alloy.model import as_config, build
    monkeypatch.setattr(stack, "MULTI_STRETCH", len(stretches) > 1)
    calls = []
    monkeypatch.setattr(mamba2_stack, "launch", lambda *a, _f=mamba2_stack.launch, **k: calls.append(1) or _f(*a, **k))
    cfg = as_config({"name": "m", "vocab_size": 97, "d_model": 128, "layer_types": types,
                     "ffn_types": ["mlp" if t == "attention" else "none" for t in types],
                     "ffns": {"mlp": {"d_ff": 256}}, "dtype": dtype, "tie_embeddings": True,
                     "mixers": {"mamba2": {"d_state": 64, "head_dim": 32},
                                "attention": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 32}}})
    m = build(cfg)
    params = m.init(mx.random.key(0))
    prepared = stack.prepare_decode(cfg, params)
    assert sorted(prepared["decode_stack"]) == stretches
    prompt = mx.array(np.random.default_rng(1).integers(0, 97, (1, 9)))
    logits, state = m.apply(params, prompt, m.init_state(1, 32))
    assert_decode_matches(mx.compile(m.apply), prepared, params, mx.argmax(logits[:, -1], -1)[:, None], state,
                          steps=4, tol=2e-4 if dtype == "float32" else 3e-2)
    assert len(calls) >= len(stretches), "the whole-stack kernel did not run for each stretch"


# ---------------------------------------------------------------- decode gemv (+ grouped RMSNorm)
@given(M=st.integers(1, 3), IN=st.sampled_from([8, 40, 256, 300, 2048]), OUT=st.sampled_from([1, 7, 64, 300]),
       ng=st.sampled_from([0, 1, 2]), bias=st.booleans(), dt=st.sampled_from(["f32", "bf16"]),
       seed=st.integers(0, 2**16))
def test_gemv_kernel_matches_ref(M, IN, OUT, ng, bias, dt, seed):
    from alloy.metal.gemv import gemv
    if ng and IN % ng:
        ng = 1
    rng = np.random.default_rng(seed)
    dtype = DTYPES[dt]
    x, W = arr(rng, (M, 1, IN), dtype), arr(rng, (OUT, IN), dtype, IN ** -0.5)
    nw, b = arr(rng, (IN,), dtype), (arr(rng, (OUT,), dtype) if bias else None)
    y = gemv(x, W, b, nw if ng else None, ng, 1e-5)
    f64 = lambda a: np.array(a.astype(mx.float32)).astype(np.float64)  # noqa: E731  (GPU fp32 matmul is TF32)
    xf = f64(x)
    if ng:
        g = xf.reshape(M, 1, ng, IN // ng)
        xf = (g / np.sqrt((g * g).mean(-1, keepdims=True) + 1e-5)).reshape(M, 1, IN) * f64(nw)
    want = mx.array((xf @ f64(W).T + (0 if b is None else f64(b))).astype(np.float32))
    assert y.shape == (M, 1, OUT) and y.dtype == dtype
    assert rel_err(y, want) <= TOL[dt]


# ---------------------------------------------------------------- gated delta rule, recurrent kernel
@given(b=st.integers(1, 2), T=st.sampled_from([1, 2, 7, 33]), hk=st.sampled_from([1, 2]), r=st.sampled_from([1, 2]),
       K=st.sampled_from([8, 32, 128]), V=st.sampled_from([5, 32, 70]), per_channel=st.booleans(),
       l2=st.booleans(), dt=st.sampled_from(["f32", "bf16"]), state=st.booleans(), seed=st.integers(0, 2**16))
def test_gated_delta_recurrent_kernel_matches_ref(b, T, hk, r, K, V, per_channel, l2, dt, state, seed):
    from alloy.ops.gated_delta import gated_delta, gated_delta_ref
    rng = np.random.default_rng(seed)
    dtype, H = DTYPES[dt], hk * r
    q, k = arr(rng, (b, T, hk, K), dtype), arr(rng, (b, T, hk, K), dtype)
    if not l2:  # unnormalised keys must stay small for a stable rule
        q, k = q * (K ** -0.5), k * (K ** -0.5)
    v = arr(rng, (b, T, H, V), dtype)
    g = -pos(rng, (b, T, H, K) if per_channel else (b, T, H), 0.01, 1.0)
    beta = pos(rng, (b, T, H), 0.05, 0.95)
    s0 = arr(rng, (b, H, K, V)) if state else None
    o, s = gated_delta(q, k, v, g, beta, s0, l2norm=l2, impl="kernel")
    orf, sr = gated_delta_ref(q, k, v, g, beta, s0, l2norm=l2)
    assert o.dtype == orf.dtype and s.dtype == mx.float32
    assert rel_err(o, orf) <= TOL[dt] and rel_err(s, sr) <= (2e-4 if dt == "f32" else 3e-2)


def test_gated_delta_kernel_gradients_and_auto_dispatch():
    import alloy.ops.gated_delta as gd
    rng = np.random.default_rng(3)
    q, k, v = arr(rng, (1, 9, 2, 16)), arr(rng, (1, 9, 2, 16)), arr(rng, (1, 9, 4, 8))
    g, beta, s0 = -pos(rng, (1, 9, 4), 0.01, 0.5), pos(rng, (1, 9, 4), 0.1, 0.9), arr(rng, (1, 4, 16, 8))
    ct = arr(rng, (1, 9, 4, 8))
    assert_grads_match(gd.gated_delta, (q, k, v, g, beta, s0), (ct,), "kernel", "ref", 1e-3)
    assert gd.kernel_applies(q, v)


# ---------------------------------------------------------------- gated delta rule, chunked with the pass kernel
@given(b=st.integers(1, 2), T=st.sampled_from([65, 100, 200]), hk=st.sampled_from([1, 2]), r=st.sampled_from([1, 2]),
       K=st.sampled_from([16, 64, 128]), V=st.sampled_from([5, 40]), per_channel=st.booleans(),
       dt=st.sampled_from(["f32", "bf16"]), state=st.booleans(), seed=st.integers(0, 2**16))
def test_gated_delta_chunk_pass_kernel_matches_ref(b, T, hk, r, K, V, per_channel, dt, state, seed):
    from alloy.ops.gated_delta import gated_delta, gated_delta_ref
    rng = np.random.default_rng(seed)
    dtype, H = DTYPES[dt], hk * r
    q, k = arr(rng, (b, T, hk, K), dtype), arr(rng, (b, T, hk, K), dtype)
    v = arr(rng, (b, T, H, V), dtype)
    g = -pos(rng, (b, T, H, K) if per_channel else (b, T, H), 0.01, 0.5)
    beta = pos(rng, (b, T, H), 0.05, 0.95)
    s0 = arr(rng, (b, H, K, V)) if state else None
    o, s = gated_delta(q, k, v, g, beta, s0, impl="kernel")
    orf, sr = gated_delta_ref(q, k, v, g, beta, s0)
    tol = 2e-3 if dt == "f32" else 3e-2  # the chunked form's matmuls may run in TF32
    assert o.dtype == orf.dtype and rel_err(o, orf) <= tol and rel_err(s, sr) <= tol


# ---------------------------------------------------------------- gated delta rule, tensor-core WY kernels
@given(b=st.integers(1, 2), T=st.sampled_from([65, 130, 1000]), hk=st.sampled_from([1, 2]), r=st.sampled_from([1, 2]),
       V=st.sampled_from([32, 64, 128]), l2=st.booleans(), dt=st.sampled_from(["bf16", "f16"]),
       state=st.booleans(), seed=st.integers(0, 2**16))
def test_gated_delta_wy_kernels_match_ref(b, T, hk, r, V, l2, dt, state, seed):
    from alloy.metal import gated_delta_wy as wy
    from alloy.ops.gated_delta import gated_delta, gated_delta_ref
    rng = np.random.default_rng(seed)
    dtype, H, K = {"bf16": mx.bfloat16, "f16": mx.float16}[dt], hk * r, 128
    q, k = arr(rng, (b, T, hk, K), dtype), arr(rng, (b, T, hk, K), dtype)
    if not l2:
        q, k = q * (K ** -0.5), k * (K ** -0.5)
    v = arr(rng, (b, T, H, V), dtype)
    g = -pos(rng, (b, T, H), 0.01, 0.5)
    beta = pos(rng, (b, T, H), 0.05, 0.95)
    s0 = arr(rng, (b, H, K, V)) if state else None
    assert wy.applies(q, k, v, g)
    o, s = gated_delta(q, k, v, g, beta, s0, l2norm=l2, impl="kernel")
    orf, sr = gated_delta_ref(q, k, v, g, beta, s0, l2norm=l2)
    assert o.dtype == orf.dtype and rel_err(o, orf) <= 3e-2 and rel_err(s, sr) <= 3e-2


def test_gated_delta_wy_gradients_match_chunked():
    from alloy.ops.gated_delta import gated_delta
    rng = np.random.default_rng(6)
    bf = mx.bfloat16
    q, k, v = arr(rng, (1, 80, 1, 128), bf), arr(rng, (1, 80, 1, 128), bf), arr(rng, (1, 80, 2, 32), bf)
    g, beta, s0 = -pos(rng, (1, 80, 2), 0.01, 0.5), pos(rng, (1, 80, 2), 0.1, 0.9), arr(rng, (1, 2, 128, 32))
    ct = arr(rng, (1, 80, 2, 32), bf)
    assert_grads_match(gated_delta, (q, k, v, g, beta, s0), (ct,), "kernel", "chunked", 3e-2)


def test_gated_delta_chunk_pass_gradients_match_chunked():
    from alloy.ops.gated_delta import gated_delta
    rng = np.random.default_rng(5)
    q, k, v = arr(rng, (1, 80, 2, 16)), arr(rng, (1, 80, 2, 16)), arr(rng, (1, 80, 2, 8))
    g, beta, s0 = -pos(rng, (1, 80, 2), 0.01, 0.5), pos(rng, (1, 80, 2), 0.1, 0.9), arr(rng, (1, 2, 16, 8))
    ct = arr(rng, (1, 80, 2, 8))
    assert_grads_match(gated_delta, (q, k, v, g, beta, s0), (ct,), "kernel", "chunked", 2e-3)
