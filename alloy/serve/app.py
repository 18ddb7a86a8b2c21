"""The OpenAI-compatible HTTP API (Starlette ASGI app; served by uvicorn in ``alloy serve``).

    GET  /health                  {"status": "ok", "active": int, "queued": int, ...}
    GET  /v1/models               {"object": "list", "data": [{"id": model_name, "object": "model", ...}]}
    POST /v1/completions          text completions (``schemas.validate_completion``)
    POST /v1/chat/completions     chat completions through the tokenizer's chat template
                                  (``schemas.validate_chat``)

``"stream": true`` answers with server-sent events, one ``data: {chunk}\\n\\n`` per piece of text in
OpenAI's chunk format (``text_completion`` / ``chat.completion.chunk``), then ``data: [DONE]\\n\\n``.
Every error is an OpenAI error body with a 4xx (bad request: 400, unknown model: 404, body too
large: 413, queue full: 429) or 500 status. Request bodies are read up to ``max_body_bytes`` and
refused beyond. The HTTP side never touches MLX: it validates, submits ``Job``s to the ``Engine``
(whose single worker thread owns the model) and relays their events. A client that disconnects
cancels its jobs, which frees their slots at the worker's next turn.
"""
from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from alloy.serve.engine import Engine, Job, QueueFull
from alloy.serve.schemas import (APIError, GenRequest, ServeContext, finish_reason, models_body, new_id, now,
                                 parse_json, token_text, usage, validate_chat, validate_completion)

MAX_BODY_BYTES = 1 << 20


class _RequestSink:
    """One asyncio queue for all jobs of a request: items are (choice index, kind, payload)."""

    def __init__(self, loop):
        self.loop, self.queue = loop, asyncio.Queue()

    def for_choice(self, index: int):
        def sink(kind, payload):
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, payload))
            except RuntimeError:  # loop closed: the client and the server are gone
                pass
        return sink


