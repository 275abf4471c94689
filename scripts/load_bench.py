"""Load benchmark for ``blockdiff serve``: requests/s, output tok/s, time to first block and latency percentiles at
several concurrency levels, on loopback only.

    python scripts/load_bench.py CHECKPOINT --concurrency 1 4 16 --out load.json

Starts ``python -m blockdiff serve CHECKPOINT`` on a free loopback port (or uses ``--url`` of a running server),
sends streamed /v1/completions requests from ``c`` concurrent clients per level (``--requests`` each level, at most
``--max-seconds``), and reads /metrics before and after each level for denoising steps. Every request streams, so
"time to first block" is the arrival of the first chunk with text (the first committed canvas) and latency is the
time to ``data: [DONE]``. The clients run on the same machine as the server: on a small CPU box they take a share
of it, so figures are a lower bound for the server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time

import httpx

PROMPTS = ["The history of the printing press", "Write a short poem about rain.", "Explain block diffusion.",
           "List three uses of copper", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The weather tomorrow will be", "Summarise the plot of Hamlet in two sentences."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def scrape(url: str, headers: dict) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    out = {}
    for name in ("blockdiff_denoise_steps_total", "blockdiff_generation_tokens_total", "blockdiff_engine_ticks_total",
                 "blockdiff_step_seconds_sum", "blockdiff_step_seconds_count"):
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)  # labels: model_name
        out[name] = float(m.group(1)) if m else 0.0
    return out


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    reason = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                return {"error": d["error"]["message"]}
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            for c in d.get("choices", []):
                if c.get("text") and first is None:
                    first = time.perf_counter()
                reason = c.get("finish_reason") or reason
    end = time.perf_counter()
    return {"latency": end - t0, "ttfb": (first or end) - t0, "tokens": tokens, "finish_reason": reason}


async def run_level(url: str, headers: dict, model: str, conc: int, n_requests: int, max_seconds: float,
                    args, mode: str | None = None) -> dict:
    before = scrape(url, headers)
    results: list[dict] = []
    counter = iter(range(n_requests))
    deadline = time.perf_counter() + max_seconds

    async def worker(client):
        for i in counter:
            if time.perf_counter() > deadline:
                return
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
                    "seed": i, "stream": True, "stream_options": {"include_usage": True},
                    "ignore_eos": args.ignore_eos}
            if args.max_denoising_steps:
                body["max_denoising_steps"] = args.max_denoising_steps
            if mode is not None:
                body["fast"] = mode == "fast"
            results.append(await one_request(client, url, body))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, headers=headers,
                                 limits=httpx.Limits(max_connections=conc + 4)) as client:
        await asyncio.gather(*[worker(client) for _ in range(conc)])
    wall = time.perf_counter() - t0
    after = scrape(url, headers)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    toks = sum(r["tokens"] for r in ok)
    steps = after["blockdiff_denoise_steps_total"] - before["blockdiff_denoise_steps_total"]
    ticks = after["blockdiff_engine_ticks_total"] - before["blockdiff_engine_ticks_total"]
    tick_s = after["blockdiff_step_seconds_sum"] - before["blockdiff_step_seconds_sum"]
    lat = [r["latency"] for r in ok]
    ttfb = [r["ttfb"] for r in ok]
    rnd = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {
        "concurrency": conc, "mode": mode or "server default", "requests": len(ok), "errors": len(errors), "first_errors": errors[:3],
        "wall_seconds": round(wall, 3), "requests_per_second": round(len(ok) / wall, 3),
        "output_tokens_per_second": round(toks / wall, 2), "output_tokens": toks,
        "tokens_per_forward": round(toks / steps, 3) if steps else None,
        "mean_batch": round(steps / ticks, 2) if ticks else None,
        "mean_tick_ms": round(1000 * tick_s / ticks, 2) if ticks else None,
        "ttfb_p50": rnd(pct(ttfb, 50)), "ttfb_p90": rnd(pct(ttfb, 90)), "ttfb_p99": rnd(pct(ttfb, 99)),
        "latency_p50": rnd(pct(lat, 50)), "latency_p90": rnd(pct(lat, 90)), "latency_p99": rnd(pct(lat, 99)),
    }


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "blockdiff", "serve", args.checkpoint, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", args.model_name, "--max-num-seqs", str(args.max_num_seqs),
           "--log-level", "warning", "--dtype", args.dtype, "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit("the server did not become healthy within 300 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder to serve (omit with --url)")
    p.add_argument("--url", help="benchmark an already running server instead (loopback)")
    p.add_argument("--api-key")
    p.add_argument("--model-name", default="bench")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    p.add_argument("--max-seconds", type=float, default=120, help="stop starting new requests after this")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-denoising-steps", type=int, default=16)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let EOS end requests early (random checkpoints emit it anywhere)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", choices=["exact", "fast"], default=None,
                   help="send \"fast\": false / true (each level runs every mode, interleaved; default: neither "
                        "field, the server's default)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (args.url is None):
        p.error("give a checkpoint to serve, or --url of a running server")
    if args.url and not re.match(r"^https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?/?$", args.url):
        p.error("--url must be a loopback address")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args)
    try:
        model = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        asyncio.run(run_level(url, headers, model, 1, 2, 60, args))  # warm-up, not reported
        levels = []
        for c, mode in [(c, m) for c in args.concurrency for m in (args.modes or [None])]:
            r = asyncio.run(run_level(url, headers, model, c, max(args.requests, c), args.max_seconds, args, mode))
            levels.append(r)
            print(f"c={c:3d} {r['mode']:>5} {r['requests']:4d} req  {r['requests_per_second']:7.2f} req/s  "
                  f"{r['output_tokens_per_second']:8.1f} tok/s  TTFB p50 {r['ttfb_p50']} p90 {r['ttfb_p90']} "
                  f"p99 {r['ttfb_p99']}  latency p50 {r['latency_p50']} p90 {r['latency_p90']} "
                  f"p99 {r['latency_p99']}  batch {r['mean_batch']}  tick {r['mean_tick_ms']} ms"
                  + (f"  errors {r['errors']}: {r['first_errors']}" if r["errors"] else ""), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    out = {"checkpoint": args.checkpoint, "url": None if proc else url, "command": " ".join(sys.argv),
           "max_tokens": args.max_tokens, "max_denoising_steps": args.max_denoising_steps,
           "ignore_eos": args.ignore_eos, "max_num_seqs": args.max_num_seqs, "threads": args.threads,
           "modes": args.modes,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "levels": levels}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
