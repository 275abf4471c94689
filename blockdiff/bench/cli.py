"""``blockdiff bench``: blockdiff (default and reference modes), the transformers oracle and autoregressive
decoding of the same weights, timed side by side in one run.

Examples::

    blockdiff bench --random-config mid --out bench.json
    blockdiff bench path/to/checkpoint --steps 16 --max-new-tokens 256 --no-oracle
    blockdiff bench --random-config vocab-full --batch 16 --tick-memory --no-oracle --systems blockdiff-default
    blockdiff bench --random-config full --device cuda --batches 1,4,16 --out full.json

``--random-config full`` (and its toy twin ``full-smoke``) times denoising ticks of the released 26B-A4B shape
built with random weights directly on the device, per batch size, against the memory-bandwidth floor
(see blockdiff/bench/full_shape_ticks.py); the other options of the side-by-side comparison do not apply to it.
A flag the chosen benchmark does not read (``--tools`` without ``--structured``, ``--batches`` outside ``--random-config
full``, ``--quantization`` with ``--structured``, ``--out`` with ``--profile``, ...) is refused before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def _int_list(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .checkpoints import PRESETS
    from .full_shape_ticks import SHAPES

    p.add_argument("model", nargs="?", help="checkpoint folder (or use --random-config)")
    p.add_argument("--random-config", choices=sorted(set(PRESETS) | set(SHAPES)),
                   help="benchmark a randomly initialised checkpoint of this size, built in a temp dir; 'full' / "
                        "'full-smoke': the released shape built on the device, timed per batch size")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16")
    p.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (early stopping disabled)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per request (default: one canvas)")
    p.add_argument("--batch", type=int, default=1, help="requests decoded together by the diffusion systems")
    p.add_argument("--ar-batches", type=_int_list, default=(1, 8), help="AR baseline batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-oracle", dest="oracle", action="store_false", help="skip the transformers reference")
    p.add_argument("--systems", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="only these (comma-separated): blockdiff-default, blockdiff-fast, blockdiff-reference, oracle, ar-bN")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    from ..cli import add_parallel_arguments
    add_parallel_arguments(p)
    p.add_argument("--quantization", help="quantize blockdiff's weights while loading: int8 | int4 | fp8 (the "
                   "oracle stays full precision, so the reference/oracle agreement measures the quantization); "
                   "with --random-config full: int8/int4, the shape built in CPU memory quantized tensor by "
                   "tensor, one denoise step timed (blockdiff/bench/full_shape_quantized.py)")
    p.add_argument("--structured", action="store_true",
                   help="instead, time structured output (JSON Schema) against unconstrained generation per step "
                        "and end to end (the checkpoint needs a tokenizer; --random-config writes one)")
    p.add_argument("--tools", action="store_true",
                   help="with --structured: also time tool calls (tool_choice required / auto) per step; "
                        "--tools-only: those without the JSON rows")
    p.add_argument("--tools-only", action="store_true", help="with --structured: only the tool-call rows")
    p.add_argument("--no-memory-run", dest="memory_run", action="store_false",
                   help="CPU: skip the separate untimed run per system that measures peak memory")
    p.add_argument("--tick-memory", action="store_true",
                   help="also measure one default-mode denoising tick at --batch: the logits buffer and the "
                        "temporaries beyond it (untimed)")
    g = p.add_argument_group("--random-config full / full-smoke")
    g.add_argument("--batches", type=_int_list, default=(1, 4, 16), help="batch sizes (default 1,4,16)")
    g.add_argument("--fast", action="store_true", help="also time every batch size in fast mode (approximate)")
    g.add_argument("--layers", type=int, help="override the number of layers (smoke runs)")
    g.add_argument("--peak-bandwidth", type=float, help="the device's peak memory bandwidth in GB/s "
                   "(default: a table by torch.cuda.get_device_name)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile one denoising run of blockdiff-default and of the oracle")


def run(args) -> int:
    import torch

    from .harness import BenchOptions, format_table, run_benchmark

    if (args.model is None) == (args.random_config is None):
        raise ValueError("give a checkpoint folder or --random-config (one of them)")
    if args.out:  # before minutes of benchmark, not after them
        from ..files import check_writable
        check_writable(args.out)
    from ..cli import check_device, check_threads

    check_threads(args.threads)
    args.device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..quant import check_device, parse_method
    parsed = parse_method(args.quantization)  # a bad method fails before the (slow) checkpoint build
    if parsed:
        check_device(parsed[0], args.device)
    _refuse_unused_flags(args, bool(parsed))
    if args.systems:  # an unknown name fails before the (slow) checkpoint build, not after it
        from .harness import check_systems
        check_systems(args.systems, args.ar_batches if args.tensor_parallel_size == 1 else ())
    from .full_shape_ticks import SHAPES
    if args.random_config == "full" and parsed:  # quantized: built in CPU memory tensor by tensor (full_shape_quantized.py)
        from .full_shape_quantized import run as run_quantized_full
        report = run_quantized_full("full", args.quantization, prompt_len=args.prompt_len, seed=args.seed,
                                    log=lambda m: print(m, file=sys.stderr, flush=True), layers=args.layers)
        if args.out:
            _write_report(args.out, report)
        return 0
    if args.random_config in SHAPES:
        return run_full(args)
    options = BenchOptions(steps=args.steps, max_new_tokens=args.max_new_tokens, batch=args.batch,
                           ar_batches=tuple(args.ar_batches), prompt_len=args.prompt_len, repeats=args.repeats,
                           warmup=args.warmup, seed=args.seed, oracle=args.oracle, dtype=args.dtype,
                           device=args.device, systems=args.systems, memory_run=args.memory_run,
                           tick_memory=args.tick_memory, quantization=args.quantization,
                           tensor_parallel_size=args.tensor_parallel_size, expert_parallel=args.expert_parallel)
    options.validate()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="blockdiff-bench-") as tmp:
        path = args.model
        if args.random_config:
            from .checkpoints import write_random_checkpoint
            log(f"building a random '{args.random_config}' checkpoint in {tmp} ...")
            path = write_random_checkpoint(tmp, args.random_config, seed=args.seed, with_tokenizer=args.structured)
            options.extra["checkpoint_name"] = f"random:{args.random_config}"
        if args.structured:
            from .structured import format_structured, run_structured_benchmark
            report = run_structured_benchmark(path, steps=args.steps, repeats=args.repeats,
                                              prompt_len=args.prompt_len, seed=args.seed, dtype=args.dtype,
                                              device=args.device, log=log, tools=args.tools or args.tools_only,
                                              json_rows=not args.tools_only)
            print(format_structured(report))
            if args.out:
                _write_report(args.out, report)
            return 0
        if args.profile:
            from .profile import profile_report
            print(profile_report(path, options, log=log))
            return 0
        report = run_benchmark(path, options, log=log)
    print(format_table(report))
    if args.out:
        _write_report(args.out, report)
        log(f"wrote {args.out}")
    return 0


FULL_ONLY = ("--batches", "--fast", "--layers", "--peak-bandwidth")
NOT_FULL = ("--structured", "--tools", "--tools-only", "--profile", "--tick-memory", "--systems",
            "--tensor-parallel-size", "--expert-parallel")


def _refuse_unused_flags(args, quantized: bool) -> None:
    """A flag the chosen benchmark never reads is one line and exit 2, before any work: ``--tools`` without
    ``--structured`` ran the whole side-by-side comparison with no tool rows, ``--structured --quantization int8``
    timed the unquantized model, ``--profile --out f.json`` wrote no file, ``--random-config full-smoke
    --quantization int8`` ran unquantized, ``--batches`` / ``--fast`` outside ``--random-config full`` did nothing."""
    from .full_shape_ticks import SHAPES

    given = {"--batches": tuple(args.batches) != (1, 4, 16), "--fast": args.fast, "--layers": args.layers is not None,
             "--peak-bandwidth": args.peak_bandwidth is not None, "--structured": args.structured,
             "--tools": args.tools, "--tools-only": args.tools_only, "--profile": args.profile,
             "--tick-memory": args.tick_memory, "--systems": bool(args.systems),
             "--tensor-parallel-size": args.tensor_parallel_size != 1, "--expert-parallel": args.expert_parallel,
             "--quantization": quantized, "--out": bool(args.out)}
    if args.random_config == "full" and quantized:
        mode, unused = "--random-config full --quantization (one step of the shape built in CPU memory)", \
            ("--batches", "--fast", "--peak-bandwidth") + NOT_FULL
    elif args.random_config in SHAPES:
        mode, unused = f"--random-config {args.random_config}", NOT_FULL + (("--quantization",) if quantized else ())
    elif args.structured:
        mode, unused = "--structured", FULL_ONLY + ("--quantization", "--profile", "--tick-memory", "--systems",
                                                    "--tensor-parallel-size", "--expert-parallel")
    elif args.profile:
        mode, unused = "--profile (it prints its breakdown; there is no JSON report)", FULL_ONLY + (
            "--tools", "--tools-only", "--tick-memory", "--tensor-parallel-size", "--expert-parallel", "--out")
    else:
        mode, unused = "the side-by-side comparison", FULL_ONLY + ("--tools", "--tools-only")
    flag = next((f for f in unused if given[f]), None)
    if flag is None:
        return
    where = " (it applies with --structured)" if flag in ("--tools", "--tools-only") else \
        "" if flag not in FULL_ONLY else " (it applies without --quantization)" if args.random_config == "full" \
        else " (it applies with --random-config full / full-smoke)"
    raise ValueError(f"{flag} does not apply to {mode}{where}")


def _write_report(path: str, report: dict) -> None:
    from ..files import write_output
    write_output(path, json.dumps(report, indent=2) + "\n")


def run_full(args) -> int:
    from .full_shape_ticks import format_full, run_full_benchmark

    if args.peak_bandwidth is not None and not args.peak_bandwidth > 0:
        raise ValueError(f"--peak-bandwidth must be > 0 GB/s, got {args.peak_bandwidth}")
    report = run_full_benchmark(args.random_config, device=args.device, dtype=args.dtype, batches=args.batches,
                                layers=args.layers, prompt_len=args.prompt_len, warmup=args.warmup,
                                repeats=args.repeats, peak_bandwidth_gbs=args.peak_bandwidth, seed=args.seed,
                                log=lambda m: print(m, file=sys.stderr, flush=True), fast=args.fast)
    print(format_full(report))
    if args.out:
        _write_report(args.out, report)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time blockdiff against the transformers reference and AR decoding",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
