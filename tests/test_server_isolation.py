"""Through the server, with concurrent requests: a constraint that cannot be admitted is a 400 naming the field
(never a failure inside a tick), and a request that fails inside a tick — its constraint, its sampler row, its
stop check, its non-finite logits, its detokenizer — fails alone (non-streamed: HTTP 500 ``request_failed`` with a
one-line message; streamed: an error event, then ``[DONE]``) while the requests running beside it get their 200s,
bit-identical to their solo runs (deterministic mode)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from blockdiff import LLM
from blockdiff.engine.engine import Engine
from blockdiff.engine.model_state import ModelState
from blockdiff.server import build_app
from blockdiff.server.service import Server
from blockdiff.structured import CanvasConstraint
from fixtures import make_checkpoint
from test_isolation import fail_stop_checks_on_boom
from test_server import LiveServer, wait_until

MODEL = "tiny-dg"
BAD_SEED = 666


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("iso_ckpt"),
                           generation_config={"max_denoising_steps": 4, "max_new_tokens": 32})
    llm = LLM(path, dtype=torch.float32, max_num_seqs=16, deterministic=True)
    s = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL))
    yield s
    s.close()


def body(content: str, seed: int, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 32, "seed": seed,
            "ignore_eos": True, **kw}


def post(url: str, b: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=b, timeout=60)


NOT_ADMITTED = [
    ("structured_outputs", {"grammar": "start: start"}),
    ("structured_outputs", {"grammar": "start: \"a\" start"}),
    ("structured_outputs", {"grammar": "root ::= \"a\" root"}),
    ("structured_outputs", {"grammar": "start: a\na: a \"x\""}),
    ("structured_outputs", {"regex": "a{1000}{1000}"}),
    ("structured_outputs", {"json": {"$ref": "#"}}),
    ("structured_outputs", {"json": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}),
    ("structured_outputs", {"json": {"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}},
                                     "$ref": "#/$defs/A"}}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}),
    ("guided_regex", "a{1000}{1000}"),
]


@pytest.mark.parametrize("field,value", NOT_ADMITTED, ids=[json.dumps(v)[:40] for _, v in NOT_ADMITTED])
def test_constraints_with_no_finite_output_are_400_naming_the_field(srv, field, value):
    b = body("Go", 1, **{field: value})
    del b["ignore_eos"]
    r = post(srv.url, b)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field
    assert "\n" not in err["message"] and "<state>" not in err["message"] and len(err["message"]) < 600
    assert ("no finite output" in err["message"] or "too costly" in err["message"]), err["message"]
    if field in ("response_format", "guided_regex"):
        assert err["message"].startswith(("response_format.json_schema.schema:", "guided_regex:"))


def test_a_legal_recursive_schema_runs_beside_others(srv):
    """A $ref that may recurse but need not: admitted, and it runs without failing anyone."""
    schema = {"type": "object", "properties": {"a": {"$ref": "#"}}}
    with ThreadPoolExecutor(3) as ex:
        futs = [ex.submit(post, srv.url, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                          "max_tokens": 32, "seed": 3, "structured_outputs": {"json": schema}})]
        futs += [ex.submit(post, srv.url, body(f"neighbour {i}", i)) for i in range(2)]
        rs = [f.result() for f in futs]
    assert [r.status_code for r in rs] == [200, 200, 200], [r.text for r in rs]


def _inject(monkeypatch, place: str, victims: dict) -> dict:
    """Make the request with seed BAD_SEED fail at ``place``; returns the extra body fields that request needs."""
    if place == "sampler_row":
        real = ModelState.sampler_row

        def sampler_row(self):
            if self.seed == BAD_SEED and self.step == 1:
                raise RuntimeError("injected sampler failure")
            return real(self)
        monkeypatch.setattr(ModelState, "sampler_row", sampler_row)
        return {}
    if place == "constraint":
        real = CanvasConstraint.step

        def step(self, logits, step, *a, **k):
            if step == 1:
                raise RuntimeError("grammar matcher failed: boom\n<state>\nTokens: internal\n")
            return real(self, logits, step, *a, **k)
        monkeypatch.setattr(CanvasConstraint, "step", step)
        return {"structured_outputs": {"regex": "[a-z ]{1,200}"}, "ignore_eos": False}
    if place == "stop_check":
        fail_stop_checks_on_boom(monkeypatch)
        return {"stop": ["BOOM"]}
    if place == "detokenizer":
        real = Server.text_stream

        class Broken:
            def push(self, ids):
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

            def finish(self):
                return ""

        def text_stream(self, params):
            return Broken() if "DETOK" in (params.stop or []) else real(self, params)
        monkeypatch.setattr(Server, "text_stream", text_stream)
        return {"stop": ["DETOK"]}
    if place == "non_finite":
        real_make, real_denoise = Engine.make_state, type(victims["model"]).denoise

        def make_state(self, *a, **k):
            s = real_make(self, *a, **k)
            if s.seed == BAD_SEED:
                victims["caches"].append(s.cache)
            return s

        def denoise(self, canvas, cache, *a, **k):
            out = real_denoise(self, canvas, cache, *a, **k)
            for b, seq in enumerate(cache.seqs):
                if any(seq is c for c in victims["caches"]):
                    out[b] = float("nan")
            return out
        monkeypatch.setattr(Engine, "make_state", make_state)
        monkeypatch.setattr(type(victims["model"]), "denoise", denoise)
        return {}
    raise AssertionError(place)


PLACES = ["sampler_row", "constraint", "stop_check", "detokenizer", "non_finite"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("place", PLACES)
def test_a_request_failing_inside_a_tick_fails_alone(srv, monkeypatch, place, stream):
    neighbours = [body(f"neighbour number {i}", 10 + i) for i in range(4)]
    solo = [post(srv.url, b).json()["choices"][0]["message"]["content"] for b in neighbours]
    extra = _inject(monkeypatch, place, {"model": srv.engine.engine.model, "caches": []})
    bad = dict(body("the bad request", BAD_SEED), **extra, stream=stream)
    with ThreadPoolExecutor(5) as ex:
        futs = [ex.submit(post, srv.url, b) for b in neighbours[:2] + [bad] + neighbours[2:]]
        rs = [f.result() for f in futs]
    bad_r = rs.pop(2)
    for r, want in zip(rs, solo):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
    if stream:
        assert bad_r.status_code == 200
        events = [ln[6:] for ln in bad_r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
    else:
        assert bad_r.status_code == 500, bad_r.text
        err = bad_r.json()["error"]
    assert err["code"] == "request_failed", err
    assert err["message"].startswith("this request failed:") and "\n" not in err["message"]
    assert "<state>" not in err["message"] and "internal" not in err["message"]
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize("max_tokens", [400, 16], ids=["running", "last_canvas"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_request_failing_in_the_server_counts_as_an_error_in_metrics(srv, monkeypatch, stream, max_tokens):
    """The detokenizer fails on the server's side: /metrics says error (the client got a 500 / an error event),
    not abort (which reads as a client that left), and not stop/length either. ``last_canvas``: one canvas of 16,
    so the engine had already finished the request (done) when the server failed to detokenize its only block."""
    counters = srv.engine.counters
    before = dict(counters.finished)
    extra = _inject(monkeypatch, "detokenizer", {})
    r = post(srv.url, dict(body("the bad request", BAD_SEED, max_tokens=max_tokens), **extra, stream=stream))
    assert ("request_failed" in r.text) and r.status_code == (200 if stream else 500)
    assert wait_until(lambda: not srv.engine.num_in_flight, timeout=30)
    assert counters.finished["error"] == before["error"] + 1
    assert {k: counters.finished[k] for k in ("abort", "stop", "length")} == \
        {k: before[k] for k in ("abort", "stop", "length")}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_failed_choice_fails_its_finished_siblings_in_metrics(srv, monkeypatch, stream):
    """n = 2, choice 1 fails at its last denoising step, when choice 0 (one canvas, like it) has finished in the
    engine: the response failed, so /metrics counts both choices as errors (docs/serving.md), none as a success."""
    from blockdiff.server.protocol import choice_seed

    bad_seed, real = choice_seed(7, 1), ModelState.sampler_row

    def sampler_row(self):
        if self.seed == bad_seed and self.step == 3:  # its 4th and last step (max_denoising_steps 4)
            raise RuntimeError("injected sampler failure")
        return real(self)
    monkeypatch.setattr(ModelState, "sampler_row", sampler_row)
    counters = srv.engine.counters
    before = dict(counters.finished)
    r = post(srv.url, body("two choices", 7, max_tokens=16, n=2, max_denoising_steps=4, stream=stream))
    assert "request_failed" in r.text and r.status_code == (200 if stream else 500), r.text
    assert wait_until(lambda: not srv.engine.num_in_flight, timeout=30)
    assert {k: counters.finished[k] - before[k] for k in ("stop", "length", "abort", "error")} == \
        {"stop": 0, "length": 0, "abort": 0, "error": 2}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_response_that_fails_to_be_built_counts_as_an_error_in_metrics(srv, monkeypatch, stream):
    """The engine finished the request but writing its response failed (a bug there: the client gets a 500 or an
    error event): /metrics counts an error, not the engine's stop/length."""
    import blockdiff.server.service as service

    def usage(*a, **k):
        raise RuntimeError("injected failure while writing the response")
    monkeypatch.setattr(service, "usage", usage)
    counters = srv.engine.counters
    before = dict(counters.finished)
    r = post(srv.url, body("a response that fails", 5, max_tokens=16, stream=stream,
                           stream_options={"include_usage": True} if stream else None))
    assert r.status_code == (200 if stream else 500) and "injected failure" in r.text, r.text
    assert wait_until(lambda: not srv.engine.num_in_flight, timeout=30)
    assert {k: counters.finished[k] - before[k] for k in ("stop", "length", "abort", "error")} == \
        {"stop": 0, "length": 0, "abort": 0, "error": 1}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_requests_ended_by_shutdown_count_as_aborts(srv, stream):
    """docs/serving.md: requests still running when the shutdown grace runs out are ended (a 503 / an error
    event) and /metrics counts them as abort (shutdown), not as errors."""
    core = srv.engine.engine
    own = LiveServer(build_app(Engine(core.model, core.defaults, core.tokenizer), MODEL))
    try:
        counters = own.engine.counters
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(post, own.url, body("a long one", 1, max_tokens=1000, max_denoising_steps=50,
                                                stream=stream))
            assert wait_until(lambda: own.engine.num_running == 1, timeout=30)
            own.app.state.server.begin_drain(0.2)
            r = fut.result()
        assert "engine_stopped" in r.text and r.status_code == (200 if stream else 503), r.text
        assert wait_until(lambda: not own.engine.num_in_flight, timeout=30)
        assert {k: counters.finished[k] for k in ("stop", "length", "abort", "error")} == \
            {"stop": 0, "length": 0, "abort": 1, "error": 0}
    finally:
        own.close()


