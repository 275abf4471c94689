"""``--chat-template FILE`` on run / chat / serve: the file replaces the checkpoint's template."""

from __future__ import annotations

import argparse

import pytest

from blockdiff.cli import build_parser, main

ARGS = ["--max-new-tokens", "8", "--steps", "2", "--seed", "0"]


def test_run_uses_the_given_chat_template(tiny_checkpoint, tmp_path, capsys):
    t = tmp_path / "t.jinja"
    t.write_text("{{ raise_exception('rendered by the custom template') }}")
    assert main(["run", tiny_checkpoint, "hi", "--chat-template", str(t), *ARGS]) == 2
    assert "rendered by the custom template" in capsys.readouterr().err
    assert main(["run", tiny_checkpoint, "hi", *ARGS]) == 0  # the checkpoint's own template still works


@pytest.mark.parametrize("content, message", [(None, "cannot read"), ("{% for %}", "not a valid Jinja template")])
def test_a_bad_chat_template_file_exits_2_naming_the_flag(tiny_checkpoint, tmp_path, capsys, content, message):
    t = tmp_path / "t.jinja"
    if content is not None:
        t.write_text(content)
    assert main(["run", tiny_checkpoint, "hi", "--chat-template", str(t), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "--chat-template" in err and message in err


def test_a_chat_template_that_is_not_utf8_or_a_folder_names_the_flag(tiny_checkpoint, tmp_path, capsys):
    """It was "blockdiff: error: 'utf-8' codec can't decode byte 0xff in position 0" (no flag, no file), and a
    folder was "no such file"."""
    t = tmp_path / "t.jinja"
    t.write_bytes(b"\xff{{ messages }}")
    assert main(["run", tiny_checkpoint, "hi", "--chat-template", str(t), *ARGS]) == 2
    assert capsys.readouterr().err.endswith(
        f"\nblockdiff: error: --chat-template: {t} is not UTF-8 text (byte 0xff at offset 0)\n")
    assert main(["run", tiny_checkpoint, "hi", "--chat-template", str(tmp_path), *ARGS]) == 2
    assert capsys.readouterr().err == f"blockdiff: error: --chat-template: cannot read {tmp_path}: it is a folder\n"


@pytest.mark.parametrize("cmd", ["run", "chat", "serve"])
def test_the_flag_is_on_run_chat_and_serve(cmd):
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    assert any("--chat-template" in a.option_strings for a in sub._actions)
