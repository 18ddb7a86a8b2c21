"""The persistent whole-stack Mamba-2 decode kernel (`alloy.metal.mamba2_stack`) run on the CPU
emulator (`alloy.metal.emulate`: the portable body compiled as C++, one OS thread per GPU thread,
real group and grid barriers), through the model's own decode path, against the model's general
per-layer path. A small grid (3 groups of 64 threads) makes every group own several rows of every
phase and cross the grid barriers many times."""
import functools

import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate, mamba2_stack
from alloy.metal.testing import assert_decode_matches, rel_err

pytestmark = pytest.mark.skipif(not emulate.available(), reason="the CPU kernel emulator needs g++")


@pytest.fixture
def emulated_stack(monkeypatch):
    """Route the model's whole-stack decode through the emulator with a 3 x 64-thread grid and
    256-column work units (rows wider than 256 split into several units)."""
    calls = []
    real = mamba2_stack.launch

    def launch(stacked, x, convs, ssms, **kw):
        calls.append(x.shape)
        run = functools.partial(emulate.run, mamba2_stack.kernel(len(convs)))
        return real(stacked, x, convs, ssms, nb=3, threads=64, run=run, cu=1, **kw)

    def applies(stacked, x, act_dtype, d_state, norm_groups):
        return mamba2_stack.fits(mamba2_stack.dims_of(stacked, d_state, norm_groups), x.shape[0], act_dtype, 3)

    monkeypatch.setattr(mamba2_stack, "launch", launch)
    monkeypatch.setattr(mamba2_stack, "applies", applies)
    return calls


@pytest.mark.parametrize("dtype,batch,n_groups,d_state,rms,bias,d_conv,d_model", [
    ("float32", 2, 2, 32, True, True, 4, 32),
    ("bfloat16", 1, 1, 40, True, False, 3, 32),   # d_state not a multiple of 32: the remainder lanes
    ("float32", 3, 1, 32, False, True, 2, 32),    # no norm before out_proj
    ("bfloat16", 1, 1, 32, True, False, 4, 160),  # out_proj rows of 320 columns: two units per row
])
def test_stack_kernel_on_emulator_matches_general_path(emulated_stack, dtype, batch, n_groups, d_state, rms,
                                                       bias, d_conv, d_model):
    from alloy.layers.stack import prepare_decode
    from alloy.model import as_config, build
    cfg = as_config({"name": "m", "vocab_size": 53, "d_model": d_model, "layer_types": ["mamba2"] * 3,
                     "ffn_types": ["none"] * 3, "dtype": dtype, "tie_embeddings": True,
                     "mixers": {"mamba2": {"d_state": d_state, "head_dim": 8, "n_groups": n_groups,
                                           "rms_norm": rms, "conv_bias": bias, "d_conv": d_conv,
                                           "dt_clamp_min": 1e-3, "dt_clamp_max": 0.5}}})
    m = build(cfg)
    params = m.init(mx.random.key(3))
    prepared = prepare_decode(cfg, params)
    prompt = mx.array(np.random.default_rng(0).integers(0, 53, (batch, 5)))
    _, state = m.apply(params, prompt, m.init_state(batch, 16))
    tok = mx.array(np.random.default_rng(1).integers(0, 53, (batch, 1)))
    # two tokens: the second starts from the kernel's own states
    assert_decode_matches(m.apply, prepared, params, tok, state, steps=2, tol=1e-5 if dtype == "float32" else 3e-2)
    assert len(emulated_stack) == 2


def test_emulated_stack_check_can_fail(emulated_stack, monkeypatch):
    """The comparison can fail: the same kernel without the D skip gives different logits."""
    from alloy.layers.stack import prepare_decode
    from alloy.metal.prelude import Kernel
    from alloy.model import as_config, build
    cfg = as_config({"name": "m", "vocab_size": 53, "d_model": 32, "layer_types": ["mamba2"] * 2,
                     "ffn_types": ["none"] * 2, "dtype": "float32", "tie_embeddings": True,
                     "mixers": {"mamba2": {"d_state": 32, "head_dim": 8}}})
    m = build(cfg)
    params = m.init(mx.random.key(3))
    prepared = prepare_decode(cfg, params)
    good = mamba2_stack.kernel(2)
    skip = " + hds[i] * xv"
    assert skip in good.body
    broken = Kernel(good.name + "_broken", good.inputs, good.outputs, good.body.replace(skip, ""))
    monkeypatch.setattr(mamba2_stack, "kernel", lambda n: broken)
    state = m.init_state(1, 16)
    tok = mx.array([[7]])
    lk, _ = m.apply(prepared, tok, state)
    lr, _ = m.apply(params, tok, state)
    assert rel_err(lk, lr) > 1e-3


