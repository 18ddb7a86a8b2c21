"""The RoPE layout kernels (`alloy.metal.rope`, through `alloy.ops.rope.rope_heads`) on the GPU
(`pytest -m gpu`; skipped where no CUDA/Metal device): the toy attention shape (B 2, T 256, 12 / 4
heads, head dim 64) against the reference `rope_ref` of the transposed input and its autodiff gradient,
and the attention layer with `ROPE_KERNEL` on vs off (forward, gradients, compiled, cached chunk +
decode steps). Tolerances: max |fast - ref| / max(|ref|, 1) <= 1e-5 (fp32) / 1e-2 (bf16: both round
once from float32, so at most one bf16 step apart); the layer comparisons 2e-4 / 3e-2."""
import importlib

import mlx.core as mx
import numpy as np
import pytest

from alloy import metal
from alloy.metal import rope as kern
from alloy.metal.testing import DTYPES, Counted, arr, rel_err
from alloy.ops.rope import rope_inv_freq, rope_ref

rope_ops = importlib.import_module("alloy.ops.rope")  # the package re-exports a function named rope

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")]

TOL = {"f32": 1e-5, "bf16": 1e-2}
TOL_LAYER = {"f32": 2e-4, "bf16": 3e-2}


@pytest.fixture
def counted(monkeypatch):
    fwd, bwd = Counted(kern.FWD), Counted(kern.BWD)
    monkeypatch.setattr(kern, "FWD", fwd)
    monkeypatch.setattr(kern, "BWD", bwd)
    return fwd, bwd


@pytest.mark.parametrize("dt", ["bf16", "f32"])
@pytest.mark.parametrize("H", [12, 4])
@pytest.mark.parametrize("variant", ["plain", "traditional", "partial", "rows", "yarn"])
def test_rope_heads_toy_shape_matches_reference(counted, dt, H, variant):
    rng = np.random.default_rng(H)
    B, T, D = 2, 256, 64
    dtype = DTYPES[dt]
    dims = 32 if variant == "partial" else D
    trad = variant == "traditional"
    offset = mx.array([5, 300], dtype=mx.int32) if variant == "rows" else 7
    inv = rope_inv_freq(dims, 10000.0, "yarn", 8.0, original_max_position=128) if variant == "yarn" else None
    factor = 1.2 if variant == "yarn" else 1.0
    x, dy = arr(rng, (B, T, H, D), dtype), arr(rng, (B, H, T, D), dtype)

    def ref(a):
        r = rope_ref(a.transpose(0, 2, 1, 3), offset, dims, traditional=trad, inv_freq=inv)
        if factor != 1.0:
            r = r * factor  # full rotary here: every feature is rotated
        return [r]

    def fast(a):
        return [rope_ops.rope_heads(a, offset, dims, traditional=trad, inv_freq=inv, attention_factor=factor)]

    want, (want_dx,) = mx.vjp(ref, [x], [dy])
    got, (got_dx,) = mx.vjp(fast, [x], [dy])
    mx.eval(got, got_dx)
    assert counted[0].calls == 1 and counted[1].calls == 1
    assert got[0].shape == (B, H, T, D) and got[0].dtype == dtype and got_dx.dtype == dtype
    assert rel_err(got[0], want[0]) <= TOL[dt]
    assert rel_err(got_dx, want_dx) <= TOL[dt]
    if dims < D:  # the tail is copied bit for bit
        assert mx.array_equal(got[0][..., dims:], x.transpose(0, 2, 1, 3)[..., dims:])


def _layer(dt, **kw):
    from alloy.layers import attention as attn

    cfg = attn.AttentionSettings(d_model=768, n_heads=12, n_kv_heads=4, head_dim=64, **kw)
    params = attn.init(mx.random.key(0), cfg)
    params = {k: {n: w.astype(DTYPES[dt]) for n, w in v.items()} for k, v in params.items()}
    return attn, cfg, params


