"""The hybrid stack: cached decoding == full forward, one trace per decode shape, open registry."""
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import alloy
import alloy.ops
import alloy.params
import mlx.core as mx

from alloy.layers import registered

EVERY_MIXER_CFG = {
    "vocab_size": 97,
    "d_model": 64,
    "layer_types": ["mamba2", "attention", "mamba1", "sliding_attention", "gated_deltanet", "short_conv", "parallel",
                    "rglru", "lightning", "kda", "mla", "dsv4_sliding", "hca", "csa", "mamba2", "attention"],
    "ffn_types": ["mlp", "none", "moe", "mlp", "moe", "mlp", "mlp", "mlp", "moe", "mlp", "moe", "hash_moe", "mlp",
                  "hash_moe", "none", "mlp"],
    "mixers": {
        "mamba2": {"d_state": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 8},
        "mamba1": {"d_state": 8, "chunk_size": 4},
        "attention": {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "partial_rotary_factor": 0.5},
        "sliding_attention": {"n_heads": 4, "n_kv_heads": 1, "window": 5},
        "gated_deltanet": {"n_k_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 8, "chunk_size": 4},
        "short_conv": {"kernel": 3},
        "rglru": {"width": 48, "n_heads": 4},
        "lightning": {"n_heads": 4, "chunk_size": 4},
        "kda": {"n_heads": 2, "head_dim": 8, "chunk_size": 4},
        "mla": {"n_heads": 2, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "rope": True},
        "dsv4_sliding": {"n_heads": 4, "head_dim": 16, "q_lora_rank": 12, "rope_dims": 8, "window": 4, "o_groups": 2,
                         "o_lora_rank": 8},
        "hca": {"n_heads": 2, "head_dim": 16, "q_lora_rank": 12, "rope_dims": 8, "window": 3, "o_groups": 2,
                "o_lora_rank": 8, "compress_rate": 3},
        "csa": {"n_heads": 2, "head_dim": 16, "q_lora_rank": 12, "rope_dims": 8, "window": 3, "o_groups": 1,
                "o_lora_rank": 8, "compress_rate": 2, "index_n_heads": 2, "index_head_dim": 8, "index_topk": 2},
        "parallel": {"branches": {"ssm": {"kind": "mamba2", "head_dim": 16, "d_state": 8, "chunk_size": 4,
                                          "rms_norm": False},
                                  "attn": {"kind": "sliding_attention", "n_heads": 2, "window": 3}}},
    },
    "ffns": {"mlp": {"d_ff": 96}, "moe": {"n_experts": 4, "top_k": 2, "d_ff": 32, "shared_d_ff": 48, "shared_gate": True},
             "hash_moe": {"n_experts": 4, "top_k": 2, "d_ff": 32, "shared_d_ff": 16, "scoring": "sqrtsoftplus",
                          "swiglu_limit": 1.0}},
    "tie_embeddings": False,
}


@pytest.fixture(scope="module")
def hybrid():
    model = alloy.build(EVERY_MIXER_CFG)
    params = model.init(mx.random.key(1))
    # make the recurrences non-trivial: random (not init-time) values everywhere
    params = alloy.params.tree_map(lambda a: a + 0.05 * mx.random.normal(a.shape, key=mx.random.key(a.size))
                                   if mx.issubdtype(a.dtype, mx.floating) else a, params)
    mx.eval(params)
    return model, params


def test_the_hybrid_covers_every_registered_mixer():
    import alloy.layers.builtin  # noqa: F401
    mixers = set(registered("mixer")) - {k for k in registered("mixer") if k.startswith("test_")}
    assert mixers == set(EVERY_MIXER_CFG["layer_types"])
    assert set(registered("ffn")) == set(EVERY_MIXER_CFG["ffn_types"]) - {"none"}


def _tokens(batch, T, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 97, (batch, T)), dtype=mx.int32)


