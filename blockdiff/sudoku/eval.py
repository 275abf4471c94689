"""Evaluation of a Sudoku checkpoint: full-solve rate and cell accuracy by clue band, diffusion vs
autoregressive decoding of the same weights, denoising steps and wall time.

    python -m blockdiff.sudoku.eval [--model DIR] [--per-band 100] [--seed 1000] [--out results.json]

Held-out puzzles are unique (``generate(unique=True)``) and drawn from seeds the training stream never uses
(training draws non-unique puzzles from ``random.Random(train_seed)``). Bands: ``>=40`` = 40-49 clues,
``30-39``, ``<30`` = 22-29. A puzzle is solved when the grid is a valid solution agreeing with every given
(checked by ``is_valid_solution``); cell accuracy counts the blank cells equal to the unique solution.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from ..argtypes import at_least
from .puzzles import clue_band, generate, is_valid_solution
from .solver import BUNDLED_MODEL, solve_autoregressive, solve_diffusion

EVAL_BANDS = {">=40": (40, 49), "30-39": (30, 39), "<30": (22, 29)}


def held_out(per_band: int, seed: int = 1000, bands=tuple(EVAL_BANDS)) -> dict[str, list]:
    """{band: [(puzzle, solution), ...]}: unique puzzles, one RNG per band (seed + band index)."""
    sets = {}
    for k, band in enumerate(EVAL_BANDS):
        if band not in bands:
            continue
        r = random.Random(seed + k)
        lo, hi = EVAL_BANDS[band]
        sets[band] = [generate(r, lo, hi, unique=True) for _ in range(per_band)]
    return sets


def score(pairs, solutions) -> dict:
    solved = cells = blanks = 0
    steps_all, steps_solved = [], []
    for (puzzle, answer), sol in zip(pairs, solutions):
        ok = is_valid_solution(puzzle, sol.grid)
        solved += ok
        for p, a, g in zip(puzzle, answer, sol.grid):
            if p == 0:
                blanks += 1
                cells += a == g
        steps_all.append(sol.denoise_steps)
        if ok:
            steps_solved.append(sol.denoise_steps)
    n = len(pairs)
    return {
        "puzzles": n,
        "solve_rate": solved / n if n else 0.0,
        "cell_accuracy": cells / blanks if blanks else 0.0,
        "mean_steps": sum(steps_all) / n if n else 0.0,
        "mean_steps_solved": sum(steps_solved) / len(steps_solved) if steps_solved else None,
        "seconds_per_puzzle": sum(s.seconds for s in solutions) / n if n else 0.0,
    }


def evaluate(llm, sets: dict[str, list], modes=("diffusion", "ar"), seed: int = 0, batch_size: int = 64,
             max_denoising_steps: int | None = None, log=print, **overrides) -> dict:
    results: dict = {}
    for band, pairs in sets.items():
        puzzles = [p for p, _ in pairs]
        for mode in modes:
            t0 = time.perf_counter()
            if mode in ("diffusion", "fast"):  # "fast": the approximate fast mode (engine/fast.py)
                sols = solve_diffusion(llm, puzzles, seed=seed, batch_size=batch_size,
                                       max_denoising_steps=max_denoising_steps, fast=mode == "fast", **overrides)
            else:
                sols = solve_autoregressive(llm.model, puzzles, batch_size=batch_size)
            r = score(pairs, sols)
            r["wall_s"] = time.perf_counter() - t0
            results.setdefault(band, {})[mode] = r
            log(f"{band:>6} {mode:>9}: solved {r['solve_rate']:.1%} cells {r['cell_accuracy']:.1%} "
                f"steps {r['mean_steps']:.1f} wall {r['wall_s']:.1f}s ({r['seconds_per_puzzle'] * 1000:.0f} ms/puzzle)")
    return results


def markdown_table(results: dict, max_steps: int | None = None) -> str:
    lines = ["| band | decoding | puzzles | solved | cell accuracy | mean denoising steps (solved) | "
             "wall time / puzzle |", "|---|---|---|---|---|---|---|"]
    for band, by_mode in results.items():
        for mode, r in by_mode.items():
            if mode in ("diffusion", "fast"):
                steps = f"{r['mean_steps']:.1f}"
                if r["mean_steps_solved"] is not None:
                    steps += f" ({r['mean_steps_solved']:.1f})"
            else:
                steps = "81 tokens, 1 per forward"
            lines.append(f"| {band} | {mode} | {r['puzzles']} | {r['solve_rate']:.1%} | {r['cell_accuracy']:.1%} | "
                         f"{steps} | {r['seconds_per_puzzle'] * 1000:.0f} ms |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blockdiff.sudoku.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=BUNDLED_MODEL)
    ap.add_argument("--per-band", type=at_least(1), default=100)
    ap.add_argument("--bands", default=",".join(EVAL_BANDS), help="comma-separated subset of >=40,30-39,<30")
    ap.add_argument("--seed", type=int, default=1000, help="held-out puzzle seed")
    ap.add_argument("--sample-seed", type=at_least(0), default=0)
    ap.add_argument("--modes", default="diffusion,ar", help="comma-separated: diffusion (exact), fast (approximate "
                    "fast mode), ar")
    ap.add_argument("--steps", type=int, help="max denoising steps (default: the checkpoint's)")
    ap.add_argument("--t-max", type=float, help="sampling temperature at the first step (default: checkpoint's)")
    ap.add_argument("--t-min", type=float)
    ap.add_argument("--entropy-bound", type=float)
    ap.add_argument("--confidence-threshold", type=float,
                    help="stop a canvas once its mean entropy is below this (default: checkpoint's)")
    ap.add_argument("--batch-size", type=at_least(1), default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    from ..cli import add_quantization_arguments, quantization_kwargs
    add_quantization_arguments(ap)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    import torch

    from ..engine.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    bands = [b.strip() for b in args.bands.split(",")]
    unknown = [b for b in bands if b not in EVAL_BANDS]
    if unknown:
        raise SystemExit(f"unknown band(s) {unknown}; use {list(EVAL_BANDS)}")
    llm = LLM(args.model, dtype="float32", device=args.device, **quantization_kwargs(args))
    sets = held_out(args.per_band, args.seed, bands)
    try:
        results = evaluate(llm, sets, modes=[m.strip() for m in args.modes.split(",")], seed=args.sample_seed,
                           batch_size=args.batch_size, max_denoising_steps=args.steps,
                           log=lambda s: print(s, file=sys.stderr, flush=True), t_max=args.t_max, t_min=args.t_min,
                           entropy_bound=args.entropy_bound, confidence_threshold=args.confidence_threshold)
    except ValueError as e:  # a sampling setting the engine refuses (e.g. t_max <= t_min): one line, status 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "per_band": args.per_band, "seed": args.seed,
                       "max_denoising_steps": args.steps or llm.defaults.max_denoising_steps,
                       "device": args.device, "quantization": args.quantization, "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["EVAL_BANDS", "clue_band", "evaluate", "held_out", "markdown_table", "score"]
