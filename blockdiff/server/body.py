"""Reading a request body safely: content type, size, JSON syntax, nesting depth, text that cannot be encoded and
integers too long to read.

``read_body`` runs on the event loop and only collects bytes (refusing a body over the limit as soon as its
``Content-Length`` or its bytes say so, and a body whose bytes stop coming for ``idle_timeout`` seconds: a client
that sends headers and then trickles nothing must not hold a connection and a task forever); ``parse_body`` is CPU work and runs in the request-preparation thread
pool, like tokenization.
"""

from __future__ import annotations

import asyncio
import json
import math

from starlette.requests import ClientDisconnect, Request

from ..sampling.fields import MAX_JSON_DEPTH, twice_given
from .errors import APIError, bad, json_type

MAX_BODY_BYTES = 8 << 20
# Seconds without a byte of the body before it is refused (408). Idle time, not total time: a big image uploaded
# slowly but steadily is read however long it takes.
BODY_IDLE_TIMEOUT = 30.0
MAX_INT_DIGITS = 4300  # Python's int-string conversion limit (sys.get_int_max_str_digits() by default)


def check_body_timeout(value, name: str = "body_timeout") -> float:
    """A body idle timeout: a finite number of seconds > 0 (``build_app``, ``serve --body-timeout``, Ray's
    ``build_app``); a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        shown = f"{value:g}" if isinstance(value, float) else repr(value)
        raise ValueError(f"{name} must be a number of seconds > 0, got {shown}")
    return float(value)


def check_content_type(request: Request) -> None:
    # A browser page may send a cross-origin "simple" POST (text/plain, form types) without a CORS preflight;
    # refusing everything but JSON keeps such a page from starting generations on a loopback server.
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json', got "
                            f"{ctype or 'no Content-Type'!r}", "content-type", "unsupported_media_type")
    # A compressed body (Content-Encoding: gzip, br, ...) was read as if it were plain JSON: gzip bytes failed as
    # "not valid JSON: 'utf-8' codec can't decode byte 0x8b", and a plain body labelled gzip was taken. No coding
    # is decoded here (a small compressed body can inflate past --max-body-bytes): refuse it, saying so (RFC 9110
    # 15.5.16 / RFC 7694: 415 with Accept-Encoding).
    coding = request.headers.get("content-encoding", "")
    codings = [c.strip().lower() for c in coding.split(",") if c.strip()]
    if any(c != "identity" for c in codings):
        raise APIError(415, f"the request body must be sent uncompressed; got 'Content-Encoding: {coding}', which "
                            "this server does not decode", "content-encoding", "unsupported_media_type",
                       headers={"Accept-Encoding": "identity"})


async def read_body(request: Request, limit: int = MAX_BODY_BYTES,
                    idle_timeout: float = BODY_IDLE_TIMEOUT) -> bytes:
    def too_large(n: int | str) -> APIError:
        return APIError(413, f"the request body is {n} bytes; the limit is {limit}", "body", "request_too_large")

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared))  # before reading a byte of it
    chunks, size = [], 0
    stream = request.stream()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), idle_timeout)
            except StopAsyncIteration:
                break
            except TimeoutError:
                # "Connection: close": the rest of the body may still arrive; the connection cannot carry another
                # request after it, so it ends with this answer (uvicorn closes it once the response is sent).
                raise APIError(408, f"the request body stopped arriving: no bytes for {idle_timeout:g} s after "
                                    f"{size} bytes", "body", "body_timeout", headers={"Connection": "close"}) from None
            size += len(chunk)
            if size > limit:
                raise too_large(f"more than {limit}")
            chunks.append(chunk)
    except ClientDisconnect:  # the client's fault, not the server's: a 400, not a logged 500 with a traceback
        raise APIError(400, f"the request body ended after {size} bytes: the client closed the connection before "
                            "sending all of it", "body", "incomplete_body") from None
    return b"".join(chunks)


def parse_body(raw: bytes):
    """JSON object from ``raw``; a 400 naming the problem for anything else."""
    if not raw.strip():
        raise bad("the request body is empty; send a JSON object", "body")
    try:
        body = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_NotANumber,
                          object_pairs_hook=_object)
    except RecursionError:
        raise bad(f"the request body nests too deeply; at most {MAX_JSON_DEPTH} levels of arrays and objects",
                  "body") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", "body") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {json_type(body)}", "body")
    check_tree(body)
    return body


class _HugeInt:
    """An integer literal too long for Python to convert (its int-string limit): kept as a marker, so the error can
    name the field it was sent in (``check_tree``)."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(s: str):
    digits = len(s) - s.startswith("-")
    return _HugeInt(digits) if digits > MAX_INT_DIGITS else int(s)


