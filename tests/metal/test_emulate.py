"""The portable kernels on the CPU emulator (`alloy.metal.emulate`): each kernel's own launcher runs
with its KERNEL swapped for an emulated one (`emulate.patch`), against the MLX references on the CPU,
in float32 and bfloat16; plus the emulator's own semantics — warp ops, grid_sync across groups — and
that it catches broken kernels (a wrong body, a missing barrier, a deadlock, a bad grid_sync target,
an out-of-bounds write, a compile error). Skipped where no g++ is available.
"""
import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import conv1d as conv_mod
from alloy.metal import emulate
from alloy.metal import gemv as gemv_mod
from alloy.metal import mamba2_step as m2_mod
from alloy.metal import ssd_step as ssd_mod
from alloy.metal.prelude import Kernel
from alloy.metal.testing import DTYPES, arr, pos, rel_err
from alloy.ops.conv import causal_conv1d_ref
from alloy.ops.ssd import mamba2_step_ref, ssd_step

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")

TOL = {"f32": 1e-5, "bf16": 2e-2}  # float32 on the CPU is exact up to summation order; bf16: one rounding


# ---------------------------------------------------------------- the existing kernels
def gemv_case(rng, dt, ng, bias, res, M=2, IN=80, OUT=20):
    dtype = DTYPES[dt]
    x, W = arr(rng, (M, 1, IN), dtype), arr(rng, (OUT, IN), dtype, IN ** -0.5)
    nw = arr(rng, (IN,), dtype)
    b = arr(rng, (OUT,), dtype) if bias else None
    r = arr(rng, (M, 1, OUT), dtype) if res else None
    f64 = lambda a: np.array(a.astype(mx.float32)).astype(np.float64)  # noqa: E731
    xf = f64(x)
    if ng:
        g = xf.reshape(M, 1, ng, IN // ng)
        xf = (g / np.sqrt((g * g).mean(-1, keepdims=True) + 1e-5)).reshape(M, 1, IN) * f64(nw)
    want = xf @ f64(W).T + (0 if b is None else f64(b)) + (0 if r is None else f64(r))
    args = (x, W, b, nw if ng else None, ng, 1e-5)
    return args, r, mx.array(want.astype(np.float32))


@pytest.mark.parametrize("dt,ng,bias,res", [("f32", 0, False, False), ("f32", 2, True, True),
                                            ("bf16", 1, False, True), ("bf16", 0, True, False)])
def test_gemv(dt, ng, bias, res):
    args, r, want = gemv_case(np.random.default_rng(0), dt, ng, bias, res)
    with emulate.patch(gemv_mod):
        y = gemv_mod.gemv(*args, residual=r)
    assert y.shape == want.shape and y.dtype == DTYPES[dt]
    assert rel_err(y, want) <= TOL[dt]


def test_serial_schedules_are_deterministic():
    """One thread at a time, in either order, gives the free-running result bit for bit."""
    args, _, want = gemv_case(np.random.default_rng(1), "f32", 0, False, False)
    ys = []
    for schedule in ("threads", "forward", "reverse"):
        with emulate.patch(gemv_mod, schedule=schedule):
            ys.append(np.array(gemv_mod.gemv(*args)))
    assert (ys[0] == ys[1]).all() and (ys[0] == ys[2]).all()
    assert rel_err(mx.array(ys[0]), want) <= TOL["f32"]


@pytest.mark.parametrize("dt,n,bias,lim", [("f32", 48, True, (0.05, 0.3)), ("bf16", 32, False, (0.0, float("inf")))])
def test_mamba2_step(dt, n, bias, lim):
    rng = np.random.default_rng(2)
    b, g, r, p, K = 2, 2, 2, 16, 4
    dtype, H = DTYPES[dt], g * r
    DI, CD = H * p, H * p + 2 * g * n
    zx = arr(rng, (b, DI + CD + H), dtype)
    w, cb = arr(rng, (CD, K), dtype, 0.5), (arr(rng, (CD,), dtype) if bias else None)
    cs = arr(rng, (b, K - 1, CD), dtype)
    dtb, alog, D = arr(rng, (H,), scale=0.5), pos(rng, (H,), -1.0, 2.0), arr(rng, (H,))
    ss = arr(rng, (b, H, p, n))
    with emulate.patch(m2_mod):
        got = m2_mod.mamba2_step(zx, w, cb, cs, dtb, alog, D, mx.array(lim, dtype=mx.float32), ss)
    want = mamba2_step_ref(zx, w, cb, cs, dtb, alog, D, lim, ss)
    assert [a.dtype for a in got] == [a.dtype for a in want]
    assert rel_err(got[0], want[0]) <= TOL[dt]
    assert rel_err(got[1], want[1]) == 0.0  # the conv state is a shift of inputs
    assert rel_err(got[2], want[2]) <= (2e-5 if dt == "f32" else 1e-2)


@pytest.mark.parametrize("dt,silu,B,T,C,vw", [
    ("f32", True, 2, 19, 70, 1), ("bf16", False, 2, 19, 70, 1),  # odd C: one channel per thread
    ("bf16", True, 2, 19, 72, 8), ("f32", False, 2, 40, 72, 8),  # 8 channels per thread; T past whole tiles
    ("bf16", True, 2, 2, 72, 8),                                 # T < K - 1: the new state keeps part of the old
    ("bf16", False, 2, 1, 72, 8), ("f32", True, 1, 1, 72, 1),    # one step; a single row (any offset): VW 1
])
def test_conv1d(dt, silu, B, T, C, vw):
    rng = np.random.default_rng(3)
    K = 4
    dtype = DTYPES[dt]
    x, w = arr(rng, (B, T, C), dtype), arr(rng, (C, K), dtype, 0.5)
    bias, s = arr(rng, (C,), dtype), arr(rng, (B, K - 1, C), dtype)
    assert conv_mod._plan(x, None)[0] == vw
    with emulate.patch(conv_mod, poison=True):
        y, ns = conv_mod.causal_conv1d(x, w, bias, s, silu)
    yr, nsr = causal_conv1d_ref(x, w, bias, s, "silu" if silu else None)
    assert y.dtype == yr.dtype and ns.dtype == nsr.dtype
    assert rel_err(y, yr) <= TOL[dt]
    assert rel_err(ns, nsr) == 0.0


@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_ssd_step(dt):
    rng = np.random.default_rng(4)
    b, g, r, p, n = 2, 2, 3, 5, 40
    dtype, h = DTYPES[dt], g * r
    x, dtv = arr(rng, (b, h, p), dtype), pos(rng, (b, h), 0.01, 0.6)
    A, D = -pos(rng, (h,), 0.3, 3.0), arr(rng, (h,))
    B, C = arr(rng, (b, g, n), dtype, 0.5), arr(rng, (b, g, n), dtype, 0.5)
    s0 = arr(rng, (b, h, p, n))
    with emulate.patch(ssd_mod):
        y, s = ssd_mod.ssd_step(x, dtv, A, B, C, D, s0)
    yr, sr = ssd_step(x, dtv, A, B, C, D, s0)
    assert y.dtype == dtype and s.dtype == mx.float32
    assert rel_err(y, yr) <= TOL[dt]
    assert rel_err(s, sr) <= 2e-5


# ---------------------------------------------------------------- emulator semantics
BASICS = Kernel(
    name="emu_test_basics",
    inputs=("x", "m"),
    outputs=("sh", "ws", "info", "z"),
    body="""
  const int i = bid_x * nthreads + tid;
  const float v = static_cast<float>(x[i]);
  sh[i] = static_cast<T>(shfl_xor(v, MASK));
  ws[i] = warp_sum(v);
  if (i == 0) {
    info[0] = x_shape[0]; info[1] = x_ndim; info[2] = m_shape[1]; info[3] = static_cast<int>(m_strides[0]);
    info[4] = m[7]; info[5] = lane; info[6] = warp;
  }
  if (i % 2) z[i] = static_cast<T>(v);
""",
)


@pytest.mark.parametrize("dt", ["bf16", "f16"])
def test_warp_ops_shapes_dtypes_and_init_value(dt):
    dtype = {"bf16": mx.bfloat16, "f16": mx.float16}[dt]
    rng = np.random.default_rng(5)
    x = arr(rng, (128,), dtype)
    m = mx.arange(15, dtype=mx.int32).reshape(3, 5)
    poison = dt == "f16"  # bf16: init_value fills the outputs; f16: NaN bytes (unwritten elements)
    sh, ws, info, z = emulate.run(BASICS, [x, m], template=[("T", dtype), ("MASK", 5)], grid=(2, 1, 1),
                                  threadgroup=64, output_shapes=[(128,), (128,), (8,), (128,)],
                                  output_dtypes=[dtype, mx.float32, mx.int32, dtype],
                                  init_value=None if poison else 3, poison=poison)
    xv = np.array(x.astype(mx.float32))
    idx = np.arange(128)
    assert sh.dtype == dtype and (np.array(sh.astype(mx.float32)) == xv[idx ^ 5]).all()
    v = xv.reshape(4, 32)
    for msk in (16, 8, 4, 2, 1):  # the CUDA butterfly, in float32: bit-identical
        v = (v + v[:, np.arange(32) ^ msk]).astype(np.float32)
    assert (np.array(ws) == v.reshape(-1)).all()
    assert np.array(info).tolist() == [128, 1, 5, 5, 7, 0, 0, -1 if poison else 3]  # info[7]: never written
    zf = np.array(z.astype(mx.float32))
    assert (zf[1::2] == xv[1::2]).all()
    assert np.isnan(zf[::2]).all() if poison else (zf[::2] == 3).all()


RING = Kernel(
    name="emu_test_ring",
    inputs=("x", "counter"),
    outputs=("a", "b"),
    body="""
  // R rounds of v <- v + (v of the next group), across groups, ping-ponging between a and b
  const int G = x_shape[0] / nthreads;
  const int i = bid_x * nthreads + tid;
  const int j = ((bid_x + 1) % G) * nthreads + tid;
  a[i] = x[i];
  for (int k = 1; k <= R; ++k) {
    if (MODE == 3) BARRIER(); else grid_sync(counter, k * G + (MODE == 1 ? 1 : 0) - (MODE == 2 ? 1 : 0), tid);
    const float* src = k % 2 ? a : b;
    float* dst = k % 2 ? b : a;
    dst[i] = ld_cg(&src[i]) + ld_cg(&src[j]);
  }
""",
)


def ring(mode, schedule="threads", G=4, nt=64, R=3, **kw):
    x = np.random.default_rng(6).standard_normal(G * nt).astype(np.float32)
    a, b = emulate.run(RING, [x, np.zeros(1, np.uint32)], template=[("R", R), ("MODE", mode)], grid=(G, 1, 1),
                       threadgroup=nt, output_shapes=[(G * nt,), (G * nt,)],
                       output_dtypes=[mx.float32, mx.float32], schedule=schedule, **kw)
    v = x.reshape(G, nt)
    for _ in range(R):
        v = v + np.roll(v, -1, axis=0)
    return np.array(b if R % 2 else a), v.reshape(-1)


@pytest.mark.parametrize("schedule", ["threads", "reverse"])
def test_grid_sync_orders_groups(schedule):
    got, want = ring(0, schedule)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_grid_barrier_replaced_by_group_barrier_is_a_race():
    got, want = ring(3, "forward")  # group 0 reads group 1's part before group 1 has run
    assert not np.allclose(got, want)


@pytest.mark.parametrize("mode,match", [(1, "spin forever"), (2, "pass before")])
def test_grid_sync_target_is_checked(mode, match):
    with pytest.raises(emulate.EmulatorError, match=match):
        ring(mode)


def test_grid_sync_needs_the_whole_grid_resident():
    with pytest.raises(emulate.EmulatorError, match="max_threads"):
        ring(0, G=4, nt=64, max_threads=128)


REVERSE = Kernel(
    name="emu_test_reverse",
    inputs=("x",),
    outputs=("y",),
    body="""
  SHARED float s[NT];
  s[tid] = x[bid_x * NT + tid];
  if (SYNC) BARRIER();
  y[bid_x * NT + tid] = s[NT - 1 - tid];
""",
)


@pytest.mark.parametrize("schedule", ["forward", "reverse", "threads"])
def test_missing_barrier_shows_up(schedule):
    x = np.arange(256, dtype=np.float32) + 1
    want = x.reshape(2, 128)[:, ::-1].reshape(-1)

    def go(sync):
        (y,) = emulate.run(REVERSE, [x], template=[("NT", 128), ("SYNC", sync)], grid=(2, 1, 1), threadgroup=128,
                           output_shapes=[(256,)], output_dtypes=[mx.float32], schedule=schedule)
        return np.array(y)
    assert (go(True) == want).all()
    if schedule != "threads":  # free threads may or may not interleave badly; serial ones always do
        assert not (go(False) == want).all()


def test_wrong_kernel_body_fails_against_the_reference(monkeypatch):
    body = gemv_mod.KERNEL.body.replace("acc = warp_sum(acc);", "")
    assert body != gemv_mod.KERNEL.body, "gemv body changed: update this test's edit"
    monkeypatch.setattr(gemv_mod, "KERNEL", emulate.emulated(dataclasses.replace(gemv_mod.KERNEL, body=body)))
    args, _, want = gemv_case(np.random.default_rng(0), "f32", 0, False, False)
    assert rel_err(gemv_mod.gemv(*args), want) > 0.1


@pytest.mark.parametrize("schedule", ["threads", "forward"])
def test_deadlock_is_reported_not_hung(schedule):
    k = Kernel("emu_test_deadlock", ("counter",), ("y",), """
  if (tid < 32) grid_sync(counter, 2, tid); else BARRIER();
  y[bid_x * nthreads + tid] = 1.0f;
""")
    with pytest.raises(emulate.EmulatorError, match="deadlock"):
        emulate.run(k, [np.zeros(1, np.uint32)], template=[], grid=(2, 1, 1), threadgroup=64,
                    output_shapes=[(128,)], output_dtypes=[mx.float32], schedule=schedule)


def test_out_of_bounds_write_and_misaligned_ld8_are_caught():
    k = Kernel("emu_test_bounds", ("x",), ("y",), """
  float o[8];
  ld8(x + LD, o);
  y[tid + OFF] = o[0];
""")

    def go(ld, off):
        return emulate.run(k, [mx.zeros((64,), mx.bfloat16)], template=[("LD", ld), ("OFF", off)], grid=(1, 1, 1),
                           threadgroup=32, output_shapes=[(32,)], output_dtypes=[mx.float32])
    go(8, 0)
    with pytest.raises(emulate.EmulatorError, match="outside output `y`"):
        go(8, 3)
    with pytest.raises(emulate.EmulatorError, match="16-byte aligned"):
        go(4, 0)


def test_compile_error_names_the_source():
    k = Kernel("emu_test_broken", ("x",), ("y",), "y[tid] = no_such_helper(x[tid]);")
    with pytest.raises(emulate.EmulatorCompileError, match=r"(?s)\.cpp.*no_such_helper.*not declared: no_such_helper"):
        emulate.run(k, [np.zeros(32, np.float32)], template=[], grid=(1, 1, 1), threadgroup=32,
                    output_shapes=[(32,)], output_dtypes=[mx.float32])


@pytest.mark.parametrize("dt,silu,T,C", [("f32", True, 19, 70), ("f32", False, 2, 70), ("bf16", True, 40, 70),
                                         ("bf16", True, 19, 72), ("f32", False, 2, 72), ("f32", True, 1, 72),
                                         ("bf16", False, 40, 72)])
def test_conv1d_gradient_kernel(dt, silu, T, C):
    """The gradient kernel against MLX autodiff of the reference, one (odd C) and eight (C = 72)
    channels per thread (T = 2 < K - 1 and T = 1 reach the state through new_state's cotangent too)."""
    rng = np.random.default_rng(4)
    B, K = 2, 4
    dtype = DTYPES[dt]
    x, w = arr(rng, (B, T, C), dtype), arr(rng, (C, K), dtype, 0.5)
    bias, s = arr(rng, (C,), dtype), arr(rng, (B, K - 1, C), dtype)
    dy, dns = arr(rng, (B, T, C), dtype), arr(rng, (B, K - 1, C), dtype)
    assert conv_mod._plan(x, None)[0] == (8 if C % 8 == 0 else 1)
    with emulate.patch(conv_mod, poison=True):
        got = conv_mod.causal_conv1d_vjp(x, w, bias, s, dy, dns, silu)
    _, want = mx.vjp(lambda *a: list(causal_conv1d_ref(*a, "silu" if silu else None)), [x, w, bias, s], [dy, dns])
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert rel_err(g, r) <= (1e-5 if dt == "f32" else 2e-2)


@pytest.mark.parametrize("dt,nbg,G,D", [("f32", False, None, 128), ("f32", True, 32, 128), ("bf16", False, 64, 128),
                                        ("bf16", False, 256, 512), ("f32", True, None, 256)])
@pytest.mark.parametrize("hold", [True, False])
def test_gated_rms_norm_kernels(monkeypatch, dt, nbg, G, D, hold):
    """Forward and gradient kernels against the reference and its autodiff (rows not a multiple of
    the rows per group / warp, one and several groups per row, one and eight columns per lane; the
    row kept in registers for the second pass, or loaded again)."""
    from alloy.metal import gated_norm as gn_mod
    if not hold:
        monkeypatch.setattr(gn_mod, "HOLD_FWD", 0)
        monkeypatch.setattr(gn_mod, "HOLD_BWD", 0)
    from alloy.ops.norm import gated_rms_norm_ref
    rng = np.random.default_rng(5)
    dtype = DTYPES[dt]
    x, z, w = arr(rng, (3, 23, D), dtype), arr(rng, (3, 23, D), dtype), arr(rng, (D,), dtype)
    dy = arr(rng, (3, 23, D), dtype)
    ref = lambda x, z, w: gated_rms_norm_ref(x, z, w, 1e-5, G, nbg)  # noqa: E731
    with emulate.patch(gn_mod, poison=True):
        y = gn_mod.gated_rms_norm(x, z, w, 1e-5, G, nbg)
        got = gn_mod.gated_rms_norm_vjp(x, z, w, 1e-5, G, nbg, dy)
    tol = 1e-5 if dt == "f32" else 2e-2
    assert y.dtype == x.dtype and rel_err(y, ref(x, z, w)) <= tol
    _, want = mx.vjp(ref, [x, z, w], [dy])
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert rel_err(g, r) <= tol * 3
