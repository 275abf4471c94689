"""The server as people deploy it and as testers abuse it: oversized and malformed bodies, content types, methods,
overload, keep-alive after a 500, shutdown with streams running, the OpenAPI document — each one a row of
issue 11's table — plus ``n`` choices, ``echo``, ``user`` / ``metadata``. Live uvicorn on loopback, tiny model."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from blockdiff import LLM
from blockdiff.cli import main as cli_main
from blockdiff.engine.engine import Engine
from blockdiff.server import build_app
from fixtures import make_checkpoint
from test_server import BAD, FOREVER, MODEL, X, LiveServer, stream_text, wait_until


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("harden_ckpt"),
                           generation_config={"max_denoising_steps": 4, "max_new_tokens": 32})


@pytest.fixture(scope="module")
def llm(ckpt):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM(ckpt, dtype=torch.float32, max_num_seqs=16)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def srv(llm):
    s = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, max_num_seqs=16))
    yield s
    s.close()


def post(srv, path, body, **kw):
    if isinstance(body, (bytes, str)):
        kw.setdefault("headers", {"content-type": "application/json"})
        return httpx.post(srv.url + path, content=body, timeout=30, **kw)
    return httpx.post(srv.url + path, json=body, timeout=30, **kw)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


# ---------------------------------------------------------------------------------------------- size and CPU
def test_a_16mb_prompt_is_refused_quickly_and_memory_returns(srv):
    big = json.dumps({"model": MODEL, "prompt": "a" * (16 << 20)})
    before = rss_mb()
    for _ in range(3):
        t0 = time.perf_counter()
        r = post(srv, "/v1/completions", big)
        assert time.perf_counter() - t0 < 5
        assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text
        assert "limit" in r.json()["error"]["message"]
    del big
    assert rss_mb() - before < 150  # nothing of the refused bodies stays
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(srv, monkeypatch):
    tok = srv.app.state.server.tokenizer
    calls = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    text = "word " * 400_000  # 2 MB: under the body limit, far over what a 2048-token context can hold
    for path, body, param in [("/v1/completions", {"model": MODEL, "prompt": text}, "prompt"),
                              ("/v1/chat/completions", {"model": MODEL, "messages": [
                                  {"role": "user", "content": text}]}, "messages")]:
        r = post(srv, path, body)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and err["code"] == "context_length_exceeded"
        assert "prompt is too long" in err["message"] and "characters" in err["message"]
    assert calls == []


def test_request_preparation_runs_off_the_event_loop(srv, monkeypatch):
    tok = srv.app.state.server.tokenizer
    real = tok.encode

    def slow(*a, **k):
        time.sleep(1.5)
        return real(*a, **k)

    monkeypatch.setattr(tok, "encode", slow)
    done = []
    t = threading.Thread(target=lambda: done.append(post(srv, "/v1/completions", {
        "model": MODEL, "prompt": "slow to read", "max_tokens": 16, "seed": 0, **X})))
    t.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    assert httpx.get(srv.url + "/health").status_code == 200
    assert time.perf_counter() - t0 < 0.5 and not done  # answered while the prompt was still being tokenized
    t.join()
    assert done[0].status_code == 200


def test_long_text_tokenizes_without_holding_the_gil(llm):
    tok = llm.tokenizer
    text = "hello world " * 20_000
    assert tok.encode(text) == tok._tok.encode(text, add_special_tokens=False).ids  # same ids as the plain path
    gaps = []

    def ticker():
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            a = time.perf_counter()
            time.sleep(0.005)
            gaps.append(time.perf_counter() - a)

    th = threading.Thread(target=ticker)
    th.start()
    tok.encode(text * 5)
    th.join()
    assert max(gaps) < 0.2


# ---------------------------------------------------------------------------------------------- malformed bodies
@pytest.mark.parametrize("raw,param", [
    ('{"model": "%s", "prompt": "hi \\ud800 there"}' % MODEL, "prompt"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}' % MODEL, "messages[0].content"),
    ('{"model": "%s", "prompt": "hi", "stop": ["ok", "\\ud83d"]}' % MODEL, "stop[1]"),
])
def test_a_lone_surrogate_is_400_naming_the_field(srv, raw, param):
    path = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
    r = post(srv, path, raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"] and param in err["message"]


def test_json_nested_5000_deep_is_400(srv):
    for raw in ["[" * 5000 + "]" * 5000,
                '{"model": "%s", "prompt": "hi", "metadata": %s}' % (MODEL, '{"a": ' * 5000 + "1" + "}" * 5000),
                '{"model": "%s", "prompt": "hi", "chat_template_kwargs": %s}' % (MODEL, "[" * 100 + "]" * 100)]:
        r = post(srv, "/v1/completions", raw)
        assert r.status_code == 400, r.text
        assert "nests too deeply" in r.json()["error"]["message"]
    assert httpx.get(srv.url + "/health").status_code == 200


@pytest.mark.parametrize("depth", [65, 5000])
def test_json_text_in_a_field_nested_too_deep_is_400_naming_it(srv, depth):
    """JSON sent as a string (a tool call's arguments, a schema in guided_json or structured_outputs.json) is read
    within the body's limit of 64 levels: deeper was a 500 (RecursionError, in the parser or the template after
    it); so is an integer literal Python cannot read."""
    deep = '{"a": ' * depth + "1" + "}" * depth
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "done"}]
    cases = [("/v1/chat/completions", {"messages": messages}, "messages[1].tool_calls[0].function.arguments"),
             ("/v1/completions", {"prompt": "hi", "guided_json": deep}, "guided_json"),
             ("/v1/completions", {"prompt": "hi", "structured_outputs": {"json": deep}}, "structured_outputs")]
    for path, body, param in cases:
        r = httpx.post(srv.url + path, json={"model": MODEL, "max_tokens": 4, **body}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and "nests too deeply: at most 64 levels" in err["message"], err
    call["function"]["arguments"] = '{"a": ' + "1" * 5000 + "}"
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "messages": messages},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"
    assert httpx.get(srv.url + "/health").status_code == 200


def test_any_500_keeps_the_keep_alive_connection_usable(srv, monkeypatch):
    server = srv.app.state.server

    def boom(*a, **k):
        raise RuntimeError("injected preparation bug")

    monkeypatch.setattr(server, "encode_text", boom)
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": MODEL, "prompt": "hi"})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    assert r.status == 500 and "injected preparation bug" in data["error"]["message"]
    assert (r.getheader("connection") or "").lower() != "close"
    sock = conn.sock
    conn.request("GET", "/health")  # the same connection, no reconnect
    r2 = conn.getresponse()
    assert r2.status == 200 and json.loads(r2.read()) == {"status": "ok"} and conn.sock is sock
    conn.close()


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_a_body_that_is_not_declared_json_is_415(srv, ctype):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 16})
    headers = {} if ctype is None else {"content-type": ctype}
    r = httpx.post(srv.url + "/v1/completions", content=body.encode(), headers=headers)
    assert r.status_code == 415, r.text
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", content=json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 16,
                                                                   "seed": 0, **X}),
                   headers={"content-type": "application/json; charset=utf-8"}, timeout=30)
    assert r.status_code == 200


def test_405_names_the_allowed_methods(srv):
    for method, path, allow in [("DELETE", "/v1/completions", "POST"), ("GET", "/v1/chat/completions", "POST"),
                                ("POST", "/v1/models", "GET")]:
        r = httpx.request(method, srv.url + path)
        assert r.status_code == 405 and r.headers["allow"] == allow
        assert allow in r.json()["error"]["message"]


def test_429_says_when_to_retry(llm):
    small = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, max_num_seqs=1,
                                 max_waiting=0))
    try:
        with httpx.Client(timeout=30) as http_:
            with http_.stream("POST", small.url + "/v1/completions", json=FOREVER) as r:
                lines = r.iter_lines()
                next(lines)
                r2 = httpx.post(small.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
                assert r2.status_code == 429 and int(r2.headers["retry-after"]) >= 1
                # n larger than the server can ever run at once is a 400, not a 429 to retry forever
                r3 = httpx.post(small.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "n": 2})
                assert r3.status_code == 400 and r3.json()["error"]["param"] == "n"
    finally:
        small.close()


# ---------------------------------------------------------------------------------------------- fields
def test_harmless_stream_fields_without_stream_are_ignored(srv):
    # The document allows them without stream (as OpenAI's does): accepted, and they change nothing.
    for extra in ({"stream_drafts": True}, {"stream_options": {"include_usage": True}}):
        r = post(srv, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "text_completion"


def test_add_generation_prompt_is_honoured_and_bad_template_kwargs_are_plain_400s(srv, llm):
    msgs = [{"role": "user", "content": "Hi"}]
    client = srv.client()
    on = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, seed=0, extra_body=X)
    off = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, seed=0, extra_body=dict(
        X, chat_template_kwargs={"add_generation_prompt": False}))
    want_on = len(llm.tokenizer.encode_chat(msgs, add_generation_prompt=True))
    want_off = len(llm.tokenizer.encode_chat(msgs, add_generation_prompt=False))
    assert (on.usage.prompt_tokens, off.usage.prompt_tokens) == (want_on, want_off) and want_off < want_on
    for kwargs, words in [({"add_generation_prompt": "yes"}, "add_generation_prompt must be a boolean"),
                          ({"messages": []}, "must not set 'messages'"), ([1], "must be an object"),
                          ({"tools": []}, "must not set 'tools': send them in the request's 'tools' field")]:
        r = post(srv, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "chat_template_kwargs": kwargs})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "chat_template_kwargs" and words in err["message"], err
        assert "keyword argument" not in err["message"] and "Input should" not in err["message"]


def test_every_4xx_names_its_param(srv):
    for path, body, status, _ in BAD:
        r = post(srv, path, body)
        assert r.status_code == status
        err = r.json()["error"]
        if path == "/v1/nope":
            continue  # not about the request's content
        assert err["param"], (body, err)
        assert err["message"].startswith(("'", "the ")), err["message"]  # "'field' ..." or "the request body ..."


def test_user_and_metadata_are_accepted(srv):
    r = srv.client().completions.create(model=MODEL, prompt="hi", max_tokens=16, seed=0, user="u-1",
                                        extra_body=dict(X, metadata={"team": "a"}))
    assert r.choices[0].finish_reason in ("stop", "length")
    r = post(srv, "/v1/completions", {"model": MODEL, "prompt": "hi", "metadata": {"k": 5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata.k"


def test_openapi_and_docs_are_served(srv):
    doc = httpx.get(srv.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(doc["paths"])
    ref = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    assert {"messages", "model", "max_denoising_steps", "entropy_bound", "stream_drafts", "n"} <= set(schema["properties"])
    assert "messages" in schema["required"] and "model" in schema["required"]
    r = httpx.get(srv.url + "/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower() and "/openapi.json" in r.text


# ---------------------------------------------------------------------------------------------- n and echo
def test_n_choices_are_independent_canvases_with_derived_seeds(srv):
    client = srv.client()
    one = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=32, seed=5, extra_body=X)
    three = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=32, seed=5, n=3, extra_body=X)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].text == one.choices[0].text  # choice 0 uses the seed itself
    assert len({c.text for c in three.choices}) > 1
    again = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=32, seed=5, n=3, extra_body=X)
    assert [c.text for c in again.choices] == [c.text for c in three.choices]  # reproducible
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    # streaming: each index's deltas add up to its non-streamed text
    chunks = list(client.completions.create(model=MODEL, prompt="Tell me", max_tokens=32, seed=5, n=3,
                                            extra_body=X, stream=True))
    for c in three.choices:
        got = "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == c.index)
        assert got == c.text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=16, seed=1, extra_body=X)
    assert [c.index for c in chat.choices] == [0, 1]
    streamed = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                                   max_tokens=16, seed=1, extra_body=X, stream=True))
    for c in chat.choices:
        sub = [ch for ch in streamed if ch.choices and ch.choices[0].index == c.index]
        assert stream_text(sub) == (c.message.content, c.finish_reason)


def test_echo_returns_the_prompt_before_the_completion(srv):
    client = srv.client()
    plain = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=16, seed=3, extra_body=X)
    echoed = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=16, seed=3, echo=True, extra_body=X)
    assert echoed.choices[0].text == "Echo me" + plain.choices[0].text
    streamed = list(client.completions.create(model=MODEL, prompt="Echo me", max_tokens=16, seed=3, echo=True,
                                              extra_body=X, stream=True))
    assert stream_text(streamed)[0] == echoed.choices[0].text


# ---------------------------------------------------------------------------------------------- the command
def test_an_empty_api_key_is_refused_at_start(ckpt, capsys, monkeypatch, llm):
    with pytest.raises(ValueError, match="API key is empty"):
        build_app(llm, MODEL, api_key="")
    assert cli_main(["serve", ckpt, "--api-key", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "API key" in err and "empty" in err
    monkeypatch.setenv("BLOCKDIFF_API_KEY", "")
    assert cli_main(["serve", ckpt]) == 2


def test_the_served_name_defaults_to_the_checkpoint_folder(ckpt):
    from blockdiff.server.cli import default_model_name

    assert default_model_name(ckpt) == os.path.basename(ckpt.rstrip("/"))
    assert default_model_name(ckpt + "/") == os.path.basename(ckpt.rstrip("/"))
    assert default_model_name("google/diffusiongemma-26B-A4B-it") == "google/diffusiongemma-26B-A4B-it"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _serve_process(ckpt: str, shutdown_grace: float):
    """``blockdiff serve CKPT`` in a subprocess on a free port, one thread: (port, url, the process)."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "blockdiff.cli", "serve", ckpt, "--port", str(port),
                             "--threads", "1", "--shutdown-grace", str(shutdown_grace), "--served-model-name",
                             MODEL, "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    return port, f"http://127.0.0.1:{port}", proc


