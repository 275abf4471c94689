"""``blockdiff serve MODEL``: the OpenAI-compatible server on uvicorn (loopback unless ``--host`` says otherwise)."""

from __future__ import annotations

import contextlib
import os
import signal

# --max-denoising-steps default (or the checkpoint's own max_denoising_steps when larger): ~5x the released
# checkpoint's 48, room to ask for more steps than the default, not for ~1M denoising passes.
DEFAULT_MAX_STEPS = 256


def register(subparsers) -> None:
    from ..cli import add_model_arguments

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_model_arguments(p)
    # Each of host, port and key falls back to its environment variable (documented together in docs/serving.md).
    p.add_argument("--host", default=os.environ.get("BLOCKDIFF_HOST") or "127.0.0.1",
                   help="bind address (default: $BLOCKDIFF_HOST, else 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=None, help="port (default: $BLOCKDIFF_PORT, else 8000)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint folder's name "
                   "for a local path, else the MODEL argument)")
    p.add_argument("--api-key", action="append",
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize and /metrics; repeat "
                        "for several keys (tenants) (default: $BLOCKDIFF_API_KEY)")
    p.add_argument("--api-key-file", metavar="FILE", help="more API keys, one per line (blank lines and lines "
                   "starting with # are skipped)")
    p.add_argument("--cache-salt-by-key", choices=["auto", "on", "off"], default="auto",
                   help="salt each request's prefix-cache blocks by its API key, so tenants never share cached "
                        "prefixes (default auto: on with several keys)")
    p.add_argument("--max-denoising-steps", type=int, help="the most denoising steps per canvas one request may "
                   f"ask for (default: {DEFAULT_MAX_STEPS}, or the checkpoint's max_denoising_steps when larger); "
                   "over it, HTTP 400")
    p.add_argument("--max-model-len", type=int, help="the most positions (prompt + output) one request may use "
                   "(default and most: the model's context); over it, HTTP 400")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests denoised together per tick (default 16)")
    p.add_argument("--max-waiting", type=int, help="queued requests beyond max-num-seqs before 429 "
                   "(default 4 * max-num-seqs)")
    p.add_argument("--prefix-cache-bytes", type=int, default=1 << 30,
                   help="memory for the KV of prompt prefixes reused by later requests (shared system prompts, "
                        "multi-turn chats); least recently used blocks are evicted past it; 0 turns it off "
                        "(default 1 GiB)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20,
                   help="largest request body (then HTTP 413; default 8 MiB)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds without a byte of a request body being read before it is refused (HTTP 408, the "
                        "connection closed); idle time, so a slow but steady upload still works. A request head "
                        "(line and headers) must arrive whole within as long (default 30)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds running requests get to finish on SIGTERM/SIGINT; streams still running then "
                        "get an error event and [DONE] (default 10)")
    p.add_argument("--deterministic", action="store_true",
                   help="a seeded request's output is bit-identical alone or in any batch (per-request compute: "
                        "slower under load); default: one batched pass per tick")
    p.add_argument("--fast", action="store_true",
                   help="approximate fast mode for requests that do not set \"fast\": settled canvas positions "
                        "keep their keys/values across denoising steps (docs/serving.md, \"Fast mode\")")
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="image_url parts may name local files (file:// URLs or paths) under DIR (default: none)")
    p.add_argument("--max-images-per-request", type=int, default=8, help="images in one request (default 8)")
    p.add_argument("--max-image-bytes", type=int, default=5 << 20,
                   help="encoded bytes of all images in one request (default 5 MiB; they arrive base64 in the "
                        "body: --max-body-bytes must hold 4/3 of this)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="decoded pixels of all images in one request (default 40M)")
    p.add_argument("--allowed-origins", action="append", metavar="ORIGIN",
                   help="web origins whose pages may call the API from a browser (CORS), e.g. "
                        "http://localhost:3000; repeat or separate with commas; * for any (default: none, so only "
                        "pages this server serves, the playground, can read its answers in a browser)")
    p.add_argument("--ssl-certfile", metavar="FILE", help="serve HTTPS with this certificate chain (PEM); needs "
                   "--ssl-keyfile")
    p.add_argument("--ssl-keyfile", metavar="FILE", help="the private key (PEM) of --ssl-certfile")
    p.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="serve N data-parallel replicas on Ray Serve (blockdiff.ray; a local Ray is started when none "
                        "runs; requests go to the replica holding their prefix). Needs pip install 'blockdiff[ray]'")
    p.set_defaults(func=cmd_serve)