def test_hybrid_mamba2_stretch_runs_in_one_launch(emulated_stack, monkeypatch):
    """A hybrid with one Mamba-2 stretch between attention + MLP blocks: the stretch decodes in one
    launch of the kernel, and logits and every layer's state match the general path. With
    `alloy.layers.stack.MULTI_STRETCH` off, a hybrid with two stretches is not stacked."""
    from alloy.layers import stack
    from alloy.layers.stack import prepare_decode
    from alloy.model import as_config, build

    def config(types):
        return as_config({"name": "m", "vocab_size": 53, "d_model": 32, "layer_types": types,
                          "ffn_types": ["mlp" if t == "attention" else "none" for t in types],
                          "ffns": {"mlp": {"d_ff": 64}}, "dtype": "float32", "tie_embeddings": True,
                          "mixers": {"mamba2": {"d_state": 32, "head_dim": 8},
                                     "attention": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 8}}})
    two = config(["mamba2", "mamba2", "attention", "mamba2", "mamba2"])
    monkeypatch.setattr(stack, "MULTI_STRETCH", False)
    assert "decode_stack" not in prepare_decode(two, build(two).init(mx.random.key(5)))
    monkeypatch.setattr(stack, "MULTI_STRETCH", True)
    assert sorted(prepare_decode(two, build(two).init(mx.random.key(5)))["decode_stack"]) == ["0", "3"]
    cfg = config(["attention", "mamba2", "mamba2", "mamba2", "attention", "mamba2"])
    m = build(cfg)
    params = m.init(mx.random.key(5))
    prepared = prepare_decode(cfg, params)
    assert sorted(prepared["decode_stack"]) == ["1"]
    prompt = mx.array(np.random.default_rng(2).integers(0, 53, (1, 6)))
    _, state = m.apply(params, prompt, m.init_state(1, 16))
    assert_decode_matches(m.apply, prepared, params, mx.array([[7]]), state, steps=1, tol=1e-5)
    assert emulated_stack == [(1, 32)]


def test_hybrid_two_stretches_run_in_one_launch_each(emulated_stack, monkeypatch):
    """With `alloy.layers.stack.MULTI_STRETCH` on (the default), each of two Mamba-2 stretches decodes
    in its own launch (each with its own barrier scratch), matching the general path."""
    from alloy.layers import stack
    from alloy.metal import mamba2_stack
    from alloy.model import as_config, build
    monkeypatch.setattr(stack, "MULTI_STRETCH", True)
    sizes = []
    real_zeros = mx.zeros
    monkeypatch.setattr(mamba2_stack.mx, "zeros", lambda shape, *a, **k: sizes.append(shape) or real_zeros(shape, *a, **k))
    cfg = as_config({"name": "m", "vocab_size": 53, "d_model": 32,
                     "layer_types": ["mamba2", "mamba2", "attention", "mamba2", "mamba2"],
                     "ffn_types": ["none", "none", "mlp", "none", "none"], "ffns": {"mlp": {"d_ff": 64}},
                     "dtype": "float32", "tie_embeddings": True,
                     "mixers": {"mamba2": {"d_state": 32, "head_dim": 8},
                                "attention": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 8}}})
    m = build(cfg)
    params = m.init(mx.random.key(6))
    prepared = stack.prepare_decode(cfg, params)
    assert sorted(prepared["decode_stack"]) == ["0", "3"]
    prompt = mx.array(np.random.default_rng(3).integers(0, 53, (1, 5)))
    _, state = m.apply(params, prompt, m.init_state(1, 16))
    assert_decode_matches(m.apply, prepared, params, mx.array([[9]]), state, steps=1, tol=1e-5)
    assert emulated_stack == [(1, 32), (1, 32)]
    assert (1024,) in sizes and (1024 + 32 * 3,) in sizes  # a scratch buffer of its own per stretch
