"""Sudoku grids: parsing, formatting, exact solving and puzzle generation.

Contract (stdlib only, no torch):

* A *grid* is a ``list[int]`` of length 81, row-major, ``0`` = blank, ``1..9`` = digit.
* Text form is 81 characters, digits with ``'.'`` or ``'0'`` for blanks
  (:func:`parse_puzzle` / :func:`format_grid`).
* :func:`count_solutions` is an exact backtracking solver (bitmask candidates,
  most-constrained cell first) that stops once ``limit`` solutions are found;
  grids whose givens conflict have 0 solutions.  :func:`solve` returns one
  solution or ``None`` and raises ``ValueError`` if the givens conflict.
* :func:`generate` returns ``(puzzle, solution)`` where the clue count is drawn
  uniformly from ``[min_clues, max_clues]``; with ``unique=True`` the puzzle has
  exactly one solution (``min_clues >= 22`` required), with ``unique=False``
  random cells are blanked (fast path for training data).  All randomness comes
  from the ``random.Random`` passed in, so a fixed seed gives identical output.
* Files: one puzzle per line (:func:`write_puzzles` / :func:`read_puzzles`) or
  ``puzzle,solution`` per line (:func:`write_dataset` / :func:`read_dataset`);
  blank lines and lines starting with ``#`` are skipped when reading.

CLI: ``python -m blockdiff.sudoku.puzzles --n 100 --min-clues 40 --max-clues 50
--seed 0 --out FILE [--with-solutions] [--non-unique]``.
"""
from __future__ import annotations

import argparse
import random
import sys

BANDS = (">=40", "30-39", "<30")
BAND_RANGES = {">=40": (40, 80), "30-39": (30, 39), "<30": (22, 29)}
MIN_UNIQUE_CLUES = 22  # generate(unique=True) refuses lower targets (too slow)
MAX_GRID_ATTEMPTS = 500  # fresh solution grids tried per unique puzzle

_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_ALL = 0x3FE  # bits 1..9
_POP = [bin(m).count("1") for m in range(1024)]
_DIGITS = [tuple(d for d in range(1, 10) if m >> d & 1) for m in range(1024)]
_UNITS = ([[r * 9 + c for c in range(9)] for r in range(9)]
          + [[r * 9 + c for r in range(9)] for c in range(9)]
          + [[i for i in range(81) if _BOX[i] == b] for b in range(9)])


# ----------------------------------------------------------------- text forms
def parse_puzzle(line: str) -> list[int]:
    """Parse 81 chars (digits, '.'/'0' blank); surrounding whitespace is ignored."""
    s = line.strip()
    if len(s) != 81:
        raise ValueError(f"puzzle must have 81 characters, found {len(s)}")
    grid = []
    for pos, ch in enumerate(s):
        if ch == ".":
            grid.append(0)
        elif ch in "0123456789":
            grid.append(ord(ch) - 48)
        else:
            raise ValueError(f"bad character {ch!r} at position {pos} "
                             "(expected a digit, '.' or '0')")
    return grid


def _check_grid(grid) -> list[int]:
    g = list(grid)
    if len(g) != 81:
        raise ValueError(f"grid must have 81 cells, found {len(g)}")
    for pos, v in enumerate(g):
        if not isinstance(v, int) or not 0 <= v <= 9:
            raise ValueError(f"bad cell value {v!r} at position {pos} (expected 0..9)")
    return g


def format_grid(grid, blank: str = ".") -> str:
    """81-character string, ``blank`` for empty cells."""
    return "".join(str(v) if v else blank for v in _check_grid(grid))


def pretty(grid, blank: str = ".") -> str:
    """Multi-line 9x9 rendering with box separators, for terminal display."""
    s = format_grid(grid, blank)
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append("------+-------+------")
        row = s[r * 9:r * 9 + 9]
        lines.append(" | ".join(" ".join(row[c:c + 3]) for c in (0, 3, 6)))
    return "\n".join(lines)


