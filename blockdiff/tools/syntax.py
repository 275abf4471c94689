"""Gemma 4's tool-call syntax: its special markers and its value format.

A call is ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3,ok:true,x:null,xs:[1,2],o:{a:1}}<tool_call|>``: keys are
bare, strings are delimited by the ``<|"|>`` token (no escapes: anything but the delimiter may appear inside,
braces and commas included), numbers, booleans and null are bare, objects and arrays nest. A tool result is
``<|tool_response>response:NAME{...}<tool_response|>``; thinking is ``<|channel>thought\\n...<channel|>``.

``dumps`` writes a JSON value in this format (templates and tests use the same rules); ``loads`` reads one back,
strictly: anything else is a ``SyntaxError`` with the offset.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

STR = '<|"|>'


@dataclass(frozen=True)
class Markers:
    """The special tokens of the format, as the tokenizer spells them."""

    call_open: str = "<|tool_call>"
    call_close: str = "<tool_call|>"
    response_open: str = "<|tool_response>"
    response_close: str = "<tool_response|>"
    decl_open: str = "<|tool>"
    decl_close: str = "<tool|>"
    string: str = STR
    channel_open: str = "<|channel>"
    channel_close: str = "<channel|>"
    think: str = "<|think|>"

    def ids(self, tokenizer) -> dict[str, int] | None:
        """Marker name -> token id, or None when the tokenizer lacks one of the call / thinking markers."""
        out = {}
        for name in ("call_open", "call_close", "string", "channel_open", "channel_close"):
            tid = tokenizer.token_to_id(getattr(self, name))
            if tid is None:
                return None
            out[name] = tid
        return out


MARKERS = Markers()
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # OpenAI: letters, digits, "_" and "-" (a digit first too)
KEY = re.compile(r"[^\s:{}\[\],<>]+")  # a bare key: what the grammar writes (property names) and more
NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
BARE_END = re.compile(r"[,}\]]")


def dumps(value) -> str:
    """A JSON value in Gemma 4's call syntax (keys in their order, strings between ``<|"|>``)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a JSON number")
        return json.dumps(value)
    if isinstance(value, str):
        return STR + value + STR
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{dumps(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"{type(value).__name__} is not a JSON value")


class _Reader:
    def __init__(self, text: str, pos: int = 0):
        self.s, self.i = text, pos

    def fail(self, what: str):
        raise SyntaxError(f"{what} at offset {self.i}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def peek(self, lit: str) -> bool:
        return self.s.startswith(lit, self.i)

    def expect(self, lit: str) -> None:
        if not self.peek(lit):
            self.fail(f"expected {lit!r}")
        self.i += len(lit)

    def value(self, depth: int = 0):
        if depth > 64:
            self.fail("nested too deeply")
        self.ws()
        if self.peek(STR):
            end = self.s.find(STR, self.i + len(STR))
            if end < 0:
                self.fail("unterminated string")
            v = self.s[self.i + len(STR):end]
            self.i = end + len(STR)
            return v
        if self.peek("{"):
            return self.obj(depth)
        if self.peek("["):
            self.i += 1
            out = []
            self.ws()
            if self.peek("]"):
                self.i += 1
                return out
            while True:
                out.append(self.value(depth + 1))
                self.ws()
                if self.peek(","):
                    self.i += 1
                    continue
                self.expect("]")
                return out
        for lit, v in (("true", True), ("false", False), ("null", None)):
            if self.peek(lit):
                self.i += len(lit)
                return v
        m = NUMBER.match(self.s, self.i)
        if m and m.end() > self.i:
            self.i = m.end()
            t = m.group()
            if re.fullmatch(r"-?[0-9]+", t):
                return int(t)
            if math.isinf(float(t)):  # 1e999: no JSON number holds it (json.dumps would write Infinity)
                self.fail("a number out of range")
            return float(t)
        self.fail("expected a value")

    def obj(self, depth: int = 0) -> dict:
        self.expect("{")
        out: dict = {}
        self.ws()
        if self.peek("}"):
            self.i += 1
            return out
        while True:
            self.ws()
            if self.peek(STR):  # a quoted key is read too
                key = self.value(depth + 1)
            else:
                m = KEY.match(self.s, self.i)
                if not m:
                    self.fail("expected a key")
                key = m.group()
                self.i = m.end()
            self.ws()
            self.expect(":")
            out[key] = self.value(depth + 1)
            self.ws()
            if self.peek(","):
                self.i += 1
                continue
            self.expect("}")
            return out


def loads(text: str):
    """The one value ``text`` holds (surrounding whitespace allowed); ``SyntaxError`` otherwise."""
    r = _Reader(text)
    v = r.value()
    r.ws()
    if r.i != len(text):
        r.fail("unexpected text after the value")
    return v


def read_object(text: str, pos: int) -> tuple[dict, int]:
    """The ``{...}`` object starting at ``pos`` -> (object, offset after it)."""
    r = _Reader(text, pos)
    return r.obj(), r.i
