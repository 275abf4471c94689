"""``AsyncEngine``: the ``Engine`` on one background thread, fed from asyncio (the server's event loop).

Contract:
- One engine thread runs ticks while there is work and sleeps on a condition otherwise (no busy-wait).
- ``submit`` and ``abort`` are thread-safe: they only queue work; the engine thread applies it at the start of a
  tick. Once submitted, a ``ModelState`` is touched by the engine thread only.
- Each request's events reach its ``RequestStream`` (an async iterator) through ``loop.call_soon_threadsafe``.
- Admission: at most ``max_num_seqs`` requests run and ``max_waiting`` more wait; beyond that ``submit`` raises
  ``EngineOverloadedError`` (HTTP 429) instead of queueing without bound.
- A request that fails alone inside a tick (``Engine``: its constraint, sampler row, stop check, image,
  non-finite logits) ends with ``RequestFailedError`` on its stream; the tick goes on for the others. A tick that
  raises anyway (a bug in batched work) fails the requests it was running with ``EngineFailedError`` (HTTP 500);
  the thread keeps serving the others. A model that can run nothing more (a split model that lost a rank: its
  ``failure``) stops the thread: what is in flight fails with ``EngineStoppedError``, ``healthy`` turns False
  (``/health`` 503) and ``submit`` refuses. ``shutdown`` fails whatever is still in flight with ``EngineStoppedError``
  (HTTP 503).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import Histogram

from ..sampling.params import SamplingParams
from .engine import Engine
from .model_state import Event, ModelState

log = logging.getLogger("blockdiff.engine")


class EngineOverloadedError(RuntimeError):
    """Too many requests in flight: retry later (HTTP 429)."""


class EngineFailedError(RuntimeError):
    """The engine raised while running this request (HTTP 500)."""


class RequestFailedError(EngineFailedError):
    """This request alone failed inside a tick (its constraint, sampler row, stop check, image, non-finite
    logits): its neighbours ran on. The message is one line naming what failed (HTTP 500 / an error event;
    ``by_input``: its own constraint failed it, HTTP 400)."""

    def __init__(self, message: str, by_input: bool = False):
        super().__init__(message)
        self.by_input = by_input


class EngineStoppedError(EngineFailedError):
    """The engine is shutting down or stopped (HTTP 503)."""


# ---------------------------------------------------------------------------------------------- counters
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    # registry=None: each engine's histograms are its own; the server's /metrics collector exposes them per app.
    return Histogram(name, doc, buckets=buckets, registry=None)


@dataclass
class Counters:
    """Written by the engine thread (``finished`` and ``rejected`` also by the server's loop, under the engine's
    lock: a held request's outcome is settled by its caller, ``AsyncEngine.release``); read by /metrics."""

    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0, "error": 0})
    rejected: int = 0  # refused at admission (overload)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    denoise_steps: int = 0  # decoder forwards, one per request per step
    canvases: int = 0
    ticks: int = 0
    step_seconds: Histogram = field(default_factory=lambda: _histogram(
        "blockdiff_step_seconds", "Engine tick latency.", STEP_BUCKETS))
    time_to_first_block: Histogram = field(default_factory=lambda: _histogram(
        "blockdiff_time_to_first_block_seconds", "Arrival to first committed canvas.", LATENCY_BUCKETS))
    request_seconds: Histogram = field(default_factory=lambda: _histogram(
        "blockdiff_request_seconds", "Arrival to finish.", LATENCY_BUCKETS))

    @property
    def tokens_per_forward(self) -> float:
        return self.generation_tokens / self.denoise_steps if self.denoise_steps else 0.0

    def record(self, state: ModelState) -> None:
        """An engine request that ended: its tokens, steps and latencies (its outcome: ``count``)."""
        m = state.metrics
        self.prompt_tokens += m.prompt_tokens
        self.generation_tokens += len(state.output_ids)
        self.denoise_steps += m.denoise_steps
        self.canvases += m.canvases
        if m.time_to_first_block is not None:
            self.time_to_first_block.observe(m.time_to_first_block)
        self.request_seconds.observe(m.seconds)

    def count(self, outcome: str) -> None:  # under AsyncEngine._cond (the engine thread and the loop both count)
        self.finished[outcome] = self.finished.get(outcome, 0) + 1


