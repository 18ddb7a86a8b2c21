"""Prefix reuse: resuming from a whole-state snapshot gives the same output as no reuse; LRU by bytes."""
import alloy
import numpy as np
import pytest

from alloy.inference import PrefixCache
from alloy.inference.prefix_cache import tree_nbytes


def _gen(model, params, prompt, **kw):
    return [(e.token, e.logprob) for e in alloy.generate(model, params, prompt, max_tokens=6,
                                                         prefill_chunk=4, max_len=64, **kw)]


def _same(a, b):
    assert [t for t, _ in a] == [t for t, _ in b]
    np.testing.assert_allclose([l for _, l in a], [l for _, l in b], atol=1e-4)


def test_reuse_equals_no_reuse_across_turns(hybrid):
    model, params = hybrid
    rng = np.random.default_rng(4)
    turn1 = rng.integers(0, 61, 9).tolist()
    turn2 = turn1 + rng.integers(0, 61, 6).tolist()
    cache = PrefixCache(every=5)
    _same(_gen(model, params, turn1, prefix_cache=cache), _gen(model, params, turn1))
    assert (cache.hits, cache.misses) == (0, 1) and len(cache) == 3  # at 5, 9 (prompt end), reply end
    _same(_gen(model, params, turn2, prefix_cache=cache), _gen(model, params, turn2))
    assert cache.hits == 1 and cache.reused_tokens == 9
    # a prompt that shares only the first 5 tokens resumes from the every-5 snapshot
    other = turn1[:5] + [(t + 1) % 61 for t in turn1[5:]]
    _same(_gen(model, params, other, prefix_cache=cache), _gen(model, params, other))
    assert cache.reused_tokens == 14
    # an exact hit prefills nothing and still matches
    _same(_gen(model, params, turn1, prefix_cache=cache), _gen(model, params, turn1))
    assert cache.reused_tokens == 23


def test_lru_eviction_keeps_the_cache_within_its_byte_budget(hybrid):
    model, params = hybrid
    one = tree_nbytes(model.init_state(1, 64)) + 61 * 4
    cache = PrefixCache(max_bytes=2 * one + 10)
    prompts = [[i, i + 1, i + 2] for i in range(3)]
    for p in prompts:
        _gen(model, params, p, prefix_cache=cache)
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    sig = cache.signature(model, params, 64)
    assert cache.lookup(sig, prompts[0]) is None  # the least recently used went first
    assert cache.lookup(sig, prompts[2] + [7])[0] == 3
    assert cache.lookup(PrefixCache.signature(model, params, 32), prompts[2]) is None  # other max_len


def test_bad_cache_settings_and_batches_are_refused(hybrid):
    model, params = hybrid
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(max_bytes=0)
    with pytest.raises(ValueError, match="every"):
        PrefixCache(every=-1)
    with pytest.raises(ValueError, match="one prompt"):
        _gen(model, params, [[1, 2], [3]], prefix_cache=PrefixCache())


def test_the_next_chat_turn_resumes_after_the_reply(hybrid):
    """generate snapshots the state after prompt + reply; turn 2 = turn 1 + reply + new tokens
    prefills only the new tokens and matches a cold run — for a length and a stop-token finish."""
    model, params = hybrid
    turn1 = np.random.default_rng(6).integers(0, 61, 7).tolist()
    for stop in (False, True):
        cache = PrefixCache()
        cold_reply = [t for t, _ in _gen(model, params, turn1)]
        kw = dict(stop_tokens=[cold_reply[2]]) if stop else {}
        reply = [t for t, _ in _gen(model, params, turn1, prefix_cache=cache, **kw)]
        consumed = len(reply) if stop else len(reply) - 1  # the last token of a length finish is unfed
        turn2 = turn1 + reply + [5, 8, 13]
        _same(_gen(model, params, turn2, prefix_cache=cache), _gen(model, params, turn2))
        assert cache.reused_tokens == len(turn1) + consumed
