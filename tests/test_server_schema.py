"""schemathesis against the ASGI app, both ways: requests generated from ``/openapi.json`` (positive: valid for the
document) are accepted and answered as documented, and requests that violate it (negative) are refused with a 4xx;
never a 5xx. Bounded: a few examples per operation, the tiny model, budgets kept small so each request is a few
engine ticks.

The positive run fixes up, in ``semantic``, only what a JSON Schema cannot say: rules between fields (t_max above
t_min, what rng='reference' or a constraint excludes), the content of grammars / templates, and this checkpoint's
chat template (which knows three roles and no images). Everything else the document promises, the server keeps."""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               positive_data_acceptance, response_schema_conformance,
                                               status_code_conformance)

from blockdiff import LLM
from blockdiff.engine.engine import Engine
from blockdiff.server import build_app
from fixtures import make_checkpoint

MODEL = "tiny-dg"
VOCAB = 512
BUDGET = (("max_tokens", 32), ("max_completion_tokens", 32), ("max_denoising_steps", 3), ("stability_threshold", 3),
          ("n", 2))


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    torch.set_num_threads(1)
    path = make_checkpoint(tmp_path_factory.mktemp("schema_ckpt"),
                           generation_config={"max_denoising_steps": 2, "max_new_tokens": 16})
    llm = LLM(path, dtype=torch.float32, max_num_seqs=16)
    assert llm.model.vocab_size == VOCAB
    return llm


@pytest.fixture
def api_schema(llm):
    # One app per test: schemathesis' pytest plugin ends an ASGI app's lifespan (engine, thread pool) with the test.
    app = build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, max_num_seqs=16, max_denoising_steps=8)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.engine.shutdown()


def _fix_temperatures(body: dict) -> None:
    """t_max > t_min (the checkpoint's 0.4 / 0.8 fill the one not given), and the temperature factor keeps t_max
    above the floor."""
    def num(name):
        v = body.get(name)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    t_min, t_max = num("t_min"), num("t_max")
    hi = 0.8 if t_max is None else t_max
    f = num("temperature")
    if f and hi * f < 1e-6:
        hi = body["t_max"] = 1.0
    if hi <= (0.4 if t_min is None else t_min):  # t_min may be anything from 0: it gives way
        body["t_min"] = hi / 2


def semantic(body, path: str) -> None:
    if not isinstance(body, dict):
        return
    for name, hi in BUDGET:
        v = body.get(name)  # an integral float (2048.0) is that integer to the server
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > hi:
            body[name] = hi
    if path == "/tokenize":  # exactly one of prompt / messages
        if (body.get("prompt") is None) == (body.get("messages") is None):
            body.pop("messages", None)
            body["prompt"] = "hi"
    # The content of constraints and templates (grammars, schemas, holes) is not the document's to describe.
    # Tools: a function's schema must fit the call grammar, and tool_choice needs tools (tests/test_tools_*.py).
    for name in ("structured_outputs", "text_template", "suffix", "chat_template_kwargs", "tools", "tool_choice",
                 "parallel_tool_calls", "guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        body.pop(name, None)
    if isinstance(body.get("response_format"), dict) and body["response_format"].get("type") != "text":
        body.pop("response_format")
    _fix_temperatures(body)
    if body.get("rng") == "reference":  # the reference sampler has no cuts, templates, penalties or factor
        for name in ("top_p", "top_k", "min_p", "canvas_template", "allowed_token_ids", "temperature",
                     "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"):
            body.pop(name, None)
    if body.get("logprobs") is not None and body.get("echo"):
        body.pop("echo")
    if isinstance(body.get("logit_bias"), dict):  # token ids within this vocabulary
        body["logit_bias"] = {k: v for k, v in body["logit_bias"].items() if k.isdigit() and int(k) < VOCAB}
    if path == "/v1/responses":  # the same content rules, on the Responses API's shapes
        for name in ("text", "reasoning"):
            body.pop(name, None)
        items = body.get("input")
        if isinstance(items, list):
            items = [m for m in items if isinstance(m, dict) and m.get("type") in (None, "message")]
            for m in items:
                m["role"] = "user" if m.get("role") == "developer" else m.get("role")
                if isinstance(m.get("content"), list):
                    m["content"] = [p for p in m["content"] if p.get("type") != "input_image"]
            body["input"] = items or "hi"
    for m in body.get("messages") if isinstance(body.get("messages"), list) else []:
        # This checkpoint's tokenizer has no image tokens; its chat template knows system/user/assistant only.
        if isinstance(m, dict) and m.get("role") in ("tool", "developer"):
            m["role"] = "user"
        if isinstance(m, dict):  # a tool call's arguments are a JSON text the schema cannot describe
            m.pop("tool_calls", None)
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            m["content"] = [p for p in m["content"] if not (isinstance(p, dict) and p.get("type") == "image_url")]


BOTH = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _run(api_schema, mode: GenerationMode, checks: list, fix, examples: int) -> list:
    seen = []
    for op in (r.ok() for r in api_schema.get_all_operations()):
        post = op.method.upper() == "POST"
        if mode is GenerationMode.NEGATIVE and not post:
            continue  # nothing to violate: no body, and a path parameter is any string

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=examples if post else 3, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize=True)
        def run(case):
            fix(case.body, op.path)
            r = case.call_and_validate(checks=checks)
            seen.append((op.path, r.status_code))

        run()
    return seen


