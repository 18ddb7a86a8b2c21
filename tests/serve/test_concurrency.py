"""Concurrent requests never mix outputs; a client that disconnects frees its slot."""
import concurrent.futures as cf
import json
import time

import pytest

import alloy  # noqa: F401

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def _alone(loaded, text, max_tokens, max_len):
    """The greedy completion of ``text`` run alone through ``alloy.generate`` (no server, no cache)."""
    from alloy.inference.generate import generate
    model, params, tok = loaded
    evs = list(generate(model, params, tok.encode(text), max_tokens=max_tokens, tokenizer=tok,
                        stop_tokens=tok.eos_token_ids, max_len=max_len, prefill_chunk=64))
    return "".join(e.text for e in evs), len(evs)


def test_50_concurrent_requests_equal_each_alone(server, loaded):
    shared = "You are a helpful assistant. Answer in one word, please. "  # a prefix shared by many prompts
    cases = [((shared if i % 2 else "") + f"question {i}: " + "xyz"[i % 3] * (i % 7), 3 + i % 9) for i in range(50)]
    expected = [_alone(loaded, p, n, server.max_len) for p, n in cases]  # before the requests: one MLX user at a time
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    engine = server.engine
    hits0 = engine.prefix_cache.hits

    def one(i):
        p, n = cases[i]
        if i % 3 == 0:  # some streamed, some not
            chunks = client.completions.create(model=server.name, prompt=p, max_tokens=n, temperature=0, stream=True,
                                               stream_options={"include_usage": True})
            chunks = list(chunks)
            return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens
        r = client.completions.create(model=server.name, prompt=p, max_tokens=n, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    with cf.ThreadPoolExecutor(50) as ex:
        got = list(ex.map(one, range(50), timeout=120))
    assert got == expected
    assert engine.prefix_cache.hits > hits0  # the shared prefix was reused


def test_disconnect_mid_stream_frees_the_slot(server):
    url, engine = server.url, server.engine
    before = engine.cancelled
    body = {"model": server.name, "prompt": "a", "max_tokens": server.max_len - 1, "temperature": 1.0, "seed": 1,
            "logit_bias": {"256": -100}}  # no EOS: it would run to the end of the context
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["object"] == "text_completion"
        # leaving the block closes the connection after one chunk
    deadline = time.monotonic() + 20
    while engine.cancelled == before or engine.active:
        assert time.monotonic() < deadline, "the cancelled request still holds its slot"
        time.sleep(0.02)
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slots(server):
    url, engine = server.url, server.engine
    before = engine.cancelled
    body = {"model": server.name, "prompt": "a", "max_tokens": server.max_len - 1, "temperature": 1.0, "n": 8,
            "logit_bias": {"256": -100}}  # 8 choices x 255 tokens: far longer than the client waits
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 20
    while engine.cancelled < before + 1 or engine.active:
        assert time.monotonic() < deadline, "the abandoned request still holds its slots"
        time.sleep(0.02)
    assert engine.cancelled >= before + 4  # most of the 8 choices were still generating


def test_engine_cancel_and_queue_bound(loaded, server):
    """Engine-level: a cancelled job ends at its next turn; a full queue raises QueueFull."""
    from alloy.inference.sampling import SamplingParams
    from alloy.serve.engine import Engine, Job, ListSink, QueueFull
    model, params, tok = loaded
    eng = Engine(model, params, tok, max_len=server.max_len, max_active=1, max_queue=1)
    jobs = [Job(prompt=[1, 2], max_tokens=5, sampling=SamplingParams(), sink=ListSink())]
    eng.submit(jobs[0])
    with pytest.raises(QueueFull, match="queue is full"):
        eng.submit(Job(prompt=[1], max_tokens=5, sampling=SamplingParams(), sink=ListSink()))
    jobs[0].cancel()
    eng.start()
    try:
        assert jobs[0].sink.done.wait(20)
        assert jobs[0].sink.events == [] and eng.cancelled == 1
        j = eng.submit(Job(prompt=[1, 2], max_tokens=5, sampling=SamplingParams(), sink=ListSink()))
        assert j.sink.done.wait(20) and len(j.sink.events) <= 5 and eng.completed == 1
    finally:
        eng.stop()


def test_engines_on_new_threads_after_cached_compiles(loaded, server):
    """Compiled functions that ``generate`` cached on another thread (the main thread, an earlier
    engine) capture thread-bound lazy constants (a logit-bias vector); every engine must still work."""
    from alloy.inference.generate import generate
    from alloy.inference.sampling import SamplingParams
    from alloy.serve.engine import Engine, Job, ListSink
    model, params, tok = loaded
    sp = SamplingParams(logit_bias={65: 30.0, 66: 30.0}, temperature=0.5)
    want = [e.token for e in generate(model, params, [1, 2, 3], max_tokens=6, sampling=sp, max_len=server.max_len, seed=4)]
    for _ in range(2):
        eng = Engine(model, params, tok, max_len=server.max_len).start()
        try:
            job = eng.submit(Job(prompt=[1, 2, 3], max_tokens=6, sampling=sp, sink=ListSink(), seed=4))
            assert job.sink.done.wait(30)
            assert job.sink.errors == []
            assert [e.token for e in job.sink.events] == want
        finally:
            eng.stop()


def test_engine_worker_drops_its_compiled_traces_when_it_ends(loaded, server):
    """The worker's compiled functions (traces in a cache owned by its thread) are dropped before the
    thread ends: released later, during interpreter shutdown, they aborted `alloy serve` (SIGABRT)."""
    import sys
    gen = sys.modules["alloy.inference.generate"]
    from alloy.inference.sampling import SamplingParams
    from alloy.serve.engine import Engine, Job, ListSink
    model, params, tok = loaded
    eng = Engine(model, params, tok, max_len=server.max_len).start()
    try:
        job = eng.submit(Job(prompt=[1, 2, 3], max_tokens=4, sampling=SamplingParams(), sink=ListSink()))
        assert job.sink.done.wait(30) and job.sink.errors == []
        assert any(k[1] is eng.model.apply for k in gen._COMPILED)  # compiled on the worker
    finally:
        eng.stop()
    assert not any(k[1] is eng.model.apply for k in gen._COMPILED)
