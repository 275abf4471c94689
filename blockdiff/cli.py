"""The blockdiff command line: run, chat and bench here; serve, train, sudoku / demo and quantize registered by
their own packages when they are importable.

Examples:

    blockdiff run path/to/checkpoint "Why is the sky blue?" --max-new-tokens 256 --seed 0 --live
    blockdiff run path/to/checkpoint "1 2 3" --raw --steps 16
    blockdiff chat path/to/checkpoint
    blockdiff bench --random-config mid --out bench.json
    blockdiff demo --web                  # the playground on the bundled Sudoku model

Bad input (a missing checkpoint, an invalid sampling parameter) prints one line to stderr and exits with 2;
Ctrl-C prints "blockdiff: interrupted" and exits with 130. Output files are written whole or not at all. A reader
that stops early (`| head -1`) ends the command quietly with 141, as SIGPIPE ends other tools; text the terminal's
encoding cannot show (LANG=C without UTF-8, PYTHONIOENCODING=ascii) is printed with '?' in its place.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import select
import signal
import sys
import threading
import time
import unicodedata

SUBCOMMAND_MODULES = ("blockdiff.bench.cli", "blockdiff.server.cli", "blockdiff.train.cli", "blockdiff.sudoku.cli",
                      "blockdiff.quant.cli")


log = logging.getLogger("blockdiff")


class CLIError(ValueError):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- arguments
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder, hub id (org/name), .gguf file or org/name:file.gguf")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16")
    add_quantization_arguments(p)
    add_device_argument(p)
    g = p.add_argument_group("hub ids (huggingface_hub; its cache is $HF_HOME/hub unless --download-dir)")
    g.add_argument("--revision", help="branch, tag or commit of the hub repo (default: its main branch)")
    g.add_argument("--download-dir", help="download into / read from this cache folder instead of $HF_HOME/hub")
    g.add_argument("--gguf-file", metavar="NAME", help="load this .gguf file of the hub repo MODEL (same as "
                   "MODEL:NAME)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = auto: 1 for models under 20M parameters, else torch's default)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the checkpoint's (e.g. one that declares tools)")
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


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")


def add_quantization_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", default=None,
                   help="quantize weights while loading: int8 | int4 (int4-g32, int4-g128; int4-all) | fp8 (CUDA, compute "
                        "capability 8.9+); quantized checkpoints and .gguf files need no flag")
    p.add_argument("--keep-embedding", action="store_true",
                   help="with --quantization: keep the tied embedding / LM head in full precision (default int8)")


def quantization_kwargs(args) -> dict:
    """The load_model / LLM keyword arguments of --quantization and --keep-embedding."""
    method = getattr(args, "quantization", None)
    keep = getattr(args, "keep_embedding", False)
    if method is not None and not method.strip():
        raise CLIError("--quantization is empty: give int8, int4, fp8 (or leave the flag out)")
    if keep and (method is None or method.strip().lower() == "none"):  # "none" quantizes nothing: it was ignored
        raise CLIError("--keep-embedding applies only with --quantization (it keeps the embedding out of it)")
    return {"quantization": method, "quantize_embedding": not keep}


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


def check_device(device: str) -> str:
    """The device to use (``auto`` resolved); one line for a device this machine cannot use (unknown name, a
    backend that is not available, an index past the devices there are) instead of a traceback from deep inside
    the load."""
    import torch

    from .placement import resolve_device, unavailable

    if device is None or device.strip().lower() == "auto":
        return resolve_device(device)
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        try:
            resolve_device(device)  # the one line for an unknown name
        except ValueError as e:
            raise CLIError(f"bad --device: {e}") from None
    why = unavailable(device)
    if why is not None:
        raise CLIError(f"--device {device}: {why} (try --device cpu)")
    return device


# torch.set_num_threads(100000) kills the process with a segfault and no message; no CPU has this many cores.
MAX_THREADS = 1024


def check_threads(threads: int) -> None:
    if threads < 0:
        raise CLIError(f"--threads must be >= 0 (0 = automatic), got {threads}")
    if threads > MAX_THREADS:
        raise CLIError(f"--threads must be <= {MAX_THREADS}, got {threads}")


def check_before_load(args) -> None:
    """What can be checked of the flags before the (slow) load: --threads, the --chat-template file (its syntax is
    checked after the load). Also run before ``serve --replicas`` starts Ray."""
    check_threads(args.threads)
    template = getattr(args, "chat_template", None)
    if template and not os.path.isfile(template):
        why = "it is a folder" if os.path.isdir(template) else "no such file"
        raise CLIError(f"--chat-template: cannot read {template}: {why}")


def load_llm(args, **engine_args):
    import torch

    from .engine.llm import LLM

    from .placement import describe_device

    check_before_load(args)
    asked = args.device
    args.device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, device=args.device, deterministic=getattr(args, "deterministic", False),
              revision=args.revision, download_dir=args.download_dir, gguf_file=args.gguf_file,
              **quantization_kwargs(args), **parallel_kwargs(args), **engine_args)
    why = "" if asked != "auto" else " (--device auto: no CUDA device found)" if args.device == "cpu" else \
        " (--device auto)"
    log.info("loaded %s in %.1f s; device: %s%s, dtype %s", args.model, time.perf_counter() - t0,
             describe_device(args.device), why, str(llm.model.dtype).removeprefix("torch."))
    if not args.threads:
        auto_threads(llm.model)
    if getattr(args, "chat_template", None):
        use_chat_template(llm, args.chat_template)
    return llm


def use_chat_template(llm, path: str) -> None:
    """``--chat-template FILE``: the template replaces the checkpoint's (checked for Jinja syntax now)."""
    if llm.tokenizer is None:
        raise CLIError(f"--chat-template: {llm.model_path} has no tokenizer.json to go with a chat template")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CLIError(f"--chat-template: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # was "'utf-8' codec can't decode byte 0xff in position 0", no flag, no file
        raise CLIError(f"--chat-template: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                       f"{e.start})") from None
    try:
        llm.tokenizer.set_chat_template(text)
    except ValueError as e:
        raise CLIError(f"--chat-template: {path}: {e}") from None


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


def shown_answer(llm, text: str) -> str:
    """The answer as the terminal shows it (the Sudoku model's 81 digits also as a grid). On a terminal, control
    characters of the model's text other than newline and tab are shown escaped (``\\x1b``): an escape sequence
    would otherwise act on the terminal (move the cursor, retitle the window, hide text). Piped output stays the
    text itself."""
    display = getattr(llm.tokenizer, "display", None)
    text = display(text) if display is not None and text else text
    return _escape_controls(text) if sys.stdout.isatty() else text


def _escape_controls(text: str) -> str:
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in text)


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


