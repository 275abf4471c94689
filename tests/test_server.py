"""The OpenAI-compatible server, end to end: the official ``openai`` client (and raw httpx where the wire format
itself is the point) against ``blockdiff.server`` on uvicorn, on a loopback port, over a tiny random checkpoint
with a tokenizer and chat template (canvas 16, 4 denoising steps).

The model runs in fp32, as it does for users, in deterministic mode (``blockdiff serve --deterministic``: per-row
attention, experts and sampling), so "16 concurrent seeded requests equal their solo runs" holds bit for bit. One torch
thread: on a shared 2-core machine, 2 threads on a tiny model spend most of their time waiting for each other.

Two live servers share one loaded model (each with its own ``Engine``): ``main`` (no key, 16 batch slots) and
``small`` (API key, 1 slot, no waiting room) for the key, overload and engine-failure tests.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from blockdiff import LLM
from blockdiff.engine.engine import Engine
from blockdiff.server import build_app
from fixtures import SPECIAL_TOKENS, make_checkpoint

MODEL = "tiny-dg"
KEY = "sekret-key"
X = {"max_denoising_steps": 4}  # extra body fields for every request: keep requests a few ticks long
# A streamed request that runs for ~16k ticks (64 canvases x 256 steps: `serve`'s default cap) unless something
# stops it: tests that hang up after its first canvas need it still running then, on a loaded machine too (at 40
# steps one loaded full-suite run found it finished when the client hung up after its first text).
FOREVER = {"model": MODEL, "prompt": "Go on forever", "max_tokens": 1024, "ignore_eos": True, "stream": True,
           "max_denoising_steps": 256, "stability_threshold": 10_000, "seed": 0}  # never converges early


class LiveServer:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = make_checkpoint(tmp_path_factory.mktemp("serve_ckpt"),
                           generation_config={"max_denoising_steps": 4, "max_new_tokens": 32})
    yield LLM(path, dtype=torch.float32, max_num_seqs=16, deterministic=True)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def main(llm):
    srv = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, max_num_seqs=16))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def small(llm):
    srv = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, api_key=KEY,
                               max_num_seqs=1, max_waiting=0))
    yield srv
    srv.close()


def chat(client, content="Tell me a story.", seed=0, max_tokens=32, **kw):
    extra = dict(X, **kw.pop("extra_body", {}))
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, seed=seed, extra_body=extra, **kw)


def stream_text(chunks) -> tuple[str, str | None]:
    text, reason = "", None
    for ch in chunks:
        if ch.choices:
            c = ch.choices[0]
            text += (c.delta.content or "") if hasattr(c, "delta") else (c.text or "")
            reason = c.finish_reason or reason
    return text, reason


def wait_until(cond, timeout=10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of the sample ``name`` whose labels include ``labels`` ('{outcome="stop"}'); every sample also
    carries model_name."""
    want = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    for m in re.finditer(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        assert have.get("model_name") == MODEL, m.group(0)
        if want.items() <= have.items():
            return float(m.group(2))
    raise AssertionError(f"{name}{labels} not in /metrics")


# ---------------------------------------------------------------------------------------------- basics
def test_health_and_models(main):
    assert httpx.get(main.url + "/health").json() == {"status": "ok"}
    models = main.client().models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_equals_offline_generate(main, llm):
    from blockdiff import SamplingParams

    r = main.client().completions.create(model=MODEL, prompt="The sky is", max_tokens=24, seed=7, extra_body=X)
    off = llm.generate(["The sky is"], SamplingParams(max_new_tokens=24, seed=7, max_denoising_steps=4))[0]
    assert r.choices[0].text == off.text
    assert r.choices[0].finish_reason == off.finish_reason
    assert r.usage.completion_tokens == len(off.token_ids) <= 24
    assert r.usage.prompt_tokens == len(off.prompt_token_ids)


def test_chat_completion_has_message_usage_and_finish_reason(main):
    r = chat(main.client(), seed=1, max_tokens=16)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # a seeded request is reproducible
    assert chat(main.client(), seed=1, max_tokens=16).choices[0].message.content == c.message.content


def test_streaming_equals_non_streaming_for_same_seed(main):
    client = main.client()
    for seed in (3, 4):
        full = chat(client, seed=seed)
        chunks = list(chat(client, seed=seed, stream=True, stream_options={"include_usage": True}))
        text, reason = stream_text(chunks)
        assert text == full.choices[0].message.content
        assert reason == full.choices[0].finish_reason
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        assert all(ch.usage is None for ch in chunks[:-1])
    full = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=32, seed=5, extra_body=X)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=32, seed=5,
                                            extra_body=X, stream=True))
    assert stream_text(chunks) == (full.choices[0].text, full.choices[0].finish_reason)


