"""The Mamba-2 fused decode path (`ops.ssd.mamba2_step` + norm + out_proj, taken on GPUs at T = 1)
against the layer's general path, which is the specification. On the CPU the fused op runs its
reference composition; `tests/metal/test_kernels_gpu.py` checks the kernel against that reference."""
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alloy.layers import mamba2
from alloy.ops.ssd import mamba2_step


def setup(seed, b, d_model, head_dim, d_state, n_groups, d_conv, conv_bias, rms_norm, clamp):
    cfg = mamba2.Mamba2Settings(d_model=d_model, head_dim=head_dim, d_state=d_state, n_groups=n_groups,
                                d_conv=d_conv, conv_bias=conv_bias, rms_norm=rms_norm,
                                dt_clamp_min=clamp[0], dt_clamp_max=clamp[1])
    params = mamba2.init(mx.random.key(seed), cfg)
    rng = np.random.default_rng(seed)
    state = mamba2.init_state(cfg, b, 8)
    state = {"conv": mx.array(rng.standard_normal(state["conv"].shape).astype(np.float32)),
             "ssm": mx.array(rng.standard_normal(state["ssm"].shape).astype(np.float32))}
    x = mx.array(rng.standard_normal((b, 1, d_model)).astype(np.float32))
    return cfg, params, state, x


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), heads_per_group=st.sampled_from([1, 2, 3]), n_groups=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([4, 8]), d_state=st.sampled_from([4, 16]), d_conv=st.sampled_from([2, 4]),
       conv_bias=st.booleans(), rms_norm=st.booleans(),
       clamp=st.sampled_from([(0.0, 0.0), (1e-3, 0.0), (0.05, 0.2)]), seed=st.integers(0, 999))
def test_fused_decode_equals_general_path(b, heads_per_group, n_groups, head_dim, d_state, d_conv, conv_bias,
                                          rms_norm, clamp, seed):
    d_model = heads_per_group * n_groups * head_dim // 2  # expand 2: heads = d_inner / head_dim
    cfg, params, state, x = setup(seed, b, d_model, head_dim, d_state, n_groups, d_conv, conv_bias,
                                  rms_norm, clamp)
    ref, ref_state = mamba2.apply(params, x, state, cfg)  # CPU: the general path
    out, new_state = mamba2._fused_decode(params, x, state, cfg)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-4, atol=1e-4)
    for k in ("conv", "ssm"):
        np.testing.assert_allclose(np.array(new_state[k]), np.array(ref_state[k]), rtol=1e-5, atol=1e-5)


def test_fused_residual_block_equals_norm_apply_add():
    """With the stack's pre-norm weight and the residual folded in (the GPU decode block's form),
    the fused path equals h + apply(rms_norm(h))."""
    from alloy.ops.norm import rms_norm
    cfg, params, state, h = setup(5, 2, 16, 8, 16, 2, 4, True, True, (0.0, 0.0))
    w = mx.array(np.random.default_rng(5).uniform(0.5, 1.5, (16,)).astype(np.float32))
    y, ref_state = mamba2.apply(params, rms_norm(h, w, 1e-6), state, cfg)
    out, new_state = mamba2._fused_decode(params, h, state, cfg, w, 1e-6, residual=h)
    np.testing.assert_allclose(np.array(out), np.array(h + y), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(new_state["ssm"]), np.array(ref_state["ssm"]), rtol=1e-5, atol=1e-5)


def test_mamba2_step_names_bad_shapes():
    cfg, params, state, x = setup(0, 1, 8, 4, 4, 1, 4, True, True, (0.0, 0.0))
    zx = mamba2.dense(params["in_proj"], x)[:, 0]
    args = (params["conv1d"]["weight"], params["conv1d"]["bias"], state["conv"], params["dt_bias"],
            params["A_log"], params["D"], (0.0, float("inf")), state["ssm"])
    with pytest.raises(ValueError, match="zxbcdt width"):
        mamba2_step(zx[:, :-1], *args)
    with pytest.raises(ValueError, match="conv_state"):
        mamba2_step(zx, args[0], args[1], state["conv"][:, 1:], *args[3:])
    with pytest.raises(ValueError, match="impl"):
        mamba2_step(zx, *args, impl="fast")


