import random

import pytest

from blockdiff.sudoku import puzzles as P

WIKI_PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
WIKI_SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
# A hard 17-clue puzzle (minimum-clue class).
HARD_17 = "000000010400000000020000000000050407008000300001090000300400200050100000000806000"
# Arto Inkala's "world's hardest sudoku".
ARTO = "800000000003600000070090200050007000000045700000100030001000068008500010090000400"


def test_solver_returns_known_solution_of_classic_puzzle():
    assert P.format_grid(P.solve(P.parse_puzzle(WIKI_PUZZLE))) == WIKI_SOLUTION


@pytest.mark.parametrize("line", [HARD_17, ARTO])
def test_solver_solves_hard_puzzles_and_solution_validates(line):
    puzzle = P.parse_puzzle(line)
    assert sum(v > 0 for v in puzzle) <= 21
    solution = P.solve(puzzle)
    assert solution is not None and P.is_valid_solution(puzzle, solution)
    assert P.count_solutions(puzzle) == 1


def test_count_solutions_of_empty_grid_stops_at_limit():
    assert P.count_solutions([0] * 81) == 2
    assert P.count_solutions([0] * 81, limit=5) == 5


def test_count_solutions_detects_unique_puzzle():
    assert P.count_solutions(P.parse_puzzle(WIKI_PUZZLE)) == 1


def test_count_solutions_detects_two_solutions_from_deadly_rectangle():
    grid = P.parse_puzzle(WIKI_SOLUTION)
    cells = [3 * 9 + 5, 3 * 9 + 8, 4 * 9 + 5, 4 * 9 + 8]  # a,b / b,a across two boxes
    assert grid[cells[0]] == grid[cells[3]] and grid[cells[1]] == grid[cells[2]]
    for i in cells:
        grid[i] = 0
    assert P.count_solutions(grid) == 2


def test_consistent_but_unsolvable_grid_has_no_solution():
    grid = [0] * 81
    grid[0:8] = range(1, 9)  # row 0 needs a 9 in column 8 ...
    grid[9 + 6] = 9          # ... but the top-right box already has one
    assert P.is_consistent(grid)
    assert P.count_solutions(grid) == 0
    assert P.solve(grid) is None


def test_conflicting_givens_are_inconsistent_and_solve_raises():
    grid = [0] * 81
    grid[0] = grid[80 - 8] = 5  # same column 0
    assert not P.is_consistent(grid)
    assert P.count_solutions(grid) == 0
    with pytest.raises(ValueError, match="conflict"):
        P.solve(grid)


def test_is_valid_solution_rejects_swapped_pair_wrong_given_and_blank():
    puzzle, solution = P.parse_puzzle(WIKI_PUZZLE), P.parse_puzzle(WIKI_SOLUTION)
    assert P.is_valid_solution(puzzle, solution)
    swapped = list(solution)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # row still fine, columns broken
    assert not P.is_valid_solution([0] * 81, swapped)
    wrong_given = list(puzzle)
    wrong_given[2] = solution[2] % 9 + 1
    assert not P.is_valid_solution(wrong_given, solution)
    incomplete = list(solution)
    incomplete[40] = 0
    assert not P.is_valid_solution(puzzle, incomplete)


def test_random_solution_is_a_valid_complete_grid_and_seeded():
    sol = P.random_solution(random.Random(3))
    assert P.is_valid_solution([0] * 81, sol)
    assert sol == P.random_solution(random.Random(3))
    assert sol != P.random_solution(random.Random(4))


@pytest.mark.parametrize("lo,hi", [(40, 50), (30, 35), (25, 29)])
def test_generate_yields_unique_puzzle_in_clue_range_agreeing_with_solution(lo, hi):
    rng = random.Random(11)
    for _ in range(3):
        puzzle, solution = P.generate(rng, lo, hi)
        assert lo <= sum(v > 0 for v in puzzle) <= hi
        assert P.is_valid_solution(puzzle, solution)
        assert P.count_solutions(puzzle) == 1


def test_generate_is_deterministic_for_fixed_seed():
    a = [P.generate(random.Random(5), 30, 40) for _ in range(2)]
    assert a[0] == a[1]
    assert P.generate(random.Random(6), 30, 40) != a[0]


def test_generate_non_unique_fast_path_blanks_to_clue_count():
    rng = random.Random(0)
    for _ in range(5):
        puzzle, solution = P.generate(rng, 10, 20, unique=False)
        assert 10 <= sum(v > 0 for v in puzzle) <= 20
        assert P.is_valid_solution(puzzle, solution)


@pytest.mark.parametrize("args", [(50, 40), (-1, 10), (40, 82), (30.0, 40), (17, 30)])
def test_generate_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        P.generate(random.Random(0), *args)


def test_parse_puzzle_error_states_length_found():
    with pytest.raises(ValueError, match="81.*found 80"):
        P.parse_puzzle("." * 80)


def test_parse_puzzle_error_names_bad_char_and_position():
    with pytest.raises(ValueError, match=r"'x' at position 5"):
        P.parse_puzzle("." * 5 + "x" + "." * 75)


def test_parse_accepts_dot_and_zero_blanks_and_strips_whitespace():
    assert P.parse_puzzle("  " + HARD_17 + "\n") == P.parse_puzzle(HARD_17.replace("0", "."))
    assert P.format_grid(P.parse_puzzle(HARD_17), blank="0") == HARD_17


def test_pretty_renders_nine_rows_with_box_separators():
    lines = P.pretty(P.parse_puzzle(WIKI_PUZZLE)).splitlines()
    assert len(lines) == 11
    assert lines[0] == "5 3 . | . 7 . | . . ."
    assert lines[3] == lines[7] == "------+-------+------"


def test_puzzle_file_round_trip_skips_comments_and_blanks(tmp_path):
    rng = random.Random(1)
    pairs = [P.generate(rng, 30, 40, unique=False) for _ in range(4)]
    path = tmp_path / "p.txt"
    P.write_puzzles(path, pairs)
    path.write_text("# header\n\n" + path.read_text())
    assert P.read_puzzles(path) == [p for p, _ in pairs]


def test_dataset_file_round_trip(tmp_path):
    rng = random.Random(2)
    pairs = [P.generate(rng, 30, 40, unique=False) for _ in range(4)]
    path = tmp_path / "d.csv"
    P.write_dataset(path, pairs)
    assert P.read_dataset(path) == pairs


def test_read_errors_name_the_line_number(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("# c\n" + WIKI_PUZZLE + "\n" + "." * 80 + "\n")
    with pytest.raises(ValueError, match="line 3.*found 80"):
        P.read_puzzles(path)
    path.write_text(WIKI_PUZZLE + "," + WIKI_PUZZLE + "\n")
    with pytest.raises(ValueError, match="line 1.*not a valid solution"):
        P.read_dataset(path)


def test_clue_band_boundaries():
    assert P.clue_band(40) == ">=40" and P.clue_band(39) == "30-39"
    assert P.clue_band(30) == "30-39" and P.clue_band(29) == "<30"
    for band in P.BANDS:
        lo, hi = P.BAND_RANGES[band]
        assert P.clue_band(lo) == P.clue_band(hi) == band


def test_cli_writes_solutions_and_reports_progress(tmp_path, capsys):
    out = tmp_path / "gen.csv"
    P.main(["--n", "10", "--min-clues", "40", "--max-clues", "45",
            "--seed", "0", "--out", str(out), "--with-solutions"])
    data = P.read_dataset(out)
    assert len(data) == 10
    assert all(40 <= sum(v > 0 for v in p) <= 45 for p, _ in data)
    assert "100%" in capsys.readouterr().err
