"""The command line as a newcomer meets it: stdin/stdout for `sudoku`, unsolved puzzles marked, `demo` printing its
board once when piped, errors in the flags the user typed, the subcommand's usage for a bad flag, plain help text,
and `demo --web` serving the playground."""

import io
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from blockdiff.cli import build_parser, main
from blockdiff.sudoku.puzzles import is_valid_solution, parse_puzzle
from blockdiff.sudoku.solver import BUNDLED_MODEL

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sudoku_reads_stdin_and_writes_stdout(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"# a comment\n{PUZZLE}\n\n{PUZZLE.replace('.', '0')}\n"))
    assert main(["sudoku", "--puzzles", "-", "--out", "-", "--threads", "1"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert len(lines) == 2 and all(is_valid_solution(parse_puzzle(PUZZLE), parse_puzzle(x)) for x in lines)
    assert "2 puzzles · 2 solved" in cap.err and "stdout" in cap.err  # the summary stays off stdout


def test_sudoku_marks_a_puzzle_the_model_did_not_solve(monkeypatch, capsys):
    # one denoising step on an empty grid: the model's draft is no valid Sudoku
    monkeypatch.setattr("sys.stdin", io.StringIO("." * 81 + "\n"))
    assert main(["sudoku", "--puzzles", "-", "--out", "-", "--steps", "1", "--threads", "1"]) == 0
    cap = capsys.readouterr()
    grid, mark = cap.out.strip().split(" ", 1)
    assert len(grid) == 81 and mark == "# unsolved"
    assert "1 puzzle · 0 solved" in cap.err


def test_sudoku_live_with_out_dash_keeps_stdout_to_the_solution_lines(monkeypatch, capsys):
    """`sudoku --puzzles - --out - --live` drew every puzzle's board on stdout, before the solutions: a pipe or a
    redirect got the drawings mixed into the one-solution-per-line output. The boards go to stderr."""
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PUZZLE}\n{PUZZLE}\n"))
    assert main(["sudoku", "--puzzles", "-", "--out", "-", "--live", "--threads", "1"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert len(lines) == 2 and all(re.fullmatch(r"\d{81}( # unsolved)?", x) for x in lines), cap.out
    assert "puzzle 2/2" in cap.err and cap.err.count(" | ") >= 2 * 9 * 2  # the boards, on stderr


@pytest.mark.parametrize("flags", [["--port", "8123"], ["--open"]])
def test_demo_web_flags_without_web_are_refused(monkeypatch, capsys, flags):
    """They were ignored: `demo --open` solved a puzzle in the terminal and opened nothing."""
    import blockdiff.sudoku.cli as sudoku_cli

    monkeypatch.setattr(sudoku_cli, "_load", lambda args: pytest.fail("loaded the model"))
    assert main(["demo", *flags]) == 2
    assert capsys.readouterr().err == f"blockdiff: error: {flags[0]} applies only with --web (the playground in the browser)\n"


def test_sudoku_batch_size_with_live_is_refused(monkeypatch, capsys):
    """--live solves one puzzle at a time: --batch-size was accepted and ignored."""
    import blockdiff.sudoku.cli as sudoku_cli

    monkeypatch.setattr(sudoku_cli, "_load", lambda args: pytest.fail("loaded the model"))
    monkeypatch.setattr("sys.stdin", io.StringIO(PUZZLE + "\n"))
    assert main(["sudoku", "--puzzles", "-", "--out", "-", "--live", "--batch-size", "8"]) == 2
    assert capsys.readouterr().err == ("blockdiff: error: --batch-size does not apply with --live (it shows one "
                                       "puzzle at a time)\n")


def test_demo_piped_prints_the_final_board_once(capsys):
    main(["demo", "--seed", "0", "--threads", "1"])
    out = capsys.readouterr().out
    board_rows = [line for line in out.splitlines() if re.fullmatch(r"(\S \S \S \| ){2}\S \S \S", line)]
    assert len(board_rows) == 9, out
    assert "\x1b[" not in out  # no cursor movement: no live redraw


@pytest.mark.parametrize("argv, flag", [
    (["run", BUNDLED_MODEL, PUZZLE, "--steps", "0"], "--steps"),
    (["run", BUNDLED_MODEL, PUZZLE, "--max-new-tokens", "0"], "--max-new-tokens"),
    (["run", BUNDLED_MODEL, PUZZLE, "--t-max", "0.1", "--t-min", "0.5"], "--t-max must be greater than --t-min"),
    (["demo", "--steps", "0"], "--steps"),
    (["run", BUNDLED_MODEL, PUZZLE, "--seed", "-1"], "'--seed' must be >= 0"),
    (["run", BUNDLED_MODEL, PUZZLE, "--stop", ""], "'--stop[0]' must not be empty"),
])
def test_errors_name_the_flag_the_user_typed(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "max_denoising_steps" not in err and "max_new_tokens" not in err and "t_max" not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["run", "sudoku", "serve"])
def test_a_bad_flag_prints_the_subcommands_usage(command, capsys):
    needed = ["--puzzles", "-", "--out", "-"] if command == "sudoku" else [BUNDLED_MODEL]
    argv = [command] + needed + ["--no-such-flag"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: blockdiff {command}" in err and "unrecognized arguments: --no-such-flag" in err


def test_help_has_no_rest_markup_and_every_subcommand_a_description():
    parser = build_parser()
    markup = re.compile(r"``|:(?:func|class|meth|mod|attr):`|::\s*$", re.M)
    assert not markup.search(parser.format_help())
    assert set(parser.subcommands) >= {"run", "chat", "serve", "bench", "train", "sudoku", "demo", "quantize"}
    for name, sub in parser.subcommands.items():
        assert sub.description and sub.description.strip(), name
        assert not markup.search(sub.format_help()), (name, markup.search(sub.format_help()))


def test_demo_web_serves_the_playground_and_prints_its_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "blockdiff", "demo", "--web", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        lines = []  # log lines (the loader's info) may come first
        while not lines or (f"http://127.0.0.1:{port}/" not in lines[-1] and len(lines) < 20 and lines[-1]):
            lines.append(proc.stdout.readline())
        assert f"http://127.0.0.1:{port}/" in lines[-1], lines
        deadline = time.time() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert r.status_code == 200 and 'data-testid="sudoku-board"' in r.text
        assert httpx.get(f"http://127.0.0.1:{port}/playground/config").json()["sudoku"] is True
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.parametrize("argv, words", [
    (["sudoku", "--puzzles", "-", "--out", "-", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["sudoku", "--puzzles", "-", "--out", "-", "--batch-size", "-1"], "argument --batch-size: must be >= 1, got -1"),
    (["sudoku", "--puzzles", "-", "--out", "-", "--seed", "-5"], "argument --seed: must be >= 0, got -5"),
    (["train", "--out", "OUT", "--max-steps", "-1"], "argument --max-steps: must be >= 1, got -1"),
    (["train", "--out", "OUT", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["train", "--out", "OUT", "--lr", "-1"], "argument --lr: must be > 0, got -1"),
    (["train", "--out", "OUT", "--sc-prob", "1.5"], "argument --sc-prob: must be in [0, 1], got 1.5"),
    (["train", "--out", "OUT", "--batch-size", "many"], "argument --batch-size: expected an integer, got 'many'"),
])
def test_out_of_range_numbers_are_refused_while_parsing_before_any_work(argv, words, capsys, tmp_path):
    out = tmp_path / "run"
    argv = [str(out) if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err
    assert not out.exists()  # nothing written: a refused run leaves no folder behind


def test_the_solver_api_refuses_a_batch_size_below_one():
    from blockdiff.sudoku.solver import solve_diffusion
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        solve_diffusion(None, [parse_puzzle(PUZZLE)], batch_size=0)


def test_sudoku_commands_on_a_model_that_is_not_a_sudoku_model_say_so(tmp_path, capsys, monkeypatch):
    from fixtures import make_checkpoint
    path = make_checkpoint(tmp_path / "tiny")
    monkeypatch.setattr("sys.stdin", io.StringIO(PUZZLE + "\n"))
    assert main(["sudoku", "--model", path, "--puzzles", "-", "--out", "-", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "is not a Sudoku model" in err and "allowed_token_ids" not in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, words", [
    (["--prompt-ids", "1,x"], "--prompt-ids must be integers"),
    (["hi", "--chat-template", "/no/such/template.jinja"], "--chat-template: cannot read /no/such/template.jinja: no such file"),
    (["hi", "--keep-embedding"], "--keep-embedding applies only with --quantization"),
    (["hi", "--keep-embedding", "--quantization", "none"], "--keep-embedding applies only with --quantization"),
    (["hi", "--quantization", ""], "--quantization is empty"),
    (["hi", "--raw", "--system", "Be brief."], "--system is a chat-mode message"),
    (["  "], "the prompt is empty"),
])
def test_run_checks_its_own_flags_before_loading_the_model(argv, words, capsys):
    # the model folder does not exist: the flag's error coming first proves no load was tried
    assert main(["run", "/no/such/model"] + argv) == 2
    assert words in capsys.readouterr().err


def test_demo_web_on_a_busy_port_is_one_line_before_loading(capsys):
    """As for serve: exit 2 and one line naming --port, and no URL printed for a page that will never be there."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--web", "--port", str(port), "--model", "/nonexistent/never-loaded"]) == 2
    out, err = capsys.readouterr()
    assert "http://" not in out and err.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err and "(--port)" in err


def test_demo_web_steps_is_the_pages_default(monkeypatch, capsys):
    """--steps with --web sets the steps of the page's requests that leave the setting empty (it was ignored)."""
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.setdefault("app", self.config.app))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch

    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--web", "--port", str(port), "--steps", "7", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert served["app"].state.engine.engine.defaults.max_denoising_steps == 7


def test_serve_prints_the_playground_url(tiny_checkpoint, monkeypatch, capsys):
    """docs/playground.md: serve serves the page at /; its start-up line says where (it named only /v1)."""
    import torch
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = torch.get_num_threads()
    try:
        assert main(["serve", tiny_checkpoint, "--port", str(port), "--threads", "1", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert f"the playground page: http://127.0.0.1:{port}/\n" in capsys.readouterr().out


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_serve_prints_a_url_that_works(tiny_checkpoint, monkeypatch, capsys, host):
    """--port 0 (any free port) prints the port uvicorn will listen on, not 0; an IPv6 host is bracketed in the
    URL (http://[::1]:PORT/, as a browser needs it), not http://::1:PORT/."""
    import torch
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.setdefault("config", self.config))
    threads = torch.get_num_threads()
    try:
        assert main(["serve", tiny_checkpoint, "--host", host, "--port", "0", "--threads", "1", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    port = served["config"].port
    assert port != 0
    shown = f"[{host}]" if ":" in host else host
    out = capsys.readouterr().out
    assert f"on http://{shown}:{port}/v1 " in out and f"the playground page: http://{shown}:{port}/\n" in out


def test_demo_web_port_0_prints_the_port_it_serves_on(monkeypatch, capsys):
    import torch
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.setdefault("config", self.config))
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--web", "--port", "0", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    port = served["config"].port
    assert port != 0 and f"the playground is at http://127.0.0.1:{port}/ " in capsys.readouterr().out
