"""``blockdiff serve MODEL``: the OpenAI-compatible server on uvicorn (loopback unless ``--host`` says otherwise)."""

from __future__ import annotations

import os


def register(subparsers) -> None:
    from ..cli import add_model_arguments

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint folder's name "
                   "for a local path, else the MODEL argument)")
    p.add_argument("--api-key", default=os.environ.get("BLOCKDIFF_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $BLOCKDIFF_API_KEY)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests denoised together per tick")
    p.add_argument("--max-waiting", type=int, help="queued requests beyond max-num-seqs before 429 "
                   "(default 4 * max-num-seqs)")
    p.add_argument("--prefix-cache-bytes", type=int, default=1 << 30,
                   help="memory for the KV of prompt prefixes reused by later requests (shared system prompts, "
                        "multi-turn chats); least recently used blocks are evicted past it; 0 turns it off "
                        "(default 1 GiB)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body (then HTTP 413)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds running requests get to finish on SIGTERM/SIGINT; streams still running then "
                        "get an error event and [DONE]")
    p.add_argument("--deterministic", action="store_true",
                   help="a seeded request's output is bit-identical alone or in any batch (per-request compute: "
                        "slower under load); default: one batched pass per tick")
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="image_url parts may name local files (file:// URLs or paths) under DIR (default: none)")
    p.add_argument("--max-images-per-request", type=int, default=8)
    p.add_argument("--max-image-bytes", type=int, default=5 << 20,
                   help="encoded bytes of all images in one request (default 5 MiB; they arrive base64 in the "
                        "body: --max-body-bytes must hold 4/3 of this)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="decoded pixels of all images in one request (default 40M)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="serve N data-parallel replicas on Ray Serve (blockdiff.ray; a local Ray is started when none "
                        "runs; requests go to the replica holding their prefix). Needs pip install 'blockdiff[ray]'")
    p.set_defaults(func=cmd_serve)


def default_model_name(model: str) -> str:
    """The checkpoint folder's name for a local path ('./ckpts/dg-sudoku/' -> 'dg-sudoku'), else the hub id."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return os.path.basename(os.path.normpath(os.path.abspath(path)))
    return model


def cmd_serve(args) -> int:
    from ..cli import CLIError, load_llm

    if args.api_key is not None and not args.api_key.strip():
        raise CLIError("the API key (--api-key or $BLOCKDIFF_API_KEY) is empty: pass a non-empty key, or leave "
                       "both unset to serve without one")
    if args.max_body_bytes < 1024:
        raise CLIError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    if args.shutdown_grace < 0:
        raise CLIError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    if args.max_num_seqs < 1:
        raise CLIError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise CLIError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.prefix_cache_bytes < 0:
        raise CLIError(f"--prefix-cache-bytes must be >= 0, got {args.prefix_cache_bytes}")
    if not 0 <= args.port < 65536:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    if args.replicas < 0:
        raise CLIError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replicas:
        if getattr(args, "tensor_parallel_size", 1) > 1:
            raise CLIError("--replicas and --tensor-parallel-size together are not supported yet: pick one")
        try:
            from ..ray import serve_replicas
        except ImportError as e:
            raise CLIError(f"--replicas needs Ray Serve: pip install 'blockdiff[ray]' ({e})") from None
        return serve_replicas(args)
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
    import uvicorn

    from .app import build_app

    llm = load_llm(args, prefix_cache_bytes=args.prefix_cache_bytes)
    name = args.served_model_name or default_model_name(args.model)
    app = build_app(llm, name, api_key=args.api_key, max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                    max_body_bytes=args.max_body_bytes, media_limits=limits)
    print(f"blockdiff: serving {name!r} on http://{args.host}:{args.port}/v1 "
          f"(max_num_seqs {args.max_num_seqs}{', deterministic' if llm.deterministic else ''}"
          f"{', API key required' if args.api_key else ''})", flush=True)
    grace = args.shutdown_grace

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: start draining before uvicorn's grace runs out
            app.state.server.begin_drain(grace)
            super().handle_exit(sig, frame)

    try:
        Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                              timeout_graceful_shutdown=grace)).run()
    finally:
        llm.close()  # a split model: end the other ranks
    return 0
