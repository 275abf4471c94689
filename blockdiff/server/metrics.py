"""Prometheus text exposition (format 0.0.4) of the ``AsyncEngine`` counters and the server's own."""

from __future__ import annotations

from ..engine.async_engine import AsyncEngine, Histogram


def _fmt(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


class _Out:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, v in samples:
            self.lines.append(f"{name}{labels} {_fmt(v)}")

    def histogram(self, name: str, help: str, h: Histogram) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} histogram")
        cum = 0
        for b, c in zip(h.buckets, h.counts):
            cum += c
            self.lines.append(f'{name}_bucket{{le="{b}"}} {cum}')
        self.lines.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
        self.lines.append(f"{name}_sum {_fmt(h.sum)}")
        self.lines.append(f"{name}_count {h.count}")


def render(engine: AsyncEngine, http_errors: dict[int, int], model_name: str) -> str:
    c = engine.counters
    o = _Out()
    outcomes = [(f'{{outcome="{k}"}}', v) for k, v in sorted(c.finished.items())]
    outcomes.append(('{outcome="rejected"}', c.rejected))
    o.metric("blockdiff_requests_total", "counter",
             "Requests by outcome: stop/length (finished), abort (cancelled, e.g. the client left), "
             "error (the engine failed), rejected (over capacity, HTTP 429).", outcomes)
    o.metric("blockdiff_http_errors_total", "counter", "Error responses by HTTP status (bad input, auth, ...).",
             [(f'{{status="{k}"}}', v) for k, v in sorted(http_errors.items())])
    o.metric("blockdiff_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
             [("", c.prompt_tokens)])
    o.metric("blockdiff_generation_tokens_total", "counter", "Output tokens of finished requests.",
             [("", c.generation_tokens)])
    o.metric("blockdiff_denoise_steps_total", "counter",
             "Denoising steps (one decoder forward per request per step) of finished requests.",
             [("", c.denoise_steps)])
    o.metric("blockdiff_canvases_total", "counter", "Canvases committed by finished requests.", [("", c.canvases)])
    o.metric("blockdiff_tokens_per_forward", "gauge",
             "generation_tokens_total / denoise_steps_total since start.", [("", c.tokens_per_forward)])
    o.metric("blockdiff_engine_ticks_total", "counter", "Engine ticks (batched encode + denoise).",
             [("", c.ticks)])
    o.metric("blockdiff_requests_running", "gauge", "Requests holding a batch slot (at most max_num_seqs).",
             [("", engine.num_running)])
    o.metric("blockdiff_requests_waiting", "gauge", "Admitted requests waiting for a batch slot.",
             [("", engine.num_waiting)])
    o.metric("blockdiff_max_num_seqs", "gauge", "Batch slots.", [("", engine.max_num_seqs)])
    o.metric("blockdiff_max_waiting", "gauge", "Waiting slots before requests are refused with 429.",
             [("", engine.max_waiting)])
    o.histogram("blockdiff_step_seconds", "Engine tick latency.", c.step_seconds)
    o.histogram("blockdiff_time_to_first_block_seconds", "Arrival to first committed canvas.",
                c.time_to_first_block)
    o.histogram("blockdiff_request_seconds", "Arrival to finish.", c.request_seconds)
    o.metric("blockdiff_model_info", "gauge", "The served model.", [(f'{{model="{model_name}"}}', 1)])
    return "\n".join(o.lines) + "\n"
