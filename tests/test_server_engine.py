"""``AsyncEngine`` on its own (no HTTP): the thread sleeps when idle, abort frees a request, admission refuses
beyond capacity, a failed tick fails only the requests it ran, shutdown fails what is left in flight."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from blockdiff import SamplingParams
from blockdiff.engine.async_engine import (AsyncEngine, EngineFailedError, EngineOverloadedError,
                                           EngineStoppedError)
from blockdiff.engine.engine import Engine

PROMPT = [2, 10, 11, 12]


def short(seed=0):
    return SamplingParams(max_new_tokens=16, max_denoising_steps=2, seed=seed)


def long():  # hundreds of ticks: never finishes within a test
    return SamplingParams(max_new_tokens=1024, max_denoising_steps=40, stability_threshold=10_000,
                          ignore_eos=True, seed=0)


@pytest.fixture
def make(tiny_model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    made = []

    def build(max_num_seqs=4, max_waiting=None):
        ae = AsyncEngine(Engine(tiny_model, max_num_seqs=max_num_seqs), max_waiting=max_waiting).start()
        made.append(ae)
        return ae
    yield build
    for ae in made:
        ae.shutdown()
    torch.set_num_threads(threads)


async def drain(stream):
    return [ev async for ev in stream]


def test_idle_engine_thread_sleeps_and_wakes_on_submit(make):
    ae = make()

    async def main():
        await asyncio.sleep(0.1)
        assert ae.counters.ticks == 0  # no work, no ticks (it waits on a condition)
        evs = await drain(ae.submit(PROMPT, short(), "a"))
        assert [e.kind for e in evs] == ["block", "done"]
        await asyncio.sleep(0.05)  # the tick that emitted "done" is still counting itself
        ticks = ae.counters.ticks
        await asyncio.sleep(0.2)
        assert ae.counters.ticks == ticks and ae.num_in_flight == 0
    asyncio.run(main())


def test_abort_ends_the_stream_and_frees_the_cache(make):
    ae = make()

    async def main():
        rs = ae.submit(PROMPT, long(), "a")
        assert (await rs.__anext__()).kind == "block"
        ae.abort("a")
        evs = await drain(rs)
        assert evs[-1].kind == "done" and evs[-1].finish_reason == "abort"
        assert rs.state.cache is None and rs.state.finished
        assert ae.num_in_flight == 0 and ae.counters.finished["abort"] == 1
    asyncio.run(main())


def test_admission_refuses_beyond_running_plus_waiting(make):
    ae = make(max_num_seqs=1, max_waiting=1)

    async def main():
        a = ae.submit(PROMPT, long(), "a")
        ae.submit(PROMPT, long(), "b")
        with pytest.raises(EngineOverloadedError, match="capacity"):
            ae.submit(PROMPT, short(), "c")
        with pytest.raises(ValueError, match="already in flight"):
            ae.submit(PROMPT, short(), "a")
        with pytest.raises(ValueError, match="max_denoising_steps"):
            ae.submit(PROMPT, _bad_params(), "d")
        assert ae.counters.rejected == 1
        ae.abort("a")
        ae.abort("b")
        await drain(a)
    asyncio.run(main())


def _bad_params() -> SamplingParams:
    p = short()
    p.max_denoising_steps = 0  # set after construction: the engine's own validation must catch it
    return p


def test_failed_tick_fails_running_requests_only_and_engine_keeps_serving(make):
    ae = make(max_num_seqs=1)
    core = ae.engine
    real = core._denoise

    def broken(states):
        core._denoise = real
        raise RuntimeError("injected: the token ids or text of a request of another tenant")

    async def main():
        core._denoise = broken
        a = ae.submit(PROMPT, short(1), "a")  # runs (and fails) first
        b = ae.submit(PROMPT, short(2), "b")  # waits for the slot: untouched by the failure
        with pytest.raises(EngineFailedError, match=r"\(RuntimeError in the batched work of its tick") as got:
            await drain(a)
        assert "another tenant" not in str(got.value)  # batched work's exception text stays in the log
        assert a.state.cache is None
        evs = await drain(b)
        assert evs[-1].finish_reason in ("stop", "length")
        assert ae.counters.finished["error"] == 1 and ae.healthy
    asyncio.run(main())


def test_shutdown_fails_requests_in_flight(make):
    ae = make()

    async def main():
        rs = ae.submit(PROMPT, long(), "a")
        await rs.__anext__()
        t0 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, ae.shutdown)
        assert time.perf_counter() - t0 < 5
        with pytest.raises(EngineStoppedError):
            await drain(rs)
        with pytest.raises(EngineStoppedError):
            ae.submit(PROMPT, short(), "b")
        assert not ae.healthy
    asyncio.run(main())


def test_idle_engine_thread_keeps_no_finished_request_alive(make):
    """Found under load: the idle engine thread kept the last tick's submitted ``ModelState`` (and through its
    ``on_event`` closure its ``RequestStream``, event queue, constraint and per-request device tensors) alive in
    the locals of its loop until the next request came. Once a request is done and its stream dropped, nothing
    of it may stay reachable while the server idles."""
    import gc
    import weakref

    ae = make()

    async def main():
        rs = ae.submit(PROMPT, short(), "a")
        evs = await drain(rs)
        assert evs[-1].kind == "done"
        return weakref.ref(rs.state), weakref.ref(rs)
    state, stream = asyncio.run(main())
    deadline = time.time() + 5
    while (state() is not None or stream() is not None) and time.time() < deadline:
        gc.collect()
        time.sleep(0.02)
    assert state() is None and stream() is None, "a finished request is still reachable from the idle engine"
    assert ae.healthy
