"""The SSD forward with the off-diagonal term inside the chunk-output kernel
(`alloy.metal.ssd_chunked.CHUNK_OUT_YO_TC`, switch `OUT_FUSED_YO`) on the GPU (`pytest -m gpu`;
skipped where no CUDA/Metal device), at a toy-like shape (b 2, T 512, 24 heads of 64, d_state 128,
one group, chunk 128, bf16): the forward with the switch on against off, `ssd_ref` and the MLX
`ssd_chunked`, and the gradient through `alloy.ops.ssd.ssd` (which reuses the forward's chunk-entry
states). Tolerances as tests/metal/test_kernels_gpu.py (bf16 SSD chunked: 6e-2 against the
references; 1e-2 between the two kernel paths: one bf16 rounding of y)."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

from alloy import metal
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import Counted, arr, pos, rel_err
from alloy.ops import ssd, ssd_ref

ssd_mod = importlib.import_module("alloy.ops.ssd")  # the package re-exports a function named ssd

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")]


@pytest.fixture(autouse=True)
def _switch_on(monkeypatch):
    """The kernel under test is off by default (slower in the toy step, docs/benchmarks.md session 9):
    these tests turn OUT_FUSED_YO on (a test that compares on and off sets it itself)."""
    monkeypatch.setattr(kern, "OUT_FUSED_YO", True)


TOL_SSD_BF16 = 6e-2


def toy_inputs(rng, b=2, l=512, h=24, p=64, g=1, n=128):
    x = arr(rng, (b, l, h, p), mx.bfloat16)
    dt = pos(rng, (b, l, h), 0.01, 0.6)
    A = -pos(rng, (h,), 0.3, 3.0)
    B = arr(rng, (b, l, g, n), mx.bfloat16, 0.5)
    C = arr(rng, (b, l, g, n), mx.bfloat16, 0.5)
    D = arr(rng, (h,))
    h0 = arr(rng, (b, h, p, n))
    return x, dt, A, B, C, D, h0


def test_fused_yo_forward_matches_switch_off_and_references(monkeypatch):
    rng = np.random.default_rng(0)
    args = toy_inputs(rng)
    K = 128
    res = {}
    for on in (False, True):
        monkeypatch.setattr(kern, "OUT_FUSED_YO", on)
        fused, plain = Counted(kern.CHUNK_OUT_YO_TC), Counted(kern.CHUNK_OUT_TC)
        monkeypatch.setattr(kern, "CHUNK_OUT_YO_TC", fused)
        monkeypatch.setattr(kern, "CHUNK_OUT_TC", plain)
        res[on] = kern.ssd_chunked(*args, K, with_starts=True)
        mx.eval(res[on])
        assert (fused.calls, plain.calls) == ((1, 0) if on else (0, 1)), (on, fused.calls, plain.calls)
        monkeypatch.undo()
    (y1, s1, h1), (y0, s0, h0) = res[True], res[False]
    assert y1.dtype == mx.bfloat16 and h1.dtype == mx.bfloat16
    assert rel_err(y1, y0) <= 1e-2, rel_err(y1, y0)
    assert rel_err(s1, s0) <= 1e-6 and rel_err(h1, h0) <= 1e-6  # the same state products and pass
    yr, sr = ssd_ref(*args)
    assert rel_err(y1, yr) <= TOL_SSD_BF16 and rel_err(s1, sr) <= TOL_SSD_BF16, (rel_err(y1, yr), rel_err(s1, sr))
    yc, _ = ssd_mod.ssd_chunked(*args, chunk_size=K)
    assert rel_err(y1, yc) <= TOL_SSD_BF16, rel_err(y1, yc)
    # the public op under mx.compile takes the same path (the switch is read when tracing)
    monkeypatch.setattr(kern, "OUT_FUSED_YO", True)
    yk, sk = mx.compile(lambda *a: ssd(*a, chunk_size=K, impl="kernel"))(*args)
    assert rel_err(yk, y1) <= 1e-6 and rel_err(sk, s1) <= 1e-6


def test_gradient_through_ssd_unchanged_by_the_fused_forward(monkeypatch):
    """The kernel path's gradient (GRADIENT "kernels", reusing the forward's chunk-entry states) is the
    same with the switch on and off (the backward reads the states, not y), and matches the written-out
    MLX gradient ("explicit") within 3e-2 (bf16 products), as in test_kernels_gpu.py."""
    rng = np.random.default_rng(1)
    args = toy_inputs(rng)
    ct = arr(rng, args[0].shape, mx.bfloat16)
    cs = arr(rng, args[-1].shape)

    def grads(mode, on):
        monkeypatch.setattr(ssd_mod, "GRADIENT", mode)
        monkeypatch.setattr(kern, "OUT_FUSED_YO", on)

        def loss(*a):
            y, s = ssd(*a, chunk_size=128, impl="kernel")
            return (y * ct).astype(mx.float32).sum() + (s * cs).sum()
        g = mx.grad(loss, argnums=tuple(range(len(args))))(*args)
        mx.eval(g)
        return g
    on, off, explicit = grads("kernels", True), grads("kernels", False), grads("explicit", True)
    for i, (a, b, c) in enumerate(zip(on, off, explicit)):
        assert rel_err(a, b) <= 1e-5, f"gradient of argument {i}, switch on vs off: {rel_err(a, b):.3g}"
        assert rel_err(a, c) <= 3e-2, f"gradient of argument {i} vs explicit: {rel_err(a, c):.3g}"
