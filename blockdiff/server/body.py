"""Reading a request body safely: content type, size, JSON syntax, nesting depth and text that cannot be encoded.

``read_body`` runs on the event loop and only collects bytes (refusing a body over the limit as soon as its
``Content-Length`` or its bytes say so); ``parse_body`` is CPU work and runs in the request-preparation thread
pool, like tokenization.
"""

from __future__ import annotations

import json

from starlette.requests import Request

from .errors import APIError, bad, json_type

MAX_BODY_BYTES = 8 << 20
MAX_JSON_DEPTH = 64


def check_content_type(request: Request) -> None:
    # A browser page may send a cross-origin "simple" POST (text/plain, form types) without a CORS preflight;
    # refusing everything but JSON keeps such a page from starting generations on a loopback server.
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json', got "
                            f"{ctype or 'no Content-Type'!r}", "content-type", "unsupported_media_type")


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    def too_large(n: int | str) -> APIError:
        return APIError(413, f"the request body is {n} bytes; the limit is {limit}", "body", "request_too_large")

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared))  # before reading a byte of it
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(raw: bytes):
    """JSON object from ``raw``; a 400 naming the problem for anything else."""
    if not raw.strip():
        raise bad("the request body is empty; send a JSON object", "body")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad(f"the request body nests too deeply; at most {MAX_JSON_DEPTH} levels of arrays and objects",
                  "body") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", "body") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {json_type(body)}", "body")
    check_tree(body)
    return body


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out


def _check_text(s: str, parts) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:  # "\ud800" in JSON decodes to a lone surrogate: no text encodes it
        p = _path(parts) or "body"
        raise bad(f"'{p}' holds a lone UTF-16 surrogate ({s[e.start]!r} at character {e.start}); send valid "
                  "Unicode text", p) from None


def check_tree(body: dict) -> None:
    """Depth at most ``MAX_JSON_DEPTH`` and no lone surrogates in any string (keys included), naming the field.
    Iterative: a deep body must not recurse here either."""
    stack = [(body, (), 1)]
    while stack:
        node, parts, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"the request body nests too deeply ('{_path(parts)}' is at depth {depth}); at most "
                      f"{MAX_JSON_DEPTH} levels of arrays and objects", _path(parts) or "body")
        if isinstance(node, dict):
            for k, v in node.items():
                _check_text(k, parts + (k,))
                if isinstance(v, str):
                    _check_text(v, parts + (k,))
                elif isinstance(v, (dict, list)):
                    stack.append((v, parts + (k,), depth + 1))
        else:
            for i, v in enumerate(node):
                if isinstance(v, str):
                    _check_text(v, parts + (i,))
                elif isinstance(v, (dict, list)):
                    stack.append((v, parts + (i,), depth + 1))
