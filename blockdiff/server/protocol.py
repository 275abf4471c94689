"""The OpenAI wire format at the edge: request bodies -> (prompt ids, ``SamplingParams``), results -> JSON.

Every check here raises ``APIError`` with a message that names the field and says what is wrong; nothing past
this module sees an unvalidated body. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import math
import time
import uuid

from ..sampling.params import SamplingParams

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Diffusion knobs and other blockdiff fields accepted at the top level of a body (openai: ``extra_body=``).
EXTRA_INT = ("max_denoising_steps", "stability_threshold")
EXTRA_NUM = ("entropy_bound", "t_min", "t_max", "confidence_threshold")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# ---------------------------------------------------------------------------------------------- field checks
def _json_type(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(f"'{name}' must be an integer, got {_json_type(v)}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(f"'{name}' must be {rng}, got {v}", name)
    return v


def _num(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad(f"'{name}' must be a finite number, got {_json_type(v) if not isinstance(v, float) else v}", name)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {_json_type(v)}", name)
    return v


def _str(body: dict, name: str, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise bad(f"'{name}' is required", name)
        return None
    if not isinstance(v, str):
        raise bad(f"'{name}' must be a string, got {_json_type(v)}", name)
    return v


def _int_list(body: dict, name: str) -> list[int] | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise bad(f"'{name}' must be an array of integers", name)
    return v


def _neutral(body: dict, name: str, neutral, why: str) -> None:
    """Fields OpenAI clients may send that diffusion sampling cannot honour: accept only their neutral value."""
    v = body.get(name)
    if v is None or v == neutral or (isinstance(neutral, (list, dict)) and not v):
        return
    if isinstance(v, bool) and not isinstance(neutral, bool):
        raise bad(f"'{name}' must be a number, got a boolean", name)
    raise bad(f"'{name}'={v!r} is not supported: {why}", name)


# ---------------------------------------------------------------------------------------------- requests
def parse_common(body, kind: str, served_names: list[str]) -> tuple[str, SamplingParams, bool, bool]:
    """The fields shared by /v1/completions and /v1/chat/completions: (model, params, stream, include_usage).
    ``params.max_new_tokens`` holds the requested max tokens (None = as many as fit, capped by the defaults)."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_json_type(body)}")
    model = _str(body, "model", required=True)
    if model not in served_names:
        raise APIError(404, f"the model '{model}' does not exist; this server serves {served_names}", "model",
                       "model_not_found")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise bad(f"'n' must be 1 (one choice per request), got {n}", "n")
    temp = "diffusion sampling anneals its temperature from t_max to t_min per denoising step; leave " \
           "temperature unset (or 1) and send 't_min' / 't_max' instead"
    _num(body, "temperature")
    _neutral(body, "temperature", 1, temp)
    _num(body, "top_p")
    _neutral(body, "top_p", 1, "diffusion sampling has no nucleus cut-off; leave top_p unset (or 1) and use "
             "'entropy_bound' to tune how much of the canvas is accepted per step")
    for name in ("presence_penalty", "frequency_penalty"):
        _neutral(body, name, 0, "penalties are not implemented")
    _neutral(body, "logit_bias", {}, "logit_bias is not implemented")
    _neutral(body, "best_of", 1, "only one candidate per request")
    _neutral(body, "tools", [], "tool calling is not implemented")
    suffix = _str(body, "suffix") or None  # fill in the middle (/v1/completions)
    if suffix is not None and kind == "chat":
        raise bad("'suffix' is only accepted by /v1/completions", "suffix")
    _neutral(body, "echo", False, "echo is not implemented")
    _neutral(body, "logprobs", False if kind == "chat" else 0, "logprobs are not implemented")
    _neutral(body, "top_logprobs", 0, "logprobs are not implemented")
    from .structured import structured_outputs
    constraint = structured_outputs(body)  # response_format / structured_outputs, compiled (400 when bad)

    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens, max_name = _int(body, "max_completion_tokens"), "max_completion_tokens"
    else:
        max_tokens, max_name = _int(body, "max_tokens"), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"'{max_name}' must be >= 1, got {max_tokens}", max_name)

    stream = _bool(body, "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(so, dict):
            raise bad(f"'stream_options' must be an object, got {_json_type(so)}", "stream_options")
        include_usage = _bool(so, "include_usage")

    seed = _int(body, "seed")
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise bad(f"'seed' must be between 0 and 2**63 - 1, got {seed}", "seed")
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("'stop' must be a string or an array of strings", "stop")
        if any(s == "" for s in stop):
            raise bad("'stop' strings must not be empty", "stop")
        stop = stop or None
    rng = _str(body, "rng")
    kw = dict(max_new_tokens=max_tokens, seed=seed, stop=stop, rng=rng or "default",
              stop_token_ids=_int_list(body, "stop_token_ids"), ignore_eos=_bool(body, "ignore_eos"),
              allowed_token_ids=_int_list(body, "allowed_token_ids"),
              canvas_template=_int_list(body, "canvas_template"),
              stream_drafts=_bool(body, "stream_drafts"), structured_outputs=constraint, suffix=suffix,
              text_template=_str(body, "text_template"))
    for name in EXTRA_INT:
        kw[name] = _int(body, name)
    for name in EXTRA_NUM:
        kw[name] = _num(body, name)
    try:
        params = SamplingParams(**kw)
    except ValueError as e:
        raise bad(str(e).replace("max_new_tokens", max_name)) from None
    return model, params, stream, include_usage


def parse_prompt(body: dict) -> str | list[int]:
    """/v1/completions ``prompt``: a string, an array of token ids, or a one-element array of either."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad("'prompt' is required", "prompt")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise bad("'prompt' must not be empty", "prompt")
        return p
    if isinstance(p, list):
        if not p:
            raise bad("'prompt' must not be empty", "prompt")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return p
        if all(isinstance(x, (str, list)) for x in p):
            raise bad(f"'prompt' holds {len(p)} prompts; this server takes one prompt per request", "prompt")
    raise bad(f"'prompt' must be a string or an array of token ids, got {_json_type(p)}", "prompt")


def parse_messages(body: dict) -> list[dict]:
    """/v1/chat/completions ``messages`` -> [{"role", "content": str}] for the chat template."""
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(msgs, list):
        raise bad(f"'messages' must be an array of message objects, got {_json_type(msgs)}", "messages")
    if not msgs:
        raise bad("'messages' must not be empty", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content', got {_json_type(m)}", where)
        role = m.get("role")
        if not isinstance(role, str):
            raise bad(f"'{where}.role' is required and must be a string", f"{where}.role")
        if role not in CHAT_ROLES:
            raise bad(f"'{where}.role' is '{role}', which is not a known role (one of {', '.join(CHAT_ROLES)})",
                      f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                    raise bad(f"'{where}.content[{j}]' must be a text part ({{\"type\": \"text\", \"text\": ...}}),"
                              f" got {kind!r}: only text is supported", f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string or an array of text parts, got {_json_type(content)}",
                      f"{where}.content")
        msg = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def check_context(prompt_len: int, params: SamplingParams, default_max: int, canvas: int, context: int,
                  max_name: str = "max_tokens", prompt_name: str = "prompt") -> SamplingParams:
    """Fill ``max_new_tokens`` (unset: the default, capped to what fits) and check prompt + output fit the
    context, naming the request's own fields (the engine counts output in whole canvases)."""
    def needed(n: int) -> int:
        return prompt_len + -(-n // canvas) * canvas

    if needed(1) > context:
        raise bad(f"the prompt is too long: {prompt_len} tokens, and one canvas of {canvas} more must fit in the "
                  f"model's context of {context} tokens", prompt_name,
                  "context_length_exceeded")
    n = params.max_new_tokens
    if n is None:
        params.max_new_tokens = min(default_max, (context - prompt_len) // canvas * canvas)
    elif needed(n) > context:
        raise bad(f"'{max_name}' is too large: {n} tokens (in canvases of {canvas}) after a {prompt_len}-token "
                  f"prompt need {needed(n)} positions; the model's context is {context} tokens", max_name,
                  "context_length_exceeded")
    return params


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    return reason  # "stop" | "length" | "abort" (the last only ever reaches a client that left)