def test_stop_string_cuts_text_before_it_streaming_and_not(main):
    client = main.client()
    full = chat(client, seed=11, extra_body={"ignore_eos": True}).choices[0].message.content
    # A stop string that first occurs in the second half of the text.
    k = next(i for i in range(len(full) // 2, len(full) - 2) if "\ufffd" not in full[i:i + 2]
             and full.find(full[i:i + 2]) == i)
    stop = full[k:k + 2]
    r = chat(client, seed=11, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == full[:k]
    assert r.choices[0].finish_reason == "stop"
    streamed = stream_text(chat(client, seed=11, stop=[stop], extra_body={"ignore_eos": True}, stream=True))
    assert streamed == (full[:k], "stop")


def test_sixteen_concurrent_seeded_requests_equal_their_solo_runs(main):
    client = main.client()
    # Different prompt lengths, budgets and step counts: the batch mixes requests at different steps.
    reqs = [dict(content="word " * (1 + i % 5), seed=100 + i, max_tokens=16 * (1 + i % 2),
                 extra_body={"max_denoising_steps": 3 + i % 3}) for i in range(16)]

    def run(kw):
        return chat(client, **kw).choices[0].message.content

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, reqs))
    t_together = time.perf_counter() - t0
    solo = [run(kw) for kw in reqs]
    assert together == solo
    assert len(set(solo)) > 1
    print(f"\n16 concurrent: {t_together:.2f} s")


def test_stream_drafts_sends_canvas_events_that_clients_tolerate(main):
    client = main.client()
    full = chat(client, seed=21).choices[0].message.content
    chunks = list(chat(client, seed=21, stream=True, extra_body={"stream_drafts": True}))
    drafts = [ch.model_extra["draft"] for ch in chunks if (ch.model_extra or {}).get("draft")]
    assert len(drafts) >= 2  # 32 tokens = 2 canvases, up to 4 steps each
    for d in drafts:
        assert len(d["token_ids"]) == 16 and len(d["accepted"]) == 16
        assert isinstance(d["text"], str) and d["step"] >= 1 and d["canvas"] in (0, 1)
    assert [d["canvas"] for d in drafts] == sorted(d["canvas"] for d in drafts)
    # The openai client sees drafts as empty deltas: the committed text is unchanged.
    assert stream_text(chunks)[0] == full
    # Raw wire format: plain `data:` events, drafts carry a "draft" object, then [DONE].
    with httpx.stream("POST", main.url + "/v1/completions", json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 16, "seed": 2, "stream": True, "stream_drafts": True,
            **X}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert any("draft" in e for e in events) and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert not any("draft" in e for e in [json.loads(ln[6:]) for ln in _sse_lines(main, stream_drafts=False)])


def _sse_lines(srv, **kw):
    with httpx.stream("POST", srv.url + "/v1/completions", json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 16, "seed": 2, "stream": True, **X, **kw}) as r:
        return [ln for ln in r.iter_lines() if ln and ln != "data: [DONE]"]


