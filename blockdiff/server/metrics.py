"""``/metrics``: the ``AsyncEngine`` counters and the server's own, exposed with ``prometheus_client``.

The counters live in the engine (written by its thread; its latency histograms are prometheus_client
``Histogram`` objects outside any registry); a custom collector reads them at scrape time into a registry of this
app's own, so two apps in one process (the tests run several) never share or clash. Every sample carries a
``model_name`` label (the served model id), as vLLM's metrics do, so one Prometheus can scrape several servers.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.async_engine import AsyncEngine

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _counter(name: str, help: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help, value=value)  # exposed as NAME (ending in _total)


def _gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help, value=value)


class EngineCollector:
    def __init__(self, engine: AsyncEngine, http_errors: dict[int, int], model_name: str):
        self.engine, self.http_errors, self.model_name = engine, http_errors, model_name

    def collect(self):
        for family in self._families():
            family.samples = [s._replace(labels={"model_name": self.model_name, **s.labels}) for s in family.samples]
            yield family

    def _families(self):
        e, c = self.engine, self.engine.counters
        req = CounterMetricFamily("blockdiff_requests_total", "Requests by outcome: stop/length (finished), abort "
                                  "(cancelled, e.g. the client left), error (it failed: HTTP 500 or an error event), rejected (over "
                                  "capacity, HTTP 429).", labels=["outcome"])
        for k, v in sorted(c.finished.items()):
            req.add_metric([k], v)
        req.add_metric(["rejected"], c.rejected)
        yield req
        errs = CounterMetricFamily("blockdiff_http_errors_total", "Error responses by HTTP status (bad input, "
                                   "auth, ...).", labels=["status"])
        for k, v in sorted(dict(self.http_errors).items()):
            errs.add_metric([str(k)], v)
        yield errs
        yield _counter("blockdiff_prompt_tokens_total", "Prompt tokens of finished requests.", c.prompt_tokens)
        yield _counter("blockdiff_generation_tokens_total", "Output tokens of finished requests.",
                       c.generation_tokens)
        yield _counter("blockdiff_denoise_steps_total", "Denoising steps (one decoder forward per request per step) "
                       "of finished requests.", c.denoise_steps)
        yield _counter("blockdiff_canvases_total", "Canvases committed by finished requests.", c.canvases)
        yield _gauge("blockdiff_tokens_per_forward", "generation_tokens_total / denoise_steps_total since start.",
                     c.tokens_per_forward)
        pc = e.engine.prefix_cache
        yield _counter("blockdiff_prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix cache.",
                       pc.query_tokens)
        yield _counter("blockdiff_prefix_cache_hit_tokens_total", "Prompt tokens whose keys/values came from the "
                       "prefix cache instead of an encode.", pc.hit_tokens)
        yield _gauge("blockdiff_prefix_cache_bytes", "Bytes of KV pages the prefix cache holds.", pc.nbytes())
        yield _gauge("blockdiff_prefix_cache_capacity_bytes", "The prefix cache's budget (--prefix-cache-bytes).",
                     pc.capacity_bytes)
        yield _counter("blockdiff_engine_ticks_total", "Engine ticks (batched encode + denoise).", c.ticks)
        yield _gauge("blockdiff_requests_running", "Requests holding a batch slot (at most max_num_seqs).",
                     e.num_running)
        yield _gauge("blockdiff_requests_waiting", "Admitted requests waiting for a batch slot.", e.num_waiting)
        yield _gauge("blockdiff_max_num_seqs", "Batch slots.", e.max_num_seqs)
        yield _gauge("blockdiff_max_waiting", "Waiting slots before requests are refused with 429.", e.max_waiting)
        for h in (c.step_seconds, c.time_to_first_block, c.request_seconds):
            yield from h.collect()
        info = GaugeMetricFamily("blockdiff_model_info", "The served model.", labels=["model"])
        info.add_metric([self.model_name], 1)
        yield info


def make_registry(engine: AsyncEngine, http_errors: dict[int, int], model_name: str) -> CollectorRegistry:
    """A registry of one app's own (two apps in one process never share or clash)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(engine, http_errors, model_name))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
