"""The request handlers' logic, one ``Server`` per app: prepare a request off the event loop (parse, validate,
tokenize), submit its ``n`` choices to the ``AsyncEngine``, and answer with JSON or an SSE stream.

Preparation (JSON parsing, pydantic validation, the chat template, tokenization) is CPU work: it runs in a small
thread pool, never on the event loop, so ``/health`` and the streams keep answering while a large prompt is read.
A prompt whose text is too long to fit the context in any tokenization is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ..engine.async_engine import (AsyncEngine, EngineFailedError, EngineOverloadedError, EngineStoppedError,
                                   RequestFailedError, RequestStream)
from ..engine.engine import Engine
from ..engine.failures import one_line
from ..sampling.fields import MAX_CACHE_SALT_CHARS
from ..sampling.params import SamplingParams
from ..structured.spec import compiling_for
from ..tools.output import ChatText, reasoning_tokens
from ..tools.output import message as tool_message
from ..vision.chat import extract_images
from ..vision.media import ImageLoader, MediaLimits
from ..vision.prompt import ImagePrompter
from .body import parse_body
from .errors import APIError, bad, from_validation
from .logprobs import CompletionLogprobs, chat_logprobs, completion_logprobs
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingRequest,
                       TokenizeRequest, check_context, choice_seed, context_words, engine_error, new_id, now, usage)
from .structured import GUIDED_FIELDS
from .text import TextStream
from .tools import chat_inputs, constrain

log = logging.getLogger("blockdiff.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RETRY_AFTER_S = 1


def _sse(d: dict) -> str:
    return f"data: {json.dumps(d, ensure_ascii=False, separators=(',', ':'))}\n\n"


def engine_failure(e: EngineFailedError, req=None) -> APIError:
    if isinstance(e, EngineStoppedError):
        return APIError(503, str(e), code="engine_stopped")
    if isinstance(e, RequestFailedError) and e.by_input:  # its own constraint failed it: a client error, which
        # clients do not retry (the openai client retries a 500 twice: the same grammar would fail again)
        return APIError(400, str(e), code="constraint_failed", param=None if req is None else constraint_field(req))
    if isinstance(e, RequestFailedError):  # this request alone (docs/serving.md, "When one request fails")
        return APIError(500, str(e), code="request_failed")
    return APIError(500, str(e), code="engine_error")


def constraint_field(req) -> str:
    """The field the client sent that became the request's constraint: response_format / guided_*,
    structured_outputs, or else the tools (the constraint is their call grammar)."""
    return req.field_names.get("structured_outputs") or (
        "structured_outputs" if req.structured_outputs is not None else "tools")


@dataclass
class Prepared:
    """A validated request: what the engine runs and what the answer echoes."""

    kind: str  # "chat" | "completion"
    req: SamplingRequest
    ids: list[int]
    params: SamplingParams
    echo: str | None = None  # completions with echo: the prompt text
    images: object = None  # chat with image_url parts: the prompt's ImageInputs (blockdiff.vision.prompt)


def salted(tenant: str | None, salt: str | None) -> str | None:
    """A request's prefix-cache salt: its own ``cache_salt``, under its tenant's when salting by API key.

    The result is checked again (``SamplingParams.validate``, at most ``MAX_CACHE_SALT_CHARS``): a client's salt
    that fits on its own but not behind the 33-character tenant tag was refused with "'cache_salt' must hold at
    most 1024 characters". Such a salt is replaced by its digest (as distinct as the salt itself)."""
    if tenant is None:
        return salt
    salt = salt or ""
    if len(tenant) + 1 + len(salt) > MAX_CACHE_SALT_CHARS:
        salt = "sha256:" + hashlib.sha256(salt.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{tenant}:{salt}"


def key_digest(key: str) -> str:
    """An API key's tenant tag (the prefix-cache salt when salting by key; Ray's router matches within it)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class Server:
    def __init__(self, engine: AsyncEngine, served_model_name: str, api_keys: list[str] | None, prep_workers: int = 2,
                 images: ImagePrompter | None = None, media_limits: MediaLimits | None = None,
                 max_denoising_steps: int | None = None, max_model_len: int | None = None, salt_by_key: bool = False):
        self.engine = engine
        self.core: Engine = engine.engine
        self.tokenizer = self.core.tokenizer
        self.defaults = self.core.defaults
        self.model_name = served_model_name
        self.api_keys = api_keys
        self.salt_by_key = salt_by_key
        for name, v in (("max_denoising_steps", max_denoising_steps), ("max_model_len", max_model_len)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        ctx = self.core.model.text.max_position_embeddings
        if max_model_len is not None and max_model_len > ctx:  # not silently capped: the operator asked for more
            raise ValueError(f"max_model_len {max_model_len} is more than the model's context of {ctx} positions "
                             "(max_position_embeddings in its config.json): give at most that, or leave it unset")
        self.max_denoising_steps = max_denoising_steps  # per-request caps (None: the field's own bound)
        self.max_model_len = max_model_len
        self.http_errors: dict[int, int] = {}
        self.created = now()
        self.pool = ThreadPoolExecutor(prep_workers, thread_name_prefix="blockdiff-prep")
        self.open: dict[str, RequestStream] = {}  # streams of responses in progress
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._max_chars: int | None = None
        self.images = images or ImagePrompter.for_model(self.core.model, None, self.tokenizer)
        self.media_limits = media_limits or MediaLimits()

    @property
    def context(self) -> int:
        """Positions one request may use (prompt + output): the model's context, or less with max_model_len."""
        ctx = self.core.model.text.max_position_embeddings
        return ctx if self.max_model_len is None else min(ctx, self.max_model_len)

    @property
    def server_limited(self) -> bool:
        """Whether max_model_len (--max-model-len), not the model, sets the context: errors then name the flag."""
        return self.context < self.core.model.text.max_position_embeddings

    @property
    def context_words(self) -> str:
        return context_words(self.context, self.server_limited)

    def tenant_salt(self, key: str) -> str | None:
        """The prefix-cache salt of requests made with ``key`` (when salting by key): a digest, never the key."""
        return key_digest(key) if self.salt_by_key else None

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "blockdiff",
                "max_model_len": self.context, "canvas_length": self.core.canvas_length}

    def document_limits(self, defs: dict) -> None:
        """Write this server's own bounds into the request schemas of ``/openapi.json`` (the served model id, the
        vocabulary, the canvas, the caps), so the document promises only what the server accepts."""
        top = self.core.model.vocab_size - 1
        for name in ("CompletionRequest", "ChatCompletionRequest", "ResponsesRequest"):
            props = defs[name]["properties"]
            props["model"]["enum"] = [self.model_name]
            for field in ("stop_token_ids", "allowed_token_ids", "canvas_template"):
                _array_items(props[field])["maximum"] = top
            _array_of(props["canvas_template"])["maxItems"] = self.core.canvas_length
            if self.max_denoising_steps is not None:
                _number(props["max_denoising_steps"])["maximum"] = self.max_denoising_steps
            for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                if field in props:
                    _number(props[field])["maximum"] = self.context
        for branch in defs["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
            items = branch.get("items", {})
            if items.get("type") == "integer":
                items["maximum"] = top
            elif items.get("type") == "array":
                items["items"]["maximum"] = top
        defs["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] = top
        tok = self.core.tokenizer
        for name in ("CompletionRequest", "ChatCompletionRequest", "ResponsesRequest"):
            props = defs[name]["properties"]
            if getattr(tok, "lays_canvas_template", False):  # a task model (Sudoku): refused by its task_params
                props["rng"]["enum"] = ["default"]
                for field in ("text_template", "suffix"):
                    if field in props:
                        props[field].pop("anyOf", None)
                        props[field]["type"] = "null"
            if getattr(tok, "structured_output_refusal", None):
                for field in (f for f in ("structured_outputs", *GUIDED_FIELDS) if f in props):
                    props[field].pop("anyOf", None)
                    props[field].pop("items", None)
                    props[field]["type"] = "null"
        if getattr(tok, "structured_output_refusal", None):
            defs["ResponseFormat"]["properties"]["type"]["enum"] = ["text"]
            defs["TextFormat"]["properties"]["type"]["enum"] = ["text"]
        for name in ("TokenizeRequest", "DetokenizeRequest"):
            _union(defs[name]["properties"]["model"], "string")["enum"] = [self.model_name]

    def count_error(self, status: int) -> None:
        self.http_errors[status] = self.http_errors.get(status, 0) + 1

    # ------------------------------------------------------------------ preparation (thread pool)
    async def prepare(self, kind: str, raw: bytes, tenant: str | None = None) -> Prepared:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._prepare, kind, raw, tenant)

    @property
    def max_prompt_chars(self) -> int:
        """No text longer than this fits the context: every token covers at most the longest vocabulary entry
        (x2 for normalizers that drop characters)."""
        if self._max_chars is None:
            longest = max((len(t) for t in self.tokenizer._tok.get_vocab(with_added_tokens=True)), default=1)
            self._max_chars = self.context * max(longest, 1) * 2
        return self._max_chars

    def _check_chars(self, n: int, param: str) -> None:
        if n > self.max_prompt_chars:
            raise bad(f"the prompt is too long: {n} characters cannot fit in {self.context_words} (at most "
                      f"{self.max_prompt_chars} characters)", param, "context_length_exceeded")

    def _prepare(self, kind: str, raw: bytes, tenant: str | None = None) -> Prepared:
        body = parse_body(raw)
        own = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        with compiling_for(salted(tenant, own)):  # grammars compiled while preparing it: cached per salt
            return self._prepare_body(kind, body, tenant)

    def _prepare_body(self, kind: str, body: dict, tenant: str | None) -> Prepared:
        try:
            req = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as e:
            raise from_validation(e) from None
        self.check_model(req.model)
        if req.n > self.engine.capacity:
            raise bad(f"'n' is {req.n}, more choices than this server runs at once ({self.engine.capacity})", "n")
        params = req.to_params()
        self._cap(params)
        params.cache_salt = salted(tenant, params.cache_salt)  # by API key: no tenant's prefix is another's
        echo = images = None
        if kind == "chat":
            ids, images = self.encode_chat(req)
            if images is not None and self.core.prefix_cache.max_blocks:
                images.digests()  # the prefix cache's keys: hashed here (~10 ms a full image), not in the engine's tick
            prompt_name = "messages"
            if req.tool_plan.active:  # calls (required / named / auto) or a thinking channel under a grammar
                if params.structured_outputs is not None:  # the answer's own constraint must admit an output
                    self._admit_structured(req, params)    # alone: beside calls it would silently never apply
                params = constrain(params, req.tool_plan, self.tokenizer)
        else:
            prompt_name = "prompt"
            if isinstance(req.prompt, str):
                ids = self.encode_text(req.prompt)
                echo = req.prompt if req.echo else None
            else:
                ids = req.prompt
                V = self.core.model.vocab_size
                bad_ids = [t for t in ids if not 0 <= t < V]
                if bad_ids:
                    raise bad(f"'prompt': prompt token ids must be in [0, {V}), got {bad_ids[0]}", "prompt")
                if req.echo:
                    echo = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        try:
            params.validate(self.core.model.vocab_size, self.core.canvas_length)
        except ValueError as e:
            raise engine_error(e, req.max_tokens_name, req.field_names) from None
        self._admit_structured(req, params)
        check_context(len(ids), params, self.defaults.max_new_tokens, self.core.canvas_length, self.context,
                      req.max_tokens_name, prompt_name, self.server_limited)
        return Prepared(kind, req, ids, params, echo, images)

    def _admit_structured(self, req, params: SamplingParams) -> None:
        """A constraint is bound and its first step run here, within a budget (``Engine.check_structured``): one
        that admits no output or costs too much is a 400 naming the field the client sent, never a failure
        inside a tick."""
        if params.structured_outputs is None:
            return
        try:
            self.core.check_structured(params)
        except ValueError as e:
            msg = str(e)
            param = constraint_field(req)  # named as the client sent it
            if param == "response_format":
                msg = msg.replace("structured_outputs.json:", "response_format.json_schema.schema:")
                msg = msg.replace("structured_outputs.json_object:", "response_format:")
            elif param in GUIDED_FIELDS:
                msg = msg.replace(f"structured_outputs.{GUIDED_FIELDS[param]}", param)
            elif param == "tools":
                msg = msg.replace("structured_outputs.grammar", "tools (the grammar of their calls)")
            raise bad(msg, param) from None

    def _cap(self, params: SamplingParams) -> None:
        """The server's per-request caps: an explicit value over one is a 400 naming it; unset, the checkpoint's
        default is capped."""
        cap = self.max_denoising_steps
        if cap is None:
            return
        if params.max_denoising_steps is None:
            params.max_denoising_steps = min(self.defaults.max_denoising_steps, cap)
        elif params.max_denoising_steps > cap:
            raise bad(f"'max_denoising_steps' is {params.max_denoising_steps}; this server allows at most {cap} "
                      "denoising steps per canvas (--max-denoising-steps)", "max_denoising_steps")

    def check_model(self, name: str) -> None:
        """404 (OpenAI's ``model_not_found``) unless ``name`` is the model this server serves."""
        if name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves ['{self.model_name}']",
                           "model", "model_not_found")

    # ------------------------------------------------------------------ /tokenize, /detokenize
    def _model_of(self, req) -> None:
        if req.model is not None:
            self.check_model(req.model)

    def _validated(self, model, raw: bytes, body: dict | None = None):
        try:
            req = model.model_validate(parse_body(raw) if body is None else body)
        except ValidationError as e:
            raise from_validation(e) from None
        self._model_of(req)
        if self.tokenizer is None:
            raise bad("this model has no tokenizer", "model")
        return req

    def _tokenize(self, raw: bytes) -> dict:
        body = parse_body(raw)
        req = self._validated(TokenizeRequest, raw, body)
        if req.prompt is not None:
            ids = self.encode_text(req.prompt, add_bos=req.add_special_tokens)
        else:  # the prompt chat would run: the same request model, the same encode_chat
            try:
                chat = req.chat_request(body, self.model_name)
            except ValidationError as e:
                raise from_validation(e) from None
            ids, _ = self.encode_chat(chat)
        out = {"count": len(ids), "max_model_len": self.context, "tokens": ids, "token_strs": None}
        if req.return_token_strs:  # the vocabulary pieces, as vLLM returns them (convert_ids_to_tokens)
            out["token_strs"] = [self.tokenizer.id_to_token(t) or "" for t in ids]
        return out

    def _detokenize(self, raw: bytes) -> dict:
        req = self._validated(DetokenizeRequest, raw)
        V = self.core.model.vocab_size
        bad_ids = [t for t in req.tokens if t >= V]
        if bad_ids:
            raise bad(f"'tokens' must be ids in [0, {V}), got {bad_ids[0]}", "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    async def tokenize(self, raw: bytes, tenant: str | None = None) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._tokenize_salted, raw, tenant)

    def _tokenize_salted(self, raw: bytes, tenant: str | None) -> dict:
        with compiling_for(salted(tenant, None)):  # a tools grammar compiled here: cached per tenant too
            return self._tokenize(raw)

    async def detokenize(self, raw: bytes) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._detokenize, raw)

    def encode_text(self, text: str, add_bos: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise bad("this model has no tokenizer: send 'prompt' as an array of token ids", "prompt")
        self._check_chars(len(text), "prompt")
        try:
            ids = self.tokenizer.encode(text)
        except ValueError as e:  # a checkpoint that reads only some texts (the Sudoku model: puzzles)
            raise bad(str(e), "prompt") from None
        bos = self.tokenizer.bos_token_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def encode_chat(self, req: ChatCompletionRequest) -> tuple[list[int], object]:
        """-> (prompt ids, the images' ImageInputs or None); image_url parts load and expand here."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise bad("this model has no chat template: use /v1/completions", "messages")
        messages, sources, wheres = extract_images(req.template_messages())
        self._check_chars(sum(len(m.text()) for m in req.messages), "messages")
        try:
            self.images.check_texts(messages)
        except ValueError as e:
            raise bad(str(e), getattr(e, "param", None) or "messages") from None
        messages, kwargs = chat_inputs(messages, req.template_kwargs(), req.tool_plan)
        loaded = self.load_images(sources, wheres)
        try:
            ids = self.tokenizer.encode_chat(messages, add_generation_prompt=req.add_generation_prompt, **kwargs)
        except (ValueError, TypeError) as e:
            raise bad(f"the conversation does not fit the model's chat template ('messages'): {e}",
                      "messages") from None
        try:
            return self.images.prepare(ids, loaded)
        except ValueError as e:
            raise bad(str(e), "messages") from None

    def load_images(self, sources: list, wheres: list[str]) -> list:
        """image_url sources -> decoded images, within the media limits (400 with one line otherwise)."""
        if not sources:
            return []
        try:
            self.images.check_can_take_images()
            return ImageLoader(self.media_limits).load_all(sources, wheres)
        except ValueError as e:  # a ParamError names the image's part (messages[i].content[j])
            raise bad(str(e), getattr(e, "param", None) or "messages") from None

    # ------------------------------------------------------------------ running
    def submit(self, p: Prepared, rid: str) -> list[RequestStream]:
        """One engine request per choice; all or none are admitted."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="engine_stopped")
        streams: list[RequestStream] = []
        try:
            if p.req.n > 1:  # all choices or none (nothing awaits between here and the submits below)
                self.engine.check_room(p.req.n)
            # greedy and unseeded is seed 0 (SamplingParams.resolved): its choices are seed 0's, not n copies of one
            seed = 0 if p.params.seed is None and p.params.greedy else p.params.seed
            for i in range(p.req.n):
                params = p.params if i == 0 else _with_seed(p.params, choice_seed(seed, i))
                streams.append(self.engine.submit(p.ids, params, rid if p.req.n == 1 else f"{rid}-{i}",
                                                  images=p.images, held=True))
        except BaseException as e:
            for s in streams:
                self.engine.release(s)
            if isinstance(e, ValueError):
                raise engine_error(e, p.req.max_tokens_name, p.req.field_names) from None
            if isinstance(e, EngineOverloadedError):
                raise APIError(429, str(e), code="server_overloaded",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            if isinstance(e, EngineFailedError):
                raise engine_failure(e) from None
            raise
        return streams

    def text_stream(self, params: SamplingParams) -> TextStream:
        # The id that ended the output is not text: an EOS (unless ignore_eos) or an explicit stop token id.
        eos = (set() if params.ignore_eos else set(self.defaults.eos_token_ids)) | set(params.stop_token_ids or [])
        stops = None if params.structured_outputs is not None else params.stop  # never cut constrained text
        return TextStream(self.tokenizer, stops, eos)

    def chat_text(self, p: Prepared) -> ChatText | None:
        """With tools or thinking: the output parsed into content, reasoning and tool calls (else None)."""
        plan = p.req.tool_plan if p.kind == "chat" else None
        if plan is None or not plan.active or self.tokenizer is None:
            return None
        ts = self.text_stream(p.params)
        return ChatText(self.tokenizer, plan, ts.eos_ids, ts.stops)

    def reasoning_tokens(self, p: Prepared, states) -> int | None:
        """Chat's ``completion_tokens_details.reasoning_tokens`` over the choices (None on completions)."""
        if p.kind != "chat":
            return None
        plan = p.req.tool_plan
        return sum(reasoning_tokens(self.tokenizer, plan, s.output_ids) for s in states)

    async def generate(self, request: Request, p: Prepared) -> Response:
        rid = new_id("chatcmpl" if p.kind == "chat" else "cmpl")
        streams = self.submit(p, rid)
        for s in streams:
            self.open[s.request_id] = s
        if p.req.stream:
            return StreamingResponse(self._sse(p, rid, streams), headers=SSE_HEADERS,
                                     media_type="text/event-stream")
        try:
            return await self._complete(request, p, rid, streams)
        except Exception:  # writing the response failed (the client gets a 500): an error in /metrics
            self._close(streams, failed=True)
            raise
        finally:
            self._close(streams)

    def _close(self, streams: list[RequestStream], failed: bool = False) -> None:
        """Forget the response's streams, abort what still runs and settle their outcomes in /metrics (the first
        call settles them); ``failed``: the response failed (its output could not be detokenized, or one of its
        choices failed), so its requests count as errors, not as client aborts, nor as successes where the engine
        had already finished them."""
        for s in streams:
            self.open.pop(s.request_id, None)
            self.engine.release(s, failed=failed)

    async def _complete(self, request: Request, p: Prepared, rid: str, streams: list[RequestStream]) -> Response:
        texts = [[] for _ in streams]
        parsed = [None] * len(streams)  # with tools / thinking: (message, finish_reason) per choice

        async def consume(i: int, rs: RequestStream):
            ts = self.text_stream(p.params)
            ct = self.chat_text(p)
            async for ev in rs:
                if ev.kind == "block":
                    if ct is not None:
                        ct.push(ev.token_ids)
                    else:
                        texts[i].append(ts.push(ev.token_ids))
                elif ev.kind == "done" and ct is not None:
                    _, out, reason = ct.finish(ev.finish_reason)
                    parsed[i] = (tool_message(out), reason)
            if ct is None:
                texts[i].append(ts.finish())

        async def client_left():  # after the body was read, receive() returns only on disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(asyncio.gather(*(consume(i, rs) for i, rs in enumerate(streams))))
        watch = asyncio.ensure_future(client_left())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # nobody is waiting for the answer any more
                work.cancel()
                # its outcome (the cancellation) is read, never logged as "exception was never retrieved"
                work.add_done_callback(lambda f: f.cancelled() or f.exception())
                return Response(status_code=499)
            try:
                work.result()
            except EngineFailedError as e:
                self._close(streams, failed=_fails_response(e))  # its other choices end with it (its error)
                raise engine_failure(e, p.req) from None
            except Exception as e:  # detokenizing this request's output: this request fails, alone
                log.exception("request %s: detokenizing its output failed", rid)
                self._close(streams, failed=True)
                raise APIError(500, f"this request failed: detokenizing its output failed: {one_line(e)}",
                               code="request_failed") from None
        finally:
            watch.cancel()
        states = [rs.state for rs in streams]
        choices = []
        for i, s in enumerate(states):
            text = (p.echo or "") + "".join(texts[i])
            lps = None
            if s.output_logprobs is not None:
                lps = (chat_logprobs if p.kind == "chat" else completion_logprobs)(
                    self.tokenizer, s.output_ids, s.output_logprobs)
            if p.kind == "chat" and parsed[i] is not None:
                c = {"index": i, "message": parsed[i][0], "logprobs": lps, "finish_reason": parsed[i][1]}
            elif p.kind == "chat":
                c = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                     "finish_reason": s.finish_reason}
            else:
                c = {"index": i, "text": text, "logprobs": lps, "finish_reason": s.finish_reason}
                if self.tokenizer is None:  # no text to show: the answer is its ids, as the prompt was
                    c["token_ids"] = list(s.output_ids)
            if len(states) > 1:
                c["metrics"] = s.metrics.as_dict()
            choices.append(c)
        return JSONResponse({"id": rid, "object": "chat.completion" if p.kind == "chat" else "text_completion",
                             "created": now(), "model": self.model_name, "choices": choices,
                             "usage": usage(len(p.ids), sum(len(s.output_ids) for s in states),
                                            states[0].metrics.cached_tokens, self.reasoning_tokens(p, states)),
                             "metrics": states[0].metrics.as_dict()})

    async def _sse(self, p: Prepared, rid: str, streams: list[RequestStream]):
        created = now()
        chat = p.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = p.req.include_usage

        def chunk(i: int, text: str | None = None, finish: str | None = None, role: bool = False, lps=None,
                  delta: dict | None = None, ids: list[int] | None = None, **extra) -> str:
            if chat:
                if delta is None:
                    delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": lps, "finish_reason": finish}
                if ids is not None:
                    choice["token_ids"] = ids
            d = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
            if include_usage:
                d["usage"] = None
            d.update(extra)
            return _sse(d)

        # One task per choice feeds a shared queue, so choices stream as their canvases commit.
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, rs: RequestStream):
            try:
                async for ev in rs:
                    await queue.put((i, ev))
            except BaseException as e:  # EngineFailedError, or cancelled
                await queue.put((i, e))
                return
        pumps = [asyncio.ensure_future(pump(i, rs)) for i, rs in enumerate(streams)]
        text_streams = [self.text_stream(p.params) for _ in streams]
        chat_texts = [self.chat_text(p) for _ in streams]  # with tools / thinking: parsed deltas
        canvases = [0] * len(streams)
        # completions logprobs, per choice: the text offset and a character split across canvases carry over
        completion_lps = [CompletionLogprobs(self.tokenizer) for _ in streams]
        left = len(streams)
        try:
            for i in range(len(streams)):
                if chat:
                    yield chunk(i, role=True)
                if p.echo:
                    yield chunk(i, p.echo)
            while left:
                i, ev = await queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                if ev.kind == "draft":
                    text = tokens = None
                    if self.tokenizer is not None:
                        text = self.tokenizer.decode(ev.token_ids)
                        tokens = [self.tokenizer.decode([t]) for t in ev.token_ids]  # what each position shows
                    yield chunk(i, draft={"canvas": canvases[i], "step": ev.step, "token_ids": ev.token_ids,
                                          "accepted": ev.accepted, "entropy": ev.entropy, "tokens": tokens,
                                          "text": text})
                elif ev.kind == "block" and chat_texts[i] is not None:
                    canvases[i] += 1
                    lps = chat_logprobs(self.tokenizer, ev.token_ids, ev.logprobs) if ev.logprobs is not None else None
                    deltas = chat_texts[i].push(ev.token_ids)
                    for k, d in enumerate(deltas):
                        yield chunk(i, delta=d, lps=lps if k == 0 else None)
                    if lps is not None and not deltas:
                        yield chunk(i, delta={}, lps=lps)
                elif ev.kind == "done" and chat_texts[i] is not None:
                    left -= 1
                    deltas, _, reason = chat_texts[i].finish(ev.finish_reason)
                    for d in deltas:
                        yield chunk(i, delta=d)
                    yield chunk(i, finish=reason)
                elif ev.kind == "block":
                    canvases[i] += 1
                    delta = text_streams[i].push(ev.token_ids)
                    lps = None
                    if ev.logprobs is not None:  # this block's tokens, sent with its text (even when held back)
                        if chat:
                            lps = chat_logprobs(self.tokenizer, ev.token_ids, ev.logprobs)
                        else:  # a character the block leaves incomplete: its tokens wait for the next block
                            lps = completion_lps[i].block(ev.token_ids, ev.logprobs)
                            lps = lps if lps["tokens"] else None
                    # a model without a tokenizer streams its ids: its text is always empty
                    ids = list(ev.token_ids) if self.tokenizer is None and not chat else None
                    if delta or lps is not None or ids:
                        yield chunk(i, delta, lps=lps, ids=ids)
                elif ev.kind == "done":
                    left -= 1
                    delta = text_streams[i].finish()
                    lps = None if chat else completion_lps[i].flush()  # tokens of a character never completed
                    if delta or lps is not None:
                        yield chunk(i, delta, lps=lps)
                    yield chunk(i, finish=ev.finish_reason)
            if include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [],
                            "usage": usage(len(p.ids), sum(len(rs.state.output_ids) for rs in streams),
                                            streams[0].state.metrics.cached_tokens,
                                            self.reasoning_tokens(p, [rs.state for rs in streams]))})
            self._close(streams)  # settled (/metrics) before the client reads the end of the stream
            yield "data: [DONE]\n\n"
        except EngineFailedError as e:
            self._close(streams, failed=_fails_response(e))  # its other choices end with it (an error event)
            err = engine_failure(e, p.req)
            self.count_error(err.status)
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        except Exception as e:  # detokenizing, or a bug, while streaming: an error event and [DONE], this stream only
            log.exception("error while streaming %s", rid)
            self.count_error(500)
            self._close(streams, failed=True)
            yield _sse(APIError(500, f"this request failed: {one_line(e)}", code="request_failed").body())
            yield "data: [DONE]\n\n"
        finally:  # the client left (the response was cancelled) or the stream ended
            for t in pumps:
                t.cancel()
            self._close(streams)

    # ------------------------------------------------------------------ shutdown
    def begin_drain(self, grace: float) -> None:
        """Called from the signal handler (any thread): refuse new requests; streams still running when the
        grace period is nearly over get an error event and ``[DONE]`` instead of being cut mid-response."""
        self.draining = True
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain(grace)))

    async def _drain(self, grace: float) -> None:
        await asyncio.sleep(max(0.0, grace - min(1.0, grace / 2)))
        open_now = [s for s in self.open.values() if not s.finished]
        if not open_now:
            return
        exc = EngineStoppedError(f"the server is shutting down; this request was still running after the "
                                 f"{grace:g} s grace period")
        for s in open_now:
            self.engine.abort(s.request_id)
            s._put(exc)
        log.warning("shutdown: %d request(s) still running after the %g s grace period were ended with an "
                    "error event", len(open_now), grace)


def _fails_response(e: EngineFailedError) -> bool:
    """Whether the choices still running beside a choice that failed with ``e`` count as failed (/metrics: error):
    yes when it failed, no when the engine stopped (shutdown: they are aborted)."""
    return not isinstance(e, EngineStoppedError)


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, seed=seed)


# JSON Schema helpers for document_limits: a field's schema is often anyOf [its type, null].
def _union(schema: dict, type_: str) -> dict:
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == type_:
            return branch
    return schema


def _number(schema: dict) -> dict:
    return _union(schema, "integer")


def _array_of(schema: dict) -> dict:
    return _union(schema, "array")


def _array_items(schema: dict) -> dict:
    return _array_of(schema)["items"]
