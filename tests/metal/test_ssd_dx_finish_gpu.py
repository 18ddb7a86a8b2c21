"""The SSD gradient with dX of the diagonal blocks fused into its finishing pass
(`alloy.metal.ssd_chunked.BWD_DX_FIN_TC`, switch `DX_FINISH_FUSED`) on the GPU (`pytest -m gpu`;
skipped where no CUDA/Metal device), at a toy-model-like shape: batch 2, T 512, 24 heads of 64,
d_state 128, one group, chunk 128, bf16. The emulator tests are tests/metal/test_ssd_dx_finish.py."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

from alloy import metal
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import arr, pos, rel_err
from alloy.ops import ssd

ssd_mod = importlib.import_module("alloy.ops.ssd")  # the package re-exports a function named ssd

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")]


@pytest.fixture(autouse=True)
def _switch_on(monkeypatch):
    """The kernel under test is off by default (slower in the toy step, docs/benchmarks.md session 9):
    these tests turn DX_FINISH_FUSED on (a test that compares on and off sets it itself)."""
    monkeypatch.setattr(kern, "DX_FINISH_FUSED", True)


# as tests/metal/test_kernels_gpu.py for the SSD gradient: bf16 kernels against the written-out MLX
# ops 3e-2, against the reference (bf16 matmul operands) 6e-2
TOL_OPS, TOL_REF = 3e-2, 6e-2


def toy_case(seed=9, b=2, l=512, h=24, p=64, n=128):
    rng = np.random.default_rng(seed)
    x = arr(rng, (b, l, h, p), mx.bfloat16)
    dt = pos(rng, (b, l, h), 0.01, 0.6)
    A = -pos(rng, (h,), 0.3, 3.0)
    B, C = arr(rng, (b, l, 1, n), mx.bfloat16, 0.5), arr(rng, (b, l, 1, n), mx.bfloat16, 0.5)
    D, h0 = arr(rng, (h,)), arr(rng, (b, h, p, n))
    ct, cs = arr(rng, (b, l, h, p), mx.bfloat16), arr(rng, (b, h, p, n))
    return (x, dt, A, B, C, D, h0), (ct, cs)


def grads(args, cts, impl):
    def loss(*a):
        y, s = ssd(*a, chunk_size=128, impl=impl)
        return (y * cts[0]).astype(mx.float32).sum() + (s * cts[1]).sum()
    g = mx.grad(loss, argnums=tuple(range(len(args))))(*args)
    mx.eval(g)
    return g


def test_fused_finish_gradient_at_the_toy_shape(monkeypatch):
    """The kernel path's gradient ("kernels") with DX_FINISH_FUSED on (the fused kernel launched once per
    gradient) equals the one with it off within 1e-2 (the off path rounds C H and B dS to bf16; the
    CPU emulator gave 2.6e-3 at this shape, and 5e-3 against float32 autodiff of `ssd_chunked`), and
    matches the written-out MLX ops ("explicit", 3e-2) and autodiff of the sequential reference on the
    float32 values (6e-2)."""
    args, cts = toy_case()
    monkeypatch.setattr(ssd_mod, "GRADIENT", "kernels")
    launched = []
    real = kern.bwd_dx_finish
    monkeypatch.setattr(kern, "bwd_dx_finish", lambda *a: launched.append(1) or real(*a))
    got = {}
    for on in (True, False):
        monkeypatch.setattr(kern, "DX_FINISH_FUSED", on)
        launched.clear()
        got[on] = grads(args, cts, "kernel")
        assert len(launched) == (1 if on else 0), launched
    monkeypatch.setattr(ssd_mod, "GRADIENT", "explicit")
    ops = grads(args, cts, "kernel")
    ref = grads([a.astype(mx.float32) for a in args], [c.astype(mx.float32) for c in cts], "ref")
    for i in range(len(args)):
        assert got[True][i].shape == args[i].shape and got[True][i].dtype == got[False][i].dtype, i
        assert rel_err(got[True][i], got[False][i]) <= 1e-2, (i, rel_err(got[True][i], got[False][i]))
        assert rel_err(got[True][i], ops[i]) <= TOL_OPS, (i, rel_err(got[True][i], ops[i]))
        assert rel_err(got[True][i], ref[i]) <= TOL_REF, (i, rel_err(got[True][i], ref[i]))


def test_fused_finish_kernel_matches_the_unfused_kernels_on_the_gpu():
    """`bwd_dx_finish` against BWD_DX_TC + the batched products (bf16, as the unfused path) + BWD_FIN
    on the GPU at the toy layer's per-head shape, lengths not whole chunks (T 500)."""
    (x, dt, A, B, C, D, h0), (dy, _) = toy_case(seed=4, l=500)
    b, l, h, p = x.shape
    n, K = B.shape[-1], 128
    nc = -(-l // K)
    rng = np.random.default_rng(5)
    dS, Hs = arr(rng, (b, nc, 1, n, h * p), mx.bfloat16), arr(rng, (b, nc, 1, n, h * p), mx.bfloat16)

    def chunked(v):  # (b, l, ...) -> (b, c, K, ...), zeros past l
        v = mx.pad(v, [(0, 0), (0, nc * K - l)] + [(0, 0)] * (v.ndim - 2))
        return v.reshape(b, nc, K, *v.shape[2:])
    Bg, Cg = chunked(B).transpose(0, 1, 3, 2, 4), chunked(C).transpose(0, 1, 3, 2, 4)   # (b, c, 1, K, n)
    CB = Cg.astype(mx.float32) @ Bg.astype(mx.float32).swapaxes(-1, -2)
    acs = mx.cumsum(chunked(dt) * A, axis=2)                                              # (b, c, K, h)
    got = kern.bwd_dx_finish(CB, acs, x, dt, dy, B, C, dS, Hs, D)
    dXd, _, _ = kern.ssd_chunked_diag_bwd(CB, acs.transpose(0, 1, 3, 2), x, dt, dy)
    want = kern.bwd_finish(x, dy, dt, acs, Cg @ Hs, Bg @ dS, dXd, D)
    for name, a, c in zip(("dx", "ra", "rw", "rx", "rd"), got, want):
        assert a.shape == c.shape and a.dtype == c.dtype, name
        assert rel_err(a, c) <= 1e-2, (name, rel_err(a, c))