@settings(max_examples=8)
@given(prompt=st.integers(1, 13), steps=st.integers(1, 8), batch=st.integers(2, 3))
def test_prefill_then_steps_equals_full_forward(hybrid, prompt, steps, batch):
    model, params = hybrid
    tokens = _tokens(batch, prompt + steps, seed=prompt * 31 + steps)
    full, none_state = model.apply(params, tokens)
    assert none_state is None
    state = model.init_state(batch, prompt + steps)
    outs = []
    logits, state = model.apply(params, tokens[:, :prompt], state)
    outs.append(logits)
    for t in range(prompt, prompt + steps):
        logits, state = model.apply(params, tokens[:, t:t + 1], state)
        outs.append(logits)
    cached = mx.concatenate(outs, axis=1)
    # fp32 everywhere; differences are summation-order only
    np.testing.assert_allclose(np.array(cached), np.array(full), rtol=1e-4, atol=1e-4)
    assert state["pos"].tolist() == [prompt + steps] * batch


def test_chunked_prefill_equals_one_prefill(hybrid):
    model, params = hybrid
    tokens = _tokens(2, 20, seed=5)
    full, _ = model.apply(params, tokens)
    state = model.init_state(2, 24)
    outs = []
    for a, b in [(0, 7), (7, 8), (8, 20)]:
        logits, state = model.apply(params, tokens[:, a:b], state)
        outs.append(logits)
    np.testing.assert_allclose(np.array(mx.concatenate(outs, 1)), np.array(full), rtol=1e-4, atol=1e-4)


def test_compiled_decode_step_traces_once_over_20_steps(hybrid):
    model, params = hybrid
    traces = []

    def counted(params, tokens, state):
        traces.append(1)  # Python side effects run only while tracing
        return model.apply(params, tokens, state)

    step = mx.compile(counted)
    state = model.init_state(2, 32)
    _, state = model.apply(params, _tokens(2, 4), state)
    tok = _tokens(2, 1)
    eager_state = state
    for _ in range(20):
        logits, state = step(params, tok, state)
        ref, eager_state = model.apply(params, tok, eager_state)
        tok = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
        mx.eval(logits, state)
    assert len(traces) == 1
    np.testing.assert_allclose(np.array(logits), np.array(ref), rtol=1e-4, atol=1e-4)
    assert state["pos"].tolist() == [24, 24]


def test_compile_full_forward_matches_eager(hybrid):
    model, params = hybrid
    tokens = _tokens(2, 11)
    np.testing.assert_allclose(np.array(mx.compile(model.apply)(params, tokens)[0]),
                               np.array(model.apply(params, tokens)[0]), rtol=1e-4, atol=1e-4)


def test_bf16_model_runs_and_keeps_ssm_params_fp32():
    model = alloy.build({**EVERY_MIXER_CFG, "dtype": "bfloat16"})
    params = model.init(mx.random.key(0))
    assert params["embed_tokens"]["weight"].dtype == mx.bfloat16
    for name in ("A_log", "D", "dt_bias"):
        assert params["layers"][0]["mixer"][name].dtype == mx.float32
    state = model.init_state(1, 8)
    logits, state = model.apply(params, _tokens(1, 5), state)
    assert state["layers"][0]["mixer"]["ssm"].dtype == mx.float32
    assert state["layers"][1]["mixer"]["k"].dtype == mx.bfloat16
    assert logits.shape == (1, 5, 97) and bool(mx.isfinite(logits.astype(mx.float32)).all())


def test_backward_through_the_stack_is_finite(hybrid):
    model, params = hybrid
    tokens = _tokens(2, 9)

    def loss(p):
        logits, _ = model.apply(p, tokens[:, :-1])
        return alloy.ops.cross_entropy(logits, tokens[:, 1:])

    grads = mx.grad(loss)(params)
    flat = alloy.params.flatten(grads)
    assert set(flat) == set(alloy.params.flatten(params))
    assert all(bool(mx.isfinite(g).all()) for g in flat.values())
    assert float(mx.abs(flat["layers.0.mixer.A_log"]).sum()) > 0


# -- an outside mixer plugs in without touching the stack ---------------------------------------
@dataclass(frozen=True)
class EmaSettings(alloy.LayerSettings):
    decay: float = 0.9


