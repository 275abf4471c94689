"""Structured output through the OpenAI-compatible server, with the official ``openai`` client on a live uvicorn
(see test_server.py): ``response_format`` (json_schema, json_object), the ``structured_outputs`` field,
``client.chat.completions.parse`` with a pydantic model, streaming, and the 400s for bad input.

The schema suite runs concurrently (the engine batches the requests); every response must be "stop" and valid.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from blockdiff import LLM
from blockdiff.engine.engine import Engine
from blockdiff.server import build_app
from fixtures import make_checkpoint
from structured_schemas import SCHEMAS
from test_server import LiveServer

MODEL = "tiny-dg"
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("structured_serve"), canvas_length=8,
                           generation_config={"max_denoising_steps": 6, "max_new_tokens": 256})
    llm = LLM(path, dtype=torch.float32)
    srv = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, max_num_seqs=64))
    yield srv
    srv.close()


def _schema_request(client, name: str, seed: int):
    rf = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Give {name}"}],
                                          response_format=rf, seed=seed, max_tokens=256)


def test_response_format_json_schema_suite_stops_and_validates(server):
    client = server.client()
    jobs = [(name, seed) for name in SCHEMAS for seed in SEEDS]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda j: _schema_request(client, *j), jobs))
    for (name, seed), r in zip(jobs, results):
        c = r.choices[0]
        assert c.finish_reason == "stop", (name, seed, c.message.content)
        jsonschema.validate(json.loads(c.message.content), SCHEMAS[name])


def test_response_format_with_top_p_and_top_k_gives_valid_json(server):
    """OpenAI SDK users send top_p with response_format (was a 400): the constrained sampler applies it, and
    top_k / min_p (extra_body), on every schema of a sample."""
    client = server.client()
    jobs = [(name, seed, kw) for name in ("flat_person", "array_of_objects", "anyof_objects", "mixed_everything")
            for seed in SEEDS for kw in ({"top_p": 0.9, "extra_body": {"top_k": 5}},
                                         {"top_p": 0.5, "temperature": 0.7, "extra_body": {"min_p": 0.1}})]

    def run(job):
        name, seed, kw = job
        rf = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Give {name}"}],
                                              response_format=rf, seed=seed, max_tokens=256, **kw)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    for (name, seed, kw), r in zip(jobs, results):
        c = r.choices[0]
        assert c.finish_reason == "stop", (name, seed, kw, c.message.content)
        jsonschema.validate(json.loads(c.message.content), SCHEMAS[name])
    # the parse() helper with a pydantic model, and a vLLM guided field, with top_p
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "An owner"}],
                                      response_format=Owner, seed=0, max_tokens=256, top_p=0.9)
    assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Owner)
    r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=64, seed=0, top_p=0.8,
                                  extra_body={"guided_choice": ["left", "right"], "top_k": 2})
    assert r.choices[0].text in ("left", "right")


def test_top_k_one_constrained_output_is_the_greedy_one(server):
    client = server.client()
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["tool_call"]}}
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "call"}], response_format=rf, seed=3,
              max_tokens=256)
    texts = [client.chat.completions.create(**kw, **x).choices[0].message.content
             for x in ({"extra_body": {"top_k": 1}}, {"top_p": 1e-6}, {"temperature": 0})]
    assert texts[0] == texts[1] == texts[2], texts
    jsonschema.validate(json.loads(texts[0]), SCHEMAS["tool_call"])


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=30)


class Owner(BaseModel):
    name: str = Field(max_length=8)
    pets: list[Pet] = Field(min_length=1, max_length=2)
    verified: bool | None


def test_openai_parse_with_a_pydantic_model(server):
    client = server.client()
    for seed in SEEDS:
        r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "An owner"}],
                                          response_format=Owner, seed=seed, max_tokens=256)
        c = r.choices[0]
        assert c.finish_reason == "stop"
        assert isinstance(c.message.parsed, Owner) and 1 <= len(c.message.parsed.pets) <= 2


def test_response_format_json_object(server):
    r = server.client().completions.create(model=MODEL, prompt="{", max_tokens=64, seed=0,
                                           extra_body={"response_format": {"type": "json_object"}})
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length")
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict)


@pytest.mark.parametrize("spec,check", [
    ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    ({"choice": ["left", "right"]}, lambda t: t in ("left", "right")),
    ({"grammar": 'root ::= "(" [a-c] ")" ("!" | "?")'}, lambda t: re.fullmatch(r"\([a-c]\)[!?]", t)),
    ({"json": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}},
     lambda t: isinstance(json.loads(t), list)),
])
def test_structured_outputs_field_on_completions(server, spec, check):
    for seed in SEEDS:
        r = server.client().completions.create(model=MODEL, prompt="Answer:", max_tokens=64, seed=seed,
                                               extra_body={"structured_outputs": spec})
        c = r.choices[0]
        assert c.finish_reason == "stop" and check(c.text), c.text


@pytest.mark.parametrize("field,value,check", [
    ("guided_json", {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
     lambda t: jsonschema.validate(json.loads(t), {"type": "array", "items": {"type": "boolean"}, "minItems": 1,
                                                   "maxItems": 2}) is None),
    ("guided_regex", r"[0-9]{3}-[a-z]{2}", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    ("guided_choice", ["left", "right"], lambda t: t in ("left", "right")),
    ("guided_grammar", 'root ::= "(" [a-c] ")"', lambda t: re.fullmatch(r"\([a-c]\)", t)),
])
def test_vllm_guided_fields_constrain_the_output(server, field, value, check):
    # Clients written for vLLM still send its older guided_* fields: ignored, they would get unconstrained text.
    r = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Answer"}],
                                                max_tokens=64, seed=0, extra_body={field: value})
    c = r.choices[0]
    assert c.finish_reason == "stop" and check(c.message.content), c.message.content


def test_streamed_constrained_output_equals_the_plain_one(server):
    client = server.client()
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["tool_call"]}}
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "call"}], response_format=rf, seed=3,
              max_tokens=256)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **kw)
                   if ch.choices)
    assert text == plain
    jsonschema.validate(json.loads(text), SCHEMAS["tool_call"])


def test_stop_strings_do_not_cut_constrained_output(server):
    schema = {"type": "object", "properties": {"k": {"const": "x;y"}}, "required": ["k"],
              "additionalProperties": False}
    r = server.client().completions.create(model=MODEL, prompt="a", max_tokens=64, seed=0, stop=[";"],
                                           extra_body={"structured_outputs": {"json": schema}})
    assert r.choices[0].finish_reason == "stop" and json.loads(r.choices[0].text) == {"k": "x;y"}


@pytest.mark.parametrize("extra,param,message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "response_format.json_schema.schema: the JSON Schema is not supported: Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(("}}}}, "response_format", "unclosed group"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "must be an object"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'json_object' or 'json_schema'"),
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regular expression is invalid"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty list"),
    ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs", "grammar is invalid"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
    ({"structured_outputs": {"regex": "a"}, "ignore_eos": True}, "structured_outputs", "ignore_eos"),
    # what a constrained canvas still cannot honour, beside a top_p / top_k it now takes
    ({"structured_outputs": {"regex": "a"}, "top_p": 0.9, "logprobs": 2}, "logprobs",
     "'logprobs' cannot be combined with structured_outputs"),
    ({"guided_choice": ["a"], "top_k": 3, "presence_penalty": 0.5}, "presence_penalty",
     "'presence_penalty' cannot be combined with guided_choice"),
    ({"response_format": {"type": "json_object"}, "top_p": 0.9, "rng": "reference"}, "rng",
     "response_format needs rng='default'"),
    ({"guided_regex": "[a-"}, "guided_regex", "guided_regex: the regular expression is invalid"),
    ({"guided_json": {"type": "nope"}}, "guided_json", "guided_json: the JSON Schema is not supported"),
    ({"guided_choice": "yes"}, "guided_choice", "must be an array"),
    ({"guided_choice": ["a"], "ignore_eos": True}, "guided_choice", "ignore_eos"),
    ({"guided_choice": ["a"], "structured_outputs": {"regex": "a"}}, "guided_choice", "not both"),
    # response_format {"type": "text"} is no constraint: the errors name the field that is one
    ({"response_format": {"type": "text"}, "structured_outputs": {"regex": "a"}, "ignore_eos": True},
     "structured_outputs", "'structured_outputs' cannot be combined with ignore_eos"),
    ({"response_format": {"type": "text"}, "structured_outputs": {"grammar": "start: start"}}, "structured_outputs",
     "structured_outputs.grammar: no finite output satisfies it"),
    ({"response_format": {"type": "text"}, "guided_regex": "a", "ignore_eos": True}, "guided_regex",
     "'guided_regex' cannot be combined with ignore_eos"),
])
def test_bad_constraints_are_400_naming_the_problem(server, extra, param, message):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 8, **extra}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_openai_client_raises_bad_request_for_a_bad_schema(server):
    with pytest.raises(openai.BadRequestError, match="Unknown format"):
        server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "string", "format": "weird"}}})


# Admitted (its first mask is cheap), then llguidance's lexer gives up a few tokens in ("too many expressions
# constructed"): the request's own constraint failed it, so it is a 400 (not retried), and its neighbours run on.
LEXER_BOMB = r"(a|aa)*b{1000}{1000}"


def test_a_constraint_failing_at_run_time_is_a_400_the_client_does_not_retry(server):
    seen = []
    http = httpx.Client(event_hooks={"request": [lambda r: seen.append(r.url.path)]})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", http_client=http, max_retries=2)
    with ThreadPoolExecutor(2) as pool:
        ok = pool.submit(client.completions.create, model=MODEL, prompt="hi", max_tokens=16, seed=3)
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=64, seed=0,
                                      extra_body={"guided_regex": LEXER_BOMB})
        assert ok.result().choices[0].finish_reason in ("stop", "length")
    err = caught.value.body
    assert err["code"] == "constraint_failed" and err["param"] == "guided_regex", err
    assert "this request failed: its structured output constraint failed" in err["message"]
    assert "lexer" in err["message"]
    assert seen.count("/v1/completions") == 2  # the neighbour and one try of the failing request: no retries


def test_a_constraint_failing_while_streaming_ends_with_an_error_event(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "seed": 0,
            "stream": True, "structured_outputs": {"regex": LEXER_BOMB}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "constraint_failed" and err["param"] == "structured_outputs", err


def test_tenants_never_share_a_compiled_or_admitted_constraint(tmp_path):
    """The grammar caches (compiled grammars, admitted matchers) are kept per prefix-cache salt, as the prefix cache
    is: a tenant's structured request is never prepared faster because another tenant sent the same schema."""
    from blockdiff.structured.spec import _compile

    path = make_checkpoint(tmp_path / "ck", canvas_length=8, generation_config={"max_denoising_steps": 2})
    llm = LLM(path, dtype=torch.float32)
    srv = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, api_key=["ka", "kb"]))
    try:
        compiler = srv.engine.engine.grammars()
        admitted = lambda: len(compiler._admitted)  # noqa: E731
        schema = {"type": "object", "properties": {"tenant_probe": {"type": "integer"}}, "required": ["tenant_probe"]}
        rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}

        def ask(key: str, **extra):
            return srv.client(key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                           max_tokens=16, seed=0, response_format=rf, **extra)
        before, misses = admitted(), _compile.cache_info().misses
        first = ask("ka")
        assert admitted() == before + 1 and _compile.cache_info().misses > misses
        ask("ka")  # the same tenant again: both caches hit
        assert admitted() == before + 1
        misses = _compile.cache_info().misses
        other = ask("kb")  # another tenant: compiled and admitted anew
        assert admitted() == before + 2 and _compile.cache_info().misses > misses
        assert other.choices[0].message.content == first.choices[0].message.content  # the same answer all the same
        ask("ka", extra_body={"cache_salt": "s"})  # a request's own salt separates it too
        assert admitted() == before + 3
    finally:
        srv.close()