def test_sigterm_ends_running_streams_with_an_error_event_and_one_log_line(ckpt):
    port, url, proc = _serve_process(ckpt, shutdown_grace=2)
    try:
        assert wait_until(lambda: _up(url), timeout=60), proc.stderr.read() if proc.poll() is not None else ""
        _http10_stream_is_not_chunked(port)
        got: dict[int, list[str]] = {0: [], 1: []}

        def stream(i):
            with httpx.stream("POST", url + "/v1/completions", json=dict(FOREVER, seed=i), timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        got[i].append(line)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert wait_until(lambda: all(len(v) >= 2 for v in got.values()), timeout=30)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    for lines in got.values():
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][6:])
        assert "error" in last and "shutting down" in last["error"]["message"]
    assert "Traceback" not in err, err
    assert sum("grace period" in ln for ln in err.splitlines()) == 1, err
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled


def _http10_stream_is_not_chunked(port: int) -> None:
    """An HTTP/1.0 client gets a stream framed by the connection's end, not chunked (RFC 9112: chunked only to
    HTTP/1.1 requests); with uvicorn's default httptools the chunk sizes landed between the events."""
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                  % len(body) + body)
        raw = b"".join(iter(lambda: s.recv(65536), b""))
    head, _, events = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower(), head
    assert events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n"), events[:80]


