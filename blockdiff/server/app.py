"""The OpenAI-compatible HTTP API over one ``AsyncEngine``.

``build_app(llm_or_engine, served_model_name, api_key=None, max_num_seqs=None)`` returns a FastAPI app:
``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (JSON or SSE), ``/health``, ``/metrics``.
Request bodies are validated in ``protocol.py``; every error is OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}`` and never takes the server down. A client that disconnects
(streaming or not) aborts its request, which frees its KV cache at the next engine tick.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import (AsyncEngine, EngineFailedError, EngineOverloadedError, EngineStoppedError,
                                   RequestStream)
from ..engine.engine import Engine
from ..sampling.params import SamplingParams
from . import metrics as prom
from .protocol import (APIError, bad, check_context, new_id, now, parse_common, parse_messages, parse_prompt,
                       usage)
from .text import TextStream

log = logging.getLogger("blockdiff.server")

MAX_BODY_BYTES = 16 << 20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _dumps(d: dict) -> str:
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


def _sse(d: dict) -> str:
    return f"data: {_dumps(d)}\n\n"


def _engine_error(e: EngineFailedError) -> APIError:
    if isinstance(e, EngineStoppedError):
        return APIError(503, str(e), code="engine_stopped")
    return APIError(500, str(e), code="engine_error")


class Server:
    """Per-app state and the request handlers' logic (one instance per ``build_app``)."""

    def __init__(self, engine: AsyncEngine, served_model_name: str, api_key: str | None):
        self.engine = engine
        self.core: Engine = engine.engine
        self.tokenizer = self.core.tokenizer
        self.defaults = self.core.defaults
        self.model_name = served_model_name
        self.api_key = api_key
        self.http_errors: dict[int, int] = {}
        self.created = now()

    @property
    def context(self) -> int:
        return self.core.model.text.max_position_embeddings

    # ------------------------------------------------------------------ prompts
    def encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise bad("this model has no tokenizer: send 'prompt' as an array of token ids", "prompt")
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def encode_chat(self, messages: list[dict], kwargs) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise bad("this model has no chat template: use /v1/completions", "messages")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True, **(kwargs or {}))
        except (ValueError, TypeError) as e:
            raise bad(f"the messages do not fit the model's chat template: {e}", "messages") from None

    # ------------------------------------------------------------------ running
    def submit(self, ids: list[int], params: SamplingParams, rid: str) -> RequestStream:
        try:
            return self.engine.submit(ids, params, rid)
        except ValueError as e:
            raise bad(str(e).replace("max_new_tokens", "max_tokens")) from None
        except EngineOverloadedError as e:
            raise APIError(429, str(e), code="server_overloaded") from None
        except EngineFailedError as e:
            raise _engine_error(e) from None

    def text_stream(self, params: SamplingParams) -> TextStream:
        # The id that ended the output is not text: an EOS (unless ignore_eos) or an explicit stop token id.
        eos = (set() if params.ignore_eos else set(self.defaults.eos_token_ids)) | set(params.stop_token_ids or [])
        stops = None if params.structured_outputs is not None else params.stop  # never cut constrained text
        return TextStream(self.tokenizer, stops, eos)

    async def generate(self, request: Request, kind: str, ids: list[int], params: SamplingParams, stream: bool,
                       include_usage: bool, model: str) -> Response:
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        rs = self.submit(ids, params, rid)
        ts = self.text_stream(params)
        if stream:
            return StreamingResponse(self._sse(kind, rid, model, rs, ts, include_usage), headers=SSE_HEADERS,
                                     media_type="text/event-stream")
        return await self._complete(request, kind, rid, model, rs, ts)

    async def _complete(self, request: Request, kind: str, rid: str, model: str, rs: RequestStream,
                        ts: TextStream) -> Response:
        parts: list[str] = []

        async def consume():
            async for ev in rs:
                if ev.kind == "block":
                    parts.append(ts.push(ev.token_ids))
            parts.append(ts.finish())

        async def client_left():  # after the body was read, receive() returns only on disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(client_left())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # nobody is waiting for the answer any more
                self.engine.abort(rid)
                work.cancel()
                return Response(status_code=499)
            try:
                work.result()
            except EngineFailedError as e:
                raise _engine_error(e) from None
        finally:
            watch.cancel()
            if not rs.finished:
                self.engine.abort(rid)
        s = rs.state
        text = "".join(parts)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": s.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": s.finish_reason}
        return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                             "created": now(), "model": model, "choices": [choice],
                             "usage": usage(len(s.prompt_ids), len(s.output_ids)),
                             "metrics": s.metrics.as_dict()})

    async def _sse(self, kind: str, rid: str, model: str, rs: RequestStream, ts: TextStream, include_usage: bool):
        created = now()
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None = None, finish: str | None = None, role: bool = False, **extra) -> str:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            d = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                d["usage"] = None
            d.update(extra)
            return _sse(d)

        canvas = 0
        try:
            if kind == "chat":
                yield chunk(role=True)
            async for ev in rs:
                if ev.kind == "draft":
                    text = None if self.tokenizer is None else self.tokenizer.decode(ev.token_ids)
                    yield chunk(draft={"canvas": canvas, "step": ev.step, "token_ids": ev.token_ids,
                                       "accepted": ev.accepted, "text": text})
                elif ev.kind == "block":
                    canvas += 1
                    delta = ts.push(ev.token_ids)
                    if delta:
                        yield chunk(delta)
                elif ev.kind == "done":
                    delta = ts.finish()
                    if delta:
                        yield chunk(delta)
                    yield chunk(finish=ev.finish_reason)
                    if include_usage:
                        s = rs.state
                        yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                                    "usage": usage(len(s.prompt_ids), len(s.output_ids))})
            yield "data: [DONE]\n\n"
        except EngineFailedError as e:
            err = _engine_error(e)
            self.http_errors[err.status] = self.http_errors.get(err.status, 0) + 1
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:  # the client left (the response was cancelled) or the stream ended
            if not rs.finished:
                self.engine.abort(rid)


