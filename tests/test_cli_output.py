"""Where the command line's output goes when it is not a UTF-8 terminal: a pipe whose reader stops early
(`| head -1`), a stdout whose encoding is ASCII (PYTHONIOENCODING=ascii, a non-UTF-8 locale)."""

import io
import os
import sys

import pytest

import blockdiff.cli
from blockdiff.cli import SIGPIPE_STATUS, main


def _stdout_on_a_closed_pipe():
    r, w = os.pipe()
    os.close(r)  # the reader (`head -1`) has gone
    return io.TextIOWrapper(io.FileIO(w, "w"), encoding="utf-8", line_buffering=False)


@pytest.mark.skipif(not hasattr(os, "pipe") or sys.platform == "win32", reason="POSIX pipes")
def test_a_reader_that_stops_early_ends_the_command_quietly_with_141(monkeypatch, capsys):
    """`blockdiff sudoku ... --out - | head -1` (or `run ... | true`) printed "blockdiff: error: [Errno 32] Broken
    pipe" and exited 2, the status of bad input; left to Python's exit, "Exception ignored ... BrokenPipeError"."""
    out = _stdout_on_a_closed_pipe()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(blockdiff.cli, "cmd_run", lambda args: print("x" * 100_000, flush=True) or 0)
    assert main(["run", "x", "hi"]) == SIGPIPE_STATUS == 141
    assert capsys.readouterr().err == ""
    out.write("late output")  # Python's own flush at exit: it must not raise (stdout now goes to /dev/null)
    out.flush()


@pytest.mark.skipif(not hasattr(os, "pipe") or sys.platform == "win32", reason="POSIX pipes")
def test_a_closed_pipe_seen_only_by_the_last_flush_is_141_too(monkeypatch, capsys):
    out = _stdout_on_a_closed_pipe()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(blockdiff.cli, "cmd_run", lambda args: print("answer") or 0)  # still in the buffer
    assert main(["run", "x", "hi"]) == 141
    assert capsys.readouterr().err == ""


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch, capsys):
    def fails(args):
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a worker's pipe; stdout (capsys) is fine

    monkeypatch.setattr(blockdiff.cli, "cmd_run", fails)
    monkeypatch.setattr(blockdiff.cli, "_stdout_reader_gone", lambda: False)
    assert main(["run", "x", "hi"]) == 2
    assert capsys.readouterr().err == "blockdiff: error: [Errno 32] Broken pipe\n"


def test_text_an_ascii_stdout_cannot_encode_is_replaced_not_an_error(monkeypatch, capsys):
    """PYTHONIOENCODING=ascii: `run` printed the answer, then "blockdiff: error: 'ascii' codec can't encode
    character '\\xb7'" (the closing line's '·') and exited 2; `demo` the same after the board."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(blockdiff.cli, "cmd_run", lambda args: print("sky · blue — ☀") or 0)
    assert main(["run", "x", "hi"]) == 0
    assert raw.getvalue() == b"sky ? blue ? ?\n"
    assert capsys.readouterr().err == ""


def test_a_utf8_stdout_is_left_strict(monkeypatch):
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(blockdiff.cli, "cmd_run", lambda args: 0)
    assert main(["run", "x", "hi"]) == 0
    assert out.errors == "strict"
