"""The request contract of issue 17: hostile requests are 400s naming the parameter (never a 5xx, never a reset
connection, one 400 counted each), the parameters OpenAI clients send by default are honoured, the server's caps
hold, tenants with different API keys never share cached prefixes, and vLLM's helper routes answer in its shapes.
Live uvicorn on loopback, tiny model."""

from __future__ import annotations

import http.client
import json
import socket

import httpx
import openai
import pytest
import torch

from blockdiff import LLM
from blockdiff.engine.engine import Engine
from blockdiff.server import build_app
from fixtures import make_checkpoint
from test_server import MODEL, LiveServer, wait_until

KEYS = ("key-a", "key-b")
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = make_checkpoint(tmp_path_factory.mktemp("contract_ckpt"),
                           generation_config={"max_denoising_steps": 4, "max_new_tokens": 32})
    yield LLM(path, dtype=torch.float32, max_num_seqs=8)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def srv(llm):
    eng = Engine(llm.model, llm.defaults, llm.tokenizer, max_num_seqs=8, prefix_cache_bytes=1 << 24)
    s = LiveServer(build_app(eng, MODEL, api_key=list(KEYS), max_denoising_steps=8, max_model_len=96))
    yield s
    s.close()


def raw_post(srv, path: str, body: bytes, key: str = KEYS[0]) -> tuple[int, dict]:
    """One request on a plain connection, then a second on the same one: a reset connection fails the test."""
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        out = (r.status, json.loads(r.read()))
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200  # the connection stayed usable
        return out
    finally:
        conn.close()


def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": MSGS, "max_tokens": 4, **kw}


def _cmpl(**kw) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **kw}


def _j(d: dict) -> bytes:
    return json.dumps(d).encode()


HOSTILE = [
    # (path, raw body, param the 400 must name) -- item 2: keys that cannot be encoded, integers Python cannot read
    ("/v1/completions", b'{"model":"tiny-dg","prompt":"x","max_tokens":4,"\\ud800":1}', "\\ud800"),
    ("/v1/completions", b'{"model":"tiny-dg","prompt":"x","metadata":{"\\udfff":"a"}}', "metadata.\\udfff"),
    ("/v1/chat/completions", b'{"model":"tiny-dg","messages":[{"role":"user","content":"hi","\\ud800x":1}]}',
     "messages[0].\\ud800x"),
    ("/v1/completions", b'{"model":"tiny-dg","prompt":"x","max_tokens":' + b"9" * 5000 + b"}", "max_tokens"),
    ("/v1/completions", b'{"model":"tiny-dg","prompt":"x","seed":-' + b"1" * 4301 + b"}", "seed"),
    ("/v1/chat/completions", b'{"model":"tiny-dg","messages":[{"role":"user","content":"hi"}],"logit_bias":{"5":'
     + b"1" * 4400 + b"}}", "logit_bias.5"),
    # item 3: temperatures that underflow
    ("/v1/completions", _j(_cmpl(t_min=0, t_max=1e-300)), "t_max"),
    ("/v1/completions", _j(_cmpl(t_min=0, t_max=1e-45)), "t_max"),
    ("/v1/chat/completions", _j(_chat(temperature=1e-45)), "temperature"),
    ("/v1/chat/completions", _j(_chat(temperature=0.01, t_max=5e-5, t_min=0)), "temperature"),
    # item 5: errors that named no parameter
    ("/v1/chat/completions", _j(_chat(top_p=0.5, logprobs=True, structured_outputs={"regex": "a+"})), "logprobs"),
    ("/v1/completions", _j(_cmpl(text_template="a <|hole:0|>")), "text_template"),
    ("/v1/completions", _j(_cmpl(text_template="a <|hole|>", suffix="b")), "suffix"),
    ("/v1/completions", _j(_cmpl(logprobs=2, suffix="b")), "logprobs"),
    # item 6: the document's shapes
    ("/v1/chat/completions", _j(_chat(response_format={"type": "text", "json_schema": [None, None]})),
     "response_format.json_schema"),
    ("/v1/chat/completions", _j(_chat(response_format={"type": "xml"})), "response_format.type"),
    # item 7: the server's caps
    ("/v1/completions", _j(_cmpl(max_denoising_steps=10_000, max_tokens=32)), "max_denoising_steps"),
    ("/v1/completions", _j(_cmpl(max_tokens=2032)), "max_tokens"),
    ("/v1/chat/completions", _j(_chat(max_completion_tokens=96)), "max_completion_tokens"),
    # item 9: what cannot be honoured says why, naming the field
    ("/v1/completions", _j(_cmpl(rng="reference", presence_penalty=0.5)), "presence_penalty"),
    ("/v1/completions", _j(_cmpl(rng="reference", temperature=0.5)), "temperature"),
    ("/v1/chat/completions", _j(_chat(response_format={"type": "json_object"}, frequency_penalty=1)),
     "frequency_penalty"),
    ("/v1/completions", _j(_cmpl(logit_bias={"99999": 1})), "logit_bias"),
    ("/v1/completions", _j(_cmpl(logit_bias={"abc": 1})), "logit_bias"),
    ("/v1/completions", _j(_cmpl(logit_bias={"5": 1000})), "logit_bias.5"),
    ("/v1/completions", _j(_cmpl(repetition_penalty=0)), "repetition_penalty"),
    # fuzzing: a penalty that rounds to 0 in fp32, or so small the logits overflow, was a 500 (NaN logits)
    ("/v1/completions", _j(_cmpl(repetition_penalty=5e-324)), "repetition_penalty"),
    ("/v1/chat/completions", _j(_chat(repetition_penalty=1e-30)), "repetition_penalty"),
    # fuzzing: a temperature past fp32's range was a 500 (chat) or all-<pad> output (a uniform distribution)
    ("/v1/chat/completions", _j(_chat(t_max=4.7e307)), "t_max"),
    ("/v1/completions", _j(_cmpl(t_max=4.7e307)), "t_max"),
    ("/v1/completions", _j(_cmpl(t_min=1e300, t_max=1e301)), "t_min"),
    ("/v1/completions", b'{"model":"tiny-dg","prompt":"hi","presence_penalty":1e999}', "presence_penalty"),
    ("/v1/completions", _j(_cmpl(cache_salt="")), "cache_salt"),
    ("/v1/completions", _j(_cmpl(max_tokens=4, max_new_tokens=5)), None),  # ignored unknown field: a 200
    ("/tokenize", _j({"prompt": "a", "messages": MSGS}), "prompt"),
    ("/detokenize", _j({"tokens": [1, 99999]}), "tokens"),
    ("/detokenize", _j({"tokens": [-1]}), "tokens[0]"),
]


