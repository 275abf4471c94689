"""blockdiff sudoku and blockdiff demo: Sudoku with the bundled DiffusionGemma model.

    blockdiff demo                                   # a random 40-49 clue puzzle, live canvas, verified
    blockdiff demo --web                             # the same in the browser: the playground on the bundled model
    blockdiff sudoku --puzzles in.txt --out out.txt  # one puzzle per line -> one 81-digit solution per line
    cat in.txt | blockdiff sudoku --puzzles - --out -   # stdin to stdout

Puzzles are 81 characters, digits with '.' or '0' for blanks, one puzzle a line; spaces and the | - + of a
drawn grid inside a line are ignored, as `blockdiff run` ignores them. Lines that are blank (or separators
only) or start with '#' are skipped. A puzzle the model did not solve still gets its best grid, with " # unsolved" after it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from ..argtypes import at_least
from .solver import BUNDLED_MODEL


def _error(msg: str):
    from ..cli import CLIError
    return CLIError(msg)


def _check_flags(args) -> None:
    """The flags' own bounds, before any puzzle is read (stdin may wait for input) or the model loads."""
    from ..cli import check_device, check_threads

    if args.steps is not None and not 1 <= args.steps <= 10_000:
        raise _error(f"--steps must be an integer in [1, 10000], got {args.steps}")
    check_threads(args.threads)
    args.device = check_device(args.device)


def _load(args):
    import os

    import torch

    from ..engine.llm import LLM

    from ..cli import auto_threads

    _check_flags(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.model):
        raise _error(f"no model folder at {args.model}")
    from ..cli import quantization_kwargs
    llm = LLM(args.model, dtype="float32", device=args.device, **quantization_kwargs(args))
    from . import format as fmt
    if llm.model.vocab_size < fmt.VOCAB_SIZE or llm.engine.canvas_length != fmt.CANVAS_LENGTH:
        raise _error(f"{args.model} is not a Sudoku model (vocabulary {llm.model.vocab_size}, canvas "
                     f"{llm.engine.canvas_length}; a Sudoku model reads cell tokens, {fmt.VOCAB_SIZE} ids, on an "
                     f"{fmt.CANVAS_LENGTH}-position canvas): train one with `blockdiff train --task sudoku`")
    if not args.threads:
        auto_threads(llm.model)
    return llm


def _run_live(llm, puzzle, seed, steps, title, stderr: bool = False):
    """The board redrawn at every step on a terminal (printed once elsewhere), on stdout, or on stderr with
    ``stderr`` (``sudoku --out -``: stdout carries the solution lines)."""
    from rich.console import Console
    from rich.live import Live

    from .solver import solve_diffusion
    from .view import SudokuView

    console = Console(stderr=stderr)
    max_steps = steps or llm.defaults.max_denoising_steps
    view = SudokuView(puzzle, max_steps=max_steps, title=title)
    if not console.is_terminal:
        sol = solve_diffusion(llm, [puzzle], seed=seed, max_denoising_steps=steps, on_event=view)[0]
        console.print(view)
        return sol
    with Live(view, console=console, auto_refresh=False) as live:
        def on_event(ev):
            view.update(ev)
            live.refresh()
            time.sleep(0.03)  # a few frames per step so the eye can follow the canvas
        sol = solve_diffusion(llm, [puzzle], seed=seed, max_denoising_steps=steps, on_event=on_event)[0]
    return sol


