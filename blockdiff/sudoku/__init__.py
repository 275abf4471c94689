"""Sudoku with the bundled DiffusionGemma model, from Python::

    from blockdiff.sudoku import solve
    answer = solve("53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79")
    answer.solution, answer.solved, answer.denoise_steps   # '534678912...', True (checked by the exact solver), 7

``solve_many`` solves a list in batches. The bundled model is loaded once (fp32, CPU) and kept; pass ``llm=`` for
another checkpoint or device. Importing this package loads nothing heavy: torch comes in with the first solve.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Answer", "solve", "solve_many"]

_BUNDLED = None  # the bundled model's LLM, loaded on first use


@dataclass
class Answer:
    puzzle: str  # the puzzle as given, 81 characters with '.' for blanks
    solution: str  # the model's grid, 81 digits ('.' where it wrote no digit)
    solved: bool  # the grid is a valid solution of the puzzle (checked by the exact solver)
    denoise_steps: int  # decoder forwards the model spent

    def __str__(self) -> str:
        return self.solution


def _bundled():
    global _BUNDLED
    if _BUNDLED is None:
        from ..cli import auto_threads
        from ..engine.llm import LLM
        from .solver import BUNDLED_MODEL

        _BUNDLED = LLM(BUNDLED_MODEL, dtype="float32", device="cpu")
        auto_threads(_BUNDLED.model)
    return _BUNDLED


def solve_many(puzzles: list[str], seed: int = 0, max_denoising_steps: int | None = None, llm=None,
               batch_size: int = 64) -> list[Answer]:
    """Puzzles (81 characters each: digits, '.' or '0' for blanks) -> answers; puzzle i samples with seed + i.
    A malformed puzzle or one whose givens conflict is a ValueError naming it."""
    from .puzzles import format_grid, is_consistent, is_valid_solution
    from .solver import solve_diffusion
    from .talk import parse

    if isinstance(puzzles, str):
        raise ValueError("solve_many takes a list of puzzle strings (solve takes one)")
    grids = []
    for i, p in enumerate(puzzles):
        if not isinstance(p, str):
            raise ValueError(f"puzzle {i} must be a string, got {type(p).__name__}")
        try:
            g = parse(p)
        except ValueError as e:
            raise ValueError(f"puzzle {i}: {e}") from None
        if not is_consistent(g):
            raise ValueError(f"puzzle {i}: the givens conflict (a digit repeats in a row, column or box)")
        grids.append(g)
    sols = solve_diffusion(llm or _bundled(), grids, seed=seed, batch_size=batch_size,
                           max_denoising_steps=max_denoising_steps)
    return [Answer(format_grid(g), format_grid(s.grid), is_valid_solution(g, s.grid), s.denoise_steps)
            for g, s in zip(grids, sols)]


def solve(puzzle: str, seed: int = 0, max_denoising_steps: int | None = None, llm=None) -> Answer:
    """One puzzle string -> its ``Answer`` (``answer.solution`` is the 81-digit grid, ``answer.solved`` says
    whether it is right)."""
    if not isinstance(puzzle, str):
        raise ValueError(f"puzzle must be a string, got {type(puzzle).__name__}")
    try:
        return solve_many([puzzle], seed=seed, max_denoising_steps=max_denoising_steps, llm=llm)[0]
    except ValueError as e:
        raise ValueError(str(e).removeprefix("puzzle 0: ")) from None
