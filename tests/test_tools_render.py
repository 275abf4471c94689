"""OpenAI tool requests -> the chat template: a multi-turn history with parallel calls and their results renders
exactly as the Gemma 4 format template defines it; thinking switches on in the system turn; request validation
names the field."""

from __future__ import annotations

import json

import pytest

from blockdiff.tokenizer import Tokenizer
from blockdiff.tools.render import ToolError, ToolPlan, template_messages
from fixtures import write_tokenizer
from tool_fixtures import GEMMA4_TOOLS_TEMPLATE, TOOL_TOKENS

Q = '<|"|>'
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("render_tok")
    write_tokenizer(d, 512, chat_template=GEMMA4_TOOLS_TEMPLATE, extra_specials=TOOL_TOKENS)
    return Tokenizer.from_dir(str(d))


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": json.dumps({"city": "Oslo, {NO}"})}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    {"role": "assistant", "content": "Paris: sunny. Oslo: rain."},
    {"role": "user", "content": "Thanks!"},
]


def test_multi_turn_history_with_calls_and_results_renders_as_the_template_defines(tok):
    text = tok.apply_chat_template(template_messages(HISTORY), True, tools=[WEATHER])
    assert text == (
        "<bos><|turn>system\nBe brief."
        f"<|tool>declaration:get_weather{{description:{Q}Weather now{Q},parameters:{{type:{Q}object{Q},"
        f"properties:{{city:{{type:{Q}string{Q}}}}},required:[{Q}city{Q}]}}}}<tool|><turn|>\n"
        "<|turn>user\nWeather in Paris and Oslo?<turn|>\n"
        "<|turn>model\n"
        f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
        f"<|tool_call>call:get_weather{{city:{Q}Oslo, {{NO}}{Q}}}<tool_call|>"
        f"<|tool_response>response:get_weather{{value:{Q}sunny{Q}}}<tool_response|>"
        f"<|tool_response>response:get_weather{{value:{Q}rain{Q}}}<tool_response|>"
        "Paris: sunny. Oslo: rain.<turn|>\n"
        "<|turn>user\nThanks!<turn|>\n"
        "<|turn>model\n")
    ids = tok.encode(text)
    assert ids.count(tok.token_to_id(Q)) == text.count(Q) == 16 and ids.count(tok.token_to_id("<|tool_call>")) == 2


def test_after_tool_results_the_model_turn_stays_open(tok):
    text = tok.apply_chat_template(template_messages(HISTORY[:5]), True, tools=[WEATHER])
    assert text.endswith(f"response:get_weather{{value:{Q}rain{Q}}}<tool_response|>")


def test_enable_thinking_writes_the_think_token_in_the_system_turn(tok):
    on = tok.apply_chat_template([{"role": "user", "content": "hi"}], True, enable_thinking=True)
    off = tok.apply_chat_template([{"role": "user", "content": "hi"}], True)
    assert on.startswith("<bos><|turn>system\n<|think|><turn|>\n") and "<|think|>" not in off


def test_template_messages_leaves_the_callers_messages_alone():
    before = json.dumps(HISTORY)
    out = template_messages(HISTORY)
    assert json.dumps(HISTORY) == before
    assert out[2]["tool_calls"][1]["function"]["arguments"] == {"city": "Oslo, {NO}"}
    assert out[3]["name"] == "get_weather" and out[2]["content"] == ""


@pytest.mark.parametrize("kw, param", [
    (dict(tools="nope"), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools[0].function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), "tools[0].function.parameters"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {}}), "tool_choice.function.name"),
    (dict(tools=[WEATHER], parallel_tool_calls="yes"), "parallel_tool_calls"),
])
def test_bad_requests_name_the_field(kw, param):
    with pytest.raises(ToolError) as e:
        ToolPlan.from_request(**kw)
    assert e.value.param == param and str(e.value).startswith(f"'{param}'")


def test_default_tool_choice_is_auto_with_tools_and_none_without():
    assert ToolPlan.from_request([WEATHER]).mode == "auto"
    assert ToolPlan.from_request(None).mode == "none" and not ToolPlan.from_request(None).active
    assert ToolPlan.from_request(None, None, None, {"enable_thinking": True}).active


def test_an_answer_keeps_the_parsers_markers_and_drops_other_special_tokens(tok):
    from blockdiff.tools.output import ChatText, message
    plan = ToolPlan.from_request(tools=[WEATHER], tool_choice="auto")
    pad, turn, decl = (tok.token_to_id(t) for t in ("<pad>", "<|turn>", "<|tool>"))
    assert None not in (pad, turn, decl) and all(tok.is_special(i) for i in (pad, turn, decl))
    text = ChatText(tok, plan, end_ids=[1])
    ids = tok.encode("Hi") + [pad, turn, decl] + tok.encode(" there") + [1]
    text.push(ids)
    _, parsed, reason = text.finish("stop")
    assert message(parsed) == {"role": "assistant", "content": "Hi there"} and reason == "stop"
    call = ChatText(tok, plan, end_ids=[1])  # a call still parses: its markers are kept
    call.push(tok.encode(f'<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>') + [pad, 1])
    _, parsed, reason = call.finish("stop")
    assert reason == "tool_calls" and parsed.tool_calls[0].name == "get_weather", parsed
    assert parsed.tool_calls[0].arguments == {"city": "Paris"}


@pytest.mark.parametrize("tool_message, words", [
    ({"role": "tool", "tool_call_id": "c9", "content": "sunny"}, "is 'c9', which matches no tool call"),
    ({"role": "tool", "content": "sunny"}, "is required (or 'name')"),
])
def test_a_tool_result_that_answers_no_call_is_refused_naming_its_id(tool_message, words):
    history = HISTORY[:3] + [tool_message]
    with pytest.raises(ToolError) as e:
        template_messages(history)
    assert e.value.param == "messages[3].tool_call_id" and words in str(e.value)
    named = dict(tool_message, name="get_weather")  # a result that names its function is enough
    assert template_messages(HISTORY[:3] + [named])[-1]["name"] == "get_weather"