# ---------------------------------------------------------------------------------------------- bad input
LONG = list(range(3, 403)) * 6  # 2400 token ids: longer than the 2048-token context
BAD = [
    # (path, body (str = raw bytes), status, words the message must contain)
    ("/v1/completions", "{not json", 400, "not valid JSON"),
    ("/v1/completions", "", 400, "empty"),
    ("/v1/completions", "[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"prompt": "hi"}, 400, "'model' is required"),
    ("/v1/completions", {"model": MODEL}, 400, "'prompt' is required"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model 'gpt-4' does not exist"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model 'gpt-4' does not exist"),
    ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, 404, "model 'gpt-4' does not exist"),
    ("/detokenize", {"model": "gpt-4", "tokens": [1, 2]}, 404, "model 'gpt-4' does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 400, "'prompt' must be a string or an array"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, True]}, 400, "'prompt[1]' must be a token id (an integer), "
     "got a boolean"),
    ("/v1/completions", {"model": MODEL, "prompt": [[5, "a"]]}, 400, "'prompt[1]' must be a token id"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "16"}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "'max_tokens' must be >= 1"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 12}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4000}, 400, "context"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG, "max_tokens": 16}, 400, "prompt is too long"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 99999]}, 400, "prompt token ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "'n' must be >= 1"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 0.001}, 400, "'temperature' must be 0 (greedy)"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "'top_p' must be <= 1"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "'top_p' must be > 0"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": 2.5}, 400, "'top_k' must be an integer"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "min_p": -0.1}, 400, "'min_p' must be >= 0"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": 5, "rng": "reference"}, 400,
     "'top_k' needs rng='default'"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "'logprobs' must be <= 20"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 1, "echo": True}, 400,
     "'logprobs' with 'echo' is not supported"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2.5},
     400, "'top_logprobs' must be an integer"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 30}, 400, "'top_logprobs' must be <= 20"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "'temperature' must be a"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "'stream' must be a boolean"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": 7}, 400, "'stop' must be a string or an array"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": -1}, 400, "'seed'"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_denoising_steps": 0}, 400, "max_denoising_steps"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "entropy_bound": "big"}, 400, "'entropy_bound' must be"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "t_min": 0.9, "t_max": 0.5}, 400, "'t_max' must be greater"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": "yes"}}, 400,
     "'stream_options.include_usage' must be a boolean"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "'messages' is required"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "'messages' must not be empty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "'messages' must be an array"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "'messages[0].role' is 'wizard', which is not a known role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400, "'messages[0].role' is required"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "'messages[0].content' must be a string"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "not all inside its vocabulary"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": -3}, 400, "'max_completion_tokens' must be >= 1"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 3000}]}, 400,
     "prompt is too long"),
    ("/v1/nope", {}, 404, "no route /v1/nope"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}:{b[3][:30]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_openai_error_naming_the_problem(main, path, body, status, words):
    if isinstance(body, str):
        r = httpx.post(main.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(main.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"], err["message"]


def test_explicit_nulls_for_n_stream_and_echo_mean_their_defaults(main):
    # OpenAI's spec marks them nullable, and some clients send every field, null where unset
    r = httpx.post(main.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4, "seed": 0,
                                                       "n": None, "stream": None, "echo": None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1 and body["object"] == "text_completion"
    r = httpx.post(main.url + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "n": None,
                                                            "stream": None, "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text


def test_unknown_model_card_is_the_same_404_as_a_request_for_it(main):
    r = httpx.get(main.url + "/v1/models/gpt-4")
    assert r.status_code == 404
    assert r.json()["error"] == {"message": f"the model 'gpt-4' does not exist; this server serves ['{MODEL}']",
                                 "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


def test_bad_input_through_openai_client_and_server_keeps_serving(main):
    client = main.client()
    with pytest.raises(openai.BadRequestError, match="not a known role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", temperature=3.0)
    r = client.completions.create(model=MODEL, prompt="still alive", max_tokens=16, seed=0, extra_body=X)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(main.url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------- lifecycle
def test_dropped_stream_aborts_the_request_and_frees_it(main):
    eng = main.engine
    aborted = eng.counters.finished["abort"]
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", main.url + "/v1/completions", json=FOREVER) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection as the loop breaks
            for line in lines:
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # got the first canvas; the connection is still open
            assert eng.num_in_flight == 1
            del lines  # hang up
    assert wait_until(lambda: eng.counters.finished["abort"] == aborted + 1 and eng.num_in_flight == 0)
    assert wait_until(lambda: eng.engine.scheduler.num_running == 0 and not eng.engine.has_unfinished())
    m = httpx.get(main.url + "/metrics").text
    assert metric(m, "blockdiff_requests_running") == 0
    assert metric(m, "blockdiff_requests_total", '{outcome="abort"}') >= 1


def test_client_leaving_a_non_streamed_request_aborts_it(main, caplog):
    eng = main.engine
    aborted = eng.counters.finished["abort"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(main.url + "/v1/completions", json=dict(FOREVER, stream=False), timeout=httpx.Timeout(30, read=1))
    assert wait_until(lambda: eng.counters.finished["abort"] == aborted + 1 and eng.num_in_flight == 0)
    gc.collect()  # an unretrieved exception is logged when its future is collected
    time.sleep(0.2)
    # a client that left is routine: no traceback in the server log ("exception was never retrieved")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_api_key_is_required_except_on_health(small):
    assert httpx.get(small.url + "/health").status_code == 200
    head = httpx.head(small.url + "/health")  # load balancers' probes
    assert head.status_code == 200 and head.content == b""
    r = httpx.get(small.url + "/v1/models")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(small.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(small.url + "/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        small.client("wrong").completions.create(model=MODEL, prompt="hi", max_tokens=16)
    assert httpx.get(small.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = small.client(KEY).completions.create(model=MODEL, prompt="hi", max_tokens=16, seed=0, extra_body=X)
    assert r.usage.completion_tokens >= 1


def test_over_capacity_gets_429_and_recovers(small):
    eng = small.engine  # 1 batch slot, no waiting room
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30, headers=auth) as http:
        with http.stream("POST", small.url + "/v1/completions", json=FOREVER) as r:
            lines = r.iter_lines()  # keep it: a dropped iterator closes the connection (and aborts)
            next(lines)
            assert eng.num_in_flight == 1
            with pytest.raises(openai.RateLimitError, match="capacity"):
                small.client(KEY).completions.create(model=MODEL, prompt="hi", max_tokens=16)
    assert wait_until(lambda: eng.num_in_flight == 0)
    r = small.client(KEY).completions.create(model=MODEL, prompt="hi", max_tokens=16, seed=0, extra_body=X)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert metric(httpx.get(small.url + "/metrics", headers=auth).text, "blockdiff_requests_total",
                  '{outcome="rejected"}') >= 1


def test_n_choices_that_do_not_all_fit_are_refused_together(llm):
    """Room for 2, one request in flight, n=2 asked: one 429, counted once as rejected; no choice was admitted
    and then aborted (that counted a client-less abort in /metrics)."""
    srv = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, max_num_seqs=1,
                               max_waiting=1))
    eng = srv.engine
    try:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", srv.url + "/v1/completions", json=FOREVER) as r:
                lines = r.iter_lines()  # keep it: a dropped iterator closes the connection (and aborts)
                next(lines)
                assert eng.num_in_flight == 1
                with pytest.raises(openai.RateLimitError, match="capacity"):
                    srv.client().completions.create(model=MODEL, prompt="hi", max_tokens=16, n=2)
                assert eng.counters.rejected == 1 and eng.num_in_flight == 1
        assert wait_until(lambda: eng.num_in_flight == 0)
        assert eng.counters.finished["abort"] == 1  # the request we left, and no other
        r = srv.client().completions.create(model=MODEL, prompt="hi", max_tokens=16, n=2, seed=0, extra_body=X)
        assert len(r.choices) == 2
    finally:
        srv.close()


def fail_next_tick(core) -> None:
    """The engine's next batched denoise raises (once): batched work no request can be blamed for."""
    real = core._denoise

    def broken(states):
        core._denoise = real
        raise RuntimeError("injected denoise failure")
    core._denoise = broken


def test_engine_failure_fails_the_request_with_500_and_server_keeps_serving(small):
    core = small.engine.engine
    fail_next_tick(core)
    client = small.client(KEY)
    # The exception's text stays in the server log (batched work: it may quote other requests); its type is said.
    with pytest.raises(openai.InternalServerError, match=r"\(RuntimeError in the batched work of its tick"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=16, seed=0, extra_body=X)
    fail_next_tick(core)
    with pytest.raises(openai.APIError, match=r"\(RuntimeError in the batched work"):  # streaming: an error event
        list(client.completions.create(model=MODEL, prompt="hi", max_tokens=16, seed=0, extra_body=X, stream=True))
    assert small.engine.counters.finished["error"] == 2
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=16, seed=0, extra_body=X)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(small.url + "/health").json() == {"status": "ok"}


def test_metrics_exposes_counters(main):
    main.client().completions.create(model=MODEL, prompt="count me", max_tokens=16, seed=0, extra_body=X)
    m = httpx.get(main.url + "/metrics").text
    for name in ("blockdiff_prompt_tokens_total", "blockdiff_generation_tokens_total", "blockdiff_denoise_steps_total",
                 "blockdiff_tokens_per_forward", "blockdiff_requests_waiting", "blockdiff_step_seconds_count",
                 "blockdiff_time_to_first_block_seconds_count"):
        assert metric(m, name) >= 0
    assert metric(m, "blockdiff_generation_tokens_total") > 0 and metric(m, "blockdiff_denoise_steps_total") > 0
    assert metric(m, "blockdiff_requests_total", '{outcome="length"}') + \
        metric(m, "blockdiff_requests_total", '{outcome="stop"}') >= 1
    assert "# TYPE blockdiff_step_seconds histogram" in m


def test_prefix_cache_serves_a_second_chat_turn_exactly(llm, main):
    """Turn 2 of a chat with a long system prompt reuses turn 1's prompt blocks: the official client sees
    usage.prompt_tokens_details.cached_tokens, /metrics counts hits and queries, and the text equals a cold server's.
    In the default (batched) mode: deterministic mode does not reuse prefixes."""
    llm.model.batch_invariant = False
    srv = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer, prefix_cache_bytes=1 << 24), MODEL))
    try:
        system = {"role": "system", "content": "You are a careful assistant. " * 12}
        turn1 = [system, {"role": "user", "content": "Tell me a story."}]
        kw = dict(model=MODEL, max_tokens=32, seed=3, extra_body=X)
        r1 = srv.client().chat.completions.create(messages=turn1, **kw)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "And then?"}]
        warm = srv.client().chat.completions.create(messages=turn2, **kw)
        cold = main.client().chat.completions.create(messages=turn2, **kw)
        assert warm.choices[0].message.content == cold.choices[0].message.content
        cached = warm.usage.prompt_tokens_details.cached_tokens
        assert cached >= r1.usage.prompt_tokens - 16 and cached % 16 == 0
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        m = httpx.get(srv.url + "/metrics").text
        assert metric(m, "blockdiff_prefix_cache_hit_tokens_total") == cached
        assert metric(m, "blockdiff_prefix_cache_query_tokens_total") == r1.usage.prompt_tokens + \
            warm.usage.prompt_tokens
        assert 0 < metric(m, "blockdiff_prefix_cache_bytes") <= metric(m, "blockdiff_prefix_cache_capacity_bytes")
    finally:
        srv.close()
        srv.engine.engine.prefix_cache.clear()
        llm.model.batch_invariant = True


def test_logprobs_through_the_openai_client(main):
    """Chat logprobs/top_logprobs and completions logprobs: one entry per output token, the committed token's
    logprob leading its alternatives (it is its distribution's argmax), streamed entries equal to the whole."""
    client = main.client()
    r = chat(client, seed=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob
        assert e.token == bytes(e.bytes).decode("utf-8", "replace") or e.token.startswith("bytes:")
    streamed = []
    for ch in chat(client, seed=4, logprobs=True, top_logprobs=3, stream=True):
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed += ch.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert chat(client, seed=4).choices[0].logprobs is None  # off unless asked

    c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=32, seed=2, logprobs=2,
                                  extra_body=X)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert all(len(d) <= 2 and max(d.values()) == x for d, x in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_tokenize_token_strs_are_vocabulary_pieces(main, llm):
    """token_strs are the pieces (convert_ids_to_tokens, as vLLM returns them): specials by name, byte tokens
    as their vocabulary symbols, not "" or U+FFFD."""
    r = httpx.post(main.url + "/tokenize", json={"messages": [{"role": "user", "content": "中"}],
                                                 "return_token_strs": True}, timeout=60).json()
    assert r["token_strs"] == [llm.tokenizer.id_to_token(i) for i in r["tokens"]]
    assert r["token_strs"][:2] == ["<bos>", "<|turn>"]
    assert all(s and "\ufffd" not in s for s in r["token_strs"])


def _whole_multibyte(text: str) -> bool:
    return any(ord(ch) > 127 and ch != "\ufffd" for ch in text)


def test_logprobs_bytes_rebuild_split_characters_and_offsets_index_the_text(main):
    """Characters split over byte tokens (these seeds write whole multi-byte characters amid random bytes): chat
    ``bytes`` are each token's raw bytes, so joined they decode to the content, and a partial character's
    ``token`` is ``bytes:\\xNN``; completions ``tokens`` join to the text, ``text_offset`` indexes it, and every
    ``top_logprobs`` dict holds exactly the asked number of entries, streamed or not."""
    specials = set(SPECIAL_TOKENS.values())
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 32,
            "seed": 3, "logprobs": True, "top_logprobs": 5, **X}
    r = httpx.post(main.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    content = r["message"]["content"]
    entries = [e for e in r["logprobs"]["content"] if e["token"] not in specials]
    assert _whole_multibyte(content)
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace") == content
    assert any(e["token"].startswith("bytes:") for e in entries)
    for e in r["logprobs"]["content"]:
        assert len({t["token"] for t in e["top_logprobs"]}) == 5
        for t in e["top_logprobs"] + [e]:
            try:
                assert t["token"] == bytes(t["bytes"]).decode("utf-8")
            except UnicodeDecodeError:
                assert t["token"] == "bytes:" + "".join(f"\\x{b:02x}" for b in t["bytes"])

    body = {"model": MODEL, "prompt": "hi", "max_tokens": 32, "seed": 2, "logprobs": 5, **X}
    c = httpx.post(main.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    lp, text = c["logprobs"], c["text"]
    assert _whole_multibyte(text)
    tokens = [t for t in lp["tokens"] if t not in specials]
    assert "".join(tokens) == text
    assert "" in tokens  # a token that ends inside a character adds no text; the one completing it adds it all
    text_offsets = [off for t, off in zip(lp["tokens"], lp["text_offset"]) if t not in specials]
    assert text_offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    assert all(len(d) == 5 for d in lp["top_logprobs"])
    streamed = {"tokens": [], "text_offset": [], "top_logprobs": []}
    for line in _sse_lines(main, **body, stream=True):
        ch = json.loads(line.removeprefix("data: "))["choices"][0]
        if ch["logprobs"] is not None:
            for k in streamed:
                streamed[k] += ch["logprobs"][k]
    assert streamed == {k: lp[k] for k in streamed}


def test_top_k_top_p_min_p_through_the_openai_client(main):
    """top_k = 1, min_p = 1 and a tiny top_p all draw each accepted position's argmax: the same seeded output;
    neutral values change nothing."""
    client = main.client()

    def text(**kw):
        return client.completions.create(model=MODEL, prompt="Tell me", max_tokens=32, seed=6,
                                         extra_body=dict(X, ignore_eos=True, **kw)).choices[0].text

    assert text(top_k=1) == text(min_p=1.0) == text(top_p=1e-6)
    assert text() == text(top_k=-1) == text(min_p=0.0)  # neutral
    c = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=32, seed=6, top_p=0.5, extra_body=X)
    assert c.choices[0].finish_reason in ("stop", "length")


def test_streamed_completion_logprobs_equal_the_whole_when_the_output_ends_inside_a_character(main):
    """max_tokens can cut the output inside a character: the text ends in U+FFFD and the last token carries it.
    Streamed, the tokens of a character the canvas left incomplete come with the next canvas or the finish, so
    the streamed tokens and offsets equal the non-streamed ones and join to the streamed text."""
    cut = 0
    for seed in range(16):
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 20, "seed": seed, "logprobs": 1, **X}
        whole = httpx.post(main.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        if not whole["text"].endswith("\ufffd"):
            continue
        cut += 1
        streamed, text = {"tokens": [], "text_offset": [], "token_logprobs": []}, ""
        for line in _sse_lines(main, **body, stream=True):
            ch = json.loads(line.removeprefix("data: "))["choices"][0]
            text += ch["text"]
            for k in streamed:
                streamed[k] += (ch["logprobs"] or {}).get(k, [])
        assert text == whole["text"] and streamed == {k: whole["logprobs"][k] for k in streamed}
        assert "".join(streamed["tokens"]) == text
    assert cut >= 2  # the seeds above cut some outputs inside a character
