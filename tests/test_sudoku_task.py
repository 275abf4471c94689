"""The Sudoku training task: curriculum, solver-drawn and pooled batches."""

import random

import pytest

from blockdiff.sudoku import format as fmt
from blockdiff.sudoku.puzzles import is_valid_solution
from blockdiff.sudoku.task import SudokuTask, parse_curriculum


def _check(batch, lo, hi):
    for p, a, f in zip(batch.prompt.tolist(), batch.answer.tolist(), batch.fixed.tolist()):
        puzzle, solution = fmt.decode_canvas(p[1:-1]), fmt.decode_canvas(a)
        assert p == fmt.encode_prompt(puzzle) and a == fmt.encode_canvas(solution)
        assert is_valid_solution(puzzle, solution)
        assert lo <= sum(f) <= hi and f == [v != 0 for v in puzzle]


def test_curriculum_steps_down_the_clue_range():
    task = SudokuTask("0:50-70,100:30-40")
    assert task.clue_range(0) == (50, 70) and task.clue_range(99) == (50, 70) and task.clue_range(100) == (30, 40)
    with pytest.raises(ValueError):
        parse_curriculum("5:40-50")
    with pytest.raises(ValueError):
        parse_curriculum("0:50")


@pytest.mark.parametrize("pool", [0, 50])
def test_batches_are_valid_puzzles_in_the_clue_range(pool):
    task = SudokuTask("0:35-45", pool_size=pool, workers=1)
    batch = task.batch(0, 6, random.Random(0))
    assert batch.prompt.shape == (6, fmt.PROMPT_LENGTH) and batch.answer.shape == (6, fmt.CANVAS_LENGTH)
    _check(batch, 35, 45)


def test_pooled_batches_follow_the_trainer_rng():
    task = SudokuTask("0:40-50", pool_size=20)
    a, b = task.batch(0, 4, random.Random(3)), task.batch(0, 4, random.Random(3))
    assert a.prompt.equal(b.prompt) and a.answer.equal(b.answer)