def test_stack_uses_a_registered_residual_block_and_falls_back_on_none():
    """The stack's hook for fused inference blocks (Mamba-2's GPU decode block uses it): with state,
    a mixer's residual_block replaces norm + apply + residual; returning None keeps the general path."""
    from dataclasses import dataclass

    from alloy.layers.registry import LayerSettings, register_mixer
    from alloy.model import as_config, build

    @dataclass(frozen=True)
    class S(LayerSettings):
        fuse: bool = True

    calls = []

    def block(params, h, norm_weight, eps, state, cfg):
        calls.append(h.shape)
        return (h * 0 + 7.0, {"n": state["n"] + 1}) if cfg.fuse else None

    @register_mixer("_test_resblock", settings=S, init=lambda key, cfg: {}, state="ssm",
                    init_state=lambda cfg, b, n, dtype: {"n": mx.zeros((b,))}, residual_block=block,
                    replace=True)
    def apply(params, x, state, cfg):
        return x * 0, (None if state is None else {"n": state["n"] - 1})

    try:
        _check_resblock(build, as_config, calls)
    finally:  # keep the global registry as the other tests expect it
        from alloy.layers import registry
        registry._REGISTRY["mixer"].pop("_test_resblock", None)


def _check_resblock(build, as_config, calls):
    for fuse in (True, False):
        m = build(as_config({"vocab_size": 11, "d_model": 8, "layer_types": ["_test_resblock"],
                             "ffn_types": ["none"], "mixers": {"_test_resblock": {"fuse": fuse}}}))
        p = m.init(mx.random.key(0))
        tok = mx.array([[1, 2]])
        _, st = m.apply(p, tok, m.init_state(1, 4))
        assert float(st["layers"][0]["mixer"]["n"][0]) == (1.0 if fuse else -1.0)
        m.apply(p, tok)  # no state: never the fused block
    assert len(calls) == 2  # asked once per stateful apply (the second time it declined), never without state


def test_prepare_decode_stacks_a_pure_mamba2_stack_and_keeps_its_outputs():
    """`prepare_decode`: a pure Mamba-2 stack gets ``decode_stack`` and per-layer projection weights
    that are views of it (same values, the model's outputs unchanged on the CPU, where the whole-stack
    kernel does not apply); hybrids, FFN stacks and quantized params come back unchanged."""
    from alloy.layers.stack import prepare_decode
    from alloy.model import as_config, build
    from alloy.params.quantize import quantize
    base = {"name": "m", "vocab_size": 61, "d_model": 32, "layer_types": ["mamba2"] * 3,
            "ffn_types": ["none"] * 3, "mixers": {"mamba2": {"d_state": 8, "head_dim": 8}}}
    cfg = as_config(base)
    m = build(cfg)
    params = m.init(mx.random.key(0))
    prepared = prepare_decode(cfg, params)
    st = prepared["decode_stack"]["0"]
    assert st["win"].shape == (3, params["layers"][0]["mixer"]["in_proj"]["weight"].shape[0], 32)
    for i, lp in enumerate(params["layers"]):
        assert mx.array_equal(prepared["layers"][i]["mixer"]["in_proj"]["weight"], lp["mixer"]["in_proj"]["weight"])
        assert mx.array_equal(st["wout"][i], lp["mixer"]["out_proj"]["weight"])
    assert prepare_decode(cfg, prepared) is prepared
    # the per-layer projections are views of the stacks: preparing (and dropping the original tree)
    # keeps one copy of the weights, not two
    import gc

    from mlx.utils import tree_flatten
    one_copy = sum(v.nbytes for _, v in tree_flatten(params))
    del params, prepared, st
    gc.collect()
    mem0 = mx.get_active_memory()
    kept = prepare_decode(cfg, m.init(mx.random.key(0)))
    gc.collect()
    assert "decode_stack" in kept and mx.get_active_memory() - mem0 < 1.25 * one_copy
    del kept
    params = m.init(mx.random.key(0))
    prepared = prepare_decode(cfg, params)
    st = prepared["decode_stack"]["0"]
    toks = mx.array([[1, 2, 3, 4]])
    a, sa = m.apply(params, toks, m.init_state(1, 8))
    b, sb = m.apply(prepared, toks, m.init_state(1, 8))
    assert mx.array_equal(a, b)
    a, _ = m.apply(params, toks[:, :1], sa)
    b, _ = m.apply(prepared, toks[:, :1], sb)
    assert mx.array_equal(a, b)
    q = quantize(params, 4, 32)
    assert "decode_stack" not in prepare_decode(cfg, q)
    for other in ({**base, "ffn_types": ["mlp"] * 3, "ffns": {"mlp": {"d_ff": 64}}},
                  {**base, "layer_types": ["mamba2", "attention", "mamba2"]}):
        c = as_config(other)
        p = build(c).init(mx.random.key(0))
        assert "decode_stack" not in prepare_decode(c, p)
