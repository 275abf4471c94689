"""One LLM served (``build_app(llm)``) and called directly (``llm.generate``) at the same time: both drive the same
engine, one tick at a time (``Engine.lock``), and in deterministic mode each request's output equals its solo run.
Also ``LLM.generate`` with a different ``SamplingParams`` per prompt."""

import json
import threading
import time

import httpx
import pytest
import torch

from blockdiff import LLM, SamplingParams
from blockdiff.engine.engine import Engine, model_lock
from blockdiff.server import build_app
from test_server import LiveServer

MODEL = "tiny-dg"
STEPS = {"max_denoising_steps": 3}
# A long stream (8 canvases of 16, 3 steps each): the direct calls below run while it is in flight.
LONG = {"model": MODEL, "prompt": "Go on", "max_tokens": 128, "seed": 5, "ignore_eos": True, **STEPS}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype="float32", device="cpu", deterministic=True)


@pytest.fixture(scope="module")
def served(llm):
    srv = LiveServer(build_app(llm, MODEL))
    yield llm, srv
    srv.close()


def _stream_text(srv, body, started: threading.Event) -> str:
    parts = []
    with httpx.stream("POST", srv.url + "/v1/completions", json=dict(body, stream=True), timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                parts.append(chunk["choices"][0]["text"])
                started.set()
    return "".join(parts)


def test_direct_generate_while_the_same_llm_serves_a_stream(served):
    # Both used to call engine.step() on one scheduler from two threads: the direct call raised (a TypeError on a
    # None canvas) or failed requests of the stream, and outputs were wrong.
    _direct_beside_a_stream(*served)


def test_direct_generate_while_another_engine_over_the_same_model_serves(llm):
    # Two engines over one model (its KV pool and buffers) ticked at once from two threads.
    srv = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL))
    try:
        _direct_beside_a_stream(llm, srv)
    finally:
        srv.close()


def test_engines_over_one_model_share_one_tick_lock(llm):
    # The model's KV pool reallocates a layer's storage when it grows: a tick of another engine holding the old
    # tensor would write its keys where nobody reads them. Engines over one model tick one at a time.
    other = Engine(llm.model, llm.defaults, llm.tokenizer)
    assert other.lock is llm.engine.lock
    assert model_lock(torch.nn.Linear(1, 1)) is not llm.engine.lock  # another model ticks on its own


def _direct_beside_a_stream(llm, srv):
    params = [SamplingParams(max_new_tokens=32, seed=s, ignore_eos=True, **STEPS) for s in (1, 2)]
    solo_http = httpx.post(srv.url + "/v1/completions", json=LONG, timeout=120).json()["choices"][0]["text"]
    solo = [[o.token_ids for o in llm.generate(["hello", "a longer prompt here"], p)] for p in params]

    started, got = threading.Event(), {}
    t = threading.Thread(target=lambda: got.update(text=_stream_text(srv, LONG, started)))
    t.start()
    assert started.wait(60)
    events = []
    direct = [[o.token_ids for o in llm.generate(["hello", "a longer prompt here"], p, on_event=events.append)]
              for p in params]
    t.join(120)
    assert direct == solo
    assert got["text"] == solo_http
    assert sum(ev.kind == "done" for ev in events) == 4  # the direct call's callbacks, whichever thread ran them
    deadline = time.monotonic() + 10  # the stream's last tick may still be collecting its finished request
    while llm.engine.has_unfinished():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_generate_from_a_callback_run_by_the_server_thread_raises_not_deadlocks(served):
    # A direct call's on_event may run on the server's engine thread; calling generate from it must still fail that
    # request (not wait for the call it is part of).
    llm, srv = served
    started = threading.Event()
    t = threading.Thread(target=lambda: _stream_text(srv, LONG, started))
    t.start()
    assert started.wait(60)

    def again(ev):
        if ev.kind == "block" and ev.request_index == 0:
            llm.generate("x", SamplingParams(max_new_tokens=16, **STEPS))

    outs = llm.generate(["a", "b"], SamplingParams(max_new_tokens=32, seed=3, **STEPS), on_event=again)
    t.join(120)
    assert outs[0].finish_reason == "error" and "on_event" in outs[0].error
    assert outs[1].finish_reason == "length"


def test_generate_with_one_sampling_params_per_prompt_equals_each_alone(served):
    llm, _ = served
    prompts = ["one", "two two", "three three three"]
    params = [SamplingParams(max_new_tokens=16, seed=4, **STEPS),
              SamplingParams(max_new_tokens=32, seed=9, temperature=0.5, top_k=5, max_denoising_steps=2),
              SamplingParams(max_new_tokens=16, seed=4, stop_token_ids=[7], logprobs=2, **STEPS)]
    together = llm.generate(prompts, params)
    alone = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.logprobs for o in together] == [o.logprobs for o in alone]
    assert together[2].logprobs is not None and together[0].logprobs is None
    assert len(together[1].token_ids) <= 32 and len(together[0].token_ids) <= 16
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate(prompts, params[:2])


def test_greedy_choices_without_a_seed_are_the_choices_of_seed_0(served):
    # temperature 0 seeds an unseeded request with 0, but its choices 1.. stayed unseeded and were each seeded 0 too:
    # n copies of choice 0, unlike the same request with seed 0 (whose choices mix the seed with their index).
    _, srv = served

    def texts(**kw):
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x y", "max_tokens": 16, "n": 3,
                                                          "temperature": 0, **STEPS, **kw}, timeout=60)
        return [c["text"] for c in r.json()["choices"]]
    assert texts() == texts(seed=0)
    assert len(set(texts())) == 3
