"""The ``blockdiff`` command line: ``run``, ``chat`` and ``bench`` here; ``serve``, ``train``, ``sudoku`` / ``demo``
registered by their own packages when they are importable.

Examples::

    blockdiff run path/to/checkpoint "Why is the sky blue?" --max-new-tokens 256 --seed 0 --live
    blockdiff run path/to/checkpoint "1 2 3" --raw --steps 16
    blockdiff chat path/to/checkpoint
    blockdiff bench --random-config mid --out bench.json

Bad input (a missing checkpoint, an invalid sampling parameter) prints one line to stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

SUBCOMMAND_MODULES = ("blockdiff.bench.cli", "blockdiff.server.cli", "blockdiff.train.cli", "blockdiff.sudoku.cli",
                      "blockdiff.quant.cli")


class CLIError(ValueError):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- arguments
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder, hub id or .gguf file")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16")
    add_quantization_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = auto: 1 for models under 20M parameters, else torch's default)")
    add_parallel_arguments(p)


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N processes (N GPUs with NCCL on CUDA, gloo on CPU; this process is "
                        "rank 0; see docs/scaling.md)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: whole experts per rank instead of a slice of every expert")


def parallel_kwargs(args) -> dict:
    """The LLM keyword arguments of --tensor-parallel-size / --expert-parallel."""
    return {"tensor_parallel_size": getattr(args, "tensor_parallel_size", 1),
            "expert_parallel": getattr(args, "expert_parallel", False)}


def add_quantization_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", default=None,
                   help="quantize weights while loading: int8 | int4 (int4-g32, int4-g128; int4-all) | fp8 (CUDA, compute "
                        "capability 8.9+); quantized checkpoints and .gguf files need no flag")
    p.add_argument("--keep-embedding", action="store_true",
                   help="with --quantization: keep the tied embedding / LM head in full precision (default int8)")


def quantization_kwargs(args) -> dict:
    """The load_model / LLM keyword arguments of --quantization and --keep-embedding."""
    return {"quantization": getattr(args, "quantization", None),
            "quantize_embedding": not getattr(args, "keep_embedding", False)}


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset values come from the checkpoint's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--steps", type=int, dest="max_denoising_steps", help="maximum denoising steps per canvas")
    g.add_argument("--entropy-bound", type=float)
    g.add_argument("--t-min", type=float)
    g.add_argument("--t-max", type=float)
    g.add_argument("--stability-threshold", type=int)
    g.add_argument("--confidence-threshold", type=float)
    g.add_argument("--rng", choices=["default", "reference"], default="default",
                   help="reference: draw random numbers exactly as the transformers reference does")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--live", action="store_true", help="redraw the canvas in the terminal as it denoises")


def sampling_params(args):
    from .sampling.params import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed,
                          max_denoising_steps=args.max_denoising_steps, entropy_bound=args.entropy_bound,
                          t_min=args.t_min, t_max=args.t_max, stability_threshold=args.stability_threshold,
                          confidence_threshold=args.confidence_threshold, rng=args.rng, stop=args.stop)


def check_device(device: str) -> None:
    """One line for a device this machine cannot use (unknown name, a backend that is not available, an index
    past the devices there are) instead of a traceback from deep inside the load."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CLIError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        available = torch.backends.mps.is_available()
    else:
        is_available = getattr(backend, "is_available", None)
        available = bool(is_available and is_available())
    if not available:
        raise CLIError(f"--device {device}: {dev.type.upper()} is not available on this machine (try --device cpu)")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise CLIError(f"--device {device}: this machine has {count()} {dev.type} device(s)")


def check_threads(threads: int) -> None:
    if threads < 0:
        raise CLIError(f"--threads must be >= 0 (0 = automatic), got {threads}")


def load_llm(args, **engine_args):
    import torch

    from .engine.llm import LLM

    check_threads(args.threads)
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, deterministic=getattr(args, "deterministic", False),
              **quantization_kwargs(args), **parallel_kwargs(args), **engine_args)
    if not args.threads:
        auto_threads(llm.model)
    return llm


SMALL_MODEL_PARAMS = 20_000_000


def auto_threads(model) -> None:
    """One CPU thread for small models: their ops are too small to split, and on a busy 2-core machine every
    multi-threaded op waits for a core (measured here: a tiny model's step 50x slower with 2 threads under load)."""
    import torch

    if model.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


# ---------------------------------------------------------------------------------------------- output
def closing_line(out) -> str:
    m = out.metrics
    n = len(out.token_ids)
    secs = m.seconds
    rate = n / secs if secs > 0 else 0.0
    tpf = n / m.denoise_steps if m.denoise_steps else 0.0
    return (f"[{n} tokens · {m.denoise_steps} denoising steps · {m.canvases} "
            f"{'canvas' if m.canvases == 1 else 'canvases'} · {tpf:.2f} tokens/forward · {rate:.1f} tok/s · "
            f"{secs:.2f} s · {out.finish_reason}]")


def answer_text(out) -> str:
    return out.text if out.text is not None else " ".join(map(str, out.token_ids))


