"""``blockdiff serve MODEL``: the OpenAI-compatible server on uvicorn (loopback unless ``--host`` says otherwise)."""

from __future__ import annotations

import os


def register(subparsers) -> None:
    from ..cli import add_model_arguments

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model id clients send (default: the MODEL argument)")
    p.add_argument("--api-key", default=os.environ.get("BLOCKDIFF_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $BLOCKDIFF_API_KEY)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests denoised together per tick")
    p.add_argument("--max-waiting", type=int, help="queued requests beyond max-num-seqs before 429 "
                   "(default 4 * max-num-seqs)")
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="image_url parts may name local files (file:// URLs or paths) under DIR (default: none)")
    p.add_argument("--max-images-per-request", type=int, default=8)
    p.add_argument("--max-image-bytes", type=int, default=10 << 20,
                   help="encoded bytes of all images in one request (default 10 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="decoded pixels of all images in one request (default 40M)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..cli import CLIError, load_llm

    if args.max_num_seqs < 1:
        raise CLIError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise CLIError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if not 0 <= args.port < 65536:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    from ..vision.media import MediaLimits

    try:
        limits = MediaLimits(max_images=args.max_images_per_request, max_bytes=args.max_image_bytes,
                             max_pixels=args.max_image_pixels, allowed_local_media_path=args.allowed_local_media_path)
    except ValueError as e:
        raise CLIError(str(e).replace("allowed_local_media_path", "--allowed-local-media-path")) from None
    import uvicorn

    from .app import build_app

    llm = load_llm(args)
    name = args.served_model_name or args.model
    app = build_app(llm, name, api_key=args.api_key, max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                    media_limits=limits)
    print(f"blockdiff: serving {name!r} on http://{args.host}:{args.port}/v1 "
          f"(max_num_seqs {args.max_num_seqs}{', API key required' if args.api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0