class _Duplicated(dict):
    """An object that named a key twice (``{"model": "a", "model": "b"}``): Python's json keeps the last silently,
    while a proxy or gateway in front of the server may read the first (and check a different ``model`` or
    ``max_tokens`` than the one run). Kept as a marker, so the error can name the field (``check_tree``)."""

    key: str


def _object(pairs: list):
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    dup = _Duplicated(out)
    dup.key = twice_given(pairs)
    return dup


class _NotANumber:
    """``NaN``, ``Infinity`` and ``-Infinity`` (which Python's json reads though JSON has no such values) and a
    number beyond the largest double (``1e400``): kept as a marker, so the error can name the field it was sent in
    (``check_tree``). Let through, such a value reached free-form fields (a tool's parameters, a JSON Schema) that
    the Responses API echoes back, and the answer could not be encoded: a 500."""

    def __init__(self, text: str):
        self.text = text


def _parse_float(s: str):
    # JSON has one number type: 5.0 is the integer 5 (JSON Schema agrees), wherever it sits (token-id arrays
    # included); a float field takes the int unchanged.
    f = float(s)
    if not math.isfinite(f):  # 1e400
        return _NotANumber(s)
    return int(f) if f.is_integer() and abs(f) < 2 ** 63 else f


def _printable(key: str) -> str:
    # A key holding a lone surrogate cannot be encoded into the (UTF-8) error response: escape it.
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + _printable(str(p))
    return out


def _check_text(s: str, parts) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:  # "\ud800" in JSON decodes to a lone surrogate: no text encodes it
        p = _path(parts) or "body"
        raise bad(f"'{p}' holds a lone UTF-16 surrogate ({_printable(s[e.start])} at character {e.start}); send "
                  "valid Unicode text", p) from None


def _check_value(v, parts) -> None:
    if isinstance(v, str):
        _check_text(v, parts)
    elif isinstance(v, _HugeInt):
        p = _path(parts) or "body"
        raise bad(f"'{p}' is an integer of {v.digits} digits; at most {MAX_INT_DIGITS} digits are read", p)
    elif isinstance(v, _NotANumber):
        p = _path(parts) or "body"
        shown = v.text if len(v.text) <= 40 else v.text[:37] + "..."
        raise bad(f"'{p}' is {shown}, which is not a JSON number (JSON has no NaN or Infinity, and a number must fit "
                  "a double: at most about 1.8e308)", p)


def check_tree(body: dict) -> None:
    """Depth at most ``MAX_JSON_DEPTH``, no lone surrogates in any string (keys included), no integer over
    ``MAX_INT_DIGITS`` digits, no NaN, Infinity or number beyond a double and no key given twice in one object,
    naming the field.
    Iterative: a deep body must not recurse here either."""
    stack = [(body, (), 1)]
    while stack:
        node, parts, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"the request body nests too deeply ('{_path(parts)}' is at depth {depth}); at most "
                      f"{MAX_JSON_DEPTH} levels of arrays and objects", _path(parts) or "body")
        if isinstance(node, _Duplicated):
            p = _path(parts + (node.key,))
            raise bad(f"'{p}' is given twice in one object; send each key once", p)
        if isinstance(node, dict):
            for k, v in node.items():
                _check_text(k, parts + (k,))
                if isinstance(v, (dict, list)):
                    stack.append((v, parts + (k,), depth + 1))
                else:
                    _check_value(v, parts + (k,))
        else:
            for i, v in enumerate(node):
                if not isinstance(v, (dict, list)):
                    _check_value(v, parts + (i,))
                else:
                    stack.append((v, parts + (i,), depth + 1))
