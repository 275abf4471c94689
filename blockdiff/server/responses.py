"""OpenAI's Responses API, ``POST /v1/responses``, on the chat completions path.

A Responses request is read as the chat request it means - ``input`` items -> ``messages`` (``instructions`` first,
as a system message; ``function_call`` / ``function_call_output`` items -> an assistant message with
``tool_calls`` / a ``tool`` message), function ``tools`` (flat) -> chat's nested ones, ``text.format`` ->
``response_format``, ``reasoning.effort`` -> the chat template's ``enable_thinking``, ``max_output_tokens`` ->
``max_tokens`` - and runs through the same preparation, validation, engine and tool / thinking parsing as
``/v1/chat/completions`` (one validation source). The answer is written back as a ``response`` object, or as the
Responses stream's typed events (``response.created`` ... ``response.completed``, each with its
``sequence_number``). blockdiff's own sampling fields (``seed``, ``max_denoising_steps``, ...) pass through as on
chat. Errors name the Responses field (``max_output_tokens``, ``input[2].content[0]``).

Stateless: nothing is stored, so ``previous_response_id``, ``conversation`` and ``background`` are 400s (send the
whole conversation in ``input``); ``store`` is accepted and the response says ``"store": false``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..sampling.fields import first_error, json_type
from .body import parse_body
from .errors import APIError, bad
from .protocol import RESPONSES_SAMPLING, ResponsesRequest, now
from .service import SSE_HEADERS



def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Translation:
    """One Responses request as a chat request, and how to name its fields back in errors."""

    def __init__(self, body):
        _refuse_unsupported(body)  # before validation: these say why, not only what type was expected
        try:
            ResponsesRequest.model_validate(body)  # the Responses fields; the chat path checks the rest
        except ValidationError as e:
            raise bad(*first_error(e, deepest=True)) from None
        self.body = body
        self.origins: list[str] = []  # messages[k] came from this Responses path
        self.call_origins: dict[int, list[str]] = {}  # messages[k].tool_calls[j] came from this function_call item
        self.chat = self._chat()

    # ------------------------------------------------------------------ request
    def _chat(self) -> dict:
        b = self.body
        chat: dict[str, Any] = {k: b[k] for k in RESPONSES_SAMPLING if k in b}  # blockdiff's own sampling fields
        chat["model"] = b.get("model")
        chat["messages"] = self._messages()
        for src, dst in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user"),
                         ("metadata", "metadata")):
            if b.get(src) is not None:
                chat[dst] = b[src]
        if b.get("top_logprobs") not in (None, 0) or "message.output_text.logprobs" in (b.get("include") or []):
            chat["logprobs"], chat["top_logprobs"] = True, b.get("top_logprobs") or 0
        if b.get("tools") is not None:
            chat["tools"] = self._tools(b["tools"])
        if b.get("tool_choice") is not None:
            chat["tool_choice"] = self._tool_choice(b["tool_choice"])
        fmt = self._format()
        if fmt is not None:
            chat["response_format"] = fmt
        thinking = self._thinking()
        if thinking is not None:
            chat["chat_template_kwargs"] = {"enable_thinking": thinking}
        if b.get("stream") is not None:
            chat["stream"] = b["stream"]
            if b["stream"] is True:
                chat["stream_options"] = {"include_usage": True}
        return chat

    # The model has checked every shape below (types, roles, part kinds, required keys): only what it cannot say is
    # refused here.
    def _messages(self) -> list[dict]:
        b, out = self.body, []
        if b.get("instructions") is not None:
            out.append({"role": "system", "content": b["instructions"]})
            self.origins.append("instructions")
        items = b["input"]
        if isinstance(items, str):
            out.append({"role": "user", "content": items})
            self.origins.append("input")
            return out
        if not items:
            raise bad("'input' must be a string or a non-empty list of input items, got an empty list", "input")
        for j, item in enumerate(items):
            where = f"input[{j}]"
            kind = item.get("type") or "message"
            if kind == "message":
                out.append(self._message(item))
            elif kind == "function_call":
                call = {"id": item["call_id"], "type": "function",
                        "function": {"name": item["name"], "arguments": item["arguments"]}}
                if out and out[-1]["role"] == "assistant" and self.origins[-1].startswith("input"):
                    # the turn's text, then its calls (or parallel calls): items of one assistant turn
                    out[-1].setdefault("tool_calls", []).append(call)
                    self.call_origins.setdefault(len(out) - 1, []).append(where)
                    continue
                self.call_origins[len(out)] = [where]
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item["output"]  # a string, or input_text parts
                if isinstance(output, list):
                    output = "".join(p["text"] for p in output)
                out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
            else:  # reasoning: an earlier turn's, sent back; the chat template drops past thinking anyway
                continue
            self.origins.append(where)
        return out

    @staticmethod
    def _message(item: dict) -> dict:
        content = item["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": p["image_url"]}} if p["type"] == "input_image"
                       else {"type": "text", "text": p["refusal"] if p["type"] == "refusal" else p["text"]}
                       for p in content]
        return {"role": item["role"], "content": content}

    @staticmethod
    def _tools(tools: list) -> list:
        return [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                  if t.get(k) is not None}} for t in tools]

    def _tool_choice(self, choice):
        if not isinstance(choice, dict):
            return choice
        if choice.get("type") != "function":
            raise bad(f"'tool_choice.type' must be 'function' (or tool_choice 'none', 'auto' or 'required'), got "
                      f"{choice.get('type')!r}", "tool_choice.type")
        name = choice.get("name")
        if not isinstance(name, str):
            raise bad(f"'tool_choice.name' must be a string, got {json_type(name)}", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}

    def _format(self):  # the model checked the shapes: text.format, then reasoning.effort
        fmt = (self.body.get("text") or {}).get("format")
        if fmt is None:
            return None
        if fmt.get("type") == "json_schema":
            for k in ("name", "schema"):  # OpenAI's Responses API requires both (chat's json_schema only a name)
                if fmt.get(k) is None:
                    raise bad(f"'text.format.{k}' is required when 'text.format.type' is 'json_schema'",
                              f"text.format.{k}")
            return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema",
                                                                                "strict") if k in fmt}}
        return {"type": fmt.get("type")}  # text / json_object

    def _thinking(self) -> bool | None:
        effort = (self.body.get("reasoning") or {}).get("effort")
        return None if effort is None else effort not in ("none", "minimal")

    # ------------------------------------------------------------------ errors
    def rename(self, e: APIError) -> APIError:
        """A chat-path error, naming the Responses request's own fields."""
        e.param = self._name(e.param) if e.param else e.param
        e.message = re.sub(r"(?<![\w.\[])(messages\[\d+\][\w.\[\]]*|messages|max_tokens|max_completion_tokens|"
                           r"response_format(?:\.json_schema\.schema|\.json_schema)?|chat_template_kwargs|"
                           r"tools\[\d+\]\.function|tool_choice\.function)",
                           lambda m: self._name(m.group(1)), e.message)
        e.message = e.message.replace("'logprobs'", f"'{self._name('logprobs')}'")  # the field, not the word
        return e

    def _name(self, param: str) -> str:
        m = re.match(r"messages\[(\d+)\](.*)", param)
        if m and int(m.group(1)) < len(self.origins):
            k, rest = int(m.group(1)), m.group(2)
            origin = self.origins[k]
            if origin in ("input", "instructions"):
                return origin
            call = re.match(r"\.tool_calls\[(\d+)\](.*)", rest)
            if call and int(call.group(1)) < len(self.call_origins.get(k, [])):  # a function_call item's field
                field = {".id": ".call_id", ".function.name": ".name", ".function.arguments": ".arguments"}
                return self.call_origins[k][int(call.group(1))] + field.get(call.group(2), "")
            if self.body["input"][int(origin[6:-1])].get("type") == "function_call_output":  # a tool message's
                return origin + {".tool_call_id": ".call_id", ".content": ".output"}.get(rest, "")
            return origin + rest
        for old, new in (("messages", "input"), ("max_completion_tokens", "max_output_tokens"),
                         ("max_tokens", "max_output_tokens"), ("response_format.json_schema.schema",
                                                               "text.format.schema"),
                         ("response_format.json_schema", "text.format"), ("response_format", "text.format"),
                         ("chat_template_kwargs", "reasoning"), ("tool_choice.function", "tool_choice"),
                         ("logprobs", "top_logprobs" if self.body.get("top_logprobs") else "include")):
            if param == old or param.startswith(old + "."):
                return new + param[len(old):]
        m = re.match(r"tools\[(\d+)\]\.function(.*)", param)
        if m:
            return f"tools[{m.group(1)}]{m.group(2)}"
        return param

    # ------------------------------------------------------------------ response
    def response(self, rid: str, created: int, status: str, output: list, usage: dict | None,
                 incomplete: str | None = None, error: dict | None = None) -> dict:
        b = self.body
        fmt = (b.get("text") or {}).get("format") if isinstance(b.get("text"), dict) else None
        return {"id": rid, "object": "response", "created_at": created, "status": status,
                "completed_at": now() if status == "completed" else None,
                "model": b.get("model"), "output": output, "error": error,
                "incomplete_details": {"reason": incomplete} if incomplete else None,
                "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
                "temperature": b.get("temperature"), "top_p": b.get("top_p"), "top_logprobs": b.get("top_logprobs"),
                "parallel_tool_calls": b.get("parallel_tool_calls", True) is not False,
                "tool_choice": b.get("tool_choice") or "auto", "tools": b.get("tools") or [],
                "text": {"format": fmt or {"type": "text"}}, "reasoning": b.get("reasoning"),
                "metadata": b.get("metadata") or {}, "store": False, "previous_response_id": None,
                "truncation": "disabled", "user": b.get("user"), "usage": usage}


