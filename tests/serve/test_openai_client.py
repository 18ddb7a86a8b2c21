"""The server driven by the official ``openai`` client: schemas, streaming, usage, stop, seed, logprobs."""
import numpy as np
import pytest

import alloy  # noqa: F401
import mlx.core as mx


openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def name(server):
    return server.name


def _ref_logprobs(model, params, prompt, generated):
    """log p(generated[i] | prompt + generated[:i]) from one plain full forward (no state)."""
    ids = list(prompt) + list(generated)
    logits, _ = model.apply(params, mx.array([ids], dtype=mx.int32))
    lp = np.array((logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(mx.float32))[0]
    return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(generated)], lp


def test_models_list(client, name):
    models = client.models.list()
    assert [m.id for m in models.data] == [name]
    assert models.data[0].object == "model"


def test_completion_is_greedy_continuation_with_logprobs_and_usage(client, name, loaded):
    model, params, tok = loaded
    r = client.completions.create(model=name, prompt="Hello, wor", max_tokens=12, temperature=0,
                                  logprobs=0)
    assert r.object == "text_completion" and r.model == name and r.id.startswith("cmpl-")
    (c,) = r.choices
    prompt = tok.encode("Hello, wor")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(c.logprobs.tokens) == 12
    assert r.usage.total_tokens == len(prompt) + 12
    assert c.finish_reason == "length"
    ids = list(prompt)
    for _ in range(12):  # greedy by hand from full forwards
        logits, _ = model.apply(params, mx.array([ids], dtype=mx.int32))
        ids.append(int(mx.argmax(logits[0, -1]).item()))
    gen = ids[len(prompt):]
    assert c.text == tok.decode(gen)
    ref, _ = _ref_logprobs(model, params, prompt, gen)
    np.testing.assert_allclose(c.logprobs.token_logprobs, ref, atol=2e-4)


def test_chat_completion_schema_and_template(client, name, loaded):
    model, params, tok = loaded
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo 🦊"}]
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=6, temperature=0,
                                       logprobs=True)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant" and isinstance(c.message.content, str)
    prompt = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    assert r.usage.prompt_tokens == len(prompt)
    assert len(c.logprobs.content) == r.usage.completion_tokens == 6
    gen = [e.bytes[0] for e in c.logprobs.content]
    ref, _ = _ref_logprobs(model, params, prompt, gen)
    np.testing.assert_allclose([e.logprob for e in c.logprobs.content], ref, atol=2e-4)
    assert c.message.content == tok.decode(gen)


def test_streaming_equals_non_streaming(client, name):
    kw = dict(model=name, max_tokens=10, temperature=0)
    r = client.completions.create(prompt="stream me", **kw)
    full = r.choices[0].text
    chunks = list(client.completions.create(prompt="stream me", stream=True, **kw))
    assert all(ch.object == "text_completion" for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks) == full
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == [r.choices[0].finish_reason]

    msgs = [{"role": "user", "content": "stream me"}]
    r = client.chat.completions.create(messages=msgs, **kw)
    full = r.choices[0].message.content
    chunks = list(client.chat.completions.create(messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage


def test_stop_string_cuts_the_text(client, name):
    kw = dict(model=name, prompt="abc", max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    starts = [i for i in range(2, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable()]
    assert starts, full
    stop = full[starts[0]:starts[0] + 2]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    s = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in s) == full[:full.index(stop)]


def test_seed_makes_sampling_reproducible(client, name):
    kw = dict(model=name, prompt="random", max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (8, 9, 10)}
    assert a == b
    assert others - {a}, "different seeds should give different samples"


def test_n_and_batch_prompts_give_indexed_choices(client, name):
    r = client.completions.create(model=name, prompt=["one", "two"], max_tokens=4, temperature=0)
    alone = [client.completions.create(model=name, prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in ("one", "two")]
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == alone


def test_growing_conversation_reuses_the_previous_prompt_state(client, name, server, loaded):
    _, _, tok = loaded
    cache = server.engine.prefix_cache
    first = [{"role": "user", "content": "a question that is long enough to matter"}]
    r1 = client.chat.completions.create(model=name, messages=first, max_tokens=5, temperature=0)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "and a follow-up"}]
    reused0 = cache.reused_tokens
    r2 = client.chat.completions.create(model=name, messages=second, max_tokens=5, temperature=0)
    assert cache.reused_tokens - reused0 >= r1.usage.prompt_tokens  # the first prompt was not re-read
    assert r2.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(second)))
