"""The HTTP side: a FastAPI app over an Engine, speaking the OpenAI API.

    POST /v1/completions        prompt -> text (stream: server-sent events)
    POST /v1/chat/completions   messages (World chat template, rwkvc.serve.chat) -> a reply
    GET  /v1/models             the artifact served (with the engine's and prefix cache's counters)
    GET  /health                {"status": "ok"}
    GET  /metrics               the engine's counters: requests, tokens, steps, mean batch, prefix cache

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: 400 for a request the server
cannot serve (a bad field, an unsupported option), 404 for an unknown path, 500 for an internal failure.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from rwkvc.errors import RwkvcError

from .chat import CHAT_STOPS, chat_segments
from .engine import Engine, Job
from .protocol import ChatRequest, CompletionRequest


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": None,
                                                               "code": None}})


def create_app(engine: Engine, model_name: str):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="rwkvc serve", docs_url=None, redoc_url=None)
    tok = engine.model.tokenizer

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        if e.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})")
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        return _error(400, f"{where}: {e.get('msg')}" + (f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""))

    @app.exception_handler(RwkvcError)
    async def _rwkvc(request, exc: RwkvcError):
        return _error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return engine.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "rwkvc", "rwkvc": engine.stats()}]}

    def encode(text) -> tuple[int, ...]:
        return tuple(tok.encode(text)) if isinstance(text, str) else tuple(int(t) for t in text)

    async def run(job: Job, on_piece):
        """Submit and pump the engine's events; on_piece(text) per piece; returns the "done" payload."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        h = engine.submit(job, lambda *ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        try:
            while True:
                kind, data = await q.get()
                if kind == "text":
                    r = on_piece(data)
                    if r is not None:
                        await r
                elif kind == "done":
                    return data
                else:
                    raise RwkvcError(data)
        finally:
            h.cancel()   # a no-op once done; a client gone away (cancelled task) stops its generation

    def check_model(req) -> None:
        if req.model not in (None, "", model_name):
            raise RwkvcError(f"model: this server serves {model_name!r}, not {req.model!r}")

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def respond(job: Job, req, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not req.stream:
            async def whole():
                parts: list[str] = []
                done = await run(job, parts.append)
                text = "".join(parts)
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                           "finish_reason": done["finish_reason"]} if chat else
                          {"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]})
                return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                        "usage": done["usage"], "rwkvc": {"cached_tokens": done["cached_tokens"],
                                                          "stop_reason": done["stop_reason"]}}
            return whole()

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta_text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else \
                    ({"content": delta_text} if delta_text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": chunk_obj, "created": created, "model": model_name, "choices": [choice]}

        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        h = engine.submit(job, lambda *ev: loop.call_soon_threadsafe(q.put_nowait, ev))   # a bad job: a 400 here

        async def events():
            try:
                if chat:
                    yield sse(chunk(role=True))
                while True:
                    kind, data = await q.get()
                    if kind == "text":
                        yield sse(chunk(data))
                    elif kind == "done":
                        yield sse(chunk(None, data["finish_reason"]))
                        if usage:
                            yield sse({"id": rid, "object": chunk_obj, "created": created, "model": model_name,
                                       "choices": [], "usage": data["usage"]})
                        break
                    else:
                        yield sse({"error": {"message": data, "type": "server_error", "param": None,
                                             "code": None}})
                        break
                yield "data: [DONE]\n\n"
            finally:
                h.cancel()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req)
        req.refuse_unsupported(req.unsupported())
        job = Job(segments=(encode(req.prompt_one()),), max_tokens=req.limit(), sampling=req.sampling())
        r = respond(job, req, chat=False)
        return await r if asyncio.iscoroutine(r) else r

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        check_model(req)
        req.refuse_unsupported(req.unsupported())
        segs = tuple(encode(s) for s in chat_segments(req.message_dicts()))
        job = Job(segments=segs, max_tokens=req.limit(req.max_completion_tokens),
                  sampling=req.sampling(CHAT_STOPS))
        r = respond(job, req, chat=True)
        return await r if asyncio.iscoroutine(r) else r

    return app