@pytest.mark.parametrize("path,body,param", HOSTILE, ids=[f"{i}:{h[2]}" for i, h in enumerate(HOSTILE)])
def test_hostile_requests_are_400s_naming_the_parameter(srv, path, body, param):
    before = dict(srv.app.state.server.http_errors)
    status, out = raw_post(srv, path, body)
    errors = srv.app.state.server.http_errors
    if param is None:
        assert status == 200, out
        return
    assert status == 400, out
    assert out["error"]["param"] == param, out
    assert out["error"]["message"].startswith("'"), out  # "'field' ..."
    assert errors.get(400, 0) == before.get(400, 0) + 1 and errors.get(500, 0) == before.get(500, 0)


def test_no_5xx_was_counted(srv):
    m = httpx.get(srv.url + "/metrics", headers={"authorization": f"Bearer {KEYS[0]}"}).text
    assert "code=\"500\"" not in m and srv.app.state.server.http_errors.get(500, 0) == 0


def test_openai_client_defaults_get_200s(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=60)
    defaults = dict(temperature=0.7, top_p=1, presence_penalty=0, frequency_penalty=0, max_tokens=8)
    r = client.chat.completions.create(model=MODEL, messages=MSGS, **defaults)
    assert r.choices[0].finish_reason in ("stop", "length")
    r = client.completions.create(model=MODEL, prompt="hi", **defaults)
    assert r.choices[0].finish_reason in ("stop", "length")
    greedy = [client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=16)
              .choices[0].message.content for _ in range(2)]
    assert greedy[0] == greedy[1]  # temperature 0: greedy and deterministic, with no seed
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    stream = client.chat.completions.create(model=MODEL, messages=MSGS, stream=True, **defaults,
                                            extra_body={"stream_drafts": False, "logit_bias": {"300": 2}})
    assert any(c.choices and c.choices[0].finish_reason for c in stream)


