"""OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` and the translation of pydantic
validation errors into it, in this server's wording: ``'field' must be ..., got ...``, ``param`` = the field's
path (``messages[0].role``)."""

from __future__ import annotations

import re

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def invalid(message: str, param: str) -> PydanticCustomError:
    """Raised inside a model validator: a complete message for ``param`` (kept verbatim by ``from_validation``)."""
    return PydanticCustomError("blockdiff", "{message}", {"message": message, "param": param})


def json_type(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


# pydantic's names for union members and wrappers in an error's loc: not part of the user's field path.
_TAGS = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|(function|lax|json|is|tagged|union|"
                   r"constrained|nullable|default)[-\w]*\[.*\]|[-\w]+\[.*\])$")


def param_path(loc) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TAGS.match(str(part)):
            out += ("." if out else "") + str(part)
    return out or None


_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "a boolean", "bool_parsing": "a boolean", "string_type": "a string", "list_type": "an array",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
}


def message_for(err: dict) -> tuple[str, str | None]:
    """One pydantic error -> (message, param)."""
    ctx = err.get("ctx") or {}
    if err["type"] == "blockdiff":
        return ctx["message"], ctx.get("param")
    param = param_path(err["loc"])
    name = f"'{param}'" if param else "the request body"
    v = err.get("input")
    t = err["type"]
    if t == "missing":
        return f"{name} is required", param
    if t == "value_error":  # our field validators write the whole sentence
        return str(ctx.get("error", err["msg"])).replace("{name}", name).replace("{path}", param or ""), param
    if t in _WORDS:
        got = v if t == "finite_number" else json_type(v)
        return f"{name} must be {_WORDS[t]}, got {got}", param
    if t in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[t]
        bound = next(iter(ctx.values()))
        return f"{name} must be {op} {bound}, got {v}", param
    if t in ("too_short", "too_long"):
        if t == "too_short" and ctx.get("min_length") == 1:
            return f"{name} must not be empty", param
        limit = ctx.get("min_length" if t == "too_short" else "max_length")
        return f"{name} must hold {'at least' if t == 'too_short' else 'at most'} {limit} items", param
    if t == "literal_error":
        return f"{name} must be one of {ctx.get('expected')}, got {v!r}", param
    if t == "recursion_loop":
        return "the request body nests too deeply", param
    msg = re.sub(r"^Value error, ", "", err["msg"])
    return f"{name}: {msg[:1].lower() + msg[1:]}", param


def from_validation(e: ValidationError) -> APIError:
    """The first error of a failed validation as a 400 (OpenAI reports one problem at a time)."""
    errs = e.errors(include_url=False)
    # A union that fails every member reports each; the member-specific ones say the least.
    own = [x for x in errs if x["type"] in ("blockdiff", "value_error", "missing")]
    msg, param = message_for((own or errs)[0])
    return bad(msg, param)
