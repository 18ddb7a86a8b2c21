"""alloy.generate: cached decoding == full forward, batching == one by one, one decode trace,
stops, seeds, streaming text; the sliding-window KV ring == a full forward across the window."""
import alloy
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from alloy.inference import ByteTokenizer, TextStream, generate
from alloy.inference.generate import TRACE_COUNTS, chunk_bounds
from alloy.layers import attention as A


def _prompt(n, seed, vocab=61):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _run(model, params, prompt, **kw):
    return list(generate(model, params, prompt, **kw))


def test_greedy_generation_equals_the_full_forward_for_every_mixer(hybrid):
    """Chunked prefill (chunks 4, a partial chunk, sliding window 5 crossed) then compiled steps
    pick argmax of the full forward over prompt + generated, with its log-probabilities."""
    model, params = hybrid
    prompt = _prompt(11, 0)
    ev = _run(model, params, prompt, max_tokens=10, prefill_chunk=4)
    toks = [e.token for e in ev]
    assert len(ev) == 10 and ev[-1].finish_reason == "length" and [e.index for e in ev] == list(range(10))
    full, _ = model.apply(params, mx.array([prompt + toks[:-1]]))
    logp = np.array(full[0, len(prompt) - 1:] - mx.logsumexp(full[0, len(prompt) - 1:], axis=-1, keepdims=True))
    assert toks == logp.argmax(-1).tolist()
    np.testing.assert_allclose([e.logprob for e in ev], logp[np.arange(10), toks], atol=2e-4)


def test_batched_rows_of_different_lengths_equal_generating_each_alone(hybrid):
    model, params = hybrid
    prompts = [_prompt(n, 10 + n) for n in (1, 9, 4, 13)]
    alone = [_run(model, params, p, max_tokens=8, prefill_chunk=4) for p in prompts]
    batched = _run(model, params, prompts, max_tokens=8, prefill_chunk=4)
    for b, ev in enumerate(alone):
        rows = [e for e in batched if e.row == b]
        assert [e.token for e in rows] == [e.token for e in ev], b
        np.testing.assert_allclose([e.logprob for e in rows], [e.logprob for e in ev], atol=2e-4)
        assert rows[0].prompt_tokens == len(prompts[b])


def test_the_decode_step_traces_once_per_batch_size(hybrid):
    model = alloy.build(hybrid[0].config)  # fresh functions: fresh compile cache entries
    params = hybrid[1]
    before = TRACE_COUNTS["decode"]
    for n in (3, 7, 12):  # prompt lengths differ, the state shape does not
        _run(model, params, _prompt(n, n), max_tokens=6)
    assert TRACE_COUNTS["decode"] - before == 1
    _run(model, params, [_prompt(5, 1), _prompt(2, 2)], max_tokens=6)
    assert TRACE_COUNTS["decode"] - before == 2


def test_stop_tokens_seeds_and_sampling(hybrid):
    model, params = hybrid
    prompt = _prompt(6, 3)
    greedy = [e.token for e in _run(model, params, prompt, max_tokens=8)]
    stop = greedy[3]
    ev = _run(model, params, prompt, max_tokens=8, stop_tokens=[stop])
    first = greedy.index(stop)
    assert [e.token for e in ev] == greedy[:first + 1] and ev[-1].finish_reason == "stop"
    kw = dict(max_tokens=12, temperature=1.5, top_p=0.95, repetition_penalty=1.2)
    a = [e.token for e in _run(model, params, prompt, seed=1, **kw)]
    assert a == [e.token for e in _run(model, params, prompt, seed=1, **kw)]
    assert a != [e.token for e in _run(model, params, prompt, seed=2, **kw)]
    assert _run(model, params, prompt, max_tokens=3)[0].ttft > 0


def test_bad_requests_name_what_is_wrong(hybrid):
    model, params = hybrid
    for kw, msg in [(dict(max_tokens=0), "max_tokens"), (dict(max_len=5, max_tokens=8), "max_len"),
                    (dict(prefill_chunk=0), "prefill_chunk"), (dict(stop_strings=["x"]), "tokenizer"),
                    (dict(temperature=-1.0), "temperature")]:
        with pytest.raises(ValueError, match=msg):
            _run(model, params, [1, 2], **kw)
    with pytest.raises(ValueError, match="outside"):
        _run(model, params, [1, 999])
    with pytest.raises(ValueError, match="empty"):
        _run(model, params, [[1], []])