def check_context_before_load(args, prompt_tokens: int | None) -> None:
    """--max-new-tokens against the context in a local checkpoint's config.json, before the (slow) load: the
    engine's own check (the same words) comes only after it. ``prompt_tokens``: the prompt's length when known
    (--prompt-ids), else None (a text prompt: at least one token). Hub ids and GGUF files: their config is known
    only after fetching them; the engine's check covers them."""
    if args.max_new_tokens is None or args.max_new_tokens < 1:  # (< 1: SamplingParams' error, said already)
        return
    from .hub import is_gguf

    config = os.path.join(os.path.expanduser(args.model), "config.json")
    if is_gguf(args.model, args.gguf_file) or not os.path.isfile(config):
        return
    from .config import ModelConfig
    from .engine.engine import check_fits

    try:
        cfg = ModelConfig.from_file(config)
    except Exception:  # a broken config is the loader's error, said the loader's way
        return
    try:
        check_fits(prompt_tokens or 1, args.max_new_tokens, cfg.canvas_length, cfg.text.max_position_embeddings,
                   at_least=prompt_tokens is None)
    except ValueError as e:
        raise CLIError(str(e)) from None


def check_text_arguments(args) -> None:
    """The prompt, --system and --stop as UTF-8 text, before the load: a byte that was not UTF-8 (a Latin-1 'é'
    typed or pasted into a terminal) reaches Python as a lone surrogate, and was a tokenizer traceback."""
    from .tokenizer import check_unicode

    texts = [("the prompt", getattr(args, "prompt", None)), ("--system", args.system)] + \
        [("--stop", s) for s in args.stop or ()]
    for what, text in texts:
        if text is not None:
            try:
                check_unicode(text, what)
            except ValueError as e:
                raise CLIError(str(e)) from None