def _refuse_unsupported(b: dict) -> None:
    """What a stateless server on the chat path cannot take, each with a 400 saying what to send instead."""
    for field, why in (("previous_response_id", "this server stores no responses"),
                       ("conversation", "this server stores no conversations"),
                       ("prompt", "this server has no stored prompt templates")):
        if b.get(field) is not None:
            raise bad(f"'{field}' is not supported: {why}; send the whole conversation in 'input'", field)
    # "is": 0 == False in Python (and pydantic's Literal[False] takes 0), but JSON's 0 is no boolean.
    if b.get("background") is not None and b.get("background") is not False:
        raise bad("'background' is not supported: responses are answered while the request is open", "background")
    if b.get("truncation") not in (None, "disabled"):
        raise bad(f"'truncation' must be 'disabled', got {b['truncation']!r}: a prompt longer than the context "
                  "is refused, never cut", "truncation")
    if b.get("stream_drafts") is not None and b.get("stream_drafts") is not False:
        raise bad("'stream_drafts' is not supported on /v1/responses (its event types carry no drafts): stream "
                  "drafts from /v1/chat/completions or /v1/completions", "stream_drafts")
    if b.get("input") is None and "messages" in b:
        raise bad("'input' is required: /v1/responses takes the conversation as 'input' (a string, or a list of "
                  "input items), not 'messages'", "input")
    tools = b.get("tools")
    for i, t in enumerate(tools if isinstance(tools, list) else []):
        if isinstance(t, dict) and t.get("type") != "function":
            raise bad(f"'tools[{i}].type' must be 'function' (built-in tools such as web_search run on OpenAI's "
                      f"servers), got {t.get('type')!r}", f"tools[{i}].type")