def create_app(engine: Engine, model_name: str, max_body_bytes: int = MAX_BODY_BYTES,
               manage_engine: bool = True, disconnect_poll_s: float = 0.5) -> Starlette:
    """The ASGI app serving ``engine`` under ``model_name``. With ``manage_engine`` the app's
    lifespan starts the engine's worker and stops it at shutdown. A non-streaming request checks
    every ``disconnect_poll_s`` seconds whether its client is still connected."""
    ctx = ServeContext(model_name=model_name, tokenizer=engine.tokenizer,
                       vocab_size=engine.model.config.vocab_size, max_len=engine.max_len)
    created = now()

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def read_json(request: Request) -> dict:
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > max_body_bytes:
            raise APIError(413, f"the request body ({cl} bytes) exceeds the limit of {max_body_bytes} bytes",
                           code="request_too_large")
        chunks, n = [], 0
        async for c in request.stream():
            n += len(c)
            if n > max_body_bytes:
                raise APIError(413, f"the request body exceeds the limit of {max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(c)
        return parse_json(b"".join(chunks))

    def submit(req: GenRequest, sink: _RequestSink) -> list[Job]:
        jobs = []
        try:
            for p, prompt in enumerate(req.prompts):
                for k in range(req.n):
                    job = Job(prompt=list(prompt), max_tokens=req.max_tokens, sampling=req.sampling,
                              sink=sink.for_choice(p * req.n + k), stop_strings=req.stop,
                              seed=(req.seed + k) % (1 << 64))
                    jobs.append(engine.submit(job))
        except QueueFull as e:
            for j in jobs:
                j.cancel()
            raise APIError(429, str(e), code="server_busy", type="rate_limit_error") from None
        return jobs

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_name, "active": engine.active,
                             "queued": engine.queued, "completed": engine.completed,
                             "cancelled": engine.cancelled, "failed": engine.failed})

    async def models(request: Request):
        return JSONResponse(models_body(ctx, created))

    async def model_info(request: Request):
        name = request.path_params["name"]
        if name != model_name:
            return error(APIError(404, f"The model '{name[:100]}' does not exist", param="model",
                                  code="model_not_found"))
        return JSONResponse(models_body(ctx, created)["data"][0])

    async def completions(request: Request):
        return await _generate(request, validate_completion)

    async def chat(request: Request):
        return await _generate(request, validate_chat)

    async def _generate(request: Request, validate):
        try:
            req = validate(await read_json(request), ctx)
            sink = _RequestSink(asyncio.get_running_loop())
            jobs = submit(req, sink)
        except APIError as e:
            return error(e)
        if req.stream:
            return StreamingResponse(_stream(req, jobs, sink), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await _complete(request, req, jobs, sink)
        finally:
            for j in jobs:
                j.cancel()

    def _logprob_entry(ev) -> tuple:
        text, raw = token_text(engine.tokenizer, ev.token)
        return text, raw, ev.logprob

    async def _complete(request: Request, req: GenRequest, jobs, sink: _RequestSink):
        n_choices = len(jobs)
        texts = [""] * n_choices
        reasons = [None] * n_choices
        lps = [[] for _ in range(n_choices)]
        completion_tokens, pending = 0, n_choices
        loop = asyncio.get_running_loop()
        next_check = loop.time() + disconnect_poll_s
        while pending:
            try:
                idx, kind, payload = await asyncio.wait_for(sink.queue.get(), disconnect_poll_s)
            except asyncio.TimeoutError:
                idx = kind = payload = None
            if loop.time() >= next_check:
                if await request.is_disconnected():  # nobody will read the answer
                    return Response(status_code=499)
                next_check = loop.time() + disconnect_poll_s
            if kind is None:
                continue
            if kind == "done":
                pending -= 1
            elif kind == "error":
                return error(_engine_error(payload))
            else:
                completion_tokens += 1
                texts[idx] += payload.text or ""
                reasons[idx] = finish_reason(payload.finish_reason)
                if req.logprobs:
                    lps[idx].append(_logprob_entry(payload))
        prompt_tokens = sum(len(p) for p in req.prompts)
        rid = new_id("chatcmpl" if req.kind == "chat" else "cmpl")
        choices = []
        for i in range(n_choices):
            if req.kind == "chat":
                c = {"index": i, "message": {"role": "assistant", "content": texts[i]},
                     "logprobs": _chat_logprobs(lps[i]) if req.logprobs else None,
                     "finish_reason": reasons[i] or "stop"}
            else:
                c = {"index": i, "text": texts[i],
                     "logprobs": _completion_logprobs(lps[i]) if req.logprobs else None,
                     "finish_reason": reasons[i] or "stop"}
            choices.append(c)
        body = {"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": now(), "model": model_name, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}
        return JSONResponse(body)

    async def _stream(req: GenRequest, jobs, sink: _RequestSink):
        chat = req.kind == "chat"
        rid, created_at = new_id("chatcmpl" if chat else "cmpl"), now()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra) -> str:
            body = {"id": rid, "object": obj, "created": created_at, "model": model_name, "choices": choices}
            body.update(extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        n_choices, pending, completion_tokens = len(jobs), len(jobs), 0
        try:
            if chat:
                for i in range(n_choices):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            while pending:
                idx, kind, payload = await sink.queue.get()
                if kind == "done":
                    pending -= 1
                    continue
                if kind == "error":
                    yield f"data: {json.dumps(_engine_error(payload).body())}\n\n"
                    break
                completion_tokens += 1
                ev, text = payload, payload.text or ""
                reason = finish_reason(ev.finish_reason)
                if not text and reason is None and not req.logprobs:
                    continue
                lp = [_logprob_entry(ev)] if req.logprobs else None
                if chat:
                    delta = {"content": text} if text or reason is None else {}
                    c = {"index": idx, "delta": delta, "logprobs": _chat_logprobs(lp) if lp else None,
                         "finish_reason": reason}
                else:
                    c = {"index": idx, "text": text, "logprobs": _completion_logprobs(lp) if lp else None,
                         "finish_reason": reason}
                yield chunk([c])
            if req.include_usage:
                yield chunk([], usage=usage(sum(len(p) for p in req.prompts), completion_tokens))
            yield "data: [DONE]\n\n"
        finally:  # normal end, error, or the client went away (the task is cancelled)
            for j in jobs:
                j.cancel()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    async def server_error(request: Request, exc: Exception):
        return error(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    routes = [Route("/health", health), Route("/v1/models", models), Route("/v1/models/{name:path}", model_info),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}")


def _chat_logprobs(entries) -> dict:
    return {"content": [{"token": t, "logprob": lp, "bytes": raw, "top_logprobs": []} for t, raw, lp in entries]}


def _completion_logprobs(entries) -> dict:
    offs, pos = [], 0
    for t, _, _ in entries:
        offs.append(pos)
        pos += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, _, lp in entries],
            "top_logprobs": None, "text_offset": offs}