@pytest.mark.parametrize("dt", ["bf16", "f32"])
@pytest.mark.parametrize("compiled", [False, True])
def test_attention_layer_rope_kernel_on_vs_off(monkeypatch, counted, dt, compiled):
    """The layer's public apply: forward and every gradient agree with ROPE_KERNEL on and off, eager
    and under mx.compile (the training path)."""
    attn, cfg, params = _layer(dt)
    rng = np.random.default_rng(1)
    x, ct = arr(rng, (2, 256, 768), DTYPES[dt]), arr(rng, (2, 256, 768), DTYPES[dt])

    def run(on):
        monkeypatch.setattr(attn, "ROPE_KERNEL", on)

        def loss(p, x):
            return (attn.apply(p, x, None, cfg)[0].astype(mx.float32) * ct.astype(mx.float32)).sum()
        f = mx.value_and_grad(loss, argnums=(0, 1))
        f = mx.compile(f) if compiled else f
        y = attn.apply(params, x, None, cfg)[0]
        _, (gp, gx) = f(params, x)
        mx.eval(y, gp, gx)
        return y, gp, gx

    y1, gp1, gx1 = run(True)
    assert counted[0].calls >= 2 and counted[1].calls >= 2  # q and k, both ways
    y0, gp0, gx0 = run(False)
    assert rel_err(y1, y0) <= TOL_LAYER[dt]
    assert rel_err(gx1, gx0) <= TOL_LAYER[dt]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert rel_err(gp1[name]["weight"], gp0[name]["weight"]) <= TOL_LAYER[dt], name


@pytest.mark.parametrize("dt", ["bf16", "f32"])
def test_attention_layer_cached_chunk_and_decode_with_rope_kernel(monkeypatch, dt):
    """A cached prefill chunk (rows at different positions: per-row offset tables) and then decode steps
    with ROPE_KERNEL on == off, and == the full forward over the whole sequence (invariant 1)."""
    attn, cfg, params = _layer(dt)
    rng = np.random.default_rng(2)
    B, T0, steps = 2, 64, 3
    x = arr(rng, (B, T0 + steps, 768), DTYPES[dt])

    def run(on):
        monkeypatch.setattr(attn, "ROPE_KERNEL", on)
        st = attn.init_state(cfg, B, 128, DTYPES[dt])
        y, st = attn.apply(params, x[:, :T0], st, cfg)
        ys = [y]
        for i in range(steps):
            y, st = attn.apply(params, x[:, T0 + i:T0 + i + 1], st, cfg)
            ys.append(y)
        return mx.concatenate(ys, axis=1), st

    y1, st1 = run(True)
    y0, st0 = run(False)
    assert rel_err(y1, y0) <= TOL_LAYER[dt]
    assert rel_err(st1["k"], st0["k"]) <= TOL_LAYER[dt]
    monkeypatch.setattr(attn, "ROPE_KERNEL", True)
    full = attn.apply(params, x, None, cfg)[0]
    # a different attention path (masked cached chunk, decode steps vs the causal kernel): float32
    # matmuls may run in TF32 on MLX-CUDA (seen 3.4e-4 on an H100), as TOL_SSD in test_kernels_gpu.py
    assert rel_err(y1, full) <= {"f32": 2e-3, "bf16": 3e-2}[dt]

    # rows at different positions: a chunk after an uneven prefix (per-row offsets (B,))
    def uneven(on):
        monkeypatch.setattr(attn, "ROPE_KERNEL", on)
        st = attn.init_state(cfg, B, 128, DTYPES[dt])
        st = {**st, "pos": mx.array([0, 9], dtype=mx.int32)}
        return attn.apply(params, x[:, :T0], st, cfg)

    (ya, sa), (yb, sb) = uneven(True), uneven(False)
    assert rel_err(ya, yb) <= TOL_LAYER[dt]
    assert rel_err(sa["k"], sb["k"]) <= TOL_LAYER[dt]