async def _read_json(request: Request):
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    if not raw.strip():
        raise bad("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None


def build_app(llm_or_engine, served_model_name: str, api_key: str | None = None, max_num_seqs: int | None = None,
              max_waiting: int | None = None) -> FastAPI:
    """``llm_or_engine``: an ``LLM``, an ``Engine`` or an ``AsyncEngine``. ``max_num_seqs`` (batch slots) overrides
    the engine's; ``max_waiting`` (default 4 * max_num_seqs) bounds the queue behind them (then 429)."""
    if isinstance(llm_or_engine, AsyncEngine):
        aeng = llm_or_engine
        core = aeng.engine
    else:
        core = getattr(llm_or_engine, "engine", llm_or_engine)
        if not isinstance(core, Engine):
            raise TypeError(f"build_app needs an LLM, Engine or AsyncEngine, got {type(llm_or_engine).__name__}")
        aeng = None
    if max_num_seqs is not None:
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
        core.scheduler.max_num_seqs = max_num_seqs
    if aeng is None:
        aeng = AsyncEngine(core, max_waiting=max_waiting)
    elif max_waiting is not None:
        aeng.max_waiting = max_waiting
    srv = Server(aeng, served_model_name, api_key)

    @asynccontextmanager
    async def lifespan(app):
        aeng.start()
        if core.tokenizer is not None:  # structured output's token table, off the event loop
            asyncio.get_running_loop().run_in_executor(None, core.grammars)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, aeng.shutdown)

    app = FastAPI(title="blockdiff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = aeng
    app.state.server = srv

    # ------------------------------------------------------------------ errors
    def error_response(e: APIError) -> JSONResponse:
        srv.http_errors[e.status] = srv.http_errors.get(e.status, 0) + 1
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on "
               f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(APIError(e.status_code, msg, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    # ------------------------------------------------------------------ auth
    async def auth(request: Request) -> None:
        if srv.api_key is None:
            return
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), srv.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    guarded = [Depends(auth)]

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if not aeng.healthy:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded)
    async def metrics():
        return PlainTextResponse(prom.render(aeng, srv.http_errors, srv.model_name),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [{
            "id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "blockdiff",
            "max_model_len": srv.context, "canvas_length": core.canvas_length}]}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        body = await _read_json(request)
        model, params, stream, include_usage = parse_common(body, "completion", [srv.model_name])
        prompt = parse_prompt(body)
        ids = srv.encode_text(prompt) if isinstance(prompt, str) else prompt
        check_context(len(ids), params, srv.defaults.max_new_tokens, core.canvas_length, srv.context)
        return await srv.generate(request, "completion", ids, params, stream, include_usage, model)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        body = await _read_json(request)
        model, params, stream, include_usage = parse_common(body, "chat", [srv.model_name])
        messages = parse_messages(body)
        ids = srv.encode_chat(messages, body.get("chat_template_kwargs"))
        max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        check_context(len(ids), params, srv.defaults.max_new_tokens, core.canvas_length, srv.context, max_name,
                      "messages")
        return await srv.generate(request, "chat", ids, params, stream, include_usage, model)

    return app