def _up(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_metrics_is_valid_prometheus_exposition(srv):
    from prometheus_client.parser import text_string_to_metric_families

    srv.client().completions.create(model=MODEL, prompt="count me", max_tokens=16, seed=0, extra_body=X)
    r = httpx.get(srv.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert fams["blockdiff_requests"].type == "counter" and fams["blockdiff_step_seconds"].type == "histogram"
    buckets = [s.value for s in fams["blockdiff_step_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] >= 1  # cumulative, +Inf last
    done = sum(s.value for s in fams["blockdiff_requests"].samples
               if s.name == "blockdiff_requests_total" and s.labels["outcome"] in ("stop", "length"))
    assert done >= 1



def test_metrics_are_the_documented_ones(srv):
    """docs/serving.md's metrics table lists exactly the families /metrics exposes, with their types, and every
    sample carries the model_name label."""
    import re

    from prometheus_client.parser import text_string_to_metric_families

    srv.client().completions.create(model=MODEL, prompt="count me", max_tokens=16, seed=0, extra_body=X)
    fams = list(text_string_to_metric_families(httpx.get(srv.url + "/metrics").text))
    exposed = {f.name + ("_total" if f.type == "counter" else ""): f.type for f in fams
               if not f.name.endswith("_created")}
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "serving.md")).read()
    section = doc.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(blockdiff_[a-z_]+)", section))
    assert documented == set(exposed), (documented ^ set(exposed))
    assert {n for n, t in exposed.items() if t == "counter"} == {n for n in documented if n.endswith("_total")}
    assert all(s.labels.get("model_name") == MODEL for f in fams for s in f.samples)


@pytest.mark.parametrize("args, words", [
    (["--replicas", "-1"], "--replicas must be >= 1 (or 0, the default"),
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--body-timeout", "0"], "--body-timeout must be a number of seconds > 0, got 0"),
    (["--body-timeout", "inf"], "--body-timeout must be a number of seconds > 0, got inf"),
])
def test_serve_refuses_bad_process_options_in_one_line(tmp_path, capsys, args, words):
    """Checked before anything loads (the checkpoint path need not exist): exit 2 and one line naming the flag."""
    from blockdiff.cli import main as cli_main
    assert cli_main(["serve", str(tmp_path / "never-read"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


@pytest.fixture(scope="module")
def impatient(llm):
    """A server that refuses a body idle for half a second (``--body-timeout``), small for the test."""
    s = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, body_timeout=0.5))
    yield s
    s.close()


def _raw(srv) -> socket.socket:
    host, port = srv.url.rsplit("/", 1)[-1].split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def test_a_body_that_stops_arriving_is_408_and_the_connection_closes(impatient):
    """Slowloris: headers, part of the body, then nothing. Before the idle timeout the connection and its task
    were held forever (the recv below timed out)."""
    body = json.dumps({"model": MODEL, "prompt": "hello"}).encode()
    with _raw(impatient) as s:
        s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                  b"\r\n" % len(body) + body[:5])
        raw = b"".join(iter(lambda: s.recv(65536), b""))  # ends only when the server closes the connection
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"connection: close" in head.lower()
    err = json.loads(payload)["error"]
    assert err["code"] == "body_timeout" and err["param"] == "body" and "after 5 bytes" in err["message"]


def test_a_slow_but_steady_body_is_read_past_the_idle_timeout(impatient):
    """Idle time, not total time: a body sent a few bytes at a time, for longer than the timeout in all, is read."""
    body = json.dumps({"model": MODEL, "prompt": "hello there"}).encode()
    with _raw(impatient) as s:
        s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 8):  # ~7 pieces 0.15 s apart: ~1 s in all, twice the timeout
            time.sleep(0.15)
            s.sendall(body[i:i + 8])
        raw = b"".join(iter(lambda: s.recv(65536), b""))
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    assert json.loads(payload)["count"] > 0


def test_the_body_timeout_must_be_positive(llm):
    for bad in (0, -1, float("nan"), float("inf"), "30", True):
        with pytest.raises(ValueError, match="body_timeout"):
            build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, body_timeout=bad)