def ema_init(key, cfg):
    return {"proj": {"weight": mx.random.normal((cfg.d_model, cfg.d_model), key=key) * 0.1}}


def ema_init_state(cfg, batch, max_len, dtype=mx.float32):
    return {"h": mx.zeros((batch, cfg.d_model), dtype=mx.float32)}


def ema_apply(params, x, state, cfg):
    """h_t = decay * h_{t-1} + (1 - decay) * x_t, in closed form (no loop over time)."""
    T = x.shape[1]
    t = mx.arange(T, dtype=mx.float32)
    w = mx.where(t[:, None] >= t[None, :], cfg.decay ** (t[:, None] - t[None, :]), 0.0) * (1 - cfg.decay)
    h0 = mx.zeros((x.shape[0], x.shape[2])) if state is None else state["h"]
    h = mx.einsum("ts,bsd->btd", w, x.astype(mx.float32)) + (cfg.decay ** (t + 1))[None, :, None] * h0[:, None]
    y = h.astype(x.dtype) @ params["proj"]["weight"].T
    return y, (None if state is None else {"h": h[:, -1]})


def test_outside_mixer_registers_and_runs_in_a_stack():
    alloy.register_mixer("test_ema", settings=EmaSettings, init=ema_init, init_state=ema_init_state,
                         state="ssm", mask="none", replace=True)(ema_apply)
    model = alloy.build({"vocab_size": 50, "d_model": 32, "layer_types": ["test_ema", "attention", "test_ema"],
                         "mixers": {"test_ema": {"decay": 0.8}, "attention": {"n_heads": 2}}})
    params = model.init(mx.random.key(0))
    tokens = mx.array(np.random.default_rng(1).integers(0, 50, (2, 9)))
    full, _ = model.apply(params, tokens)
    state = model.init_state(2, 9)
    a, state = model.apply(params, tokens[:, :4], state)
    b, state = model.apply(params, tokens[:, 4:], state)
    np.testing.assert_allclose(np.array(mx.concatenate([a, b], 1)), np.array(full), rtol=1e-4, atol=1e-4)
    assert model.config.mixer(0) == ("test_ema", EmaSettings(d_model=32, decay=0.8))


def test_ffn_only_layers_and_scalar_multipliers_follow_the_block_equations():
    from alloy.layers import mamba2, mlp
    from alloy.ops.norm import rms_norm

    cfg = {"vocab_size": 40, "d_model": 32, "layer_types": ["mamba2", "none"], "ffn_types": ["none", "mlp"],
           "mixers": {"mamba2": {"head_dim": 16, "d_state": 8, "chunk_size": 4}}, "ffns": {"mlp": {"d_ff": 48}},
           "embedding_multiplier": 3.0, "residual_multiplier": 0.5, "logits_scaling": 4.0}
    model = alloy.build(cfg)
    params = model.init(mx.random.key(0))
    assert set(params["layers"][1]) == {"ffn_norm", "ffn"} and set(params["layers"][0]) == {"norm", "mixer"}
    tokens = _tokens(2, 7) % 40
    got, _ = model.apply(params, tokens)
    # by hand
    c = model.config
    h = params["embed_tokens"]["weight"][tokens] * 3.0
    y, _ = mamba2.apply(params["layers"][0]["mixer"], rms_norm(h, params["layers"][0]["norm"]["weight"], c.norm_eps),
                        None, c.mixer(0)[1])
    h = h + 0.5 * y
    y, _ = mlp.apply(params["layers"][1]["ffn"], rms_norm(h, params["layers"][1]["ffn_norm"]["weight"], c.norm_eps),
                     None, c.ffn(1)[1])
    h = h + 0.5 * y
    want = rms_norm(h, params["norm_f"]["weight"], c.norm_eps) @ params["embed_tokens"]["weight"].T / 4.0
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    state = model.init_state(2, 8)
    a, state = model.apply(params, tokens[:, :3], state)
    b, state = model.apply(params, tokens[:, 3:], state)
    np.testing.assert_allclose(np.array(mx.concatenate([a, b], 1)), np.array(got), rtol=1e-4, atol=1e-4)
