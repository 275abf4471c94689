"""Data-parallel replicas of the blockdiff server on Ray Serve.

``blockdiff serve CHECKPOINT --replicas N`` (a local Ray is started when none is running), or the application
builder ``blockdiff.ray:build_app`` for ``serve run blockdiff.ray:build_app model=PATH num_replicas=N`` and Ray Serve
config files. Two deployments:

- ``BlockdiffReplica`` (N replicas, or an autoscaling range): one whole blockdiff server each - its own ``LLM``,
  engine, prefix cache and the unchanged FastAPI app of ``blockdiff.server``, called in-process over ASGI. Resources
  per replica: ``replica_cpus`` / ``replica_gpus`` (default 1 CPU; 1 GPU when ``device`` is CUDA).
- ``BlockdiffIngress`` (the HTTP entry): reads the body of each request and hands it to a replica through a
  ``DeploymentHandle``. The request carries ``prompt``: the text of its prompt or of its chat messages, which Ray Serve's
  ``PrefixCacheAffinityRouter`` (``ray.serve.llm.request_router``) matches against what each replica served before, so
  a chat's next turn goes to the replica that holds its prefix in cache. Responses stream through (SSE chunks as the
  replica yields them).

The same OpenAI routes as ``blockdiff serve`` (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/health``, ``/metrics``), answered by whichever replica the router picks. ``/metrics`` through the ingress is one
replica's; per-replica figures go to Ray's metrics instead: each replica mirrors its blockdiff counters and gauges
(``blockdiff_*``) into Ray Serve metrics every few seconds, tagged with the deployment and replica (scrape Ray's
metrics export port, e.g. ``ray start --head --metrics-export-port 8080``; see docs/scaling.md).

A replica that dies: requests not yet sent to it go to the others; requests in flight on it end with an error
(a 503 body, or a stream cut with an error event); Ray Serve starts a replacement.

``ray[serve]`` is an optional extra (``pip install -e '.[ray]'``): nothing else in blockdiff imports this module.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route's annotations through Ray's wrapper, and
# string annotations there turn ``request: Request`` into a required query parameter (HTTP 422).
import asyncio
import json
import logging
import os
import sys
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from blockdiff.server.body import BODY_IDLE_TIMEOUT, MAX_BODY_BYTES, check_body_timeout, read_body
from blockdiff.server.errors import APIError
from blockdiff.server.service import key_digest

log = logging.getLogger("blockdiff.ray")

# Ray Serve's prefix-aware router: the public path imports all of ray.serve.llm (it needs the ray[llm] extra: pyarrow,
# vllm ...); the module that defines the class needs nothing beyond ray[serve].
PREFIX_ROUTERS = ("ray.serve.llm.request_router:PrefixCacheAffinityRouter",
                  "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter")
METRICS_PERIOD_S = 5.0
APP_NAME = "blockdiff"  # the Serve application `blockdiff serve --replicas` runs


@dataclass
class RoutedRequest:
    """One HTTP request on its way to a replica. ``prompt`` is what the prefix-aware router matches (never empty:
    it divides by its length)."""

    method: str
    path: str
    query: bytes
    headers: list
    body: bytes
    prompt: str = field(default=" ")


def routing_text(path: str, body: bytes, tenant: str | None = None) -> str:
    """The text a request's prompt starts with: chat messages' contents in order (a Responses request's
    instructions and input items), or the completion prompt.

    Salted requests (``tenant``: the API key's tag when the replicas salt by key; the body's ``cache_salt``) start
    with their salt, as their cached blocks do on the replicas: the router then matches a prompt only against
    prompts of the same salt, so which replica (how busy, hence how fast) answers never depends on whether another
    tenant sent that prompt."""
    try:
        data = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        return path or " "
    if not isinstance(data, dict):
        return path or " "
    salt = data.get("cache_salt") if isinstance(data.get("cache_salt"), str) else None
    head = f"\x00{tenant or ''}:{salt or ''}\x00" if tenant or salt else ""
    return head + _prompt_text(path, data)


def _prompt_text(path: str, data: dict) -> str:
    parts = []
    messages = data.get("messages")
    if isinstance(data.get("input"), (str, list)):  # /v1/responses: instructions, then the input items
        inst = data.get("instructions")
        messages = ([{"content": inst}] if isinstance(inst, str) else []) + (
            [{"content": data["input"]}] if isinstance(data["input"], str) else data["input"])
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
            parts.append("\n")
    elif isinstance(data.get("prompt"), str):
        parts.append(data["prompt"])
    elif isinstance(data.get("prompt"), list) and data["prompt"] and isinstance(data["prompt"][0], str):
        parts.append(data["prompt"][0])
    return "".join(parts) or path or " "


# ---------------------------------------------------------------------------------------------- in-process ASGI
async def call_asgi(app, req: RoutedRequest):
    """Run one request through an ASGI app; yields (status, headers) first, then the body chunks as the app sends
    them. Leaving early (the caller went away) tells the app the client disconnected."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req.method,
             "scheme": "http", "path": req.path, "raw_path": req.path.encode(), "query_string": req.query,
             "root_path": "", "headers": req.headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    task = asyncio.create_task(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.create_task(sent.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                task.result()  # the app raised: surface it
                raise RuntimeError("the app ended without a response")
            msg = getter.result()
            if msg["type"] == "http.response.start":
                yield msg["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body"):
                    return
    finally:
        gone.set()
        try:
            await asyncio.wait_for(task, timeout=30)
        except Exception:  # noqa: BLE001 - the request is over either way
            task.cancel()


# ---------------------------------------------------------------------------------------------- the replica
class BlockdiffReplica:
    """One blockdiff server: model, engine and the FastAPI app of ``blockdiff.server``."""

    def __init__(self, model: str, served_model_name: str, llm_kwargs: dict, app_kwargs: dict):
        from .engine.llm import LLM
        from .server import build_app

        from .server.cli import DEFAULT_MAX_STEPS

        llm_kwargs, app_kwargs = dict(llm_kwargs), dict(app_kwargs)
        threads = llm_kwargs.pop("threads", 0)
        fast = llm_kwargs.pop("fast", False)
        template = llm_kwargs.pop("chat_template", None)
        if threads:
            import torch
            torch.set_num_threads(threads)
        self.llm = LLM(model, **llm_kwargs)
        self.llm.engine.fast = bool(fast)
        if template:
            from .cli import use_chat_template
            use_chat_template(self.llm, template)
        if app_kwargs.get("max_denoising_steps") is None:  # the cap `blockdiff serve` sets by default
            app_kwargs["max_denoising_steps"] = max(DEFAULT_MAX_STEPS, self.llm.defaults.max_denoising_steps)
        self.app = build_app(self.llm, served_model_name, **app_kwargs)
        self._lifespan = None
        self._started = asyncio.Lock()
        self._gauges: dict = {}

    async def _start(self) -> None:
        async with self._started:
            if self._lifespan is None:
                self._lifespan = self.app.router.lifespan_context(self.app)
                await self._lifespan.__aenter__()
                asyncio.get_running_loop().create_task(self._mirror_metrics())

    async def handle(self, req: RoutedRequest):
        """Streams (status, headers), then body chunks (``handle.options(stream=True)``)."""
        await self._start()
        async for item in call_asgi(self.app, req):
            yield item

    def pid(self) -> int:
        return os.getpid()

    async def _mirror_metrics(self) -> None:
        """Copy this replica's blockdiff metrics into Ray Serve metrics (tagged per replica by Ray)."""
        from prometheus_client.parser import text_string_to_metric_families
        from ray.serve import metrics as ray_metrics

        while True:
            await asyncio.sleep(METRICS_PERIOD_S)
            try:
                req = RoutedRequest("GET", "/metrics", b"", [], b"")
                chunks = [c async for c in call_asgi(self.app, req)][1:]
                for fam in text_string_to_metric_families(b"".join(chunks).decode()):
                    for s in fam.samples:
                        if s.name.endswith("_created"):
                            continue
                        keys = tuple(sorted(s.labels))
                        g = self._gauges.get((s.name, keys))
                        if g is None:
                            g = self._gauges[(s.name, keys)] = ray_metrics.Gauge(
                                s.name, description=fam.documentation or s.name, tag_keys=keys)
                        g.set(float(s.value), tags=dict(s.labels) or None)
            except Exception as e:  # noqa: BLE001 - metrics never take a replica down
                log.debug("metrics mirror: %s", e)


# ---------------------------------------------------------------------------------------------- the ingress
ingress_app = FastAPI(title="blockdiff (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)


# Defined before the ingress class: Ray serializes the class (with the globals it uses) as it is decorated.
async def _relay(gen):
    try:
        async for chunk in gen:
            yield chunk
    except Exception as e:  # noqa: BLE001 - the replica died mid-stream: an error event, then the end
        err = {"error": {"message": f"the replica serving this stream failed: {type(e).__name__}",
                         "type": "server_error", "param": None, "code": 503}}
        yield f"data: {json.dumps(err)}\n\n".encode()
        yield b"data: [DONE]\n\n"


def _unavailable(e: Exception) -> JSONResponse:
    return JSONResponse({"error": {"message": f"no replica could answer: {type(e).__name__}: {str(e)[:200]}",
                                   "type": "server_error", "param": None, "code": 503}}, status_code=503)


# Decorated here, at import: a replica process imports this module and must find its routes already bound.
@serve.ingress(ingress_app)
class BlockdiffIngress:
    def __init__(self, replica, max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_IDLE_TIMEOUT,
                 salt_by_key: bool = False):
        self.replica = replica
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        self.salt_by_key = salt_by_key  # as the replicas: the router matches prompts within each key's salt

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "HEAD"])
    async def forward(self, path: str, request: Request) -> Response:
        # The replica's limits, applied here too: a body over --max-body-bytes is refused from its Content-Length
        # before a byte is read (or as soon as its bytes pass it), not held whole in the ingress first; one that
        # stops arriving for --body-timeout seconds is a 408.
        try:
            body = await read_body(request, self.max_body_bytes, self.body_timeout)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        req = RoutedRequest(request.method, "/" + path, request.url.query.encode(),
                            [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()], body,
                            routing_text("/" + path, body, self._tenant(request)))
        gen = self.replica.options(stream=True).handle.remote(req)
        try:
            status, headers = await gen.__anext__()
        except Exception as e:  # noqa: BLE001 - the replica died or refused before answering
            return _unavailable(e)
        headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
        media = next((v for k, v in headers if k.lower() == "content-type"), "")
        if media.startswith("text/event-stream"):
            return StreamingResponse(_relay(gen), status_code=status, headers=dict(headers))
        try:
            data = b"".join([chunk async for chunk in gen])
        except Exception as e:  # noqa: BLE001 - the replica died mid-answer
            return _unavailable(e)
        return Response(data, status_code=status, headers=dict(headers))

    def _tenant(self, request: Request) -> str | None:
        """The request's key tag when salting by key (any bearer token: a wrong key is the replica's 401)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return key_digest(token.strip()) if self.salt_by_key and scheme.lower() == "bearer" and token.strip() else None


# ---------------------------------------------------------------------------------------------- building the app
_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def prefix_router():
    """Ray Serve's ``PrefixCacheAffinityRouter`` class from the first place this Ray has it importable, or None."""
    import importlib

    for spec in PREFIX_ROUTERS:
        mod, _, cls = spec.partition(":")
        try:
            return getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError):
            continue
    return None