# --------------------------------------------------------------------- solver
def _masks(grid):
    """(rows, cols, boxes, empties) bitmasks, or None if the givens conflict."""
    rows, cols, boxes, empties = [0] * 9, [0] * 9, [0] * 9, []
    for i, v in enumerate(grid):
        if v:
            bit, r, c, b = 1 << v, _ROW[i], _COL[i], _BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
        else:
            empties.append(i)
    return rows, cols, boxes, empties


def _search(grid, limit, rng=None, forbid=(-1, 0), store=None) -> int:
    """Count solutions of ``grid`` up to ``limit``.

    ``rng`` shuffles candidate order; ``forbid=(cell, digit)`` excludes one
    candidate; the first solution found is copied into ``store`` (a list).
    """
    st = _masks(grid)
    if st is None:
        return 0
    rows, cols, boxes, empties = st
    cells = list(grid)
    f_cell, f_bit = forbid[0], (1 << forbid[1]) if forbid[0] >= 0 else 0
    found = [0]

    def rec() -> None:
        if not empties:
            if store is not None and not store:
                store.extend(cells)
            found[0] += 1
            return
        best_n, best_k, best_m = 10, -1, 0
        for k, i in enumerate(empties):
            m = _ALL & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
            if i == f_cell:
                m &= ~f_bit
            n = _POP[m]
            if n < best_n:
                best_n, best_k, best_m = n, k, m
                if n <= 1:
                    break
        if best_n == 0:
            return
        i = empties[best_k]
        empties[best_k] = empties[-1]
        empties.pop()
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        digits = _DIGITS[best_m]
        if rng is not None and len(digits) > 1:
            digits = list(digits)
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            cells[i] = d
            rec()
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            if found[0] >= limit:
                break
        cells[i] = 0
        empties.append(i)
        empties[best_k], empties[-1] = empties[-1], empties[best_k]

    rec()
    return found[0]