def api_keys(args) -> list[str]:
    """--api-key (repeated) and --api-key-file, else $BLOCKDIFF_API_KEY; [] for none."""
    from ..cli import CLIError

    keys = list(args.api_key or [])
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                keys += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError as e:
            raise CLIError(f"--api-key-file {args.api_key_file}: cannot read it: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise CLIError(f"--api-key-file {args.api_key_file}: not UTF-8 text") from None
        if not keys:
            raise CLIError(f"--api-key-file {args.api_key_file} holds no key")
    if not keys and os.environ.get("BLOCKDIFF_API_KEY") is not None:
        keys = [os.environ["BLOCKDIFF_API_KEY"]]
    return list(dict.fromkeys(keys))


def default_model_name(model: str) -> str:
    """The checkpoint folder's name for a local path ('./ckpts/dg-sudoku/' -> 'dg-sudoku'), else the hub id."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return os.path.basename(os.path.normpath(os.path.abspath(path)))
    return model


def url(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port`` as a browser reads it: an IPv6 address in brackets (``http://[::1]:8000``)."""
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def check_bindable(host: str, port: int,
                   flags: str = "--host / --port, or $BLOCKDIFF_HOST / $BLOCKDIFF_PORT") -> int:
    """Bind host:port once and let go, as uvicorn will bind it (SO_REUSEADDR): a port in use or an address this
    machine does not have is a one-line error now, not after minutes of loading the model. ``flags``: what sets
    them, for the message. Returns the port (port 0: the free port the system picked, for the server to use and
    the start-up line to print)."""
    import socket

    from ..cli import CLIError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # uvicorn's choice for the same --host
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            return sock.getsockname()[1]
    except OSError as e:
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e} ({flags})") from None


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """--ssl-certfile / --ssl-keyfile: both or neither, and a pair that loads (one line now, not after the model
    has loaded)."""
    import ssl

    from ..cli import CLIError

    if bool(certfile) != bool(keyfile):
        raise CLIError("--ssl-certfile and --ssl-keyfile go together: give both for HTTPS, or neither")
    if not certfile:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as e:  # an OSError too: caught first
        raise CLIError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile} do not load as a PEM certificate "
                       f"chain and its key: {e.reason or e}") from None
    except OSError as e:
        raise CLIError(f"--ssl-certfile / --ssl-keyfile: cannot read {e.filename or certfile}: "
                       f"{e.strerror or e}") from None


def force_exit(llm, srv) -> None:
    """The second Ctrl-C: end the process now, in one line. uvicorn's own force-quit cancels the running requests'
    tasks and the lifespan, and each cancellation printed a CancelledError traceback. A split model's spawned ranks
    are killed first (``llm.close()`` could wait on the engine thread mid-call): they must not outlive this
    process."""
    import sys

    running = sum(not s.finished for s in list(srv.open.values()))
    print(f"blockdiff: interrupted again: exiting now ({running} running request(s) cut off)", file=sys.stderr,
          flush=True)
    for p in getattr(getattr(llm.model, "group", None), "procs", ()):
        p.kill()
    sys.stdout.flush()
    os._exit(130)  # 128 + SIGINT, as for one Ctrl-C ("blockdiff: interrupted")


