"""Gemma 4's call syntax and the output parser, on text with the special tokens kept: well-formed, nested,
parallel, escaped (the <|"|> delimiter), malformed and truncated calls, and thinking channels; and the
streaming deltas, which must add up to the whole parse."""

from __future__ import annotations

import json

import pytest

from blockdiff.tools.parser import OutputStream, parse_output
from blockdiff.tools.syntax import dumps, loads

Q = '<|"|>'


def call(name: str, args: str) -> str:
    return f"<|tool_call>call:{name}{args}<tool_call|>"


@pytest.mark.parametrize("value", [
    {},
    {"city": "Paris"},
    {"n": 3, "x": -2.5, "e": 1e-7, "big": 12345678901234, "zero": 0},
    {"t": True, "f": False, "nil": None},
    {"o": {"a": {"b": [1, {"c": "d"}]}}, "xs": [[], [1, [2, [3]]], {}]},
    {"s": "a {brace}, a comma, a ] bracket: and a colon", "quote": 'he said "hi"', "nl": "line1\nline2"},
    {"empty": "", "spaces": "  padded  ", "unicode": "café ☕ 東京", "looks_like": "true", "num_text": "42"},
])
def test_values_round_trip_through_the_call_syntax(value):
    assert loads(dumps(value)) == value
    parsed = parse_output(call("f", dumps(value)))
    assert parsed.error is None and len(parsed.tool_calls) == 1
    assert json.loads(parsed.tool_calls[0].openai()["function"]["arguments"]) == value


def test_a_well_formed_call_is_parsed_into_an_openai_tool_call():
    p = parse_output(call("get_weather", f"{{location:{Q}Paris, France{Q},days:3}}"))
    assert p.content == "" and p.reasoning is None and p.error is None
    c = p.tool_calls[0].openai()
    assert c["type"] == "function" and c["id"].startswith("call_")
    assert c["function"] == {"name": "get_weather", "arguments": json.dumps({"location": "Paris, France", "days": 3})}


def test_parallel_calls_keep_their_order_and_text_before_is_content():
    text = "Let me check." + call("a", "{x:1}") + "\n" + call("b", f"{{y:{Q}z{Q}}}") + call("a", "{}")
    p = parse_output(text)
    assert p.content == "Let me check."
    assert [(c.name, c.arguments) for c in p.tool_calls] == [("a", {"x": 1}), ("b", {"y": "z"}), ("a", {})]
    assert len({c.id for c in p.tool_calls}) == 3


def test_whitespace_inside_values_is_tolerated():
    p = parse_output(call("f", f"{{ a : 1 , b : [ 1 , 2 ] , c : {{ d : {Q}x{Q} }} }}"))
    assert p.tool_calls[0].arguments == {"a": 1, "b": [1, 2], "c": {"d": "x"}}


@pytest.mark.parametrize("text, why", [
    (call("f", "{a:1"), "expected '}'"),                      # unclosed object
    (call("f", f"{{a:{Q}open}}"), "unterminated string"),      # the string never closes
    (call("f", "{a:[1,2}"), "expected ']'"),                   # bracket mismatch
    (call("f", "{a 1}"), "expected ':'"),                      # no colon
    (call("f", "{a:}"), "expected a value"),                   # no value
    (call("f", "{a:tru}"), "expected a value"),                # not a literal
    (call("f", "{a:1,,b:2}"), "expected a key"),               # empty member
    ("<|tool_call>call:f{a:1}", "expected <tool_call|>"),      # truncated: no closing marker
    ("<|tool_call>call:f{a:", "expected a value"),             # truncated mid-value
    ("<|tool_call>call:", "expected a function name"),         # truncated in the name
    ("<|tool_call>f{a:1}<tool_call|>", "expected 'call:'"),     # no call: prefix
    (call("f", "{a:1}junk"), "expected <tool_call|>"),         # text inside the call
    (call("f", "{a:1e999}"), "a number out of range"),         # no JSON number: the arguments would say Infinity
])
def test_malformed_or_truncated_calls_come_back_as_text_with_the_reason(text, why):
    p = parse_output("Sure. " + text)
    assert p.tool_calls == [] and p.error is not None and why in p.error, p.error
    assert p.content == "Sure. " + text  # markers kept: the client sees what the model wrote


