"""Sampling functions against numpy references; SamplingParams validation; keyed sampling."""
import alloy  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, strategies as st

from alloy.inference import sampling as S
from alloy.inference.sampling import SamplingParams, make_sampler


def _logits(seed, B=3, V=17):
    return np.random.default_rng(seed).normal(0, 2, (B, V)).astype(np.float32)


def _kept(x):
    return np.isfinite(np.array(x))


@given(seed=st.integers(0, 10_000), k=st.integers(1, 17))
def test_top_k_keeps_the_k_largest(seed, k):
    lg = _logits(seed)
    kept = _kept(S.top_k(mx.array(lg), k))
    ref = np.zeros_like(kept)
    np.put_along_axis(ref, np.argsort(-lg, axis=-1)[:, :k], True, axis=-1)
    assert (kept == ref).all()


@given(seed=st.integers(0, 10_000), p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_nucleus(seed, p):
    lg = _logits(seed)
    kept = _kept(S.top_p(mx.array(lg), p))
    probs = np.exp(lg - lg.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for b in range(lg.shape[0]):
        order = np.argsort(-probs[b])
        csum = np.cumsum(probs[b][order])
        n = int(np.searchsorted(csum, p - 1e-6) + 1)  # smallest prefix with mass >= p
        ref = np.zeros(lg.shape[1], bool)
        ref[order[:min(n, lg.shape[1])]] = True
        assert (kept[b] == ref).all()
        assert kept[b][order[0]]


@given(seed=st.integers(0, 10_000), p=st.floats(0.0, 0.99))
def test_min_p_keeps_tokens_within_a_factor_of_the_top(seed, p):
    lg = _logits(seed)
    kept = _kept(S.min_p(mx.array(lg), p))
    probs = np.exp(lg - lg.max(-1, keepdims=True))  # relative to the top probability
    assert (kept == (probs >= p - 1e-6)).all() or p == 0.0 and kept.all()


def test_penalties_match_the_formulas():
    lg = _logits(1)
    counts = np.random.default_rng(2).integers(0, 3, lg.shape).astype(np.int32)
    out = np.array(S.apply_penalties(mx.array(lg), mx.array(counts), 1.3, 0.5, 0.25))
    seen = counts > 0
    ref = np.where(seen, np.where(lg > 0, lg / 1.3, lg * 1.3), lg) - 0.5 * seen - 0.25 * counts
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    # neutral settings change nothing
    np.testing.assert_array_equal(np.array(S.apply_penalties(mx.array(lg), mx.array(counts))), lg)


def test_logit_bias_temperature_greedy_and_counts():
    lg = _logits(3)
    sampler = make_sampler(SamplingParams(logit_bias={4: 100.0}), vocab_size=lg.shape[1])
    tok, logp = sampler(mx.random.key(0), mx.array(lg), mx.zeros((3, 1), mx.int32))
    assert tok.tolist() == [4, 4, 4]
    ref_logp = lg[:, 4] - np.log(np.exp(lg).sum(-1))  # raw-distribution logprob
    np.testing.assert_allclose(np.array(logp), ref_logp, rtol=1e-5)
    np.testing.assert_allclose(np.array(S.apply_temperature(mx.array(lg), 0.5)), lg * 2, rtol=1e-6)
    assert S.greedy(mx.array(lg)).tolist() == lg.argmax(-1).tolist()
    c = S.update_counts(S.token_counts([[1, 1, 2], [0]], 5), mx.array([2, 0]))
    assert c.tolist() == [[0, 2, 2, 0, 0], [2, 0, 0, 0, 0]]


def test_keyed_sampling_is_reproducible_and_follows_the_distribution():
    lg = np.log(np.array([[0.1, 0.6, 0.3]], np.float32))
    sampler = make_sampler(temperature=1.0)
    counts = mx.zeros((1, 1), mx.int32)
    draws = [sampler(k, mx.array(np.repeat(lg, 4000, 0)), counts)[0] for k in mx.random.split(mx.random.key(5), 2)]
    freq = np.bincount(np.array(draws[0]), minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.03)
    again = sampler(mx.random.split(mx.random.key(5), 2)[0], mx.array(np.repeat(lg, 4000, 0)), counts)[0]
    assert (np.array(again) == np.array(draws[0])).all()
    assert not (np.array(draws[1]) == np.array(draws[0])).all()
    # top_k = 1 at any temperature is greedy
    tk = make_sampler(temperature=2.0, top_k=1)
    assert tk(mx.random.key(0), mx.array(_logits(7)), counts)[0].tolist() == _logits(7).argmax(-1).tolist()


@pytest.mark.parametrize("field,value,msg", [
    ("temperature", -1.0, "temperature"), ("top_k", -2, "top_k"), ("top_k", 1.5, "top_k"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("min_p", 1.0, "min_p"),
    ("repetition_penalty", 0.0, "repetition_penalty"), ("temperature", float("nan"), "temperature"),
    ("logit_bias", {-1: 1.0}, "logit_bias"), ("logit_bias", [(1, 2.0), (1, 3.0)], "logit_bias"),
])
def test_bad_sampling_params_name_the_field(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**{field: value})


def test_sampling_params_are_hashable_and_checked_against_the_vocab():
    a = SamplingParams(temperature=0.7, logit_bias={3: 1.0, 1: -2.0})
    assert a == SamplingParams(temperature=0.7, logit_bias=[(1, -2.0), (3, 1.0)]) and hash(a)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make_sampler(SamplingParams(logit_bias={99: 1.0}), vocab_size=10)
    with pytest.raises(ValueError, match="not both"):
        make_sampler(SamplingParams(), temperature=1.0)
