"""Solving Sudoku puzzles with a DiffusionGemma checkpoint: diffusion decoding (the engine, givens fixed by
``canvas_template``, digits only via ``allowed_token_ids``) or autoregressive decoding of the same weights
(the encoder's causal next-token head, greedy, ``blockdiff.engine.ar.ar_generate``).

Inference only: imports nothing from ``blockdiff.train``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..progress import progress
from . import format as fmt

BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "sudoku")


@dataclass
class Solution:
    grid: list[int]  # 81 digits (0 where the model produced no digit)
    denoise_steps: int  # decoder forwards (0 for autoregressive decoding)
    seconds: float  # wall time of the batch this puzzle ran in, divided by the batch size


def sampling_params(puzzle: list[int], seed: int = 0, max_denoising_steps: int | None = None, **overrides):
    """Givens fixed, digits only; ``overrides`` (t_max, t_min, entropy_bound...) beat the checkpoint's defaults."""
    from ..sampling.params import SamplingParams

    return SamplingParams(max_new_tokens=fmt.CANVAS_LENGTH, seed=seed, max_denoising_steps=max_denoising_steps,
                          canvas_template=fmt.canvas_template(puzzle), allowed_token_ids=fmt.DIGIT_TOKEN_IDS,
                          **{k: v for k, v in overrides.items() if v is not None})


def solve_diffusion(llm, puzzles: list[list[int]], seed: int = 0, batch_size: int = 64,
                    max_denoising_steps: int | None = None, on_event=None, **overrides) -> list[Solution]:
    """Batches of puzzles through ``llm.generate``; puzzle i samples with seed ``seed + i``."""
    _check_batch_size(batch_size)
    out: list[Solution] = []
    # A caller that watches the events (the demo's live grid) draws its own view: no bar over it.
    with progress(f"solving {len(puzzles)} puzzles", total=len(puzzles), show=on_event is None) as bar:
        for start in range(0, len(puzzles), batch_size):
            chunk = puzzles[start:start + batch_size]
            t0 = time.perf_counter()
            res = llm.generate(prompt_token_ids=[fmt.encode_prompt(p) for p in chunk],
                               sampling_params=[sampling_params(p, seed + start + i, max_denoising_steps, **overrides)
                                                for i, p in enumerate(chunk)],
                               on_event=on_event)
            dt = (time.perf_counter() - t0) / len(chunk)
            for r in res:
                out.append(Solution(fmt.decode_canvas(r.token_ids), r.metrics.denoise_steps, dt))
            bar.advance(len(chunk))
    return out


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def solve_autoregressive(model, puzzles: list[list[int]], batch_size: int = 64) -> list[Solution]:
    _check_batch_size(batch_size)
    from ..engine.ar import ar_generate

    out: list[Solution] = []
    with progress(f"solving {len(puzzles)} puzzles (autoregressive)", total=len(puzzles)) as bar:
        for start in range(0, len(puzzles), batch_size):
            chunk = puzzles[start:start + batch_size]
            t0 = time.perf_counter()
            res = ar_generate(model, [fmt.encode_prompt(p) for p in chunk], fmt.CANVAS_LENGTH,
                              allowed_token_ids=fmt.DIGIT_TOKEN_IDS)
            dt = (time.perf_counter() - t0) / len(chunk)
            out.extend(Solution(fmt.decode_canvas(ids), 0, dt) for ids in res)
            bar.advance(len(chunk))
    return out
