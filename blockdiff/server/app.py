"""The OpenAI-compatible HTTP API over one ``AsyncEngine``.

``build_app(llm_or_engine, served_model_name, api_key=None, max_num_seqs=None)`` returns a FastAPI app:
``/v1/models`` (and ``/v1/models/{id}``), ``/v1/completions``, ``/v1/chat/completions`` (JSON or SSE),
``/v1/responses`` (OpenAI's Responses API on the chat path: ``responses.py``),
``/tokenize``, ``/detokenize``, ``/version``, ``/health``, ``/metrics``, ``/openapi.json`` and ``/docs``. Request bodies are pydantic models (``protocol.py``); every error is OpenAI's JSON
shape ``{"error": {"message", "type", "param", "code"}}`` and never takes the server down or its connection: an
unexpected exception is a 500 answered on a connection that stays usable. A client that disconnects (streaming or
not) aborts its request, which frees its KV cache at the next engine tick.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.async_engine import AsyncEngine
from ..engine.engine import Engine
from . import metrics as prom
from . import schemas
from .body import BODY_IDLE_TIMEOUT, MAX_BODY_BYTES, check_body_timeout, check_content_type, read_body
from .errors import APIError
from .head_timeout import h11_protocol
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ResponsesRequest, TokenizeRequest
from .responses import create_response
from .service import Server

log = logging.getLogger("blockdiff.server")

# uvicorn's HTTP implementation for the servers blockdiff starts (serve, the Sudoku demo): h11. uvicorn's default,
# httptools, answers an HTTP/1.0 request with a response of unknown length (a stream) in chunked framing, which
# HTTP/1.0 clients (and proxies speaking 1.0 upstream, nginx's default) cannot read: the chunk sizes land in the
# events. h11 ends such a response by closing the connection instead. Parsing speed is nothing beside a model step.
# Its request head gets a deadline (head_timeout.py; uvicorn has none): ``serve`` passes ``h11_protocol(timeout)``
# with its --body-timeout.
HTTP_PROTOCOL = h11_protocol(BODY_IDLE_TIMEOUT)


class ErrorJSONResponse(JSONResponse):
    """Error bodies as ASCII JSON: a message that quotes a client's text (even a lone surrogate) always encodes,
    so an error can never turn into a 500 while it is being sent."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class _Route(APIRoute):
    """Turns any exception a handler raises into a 500 *response*: an exception that escapes to Starlette's
    ``ServerErrorMiddleware`` is re-raised to the server after the 500 is sent, which resets the connection."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (APIError, StarletteHTTPException):
                raise
            except Exception as e:
                log.exception("unhandled error in %s", request.url.path)
                raise APIError(500, f"internal error: {type(e).__name__}: {e}") from None
        return guarded


def _request_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _warmup_done(fut) -> None:
    """The structured-output warm-up's outcome: a checkpoint whose tokenizer the grammar engine cannot read serves
    everything else (structured requests get a 400 saying why); say so once in the log, not as asyncio's
    "Future exception was never retrieved" traceback."""
    if fut.cancelled():
        return
    e = fut.exception()
    if e is not None:
        log.warning("structured outputs are unavailable: %s", e)


def check_origins(origins) -> list[str]:
    """``--allowed-origins`` values: ``*`` or ``scheme://host[:port]`` each (``ValueError`` naming a bad one: a
    path or a trailing slash would never match the ``Origin`` header a browser sends)."""
    import re

    out = []
    for o in origins or []:
        for one in str(o).split(","):
            one = one.strip()
            if one != "*" and not re.fullmatch(r"https?://(\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+)(:\d{1,5})?", one):
                raise ValueError(f"allowed origin {one!r} is not '*' or scheme://host[:port] (as a browser sends it "
                                 "in its Origin header: no path, no trailing slash)")
            out.append(one)
    return out


def build_app(llm_or_engine, served_model_name: str, api_key: str | list[str] | None = None,
              max_num_seqs: int | None = None, max_waiting: int | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              media_limits=None, max_denoising_steps: int | None = None, max_model_len: int | None = None,
              salt_by_key: bool | None = None, body_timeout: float = BODY_IDLE_TIMEOUT,
              allowed_origins: list[str] | None = None) -> FastAPI:
    """``llm_or_engine``: an ``LLM``, an ``Engine`` or an ``AsyncEngine``. ``max_num_seqs`` (batch slots) overrides
    the engine's; ``max_waiting`` (default 4 * max_num_seqs) bounds the queue behind them (then 429);
    ``max_body_bytes`` bounds a request body (then 413); ``body_timeout``: seconds without a byte of a body being
    read before it is refused (then 408, and the connection closes). ``api_key``: None for none, one key or several (each
    a tenant); an empty key is refused. ``salt_by_key`` (default: when several keys are given) salts each request's
    prefix-cache blocks by its key, so tenants never share cached prefixes. ``max_denoising_steps`` and
    ``max_model_len`` cap one request's work (steps per canvas; prompt + output positions): over them, a 400.
    ``media_limits`` (``blockdiff.vision.media.MediaLimits``): images per request, their bytes and pixels, and the
    folder local image files may come from (default: none). ``allowed_origins``: web origins
    (``https://app.example``, or ``*`` for any) whose pages may call the API from a browser (CORS); default none,
    so a browser lets only pages served by this server (the playground) read its answers."""
    origins = check_origins(allowed_origins)
    keys = [api_key] if isinstance(api_key, str) else list(api_key) if api_key is not None else []
    if api_key is not None and (not keys or any(not isinstance(k, str) or not k.strip() for k in keys)):
        raise ValueError("the API key is empty: pass a non-empty key, or none to serve without one")
    if isinstance(llm_or_engine, AsyncEngine):
        aeng = llm_or_engine
        core = aeng.engine
    else:
        core = getattr(llm_or_engine, "engine", llm_or_engine)
        if not isinstance(core, Engine):
            raise TypeError(f"build_app needs an LLM, Engine or AsyncEngine, got {type(llm_or_engine).__name__}")
        aeng = None
    check_body_timeout(body_timeout)
    if max_num_seqs is not None:
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
        core.scheduler.max_num_seqs = max_num_seqs
    if aeng is None:
        aeng = AsyncEngine(core, max_waiting=max_waiting)
    elif max_waiting is not None:
        aeng.max_waiting = max_waiting
    srv = Server(aeng, served_model_name, keys or None, images=getattr(llm_or_engine, "images", None),
                 media_limits=media_limits, max_denoising_steps=max_denoising_steps, max_model_len=max_model_len,
                 salt_by_key=len(keys) > 1 if salt_by_key is None else salt_by_key)
    registry = prom.make_registry(aeng, srv.http_errors, served_model_name)

    @asynccontextmanager
    async def lifespan(app):
        srv.loop = asyncio.get_running_loop()
        aeng.start()
        if core.tokenizer is not None and not getattr(core.tokenizer, "structured_output_refusal", None):
            # structured output's token table (seconds at 262k), off the event loop
            warmup = srv.loop.run_in_executor(None, core.grammars)
            warmup.add_done_callback(_warmup_done)  # its outcome is read (and logged), never left unretrieved
            app.state.grammar_warmup = warmup
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, aeng.shutdown)
            srv.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="blockdiff", summary="OpenAI-compatible API for block-diffusion language models",
                  version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    app.router.route_class = _Route
    if origins:
        # Browsers send a preflight (OPTIONS) before a cross-origin JSON POST; the answer lists what they may send.
        # No cookies are involved (the key travels in the Authorization header), so no credentials mode.
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600)
    app.state.engine = aeng
    app.state.server = srv

    # ------------------------------------------------------------------ errors
    def error_response(e: APIError) -> JSONResponse:
        srv.count_error(e.status)
        headers = dict(e.headers or {})
        if e.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return ErrorJSONResponse(e.body(), status_code=e.status, headers=headers or None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on "
               f"{request.url.path}" + (f" (allowed: {e.headers['Allow']})" if (e.headers or {}).get("Allow")
                                        else "")}.get(e.status_code, str(e.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(APIError(e.status_code, msg, code=code, headers=e.headers))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):  # outside any route (middleware): last resort
        log.exception("unhandled error in %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    # ------------------------------------------------------------------ auth
    async def auth(request: Request) -> None:
        request.state.tenant = None
        if srv.api_keys is None:
            return
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        given = token.strip().encode()
        # Every key is compared (no early exit): the time taken does not say which key came close.
        hits = [secrets.compare_digest(given, k.encode()) for k in srv.api_keys]
        if scheme.lower() != "bearer" or not any(hits):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        request.state.tenant = srv.tenant_salt(srv.api_keys[hits.index(True)])

    guarded = [Depends(auth)]

    async def prepared(request: Request, kind: str):
        check_content_type(request)
        raw = await read_body(request, max_body_bytes, body_timeout)
        return await srv.prepare(kind, raw, getattr(request.state, "tenant", None))

    # ------------------------------------------------------------------ routes
    def healthy() -> bool:
        return aeng.healthy and not srv.draining

    @app.get("/health", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
    async def health():
        if not healthy():
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.head("/health", include_in_schema=False)  # load balancers' probes
    async def health_head():
        return Response(status_code=200 if healthy() else 503)

    @app.get("/metrics", dependencies=guarded, response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: schemas.ERRORS[401]})
    async def metrics():
        return Response(prom.render(registry), media_type=prom.CONTENT_TYPE)

    @app.get("/v1/models", dependencies=guarded, response_model=schemas.ModelList,
             responses={401: schemas.ERRORS[401]})
    async def models():
        return {"object": "list", "data": [srv.model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=guarded, response_model=schemas.ModelCard,
             responses={401: schemas.ERRORS[401], 404: schemas.ERRORS[404]})
    async def model(model_id: str):
        srv.check_model(model_id)
        return srv.model_card()

    @app.post("/tokenize", dependencies=guarded, openapi_extra=_request_body(TokenizeRequest),
              responses={200: {"model": schemas.Tokenized}, **schemas.ERRORS})
    async def tokenize(request: Request):
        check_content_type(request)
        return await srv.tokenize(await read_body(request, max_body_bytes, body_timeout),
                                  getattr(request.state, "tenant", None))

    @app.post("/detokenize", dependencies=guarded, openapi_extra=_request_body(DetokenizeRequest),
              responses={200: {"model": schemas.Detokenized}, **schemas.ERRORS})
    async def detokenize(request: Request):
        check_content_type(request)
        return await srv.detokenize(await read_body(request, max_body_bytes, body_timeout))

    @app.get("/version", response_model=schemas.Version)
    async def version():
        return {"version": __version__}

    @app.post("/v1/completions", dependencies=guarded, openapi_extra=_request_body(CompletionRequest),
              responses={200: {"model": schemas.Completion, "content": schemas.SSE}, **schemas.ERRORS})
    async def completions(request: Request):
        return await srv.generate(request, await prepared(request, "completion"))

    @app.post("/v1/chat/completions", dependencies=guarded, openapi_extra=_request_body(ChatCompletionRequest),
              responses={200: {"model": schemas.ChatCompletion, "content": schemas.SSE}, **schemas.ERRORS})
    async def chat_completions(request: Request):
        return await srv.generate(request, await prepared(request, "chat"))

    @app.post("/v1/responses", dependencies=guarded, openapi_extra=_request_body(ResponsesRequest),
              responses={200: {"content": schemas.RESPONSES}, **schemas.ERRORS})
    async def responses(request: Request):
        check_content_type(request)
        raw = await read_body(request, max_body_bytes, body_timeout)
        return await create_response(srv, request, raw, getattr(request.state, "tenant", None))

    # The request models' schemas join the document's components (the handlers read the raw body themselves,
    # so parsing and validation run off the event loop).
    base_openapi = app.openapi

    def openapi():
        if app.openapi_schema is None:
            doc = base_openapi()
            _, defs = models_json_schema([(m, "validation") for m in (CompletionRequest, ChatCompletionRequest,
                                                                        TokenizeRequest, DetokenizeRequest,
                                                                        ResponsesRequest)],
                                         ref_template="#/components/schemas/{model}")
            srv.document_limits(defs["$defs"])
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    from ..sudoku.talk import SudokuTokenizer
    from .playground import add_playground
    add_playground(app, api_key_required=api_key is not None, sudoku=isinstance(core.tokenizer, SudokuTokenizer))
    return app