def test_calls_are_all_or_nothing():
    p = parse_output(call("a", "{x:1}") + call("b", "{y:"))
    assert p.tool_calls == [] and p.content.startswith("<|tool_call>call:a{x:1}")


def test_unknown_function_names_are_an_error_when_the_tools_are_known():
    assert parse_output(call("rm_rf", "{}"), tool_names=["get_weather"]).error
    assert parse_output(call("get_weather", "{}"), tool_names=["get_weather"]).tool_calls


def test_calls_off_leaves_them_as_text():
    text = "x" + call("f", "{a:1}")
    p = parse_output(text, calls=False)
    assert p.content == text and p.tool_calls == [] and p.error is None


def test_thinking_channel_is_reasoning_not_content():
    p = parse_output("<|channel>thought\nThe user wants weather.\nCall it.<channel|>Here: " + call("f", "{a:1}"))
    assert p.reasoning == "The user wants weather.\nCall it."
    assert p.content == "Here: " and p.tool_calls[0].arguments == {"a": 1}


def test_an_open_channel_at_the_end_is_all_reasoning():
    p = parse_output("<|channel>thought\nstill thinking about {a:1}, " + call("f", "{a:1}"))
    assert p.reasoning == "still thinking about {a:1}, " + call("f", "{a:1}")
    assert p.content == "" and p.tool_calls == []


def test_channel_without_its_name_line_yet_has_no_reasoning_text():
    p = parse_output("<|channel>tho")
    assert p.reasoning == "" and p.content == ""


def test_text_without_markers_is_plain_content():
    p = parse_output("Hello {not: a call}, <b>bold</b>")
    assert p.content == "Hello {not: a call}, <b>bold</b>" and p.reasoning is None and p.tool_calls == []


def _stream(pieces: list[str]):
    s, text, deltas = OutputStream(), "", []
    for piece in pieces:
        text += piece
        deltas += s.push(text)
    last, final = s.finish(text)
    return deltas + last, final


@pytest.mark.parametrize("text", [
    "<|channel>thought\nPlan: call f.<channel|>Calling now. " + call("f", f"{{a:{Q}x, y{Q}}}") + call("g", "{b:[1]}"),
    "Just text, no calls at all.",
    "Before " + call("f", "{a:1"),  # malformed: all text in the end
    "<|channel>thought\nnever closes",
    call("f", "{}") + " and text after",
])
def test_streamed_deltas_add_up_to_the_final_parse(text):
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    deltas, final = _stream(pieces)
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert content == final.content and reasoning == (final.reasoning or "")
    calls: dict = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"name": None, "arguments": ""})
            if "id" in tc:
                assert slot["name"] is None
                slot["name"] = tc["function"]["name"]
            slot["arguments"] += tc["function"]["arguments"]
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == \
        [(c.name, c.arguments) for c in final.tool_calls]


def test_a_tail_that_may_become_a_marker_is_held_back():
    s = OutputStream()
    assert s.push("Hi <|c") == [{"content": "Hi "}]
    assert s.push("Hi <|channel>thought\nhm <chan") == [{"reasoning_content": "hm "}]


class _CharTokenizer:
    """Token id = a character's code point (ids under 10 are the 'special' end ids)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_chat_text_streams_what_the_whole_answer_holds_with_stop_strings():
    from blockdiff.tools.output import ChatText
    from blockdiff.tools.render import ToolPlan

    plan = ToolPlan.from_request([{"type": "function", "function": {"name": "f"}}], "none")
    text = "Hello wor" + "ld END more"
    ct = ChatText(_CharTokenizer(), plan, end_ids={1}, stops=["END"])
    deltas = []
    for i in range(0, len(text), 4):
        deltas += ct.push([ord(c) for c in text[i:i + 4]])
    last, parsed, reason = ct.finish("stop")
    assert parsed.content == "Hello world "
    assert "".join(d.get("content", "") for d in deltas + last) == "Hello world "
