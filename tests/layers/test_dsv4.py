"""DeepSeek-V4 parts: the three attention kinds (cached == full across window and compression-block
boundaries, chunked prefill, right padding), hyper-connections (Sinkhorn), hash-routed MoE with
clipping, the integer routing table under training, and bad settings named."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import alloy
import mlx.core as mx

from alloy.layers import hyper
from alloy.layers import moe
from alloy.layers.registry import get_ffn, get_mixer, make_settings
from alloy.params import tree_map

D = 32
BASE = dict(n_heads=4, head_dim=16, q_lora_rank=12, rope_dims=8, o_groups=2, o_lora_rank=8)
KINDS = {"dsv4_sliding": {},
         "hca": {"compress_rate": 3},
         "csa": {"compress_rate": 2, "index_n_heads": 4, "index_head_dim": 8, "index_topk": 2}}


def _layer(kind, window=4, seed=0, **extra):
    s = make_settings("mixer", kind, kind, {**BASE, "window": window, **KINDS[kind], **extra}, D)
    spec = get_mixer(kind)
    p = spec.init(mx.random.key(seed), s)
    # random (not init-time) values everywhere: zero sinks / position biases would hide mistakes
    p = tree_map(lambda a: a + 0.3 * mx.random.normal(a.shape, key=mx.random.key(a.size + seed)), p)
    return spec, s, p


def _x(B, T, seed=5):
    return mx.random.normal((B, T, D), key=mx.random.key(seed))


def _run_chunks(spec, s, p, x, chunks, max_len=None):
    B, T, _ = x.shape
    state = spec.init_state(s, B, max_len or T)
    outs, t = [], 0
    for n in chunks:
        y, state = spec.apply(p, x[:, t:t + n], state, s)
        outs.append(y)
        t += n
    return mx.concatenate(outs, axis=1), state


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), prompt=st.integers(1, 13), steps=st.integers(1, 7),
       window=st.integers(1, 5), batch=st.integers(1, 2))
def test_prefill_then_steps_equals_full_forward(kind, prompt, steps, window, batch):
    spec, s, p = _layer(kind, window)
    x = _x(batch, prompt + steps, seed=prompt * 7 + steps)
    full, _ = spec.apply(p, x, None, s)
    cached, state = _run_chunks(spec, s, p, x, [prompt] + [1] * steps)
    np.testing.assert_allclose(np.array(cached), np.array(full), rtol=1e-4, atol=1e-4)
    assert state["pos"].tolist() == [prompt + steps] * batch


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(["hca", "csa"]), cuts=st.lists(st.integers(1, 9), min_size=2, max_size=4),
       steps=st.integers(1, 4))
def test_chunked_prefill_then_steps_equals_full_forward(kind, cuts, steps):
    """Chunks of any length (shorter and longer than a compression block, not aligned to one)."""
    spec, s, p = _layer(kind, window=3)
    T = sum(cuts) + steps
    x = _x(2, T, seed=T)
    full, _ = spec.apply(p, x, None, s)
    cached, _ = _run_chunks(spec, s, p, x, cuts + [1] * steps, max_len=T + 3)  # spare entry rows too
    np.testing.assert_allclose(np.array(cached), np.array(full), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rope_dims", [8, 0])
def test_long_decode_crosses_many_blocks_and_the_window(rope_dims):
    for kind in KINDS:
        spec, s, p = _layer(kind, window=3, rope_dims=rope_dims)
        x = _x(1, 26)
        full, _ = spec.apply(p, x, None, s)
        cached, state = _run_chunks(spec, s, p, x, [1] * 26)
        np.testing.assert_allclose(np.array(cached), np.array(full), rtol=1e-4, atol=1e-4)
        if kind != "dsv4_sliding":  # the entries written step by step == the ones a prefill writes
            _, pre = _run_chunks(spec, s, p, x, [26])
            n = 26 // s.compress_rate
            np.testing.assert_allclose(np.array(state["compressor"]["entries"][:, :n]),
                                       np.array(pre["compressor"]["entries"][:, :n]), rtol=1e-5, atol=1e-5)


def test_right_padded_rows_match_unpadded_rows():
    """A call with per-row ``valid`` counts: padding is never written and never seen."""
    for kind in KINDS:
        spec, s, p = _layer(kind, window=3)
        x = _x(2, 14)
        lens = [9, 5]
        state = spec.init_state(s, 2, 20)
        y, state = spec.apply(p, x[:, :9], {**state, "valid": mx.array(lens, dtype=mx.int32)}, s)
        state = {k: v for k, v in state.items() if k != "valid"}
        for b, n in enumerate(lens):
            ref, rstate = _run_chunks(spec, s, p, x[b:b + 1, :n], [n], max_len=20)
            np.testing.assert_allclose(np.array(y[b, :n]), np.array(ref[0]), rtol=1e-4, atol=1e-4)
            # continue both one token: same output (the state holds exactly the real tokens)
            nxt = x[b:b + 1, 13:14]
            a, _ = spec.apply(p, nxt, tree_map(lambda v, b=b: v[b:b + 1], state), s)
            r, _ = spec.apply(p, nxt, rstate, s)
            np.testing.assert_allclose(np.array(a), np.array(r), rtol=1e-4, atol=1e-4)


def test_indexer_keeps_topk_and_all_entries_when_topk_is_large():
    spec, s, p = _layer("csa", window=2, index_topk=1)
    x = _x(1, 12)
    few, _ = spec.apply(p, x, None, s)
    s_all = make_settings("mixer", "csa", "csa", {**BASE, "window": 2, **KINDS["csa"], "index_topk": 64}, D)
    many, _ = spec.apply(p, x, None, s_all)
    # queries 0..2 see at most one entry (window m = 2): top-1 changes nothing there; later ones differ
    np.testing.assert_allclose(np.array(few[:, :3]), np.array(many[:, :3]), rtol=1e-5, atol=1e-5)
    assert float(mx.abs(few[:, 3:] - many[:, 3:]).max()) > 1e-3


def test_yarn_frequencies_match_transformers():
    T = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from transformers.modeling_rope_utils import _compute_yarn_parameters
    from alloy.ops.rope import rope_inv_freq
    cfg = T.DeepseekV4Config(hidden_size=32, num_attention_heads=4, head_dim=64, partial_rotary_factor=0.25,
                             rope_parameters={"rope_type": "yarn", "factor": 16.0,
                                              "original_max_position_embeddings": 4096})
    want, _ = _compute_yarn_parameters(cfg, layer_type="compress")
    got = rope_inv_freq(16, 160000.0, "yarn", 16.0, original_max_position=4096)
    np.testing.assert_allclose(np.array(got), want.numpy(), rtol=1e-6)


# -- hyper-connections ------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 5), seed=st.integers(0, 100))
def test_sinkhorn_is_doubly_stochastic(n, seed):
    # the inputs hyper-connections give it: row-softmaxed logits plus eps
    a = mx.softmax(mx.random.normal((3, n, n), key=mx.random.key(seed)), axis=-1) + 1e-6
    m = np.array(hyper.sinkhorn(a, 40, 0.0))
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-5)
    assert (m > 0).all()


def test_hyper_weights_shapes_and_ranges():
    n = 3
    p = hyper.init(mx.random.key(0), n, 8, 0.5)
    h = mx.random.normal((2, 5, n, 8), key=mx.random.key(1))
    pre, post, M = hyper.weights(p, h, 20, 1e-6, 1e-6)
    assert pre.shape == post.shape == (2, 5, n) and M.shape == (2, 5, n, n)
    assert float(pre.min()) > 0 and float(post.max()) < 2
    # the last Sinkhorn pass normalises columns (exact); 20 passes bring rows close
    np.testing.assert_allclose(np.array(M).sum(-2), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.array(M).sum(-1), 1.0, atol=2e-2)


HYPER_CFG = {"vocab_size": 50, "d_model": D, "layer_types": ["dsv4_sliding", "mamba2", "csa"],
             "ffn_types": ["hash_moe", "mlp", "moe"],
             "mixers": {"dsv4_sliding": {**BASE, "window": 3}, "mamba2": {"head_dim": 16, "d_state": 8, "chunk_size": 4},
                        "csa": {**BASE, "window": 3, **KINDS["csa"]}},
             "ffns": {"hash_moe": {"n_experts": 4, "top_k": 2, "d_ff": 16, "scoring": "sqrtsoftplus",
                                   "swiglu_limit": 0.5, "shared_d_ff": 16},
                      "mlp": {"d_ff": 48}, "moe": {"n_experts": 4, "top_k": 2, "d_ff": 16, "router_bias": True}},
             "block_style": "hyper", "hyper": {"streams": 3, "sinkhorn_iters": 6}, "tie_embeddings": False}


def test_hyper_stack_caches_and_round_trips():
    model = alloy.build(HYPER_CFG)
    params = model.init(mx.random.key(2))
    assert params["layers"][0]["mixer_hc"]["fn"].shape == (5 * 3, 3 * D)
    assert params["hc_head"]["fn"].shape == (3, 3 * D) and "ffn_hc" in params["layers"][1]
    tokens = mx.array(np.random.default_rng(0).integers(0, 50, (2, 15)), dtype=mx.int32)
    full, _ = model.apply(params, tokens)
    state = model.init_state(2, 15)
    outs = []
    logits, state = model.apply(params, tokens[:, :6], state)
    outs.append(logits)
    for t in range(6, 15):
        logits, state = model.apply(params, tokens[:, t:t + 1], state)
        outs.append(logits)
    np.testing.assert_allclose(np.array(mx.concatenate(outs, 1)), np.array(full), rtol=1e-4, atol=1e-4)
    assert alloy.ModelConfig.from_dict(model.config.to_dict()) == model.config


# -- MoE: hash routing, scoring, clipping -----------------------------------------------------------
def _moe_settings(kind, **kw):
    return make_settings("ffn", kind, kind, {"n_experts": 4, "top_k": 2, "d_ff": 8, **kw}, 16)


def test_hash_routing_reads_the_table_by_token_id():
    s = _moe_settings("hash_moe", vocab_size=10, scoring="sqrtsoftplus", routed_scaling_factor=1.5)
    p = get_ffn("hash_moe").init(mx.random.key(0), s)
    table = mx.array([[i % 4, (i + 1) % 4] for i in range(10)], dtype=mx.int32)
    p = {**p, "tid2eid": table}
    x = mx.random.normal((6, 16), key=mx.random.key(1))
    tokens = mx.array([3, 3, 7, 0, 9, 2])
    idx, w = moe.route(p, x, s, tokens)
    assert idx.tolist() == table[tokens].tolist()
    scores = np.sqrt(np.logaddexp(np.array(x @ p["router"]["weight"].T), 0))
    want = np.take_along_axis(scores, np.array(idx), -1)
    np.testing.assert_allclose(np.array(w), 1.5 * want / want.sum(-1, keepdims=True), rtol=1e-5)
    y, _ = get_ffn("hash_moe").apply(p, x[None], None, s, tokens=tokens[None])
    np.testing.assert_allclose(np.array(y[0]), np.array(moe.moe_ref(p, x, s, tokens)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        moe.route(p, x, s)


def test_swiglu_limit_clips_gate_above_and_up_both_sides():
    s = _moe_settings("moe", swiglu_limit=0.25)
    act = lambda a: a  # noqa: E731  identity makes the clipping visible
    g, u = mx.array([-3.0, 0.1, 3.0]), mx.array([-3.0, 0.1, 3.0])
    assert moe._glu(act, g, u, s).tolist() == pytest.approx([-3.0 * -0.25, 0.01, 0.25 * 0.25])


def test_optimizers_and_training_leave_the_routing_table_alone():
    from alloy.train import optim, schedule, step as S
    model = alloy.build(HYPER_CFG)
    params = model.init(mx.random.key(0))
    table = params["layers"][0]["ffn"]["tid2eid"]
    assert table.dtype == mx.int32 and table.shape == (50, 2)
    for opt in (optim.adamw(weight_decay=0.5), optim.sgd(momentum=0.5, weight_decay=0.5)):
        step = S.make_train_step(model, opt, schedule.constant(1e-2))
        batch = {"tokens": mx.array(np.random.default_rng(1).integers(0, 50, (2, 9)), dtype=mx.int32)}
        p2, _, metrics = step(params, opt.init(params), batch, mx.random.key(1))
        assert p2["layers"][0]["ffn"]["tid2eid"].tolist() == table.tolist()
        assert np.isfinite(float(metrics["grad_norm"]))


# -- bad settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,fields,match", [
    ("dsv4_sliding", {"o_groups": 3}, "o_groups 3 must divide"),
    ("dsv4_sliding", {"rope_dims": 5}, "rope_dims must be an even int"),
    ("dsv4_sliding", {"window": 0}, "window must be a positive int"),
    ("dsv4_sliding", {"rope_type": "llama3"}, "rope_type must be 'default' or 'yarn'"),
    ("hca", {"compress_rate": 0}, "compress_rate must be a positive int"),
    ("csa", {"index_topk": 0}, "index_topk must be a positive int"),
    ("csa", {"index_head_dim": 4, "rope_dims": 8}, "rope_dims 8 exceeds index_head_dim 4"),
    ("dsv4_sliding", {"compress_rate": 4}, "unknown field"),
])
def test_bad_mixer_settings_are_named(kind, fields, match):
    with pytest.raises(ValueError, match=match):
        alloy.build({"vocab_size": 11, "d_model": D, "layer_types": [kind], "mixers": {kind: {**BASE, **fields}}})


@pytest.mark.parametrize("patch,match", [
    ({"hyper": {"streams": 0}}, "hyper.streams must be a positive int"),
    ({"hyper": {"lanes": 2}}, "hyper: unknown field"),
    ({"block_style": "pre_norm"}, "hyper is only used with block_style 'hyper'"),
    ({"residual_multiplier": 0.5}, "does not combine"),
    ({"ffns": {**HYPER_CFG["ffns"], "hash_moe": {"n_experts": 4, "top_k": 2, "vocab_size": 7}}},
     "vocab_size 7 differs from the model's vocab_size 50"),
    ({"ffns": {**HYPER_CFG["ffns"], "hash_moe": {"n_experts": 4, "top_k": 2, "router_bias": True}}},
     "router_bias and n_group do not apply"),
    ({"ffns": {**HYPER_CFG["ffns"], "moe": {"n_experts": 4, "top_k": 2, "scoring": "relu"}}}, "scoring must be one of"),
    ({"ffns": {**HYPER_CFG["ffns"], "mlp": {"kind": "moe", "swiglu_limit": 1.0, "gated": False}}}, "swiglu_limit clips"),
])
def test_bad_model_settings_are_named(patch, match):
    with pytest.raises(ValueError, match=match):
        alloy.build({**HYPER_CFG, **patch})