def cmd_run(args) -> int:
    if (args.prompt is None) == (args.prompt_ids is None):
        raise CLIError("give a prompt, or --prompt-ids (not both)")
    if args.system is not None and args.chat is False:
        raise CLIError("--system is a chat-mode message: it has no place in a --raw prompt")
    if args.prompt_ids is not None and (args.system is not None or args.chat):  # they were ignored
        raise CLIError(f"{'--system' if args.system is not None else '--chat'} needs a text prompt: --prompt-ids "
                       "are sent as given, without the chat template")
    if args.prompt is not None and not args.prompt.strip() and not args.image:
        raise CLIError("the prompt is empty")
    check_text_arguments(args)
    params = sampling_params(args)  # validate before the (slow) model load
    images = read_images(args.image)
    ids = parse_token_ids(args.prompt_ids) if args.prompt_ids is not None else None
    check_context_before_load(args, len(ids) if ids is not None else None)
    llm = load_llm(args)
    if images and llm.model.vision is None:
        raise CLIError(f"--image: {args.model} has no vision tower (a text-only checkpoint): it cannot take images")
    tok = llm.tokenizer
    steps = params.max_denoising_steps or llm.defaults.max_denoising_steps
    if ids is not None:
        bad = [i for i in ids if not 0 <= i < llm.model.vocab_size]
        if bad:  # said here, naming the flag; the engine's own check speaks of "prompt token ids"
            raise CLIError(f"--prompt-ids must be token ids in [0, {llm.model.vocab_size}) of {args.model}'s "
                           f"vocabulary, got {bad[0]}")
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
    print(shown_answer(llm, answer_text(out)))
    print(closing_line(out), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- chat
def _read_line(interactive: bool) -> str | None:
    """The next message, None at the end of input. Bytes that are not UTF-8 come through as lone surrogates (the
    turn's error names them); decoded strictly, they ended the whole session with "'utf-8' codec can't decode"."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print()
            return None
        except UnicodeDecodeError as e:
            print(f"blockdiff: error: the message is not UTF-8 text: the byte 0x{e.object[e.start]:02x} is not "
                  "UTF-8", file=sys.stderr, flush=True)
            return ""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        line = sys.stdin.readline()
    else:
        line = stream.readline().decode("utf-8", "surrogateescape")
    return line if line else None


def cmd_chat(args) -> int:
    from .tokenizer import check_unicode

    base = sampling_params(args)
    check_text_arguments(args)
    check_context_before_load(args, None)
    llm = load_llm(args)
    if not has_chat_template(llm.tokenizer):
        # without a tokenizer, `run --raw` fails the same way: only token ids reach such a model
        alt = "use `blockdiff run --raw`" if llm.tokenizer is not None else "use `blockdiff run --prompt-ids`"
        raise CLIError(f"{args.model} has no chat template (chat needs tokenizer.json and a chat template); {alt}")
    if base.max_new_tokens is not None:  # hub ids and GGUF files: their context is known now
        # A --max-new-tokens no message fits was every turn's error, and a piped session still exited 0.
        from .engine.engine import check_fits

        try:
            check_fits(1, base.max_new_tokens, llm.model.canvas_length, llm.model.text.max_position_embeddings,
                       at_least=True)
        except ValueError as e:
            raise CLIError(str(e)) from None
    steps = base.max_denoising_steps or llm.defaults.max_denoising_steps
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("blockdiff chat: /reset clears the conversation, /exit (or Ctrl-D) ends it; Ctrl-C stops a reply.")
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
        if re.fullmatch(r"/[A-Za-z]+", line):  # a mistyped command is not a message for the model
            print(f"(unknown command {line}: /reset clears the conversation, /exit ends it)", flush=True)
            continue
        try:
            check_unicode(line, "the message")
        except ValueError as e:  # this turn's error; the session goes on
            print(f"blockdiff: error: {e}", file=sys.stderr, flush=True)
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
            print(f"blockdiff: error: {flag_names(getattr(args, '_subparser', None), str(e))}", file=sys.stderr,
                  flush=True)
            continue
        except KeyboardInterrupt:
            if not interactive:  # a script's Ctrl-C ends the session (main says "interrupted")
                raise
            # At a terminal, Ctrl-C stops this reply only (LLM.generate aborts its requests, the model stays
            # usable); the turn is dropped and the prompt comes back. Ctrl-C at the prompt still ends the session.
            messages.pop()
            print("(reply interrupted)", flush=True)
            continue
        turn += 1
        text = answer_text(out)
        print(shown_answer(llm, text))
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

    parser.subcommands = sub.choices  # name -> its parser: main() reports errors with the subcommand's usage
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
    for command in sub.choices.values():
        add_output_arguments(command)
        plain_help(command, sub)
    return parser


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """--log-level and --quiet, on every command (blockdiff/progress.py)."""
    from .progress import ENV_LOG_LEVEL, LEVELS

    g = p.add_argument_group("output")
    g.add_argument("--log-level", type=str.lower, choices=LEVELS, default=None,
                   help=f"messages of the blockdiff logger from this level on (default: ${ENV_LOG_LEVEL}, else info; "
                        "warning with --quiet, which wins over the environment)")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bars (they are off anyway when stderr is not a terminal) and no info messages")


_RST = [(re.compile(r":(?:func|class|meth|mod|attr|data):`~?([^`]+)`"), r"\1"), (re.compile(r"``([^`]+)``"), r"\1"),
        (re.compile(r"::$", re.M), ":")]


def plain_text(text: str) -> str:
    """Docstring text as a terminal shows it: no reST markup (``x``, :func:`x`, a closing ::)."""
    for pattern, repl in _RST:
        text = pattern.sub(repl, text)
    return text


def plain_help(p: argparse.ArgumentParser, sub) -> None:
    """Every subcommand gets a description (its one-line help when it has none) and help without reST markup:
    the subcommands' descriptions are their modules' docstrings."""
    if not p.description:
        helps = {a.dest: a.help for a in sub._choices_actions}
        line = helps.get(p.prog.split()[-1]) or ""
        p.description = line[:1].upper() + line[1:] + ("." if line and not line.endswith(".") else "")
    p.description = plain_text(p.description)
    for action in p._actions:
        if isinstance(action.help, str):
            action.help = plain_text(action.help)


def flag_names(parser: argparse.ArgumentParser | None, message: str) -> str:
    """A message in the words the user typed: the parameter names of a ValueError (``max_denoising_steps``)
    become the subcommand's flags (``--steps``). A name that is its flag's own spelling (seed) becomes the flag only
    where the message quotes it as a field (``'seed'`` -> ``'--seed'``, ``'stop[0]'`` -> ``'--stop[0]'``)."""
    if parser is None:
        return message
    for action in parser._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or isinstance(action, argparse._StoreFalseAction):
            continue  # a negation (--no-oracle) is not another name for its dest ("oracle" is a benchmark system)
        if action.dest == flag[2:]:  # the same word (seed, stop): only where quoted as a field name ('seed')
            message = re.sub(rf"'{re.escape(action.dest)}(?=[\['])", f"'{flag}", message)
            continue
        message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}(?!\w)", flag, message)
    return message


def main(argv: list[str] | None = None) -> int:
    _replace_unencodable(sys.stdout)
    try:
        rc = _main(argv)
        sys.stdout.flush()  # a reader gone (`| head -1`) is seen here, not as a traceback when Python exits
        return rc
    except KeyboardInterrupt:  # Ctrl-C while torch and the subcommands import, before _main's own handler
        print("blockdiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as e:  # raised again by _main only when it is stdout's reader that is gone
        if not _stdout_reader_gone():
            print(f"blockdiff: error: {e}", file=sys.stderr)
            return 2
        return _quiet_sigpipe_exit()


SIGPIPE_STATUS = 128 + 13  # what a shell reports for a tool SIGPIPE ended (`yes | head -1`)


def _replace_unencodable(stream) -> None:
    """Text stdout's encoding cannot show becomes '?': under PYTHONIOENCODING=ascii or a non-UTF-8 locale the model's
    text or the closing line's '·' raised UnicodeEncodeError, which ended the command with "blockdiff: error: 'ascii'
    codec can't encode ..." and status 2 after part of the answer had been printed. (stderr already escapes.)"""
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if encoding.startswith("utf") or getattr(stream, "errors", None) != "strict":
        return
    with contextlib.suppress(AttributeError, ValueError, OSError):
        stream.reconfigure(errors="replace")


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reading end is closed (poll says POLLERR), or when that cannot be asked
    (no poll, no file descriptor): then the BrokenPipeError is most likely stdout's."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError):
        return True
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _quiet_sigpipe_exit() -> int:
    """stdout's reader has gone: no message (the reader chose to stop), and stdout pointed at /dev/null so that
    Python's own flush at exit does not print "Exception ignored ... BrokenPipeError"."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return SIGPIPE_STATUS


@contextlib.contextmanager
def _sigint_held():
    """Hold Ctrl-C while the subcommands import (torch, numpy), then raise it as KeyboardInterrupt. Cut halfway, those
    imports failed in the next import of the same module: a RecursionError or ImportError traceback, an abort, or a
    subcommand dropped as "not importable" while the command went on to finish with status 0."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # ignored (`cmd &`) or someone's own
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def _main(argv: list[str] | None) -> int:
    with _sigint_held():
        parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    sub = parser.subcommands.get(getattr(args, "command", None) or "")
    if extras:  # argparse would print the top-level usage: the subcommand's says which flags there are
        (sub or parser).error(f"unrecognized arguments: {' '.join(extras)}")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        from .progress import configure
        args.log_level = configure(args.log_level, args.quiet)
        args._subparser = sub  # for errors a command reports itself and goes on (chat's turns): in flag names
        rc = func(args)
    except KeyboardInterrupt:
        print("blockdiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `| head -1`: main() says nothing when it is stdout's reader that stopped
        raise
    except (ValueError, OSError, ImportError) as e:  # bad path/params, I/O, a missing optional dependency
        from .checks import CheckpointError

        # A parameter named in a checkpoint's file is that file's key, not a flag the user typed.
        msg = str(e) if isinstance(e, CheckpointError) else flag_names(sub, str(e))
        print(f"blockdiff: error: {msg}", file=sys.stderr)
        return 2
    except SystemExit as e:  # subcommands that exit with a message
        if isinstance(e.code, str):
            print(f"blockdiff: error: {e.code}", file=sys.stderr)
            return 2
        return 0 if e.code is None else int(e.code)
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