def generate_with_view(llm, generate, live: bool, max_steps: int, title: str | None = None):
    """Run ``generate(on_event)``; with ``live`` and a terminal on stdout, redraw the canvas while it runs."""
    from rich.console import Console

    console = Console()
    if not live or not console.is_terminal:
        return generate(None)
    from rich.live import Live

    from .live import CanvasView

    tok = llm.tokenizer
    view = CanvasView(decode=None if tok is None else tok.decode, max_steps=max_steps, title=title)
    last = [0.0]
    with Live(view, console=console, auto_refresh=False, transient=True) as display:
        def on_event(ev):
            view.update(ev)
            now = time.perf_counter()
            if ev.kind != "draft" or now - last[0] > 1 / 30:  # at most ~30 redraws a second
                last[0] = now
                display.refresh()
        return generate(on_event)


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise CLIError(f"--prompt-ids must be integers separated by commas or spaces, got {text!r}") from None
    if not ids:
        raise CLIError("--prompt-ids is empty")
    return ids


# ---------------------------------------------------------------------------------------------- run
def read_images(paths: list[str] | None) -> list:
    """--image files -> decoded images (one clear line for a missing, undecodable or unsupported file)."""
    from .vision.media import ImageLoader, MediaLimits

    if not paths:
        return []
    loader = ImageLoader(MediaLimits(max_images=len(paths), max_bytes=1 << 62, max_pixels=1 << 62))
    images = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            images.append(loader.load(data, len(images)))
        except OSError as e:
            raise CLIError(f"--image {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise CLIError(f"--image {path}: {str(e).split(': ', 1)[-1]}") from None
    return images


def cmd_run(args) -> int:
    if (args.prompt is None) == (args.prompt_ids is None):
        raise CLIError("give a prompt, or --prompt-ids (not both)")
    params = sampling_params(args)  # validate before the (slow) model load
    images = read_images(args.image)
    llm = load_llm(args)
    if images and llm.model.vision is None:
        raise CLIError(f"--image: {args.model} has no vision tower (a text-only checkpoint): it cannot take images")
    tok = llm.tokenizer
    steps = params.max_denoising_steps or llm.defaults.max_denoising_steps
    if args.prompt_ids is not None:
        ids = parse_token_ids(args.prompt_ids)
        prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}

        def generate(on_event):
            return llm.generate([prompt], sampling_params=params, on_event=on_event)
    else:
        if tok is None:
            raise CLIError(f"{args.model} has no tokenizer.json: pass the prompt as --prompt-ids")
        use_chat = args.chat if args.chat is not None else has_chat_template(tok)
        if use_chat and not has_chat_template(tok):
            raise CLIError(f"{args.model} has no chat template: use --raw")
        if use_chat:
            content = args.prompt if not images else \
                [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": args.prompt}]
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                [{"role": "user", "content": content}]

            def generate(on_event):
                return llm.chat(messages, params, on_event=on_event)
        else:
            text = args.prompt
            mark = llm.images.placeholder
            if images and mark not in text:
                text = mark * len(images) + text
            prompt = {"prompt": text, "multi_modal_data": {"image": images}} if images else text

            def generate(on_event):
                return llm.generate([prompt], params, on_event=on_event)
    out = generate_with_view(llm, generate, args.live, steps)[0]
    print(answer_text(out))
    print(closing_line(out), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- chat
def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line if line else None


def cmd_chat(args) -> int:
    base = sampling_params(args)
    llm = load_llm(args)
    if not has_chat_template(llm.tokenizer):
        raise CLIError(f"{args.model} has no chat template (chat needs tokenizer.json and a chat template); "
                       "use `blockdiff run --raw`")
    steps = base.max_denoising_steps or llm.defaults.max_denoising_steps
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("blockdiff chat: /reset clears the conversation, /exit (or Ctrl-D) ends it.")
    turn = 0
    while True:
        line = _read_line(interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(system)
            print("(conversation cleared)", flush=True)
            continue
        messages.append({"role": "user", "content": line})
        params = base
        if base.seed is not None:  # a fixed seed, but not the same random numbers for every turn
            import dataclasses
            params = dataclasses.replace(base, seed=base.seed + turn)
        try:
            out = generate_with_view(llm, lambda ev: llm.chat(messages, params, on_event=ev), args.live, steps)[0]
        except ValueError as e:  # e.g. the conversation outgrew the context: keep the session alive
            messages.pop()
            print(f"blockdiff: error: {e}", file=sys.stderr, flush=True)
            continue
        turn += 1
        text = answer_text(out)
        print(text)
        print(closing_line(out), flush=True)
        messages.append({"role": "assistant", "content": text})
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockdiff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"blockdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="generate an answer to one prompt")
    add_model_arguments(p)
    p.add_argument("prompt", nargs="?", help="the prompt text")
    p.add_argument("--prompt-ids", help="the prompt as token ids ('2,105,...'), for checkpoints without a tokenizer")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the chat template (the default when the checkpoint has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="send the prompt as plain text")
    p.add_argument("--system", help="system message (chat mode)")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="an image for the prompt (repeatable; needs a checkpoint with a vision tower). Raw prompts "
                        "mark where it goes with <|image|> (else the images come first)")
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    add_model_arguments(p)
    p.add_argument("--system", help="system message")
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_chat)

    for name in SUBCOMMAND_MODULES:
        # Each piece registers its own subcommand; a missing or broken piece never takes the CLI down.
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        except Exception as e:  # a broken piece: say so, keep the other subcommands working
            print(f"blockdiff: warning: the {name.split('.')[1]} subcommand is unavailable: {e}", file=sys.stderr)
            continue
        register = getattr(mod, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = func(args)
    except KeyboardInterrupt:
        print("blockdiff: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:  # bad path/params, I/O, a missing optional dependency
        print(f"blockdiff: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # subcommands that exit with a message
        if isinstance(e.code, str):
            print(f"blockdiff: error: {e.code}", file=sys.stderr)
            return 2
        return 0 if e.code is None else int(e.code)
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