def cmd_sudoku(args) -> int:
    from ..files import check_writable, write_output
    from .puzzles import format_grid
    from .solver import solve_diffusion

    _check_flags(args)
    if args.live and args.batch_size is not None:  # was ignored: --live denoises one puzzle at a time
        raise _error("--batch-size does not apply with --live (it shows one puzzle at a time)")
    check_writable(args.out)

    puzzles = _read_puzzles(args.puzzles)
    llm = _load(args)
    t0 = time.perf_counter()
    if args.live:
        sols = []
        for i, p in enumerate(puzzles):
            # With --out -, the boards went to stdout between the solution lines (`--live > out.txt` or `| ...`
            # got 14 lines of drawing per puzzle before the 81-digit lines): they go to stderr then.
            sols.append(_run_live(llm, p, args.seed + i, args.steps, f"puzzle {i + 1}/{len(puzzles)}",
                                  stderr=args.out == "-"))
    else:
        sols = solve_diffusion(llm, puzzles, seed=args.seed, batch_size=args.batch_size or 64,
                               max_denoising_steps=args.steps)
    from .puzzles import is_valid_solution
    solved = [is_valid_solution(p, s.grid) for p, s in zip(puzzles, sols)]
    lines = "".join(format_grid(s.grid, blank="0") + ("" if ok else UNSOLVED) + "\n" for s, ok in zip(sols, solved))
    if args.out == "-":
        sys.stdout.write(lines)
        sys.stdout.flush()
    else:
        write_output(args.out, lines)
    steps = sum(s.denoise_steps for s in sols) / max(1, len(sols))
    print(f"[{len(puzzles)} {'puzzle' if len(puzzles) == 1 else 'puzzles'} · {sum(solved)} solved · {steps:.1f} denoising steps per puzzle · "
          f"{time.perf_counter() - t0:.2f} s] -> {'stdout' if args.out == '-' else args.out}", file=sys.stderr)
    return 0


UNSOLVED = " # unsolved"  # after the model's best grid when it is not a valid solution


def _read_puzzles(path: str) -> list[list[int]]:
    """One puzzle per line from a file, or stdin for '-'; a bad line is an error naming it."""
    from .puzzles import is_consistent, parse_puzzle
    from .talk import SEPARATORS  # what `run` ignores in a puzzle, ignored here too

    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            stream = getattr(sys.stdin, "buffer", None)  # bytes: decoded here, whatever the locale says
            data = stream.read() if stream is not None else sys.stdin.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise _error(f"--puzzles {path}: cannot read it: {e.strerror or e}") from None
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:  # was "'utf-8' codec can't decode byte 0xff in position 81", no file named
            line = data.count(b"\n", 0, e.start) + 1
            raise _error(f"{name}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    # A byte-order mark (a file saved as "UTF-8 with BOM" on Windows) is no character of the first puzzle: it
    # made line 1 "82 characters" long.
    lines = data.removeprefix("\ufeff").split("\n")  # strip() below takes the \r of CRLF files
    puzzles = []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if s.startswith("#"):
            continue
        s = SEPARATORS.sub("", s)  # "53. .7. ...|6.." reads as `run` reads it
        if not s:
            continue
        try:
            p = parse_puzzle(s)
        except ValueError as e:
            raise _error(f"{name}: line {n}: {e}") from None
        if not is_consistent(p):
            raise _error(f"{name}: line {n}: the givens conflict (a digit repeats in a unit)")
        puzzles.append(p)
    if not puzzles:
        raise _error(f"--puzzles {path}: no puzzles (one 81-character puzzle per line)")
    return puzzles


def cmd_demo(args) -> int:
    from .puzzles import count_solutions, format_grid, generate, is_valid_solution, solve

    if args.web:
        return _serve_playground(args)
    for flag, given in (("--port", args.port is not None), ("--open", args.open)):
        if given:  # was ignored: the terminal demo ran, no server, no browser
            raise _error(f"{flag} applies only with --web (the playground in the browser)")
    seed = args.seed if args.seed is not None else random.randrange(2 ** 31)
    puzzle, _ = generate(random.Random(seed), 40, 49, unique=True)
    llm = _load(args)
    t0 = time.perf_counter()
    sol = _run_live(llm, puzzle, seed, args.steps,
                    f"blockdiff demo · DiffusionGemma Sudoku · puzzle seed {seed}")
    secs = time.perf_counter() - t0
    ok = is_valid_solution(puzzle, sol.grid)
    print(f"puzzle   {format_grid(puzzle)}")
    print(f"solution {format_grid(sol.grid, blank='?')}")
    if ok:
        print(f"verified by the exact solver: correct ({count_solutions(puzzle)} solution) · "
              f"{sol.denoise_steps} denoising steps · {secs:.2f} s")
        return 0
    truth = solve(puzzle)
    wrong = sum(1 for p, g, t in zip(puzzle, sol.grid, truth) if p == 0 and g != t)
    print(f"verified by the exact solver: NOT a valid solution ({wrong} of {puzzle.count(0)} cells wrong) · "
          f"{sol.denoise_steps} denoising steps · {secs:.2f} s; try another --seed")
    return 1


def _serve_playground(args) -> int:
    """``demo --web``: the server with its playground page on the bundled model (loopback only)."""
    import uvicorn

    from ..server.app import HTTP_PROTOCOL, build_app
    from ..server.cli import check_bindable

    if args.port is None:
        args.port = 8000
    if not 0 <= args.port < 65536:
        raise _error(f"--port must be in [0, 65535], got {args.port}")
    # A port in use is one line and exit 2 before the model loads (uvicorn would say it after the URL was printed).
    port = check_bindable("127.0.0.1", args.port, "--port")  # --port 0: the free port picked
    llm = _load(args)
    if args.steps is not None:  # the page's requests that leave "max denoising steps" empty run this many
        llm.engine.defaults.max_denoising_steps = args.steps
    app = build_app(llm, "sudoku")
    url = f"http://127.0.0.1:{port}/"
    print(f"blockdiff demo: the playground is at {url} (Ctrl-C stops it)", flush=True)
    if args.open:
        import webbrowser
        webbrowser.open(url)
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                  http=HTTP_PROTOCOL)).run()
    return 0


