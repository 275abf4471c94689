"""How often a seeded request's output differs alone vs batched, in the default and the deterministic mode.

    python scripts/seed_stability.py --sudoku --requests 16 --out seeds_sudoku.json
    python scripts/seed_stability.py --random-config tiny --requests 16 --max-new-tokens 64

Each request runs once alone and once among all ``--requests`` (one ``generate`` call, so the engine batches
them tick by tick, at different steps). Reported per mode: the fraction of requests whose tokens differ and the
fraction of differing token positions. In the default mode a seed fixes every random draw (counter-based), but
batched arithmetic may round a row's logits differently from the row alone; the deterministic mode computes
every request as it would alone, so its rate must be 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time


def agreement(llm, prompts: list[list[int]], params: list) -> dict:
    t0 = time.perf_counter()
    together = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=sp)[0] for p, sp in zip(prompts, params)]
    differ = tokens = diff_tokens = 0
    for a, b in zip(alone, together):
        x, y = a.token_ids, b.token_ids
        n = max(len(x), len(y))
        d = sum(1 for i in range(n) if i >= len(x) or i >= len(y) or x[i] != y[i])
        differ += d > 0
        tokens += n
        diff_tokens += d
    return {"requests": len(prompts), "requests_differing": differ, "request_rate": round(differ / len(prompts), 4),
            "tokens": tokens, "tokens_differing": diff_tokens, "token_rate": round(diff_tokens / max(tokens, 1), 4),
            "seconds": round(time.perf_counter() - t0, 2)}


def sudoku_requests(n: int, seed: int, steps: int | None):
    from blockdiff.sudoku import format as fmt
    from blockdiff.sudoku.puzzles import generate
    from blockdiff.sudoku.solver import sampling_params

    r = random.Random(seed)
    puzzles = [generate(r, 30, 45)[0] for _ in range(n)]
    return [fmt.encode_prompt(p) for p in puzzles], [sampling_params(p, seed + i, steps) for i, p in enumerate(puzzles)]


def random_requests(vocab: int, n: int, seed: int, max_new_tokens: int, steps: int | None):
    from blockdiff.sampling.params import SamplingParams
    from blockdiff.bench.harness import make_prompt

    base = SamplingParams(max_new_tokens=max_new_tokens, max_denoising_steps=steps, ignore_eos=True)
    prompts = [make_prompt(vocab, 4 + (7 * i) % 29, seed + i) for i in range(n)]
    return prompts, [dataclasses.replace(base, seed=seed + i) for i in range(n)]


def main(argv=None) -> int:
    import torch

    from blockdiff.engine.llm import LLM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder")
    src.add_argument("--sudoku", action="store_true", help="the bundled Sudoku model on Sudoku puzzles")
    src.add_argument("--random-config", help="a random checkpoint (blockdiff.bench.checkpoints presets)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64, help="random/--model prompts only")
    p.add_argument("--steps", type=int, help="max denoising steps (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", default="default,deterministic")
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model
        if a.sudoku:
            from blockdiff.sudoku.solver import BUNDLED_MODEL
            path = BUNDLED_MODEL
        elif a.random_config:
            from .checkpoints import write_random_checkpoint
            path = write_random_checkpoint(tmp, a.random_config, seed=a.seed)
        report = {"checkpoint": "bundled sudoku" if a.sudoku else (f"random:{a.random_config}" if a.random_config
                                                                   else path),
                  "threads": a.threads, "torch": torch.__version__, "modes": {}}
        for mode in a.modes.split(","):
            llm = LLM(path, dtype="float32", deterministic=mode == "deterministic")
            if a.sudoku:
                prompts, params = sudoku_requests(a.requests, a.seed, a.steps)
            else:
                prompts, params = random_requests(llm.model.vocab_size, a.requests, a.seed, a.max_new_tokens, a.steps)
            report["modes"][mode] = agreement(llm, prompts, params)
            print(f"{mode}: {report['modes'][mode]}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
