"""OpenAI's Responses API (``POST /v1/responses``) with the official ``openai`` client: each request answers as the
chat completions request it means (same seed, same tokens), streams typed events the SDK's own stream helper
accumulates, carries function calls and their outputs across turns, and names its own fields in errors."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch

from blockdiff import LLM
from blockdiff.server import build_app
from openai.types.responses import Response, ResponseStreamEvent
from test_server import LiveServer
from tool_fixtures import make_tool_checkpoint

MODEL = "tiny-dg"
WEATHER = {"type": "function", "name": "get_weather", "description": "the forecast",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}


def CALLS(arguments) -> list[dict]:
    return [{"type": "function_call", "call_id": f"call_{k}", "name": "get_weather", "arguments": a}
            for k, a in enumerate(arguments)]


def chat_tool(t: dict) -> dict:
    return {"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tool_checkpoint(tmp_path_factory.mktemp("responses_ckpt"), canvas_length=8,
                                generation_config={"max_denoising_steps": 4, "max_new_tokens": 128})
    srv = LiveServer(build_app(LLM(path, dtype=torch.float32, deterministic=True), MODEL))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_text_answer_equals_the_chat_answer_for_the_same_request(client):
    r = client.responses.create(model=MODEL, instructions="Be brief.", input="Why is the sky blue?",
                                max_output_tokens=12, extra_body={"seed": 5})
    c = client.chat.completions.create(model=MODEL, max_tokens=12, seed=5, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == c.choices[0].message.content and len(r.output) == 1
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # finish "length"
    assert r.output[0].status == "incomplete"  # the message the budget ran out in
    assert (r.usage.input_tokens, r.usage.output_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Be brief." and r.max_output_tokens == 12 and r.store is False
    assert r.completed_at is None  # not completed: cut by the budget


def test_stream_events_are_numbered_and_add_up_to_the_response(client):
    kw = dict(model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
              max_output_tokens=20, extra_body={"seed": 3})
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-2].item.status == events[-1].response.output[0].status == whole.output[0].status == "incomplete"
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


def test_a_required_call_streams_through_the_sdk_helper_and_equals_chats_call(client):
    kw = dict(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
              extra_body={"seed": 2})
    with client.responses.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_response()
    whole = client.responses.create(**kw)
    chat = client.chat.completions.create(model=MODEL, seed=2, messages=[{"role": "user", "content":
                                                                          "Weather in Paris?"}],
                                          tools=[chat_tool(WEATHER)], tool_choice="required")
    want = chat.choices[0].message.tool_calls[0]
    for r in (final, whole):
        assert r.status == "completed" and [o.type for o in r.output] == ["function_call"]
        call = r.output[0]
        assert (call.name, call.arguments) == (want.function.name, want.function.arguments)
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert "response.function_call_arguments.done" in events and events[-1] == "response.completed"


def test_a_call_and_its_output_sent_back_read_as_the_chat_turns_they_are(client):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
            "arguments": '{"city": "Paris", "days": 1}'}
    back = {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "blue"}'}
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Weather in Paris?"}, call, back],
                                tools=[WEATHER], max_output_tokens=16, extra_body={"seed": 4})
    c = client.chat.completions.create(model=MODEL, seed=4, max_tokens=16, tools=[chat_tool(WEATHER)], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "blue"}'}])
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.output_text == (c.choices[0].message.content or "")


def test_a_call_output_sent_as_text_parts_reads_as_its_joined_text(client):
    turn = [{"role": "user", "content": "Weather in Paris?"}, *CALLS(('{"city": "Paris", "days": 1}',))]
    parts = [{"type": "input_text", "text": '{"sky": '}, {"type": "input_text", "text": '"blue"}'}]
    answers = [client.responses.create(model=MODEL, tools=[WEATHER], max_output_tokens=16, extra_body={"seed": 4},
                                       input=[*turn, {"type": "function_call_output", "call_id": "call_0",
                                                      "output": output}])
               for output in (parts, '{"sky": "blue"}')]
    assert answers[0].usage.input_tokens == answers[1].usage.input_tokens
    assert answers[0].output_text == answers[1].output_text


def test_an_assistant_message_and_its_calls_sent_back_are_one_turn(client):
    said = {"role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]}
    calls = [{"type": "function_call", "call_id": f"call_{k}", "name": "get_weather",
              "arguments": f'{{"city": "P{k}", "days": 1}}'} for k in (1, 2)]
    outs = [{"type": "function_call_output", "call_id": f"call_{k}", "output": "sunny"} for k in (1, 2)]
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Weather?"}, said, *calls, *outs],
                                tools=[WEATHER], max_output_tokens=8, extra_body={"seed": 4})
    c = client.chat.completions.create(model=MODEL, seed=4, max_tokens=8, tools=[chat_tool(WEATHER)], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}], "tool_calls": [
            {"id": f"call_{k}", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": f'{{"city": "P{k}", "days": 1}}'}}
            for k in (1, 2)]},
        *({"role": "tool", "tool_call_id": f"call_{k}", "content": "sunny"} for k in (1, 2))])
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.output_text == (c.choices[0].message.content or "")


def test_text_format_json_schema_gives_valid_json(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="A digit as JSON", extra_body={"seed": 1},
                                text={"format": {"type": "json_schema", "name": "digit", "schema": schema}})
    assert r.status == "completed" and r.created_at <= r.completed_at <= r.created_at + 60
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_reasoning_effort_turns_thinking_on_as_chat_template_kwargs_do(client):
    kw = dict(model=MODEL, input="Think, then call.", tools=[WEATHER], tool_choice="required",
              reasoning={"effort": "low"}, extra_body={"seed": 6})
    r = client.responses.create(**kw)
    c = client.chat.completions.create(model=MODEL, seed=6, tools=[chat_tool(WEATHER)], tool_choice="required",
                                       messages=[{"role": "user", "content": "Think, then call."}],
                                       extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    reasoning = [o for o in r.output if o.type == "reasoning"]
    assert c.choices[0].message.reasoning_content  # the grammar opens the answer with the thinking channel
    assert [o.content[0].text for o in reasoning] == [c.choices[0].message.reasoning_content]
    assert r.output[-1].type == "function_call"
    # reasoning tokens: the thinking channel's tokens, part of the output, the same on both routes
    thought = c.usage.completion_tokens_details.reasoning_tokens
    assert 0 < thought < c.usage.completion_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == thought
    with client.responses.stream(**kw) as stream:  # streamed: the reasoning item closes before the calls open
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert [o.type for o in final.output] == [o.type for o in r.output]
    assert final.output[0].content[0].text == reasoning[0].content[0].text
    assert final.usage.output_tokens_details.reasoning_tokens == thought
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.function_call_arguments.done")
    off = client.responses.create(**{**kw, "reasoning": {"effort": "none"}})
    assert off.output and all(o.type == "function_call" for o in off.output)
    assert off.usage.output_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("extra, param, message", [
    ({"max_output_tokens": 0}, "max_output_tokens", "'max_output_tokens' must be >= 1"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, "input[0].content[0].text",
     "must be a string"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role", "must be one of 'user', 'assistant'"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]", "must be a message, or a function_call"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments", "is required"),
    ({"store": "yes"}, "store", "must be a boolean"),
    ({"input": []}, "input", "non-empty list"),
    ({"previous_response_id": "resp_1"}, "previous_response_id", "this server stores no responses"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "must be 'function'"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format",
     "text.format.schema: the JSON Schema is not supported"),
    ({"input": None, "messages": [{"role": "user", "content": "x"}]}, "input", "takes the conversation as 'input'"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice.name",
     "'tool_choice.name' 'nope' is not one of the tools"),
    ({"truncation": "auto"}, "truncation", "must be 'disabled'"),
    ({"stream": True, "stream_drafts": True}, "stream_drafts", "'stream_drafts' is not supported on /v1/responses"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format.name",
     "'text.format.name' is required"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema",
     "'text.format.schema' is required"),
    ({"temperature": -1}, "temperature", "'temperature' must be"),
    ({"top_logprobs": 1, "text": {"format": {"type": "json_object"}}}, "top_logprobs",
     "'top_logprobs' cannot be combined with text.format"),
    ({"include": ["message.output_text.logprobs"], "tools": [WEATHER]}, "include", "'include' cannot be combined"),
    ({"input": [*CALLS(("{}",)), {"type": "function_call_output", "call_id": "call_0", "output": [
        {"type": "input_image", "image_url": "data:image/png;base64,AA=="}]}]}, "input[1].output[0].type",
     "'input_text', got 'input_image'"),
    ({"input": [{"role": "user", "content": "x"}, *CALLS(("{}", "nope"))]}, "input[2].arguments",
     "'input[2].arguments' is not valid JSON"),
    ({"input": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "hm"}, *CALLS(("{}", "[1]"))]},
     "input[3].arguments", "'input[3].arguments' must be a JSON object"),
])
def test_bad_requests_are_400s_naming_the_responses_field(server, extra, param, message):
    body = {"model": MODEL, "input": "hi", **extra}
    r = httpx.post(server.url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err
    assert not any(w in err["message"] for w in ("messages[", "max_tokens", "tool_calls"))


def test_the_openai_client_raises_bad_request_for_an_unknown_model(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="other", input="hi")


def test_a_dropped_responses_stream_aborts_its_request(server):
    from test_server import wait_until

    eng = server.engine
    aborted = eng.counters.finished["abort"]
    body = {"model": MODEL, "input": "Go on forever", "max_output_tokens": 1024, "stream": True, "seed": 0,
            "ignore_eos": True, "max_denoising_steps": 256, "stability_threshold": 10_000}
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/responses", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection as the loop breaks
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "response.output_text.delta":
                break  # the first canvas is out; the connection is still open
        assert eng.num_in_flight == 1
        del lines  # hang up
    assert wait_until(lambda: eng.counters.finished["abort"] == aborted + 1 and eng.num_in_flight == 0)


def test_an_answer_cut_inside_its_reasoning_is_the_reasoning_item_alone_streamed_or_not(client):
    kw = dict(model=MODEL, input="Weather?", tools=[WEATHER], tool_choice="required", reasoning={"effort": "low"},
              max_output_tokens=16, extra_body={"seed": 6})
    chat = client.chat.completions.create(model=MODEL, seed=6, max_tokens=16, tools=[chat_tool(WEATHER)],
                                          tool_choice="required", messages=[{"role": "user", "content": "Weather?"}],
                                          extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert chat.choices[0].message.reasoning_content and not chat.choices[0].message.content
    whole = client.responses.create(**kw)
    streamed = list(client.responses.create(stream=True, **kw))[-1].response
    for r in (whole, streamed):
        assert r.status == "incomplete" and [o.type for o in r.output] == ["reasoning"]
        assert r.output[0].content[0].text == chat.choices[0].message.reasoning_content
        assert r.output[0].status == "incomplete"
        assert r.usage.output_tokens_details.reasoning_tokens == r.usage.output_tokens == 16  # all of it thinking


@pytest.mark.parametrize("extra", [dict(input="Hi", max_output_tokens=10, top_logprobs=2, metadata={"k": "v"}),
                                   dict(input="Weather?", tools=[WEATHER], tool_choice="required"),
                                   dict(input="Weather?", tools=[WEATHER], tool_choice="required",
                                        reasoning={"effort": "low"}, max_output_tokens=48)])
def test_the_response_and_every_event_validate_as_the_sdks_types(server, extra):
    """The SDK builds its objects without validating them: a field it requires that the server leaves out shows
    up only when a client reads it. Validated here, every required field is there with the right type."""
    body = {"model": MODEL, "seed": 3, **extra}
    Response.model_validate(httpx.post(server.url + "/v1/responses", json=body, timeout=60).json())
    adapter = pydantic.TypeAdapter(ResponseStreamEvent)
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    for e in events:
        adapter.validate_python(e)


def test_a_stream_failing_mid_answer_ends_with_response_failed_and_an_incomplete_message(server):
    from test_server import fail_next_tick

    core = server.engine.engine
    body = {"model": MODEL, "input": "Go on forever", "max_output_tokens": 1024, "stream": True, "seed": 0,
            "ignore_eos": True, "max_denoising_steps": 256, "stability_threshold": 10_000}
    events = []
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if [e["type"] for e in events].count("response.output_text.delta") == 1 and \
                        events[-1]["type"] == "response.output_text.delta":
                    fail_next_tick(core)  # the first canvas is out: the next tick fails (once)
    adapter = pydantic.TypeAdapter(ResponseStreamEvent)
    for e in events:
        adapter.validate_python(e)
    failed, done = adapter.validate_python(events[-1]), adapter.validate_python(events[-2])
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert done.type == "response.output_item.done" and done.item.status == "incomplete"
    assert failed.response.output == [done.item]
    assert done.item.content[0].text == "".join(e["delta"] for e in events if e["type"].endswith("text.delta"))
    assert failed.response.error.code == "server_error"  # OpenAI's code for the server's fault
    assert "RuntimeError in the batched work" in failed.response.error.message


@pytest.mark.parametrize("extra", [{"include": ["message.output_text.logprobs"]}, {"top_logprobs": 2}])
def test_logprobs_asked_for_by_include_or_top_logprobs_equal_chats(client, extra):
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=10, extra_body={"seed": 7}, **extra)
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=10,
                                       seed=7, logprobs=True, top_logprobs=extra.get("top_logprobs", 0))
    got, want = r.output[0].content[0].logprobs, c.choices[0].logprobs.content
    assert [(lp.token, lp.logprob, [(t.token, t.logprob) for t in lp.top_logprobs]) for lp in got] == \
        [(lp.token, lp.logprob, [(t.token, t.logprob) for t in lp.top_logprobs]) for lp in want]
    assert len(got) == r.usage.output_tokens and r.top_logprobs == extra.get("top_logprobs")


def test_streamed_logprobs_equal_the_responses_when_a_stop_string_held_text_back(client):
    kw = dict(model=MODEL, input="Hi", max_output_tokens=40, top_logprobs=1, extra_body={"seed": 0, "stop": ["a"]})
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    assert whole.output[0].content[0].logprobs  # the tokens before (and of) the stop string have theirs
    for got in (events[-1].response.output[0].content[0].logprobs,
                [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]):
        assert [(lp.token, lp.logprob) for lp in got] == \
            [(lp.token, lp.logprob) for lp in whole.output[0].content[0].logprobs]
