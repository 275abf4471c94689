"""schemathesis against the ASGI app: requests generated from ``/openapi.json`` never get a 5xx, and every response
conforms to the document (status code, content type, body schema). Bounded: a few examples per operation, the
tiny model, generation budgets clamped so each request is a few engine ticks."""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from blockdiff import LLM
from blockdiff.engine.engine import Engine
from blockdiff.server import build_app
from fixtures import make_checkpoint

MODEL = "tiny-dg"
# A 1x1 PNG: generated image_url parts get it, so image requests reach the engine too (a random URL is a 400).
TINY_PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAEl"
            "FTkSuQmCC")


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    torch.set_num_threads(1)
    path = make_checkpoint(tmp_path_factory.mktemp("schema_ckpt"),
                           generation_config={"max_denoising_steps": 2, "max_new_tokens": 16})
    llm = LLM(path, dtype=torch.float32, max_num_seqs=16)
    app = build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, max_num_seqs=16)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.engine.shutdown()


def clamp(body) -> None:
    """Keep generated requests short (the point is the wire format, not long generations); half of them name
    the served model so they reach the engine."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and len(body["model"]) % 2 == 0:
        body["model"] = MODEL
        # ... and of those, drop what would be refused anyway (roles the tiny template lacks, drafts without a
        # stream, more images than the limit, fuzzed structured-output keys), so some reach the engine.
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                m["role"] = "user" if m.get("role") not in ("user", "assistant") else m["role"]
                if isinstance(m.get("content"), list):
                    m["content"] = [p for p in m["content"] if not (isinstance(p, dict) and "image_url" in p)]
        if not body.get("stream"):
            body.pop("stream_drafts", None)
        body.pop("structured_outputs", None)
    for name, hi in (("max_tokens", 32), ("max_completion_tokens", 32), ("max_denoising_steps", 3),
                     ("stability_threshold", 3), ("n", 2)):
        v = body.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > hi:
            body[name] = hi
    for m in body.get("messages") or []:
        for part in (m.get("content") if isinstance(m, dict) and isinstance(m.get("content"), list) else []):
            if isinstance(part, dict) and isinstance(part.get("image_url"), dict):
                part["image_url"]["url"] = TINY_PNG


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_api_conforms_to_its_openapi_document(api_schema):
    # Driven with hypothesis directly (schemathesis' pytest plugin does not load with this pytest).
    ops = [r.ok() for r in api_schema.get_all_operations()]
    seen = []
    assert {f"{o.method.upper()} {o.path}" for o in ops} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                                              "GET /v1/models", "GET /health", "GET /metrics"}
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=25 if op.method.upper() == "POST" else 3, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize=True)
        def run(case):
            clamp(case.body)
            r = case.call_and_validate(checks=CHECKS)
            seen.append((op.path, r.status_code))

        run()
        if op.method.upper() == "POST":  # one plain valid request per route, checked against the document too
            body = {"model": MODEL, "max_tokens": 4}
            body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in op.path else {"prompt": "hi"})
            r = op.Case(body=body, media_type="application/json").call_and_validate(checks=CHECKS)
            seen.append((op.path, r.status_code))
    for path in ("/v1/completions", "/v1/chat/completions"):  # requests reached the engine and conformed
        assert (path, 200) in seen