def _arg(args: dict, name: str, kind, default):
    """One builder argument (``serve run`` passes strings; config files and Python pass typed values)."""
    v = args.get(name, default)
    if v is None or isinstance(v, kind) and not (kind is int and isinstance(v, bool)):
        return v
    try:
        if kind is bool:
            return _BOOL[str(v).lower()]
        return kind(v)
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{name} must be a {kind.__name__}, got {v!r}") from None


def _keys(args: dict) -> list[str] | None:
    """``api_key``: one key, or a list of keys (tenants; a config file's list, or ``blockdiff serve``'s)."""
    v = args.get("api_key")
    if isinstance(v, (list, tuple)):
        if not all(isinstance(k, str) for k in v):
            raise ValueError(f"api_key must be a string or a list of strings, got {v!r}")
        return list(v) or None
    v = _arg(args, "api_key", str, None)
    return None if v is None else [v]


def _salt(args: dict) -> bool | None:
    v = args.get("cache_salt_by_key", "auto")
    if isinstance(v, bool) or v is None:
        return v
    v = str(v).lower()
    if v == "auto":
        return None
    if v in ("on", "off"):
        return v == "on"
    return _arg({"cache_salt_by_key": v}, "cache_salt_by_key", bool, None)


def build_app(args: dict):
    """The Ray Serve application: ``serve run blockdiff.ray:build_app model=PATH num_replicas=N``.

    Arguments: ``model`` (required), ``served_model_name``, ``num_replicas`` (default 1; or ``min_replicas`` /
    ``max_replicas`` / ``target_ongoing_requests`` for autoscaling), ``replica_cpus`` (default 1), ``replica_gpus``
    (default 1 on CUDA, else 0), ``device``, ``dtype``, ``quantization``, ``max_num_seqs`` (16),
    ``prefix_cache_bytes`` (1 GiB), ``threads`` (torch threads per replica; 0 = torch's default),
    ``prefix_routing`` (true: Ray Serve's ``PrefixCacheAffinityRouter``; false: its default power-of-two router),
    ``max_ongoing_requests`` (per replica, default 64), and as for ``blockdiff serve``: ``api_key`` (one key or a
    list: tenants), ``cache_salt_by_key`` (auto / on / off), ``max_denoising_steps`` (default as ``serve``),
    ``max_model_len``, ``max_waiting``, ``max_body_bytes`` (checked by the ingress too, before it reads a body),
    ``body_timeout``, ``deterministic``, ``fast``, ``revision``,
    ``download_dir``, ``gguf_file``, ``quantize_embedding``, ``chat_template`` (a file), ``media_limits`` (a ``MediaLimits``; Python and ``--replicas`` only)."""
    if not isinstance(args, dict) or not args.get("model"):
        raise ValueError("build_app needs model=PATH (a checkpoint folder or hub id)")
    model = str(args["model"])
    device = _arg(args, "device", str, "cpu")
    name = _arg(args, "served_model_name", str, None) or os.path.basename(os.path.normpath(model)) or model
    llm_kwargs = {"dtype": _arg(args, "dtype", str, "auto"), "device": device,
                  "quantization": _arg(args, "quantization", str, None),
                  "max_num_seqs": _arg(args, "max_num_seqs", int, 16),
                  "prefix_cache_bytes": _arg(args, "prefix_cache_bytes", int, 1 << 30),
                  "threads": _arg(args, "threads", int, 0),
                  "deterministic": _arg(args, "deterministic", bool, False), "fast": _arg(args, "fast", bool, False),
                  "revision": _arg(args, "revision", str, None), "download_dir": _arg(args, "download_dir", str, None),
                  "gguf_file": _arg(args, "gguf_file", str, None),
                  "quantize_embedding": _arg(args, "quantize_embedding", bool, True),
                  "chat_template": _arg(args, "chat_template", str, None)}
    app_kwargs = {"api_key": _keys(args), "salt_by_key": _salt(args), "max_num_seqs": llm_kwargs["max_num_seqs"],
                  "max_denoising_steps": _arg(args, "max_denoising_steps", int, None),
                  "max_model_len": _arg(args, "max_model_len", int, None),
                  "max_waiting": _arg(args, "max_waiting", int, None)}
    if args.get("max_body_bytes") is not None:
        app_kwargs["max_body_bytes"] = _arg(args, "max_body_bytes", int, None)
    if args.get("body_timeout") is not None:
        # the ingress uses it too: refused here, not there
        app_kwargs["body_timeout"] = check_body_timeout(_arg(args, "body_timeout", float, None))
    if args.get("media_limits") is not None:
        app_kwargs["media_limits"] = args["media_limits"]
    options: dict = {
        "ray_actor_options": {"num_cpus": _arg(args, "replica_cpus", float, 1.0),
                              "num_gpus": _arg(args, "replica_gpus", float, 1.0 if device.startswith("cuda") else 0.0)},
        "max_ongoing_requests": _arg(args, "max_ongoing_requests", int, 64),
    }
    if _arg(args, "prefix_routing", bool, True):
        router = prefix_router()
        if router is None:
            log.warning("this Ray has no PrefixCacheAffinityRouter: replicas are picked by Ray Serve's default router")
        else:
            options["request_router_config"] = RequestRouterConfig(request_router_class=router)
    lo, hi = _arg(args, "min_replicas", int, None), _arg(args, "max_replicas", int, None)
    if lo is not None or hi is not None:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=lo or 1, max_replicas=hi or max(lo or 1, 1),
            target_ongoing_requests=_arg(args, "target_ongoing_requests", float, 8.0))
    else:
        n = _arg(args, "num_replicas", int, 1)
        if n < 1:
            raise ValueError(f"num_replicas must be >= 1, got {n}")
        options["num_replicas"] = n
    replica = serve.deployment(BlockdiffReplica, name="BlockdiffReplica").options(**options)
    ingress = serve.deployment(BlockdiffIngress, name="BlockdiffIngress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(model, name, llm_kwargs, app_kwargs),
                        app_kwargs.get("max_body_bytes", MAX_BODY_BYTES),
                        app_kwargs.get("body_timeout", BODY_IDLE_TIMEOUT),
                        len(app_kwargs["api_key"] or []) > 1 if app_kwargs["salt_by_key"] is None
                        else app_kwargs["salt_by_key"])


