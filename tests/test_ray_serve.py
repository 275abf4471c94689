"""Replicas on Ray Serve (blockdiff.ray): a local Ray, 2 replicas of a tiny checkpoint, the official openai client.

One Ray cluster and one application for the whole module (Ray's start-up takes seconds). Skipped when ray[serve] is
not installed (``pip install -e '.[ray]'``; CI installs it).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

serve = pytest.importorskip("ray.serve")
ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from fixtures import make_checkpoint  # noqa: E402

MODEL = "tiny-dg"
X = {"max_denoising_steps": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from blockdiff.ray import build_app

    path = make_checkpoint(tmp_path_factory.mktemp("ray_ckpt"),
                           generation_config={"max_denoising_steps": 4, "max_new_tokens": 32})
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": path, "num_replicas": "2", "served_model_name": MODEL, "dtype": "float32",
                         "threads": "1", "max_num_seqs": "8", "prefix_cache_bytes": str(1 << 24)}),
              name="blockdiff", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_chat_completions_and_streaming_through_the_replicas(cluster):
    c = client(cluster)
    assert [m.id for m in c.models.list().data] == [MODEL]
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_tokens=16,
                                  seed=1, extra_body=X)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens > 0
    t = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, seed=2, extra_body=X)
    assert t.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}],
                                            max_tokens=16, seed=1, stream=True, extra_body=X))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == r.choices[0].message.content
    bad = c.with_options(max_retries=0)
    with pytest.raises(openai.BadRequestError):
        bad.chat.completions.create(model=MODEL, messages=[], max_tokens=16)


def test_second_turns_of_chats_hit_the_replica_holding_their_prefix(cluster):
    c = client(cluster)
    hits = 0
    n = 10
    for i in range(n):
        system = {"role": "system", "content": f"Conversation {i}: you are a careful assistant. " * 4}
        turn1 = [system, {"role": "user", "content": f"Tell me story number {i}."}]
        r1 = c.chat.completions.create(model=MODEL, messages=turn1, max_tokens=16, seed=i, extra_body=X)
        turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "And then?"}]
        r2 = c.chat.completions.create(model=MODEL, messages=turn2, max_tokens=16, seed=i, extra_body=X)
        hits += r2.usage.prompt_tokens_details.cached_tokens > 0
    assert hits >= 0.9 * n


def _replica_pids() -> set[int]:
    h = serve.get_deployment_handle("BlockdiffReplica", app_name="blockdiff")
    return {h.pid.remote().result(timeout_s=60) for _ in range(12)}


def test_killing_a_replica_under_load_fails_only_its_requests_and_ray_replaces_it(cluster):
    pids = _replica_pids()
    assert len(pids) == 2
    victim = sorted(pids)[0]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        try:
            stream = client(cluster).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Long story {i}"}], max_tokens=64,
                seed=i, stream=True, extra_body={"max_denoising_steps": 8, "ignore_eos": True})
            text = ""
            for ch in stream:
                text += (ch.choices[0].delta.content or "") if ch.choices else ""
            results[i] = "ok"
        except Exception as e:  # noqa: BLE001 - an error is an allowed outcome for requests on the victim
            results[i] = f"error: {type(e).__name__}"

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)  # requests are in flight on both replicas
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(results) == 6 and any(v == "ok" for v in results.values())
    # Requests sent after the kill all succeed (the router skips the dead replica, then uses its replacement).
    c = client(cluster)
    for i in range(4):
        r = c.completions.create(model=MODEL, prompt=f"After {i}", max_tokens=8, seed=i, extra_body=X)
        assert r.choices[0].text is not None
    deadline = time.time() + 120
    while time.time() < deadline:
        pids_now = _replica_pids()
        if len(pids_now) == 2 and victim not in pids_now:
            break
        time.sleep(2)
    assert len(pids_now) == 2 and victim not in pids_now


def _captured_app(monkeypatch, args: list[str]):
    """The ingress deployment ``blockdiff serve ARGS --replicas 2`` hands to ``serve.run``, captured with no
    cluster (Ray's start, run and delete mocked; the prefix router, whose import needs a running Ray, left out)."""
    from blockdiff import cli
    from blockdiff import ray as blockdiff_ray

    class Captured(Exception):
        pass

    def run(app, **kw):
        raise Captured(app)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve, "run", run)
    monkeypatch.setattr(serve, "delete", lambda name: None)
    monkeypatch.setattr(blockdiff_ray, "prefix_router", lambda: None)
    with pytest.raises(Captured) as got:
        cli.main(["serve", *args, "--replicas", "2", "--port", str(_free_port())])
    return got.value.args[0]._bound_deployment