def test_harmless_fields_the_document_allows_are_accepted(srv):
    for body in (_chat(top_logprobs=0), _chat(stream_drafts=True), _cmpl(stream_options={"include_usage": True}),
                 _cmpl(top_k=-1), _cmpl(top_k=0), _cmpl(max_tokens=8.0), _cmpl(stop_token_ids=[5.0])):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, out = raw_post(srv, path, _j(body))
        assert status == 200, (body, out)


def test_tenants_never_see_each_others_cached_prefixes(srv):
    prompt = "The quarterly report of tenant A says: " + "confidential " * 5

    def cached(key, **kw):
        status, out = raw_post(srv, "/v1/completions", _j(_cmpl(prompt=prompt, seed=0, **kw)), key=key)
        assert status == 200, out
        return out["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(KEYS[0]) == 0
    assert cached(KEYS[1]) == 0  # another key: salted apart
    assert cached(KEYS[0]) > 0  # the same key reuses its own prefix
    assert cached(KEYS[0], cache_salt="s1") == 0  # a request's own salt splits further


def test_vllm_helper_routes(srv, llm):
    h = {"authorization": f"Bearer {KEYS[0]}"}
    t = httpx.post(srv.url + "/tokenize", json={"model": MODEL, "prompt": "hello"}, headers=h).json()
    assert t["tokens"] == [llm.tokenizer.bos_token_id] + llm.tokenizer.encode("hello")
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 96
    chat = httpx.post(srv.url + "/tokenize", json={"messages": MSGS}, headers=h).json()
    assert chat["tokens"] == llm.tokenizer.encode_chat(MSGS, add_generation_prompt=True)
    d = httpx.post(srv.url + "/detokenize", json={"tokens": t["tokens"][1:]}, headers=h).json()
    assert d == {"prompt": "hello"}
    assert httpx.get(srv.url + "/version").json()["version"]
    assert httpx.post(srv.url + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(srv.url + "/v1/models/" + MODEL, headers=h).json()["max_model_len"] == 96


def test_serve_flags_for_keys_and_caps(tmp_path, monkeypatch, capsys):
    import argparse

    from blockdiff.cli import main as cli_main
    from blockdiff.server.cli import api_keys

    f = tmp_path / "keys"
    f.write_text("# tenants\nk2\n\nk3\nk1\n")
    monkeypatch.setenv("BLOCKDIFF_API_KEY", "env-key")
    ns = argparse.Namespace
    assert api_keys(ns(api_key=["k1", "k2"], api_key_file=str(f))) == ["k1", "k2", "k3"]
    assert api_keys(ns(api_key=None, api_key_file=None)) == ["env-key"]  # the variable only when no flag
    monkeypatch.delenv("BLOCKDIFF_API_KEY")
    assert api_keys(ns(api_key=None, api_key_file=None)) == []
    empty = tmp_path / "empty"
    empty.write_text("# none\n")
    for argv, words in [(["--max-model-len", "0"], "--max-model-len must be >= 1"),
                        (["--max-denoising-steps", "-1"], "--max-denoising-steps must be >= 1"),
                        (["--api-key-file", str(empty)], "holds no key"),
                        (["--api-key-file", str(tmp_path / "missing")], "--api-key-file"),
                        (["--api-key", "a", "--api-key", " "], "API key")]:
        assert cli_main(["serve", str(tmp_path)] + argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_a_body_cut_short_by_the_client_is_not_a_server_error(srv, caplog):
    """Fuzzing: a client that declared more bytes than it sent and then closed its side was logged as an unhandled
    error (a traceback) and counted as a 500."""
    host, port = srv.url.removeprefix("http://").split(":")
    before = dict(srv.app.state.server.http_errors)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEYS[0].encode() + b"\r\nContent-Length: 50\r\n\r\n{}")
        s.shutdown(socket.SHUT_WR)
        b"".join(iter(lambda: s.recv(65536), b""))  # whatever the server answers, until it closes
    assert wait_until(lambda: sum(srv.app.state.server.http_errors.values()) > sum(before.values()), timeout=10)
    errors = srv.app.state.server.http_errors
    assert errors.get(500, 0) == before.get(500, 0) and errors.get(400, 0) == before.get(400, 0) + 1, errors
    assert "unhandled error" not in caplog.text