def _replica_error(e: Exception) -> str:
    """The last line of the failed replicas' error as Ray Serve reports it (their constructor's exception), else
    ``e``'s first line (the replicas' own logs do not reach this process: ``log_to_driver=False``)."""
    try:
        msg = serve.status().applications[APP_NAME].deployments["BlockdiffReplica"].message
        return [ln.strip() for ln in msg.strip().splitlines() if ln.strip()][-1][:500]
    except Exception:  # noqa: BLE001 - no status to read: Ray's own message
        return (str(e).strip().splitlines() or [type(e).__name__])[0]


def serve_replicas(args, api_keys: list[str] | None = None, media_limits=None) -> int:
    """``blockdiff serve CHECKPOINT --replicas N``: Ray Serve on ``--host``/``--port`` (a local Ray when none runs).
    ``api_keys``: every key of --api-key / --api-key-file / $BLOCKDIFF_API_KEY; every server flag reaches the
    replicas (each runs the server ``blockdiff serve`` would) but --shutdown-grace (the stop is Ray's);
    --allowed-origins and --ssl-certfile are refused before this is called. SIGINT (Ctrl-C) and SIGTERM stop it
    alike: the local Ray it started is shut down; on a cluster that was already running only this application is
    deleted (the cluster's other Serve applications stay)."""
    import signal
    import threading

    import ray

    from .server.cli import url

    started_ray = False
    if not ray.is_initialized():
        try:
            ray.init(address="auto", log_to_driver=False)
        except (ConnectionError, RuntimeError):
            ray.init(log_to_driver=False)
            started_ray = True
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app({"model": args.model, "num_replicas": args.replicas, "device": args.device, "dtype": args.dtype,
                     "quantization": args.quantization, "max_num_seqs": args.max_num_seqs,
                     "prefix_cache_bytes": args.prefix_cache_bytes, "threads": args.threads,
                     "api_key": api_keys or None, "cache_salt_by_key": args.cache_salt_by_key,
                     "served_model_name": args.served_model_name,
                     "max_denoising_steps": args.max_denoising_steps, "max_model_len": args.max_model_len,
                     "max_waiting": args.max_waiting, "max_body_bytes": args.max_body_bytes,
                     "body_timeout": getattr(args, "body_timeout", None),
                     "deterministic": args.deterministic, "fast": args.fast, "revision": args.revision,
                     "download_dir": args.download_dir, "gguf_file": args.gguf_file, "media_limits": media_limits,
                     "quantize_embedding": not getattr(args, "keep_embedding", False),
                     "chat_template": getattr(args, "chat_template", None)})
    # Our own handlers, set after Ray's: its driver turns SIGTERM into a C++ stack dump, and a SIGINT that the
    # parent shell ignores (a background job) would never reach the KeyboardInterrupt a plain loop waits for.
    ready, stop = threading.Event(), threading.Event()

    def on_signal(signum, frame):
        if not ready.is_set():  # still starting the replicas: give up the start (cleaned up below)
            raise KeyboardInterrupt
        stop.set()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # Ray says "failed to update the deployments": say why the replicas failed
            raise ValueError(f"the replicas did not start: {_replica_error(e)}") from None
        ready.set()
        print(f"blockdiff: {args.replicas} replica{'s' if args.replicas > 1 else ''} on Ray Serve at "
              f"{url('http', args.host, args.port)}/v1", flush=True)
        while not stop.wait(3600):
            pass
        print("blockdiff: stopping the replicas", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
    return 0
