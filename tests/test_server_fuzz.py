"""Requests found by fuzzing live servers (schemathesis with every check, and hand-made bodies it does not
generate): each was answered wrongly (a 500, a 200 for an invalid body, an error naming the wrong field) and is kept
here as an explicit case. In-process (``TestClient``), the tiny tool checkpoint (its template knows tool turns)."""

from __future__ import annotations

import pytest
import torch
from starlette.testclient import TestClient

from blockdiff import LLM
from blockdiff.server import build_app
from tool_fixtures import make_tool_checkpoint

MODEL = "tiny-dg"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = make_tool_checkpoint(tmp_path_factory.mktemp("fuzz_ckpt"),
                                generation_config={"max_denoising_steps": 2, "max_new_tokens": 8})
    app = build_app(LLM(path, dtype=torch.float32), MODEL, max_denoising_steps=8)
    with TestClient(app) as c:
        yield c
    app.state.engine.shutdown()


def post(client, path: str, text: str):
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def error(r, status: int = 400) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


RESP = '{"model": "tiny-dg", "input": "hi", "max_output_tokens": 2, '
CHAT = '{"model": "tiny-dg", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
CMPL = '{"model": "tiny-dg", "prompt": "hi", "max_tokens": 2, '

NON_FINITE = [
    # The Responses API echoes tools and text.format: a NaN / an overflowing number there could not be encoded (500).
    ("/v1/responses", RESP + '"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", '
                             '"properties": {"a": {"type": "number", "default": NaN}}}}]}',
     "tools[0].parameters.properties.a.default", "NaN"),
    ("/v1/responses", RESP + '"text": {"format": {"type": "json_schema", "name": "x", "schema": '
                             '{"enum": [1e400]}}}}', "text.format.schema.enum[0]", "1e400"),
    ("/v1/responses", RESP + '"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", '
                             '"properties": {"a": {"maximum": -Infinity}}}}]}',
     "tools[0].parameters.properties.a.maximum", "-Infinity"),
    # Elsewhere such values were taken in silently (ignored fields, template kwargs) or refused as "got inf".
    ("/v1/chat/completions", CHAT + '"chat_template_kwargs": {"x": NaN}}', "chat_template_kwargs.x", "NaN"),
    ("/v1/completions", CMPL + '"temperature": Infinity}', "temperature", "Infinity"),
    ("/v1/completions", CMPL + '"seed": -1e400}', "seed", "-1e400"),
    ("/tokenize", '{"model": "tiny-dg", "prompt": "hi", "x": [NaN]}', "x[0]", "NaN"),
    ("/v1/completions", CMPL + '"stop": [NaN]}', "stop[0]", "NaN"),  # a string field: no "must be a number"
]


@pytest.mark.parametrize("path,body,param,literal", NON_FINITE, ids=[c[2] for c in NON_FINITE])
def test_nan_infinity_and_overflowing_numbers_are_400s_naming_the_field(client, path, body, param, literal):
    err = error(post(client, path, body))
    assert err["param"] == param, err
    assert f"'{param}' is {literal}, which is not a JSON number" in err["message"], err


def test_finite_numbers_next_to_those_are_still_taken(client):
    r = post(client, "/v1/responses", RESP + '"temperature": 0.5, "tools": [{"type": "function", "name": "f", '
                                             '"parameters": {"type": "object", "properties": {"a": {"type": '
                                             '"number", "default": 1.7e308}}}}]}')
    assert r.status_code == 200, r.text
    assert r.json()["tools"][0]["parameters"]["properties"]["a"]["default"] == 1.7e308


@pytest.mark.parametrize("field", ["background", "stream_drafts"])
@pytest.mark.parametrize("value", ["0", "0.0", "1"])
def test_responses_false_only_fields_refuse_numbers(client, field, value):
    """/v1/responses documents background and stream_drafts as ``const: false``; 0 equals False in Python, and
    both the server's own check and pydantic's Literal[False] let it through: a 200 for a request the document
    refuses."""
    err = error(post(client, "/v1/responses", RESP + f'"{field}": {value}}}'))
    assert err["param"] == field, err
    assert post(client, "/v1/responses", RESP + f'"{field}": false}}').status_code == 200


CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _valid(client, model: str, body: dict) -> bool:
    import jsonschema
    doc = client.get("/openapi.json").json()
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{model}", **doc}).is_valid(body)


@pytest.mark.parametrize("path,model,body,status", [
    # the document allowed an empty input list, which the server refuses (schemathesis positive_data_acceptance)
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": []}, 400),
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": [{"role": "user", "content": "hi"}],
                                           "max_output_tokens": 2}, 200),
    # tools: the document allowed any objects, and any string as a tool's name
    ("/v1/chat/completions", "ChatCompletionRequest", {**CHAT_BODY, "tools": [{}]}, 400),
    ("/v1/chat/completions", "ChatCompletionRequest", {**CHAT_BODY, "tools": [{"type": "function"}]}, 400),
    ("/v1/chat/completions", "ChatCompletionRequest", {**CHAT_BODY, "tools": [{"function": {"name": "a b"}}]}, 400),
    ("/v1/chat/completions", "ChatCompletionRequest", {**CHAT_BODY, "tools": [{"type": "web_search",
                                                                               "function": {"name": "f"}}]}, 400),
    ("/v1/chat/completions", "ChatCompletionRequest", {**CHAT_BODY, "tools": [
        {"type": "function", "function": {"name": "0get.weather-x", "description": None, "parameters": None}}]}, 200),
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": "hi", "max_output_tokens": 2,
                                           "tools": [{"type": "function", "name": ""}]}, 400),
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": "hi", "max_output_tokens": 2,
                                           "tools": [{"type": "function", "name": "f_1"}]}, 200),
    # both prompt and messages: a tools rule inside the messages branch of the oneOf made this valid (a 400)
    ("/tokenize", "TokenizeRequest", {"prompt": "hi", "messages": CHAT_BODY["messages"], "tools": [{}]}, 400),
])
def test_the_document_and_the_server_agree(client, path, model, body, status):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert _valid(client, model, body) == (status == 200)


