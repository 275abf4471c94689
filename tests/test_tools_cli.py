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


@pytest.mark.parametrize("cmd", ["run", "chat", "serve"])
def test_the_flag_is_on_run_chat_and_serve(cmd):
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    assert any("--chat-template" in a.option_strings for a in sub._actions)