def test_valid_requests_are_accepted_and_answered_as_documented(api_schema):
    # Driven with hypothesis directly (schemathesis' pytest plugin does not load with this pytest).
    ops = {f"{r.ok().method.upper()} {r.ok().path}" for r in api_schema.get_all_operations()}
    assert ops >= {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/responses", "GET /v1/models",
                   "GET /v1/models/{model_id}", "POST /tokenize", "POST /detokenize", "GET /version", "GET /health",
                   "GET /metrics"}
    seen = _run(api_schema, GenerationMode.POSITIVE, BOTH + [positive_data_acceptance], semantic, 30)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize"):
        # requests reached the engine / tokenizer and conformed
        assert (path, 200) in seen, sorted(set(s for s in seen if s[0] == path))
    assert not [s for s in seen if s[1] == 400], seen  # valid for the document: never refused


def test_invalid_requests_are_refused_with_a_4xx(api_schema):
    seen = _run(api_schema, GenerationMode.NEGATIVE, BOTH + [negative_data_rejection], lambda body, path: None, 40)
    assert any(p == "/v1/completions" and s == 400 for p, s in seen)
    assert all(400 <= s < 500 for _, s in seen), seen


# Requests on which the document and the server disagreed (found by fuzzing a live server): each body is judged by
# /openapi.json's request schema and by the server, and the two verdicts must agree (valid <=> 200, else a 400).
def _cmpl(**kw) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **kw}


def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


