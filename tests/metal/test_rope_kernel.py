"""The RoPE layout kernels (`alloy.metal.rope`) on the CPU emulator against the reference
(`alloy.ops.rope.rope_ref` of the transposed input; its gradient by MLX autodiff): full and partial
rotary, both pair layouts, one offset or one per row, fp32 / bf16 / fp16, odd T, with and without
eight-pair vectors; and the attention layer with `ROPE_KERNEL` on == off (output, gradients, a cached
chunk and decode step) behind a faked GPU backend."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import rope as kern
from alloy.ops.rope import rope_inv_freq, rope_ref, rope_tables

rope_ops = importlib.import_module("alloy.ops.rope")  # the package re-exports a function named rope

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")

# both round once from float32 math on the same float32 tables: equal up to a rounding of the dtype
TOL = {mx.float32: 1e-6, mx.bfloat16: 8e-3, mx.float16: 1e-3}


def _np(a):
    return np.array(a.astype(mx.float32))


def _offset(kind, B):
    return {"int": 3, "scalar": mx.array(5, dtype=mx.int32),
            "rows": mx.array([0, 7, 2][:B], dtype=mx.int32)}[kind]


# (B, T, H, D, dims, traditional, offset): D 32 full / 32 of 48 (vectors) / 12 of 20 (no vectors:
# dims/2 = 6), odd T, T = 1 (a decode row), per-row offsets
CASES = [
    (2, 7, 3, 32, 32, False, "int"),
    (2, 7, 3, 32, 32, True, "rows"),
    (1, 9, 2, 48, 32, False, "scalar"),
    (2, 5, 2, 48, 32, True, "int"),
    (3, 5, 2, 20, 12, False, "rows"),
    (2, 3, 3, 20, 12, True, "scalar"),
    (3, 1, 2, 32, 32, False, "rows"),
]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}r{c[4]}{'trad' if c[5] else ''}-{c[6]}"
                                             for c in CASES])
def test_rope_kernels_match_reference(case, dtype):
    B, T, H, D, dims, trad, off_kind = case
    offset = _offset(off_kind, B)
    x = mx.random.normal((B, T, H, D), key=mx.random.key(0)).astype(dtype)
    dy = mx.random.normal((B, H, T, D), key=mx.random.key(1)).astype(dtype)
    cos, sin = rope_tables(T, offset, dims, 500.0, 1.0)
    xt = x.transpose(0, 2, 1, 3)
    want = rope_ref(xt, offset, dims, 500.0, trad)
    # the gradient of the reference by autodiff, back in x's layout
    _, (want_dx,) = mx.vjp(lambda a: [rope_ref(a.transpose(0, 2, 1, 3), offset, dims, 500.0, trad)], [x], [dy])
    with emulate.patch(kern, poison=True):
        y = kern.rope_heads(x, cos, sin, trad)
        dx, dc, ds = kern.rope_heads_vjp(x, cos, sin, dy, trad)
    tol = TOL[dtype]
    assert y.shape == (B, H, T, D) and y.dtype == dtype
    assert dx.shape == (B, T, H, D) and dx.dtype == dtype
    np.testing.assert_allclose(_np(y), _np(want), rtol=tol, atol=tol, err_msg="forward")
    np.testing.assert_allclose(_np(dx), _np(want_dx), rtol=tol, atol=tol, err_msg="gradient")
    # the copied tail is bit-exact both ways
    assert mx.array_equal(y[..., dims:], xt[..., dims:])
    assert mx.array_equal(dx[..., dims:], dy.transpose(0, 2, 1, 3)[..., dims:])
    assert not mx.any(dc).item() and not mx.any(ds).item()


def test_rope_heads_dispatch_matches_plain_path_with_gradient(monkeypatch):
    """`rope_heads` behind a faked GPU backend (the kernels on the emulator, wired through
    `metal.differentiable`) == its plain path (transpose + rope) off the GPU, with a scaled, YaRN
    frequency table and attention factor; and mx.vjp through it == autodiff of the reference."""
    import alloy.metal as metal

    B, T, H, D, dims = 2, 6, 2, 32, 16
    inv = rope_inv_freq(dims, 1000.0, "yarn", 4.0, original_max_position=64)
    offset = mx.array([3, 11], dtype=mx.int32)
    x = mx.random.normal((B, T, H, D), key=mx.random.key(2))
    dy = mx.random.normal((B, H, T, D), key=mx.random.key(3))
    kw = dict(traditional=False, scale=0.5, inv_freq=inv, attention_factor=1.3)
    f = lambda a: [rope_ops.rope_heads(a, offset, dims, 1000.0, **kw)]  # noqa: E731
    want_y, (want_dx,) = mx.vjp(f, [x], [dy])  # the plain path (no GPU backend)

    def ref(a):  # independent: the reference rotation, then the factor on the rotated features
        r = rope_ref(a.transpose(0, 2, 1, 3), offset, dims, scale=0.5, inv_freq=inv)
        return [mx.concatenate([r[..., :dims] * 1.3, r[..., dims:]], axis=-1)]
    ref_y, (ref_dx,) = mx.vjp(ref, [x], [dy])
    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    monkeypatch.setattr(metal, "PACK_INPUTS", False)
    rope_ops._rope_heads_kernel.cache_clear()
    with emulate.patch(kern, poison=True):
        got_y, (got_dx,) = mx.vjp(f, [x], [dy])
        assert kern.FWD.calls == 1 and kern.BWD.calls == 1  # the kernels ran, both ways
    rope_ops._rope_heads_kernel.cache_clear()
    for got, want in ((got_y[0], want_y[0]), (got_y[0], ref_y[0]), (got_dx, want_dx), (got_dx, ref_dx)):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_attention_layer_rope_kernel_on_equals_off(monkeypatch, partial):
    """The attention layer's public apply with ROPE_KERNEL on (the kernels, emulated, behind a faked
    GPU backend) == off: a full forward and every gradient, then a cached chunk (per-row offsets) and
    a decode step."""
    import alloy.metal as metal
    from alloy.layers import attention as attn

    cfg = attn.AttentionSettings(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
                                 partial_rotary_factor=partial)
    params = attn.init(mx.random.key(4), cfg)
    x = mx.random.normal((2, 5, 64), key=mx.random.key(5))
    ct = mx.random.normal((2, 5, 64), key=mx.random.key(6))

    def run(on):
        monkeypatch.setattr(attn, "ROPE_KERNEL", on)
        y = attn.apply(params, x, None, cfg)[0]
        g = mx.grad(lambda p, x: (attn.apply(p, x, None, cfg)[0] * ct).sum(), argnums=(0, 1))(params, x)
        st = attn.init_state(cfg, 2, 16)
        st = {**st, "pos": mx.array([0, 3], dtype=mx.int32)}  # rows at different positions
        yc, st = attn.apply(params, x, st, cfg)
        yd, st = attn.apply(params, x[:, :1], st, cfg)
        return [y, yc, yd, st["k"]], g

    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    monkeypatch.setattr(metal, "PACK_INPUTS", False)
    rope_ops._rope_heads_kernel.cache_clear()
    with emulate.patch(kern, poison=True):
        on, g1 = run(True)
        assert kern.FWD.calls == 6 and kern.BWD.calls == 2  # q, k: forward, grad, chunk; the gradient
    off, g0 = run(False)
    rope_ops._rope_heads_kernel.cache_clear()
    for name, a, b in zip(("forward", "chunk", "decode", "k cache"), on, off):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.array(g1[1]), np.array(g0[1]), rtol=1e-4, atol=1e-5, err_msg="dx")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        np.testing.assert_allclose(np.array(g1[0][name]["weight"]), np.array(g0[0][name]["weight"]),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
