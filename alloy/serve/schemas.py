"""Request validation and response bodies of the OpenAI-compatible API.

Every malformed request becomes an ``APIError`` (HTTP status + OpenAI error body)::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Accepted request fields (others are ignored, as OpenAI-compatible servers usually do):

    common       model (str, must be the served id), max_tokens (int >= 1; chat also
                 max_completion_tokens), temperature [0, 2], top_p (0, 1], seed (int in [0, 2**64)),
                 stop (str or list of <= 4 non-empty str), stream (bool), stream_options.include_usage,
                 n (1..8), presence_penalty / frequency_penalty [-2, 2], logit_bias {token id: [-100, 100]},
                 and the extensions top_k (int >= 0), min_p [0, 1), repetition_penalty (0, 10]
    chat         messages: non-empty list of {"role": str, "content": str | [{"type": "text", "text"}]},
                 logprobs (bool), top_logprobs (0 only: the chosen token's log-probability is reported)
    completions  prompt: str, [str], [int] or [[int]] (<= 8 prompts), logprobs (null or 0), echo (false)

Prompt length + max_tokens must fit the server's context (``max_len``); max_tokens defaults to 16
for completions and to the rest of the context for chat (as OpenAI does).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, replace

from alloy.inference.generate import ByteTokenizer
from alloy.inference.sampling import SamplingParams

MAX_PROMPTS = 8
MAX_STOP = 4
MAX_STOP_LEN = 256


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServeContext:
    """What validation needs to know about the served model."""

    model_name: str
    tokenizer: object
    vocab_size: int
    max_len: int


@dataclass(frozen=True)
class GenRequest:
    """A validated request: one or more prompts (token ids) with shared settings."""

    kind: str  # "chat" | "completion"
    prompts: tuple  # tuple of tuples of ids
    max_tokens: int
    sampling: SamplingParams
    stop: tuple
    seed: int
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, else a 400 naming the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _bad(param: str, want: str, got) -> APIError:
    shown = json.dumps(got) if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return APIError(400, f"'{param}' must be {want}, got {shown}", param=param, code="invalid_value")


def _number(body, name, lo, hi, default, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, "a number", v)
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(name, f"in {'(' if lo_open else '['}{lo}, {hi}]", v)
    return float(v)


def _int(body, name, lo, hi, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, "an integer", v)
    if v < lo or v > hi:
        raise _bad(name, f"an integer in [{lo}, {hi}]", v)
    return v


def _bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, "a boolean", v)
    return v


def check_model(body, ctx: ServeContext) -> None:
    m = body.get("model")
    if not isinstance(m, str):
        raise _bad("model", "a string (the served model id)", m)
    if m != ctx.model_name:
        raise APIError(404, f"The model '{m[:100]}' does not exist; this server serves '{ctx.model_name}'",
                       param="model", code="model_not_found")


def _stop(body) -> tuple:
    s = body.get("stop")
    if s is None:
        return ()
    items = [s] if isinstance(s, str) else s
    if not isinstance(items, list) or len(items) > MAX_STOP or not all(isinstance(x, str) for x in items):
        raise _bad("stop", f"a string or a list of at most {MAX_STOP} strings", s)
    if any(not x or len(x) > MAX_STOP_LEN for x in items):
        raise _bad("stop", f"non-empty strings of at most {MAX_STOP_LEN} characters", s)
    return tuple(items)


def _sampling(body, vocab_size: int) -> SamplingParams:
    bias = body.get("logit_bias")
    pairs = ()
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > 300:
            raise _bad("logit_bias", "an object of at most 300 {token id: bias} entries", bias)
        out = []
        for k, v in bias.items():
            try:
                t = int(k)
            except ValueError:
                raise _bad("logit_bias", "keyed by token ids", k) from None
            if not 0 <= t < vocab_size:
                raise _bad("logit_bias", f"keyed by token ids in [0, {vocab_size})", t)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise _bad("logit_bias", "biases in [-100, 100]", v)
            out.append((t, float(v)))
        pairs = tuple(sorted(out))
    return SamplingParams(
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", 0, vocab_size, 0),
        min_p=_number(body, "min_p", 0.0, 0.999, 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, 1.0, lo_open=True),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        logit_bias=pairs)


def _message_text(i, m) -> dict:
    if not isinstance(m, dict):
        raise _bad(f"messages[{i}]", "an object with 'role' and 'content'", m)
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not role or len(role) > 64:
        raise _bad(f"messages[{i}].role", "a non-empty string", role)
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):  # content parts: only text is understood
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}]", "a {\"type\": \"text\", \"text\": str} part", part)
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content", "a string or a list of text parts", content)
    return {"role": role, "content": content}


def _encode(ctx: ServeContext, text: str, param: str = "prompt") -> tuple:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON may carry lone surrogates ("\\ud800"): not encodable text
        raise APIError(400, f"the {param} is not valid Unicode (a lone surrogate at character {e.start})",
                       param=param, code="invalid_value") from None
    ids = tuple(int(t) for t in ctx.tokenizer.encode(text))
    if not ids:
        raise APIError(400, f"the {param} is empty after tokenization", param=param, code="invalid_value")
    return ids


def _common(body, ctx, kind, prompts, default_max) -> GenRequest:
    longest = max(len(p) for p in prompts)
    room = ctx.max_len - longest
    if room < 1:
        raise APIError(400, f"the prompt has {longest} tokens; this server's context is {ctx.max_len} tokens",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    name = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    mt = body.get(name)
    if mt is None:
        mt = min(default_max, room)
    elif isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        raise _bad(name, "a positive integer", mt)
    elif mt > room:
        raise APIError(400, f"'{name}' is {mt}, but the prompt ({longest} tokens) leaves room for at most "
                            f"{room} in this server's {ctx.max_len}-token context", param=name,
                       code="context_length_exceeded")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _bad("stream_options", "an object", so)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64):
        raise _bad("seed", "an integer in [0, 2**64)", seed)
    return GenRequest(kind=kind, prompts=tuple(prompts), max_tokens=mt, sampling=_sampling(body, ctx.vocab_size),
                      stop=_stop(body), seed=0 if seed is None else seed, n=_int(body, "n", 1, 8, 1),
                      stream=_bool(body, "stream"), include_usage=_bool(so or {}, "include_usage"),
                      logprobs=False)


def validate_chat(body: dict, ctx: ServeContext) -> GenRequest:
    """A /v1/chat/completions body -> GenRequest (raises APIError)."""
    check_model(body, ctx)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "a non-empty list of messages", msgs)
    messages = [_message_text(i, m) for i, m in enumerate(msgs)]
    try:
        text = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # template errors (raise_exception in the template, ...)
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    req = _common(body, ctx, "chat", [_encode(ctx, text, "messages")], 1 << 62)
    logprobs = _bool(body, "logprobs")
    _int(body, "top_logprobs", 0, 0, 0)
    return replace(req, logprobs=logprobs)


def validate_completion(body: dict, ctx: ServeContext) -> GenRequest:
    """A /v1/completions body -> GenRequest (raises APIError)."""
    check_model(body, ctx)
    p = body.get("prompt")
    if isinstance(p, str):
        prompts = [_encode(ctx, p)]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = [_encode(ctx, x) for x in p]
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        prompts = [tuple(p)]
    elif (isinstance(p, list) and p and all(isinstance(r, list) and r for r in p)
          and all(isinstance(x, int) and not isinstance(x, bool) for r in p for x in r)):
        prompts = [tuple(r) for r in p]
    else:
        raise _bad("prompt", "a non-empty string, list of strings, list of token ids or list of id lists", p)
    if len(prompts) > MAX_PROMPTS:
        raise _bad("prompt", f"at most {MAX_PROMPTS} prompts", len(prompts))
    for r in prompts:
        if any(not 0 <= t < ctx.vocab_size for t in r):
            raise _bad("prompt", f"token ids in [0, {ctx.vocab_size})", [t for t in r if not 0 <= t < ctx.vocab_size][0])
    if _bool(body, "echo"):
        raise _bad("echo", "false (echo is not supported)", True)
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or lp != 0):
        raise _bad("logprobs", "null or 0 (only the chosen tokens' log-probabilities are reported)", lp)
    req = _common(body, ctx, "completion", prompts, 16)
    return replace(req, logprobs=lp is not None)


# ---------------------------------------------------------------------------------------------
# response bodies

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def finish_reason(reason: str | None) -> str | None:
    """generate's finish reasons -> OpenAI's ("stop" for stop tokens and stop strings)."""
    return None if reason is None else ("length" if reason == "length" else "stop")


def token_text(tokenizer, tok: int) -> tuple[str, list[int]]:
    """(text, utf-8 bytes) of one token for logprobs; byte tokens report their raw byte."""
    if 0 <= tok < 256 and isinstance(tokenizer, ByteTokenizer):
        return bytes([tok]).decode("utf-8", errors="replace"), [tok]
    s = tokenizer.decode([tok])
    return s, list(s.encode("utf-8"))


def models_body(ctx: ServeContext, created: int) -> dict:
    return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": created,
                                        "owned_by": "alloy"}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
