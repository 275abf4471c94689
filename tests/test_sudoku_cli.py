"""`blockdiff sudoku`, `blockdiff demo` and the evaluation, on a tiny random Sudoku-format checkpoint (the
bundled model is exercised where it exists)."""

import json
import os
import random

import pytest
import torch

from blockdiff import DiffusionGemma, ModelConfig, save_model
from blockdiff.cli import main
from blockdiff.sudoku import format as fmt
from blockdiff.sudoku.eval import evaluate, held_out, markdown_table, score
from blockdiff.sudoku.puzzles import format_grid, generate, parse_puzzle, write_puzzles
from blockdiff.sudoku.solver import BUNDLED_MODEL, Solution


@pytest.fixture(scope="module")
def tiny_sudoku_model(tmp_path_factory):
    from blockdiff.train.recipes import RECIPES, init_weights, model_config

    path = str(tmp_path_factory.mktemp("sudoku_tiny"))
    m = DiffusionGemma(ModelConfig.from_dict(model_config(fmt.VOCAB_SIZE, fmt.CANVAS_LENGTH, **RECIPES["tiny"])))
    init_weights(m, generator=torch.Generator().manual_seed(0))
    save_model(m, path)
    fmt.write_tokenizer(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(fmt.generation_config(max_denoising_steps=4), f)
    return path


def test_sudoku_command_writes_one_solution_per_puzzle_in_order(tiny_sudoku_model, tmp_path, capsys):
    r = random.Random(0)
    pairs = [generate(r, 45, 50) for _ in range(3)]
    src, dst = tmp_path / "in.txt", tmp_path / "out.txt"
    write_puzzles(src, pairs)
    with open(src, "a") as f:
        f.write("\n# a comment line\n")
    rc = main(["sudoku", "--model", tiny_sudoku_model, "--puzzles", str(src), "--out", str(dst), "--threads", "1"])
    assert rc == 0
    lines = dst.read_text().splitlines()
    assert len(lines) == 3
    for (puzzle, _), line in zip(pairs, lines):
        grid_text = line.split()[0]  # a random model's grid is followed by " # unsolved"
        assert len(grid_text) == 81 and grid_text.isdigit()
        assert line == grid_text or line == grid_text + " # unsolved"
        grid = parse_puzzle(grid_text)
        assert all(g == p for p, g in zip(puzzle, grid) if p)  # givens are fixed by the canvas template
    assert "3 puzzles" in capsys.readouterr().err


def test_sudoku_command_names_a_bad_line(tiny_sudoku_model, tmp_path, capsys):
    src = tmp_path / "bad.txt"
    src.write_text("." * 81 + "\n" + "12x" + "." * 78 + "\n")
    rc = main(["sudoku", "--model", tiny_sudoku_model, "--puzzles", str(src), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "line 2" in capsys.readouterr().err


def test_score_counts_solves_and_blank_cell_accuracy():
    puzzle, solution = generate(random.Random(1), 45, 45)
    wrong = list(solution)
    blank = puzzle.index(0)
    wrong[blank] = wrong[blank] % 9 + 1
    r = score([(puzzle, solution)] * 2, [Solution(solution, 5, 0.1), Solution(wrong, 9, 0.1)])
    assert r["solve_rate"] == 0.5 and r["mean_steps"] == 7 and r["mean_steps_solved"] == 5
    assert r["cell_accuracy"] == pytest.approx(1 - 1 / (2 * puzzle.count(0)))


def test_evaluate_reports_every_band_for_both_decodings(tiny_sudoku_model):
    from blockdiff.engine.llm import LLM

    llm = LLM(tiny_sudoku_model, dtype="float32")
    sets = held_out(1, seed=7)
    assert {b: len(v) for b, v in sets.items()} == {">=40": 1, "30-39": 1, "<30": 1}
    res = evaluate(llm, sets, log=lambda s: None)
    for band in (">=40", "30-39", "<30"):
        assert set(res[band]) == {"diffusion", "ar"}
        assert 1 <= res[band]["diffusion"]["mean_steps"] <= 4
    table = markdown_table(res)
    assert table.count("\n") == 2 + 6 - 1


@pytest.mark.skipif(not os.path.exists(os.path.join(BUNDLED_MODEL, "model.safetensors")),
                    reason="no bundled model")
def test_eval_command_applies_sampling_overrides_and_refuses_bad_ones(tmp_path, capsys):
    from blockdiff.sudoku.eval import main

    base = ["--per-band", "3", "--bands", "30-39", "--modes", "diffusion", "--threads", "1"]

    def steps(threshold):
        out = tmp_path / f"{threshold}.json"
        assert main(base + ["--confidence-threshold", threshold, "--out", str(out)]) == 0
        return json.loads(out.read_text())["results"]["30-39"]["diffusion"]["mean_steps"]

    # a canvas stops once stable and below the threshold: rarely below 1e-12 (most run to the 48-step cap),
    # as soon as it is stable below 1e9
    strict, loose = steps("1e-12"), steps("1e9")
    assert strict > 30 and loose < 10
    assert main(base + ["--confidence-threshold", "-1"]) == 2
    assert "confidence_threshold" in capsys.readouterr().err
    assert main(base + ["--t-max", "0.2", "--t-min", "0.5"]) == 2
    assert "t_max must be greater than t_min" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists(os.path.join(BUNDLED_MODEL, "model.safetensors")),
                    reason="no bundled model")
def test_demo_verifies_the_bundled_models_answer_with_the_exact_solver(capsys):
    rc = main(["demo", "--seed", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert "verified by the exact solver" in out
    grid = out.split("solution ")[1].split()[0]
    assert len(grid) == 81
    assert rc == (0 if "correct" in out else 1)


PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_puzzle_files_saved_on_windows_read_like_any_other(tmp_path, monkeypatch, source):
    """A file saved as "UTF-8 with BOM" (Notepad) with CRLF line endings: its line 1 was "puzzle must have 81
    characters, found 82" (the invisible BOM counted)."""
    import io

    from blockdiff.sudoku.cli import _read_puzzles

    data = ("\ufeff" + PUZZLE + "\r\n\r\n# c\r\n" + PUZZLE.replace(".", "0") + "\r\n").encode("utf-8")
    if source == "file":
        (tmp_path / "in.txt").write_bytes(data)
        path = str(tmp_path / "in.txt")
    else:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="ascii"))  # any locale
        path = "-"
    assert _read_puzzles(path) == [parse_puzzle(PUZZLE)] * 2


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_a_puzzle_file_that_is_not_utf8_names_the_file_and_line(tmp_path, monkeypatch, capsys, source):
    """It was "blockdiff: error: 'utf-8' codec can't decode byte 0xff in position 163: ..." (no file, no line)."""
    import io

    data = (PUZZLE + "\n" + PUZZLE + "\n").encode() + b"\xff" + (PUZZLE + "\n").encode()
    if source == "file":
        (tmp_path / "in.txt").write_bytes(data)
        path = str(tmp_path / "in.txt")
    else:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        path = "-"
    assert main(["sudoku", "--puzzles", path, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    name = "stdin" if path == "-" else path
    assert capsys.readouterr().err == f"blockdiff: error: {name}: line 3: not UTF-8 text (byte 0xff)\n"


def test_a_puzzle_line_drawn_with_spaces_and_bars_reads_as_run_reads_it(tmp_path):
    """`run` ignores spaces and a drawn grid's | - + in a puzzle; `sudoku --puzzles` called such a line "puzzle
    must have 81 characters, found 101"."""
    from blockdiff.sudoku.cli import _read_puzzles

    rows = [PUZZLE[i:i + 9] for i in range(0, 81, 9)]
    drawn = " | ".join(" ".join(r[j:j + 3] for j in (0, 3, 6)) for r in rows)  # "53. .7. ... | 6.. 195 ..."
    (tmp_path / "in.txt").write_text(f"{drawn}\n------+-------+------\n\t{PUZZLE}\n")
    assert _read_puzzles(str(tmp_path / "in.txt")) == [parse_puzzle(PUZZLE)] * 2  # the separator line is skipped
    (tmp_path / "bad.txt").write_text(PUZZLE[:80] + " | x\n")
    from blockdiff.cli import CLIError
    with pytest.raises(CLIError, match=r"bad.txt: line 1: bad character 'x'"):
        _read_puzzles(str(tmp_path / "bad.txt"))