def _one_response(s: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (head and Content-Length body) from ``s``: TCP may hand the head and the body
    over in separate reads, and a body left unread would be taken for the next response's start."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, data
        body += chunk
    assert len(body) == length, (head, body)
    return data


def test_a_request_head_that_never_completes_is_closed(llm):
    """uvicorn bounds neither a request head sent a byte at a time nor a connection that sends nothing; serve's
    protocol (``h11_protocol(--body-timeout)``) closes both, and a complete request is served as before."""
    import uvicorn

    from blockdiff.server.head_timeout import h11_protocol

    app = build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=h11_protocol(0.5)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=30)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s, \
                socket.create_connection(("127.0.0.1", port), timeout=20) as silent:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the blank line that ends the head never comes
            assert s.recv(65536) == b""  # closed by the server (a recv timeout without the deadline)
            assert silent.recv(65536) == b""
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            for _ in range(2):  # keep-alive: the deadline is re-armed after each response, not fired mid-request
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _one_response(s).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(15)


def test_a_second_ctrl_c_ends_serve_at_once_in_one_line(ckpt):
    """The first SIGINT drains (a long grace here); the second ends the process with one line. uvicorn's own
    force-quit printed a CancelledError traceback per running request and one for the lifespan."""
    port, url, proc = _serve_process(ckpt, shutdown_grace=600)
    got: list[str] = []

    def stream():
        try:
            with httpx.stream("POST", url + "/v1/completions", json=FOREVER, timeout=60) as r:
                got.extend(line for line in r.iter_lines() if line)
        except httpx.HTTPError:
            got.append("cut")

    try:
        assert wait_until(lambda: _up(url), timeout=60), proc.stderr.read() if proc.poll() is not None else ""
        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert wait_until(lambda: len(got) >= 2, timeout=30)
        proc.send_signal(signal.SIGINT)
        assert wait_until(lambda: not _up(url), timeout=30)  # the first was handled (draining): not coalesced
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # the 600 s grace is not waited for
        t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert err.strip().splitlines()[-1] == "blockdiff: interrupted again: exiting now (1 running request(s) cut off)"
    assert proc.returncode == 130


