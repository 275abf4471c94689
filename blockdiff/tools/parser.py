"""Model output -> (content, reasoning, tool calls), on text decoded with the special tokens kept.

Rules (the Gemma 4 format, see ``syntax``):

- every ``<|channel>NAME\\n...<channel|>`` block is thinking: its text (after the channel name line) is the
  reasoning, and it is cut from the content; a channel still open at the end (a truncated output) is reasoning
  up to the end;
- the content is the text outside the channels, up to the first ``<|tool_call>``;
- from there on the output must be calls, ``<|tool_call>call:NAME{...}<tool_call|>`` one after another
  (whitespace between them is allowed, text after the last one joins the content). A call that does not parse
  (unknown name, bad value syntax, no closing marker) makes the whole tail plain content again, markers
  included, with ``error`` saying why: calls are all or nothing, so a client never acts on half of them.

``OutputStream`` turns the same parse into streaming deltas whose concatenation is exactly the final result:
reasoning and content stream as they grow; the calls are sent once the output is complete.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from .syntax import MARKERS, NAME, Markers, read_object


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function",
             "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        if index is not None:
            d["index"] = index
        return d


@dataclass
class ParsedOutput:
    content: str
    reasoning: str | None = None  # None: the output has no thinking channel
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None  # why the calls were returned as text


def _split_channels(text: str, m: Markers) -> tuple[str, str | None, bool]:
    """-> (text without the channels, their reasoning or None, whether a channel is still open at the end)."""
    out, reasoning, i = [], None, 0
    while True:
        j = text.find(m.channel_open, i)
        if j < 0:
            out.append(text[i:])
            return "".join(out), reasoning, False
        out.append(text[i:j])
        body_start = j + len(m.channel_open)
        k = text.find(m.channel_close, body_start)
        body = text[body_start:] if k < 0 else text[body_start:k]
        nl = body.find("\n")
        # The channel's name line ("thought\n"); without it yet (truncated), nothing of it is reasoning.
        inner = "" if nl < 0 else body[nl + 1:]
        reasoning = (reasoning or "") + inner
        if k < 0:
            return "".join(out), reasoning, True
        i = k + len(m.channel_close)


def parse_calls(tail: str, m: Markers = MARKERS, names=None) -> tuple[list[ToolCall], str]:
    """``tail`` starts with the first call marker -> (calls, text after them). ``SyntaxError`` if one is bad."""
    calls, i = [], 0
    while True:
        rest = tail[i:]
        stripped = rest.lstrip()
        if not stripped.startswith(m.call_open):
            return calls, rest if calls else ""
        i += len(rest) - len(stripped) + len(m.call_open)
        if not tail.startswith("call:", i):
            raise SyntaxError(f"call {len(calls)}: expected 'call:' after {m.call_open}")
        i += len("call:")
        nm = NAME.match(tail, i)
        if not nm:
            raise SyntaxError(f"call {len(calls)}: expected a function name")
        name = nm.group()
        if names is not None and name not in names:
            raise SyntaxError(f"call {len(calls)}: {name!r} is not one of the tools")
        try:
            args, i = read_object(tail, nm.end())
        except SyntaxError as e:
            raise SyntaxError(f"call {len(calls)} ({name}): arguments: {e}") from None
        if not tail.startswith(m.call_close, i):
            raise SyntaxError(f"call {len(calls)} ({name}): expected {m.call_close} after the arguments")
        i += len(m.call_close)
        calls.append(ToolCall(name, args))


def parse_output(text: str, markers: Markers = MARKERS, tool_names=None, calls: bool = True) -> ParsedOutput:
    """``tool_names``: the declared tools (a call to another name is an error); ``calls=False``: leave calls as
    text (tool_choice "none")."""
    body, reasoning, _ = _split_channels(text, markers)
    j = body.find(markers.call_open) if calls else -1
    if j < 0:
        return ParsedOutput(body, reasoning)
    try:
        found, after = parse_calls(body[j:], markers, tool_names)
    except SyntaxError as e:
        return ParsedOutput(body, reasoning, [], str(e))
    return ParsedOutput(body[:j] + after, reasoning, found)


def hold_back(text: str, markers) -> str:
    """``text`` without a tail that may still grow into one of ``markers`` (split across pushes)."""
    hold = max((k for mk in markers for k in range(1, min(len(mk) - 1, len(text)) + 1) if text.endswith(mk[:k])),
               default=0)
    return text[:len(text) - hold]


class OutputStream:
    """Deltas of one output as its text grows: ``push(text_so_far)`` -> [delta dicts]; ``finish(text)`` ->
    (deltas, final ParsedOutput). A delta is ``{"reasoning_content": s}``, ``{"content": s}`` or
    ``{"tool_calls": [...]}`` (per call: index, id, type and name first, then its arguments)."""

    def __init__(self, markers: Markers = MARKERS, tool_names=None, calls: bool = True):
        self.m, self.names, self.calls = markers, tool_names, calls
        self.sent_reasoning = ""
        self.sent_content = ""

    def _deltas(self, reasoning: str | None, content: str) -> list[dict]:
        out = []
        if reasoning and reasoning.startswith(self.sent_reasoning) and len(reasoning) > len(self.sent_reasoning):
            out.append({"reasoning_content": reasoning[len(self.sent_reasoning):]})
            self.sent_reasoning = reasoning
        if content.startswith(self.sent_content) and len(content) > len(self.sent_content):
            out.append({"content": content[len(self.sent_content):]})
            self.sent_content = content
        return out

    def push(self, text: str) -> list[dict]:
        text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its other bytes
        body, reasoning, open_ = _split_channels(text, self.m)
        if open_:  # content written before an open channel is final; the channel's text grows
            return self._deltas(hold_back(reasoning, (self.m.channel_close,)), body)
        j = body.find(self.m.call_open) if self.calls else -1
        content = body if j < 0 else body[:j]
        return self._deltas(reasoning, hold_back(content, (self.m.call_open, self.m.channel_open)))

    def finish(self, text: str) -> tuple[list[dict], ParsedOutput]:
        final = parse_output(text, self.m, self.names, self.calls)
        out = self._deltas(final.reasoning, final.content)
        for i, c in enumerate(final.tool_calls):
            d = c.openai(i)
            args = d["function"].pop("arguments")
            d["function"]["arguments"] = ""
            out.append({"tool_calls": [d]})
            out.append({"tool_calls": [{"index": i, "function": {"arguments": args}}]})
        return out, final
