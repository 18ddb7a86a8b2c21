"""Malformed requests get 4xx with an OpenAI error body, and the server keeps serving."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alloy  # noqa: F401

httpx = pytest.importorskip("httpx")

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
SERVED = "<served model>"  # replaced by the served model's id in each test
OK_CHAT = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OK_COMP = {"model": SERVED, "prompt": "hi", "max_tokens": 2}
CTX = "<context length>"  # replaced by the server's context length


def _fill(body, server):
    """``body`` with the SERVED / CTX placeholders (and CTX + k as ("ctx+", k)) filled in."""
    if isinstance(body, bytes):
        return body.replace(SERVED.encode(), server.name.encode())
    out = {}
    for k, v in body.items():
        if v == SERVED:
            v = server.name
        elif v == CTX:
            v = server.max_len
        elif isinstance(v, tuple) and v[0] == "ctx+":
            v = server.max_len + v[1]
        elif isinstance(v, tuple) and v[0] == "x*ctx+":
            v = "x" * (server.max_len + v[1])
        out[k] = v
    return out


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _check_error(r, status=None, param=None):
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err


def _still_serving(http, server):
    r = http.post(COMP, json=_fill({**OK_COMP, "temperature": 0}, server))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("path,body,status,param", [
    (COMP, {**OK_COMP, "max_tokens": 10 ** 12}, 400, "max_tokens"),
    (COMP, {**OK_COMP, "max_tokens": CTX}, 400, "max_tokens"),  # prompt + max_tokens > context
    (COMP, {**OK_COMP, "max_tokens": 0}, 400, "max_tokens"),
    (COMP, {**OK_COMP, "max_tokens": "5"}, 400, "max_tokens"),
    (COMP, {**OK_COMP, "temperature": -0.5}, 400, "temperature"),
    (COMP, {**OK_COMP, "temperature": "hot"}, 400, "temperature"),
    (COMP, {**OK_COMP, "top_p": 0}, 400, "top_p"),
    (COMP, {**OK_COMP, "seed": -1}, 400, "seed"),
    (COMP, {**OK_COMP, "stop": [1, 2]}, 400, "stop"),
    (COMP, {**OK_COMP, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (COMP, {**OK_COMP, "stream": "yes"}, 400, "stream"),
    (COMP, {**OK_COMP, "logprobs": 5}, 400, "logprobs"),
    (COMP, {**OK_COMP, "prompt": [300, 1]}, 400, "prompt"),  # token id outside the vocabulary
    (COMP, {**OK_COMP, "prompt": ""}, 400, "prompt"),
    (COMP, {**OK_COMP, "prompt": ("x*ctx+", 5)}, 400, "prompt"),
    (COMP, {**OK_COMP, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    (COMP, {**OK_COMP, "n": 100}, 400, "n"),
    (COMP, {**OK_COMP, "model": "gpt-4"}, 404, "model"),
    (COMP, {"prompt": "hi"}, 400, "model"),
    (CHAT, {**OK_CHAT, "messages": []}, 400, "messages"),
    (CHAT, {**OK_CHAT, "messages": "hi"}, 400, "messages"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (CHAT, {**OK_CHAT, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    (CHAT, {**OK_CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    (CHAT, {**OK_CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
])
def test_bad_parameters_are_named(http, server, path, body, status, param):
    _check_error(http.post(path, json=_fill(body, server)), status, param)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b'"text"',
                                 b"[" * 20000, b'{"model": "<served model>", "prompt": "a", "temperature": NaN}',
                                 b'{"model": "<served model>", "prompt": "lone \\ud800 surrogate"}',
                                 b'{"model": "<served model>", "messages": [{"role": "user", "content": "\\udfff"}]}', '{"model": "<served model>", "prompt": "\udcff"}'.encode("utf-8", "surrogatepass")])
def test_malformed_bodies(http, server, raw):
    _check_error(http.post(COMP, content=_fill(raw, server), headers={"content-type": "application/json"}), 400)


def test_oversized_body_and_unknown_routes(http, server):
    big = json.dumps(_fill({**OK_COMP, "prompt": "x" * (65 << 10)}, server)).encode()
    _check_error(http.post(COMP, content=big), 413)

    def chunks():  # no content-length: the limit applies while reading
        for _ in range(80):
            yield b"x" * 1024
    _check_error(http.post(COMP, content=chunks()), 413)
    _check_error(http.get("/v1/nothing"), 404)
    _check_error(http.get(COMP), 405)
    _check_error(http.get("/v1/models/gpt-4"), 404)
    _still_serving(http, server)


_json = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 15, 10 ** 15) | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)
_fields = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from([SERVED, "other"]) | _json, "prompt": _json, "messages": _json,
    "max_tokens": _json, "temperature": _json, "top_p": _json, "seed": _json, "stop": _json, "stream": _json,
    "logprobs": _json, "n": _json, "logit_bias": _json})


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from([CHAT, COMP]), body=_json | _fields)
def test_random_json_never_crashes(http, server, path, body):
    r = http.post(path, json=_fill(body, server) if isinstance(body, dict) else body)
    if r.status_code == 200:  # a valid request by chance: it must be a real answer
        assert r.json()["choices"] or r.text.startswith("data:")
    else:
        _check_error(r)


def test_still_serving_after_fuzz(http, server):
    assert http.get("/health").json()["status"] == "ok"
    _still_serving(http, server)