@pytest.mark.parametrize("coding,compress", [("gzip", True), ("gzip", False), ("br", False), ("deflate, gzip", False)])
def test_a_compressed_body_is_415_naming_content_encoding(client, coding, compress):
    """Content-Encoding was ignored: gzip bytes were a 400 "not valid JSON: 'utf-8' codec can't decode byte 0x8b",
    and a plain body labelled gzip was run (200)."""
    import gzip
    raw = ('{"model": "tiny-dg", "prompt": "hi", "max_tokens": 2}').encode()
    r = client.post("/v1/completions", content=gzip.compress(raw) if compress else raw,
                    headers={"content-type": "application/json", "content-encoding": coding})
    err = error(r, 415)
    assert err["param"] == "content-encoding" and coding in err["message"], err
    assert r.headers["accept-encoding"] == "identity"
    ok = client.post("/v1/completions", content=raw, headers={"content-type": "application/json",
                                                              "content-encoding": "identity"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path,text,param", [
    # the last "model" won silently: a gateway reading the first one checks another model than the one run
    ("/v1/completions", '{"model": "other", "model": "tiny-dg", "prompt": "hi", "max_tokens": 2}', "model"),
    ("/v1/completions", '{"model": "tiny-dg", "prompt": "hi", "max_tokens": 2, "max_tokens": 2}', "max_tokens"),
    ("/v1/chat/completions", CHAT + '"stream_options": {}, "metadata": {"a": "1", "a": "2"}}', "metadata.a"),
    ("/v1/responses", '{"model": "tiny-dg", "input": [{"role": "user", "content": "hi", "role": "system"}]}',
     "input[0].role"),
])
def test_a_key_given_twice_is_400_naming_it(client, path, text, param):
    err = error(post(client, path, text))
    assert err["param"] == param and "given twice" in err["message"], err


def test_the_same_key_in_different_objects_is_fine(client):
    r = post(client, "/v1/chat/completions", CHAT + '"metadata": {"model": "x"}, "stream_options": {"model": 1}}')
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("arguments,words", [
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    ('{"a": 1e400}', "1e400 is beyond a double"),
    ('{"a": 1, "a": 2}', "the key 'a' is given twice"),
])
def test_json_text_in_a_field_is_held_to_the_bodys_rules(client, arguments, words):
    """A tool call's arguments (JSON text in a string) with NaN / 1e400 reached the prompt as {a:nan} / {a:inf},
    and a duplicated key kept the last value: the body's own rules (above) apply to JSON text a field holds."""
    import json
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "f", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "x"}]
    err = error(post(client, "/v1/chat/completions", json.dumps({"model": MODEL, "messages": messages,
                                                                 "max_tokens": 2})))
    assert err["param"] == "messages[1].tool_calls[0].function.arguments" and words in err["message"], err
    err = error(post(client, "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2,
                                                            "guided_json": '{"type": "object", "x": %s}' % arguments})))
    assert err["param"] == "guided_json" and words in err["message"], err
    messages[1]["tool_calls"][0]["function"]["arguments"] = '{"a": 1.5e308, "b": -0.0}'  # finite: taken
    r = post(client, "/v1/chat/completions", json.dumps({"model": MODEL, "messages": messages, "max_tokens": 2}))
    assert r.status_code == 200, r.text


def test_a_cache_salt_up_to_its_limit_is_taken_when_salting_by_key(tmp_path_factory):
    """With several API keys (salting by key) the tenant's 33-character tag went in front of the client's salt and
    the whole was checked against the 1024-character limit: a 992..1024-character salt, valid for the document,
    was refused with "'cache_salt' must hold at most 1024 characters". Salts still separate requests' prefixes."""
    from blockdiff.server.service import salted
    path = make_tool_checkpoint(tmp_path_factory.mktemp("salt_ckpt"),
                                generation_config={"max_denoising_steps": 2, "max_new_tokens": 8})
    app = build_app(LLM(path, dtype=torch.float32), MODEL, api_key=["k1", "k2"], max_denoising_steps=8)
    with TestClient(app) as c:
        for n, status in ((1000, 200), (1024, 200), (1025, 400)):
            r = c.post("/v1/completions", headers={"Authorization": "Bearer k1"},
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "cache_salt": "0" * n})
            assert r.status_code == status, (n, r.text)
        assert error(r)["param"] == "cache_salt"
    app.state.engine.shutdown()
    tag = "t" * 32
    long_a, long_b = "a" * 1000, "a" * 999 + "b"
    assert salted(tag, "x") == tag + ":x" and salted(None, long_a) == long_a
    assert len(salted(tag, long_a)) <= 1024 and salted(tag, long_a) != salted(tag, long_b)
    assert salted(tag, long_a) != salted("u" * 32, long_a)