def count_solutions(grid, limit: int = 2) -> int:
    """Number of solutions, counting stops at ``limit`` (0 if givens conflict)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return _search(_check_grid(grid), limit)


def solve(grid) -> list[int] | None:
    """A solution of ``grid`` or None; ValueError if the givens conflict."""
    g = _check_grid(grid)
    if not is_consistent(g):
        raise ValueError("givens conflict: a digit repeats in a row, column or box")
    store: list[int] = []
    _search(g, 1, store=store)
    return store or None


def is_consistent(grid) -> bool:
    """True if no digit repeats in any row/column/box among filled cells."""
    return _masks(_check_grid(grid)) is not None


def is_valid_solution(puzzle, solution) -> bool:
    """Complete valid grid that agrees with every given of ``puzzle``."""
    try:
        p, s = _check_grid(puzzle), _check_grid(solution)
    except ValueError:
        return False
    if any(v == 0 for v in s) or any(pv and pv != sv for pv, sv in zip(p, s)):
        return False
    return all({s[i] for i in unit} == set(range(1, 10)) for unit in _UNITS)


# ----------------------------------------------------------------- generation
def random_solution(rng: random.Random) -> list[int]:
    """A random complete grid (randomized backtracking fill of the empty grid)."""
    store: list[int] = []
    _search([0] * 81, 1, rng=rng, store=store)
    return store


def _check_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}")


def generate(rng: random.Random, min_clues: int, max_clues: int,
             unique: bool = True) -> tuple[list[int], list[int]]:
    """Return ``(puzzle, solution)`` with a clue count uniform in [min, max].

    unique=True: cells are removed in random order, a removal is kept only if
    the puzzle stays uniquely solvable; if the drawn target cannot be reached
    from a grid, a new grid is tried (up to MAX_GRID_ATTEMPTS, then RuntimeError).
    """
    _check_int("min_clues", min_clues)
    _check_int("max_clues", max_clues)
    if not 0 <= min_clues <= max_clues <= 81:
        raise ValueError("need 0 <= min_clues <= max_clues <= 81, "
                         f"got min_clues={min_clues}, max_clues={max_clues}")
    if unique and min_clues < MIN_UNIQUE_CLUES:
        raise ValueError(f"unique puzzles with fewer than {MIN_UNIQUE_CLUES} clues "
                         f"are not supported (min_clues={min_clues})")
    target = rng.randint(min_clues, max_clues)
    if not unique:
        solution = random_solution(rng)
        puzzle = list(solution)
        for i in rng.sample(range(81), 81 - target):
            puzzle[i] = 0
        return puzzle, solution
    for _ in range(MAX_GRID_ATTEMPTS):
        solution = random_solution(rng)
        puzzle = list(solution)
        clues = 81
        order = list(range(81))
        rng.shuffle(order)
        for i in order:
            if clues == target:
                break
            v = puzzle[i]
            puzzle[i] = 0
            # Still unique iff no solution has a different digit in cell i.
            if _search(puzzle, 1, forbid=(i, v)):
                puzzle[i] = v
            else:
                clues -= 1
        if clues == target:
            return puzzle, solution
    raise RuntimeError(f"could not reach {target} clues with a unique solution "
                       f"in {MAX_GRID_ATTEMPTS} grids")


def clue_band(n_clues: int) -> str:
    """Evaluation band for a clue count: '>=40', '30-39' or '<30'."""
    if n_clues >= 40:
        return ">=40"
    return "30-39" if n_clues >= 30 else "<30"


# ---------------------------------------------------------------------- files
def _puzzle_of(item) -> list[int]:
    """Accept a grid or a (puzzle, solution) pair."""
    return list(item[0]) if len(item) == 2 else list(item)


def write_puzzles(path, pairs) -> None:
    """Write one puzzle per line; items are grids or (puzzle, solution) pairs."""
    with open(path, "w") as f:
        for item in pairs:
            f.write(format_grid(_puzzle_of(item)) + "\n")


def _data_lines(path):
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if line and not line.startswith("#"):
                yield lineno, line


def read_puzzles(path) -> list[list[int]]:
    """Read puzzles, skipping blank and '#' lines; ValueError names the line."""
    out = []
    for lineno, line in _data_lines(path):
        try:
            out.append(parse_puzzle(line))
        except ValueError as e:
            raise ValueError(f"{path}: line {lineno}: {e}") from None
    return out


def write_dataset(path, pairs) -> None:
    """Write ``puzzle,solution`` lines."""
    with open(path, "w") as f:
        for puzzle, solution in pairs:
            f.write(f"{format_grid(puzzle)},{format_grid(solution)}\n")


def read_dataset(path) -> list[tuple[list[int], list[int]]]:
    """Read ``puzzle,solution`` lines; ValueError names the line on any problem."""
    out = []
    for lineno, line in _data_lines(path):
        try:
            parts = line.split(",")
            if len(parts) != 2:
                raise ValueError(f"expected 'puzzle,solution', found {len(parts)} fields")
            puzzle, solution = parse_puzzle(parts[0]), parse_puzzle(parts[1])
            if not is_valid_solution(puzzle, solution):
                raise ValueError("solution is not a valid solution of the puzzle")
        except ValueError as e:
            raise ValueError(f"{path}: line {lineno}: {e}") from None
        out.append((puzzle, solution))
    return out


# ------------------------------------------------------------------------ CLI
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Generate Sudoku puzzles.")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--min-clues", type=int, default=40)
    ap.add_argument("--max-clues", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--with-solutions", action="store_true",
                    help="write 'puzzle,solution' lines instead of puzzles only")
    ap.add_argument("--non-unique", action="store_true",
                    help="blank random cells without checking uniqueness (fast)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    pairs, step = [], max(1, args.n // 10)
    for k in range(1, args.n + 1):
        pairs.append(generate(rng, args.min_clues, args.max_clues,
                              unique=not args.non_unique))
        if k % step == 0 or k == args.n:
            print(f"generated {k}/{args.n} ({100 * k // args.n}%)", file=sys.stderr)
    (write_dataset if args.with_solutions else write_puzzles)(args.out, pairs)
    print(f"wrote {len(pairs)} puzzles to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