def _self_signed(tmp_path) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_serve_over_https_with_a_certificate_and_key(ckpt, tmp_path):
    """--ssl-certfile / --ssl-keyfile: the openai client, trusting that certificate, gets answers over HTTPS."""
    import openai

    import ssl

    cert, key = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=cert)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "blockdiff.cli", "serve", ckpt, "--port", str(port),
                             "--threads", "1", "--served-model-name", MODEL, "--log-level", "warning",
                             "--ssl-certfile", cert, "--ssl-keyfile", key], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    url = f"https://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1, verify=trust).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(up, timeout=60), proc.stderr.read() if proc.poll() is not None else ""
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                               http_client=httpx.Client(verify=trust))
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port gets no answer
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert f"on https://127.0.0.1:{port}/v1" in out


@pytest.mark.parametrize("flags, message", [
    (["--ssl-certfile", "CERT"], "--ssl-certfile and --ssl-keyfile go together"),
    (["--ssl-certfile", "CERT", "--ssl-keyfile", "CERT"], "do not load as a PEM certificate chain and its key"),
    (["--ssl-certfile", "MISSING", "--ssl-keyfile", "KEY"], "cannot read"),
    (["--allowed-origins", "http://localhost:3000/"], "no path, no trailing slash"),
])
def test_tls_and_cors_flags_are_checked_before_loading(flags, message, tmp_path, capsys):
    cert, key = _self_signed(tmp_path)
    flags = [{"CERT": cert, "KEY": key, "MISSING": str(tmp_path / "nope.pem")}.get(f, f) for f in flags]
    assert cli_main(["serve", str(tmp_path / "no-such-checkpoint"), "--port", str(_free_port()), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