AGREE = [
    ("/tokenize", "TokenizeRequest", {}),  # neither prompt nor messages: the document allowed it
    ("/tokenize", "TokenizeRequest", {"prompt": None, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", "ChatCompletionRequest", _chat(tool_choice={})),  # the document allowed any object
    ("/v1/chat/completions", "ChatCompletionRequest", _chat(tool_choice=None)),  # the document refused null
    ("/v1/completions", "CompletionRequest", _cmpl(response_format={"type": "json_schema", "json_schema": None})),
    ("/v1/completions", "CompletionRequest", _cmpl(response_format={"type": "json_schema"})),
    ("/v1/completions", "CompletionRequest", _cmpl(response_format={"type": "text"})),
    ("/v1/completions", "CompletionRequest", _cmpl(logit_bias={"5": 1})),  # the document allowed only {}
    ("/v1/chat/completions", "ChatCompletionRequest", _chat(logit_bias={"5": -100, "7": 0.5})),
    ("/v1/completions", "CompletionRequest", _cmpl(structured_outputs={})),  # the document allowed any object
    ("/v1/completions", "CompletionRequest", _cmpl(structured_outputs={"regex": "a", "type": "text"})),
    ("/v1/completions", "CompletionRequest", _cmpl(structured_outputs={"choice": ["0"], "allow_whitespace": None,
                                                                      "regex": None, "json_object": False})),
    ("/v1/completions", "CompletionRequest", _cmpl(text_template="no holes")),
    # vLLM's guided_* take what structured_outputs' keys take (the document allowed [], [""] and "")
    ("/v1/completions", "CompletionRequest", _cmpl(guided_choice=[])),
    ("/v1/completions", "CompletionRequest", _cmpl(guided_choice=["a", ""])),
    ("/v1/chat/completions", "ChatCompletionRequest", _chat(guided_regex="")),
    ("/v1/completions", "CompletionRequest", _cmpl(guided_grammar="")),
    ("/v1/completions", "CompletionRequest", _cmpl(guided_json="")),
    ("/v1/completions", "CompletionRequest", _cmpl(guided_choice=["a", "b"])),
    ("/v1/completions", "CompletionRequest", _cmpl(guided_json='{"type": "integer"}')),
    ("/v1/completions", "CompletionRequest", _cmpl(repetition_penalty=5e-324)),  # was a 500 (NaN logits)
    ("/v1/chat/completions", "ChatCompletionRequest", _chat(t_max=4.7e307)),  # was a 500 (inf temperature)
]


def _agree(engine, name: str, cases: list) -> list[dict]:
    """Each case's verdicts agree; returns the answers."""
    import jsonschema
    from starlette.testclient import TestClient
    app = build_app(engine, name, max_num_seqs=4, max_denoising_steps=8)
    answers = []
    try:
        with TestClient(app) as client:
            doc = client.get("/openapi.json").json()
            for path, model, body in cases:
                validator = jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{model}", **doc})
                r = client.post(path, json=body)
                assert r.status_code in (200, 400), (body, r.text)
                assert validator.is_valid(body) == (r.status_code == 200), (body, r.text)
                answers.append(r.json())
    finally:
        app.state.engine.shutdown()
    return answers


@pytest.mark.parametrize("path,model,body", AGREE, ids=[f"{i}:{a[0]}" for i, a in enumerate(AGREE)])
def test_the_document_and_the_server_agree_on_requests_fuzzing_found(llm, path, model, body):
    _agree(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, [(path, model, body)])


def test_the_sudoku_servers_document_leaves_out_what_its_task_refuses():
    """The Sudoku model lays its givens as a canvas_template on every puzzle: the document offered rng='reference',
    text templates, suffixes and structured output, which it refuses (and rng='reference' was refused naming
    canvas_template / allowed_token_ids, fields the client never sent)."""
    from blockdiff.sudoku.solver import BUNDLED_MODEL
    llm = LLM(BUNDLED_MODEL, dtype=torch.float32, max_num_seqs=4)
    puzzle = "4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......"
    cmpl = {"model": "sudoku", "prompt": puzzle, "max_denoising_steps": 2}
    chat = {"model": "sudoku", "messages": [{"role": "user", "content": puzzle}], "max_denoising_steps": 2}
    answers = _agree(llm.engine, "sudoku", [
        ("/v1/completions", "CompletionRequest", cmpl),
        ("/v1/completions", "CompletionRequest", {**cmpl, "rng": "reference"}),
        ("/v1/chat/completions", "ChatCompletionRequest", {**chat, "rng": "reference"}),
        ("/v1/completions", "CompletionRequest", {**cmpl, "suffix": "1"}),
        ("/v1/completions", "CompletionRequest", {**cmpl, "text_template": "<|hole|>"}),
        ("/v1/chat/completions", "ChatCompletionRequest", {**chat, "response_format": {"type": "json_object"}}),
        ("/v1/chat/completions", "ChatCompletionRequest", {**chat, "response_format": {"type": "text"}}),
        ("/v1/completions", "CompletionRequest", {**cmpl, "structured_outputs": {"regex": "[0-9]+"}})])
    err = answers[1]["error"]
    assert err["param"] == "rng" and "canvas_template" in err["message"] and "allowed_token_ids" not in err["message"]
