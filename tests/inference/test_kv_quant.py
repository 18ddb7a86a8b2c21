"""Quantized KV rings (`alloy.inference.quantize_kv`, `generate(kv_bits=...)`): logits stay close to
the full-precision cache (bounds below), the rings shrink, batched rows equal rows alone, bad
settings are named."""
import mlx.core as mx
import numpy as np
import pytest

import alloy
from alloy.inference import generate, quantize_kv
from alloy.params.tree import tree_bytes

CFG = {"name": "kvq", "vocab_size": 97, "d_model": 64,
       "layer_types": ["mamba2", "attention", "sliding_attention", "attention"],
       "mixers": {"mamba2": {"head_dim": 16, "d_state": 8, "chunk_size": 8},
                  "attention": {"n_heads": 2, "n_kv_heads": 1}, "sliding_attention": {"n_heads": 2, "window": 6}},
       "ffns": {"mlp": {"d_ff": 96}}}


@pytest.fixture(scope="module")
def model():
    m = alloy.build(CFG)
    return m, m.init(mx.random.key(0))


def cached_logits(m, p, state, toks):
    out = []
    for a, b in ((0, 15), (15, toks.shape[1])):  # two prompt chunks (the second crosses the window)
        logits, state = m.apply(p, toks[:, a:b], state)
        out.append(logits)
    for t in range(6):  # then decode steps
        logits, state = m.apply(p, toks[:, t:t + 1], state)
        out.append(logits)
    return mx.concatenate(out, axis=1)


@pytest.mark.parametrize("bits,bound", [(8, 2e-3), (4, 3e-2)])
def test_quantized_cache_logits_stay_close(model, bits, bound):
    m, p = model
    toks = mx.array(np.random.default_rng(0).integers(0, 97, (2, 23)))
    full = cached_logits(m, p, m.init_state(2, 40), toks)
    quant = cached_logits(m, p, quantize_kv(m, m.init_state(2, 40), bits), toks)
    diff = float(mx.abs(full - quant).max()) / max(float(mx.abs(full).max()), 1.0)
    assert 0.0 < diff <= bound  # quantization is active, and its error is bounded


def test_quantized_rings_are_smaller(model):
    m, _ = model
    s = m.init_state(1, 256)
    ring = lambda st: sum(tree_bytes({k: st["layers"][i]["mixer"][k] for k in ("k", "v")})  # noqa: E731
                          for i in (1, 2, 3))
    full, q8, q4 = ring(s), ring(quantize_kv(m, s, 8)), ring(quantize_kv(m, s, 4))
    assert q8 < 0.4 * full and q4 < 0.25 * full  # fp32 cache: 8 bits + scales/biases per 32
    assert tree_bytes(quantize_kv(m, s, 8)["layers"][0]) == tree_bytes(s["layers"][0])  # SSM state untouched


def test_generate_with_quantized_kv_batched_equals_alone(model):
    m, p = model
    rows = [[5, 9, 13, 2, 7, 7, 1, 30, 4], [8, 3, 3]]
    batched = [[] for _ in rows]
    for ev in generate(m, p, rows, max_tokens=6, kv_bits=8):
        batched[ev.row].append(ev.token)
    for r, row in enumerate(rows):
        alone = [ev.token for ev in generate(m, p, [row], max_tokens=6, kv_bits=8)]
        assert alone == batched[r]


def test_bad_kv_settings_are_named(model):
    m, p = model
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_kv(m, m.init_state(1, 8), 3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_kv(m, m.init_state(1, 8), 8, group_size=48)


def test_shared_attention_calls_are_quantized_too():
    """Zamba-style shared blocks keep a KV ring per call site: quantize_kv covers them."""
    cfg = {"vocab_size": 37, "d_model": 32, "layer_types": ["mamba2", "mamba2", "mamba2"],
           "mixers": {"mamba2": {"d_state": 8, "head_dim": 16}},
           "shared": {"n_blocks": 1, "at": [0, 2], "attention": {"n_heads": 2},
                      "mlp": {"d_ff": 40}, "adapter_rank": 2}}
    m = alloy.build(cfg)
    p = m.init(mx.random.key(1))
    s = quantize_kv(m, m.init_state(1, 32), 8)
    assert [isinstance(ls.get("shared", {}).get("k"), dict) for ls in s["layers"]] == [True, False, True]
    toks = mx.array(np.random.default_rng(2).integers(0, 37, (1, 20)))
    full = cached_logits(m, p, m.init_state(1, 32), toks)
    quant = cached_logits(m, p, s, toks)
    diff = float(mx.abs(full - quant).max()) / max(float(mx.abs(full).max()), 1.0)
    assert 0.0 < diff <= 2e-3


def test_prefix_cache_with_quantized_kv_reuses_and_matches(model):
    """Snapshots of quantized states serve quantized requests only; reuse gives the same tokens."""
    m, p = model
    from alloy.inference import PrefixCache
    prompt = [5, 9, 13, 2, 7, 7, 1, 30, 4, 11, 12, 40, 3]
    plain = [ev.token for ev in generate(m, p, [prompt], max_tokens=5, kv_bits=8)]
    cache = PrefixCache()
    first = [ev.token for ev in generate(m, p, [prompt[:8]], max_tokens=3, kv_bits=8, prefix_cache=cache)]
    assert len(first) == 3 and cache.misses == 1
    again = [ev.token for ev in generate(m, p, [prompt], max_tokens=5, kv_bits=8, prefix_cache=cache)]
    assert cache.hits == 1 and cache.reused_tokens == 8 and again == plain
    [ev.token for ev in generate(m, p, [prompt], max_tokens=2, prefix_cache=cache)]  # full-precision KV
    assert cache.misses == 2  # a quantized snapshot does not serve an unquantized request
