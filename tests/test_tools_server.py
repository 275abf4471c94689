"""Tool calling and thinking through the OpenAI-compatible server, with the official ``openai`` client on a live
uvicorn, on a tiny checkpoint whose tokenizer holds Gemma 4's tool tokens and whose template writes its format
(tests/tool_fixtures.py).

Random weights never choose to call a tool; the grammar makes them: with tool_choice "required" or a named
function every answer must carry calls whose arguments validate against the declared schema.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
import torch

from blockdiff import LLM, SamplingParams
from blockdiff.server import build_app
from fixtures import make_checkpoint
from structured_schemas import SCHEMAS
from test_server import LiveServer
from tool_fixtures import make_tool_checkpoint

MODEL = "tiny-dg-tools"
# The object schemas of the structured-output suite (a call grammar enforces every one).
CALL_SCHEMAS = {k: v for k, v in SCHEMAS.items() if v.get("type") == "object"}


def tool(name: str, schema: dict, description: str = "") -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


WEATHER = tool("get_weather", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                                "days": {"type": "integer", "minimum": 1,
                                                                         "maximum": 7}},
                               "required": ["city", "days"], "additionalProperties": False}, "the forecast")
TIME = tool("get_time", {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                         "additionalProperties": False})
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tool_checkpoint(tmp_path_factory.mktemp("tools_ckpt"), canvas_length=8,
                                generation_config={"max_denoising_steps": 6, "max_new_tokens": 128})


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype=torch.float32, max_num_seqs=64, deterministic=True)


@pytest.fixture(scope="module")
def server(llm):
    srv = LiveServer(build_app(llm, MODEL))
    yield srv
    srv.close()


def _ask(client, **kw):
    kw.setdefault("messages", USER)
    kw.setdefault("max_tokens", 128)
    return client.chat.completions.create(model=MODEL, **kw)


def _check_calls(choice, schemas: dict) -> list:
    assert choice.finish_reason == "tool_calls", (choice.finish_reason, choice.message)
    calls = choice.message.tool_calls
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
    return calls


def test_required_calls_validate_against_every_schema(server):
    client = server.client()
    jobs = [(name, seed) for name in CALL_SCHEMAS for seed in (0,)]
    assert len(jobs) >= 20

    def run(job):
        name, seed = job
        return _ask(client, tools=[tool(name, CALL_SCHEMAS[name])], tool_choice="required", seed=seed,
                    parallel_tool_calls=False)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    for (name, seed), r in zip(jobs, results):
        calls = _check_calls(r.choices[0], {name: CALL_SCHEMAS[name]})
        assert len(calls) == 1 and calls[0].function.name == name


def test_named_function_is_the_one_called_with_valid_arguments(server):
    client = server.client()
    names = list(CALL_SCHEMAS)[:10]
    jobs = [(name, seed) for name in names for seed in (1, 2)]
    assert len(jobs) >= 20

    def run(job):
        name, seed = job
        tools = [WEATHER, tool(name, CALL_SCHEMAS[name]), TIME]
        return _ask(client, tools=tools, tool_choice={"type": "function", "function": {"name": name}}, seed=seed)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    for (name, seed), r in zip(jobs, results):
        calls = _check_calls(r.choices[0], {name: CALL_SCHEMAS[name]})
        assert {c.function.name for c in calls} == {name}


def test_parallel_calls_each_validate_and_choose_among_the_tools(server):
    client = server.client()
    schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: _ask(client, tools=[WEATHER, TIME], tool_choice="required", seed=s),
                                range(8)))
    seen = set()
    for r in results:
        seen |= {c.function.name for c in _check_calls(r.choices[0], schemas)}
    assert seen == {"get_weather", "get_time"}


def test_auto_with_response_format_answers_valid_json_or_valid_calls(server):
    # Agent frameworks send tools and a response_format together: the answer is either a call or the JSON.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    client = server.client()
    kinds = set()
    for seed in range(6):
        c = _ask(client, tools=[WEATHER, TIME], response_format=rf, seed=seed).choices[0]
        if c.message.tool_calls:
            _check_calls(c, {"get_weather": WEATHER["function"]["parameters"],
                             "get_time": TIME["function"]["parameters"]})
            kinds.add("calls")
        else:
            assert c.finish_reason == "stop", (c.finish_reason, c.message.content)
            jsonschema.validate(json.loads(c.message.content), schema)
            kinds.add("json")
    assert kinds


def test_thinking_with_response_format_goes_through_the_thinking_grammar(server, ckpt, monkeypatch):
    # Server and LLM.chat hand the constraint to ToolPlan.constrain, which lets a thinking channel come first.
    from blockdiff.tools.render import ToolPlan
    seen, orig = [], ToolPlan.constrain
    monkeypatch.setattr(ToolPlan, "constrain", lambda self, p, tok: seen.append(orig(self, p, tok)) or seen[-1])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    think = {"enable_thinking": True}
    c = _ask(server.client(), response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
             seed=0, extra_body={"chat_template_kwargs": think}).choices[0]
    offline = LLM(ckpt, dtype=torch.float32)  # its own engine: the server's runs in another thread
    out = offline.chat(USER, SamplingParams(structured_outputs={"json": schema}, seed=0, max_new_tokens=64),
                       chat_template_kwargs=think)[0]
    # Random weights may think until the budget runs out; a finished answer is the JSON, the thought apart.
    for finish, content, reasoning in ((c.finish_reason, c.message.content, c.message.reasoning_content),
                                       (out.finish_reason, out.content, out.reasoning_content)):
        if finish == "stop":
            assert json.loads(content) in ({"ok": True}, {"ok": False})
        else:
            assert finish == "length" and reasoning and not content
    assert len(seen) == 2 and all("<|channel>" not in p.structured_outputs.get("grammar", "<|channel>") for p in seen)
    assert all("think?" in p.structured_outputs["grammar"] for p in seen)


def test_tool_choice_none_gives_no_calls(server):
    r = _ask(server.client(), tools=[WEATHER, TIME], tool_choice="none", seed=0, max_tokens=32)
    c = r.choices[0]
    assert c.message.tool_calls is None and c.finish_reason in ("stop", "length")
    assert isinstance(c.message.content, str)


def test_auto_answers_with_text_or_valid_calls(server):
    # Once the model opens <|tool_call> the rest of the call is constrained: it is a valid call, or the budget
    # cut it (then it comes back as text with finish_reason "length").
    client = server.client()
    kinds = set()
    for seed in range(4):
        c = _ask(client, tools=[WEATHER], seed=seed, max_tokens=32).choices[0]
        if c.message.tool_calls:
            _check_calls(c, {"get_weather": WEATHER["function"]["parameters"]})
            kinds.add("calls")
        elif "<|tool_call>" in (c.message.content or ""):
            assert c.finish_reason == "length"
            kinds.add("cut")
        else:
            assert c.finish_reason in ("stop", "length")
            kinds.add("text")
    assert kinds - {"cut"}


def test_tools_with_top_p_and_top_k_as_agent_clients_send_them(server):
    """Agent clients (the openai SDK's users, LangChain...) send top_p with tools: the call grammar's sampler
    applies it (was a 400). Under "auto" the answer is text or valid calls; under "required" / a named
    function, valid calls; a response_format beside tools gives valid JSON or calls."""
    client = server.client()
    schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    for seed in range(3):
        c = _ask(client, tools=[WEATHER, TIME], top_p=0.9, seed=seed, max_tokens=32).choices[0]
        if c.message.tool_calls:
            _check_calls(c, schemas)
        else:
            assert c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            c = _ask(client, tools=[WEATHER, TIME], tool_choice=choice, top_p=0.9, temperature=0.7, seed=seed,
                     extra_body={"top_k": 5, "min_p": 0.05}).choices[0]
            calls = _check_calls(c, schemas)
            assert isinstance(choice, str) or {x.function.name for x in calls} == {"get_time"}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    for seed in range(3):
        c = _ask(client, tools=[WEATHER], response_format=rf, top_p=0.9, seed=seed).choices[0]
        if c.message.tool_calls:
            _check_calls(c, schemas)
        else:
            assert c.finish_reason == "stop", (c.finish_reason, c.message.content)
            jsonschema.validate(json.loads(c.message.content), schema)


def test_tool_calls_with_top_k_one_are_the_greedy_calls(server):
    """top_k = 1, min_p = 1 and temperature 0 all take the (grammar-masked) argmax at accepted positions: the
    same valid calls for one seed."""
    client = server.client()
    schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    for seed in (4, 5):
        runs = [_ask(client, tools=[WEATHER, TIME], tool_choice="required", seed=seed, **kw)
                for kw in ({"extra_body": {"top_k": 1}}, {"extra_body": {"min_p": 1.0}}, {"temperature": 0})]
        calls = [[(x.function.name, x.function.arguments) for x in _check_calls(r.choices[0], schemas)]
                 for r in runs]
        assert calls[0] == calls[1] == calls[2], calls


def _reassemble(stream):
    content, reasoning, calls, finish = "", "", {}, None
    first = True
    for ch in stream:
        d = ch.choices[0].delta
        if first:
            assert d.role == "assistant"
            first = False
        content += d.content or ""
        reasoning += getattr(d, "reasoning_content", None) or ""
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert slot["id"] is None, "id and name come once, first"
                slot["id"], slot["name"] = tc.id, tc.function.name
            else:
                assert slot["id"] is not None, "a call's id and name come before its arguments"
            slot["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("kw", [
    dict(tools=[WEATHER, TIME], tool_choice="required", seed=3),
    dict(tools=[WEATHER], tool_choice="required", seed=4, extra_body={"chat_template_kwargs": {"enable_thinking": True}},
         max_tokens=24),
    dict(tools=[WEATHER], tool_choice="none", seed=5, max_tokens=24),
], ids=["calls", "thinking", "none"])
def test_streamed_deltas_reassemble_to_the_whole_answer(server, kw):
    client = server.client()
    whole = _ask(client, **kw).choices[0]
    content, reasoning, calls, finish = _reassemble(_ask(client, stream=True, **kw))
    assert finish == whole.finish_reason
    assert content == (whole.message.content or "")
    assert reasoning == (getattr(whole.message, "reasoning_content", None) or "")
    want = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert [(c["name"], c["arguments"]) for c in calls] == want


def test_thinking_goes_only_to_reasoning_content(server):
    # Random weights think until the budget runs out: the thought is all reasoning, none of it content.
    c = _ask(server.client(), tools=[WEATHER], tool_choice="required", seed=0, max_tokens=24,
             extra_body={"chat_template_kwargs": {"enable_thinking": True}}).choices[0]
    reasoning = c.message.reasoning_content
    assert reasoning and c.finish_reason == "length"
    assert not c.message.content and "<|channel>" not in reasoning and "thought\n" not in reasoning


def test_agent_loop_call_result_answer(server, llm):
    client = server.client()
    messages = [{"role": "system", "content": "You can call tools."}, *USER]
    first = _ask(client, messages=messages, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {
        "name": "get_weather"}}, seed=7).choices[0]
    calls = _check_calls(first, {"get_weather": WEATHER["function"]["parameters"]})
    messages.append(first.message.model_dump(exclude_none=True))
    for c in calls:
        args = json.loads(c.function.arguments)
        messages.append({"role": "tool", "tool_call_id": c.id, "content": f"sunny in {args['city']}"})
    final = _ask(client, messages=messages, tools=[WEATHER, TIME], tool_choice="none", seed=8, max_tokens=16)
    answer = final.choices[0]
    assert answer.message.tool_calls is None and isinstance(answer.message.content, str)
    # The second prompt is the history as the template renders it: calls and results inside the model turn.
    text = llm.tokenizer.decode(_prompt_ids(llm, messages, [WEATHER, TIME]), skip_special_tokens=False)
    for c in calls:
        assert f"<|tool_call>call:get_weather{_gemma(json.loads(c.function.arguments))}<tool_call|>" in text
        assert f"<|tool_response>response:get_weather{{value:<|\"|>sunny in " in text
    assert final.usage.prompt_tokens == len(_prompt_ids(llm, messages, [WEATHER, TIME]))
    assert text.endswith("<tool_response|>")  # the model turn stays open after the results


def _gemma(v):
    from blockdiff.tools.syntax import dumps
    return dumps(v)


def _prompt_ids(llm, messages, tools):
    from blockdiff.tools.render import template_messages
    return llm.tokenizer.encode_chat(template_messages(messages), tools=tools)


@pytest.mark.parametrize("body, param, message", [
    (dict(tools=[tool("f", {"type": "object", "properties": {"x": {"uniqueItems": True}}})],
          tool_choice="required"), "tools[0].function.parameters.properties.x", "uniqueItems cannot be enforced"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice.function.name", "not one of the tools"),
    (dict(tool_choice="required"), "tool_choice", "no 'tools'"),
    (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice", "must be"),
    (dict(tools=[{"type": "retrieval"}]), "tools[0].type", "function"),
    (dict(tools=[WEATHER, WEATHER]), "tools[1].function.name", "declared twice"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice",
     "cannot be combined"),
    (dict(tools=[WEATHER], structured_outputs={"regex": "a+"}), "structured_outputs", "only a JSON answer"),
    (dict(functions=[WEATHER["function"]]), "functions", "send 'tools'"),
    (dict(suffix="return x"), "suffix", "/v1/completions"),
    (dict(tools=[WEATHER], response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}}), "response_format",
     "no finite output"),
    (dict(tools=[tool("f", {"type": "object", "properties": {"x": {"enum": []}}})], tool_choice="required"),
     "tools[0].function.parameters.properties.x.enum", "must be a non-empty array"),
    (dict(tools=[tool("f", {"$defs": {"A": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}},
                                            "required": ["a"]}},
                            "type": "object", "properties": {"x": {"$ref": "#/$defs/A"}}, "required": ["x"]})],
          tool_choice="required"), "tools", "no finite output"),
    (dict(function_call={"name": "get_weather"}), "function_call", "send 'tools'"),
    # Knobs the grammar's sampler cannot honour, with tools under the default tool_choice "auto" (were 500s).
    (dict(tools=[WEATHER], logit_bias={"5": 1}), "logit_bias", "cannot be combined with tool calls"),
    (dict(tools=[WEATHER], tool_choice="required", frequency_penalty=0.5, top_p=0.9), "frequency_penalty",
     "cannot be combined with tool calls"),
    (dict(tools=[WEATHER], tool_choice="required", logprobs=True), "logprobs", "cannot be combined with tool calls"),
    (dict(tools=[WEATHER], presence_penalty=0.5), "presence_penalty", "cannot be combined with tool calls"),
    (dict(tools=[WEATHER], ignore_eos=True), "ignore_eos", "cannot be combined with tool calls"),
    (dict(tools=[WEATHER], allowed_token_ids=[5, 6]), "allowed_token_ids", "cannot be combined with tool calls"),
    (dict(tools=[WEATHER], rng="reference"), "rng", "cannot be combined with tool calls"),
    (dict(messages=[*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]}]),
     "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
])
def test_bad_tool_requests_are_400_naming_the_field(server, body, param, message):
    body = {"model": MODEL, "messages": USER, "max_tokens": 8, **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err


def test_null_content_without_tool_calls_is_an_empty_assistant_message(server):
    """An assistant message may leave content null or out (OpenAI: it is optional there): an empty message, as
    the template renders content "". Every other role needs content (see test_server_edges)."""
    base = {"model": MODEL, "max_tokens": 8, "seed": 0}
    nulls = [*USER, {"role": "assistant", "content": None}, {"role": "user", "content": "and?"}]
    empty = [*USER, {"role": "assistant", "content": ""}, {"role": "user", "content": "and?"}]
    a = httpx.post(server.url + "/v1/chat/completions", json={**base, "messages": nulls}, timeout=60)
    b = httpx.post(server.url + "/v1/chat/completions", json={**base, "messages": empty}, timeout=60)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["usage"]["prompt_tokens"] == b.json()["usage"]["prompt_tokens"]
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]


def test_python_api_chat_with_tools(llm):
    out = llm.chat(USER, SamplingParams(seed=0, max_new_tokens=128), tools=[WEATHER, TIME], tool_choice="required")[0]
    assert out.finish_reason == "tool_calls" and out.tool_calls
    for c in out.tool_calls:
        schema = {"get_weather": WEATHER, "get_time": TIME}[c["function"]["name"]]["function"]["parameters"]
        jsonschema.validate(json.loads(c["function"]["arguments"]), schema)


def test_a_checkpoint_without_the_tool_tokens_returns_text_with_a_clear_reason(tmp_path):
    path = make_checkpoint(tmp_path, canvas_length=8, generation_config={"max_denoising_steps": 2})
    llm = LLM(path, dtype=torch.float32)
    # every token a stop token: the output ends before the budget, so the reason must be the failed call's
    stop_all = SamplingParams(seed=0, max_new_tokens=8, ignore_eos=False, stop_token_ids=list(range(512)))
    out = llm.chat(USER, stop_all, tools=[WEATHER], tool_choice="required")[0]
    assert out.tool_calls is None and isinstance(out.content, str)
    assert out.finish_reason == "invalid_tool_call"
    # out of budget instead: "length", as for any text cut short
    out = llm.chat(USER, SamplingParams(seed=0, max_new_tokens=8, ignore_eos=False), tools=[WEATHER],
                   tool_choice="required")[0]
    assert out.tool_calls is None and out.finish_reason == "length"


HISTORY = [*USER, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": '{"city": "Paris", "days": 2}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


@pytest.mark.parametrize("body", [
    {"messages": HISTORY},  # tool calls and a tool result (this used to be a 400 on /tokenize)
    {"messages": USER, "tools": [WEATHER]},  # the declared tools are part of the prompt
    {"messages": HISTORY, "tools": [WEATHER, TIME], "chat_template_kwargs": {"enable_thinking": True}},
    {"messages": USER, "chat_template_kwargs": {"add_generation_prompt": False}},
], ids=["history", "tools", "tools-thinking", "no-generation-prompt"])
def test_tokenize_messages_counts_the_prompt_chat_runs(server, body):
    """/tokenize renders messages exactly as /v1/chat/completions does (one code path): its count is chat's
    usage.prompt_tokens, and its tokens the ids chat would run."""
    chat = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 8, "seed": 0,
                                                                 **body}, timeout=60)
    tok = httpx.post(server.url + "/tokenize", json={"model": MODEL, **body}, timeout=60)
    assert chat.status_code == tok.status_code == 200, (chat.text, tok.text)
    assert tok.json()["count"] == chat.json()["usage"]["prompt_tokens"]


def test_tokenize_validates_tools_as_chat_does(server):
    r = httpx.post(server.url + "/tokenize", json={"messages": USER, "tools": [{"type": "function"}]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tools"), r.text


@pytest.mark.parametrize("call_id", [["call_1"], {"id": "call_1"}, 1])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_tool_call_id_that_is_not_a_string_is_a_400_naming_it(server, path, call_id):
    """A tool result's tool_call_id is looked up among the earlier calls' ids: a list or an object there was a
    500 (unhashable type); now a 400 naming it, like any wrong-typed field."""
    messages = HISTORY[:2] + [{"role": "tool", "tool_call_id": call_id, "content": "sunny"}]
    r = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 8, "messages": messages}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[2].tool_call_id"
    assert r.json()["error"]["message"].startswith("'messages[2].tool_call_id' must be a string, got ")


def test_reasoning_tokens_count_each_thinking_channel_markers_included():
    from blockdiff.tools.output import reasoning_tokens
    from blockdiff.tools.render import ToolPlan

    class Tok:  # <|channel> is id 7, <channel|> id 8
        def token_to_id(self, s):
            return {"<|channel>": 7, "<channel|>": 8}.get(s)

    thinking = ToolPlan(thinking=True)
    assert reasoning_tokens(Tok(), thinking, [7, 1, 2, 8, 3, 4]) == 4
    assert reasoning_tokens(Tok(), thinking, [3, 7, 1, 8, 7, 2, 8, 5]) == 6  # two channels
    assert reasoning_tokens(Tok(), thinking, [7, 1, 2, 3]) == 4  # cut by the budget inside its thinking
    assert reasoning_tokens(Tok(), thinking, [1, 2, 3]) == 0
    assert reasoning_tokens(Tok(), ToolPlan(), [7, 1, 8]) == 0  # thinking off: nothing is parsed as thinking