def test_text_stream_never_splits_a_character_and_holds_back_stop_strings():
    tok = ByteTokenizer()
    text = "héllo ✓ wörld 😀!"
    s = TextStream(tok)
    deltas = [s.push(b)[0] for b in tok.encode(text)]
    assert "".join(deltas) + s.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:2] == ["h", ""]  # the first byte of "é" waits for the second
    s = TextStream(tok, stop_strings=["wör", "xyz"])
    out, stopped = [], False
    for b in tok.encode(text):
        d, stopped = s.push(b)
        out.append(d)
        if stopped:
            break
    assert stopped and "".join(out) == "héllo ✓ "
    assert out[-2] == ""  # "w" was held back: it could start "wör"


def test_generate_streams_text_and_cuts_at_a_stop_string():
    model = alloy.build({"vocab_size": 256, "d_model": 16, "layer_types": ["mamba2", "attention"],
                         "mixers": {"mamba2": {"d_state": 4, "head_dim": 8}, "attention": {"n_heads": 2}},
                         "ffn_types": ["none", "none"]})
    params = model.init(mx.random.key(0))
    # bias forces the bytes of "é" (0xC3 0xA9) then "a"... greedy picks the largest bias
    ev = _run(model, params, "hi", tokenizer=ByteTokenizer(), max_tokens=4, logit_bias={0xC3: 50.0})
    assert [e.token for e in ev] == [0xC3] * 4 and all(e.text == "" for e in ev[:-1])
    assert ev[-1].text == ByteTokenizer().decode([0xC3] * 4)  # flushed at the end (invalid bytes)
    ev = _run(model, params, "hi", tokenizer=ByteTokenizer(), max_tokens=9, logit_bias={97: 50.0},
              stop_strings=["aaa"])
    assert "".join(e.text for e in ev) == "" and ev[-1].finish_reason == "stop_string" and len(ev) == 3


def test_chunk_bounds_cut_at_absolute_multiples_and_extra_points():
    assert chunk_bounds(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(5, 10, 4, extra=(6, 10, 3)) == [(5, 6), (6, 8), (8, 10)]


# -- the sliding-window ring ------------------------------------------------------------------

def _attn_setup(window, seed):
    cfg = A.SlidingAttentionSettings(d_model=16, n_heads=4, n_kv_heads=2, window=window)
    params = A.init(mx.random.key(seed), cfg)
    return cfg, params


@settings(max_examples=12)
@given(window=st.integers(1, 6), cuts=st.lists(st.integers(1, 9), min_size=1, max_size=5),
       max_len=st.integers(8, 40))
def test_sliding_window_ring_is_bounded_and_equals_the_full_forward(window, cuts, max_len):
    cfg, params = _attn_setup(window, window)
    T = sum(cuts)
    x = mx.random.normal((2, T, 16), key=mx.random.key(T))
    full, _ = A.apply(params, x, None, cfg)
    state = A.init_state(cfg, 2, max_len)
    assert state["k"].shape[2] == min(window, max_len)
    outs, a = [], 0
    for c in cuts:
        y, state = A.apply(params, x[:, a:a + c], state, cfg)
        outs.append(y)
        a += c
    np.testing.assert_allclose(np.array(mx.concatenate(outs, axis=1)), np.array(full), atol=1e-5)
    assert state["pos"].tolist() == [T, T]


def test_padded_positions_write_nothing_and_do_not_advance():
    """valid < T: the state equals running only the real tokens (per row, decode and chunk paths)."""
    for window in (0, 3):
        cls = A.SlidingAttentionSettings if window else A.AttentionSettings
        cfg = cls(d_model=16, n_heads=2, window=window)
        params = A.init(mx.random.key(2), cfg)
        x = mx.random.normal((2, 6, 16), key=mx.random.key(3))
        ref = [A.apply(params, x[b:b + 1, :n], A.init_state(cfg, 1, 12), cfg) for b, n in enumerate((4, 1))]
        state = {**A.init_state(cfg, 2, 12), "valid": mx.array([4, 1])}
        y, st_ = A.apply(params, x, state, cfg)
        for b, n in enumerate((4, 1)):
            np.testing.assert_allclose(np.array(y[b, :n]), np.array(ref[b][0][0]), atol=1e-5)
            np.testing.assert_allclose(np.array(st_["k"][b]), np.array(ref[b][1]["k"][0]), atol=1e-6)
        assert st_["pos"].tolist() == [4, 1]
        # a decode step for row 0 only: row 1 keeps its state
        y2, st2 = A.apply(params, x[:, 5:6], {**st_, "valid": mx.array([1, 0])}, cfg)
        assert st2["pos"].tolist() == [5, 1]
        np.testing.assert_array_equal(np.array(st2["k"][1]), np.array(st_["k"][1]))
        assert np.isfinite(np.array(y2)).all()