def response_usage(u: dict | None) -> dict | None:
    if u is None:
        return None
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                                     "cache_write_tokens": 0},  # no billed cache writes: the prefix cache is automatic
            "output_tokens": u["completion_tokens"], "output_tokens_details": {
                "reasoning_tokens": (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)},
            "total_tokens": u["total_tokens"]}


def output_items(message: dict, logprobs: dict | None, cut: bool = False) -> list[dict]:
    """A chat message (content, reasoning_content, tool_calls) as Responses output items, in the order written;
    ``cut``: the budget ran out, and the last item, the one being written, is ``incomplete``."""
    items = []
    if message.get("reasoning_content"):
        items.append({"type": "reasoning", "id": _id("rs"), "summary": [], "status": "completed",
                      "content": [{"type": "reasoning_text", "text": message["reasoning_content"]}]})
    if message.get("content") or not (items or message.get("tool_calls")):  # an empty answer: one empty message
        items.append({"type": "message", "id": _id("msg"), "role": "assistant", "status": "completed",
                      "content": [{"type": "output_text", "text": message.get("content") or "", "annotations": [],
                                   "logprobs": (logprobs or {}).get("content") or []}]})
    for call in message.get("tool_calls") or []:
        items.append({"type": "function_call", "id": _id("fc"), "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    if cut:
        items[-1]["status"] = "incomplete"
    return items


def _failure(t: Translation, chunk: dict) -> dict:
    """A chat stream's error event as the Responses error object: OpenAI's code for a client's or the server's
    fault (the request's own constraint failing it, or anything else), the message and param in Responses names."""
    err = chunk["error"]
    e = t.rename(APIError(500, err.get("message") or "", err.get("param"), type=err.get("type")))
    return {"code": "invalid_prompt" if e.type == "invalid_request_error" else "server_error", "message": e.message,
            "param": e.param, "type": e.type}


def _status(finish_reason: str | None) -> tuple[str, str | None]:
    return ("incomplete", "max_output_tokens") if finish_reason == "length" else ("completed", None)


async def create_response(srv, request: Request, raw: bytes, tenant: str | None) -> Response:
    """``POST /v1/responses``: translate, run on the chat path, translate the answer back."""
    t = Translation(parse_body(raw))  # its own 400s name the Responses fields already
    try:
        p = await srv.prepare("chat", json.dumps(t.chat).encode(), tenant)
        answer = await srv.generate(request, p)
    except APIError as e:
        raise t.rename(e) from None
    rid, created = _id("resp"), now()
    if not p.req.stream:
        if answer.status_code != 200:
            return answer  # the client left (499)
        chat = json.loads(answer.body)
        choice = chat["choices"][0]
        status, incomplete = _status(choice["finish_reason"])
        output = output_items(choice["message"], choice["logprobs"], cut=status == "incomplete")
        return JSONResponse(t.response(rid, created, status, output,
                                       response_usage(chat.get("usage")), incomplete))
    return StreamingResponse(_events(t, rid, created, answer.body_iterator), headers=SSE_HEADERS,
                             media_type="text/event-stream")


async def _events(t: Translation, rid: str, created: int, chunks):
    try:
        async for s in _translate(t, rid, created, chunks):
            yield s
    finally:  # ended, or the client left: the chat stream's own cleanup (aborting the request) runs now
        await chunks.aclose()


async def _translate(t: Translation, rid: str, created: int, chunks):
    """The chat stream's chunks as Responses stream events."""
    seq = 0
    items: list[dict] = []
    open_item: dict | None = None  # the reasoning or message item text is going into
    calls: dict[int, dict] = {}  # tool call index -> its function_call item
    lps: list = []  # logprobs not yet sent: a canvas whose text is held back (a stop string may follow) sends its own

    def event(kind: str, **fields) -> str:
        nonlocal seq
        d = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(d, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def open_text(kind: str):
        nonlocal open_item
        out = list(close_open())
        if kind == "reasoning":
            item = {"type": "reasoning", "id": _id("rs"), "summary": [], "status": "in_progress", "content": []}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": _id("msg"), "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        items.append(item)
        open_item = item
        out.append(event("response.output_item.added", output_index=len(items) - 1, item=dict(item, content=[])))
        item["content"].append(part)
        out.append(event("response.content_part.added", item_id=item["id"], output_index=len(items) - 1,
                         content_index=0, part=dict(part)))
        return out

    def close_open(status: str = "completed"):
        nonlocal open_item
        item, open_item = open_item, None
        if item is None:
            return
        i, part = items.index(item), item["content"][0]
        item["status"] = status
        if item["type"] == "reasoning":
            yield event("response.reasoning_text.done", item_id=item["id"], output_index=i, content_index=0,
                        text=part["text"])
        else:
            yield event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                        text=part["text"], logprobs=part["logprobs"])
        yield event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0, part=part)
        yield event("response.output_item.done", output_index=i, item=item)

    def text(kind: str, delta: str, lps=None):
        out = []
        if open_item is None or open_item["type"] != kind:
            out += open_text(kind)
        item, i = open_item, items.index(open_item)
        part = item["content"][0]
        part["text"] += delta
        if kind == "reasoning":
            out.append(event("response.reasoning_text.delta", item_id=item["id"], output_index=i, content_index=0,
                             delta=delta))
        else:
            part["logprobs"] += lps or []
            out.append(event("response.output_text.delta", item_id=item["id"], output_index=i, content_index=0,
                             delta=delta, logprobs=lps or []))
        return out

    skeleton = t.response(rid, created, "in_progress", [], None)
    yield event("response.created", response=skeleton)
    yield event("response.in_progress", response=skeleton)
    finish, usage = None, None
    async for raw in chunks:
        for line in raw.splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:  # the request failed while it ran: what it wrote is incomplete; then response.failed
                for s in close_open("incomplete"):
                    yield s
                for item in calls.values():
                    item["status"] = "incomplete"
                    yield event("response.output_item.done", output_index=items.index(item), item=item)
                yield event("response.failed", response=t.response(rid, created, "failed", items,
                                                                   response_usage(usage), error=_failure(t, d)))
                return
            usage = d.get("usage") or usage
            for choice in d.get("choices") or []:
                delta = choice.get("delta") or {}
                lps += (choice.get("logprobs") or {}).get("content") or []
                if delta.get("reasoning_content"):
                    for s in text("reasoning", delta["reasoning_content"]):
                        yield s
                if delta.get("content"):
                    for s in text("message", delta["content"], lps):
                        yield s
                    lps = []
                for tc in delta.get("tool_calls") or []:
                    k = tc.get("index", 0)
                    if k not in calls:
                        for s in close_open():
                            yield s
                        item = {"type": "function_call", "id": _id("fc"), "call_id": tc.get("id") or _id("call"),
                                "name": tc["function"].get("name", ""), "arguments": "", "status": "in_progress"}
                        calls[k] = item
                        items.append(item)
                        yield event("response.output_item.added", output_index=len(items) - 1, item=dict(item))
                    args = (tc.get("function") or {}).get("arguments")
                    if args:
                        item = calls[k]
                        item["arguments"] += args
                        yield event("response.function_call_arguments.delta", item_id=item["id"],
                                    output_index=items.index(item), delta=args)
                finish = choice.get("finish_reason") or finish
    if lps and (not items or open_item is not None and open_item["type"] == "message"):  # the held-back text's
        for s in text("message", "", lps):
            yield s
    status, incomplete = _status(finish)
    cut = items[-1] if items and status == "incomplete" else None  # the item the budget ran out in
    for s in close_open("incomplete" if open_item is not None and open_item is cut else "completed"):
        yield s
    for item in calls.values():
        item["status"] = "incomplete" if item is cut else "completed"
        i = items.index(item)
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                    arguments=item["arguments"], name=item["name"])
        yield event("response.output_item.done", output_index=i, item=item)
    if not items:  # an empty answer is still one (empty) message, as the non-streamed response has
        for s in open_text("message"):
            yield s
        for s in close_open("incomplete" if status == "incomplete" else "completed"):
            yield s
    yield event("response.incomplete" if status == "incomplete" else "response.completed",
                response=t.response(rid, created, status, items, response_usage(usage), incomplete))