def test_replicas_get_every_server_flag_keys_tenant_salts_and_caps(tiny_checkpoint, monkeypatch):
    """``blockdiff serve --replicas N`` builds each replica's server from the same flags as ``blockdiff serve``: the
    --api-key list (it reached the replicas as the string "['ka', 'kb']", so every key got a 401), the per-key
    prefix-cache salts of several keys, and the --max-denoising-steps cap (absent: a request could ask 10000 steps).
    No cluster: the application ``serve run`` would get is captured and its replica built in this process."""
    import asyncio
    import json

    from blockdiff.ray import BlockdiffReplica, RoutedRequest, call_asgi

    replica_app = _captured_app(monkeypatch, [tiny_checkpoint, "--api-key", "ka", "--api-key", "kb", "--dtype",
                                              "float32", "--threads", "1", "--max-denoising-steps", "8"]
                                ).init_args[0]
    replica = BlockdiffReplica(*replica_app._bound_deployment.init_args)

    async def post(key: str, **body):
        body = {"model": os.path.basename(tiny_checkpoint), "max_tokens": 16, "seed": 1, **body}
        req = RoutedRequest("POST", "/v1/completions", b"", [(b"authorization", f"Bearer {key}".encode()),
                                                            (b"content-type", b"application/json")],
                            json.dumps(body).encode())
        items = [x async for x in replica.handle(req)]
        return items[0][0], json.loads(b"".join(items[1:]))

    async def scenario():
        prompt = "the same long system prompt, sent by two tenants " * 2
        a1 = await post("ka", prompt=prompt)
        a2 = await post("ka", prompt=prompt)
        b1 = await post("kb", prompt=prompt)
        wrong = await post("kc", prompt="hi")
        steps = await post("ka", prompt="hi", max_denoising_steps=9)
        await replica._lifespan.__aexit__(None, None, None)  # the replica's engine thread stops
        return a1, a2, b1, wrong, steps
    a1, a2, b1, wrong, steps = asyncio.run(scenario())
    assert a1[0] == 200 and a2[0] == 200 and b1[0] == 200, (a1, b1)
    assert a2[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the same tenant reuses its prefix
    assert b1[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # another tenant does not see it
    assert wrong[0] == 401
    assert steps[0] == 400 and steps[1]["error"]["param"] == "max_denoising_steps"


STOP_SCRIPT = """
import argparse, os, signal, sys, threading
import ray
from ray import serve
from blockdiff import ray as blockdiff_ray
calls = []
ray.is_initialized = lambda: False
ray.init = lambda **kw: calls.append(("init", kw.get("address")))  # address="auto" attaches: a cluster was running
serve.start = lambda **kw: None
serve.run = lambda app, **kw: threading.Timer(0.3, os.kill, (os.getpid(), getattr(signal, sys.argv[1]))).start()
serve.delete = lambda name: calls.append(("delete", name))
serve.shutdown = lambda: calls.append(("shutdown",))
blockdiff_ray.build_app = lambda args: None
args = argparse.Namespace(model="m", replicas=2, device="cpu", dtype="auto", quantization=None, max_num_seqs=16,
                          prefix_cache_bytes=0, threads=1, cache_salt_by_key="auto", served_model_name=None,
                          max_denoising_steps=None, max_model_len=None, max_waiting=None, max_body_bytes=1 << 20,
                          deterministic=False, fast=False, revision=None, download_dir=None, gguf_file=None,
                          host="127.0.0.1", port=0)
rc = blockdiff_ray.serve_replicas(args)
print("RC", rc, calls, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_replicas_stop_on_sigterm_or_sigint_deleting_only_their_app_on_a_running_cluster(tmp_path, sig):
    """SIGTERM killed the driver with Ray's C++ stack dump, and SIGINT was never seen by a background job (its shell
    ignores it); Ctrl-C then ran ``serve.shutdown()``, which removes every Serve application of a shared cluster.
    Now both signals stop it the same way and, on a cluster it attached to, delete only its own application."""
    import subprocess
    import sys

    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    # start_new_session + SIG_IGN for SIGINT in the child: what a background job of a non-interactive shell gets
    out = subprocess.run([sys.executable, str(script), sig], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RC 0 [('init', 'auto'), ('delete', 'blockdiff')] True" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "stopping the replicas" in out.stderr


def test_replicas_that_cannot_start_are_one_line_naming_why(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """A missing folder is refused before Ray starts; a checkpoint the replicas cannot load is Ray's "failed to
    update the deployments" plus 30 lines of traceback no more, but one line with the replicas' own error."""
    from types import SimpleNamespace

    from blockdiff import cli
    from blockdiff import ray as blockdiff_ray

    def never(**kw):
        raise AssertionError("Ray was started for a checkpoint folder that does not exist")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", never)
    assert cli.main(["serve", str(tmp_path / "missing"), "--replicas", "2", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint folder at" in err

    def run(app, **kw):
        raise RuntimeError("Deploying application blockdiff failed: Failed to update the deployments "
                           "['BlockdiffReplica'].")
    why = "The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n  File ...\n" \
          "blockdiff.checks.CheckpointError: config.json has no text_config\n"
    status = SimpleNamespace(applications={"blockdiff": SimpleNamespace(
        deployments={"BlockdiffReplica": SimpleNamespace(message=why)})})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve, "run", run)
    monkeypatch.setattr(serve, "status", lambda: status)
    monkeypatch.setattr(serve, "delete", lambda name: None)
    monkeypatch.setattr(blockdiff_ray, "prefix_router", lambda: None)
    assert cli.main(["serve", tiny_checkpoint, "--replicas", "2", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # (after the warning that the mocked Ray has no prefix router)
    assert err == ("blockdiff: error: the replicas did not start: blockdiff.checks.CheckpointError: config.json has "
                   "no text_config")


def test_the_ingress_refuses_a_body_over_the_limit_before_reading_it(tiny_checkpoint, monkeypatch):
    """--max-body-bytes was checked by the replica only, after the ingress had read (and held) the whole body.
    No cluster: the ingress ``serve run`` would get is captured and its route called in this process."""
    import asyncio
    import json

    from starlette.requests import Request

    from blockdiff.ray import BlockdiffIngress

    _, limit, timeout, _ = _captured_app(monkeypatch, [tiny_checkpoint, "--dtype", "float32", "--max-body-bytes",
                                                    "4096", "--max-image-bytes", "1024", "--body-timeout", "0.2"]
                                      ).init_args
    assert (limit, timeout) == (4096, 0.2)

    class NoReplica:  # a request refused at the ingress never reaches a replica
        def options(self, **kw):
            raise AssertionError("the request was forwarded")

    ingress = type("Ingress", (), {"replica": NoReplica(), "max_body_bytes": limit, "body_timeout": timeout})()

    def request(declared: int | None, chunks: list[bytes], then_wait: bool = False) -> Request:
        sent = iter(chunks)

        async def receive():
            part = next(sent, None)
            if part is None:
                if then_wait:
                    await asyncio.sleep(3600)  # a client that stopped sending
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": part, "more_body": True}
        headers = [(b"content-type", b"application/json")]
        if declared is not None:
            headers.append((b"content-length", str(declared).encode()))
        return Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers,
                        "query_string": b""}, receive)

    async def answer(req):
        r = await BlockdiffIngress.forward(ingress, "v1/completions", req)
        return r.status_code, json.loads(r.body)["error"]

    def never(*a):
        raise AssertionError("a body declared over the limit was read")
    declared = asyncio.run(answer(Request(request(10_000_000, []).scope, never)))
    assert declared[0] == 413 and declared[1]["code"] == "request_too_large" and "10000000" in declared[1]["message"]
    streamed = asyncio.run(answer(request(None, [b"x" * 3000, b"x" * 3000, b"x" * 3000])))  # chunked: no length
    assert streamed[0] == 413 and f"more than {limit}" in streamed[1]["message"]
    stalled = asyncio.run(answer(request(100, [b"{"], then_wait=True)))
    assert stalled[0] == 408 and stalled[1]["code"] == "body_timeout"


def test_the_router_matches_a_prompt_only_within_its_tenant_salt(tiny_checkpoint, monkeypatch):
    """The prefix-aware router matched every prompt against every tenant's: a tenant's request went to the replica
    holding another tenant's same prompt (where its salted cache cannot hit), so how busy its replica was depended
    on what the other tenant sent. The routed text now starts with the salt, as the replicas' cached blocks do."""
    import json

    from starlette.requests import Request

    from blockdiff.ray import BlockdiffIngress, routing_text

    body = json.dumps({"messages": [{"role": "user", "content": "shared prompt"}]}).encode()
    salted = json.dumps({"prompt": "shared prompt", "cache_salt": "s"}).encode()
    assert routing_text("/v1/chat/completions", body) == "shared prompt\n"  # unsalted: as before
    responses = json.dumps({"input": [{"role": "user", "content": [{"type": "input_text", "text": "shared prompt"}]}]})
    assert routing_text("/v1/responses", responses.encode()) == "shared prompt\n"  # the same chat, the same replica
    assert routing_text("/v1/completions", salted).endswith("shared prompt")
    assert not routing_text("/v1/completions", salted).startswith("shared prompt")
    assert routing_text("/v1/chat/completions", body, "ta") != routing_text("/v1/chat/completions", body, "tb")
    keyed = _captured_app(monkeypatch, [tiny_checkpoint, "--dtype", "float32", "--api-key", "ka", "--api-key", "kb"])
    one = _captured_app(monkeypatch, [tiny_checkpoint, "--dtype", "float32", "--api-key", "ka"])
    assert keyed.init_args[3] is True and one.init_args[3] is False  # salting by key: auto with several keys

    def tenant(key: str, salt_by_key: bool):
        ingress = type("Ingress", (), {"salt_by_key": salt_by_key})()
        req = Request({"type": "http", "headers": [(b"authorization", f"Bearer {key}".encode())]})
        return BlockdiffIngress._tenant(ingress, req)
    assert tenant("ka", True) != tenant("kb", True) and "ka" not in tenant("ka", True)
    assert tenant("ka", False) is None