# ---------------------------------------------------------------------------------------------- streams
class RequestStream:
    """Async iterator over one request's events: ``draft`` (only with ``stream_drafts``), ``block``…, ``done``.

    Raises ``EngineFailedError`` instead of ``done`` when the engine failed the request. ``state`` may be read
    once ``done`` arrived (the engine thread no longer touches it)."""

    def __init__(self, state: ModelState, loop: asyncio.AbstractEventLoop, held: bool = False):
        self.state = state
        self.request_id = state.request_id
        self.finished = False
        # held: its caller settles its outcome (``AsyncEngine.release``): a request the engine finished (stop,
        # length) can still fail in the caller (its output not detokenized, another choice of its response
        # failed), and /metrics must then count it as an error, not as a success. ``pending``: that outcome,
        # finished by the engine and not yet settled; ``released``: the caller is done with it.
        self.held = held
        self.pending: str | None = None
        self.released = False
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def _put(self, item: Event | BaseException) -> None:  # any thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.kind == "done":
            self.finished = True
        return item


# ---------------------------------------------------------------------------------------------- the engine
class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = 4 * engine.scheduler.max_num_seqs if max_waiting is None else max_waiting
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        self.counters = Counters()
        self.num_running = 0  # published by the engine thread after each tick
        self.num_waiting = 0
        self._cond = threading.Condition()
        self._failed_aborts: set[str] = set()  # aborted because they failed server-side: counted as errors
        self._adds: list[ModelState] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}  # submitted and not finished
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None

    # ------------------------------------------------------------------ properties
    @property
    def deterministic(self) -> bool:
        """Seeded outputs bit-identical alone or batched (``LLM(..., deterministic=True)``, ``serve --deterministic``)."""
        return self.engine.deterministic

    @property
    def max_num_seqs(self) -> int:
        return self.engine.scheduler.max_num_seqs

    @property
    def capacity(self) -> int:
        return self.max_num_seqs + self.max_waiting

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def healthy(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stopping
                and self._model_failure() is None)

    def _model_failure(self) -> str | None:
        """Why the model can run nothing more: a split model that lost a rank (``LeaderModel.failure``)."""
        return getattr(self.engine.model, "failure", None)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "AsyncEngine":
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="blockdiff-engine", daemon=True)
                self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop after the current tick; requests still in flight fail with ``EngineStoppedError``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None:
            self._fail_all(EngineStoppedError("the engine was shut down"))

    # ------------------------------------------------------------------ client side (any thread)
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, images=None,
               held: bool = False) -> RequestStream:
        """Validate and queue a request; call from a running event loop. Raises ``ValueError`` (bad request),
        ``EngineOverloadedError`` (full) or ``EngineStoppedError``. ``held``: the caller settles the request's
        outcome in /metrics with ``release`` (a stop or length is counted then, as an error if the caller failed
        it); otherwise it is counted when the engine ends it."""
        loop = asyncio.get_running_loop()
        self.start()
        holder: list[RequestStream] = []
        drafts = bool(params.stream_drafts)

        def on_event(ev: Event) -> None:  # engine thread
            if ev.kind == "draft" and not drafts:
                return
            stream = holder[0]
            if ev.kind == "done":
                with self._cond:
                    self._streams.pop(stream.request_id, None)
                    failed = stream.request_id in self._failed_aborts
                    self._failed_aborts.discard(stream.request_id)
                    # failed by its caller (even where it finished in the tick that applied the abort): an error
                    outcome = "error" if failed else ev.finish_reason or "abort"
                    if stream.held and not stream.released and outcome in ("stop", "length"):
                        stream.pending, outcome = outcome, None  # the caller may still fail it: release counts it
                    else:
                        self.counters.count(outcome)
                self.counters.record(stream.state)
                if ev.finish_reason == "error":  # it failed alone: its stream raises, the others run on
                    stream._put(RequestFailedError(f"this request failed: {ev.error}", by_input=ev.error_by_input))
                    return
            stream._put(ev)

        # Validates params and prompt (ValueError) and builds the state before anything is queued.
        state = self.engine.make_state(prompt_ids, params, on_event=on_event, request_id=request_id, images=images)
        stream = RequestStream(state, loop, held=held)
        holder.append(stream)
        with self._cond:
            failure = self._dead or self._model_failure()
            if self._stopping or failure is not None:
                raise EngineStoppedError("the engine is not running" + (f" (it failed: {failure})"
                                                                         if failure else ""))
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._check_room(1)
            self._streams[request_id] = stream
            self._adds.append(state)
            self._cond.notify()
        return stream

    def check_room(self, n: int) -> None:
        """Raise ``EngineOverloadedError`` (counted once as ``rejected``) unless ``n`` more requests fit now. The
        server calls it before submitting a request's ``n`` choices, so they are refused together rather than
        partly admitted and then aborted (which /metrics would count as aborts)."""
        with self._cond:
            self._check_room(n)

    def _check_room(self, n: int) -> None:  # under self._cond
        if len(self._streams) + n > self.capacity:
            self.counters.rejected += 1
            raise EngineOverloadedError(
                f"the server is at capacity ({len(self._streams)} requests in flight: {self.max_num_seqs} "
                f"running + {self.max_waiting} waiting); retry later")

    def abort(self, request_id: str, failed: bool = False) -> None:
        """Cancel a request (its stream ends with a ``done`` event, finish_reason ``abort``); no-op when done.
        ``failed``: the caller ends it because it failed on the caller's side (the server could not detokenize its
        output): /metrics counts it as ``error``, not as an ``abort`` (a client that left)."""
        with self._cond:
            if request_id in self._streams:
                self._aborts.append(request_id)
                if failed:
                    self._failed_aborts.add(request_id)
                self._cond.notify()

    def release(self, stream: RequestStream, failed: bool = False) -> None:
        """The caller is done with a request (its response was sent, failed, or its client left): abort it if it
        still runs, and count a ``held`` request's outcome: its engine outcome, or ``error`` when ``failed``. The
        first call decides; later ones do nothing."""
        with self._cond:  # one step with the abort: a done between them would count a failed request as a success
            if stream.released:
                return
            stream.released = True
            if stream.pending is not None:
                self.counters.count("error" if failed else stream.pending)
                stream.pending = None
            self.abort(stream.request_id, failed=failed)  # (the condition's lock is reentrant)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._adds or self._aborts or self.engine.has_unfinished()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                self._apply_and_tick(adds, aborts)
                adds = aborts = None  # held while this thread idles, they would keep finished requests alive
                self._publish()
                failure = self._model_failure()
                if failure is not None:  # every later tick would fail too: stop, and /health says so (503)
                    log.error("engine stopped: %s", failure)
                    self._dead = RuntimeError(failure)
                    break
        except BaseException as e:  # a bug in this loop: fail everyone rather than hang them
            log.exception("engine thread died")
            self._dead = e
        finally:
            self._fail_all(EngineStoppedError("the engine stopped" + (f": {self._dead}" if self._dead else "")))
            self._publish()

    def _apply_and_tick(self, adds: list[ModelState], aborts: list[str]) -> None:
        # A method of its own: its locals (the states it added) die with its frame, not in the idle loop's.
        with self.engine.lock:  # direct LLM.generate calls may drive the same engine (Engine.lock)
            for s in adds:
                self.engine.scheduler.add(s)
            for rid in aborts:
                self.engine.abort(rid)  # finishes the state: frees its cache, emits done(abort)
            if self.engine.has_unfinished():
                self._tick()

    def _tick(self) -> None:
        t0 = time.perf_counter()
        try:
            self.engine.step()
        except Exception as e:
            log.exception("engine tick failed; failing the requests it was running")
            self._fail_running(e)
            return
        self.counters.ticks += 1
        self.counters.step_seconds.observe(time.perf_counter() - t0)

    def _publish(self) -> None:
        sched = self.engine.scheduler
        self.num_running = sched.num_running
        self.num_waiting = sched.num_waiting + len(self._adds)

    def _fail(self, state: ModelState, exc: EngineFailedError) -> None:
        with self._cond:
            stream = self._streams.get(state.request_id)
            if stream is not None and stream.state is not state:
                stream = None  # a direct LLM.generate request on the same engine (its caller reads its state)
            if stream is not None:
                del self._streams[state.request_id]
            self._failed_aborts.discard(state.request_id)
        if stream is not None:
            state.on_event = None  # the stream gets the error, not a done event
        try:
            state.finish("error", error=str(exc))  # frees the cache
        except Exception:
            state.cache = None
        if stream is not None:
            with self._cond:
                self.counters.count("error")
            self.counters.record(state)
            stream._put(exc)

    def _fail_running(self, e: Exception) -> None:
        # The failed tick touched only running requests; waiting ones are intact and run on.
        sched = self.engine.scheduler  # called from _tick, under the engine's lock
        victims, sched.running = [s for s in sched.running if not s.finished], []
        # The exception's text stays in the log: it comes from batched work over several requests (possibly of
        # other tenants: their token ids, their text) and can run to pages; each request is told the type only.
        exc = EngineFailedError(f"the engine failed while running this request ({type(e).__name__} in the batched "
                                "work of its tick; the server log has the details)")
        for s in victims:
            self._fail(s, exc)

    def _fail_all(self, exc: EngineFailedError) -> None:
        # Only this engine's own requests: a direct LLM.generate call on the same engine goes on driving its own.
        sched = self.engine.scheduler
        with self.engine.lock, self._cond:
            own = {id(st.state) for st in self._streams.values()}
            states = [s for s in list(sched.running) + list(sched.waiting) + self._adds
                      if not s.finished and id(s) in own]
            sched.running = [s for s in sched.running if id(s) not in own]
            waiting = [s for s in sched.waiting if id(s) not in own]
            sched.waiting.clear()
            sched.waiting.extend(waiting)
            self._adds = []
        for s in states:
            self._fail(s, exc)