def test_a_grammar_that_asks_for_the_eos_token_mid_output_is_a_400_not_a_500(server):
    """A grammar may name a token by id (Lark's ``<[id]>``); naming the EOS where the grammar is not complete puts it
    in llguidance's mask, but its matcher never consumes an EOS there: the request could never move on (it was a
    500, "grammar matcher refused the 64 most likely tokens its own mask allowed"). First thing: refused at
    admission; later: the request's own constraint failed it (400 constraint_failed), naming the field."""
    from fixtures import EOS_ID

    def ask(grammar: str):
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 16, "seed": 0, "guided_grammar": grammar}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=60)

    r = ask(f"start: <[{EOS_ID}]>")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "guided_grammar" and "end token" in err["message"], err
    r = ask(f'start: "a" <[{EOS_ID}]>')
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "constraint_failed" and err["param"] == "guided_grammar", err
    assert "end token" in err["message"], err
    # an EOS the grammar names where it is complete is the ordinary end
    r = ask(f'start: "a" (<[{EOS_ID}]>)?')
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "a", r.text


def test_a_stop_token_id_ends_a_constrained_output_only_where_the_grammar_is_complete(server):
    """stop_token_ids join the EOS ids as end tokens, allowed only where the grammar is complete. A stop id the
    grammar would take as text (";" in "a;b") went into the output mid-grammar, and the text was cut at it: "a",
    finish_reason "stop", not a match of the pattern. Where the grammar cannot go on without it, the request's own
    constraint failed it (400); where it is optional, the output ends there, valid."""
    semi, = server.engine.engine.tokenizer.encode(";")

    def ask(regex: str, **kw):
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 16, "seed": 0, "guided_regex": regex,
                "stop_token_ids": [semi], **kw}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=60)

    r = ask("a;b")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "constraint_failed" and err["param"] == "guided_regex" and "end token" in err["message"]
    for seed in SEEDS:
        for stream in (False, True):
            r = ask("a(;b)?", seed=seed, stream=stream)
            assert r.status_code == 200, r.text
            if stream:
                chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
                text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
                finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
            else:
                text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
            assert finish == "stop" and re.fullmatch("a(;b)?", text), (text, finish)