def cmd_serve(args) -> int:
    from ..cli import CLIError, load_llm
    from .body import check_body_timeout

    keys = api_keys(args)
    if any(not k.strip() for k in keys):
        raise CLIError("the API key (--api-key or $BLOCKDIFF_API_KEY) is empty: pass a non-empty key, or leave "
                       "both unset to serve without one")
    for flag, v in (("--max-denoising-steps", args.max_denoising_steps), ("--max-model-len", args.max_model_len)):
        if v is not None and v < 1:
            raise CLIError(f"{flag} must be >= 1, got {v}")
    if args.max_body_bytes < 1024:
        raise CLIError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    try:
        check_body_timeout(args.body_timeout, "--body-timeout")
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.shutdown_grace < 0:
        raise CLIError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    if args.max_num_seqs < 1:
        raise CLIError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise CLIError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.prefix_cache_bytes < 0:
        raise CLIError(f"--prefix-cache-bytes must be >= 0, got {args.prefix_cache_bytes}")
    if args.port is None:
        env = os.environ.get("BLOCKDIFF_PORT") or "8000"
        try:
            args.port = int(env)
        except ValueError:
            raise CLIError(f"$BLOCKDIFF_PORT must be a port number, got {env!r}") from None
    if not 0 <= args.port < 65536:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    args.port = check_bindable(args.host, args.port)
    from .app import check_origins
    try:
        origins = check_origins(args.allowed_origins)
    except ValueError as e:
        raise CLIError(f"--allowed-origins: {e}") from None
    check_tls(args.ssl_certfile, args.ssl_keyfile)
    if args.replicas and (origins or args.ssl_certfile):
        raise CLIError("--allowed-origins and --ssl-certfile are not supported with --replicas (Ray Serve's proxy "
                       "takes the requests): put a TLS/CORS proxy in front of it, or serve one process")
    if args.replicas < 0:
        raise CLIError(f"--replicas must be >= 1 (or 0, the default: one process, no Ray), got {args.replicas}")
    if args.replicas and (getattr(args, "tensor_parallel_size", 1) > 1 or getattr(args, "expert_parallel", False)):
        # (--expert-parallel reached no replica: it was dropped without a word)
        raise CLIError("--replicas and --tensor-parallel-size / --expert-parallel together are not supported yet: "
                       "pick one")
    from ..vision.media import MediaLimits

    try:
        limits = MediaLimits(max_images=args.max_images_per_request, max_bytes=args.max_image_bytes,
                             max_pixels=args.max_image_pixels, allowed_local_media_path=args.allowed_local_media_path)
    except ValueError as e:
        msg = str(e)
        for name in ("max_images", "max_bytes", "max_pixels", "allowed_local_media_path"):
            flag = {"max_images": "--max-images-per-request", "max_bytes": "--max-image-bytes",
                    "max_pixels": "--max-image-pixels"}.get(name, "--allowed-local-media-path")
            msg = msg.replace(name, flag)
        raise CLIError(msg) from None
    if args.max_body_bytes < args.max_image_bytes * 4 // 3:
        raise CLIError(f"--max-body-bytes ({args.max_body_bytes}) cannot hold --max-image-bytes "
                       f"({args.max_image_bytes}) of base64 images: raise it to at least "
                       f"{args.max_image_bytes * 4 // 3 + 65536}")
    if args.replicas:
        from ..cli import check_before_load, quantization_kwargs
        check_before_load(args)  # what load_llm checks before loading, checked before the replicas start
        quantization_kwargs(args)
        from ..hub import is_gguf, looks_like_hub_id, resolve_path
        local = os.path.expanduser(args.model)
        if not is_gguf(local, args.gguf_file) and not looks_like_hub_id(local):
            resolve_path(local)  # a missing folder is one line now, not a failed deployment in a minute
        try:
            from ..ray import serve_replicas
        except ImportError as e:
            raise CLIError(f"--replicas needs Ray Serve: pip install 'blockdiff[ray]' ({e})") from None
        return serve_replicas(args, keys, limits)
    import uvicorn

    from .app import build_app
    from .head_timeout import h11_protocol

    llm = load_llm(args, prefix_cache_bytes=args.prefix_cache_bytes)
    ctx = llm.model.text.max_position_embeddings
    if args.max_model_len is not None and args.max_model_len > ctx:
        raise CLIError(f"--max-model-len {args.max_model_len} is more than the model's context of {ctx} positions "
                       "(max_position_embeddings in its config.json): give at most that, or leave it unset")
    llm.engine.fast = bool(args.fast)
    name = args.served_model_name or default_model_name(args.model)
    steps = args.max_denoising_steps or max(DEFAULT_MAX_STEPS, llm.defaults.max_denoising_steps)
    salt = {"auto": None, "on": True, "off": False}[args.cache_salt_by_key]
    app = build_app(llm, name, api_key=keys or None, max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                    max_body_bytes=args.max_body_bytes, media_limits=limits, max_denoising_steps=steps,
                    max_model_len=args.max_model_len, salt_by_key=salt,
                    body_timeout=args.body_timeout, allowed_origins=origins)
    base = url("https" if args.ssl_certfile else "http", args.host, args.port)
    print(f"blockdiff: serving {name!r} on {base}/v1 "
          f"(device {args.device}, max_num_seqs {args.max_num_seqs}{', deterministic' if llm.deterministic else ''}"
          f"{', fast mode by default' if args.fast else ''}"
          f"{', API key required' if keys else ''}{f' ({len(keys)} keys)' if len(keys) > 1 else ''}, "
          f"max_denoising_steps {steps}, max_model_len {app.state.server.context}); "
          f"the playground page: {base}/"
          + (f"; browser pages of {', '.join(origins)} may call it" if origins else ""), flush=True)
    grace = args.shutdown_grace

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: start draining before uvicorn's grace runs out
            if self.should_exit and sig == signal.SIGINT:
                force_exit(llm, app.state.server)  # the second Ctrl-C
            app.state.server.begin_drain(grace)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal it handled as this exits; SIGTERM's default action then ends the process
            # at once, before the ``finally`` below: a split model's ranks must be told to stop first (else each
            # found rank 0 gone and died with a traceback; on NCCL it could wait out the collective timeout)
            with super().capture_signals():
                try:
                    yield
                finally:
                    llm.close()

    try:
        Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                              http=h11_protocol(args.body_timeout),
                              ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                              timeout_graceful_shutdown=grace)).run()
    finally:
        llm.close()  # a split model: end the other ranks
    return 0