def _answer(url: str, path: str, b: dict):
    """Each choice's text (and logprobs), streamed or not; a status code for a refused request; "left" for a stream
    the client drops after its first chunk."""
    if b.get("leave"):
        with httpx.stream("POST", url + path, json={k: v for k, v in b.items() if k != "leave"}, timeout=60) as r:
            next(ln for ln in r.iter_lines() if ln.startswith("data: "))
        return "left"
    if b.get("stream"):
        out = {}
        with httpx.stream("POST", url + path, json=b, timeout=60) as r:
            for ln in r.iter_lines():
                if ln.startswith("data: ") and ln != "data: [DONE]":
                    for c in json.loads(ln[6:])["choices"]:
                        text = c["text"] if "text" in c else (c.get("delta") or {}).get("content")
                        out[c["index"]] = out.get(c["index"], "") + (text or "")
        return [out[i] for i in sorted(out)]
    r = httpx.post(url + path, json=b, timeout=60)
    if r.status_code != 200:
        return r.status_code
    return [(c.get("text", (c.get("message") or {}).get("content")), c.get("logprobs")) for c in r.json()["choices"]]


def test_a_mixed_batch_with_failing_and_leaving_neighbours_equals_each_solo_run(srv):
    # The promise of --deterministic as users meet it: requests of every kind (n choices, streamed, chat and
    # completions, constrained, logprobs, truncation, penalties, fast, the reference rng), each bit-identical to its
    # solo run while batched beside each other, beside a stream its client drops and beside refused requests.
    chat, comp = "/v1/chat/completions", "/v1/completions"
    c = {"model": MODEL, "max_tokens": 32, "max_denoising_steps": 3}
    good = [(comp, dict(c, prompt="one", seed=1, n=2)),
            (chat, dict(c, messages=[{"role": "user", "content": "two two"}], seed=2, stream=True)),
            (comp, dict(c, prompt="three " * 5, seed=3, logprobs=2, top_k=5, temperature=0.7)),
            (chat, dict(c, messages=[{"role": "user", "content": "four"}], seed=4,
                        response_format={"type": "json_object"})),
            (comp, dict(c, prompt="five five", seed=5, fast=True, presence_penalty=1.0, ignore_eos=True)),
            (comp, dict(c, prompt="six", seed=6, rng="reference", max_tokens=16))]
    bad = [(comp, dict(c, prompt="leave", seed=7, max_tokens=512, ignore_eos=True, stream=True, leave=True)),
           (comp, dict(c, prompt="word " * 3000, seed=8)),  # longer than the context: 400
           (comp, dict(c, prompt="cold", seed=9, t_max=1e-300))]  # its logits would overflow: 400
    solo = [_answer(srv.url, p, b) for p, b in good]
    with ThreadPoolExecutor(len(good) + len(bad)) as ex:
        futs = [ex.submit(_answer, srv.url, p, b) for p, b in good[:3] + bad + good[3:]]
        got = [f.result() for f in futs]
    assert got[3:6] == ["left", 400, 400]
    assert got[:3] + got[6:] == solo
    assert len(solo[0]) == 2 and solo[0][0] != solo[0][1] and solo[2][0][1] is not None


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_the_other_choices_of_a_failed_response_count_as_errors_not_client_aborts(srv, monkeypatch, stream):
    """n = 2 and choice 0 fails inside a tick: the response fails (a 500 / an error event) and the server ends choice
    1 with it; /metrics counts both as errors ("abort" reads as a client that left or stopped)."""
    counters = srv.engine.counters
    before = dict(counters.finished)
    _inject(monkeypatch, "sampler_row", {})  # the choice whose seed is BAD_SEED: choice 0
    r = post(srv.url, body("the bad request", BAD_SEED, max_tokens=400, n=2, stream=stream))
    assert "request_failed" in r.text and r.status_code == (200 if stream else 500)
    assert wait_until(lambda: not srv.engine.num_in_flight, timeout=30)
    assert counters.finished["error"] == before["error"] + 2
    assert counters.finished["abort"] == before["abort"]