def _common(p):
    p.add_argument("--model", default=BUNDLED_MODEL, help="checkpoint folder (default: the bundled model)")
    p.add_argument("--steps", type=int, help="max denoising steps (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=at_least(0), default=0,
                   help="torch CPU threads (0 = automatic)")
    from ..cli import add_quantization_arguments
    add_quantization_arguments(p)


def register(subparsers) -> None:
    p = subparsers.add_parser("sudoku", help="solve Sudoku puzzles with the bundled model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--puzzles", required=True, help="input: one puzzle per line ('-' for stdin)")
    p.add_argument("--out", required=True, help="output: one 81-digit solution per line, ' # unsolved' after a grid "
                   "the model did not solve ('-' for stdout)")
    p.add_argument("--live", action="store_true", help="show each puzzle's canvas as it denoises")
    p.add_argument("--seed", type=at_least(0), default=0, help="puzzle i samples with seed SEED + i")
    p.add_argument("--batch-size", type=at_least(1), default=None, help="puzzles denoised at once (default 64; "
                   "not with --live)")
    p.set_defaults(func=cmd_sudoku)
    d = subparsers.add_parser("demo", help="solve a random Sudoku live with the bundled model (CPU, seconds)",
                              description="Solve a random Sudoku (40-49 givens) with the bundled model: the board "
                              "is redrawn at every denoising step in a terminal (printed once otherwise), then "
                              "checked by the exact solver. --web serves the same in the browser.")
    _common(d)
    d.add_argument("--seed", type=at_least(0), help="puzzle seed (default: random; with --web the page draws its "
                   "own puzzles)")
    d.add_argument("--web", action="store_true", help="serve the playground page on the bundled model instead and "
                   "print its URL")
    d.add_argument("--port", type=int, default=None, help="with --web: the port on 127.0.0.1 (default 8000)")
    d.add_argument("--open", action="store_true", help="with --web: also open the page in a browser")
    d.set_defaults(func=cmd_demo)
