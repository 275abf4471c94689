"""Throughput of N replicas on Ray Serve vs 1, on this machine (a local Ray; CPU).

    PYTHONPATH=. python scripts/ray_throughput.py [--config mid] [--replicas 1,2] [--requests 16] [--steps 8]

Builds a random checkpoint of the bench preset, serves it with blockdiff.ray (one torch thread per replica), sends
``--requests`` concurrent completions (distinct prompts, one canvas each, ``ignore_eos``, fixed steps) through the
openai client, twice per setting (the first round warms up); prints generated tokens per second of the second round.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="mid")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs Ray may hand out (one per replica)")
    a = ap.parse_args()
    import openai
    import ray
    from ray import serve

    from blockdiff.bench.checkpoints import write_random_checkpoint
    from blockdiff.ray import build_app

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tmp, a.config, seed=0, with_tokenizer=True)
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
        for n in [int(x) for x in a.replicas.split(",")]:
            serve.run(build_app({"model": path, "num_replicas": n, "served_model_name": "m", "dtype": "float32",
                                 "threads": 1, "max_num_seqs": a.requests}), name="blockdiff", route_prefix="/")

            def one(i: int) -> int:
                r = client.completions.create(model="m", prompt=f"Request {i}: once upon a time", max_tokens=16,
                                              seed=i, extra_body={"max_denoising_steps": a.steps,
                                                                  "stability_threshold": 10_000, "ignore_eos": True})
                return r.usage.completion_tokens

            for rnd in range(2):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(a.requests) as ex:
                    tokens = sum(ex.map(one, range(a.requests)))
                dt = time.perf_counter() - t0
                if rnd:
                    print(f"replicas={n}: {a.requests} requests, {tokens} tokens in {dt:.2f} s = {tokens / dt:.1f} "
                          f"tok/s", flush=True)
            serve.delete("blockdiff")
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
