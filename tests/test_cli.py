"""The ``blockdiff`` command line, run in-process on the tiny checkpoint: ``run``, ``chat``, errors, the canvas view."""

import io
import re

import pytest
from rich.console import Console

from blockdiff import LLM, SamplingParams
from blockdiff.cli import build_parser, main
from blockdiff.engine.model_state import Event
from blockdiff.live import ACCEPTED, CHANGING, SETTLED, CanvasView

CLOSING = re.compile(r"^\[(\d+) tokens · (\d+) denoising steps · (\d+) canvas(es)? · [\d.]+ tokens/forward · "
                     r"[\d.]+ tok/s · [\d.]+ s · (stop|length)\]$")
ARGS = ["--max-new-tokens", "20", "--steps", "3", "--seed", "0"]


def params():
    return SamplingParams(max_new_tokens=20, max_denoising_steps=3, seed=0)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint)


def split_output(out: str) -> tuple[str, str]:
    answer, closing = out.rstrip("\n").rsplit("\n", 1)
    return answer, closing


def test_run_prints_the_chat_answer_and_a_closing_line(tiny_checkpoint, llm, capsys):
    assert main(["run", tiny_checkpoint, "Why is the sky blue?", *ARGS]) == 0
    answer, closing = split_output(capsys.readouterr().out)
    # The checkpoint has a chat template, so the prompt is wrapped in it by default.
    expected = llm.chat([{"role": "user", "content": "Why is the sky blue?"}], params())[0]
    assert answer == expected.text
    m = CLOSING.match(closing)
    assert m, closing
    assert int(m.group(1)) == len(expected.token_ids)
    assert int(m.group(2)) == expected.metrics.denoise_steps
    assert int(m.group(3)) == expected.metrics.canvases


def test_raw_sends_the_prompt_as_plain_text(tiny_checkpoint, llm, capsys):
    assert main(["run", tiny_checkpoint, "Why is the sky blue?", "--raw", *ARGS]) == 0
    answer, closing = split_output(capsys.readouterr().out)
    assert answer == llm.generate(["Why is the sky blue?"], params())[0].text
    assert CLOSING.match(closing)


def test_prompt_ids_are_sent_as_given(tiny_checkpoint, llm, capsys):
    assert main(["run", tiny_checkpoint, "--prompt-ids", "2,40,41,42", *ARGS]) == 0
    answer, _ = split_output(capsys.readouterr().out)
    assert answer == llm.generate(prompt_token_ids=[[2, 40, 41, 42]], sampling_params=params())[0].text


def test_live_falls_back_to_plain_output_without_a_terminal(tiny_checkpoint, capsys):
    assert main(["run", tiny_checkpoint, "Hello", *ARGS]) == 0
    plain = capsys.readouterr().out
    assert main(["run", tiny_checkpoint, "Hello", "--live", *ARGS]) == 0
    live = capsys.readouterr().out
    assert "\x1b[" not in live
    assert split_output(live)[0] == split_output(plain)[0]


def test_bad_model_path_exits_2_with_one_line(tmp_path, capsys):
    missing = str(tmp_path / "no-such-checkpoint")
    assert main(["run", missing, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", [["--t-min", "0.9", "--t-max", "0.5"], ["--max-new-tokens", "0"], ["--steps", "-1"]])
def test_bad_sampling_params_exit_2_with_one_line(tiny_checkpoint, capsys, bad):
    assert main(["run", tiny_checkpoint, "hi", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blockdiff: error:") and err.count("\n") == 1


@pytest.mark.parametrize("prompt, words", [
    (["hi"], "the prompt (at least 1 token) plus --max-new-tokens (5000, in canvases of 16) needs at least 5009 "
             "positions; the model's context is 2048"),
    (["--prompt-ids", "1,2,3"], "the prompt (3 tokens) plus --max-new-tokens (5000, in canvases of 16) needs 5011 "
                                "positions; the model's context is 2048")])
def test_run_checks_max_new_tokens_against_the_context_before_loading(tiny_checkpoint, capsys, monkeypatch,
                                                                       prompt, words):
    """From config.json, before the model loads (seconds with tensor parallel; minutes for big models), in the
    words of the engine's check after the load (next test)."""
    def load_llm(*a, **k):
        raise AssertionError("the model was loaded before --max-new-tokens was checked")
    monkeypatch.setattr("blockdiff.cli.load_llm", load_llm)
    assert main(["run", tiny_checkpoint, *prompt, "--max-new-tokens", "5000"]) == 2
    err = capsys.readouterr().err
    assert err == f"blockdiff: error: {words}\n"


def test_the_engine_refuses_max_new_tokens_past_the_context_in_the_same_words(llm):
    with pytest.raises(ValueError, match=re.escape("the prompt (3 tokens) plus max_new_tokens (5000, in canvases of "
                                                   "16) needs 5011 positions; the model's context is 2048")):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_new_tokens=5000))


def test_chat_refuses_a_max_new_tokens_past_the_context_once_with_status_2(tiny_checkpoint, tmp_path, monkeypatch,
                                                                           capsys):
    """Every turn failed with "blockdiff: error: ... max_new_tokens ..." and a piped session ended with status 0. A
    checkpoint folder: before the load; a .gguf file: once its context is known."""
    from gguf_fixtures import write_gguf

    words = ("the prompt (at least 1 token) plus --max-new-tokens (5000, in canvases of 16) needs at least "
             f"{1 + -(-5000 // 16) * 16} positions; the model's context is 2048")
    for model in (tiny_checkpoint, write_gguf(tiny_checkpoint, str(tmp_path / "tiny.gguf"))):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n"))
        assert main(["chat", model, "--max-new-tokens", "5000", "--quiet"]) == 2
        out, err = capsys.readouterr()
        assert err == f"blockdiff: error: {words}\n" and not CLOSING.search(out), (out, err)


def test_chat_turn_errors_name_the_flags_and_the_session_goes_on(tiny_checkpoint, monkeypatch, capsys):
    """A turn the context cannot hold (a long message with a large --max-new-tokens) is one error line in the
    flags' words (it said max_new_tokens), and the next turn still runs."""
    monkeypatch.setattr("sys.stdin", io.StringIO(" ".join(["word"] * 80) + "\nhi\n"))
    assert main(["chat", tiny_checkpoint, "--max-new-tokens", "2000", "--steps", "2", "--quiet"]) == 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockdiff: error:"), err
    assert "--max-new-tokens" in lines[0] and "max_new_tokens" not in lines[0], lines[0]
    assert sum(bool(CLOSING.match(x)) for x in out.splitlines()) == 1  # the second turn answered


def test_run_needs_a_prompt(tiny_checkpoint, capsys):
    assert main(["run", tiny_checkpoint]) == 2
    assert "prompt" in capsys.readouterr().err


def test_chat_answers_each_line_until_exit(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you?\n/exit\nnever read\n"))
    assert main(["chat", tiny_checkpoint, *ARGS]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(bool(CLOSING.match(x)) for x in lines) == 2


def test_chat_keeps_the_conversation_and_reset_clears_it(tiny_checkpoint, monkeypatch, capsys):
    seen = []
    original = LLM.chat

    def spy(self, messages, *a, **kw):
        seen.append([m["role"] for m in messages])
        return original(self, messages, *a, **kw)

    monkeypatch.setattr(LLM, "chat", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n/reset\n/rest\nthree\n"))  # ends at EOF
    assert main(["chat", tiny_checkpoint, *ARGS]) == 0
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]  # a mistyped command is not a turn
    out = capsys.readouterr().out
    assert "(conversation cleared)" in out and "(unknown command /rest:" in out


def test_every_subcommand_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "chat", "bench"} <= set(sub.choices)


def test_a_missing_subcommand_module_does_not_break_the_cli(monkeypatch):
    monkeypatch.setattr("blockdiff.cli.SUBCOMMAND_MODULES", ("blockdiff.no_such_piece.cli", "blockdiff.bench.cli"))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "chat", "bench"} <= set(sub.choices)


# ---------------------------------------------------------------------------------------------- CanvasView
def ev(kind, ids, step=0, accepted=None, reason=None):
    return Event(kind, "r", 0, ids, step=step, accepted=accepted, finish_reason=reason)


def test_canvas_view_highlights_accepted_and_settles_unchanged_positions():
    view = CanvasView(decode=lambda ids: "".join(chr(97 + i) for i in ids), max_steps=4)
    view(ev("draft", [0, 1, 2, 3], step=1, accepted=[False, True, False, False]))
    assert [s for _, s in view.cells()] == [CHANGING, ACCEPTED, CHANGING, CHANGING]
    view(ev("draft", [0, 1, 5, 3], step=2, accepted=[True, False, False, False]))
    assert view.cells() == [("a", ACCEPTED), ("b", SETTLED), ("f", CHANGING), ("d", SETTLED)]
    assert "step 2/4" in view.status() and "1 accepted" in view.status()
    view(ev("block", [0, 1, 5, 3], step=2))
    assert view.cells() == [] and view.committed == [0, 1, 5, 3] and "canvas 2" in view.status()
    view(ev("draft", [2, 2], step=1, accepted=[True, True]))
    assert view.plain().splitlines()[0] == "abfdcc"
    view(ev("done", [0, 1, 5, 3], reason="length"))
    assert "done (length)" in view.status()
    console = Console(record=True, width=60, force_terminal=True)
    console.print(view)
    assert "abfd" in console.export_text()


def test_canvas_view_ignores_other_requests_and_shows_ids_without_a_tokenizer():
    view = CanvasView(request_index=1)
    view(Event("draft", "x", 0, [7, 8], step=1, accepted=[True, False]))
    assert view.canvas is None
    view(Event("draft", "y", 1, [7, 8], step=1, accepted=[True, False]))
    assert view.cells() == [("7 ", ACCEPTED), ("8 ", CHANGING)]


def test_a_broken_subcommand_module_is_reported_and_skipped(monkeypatch, capsys):
    import importlib

    real_import = importlib.import_module

    def import_module(name, *a, **k):
        if name == "blockdiff.broken.cli":
            raise RuntimeError("half-written module")
        return real_import(name, *a, **k)

    monkeypatch.setattr("blockdiff.cli.importlib.import_module", import_module)
    monkeypatch.setattr("blockdiff.cli.SUBCOMMAND_MODULES", ("blockdiff.broken.cli", "blockdiff.bench.cli"))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "chat", "bench"} <= set(sub.choices)
    assert "broken subcommand is unavailable: half-written module" in capsys.readouterr().err


@pytest.mark.parametrize("argv, what", [(["caf\udce9"], "the prompt"), (["ok", "--system", "caf\udce9"], "--system"),
                                        (["ok", "--stop", "caf\udce9"], "--stop")])
def test_run_text_that_is_not_utf8_is_one_line_before_the_load(tiny_checkpoint, monkeypatch, capsys, argv, what):
    """A Latin-1 'é' in an argument reaches Python as the lone surrogate '\\udce9': `run` ended in the tokenizer's
    "TypeError: TextInputSequence must be str" traceback (status 1)."""
    import blockdiff.cli

    monkeypatch.setattr(blockdiff.cli, "load_llm", lambda args: pytest.fail("loaded the model first"))
    assert main(["run", tiny_checkpoint, *argv, *ARGS]) == 2
    assert capsys.readouterr().err == (f"blockdiff: error: {what} is not UTF-8 text: the byte 0xe9 at character 3 "
                                       "is not UTF-8\n")


def test_the_tokenizer_refuses_a_lone_surrogate_with_a_value_error(llm):
    with pytest.raises(ValueError, match="the byte 0xe9 at character 3 is not UTF-8"):
        llm.tokenizer.encode("caf\udce9")
    with pytest.raises(ValueError, match="a lone surrogate U\\+D800 at character 0"):
        llm.tokenizer.encode("\ud800")
    assert llm.tokenizer.encode("café") == llm.tokenizer.encode("café")


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale / the C locale
def test_chat_a_piped_line_that_is_not_utf8_is_that_turns_error_and_the_session_goes_on(tiny_checkpoint, monkeypatch,
                                                                                       capsys, errors):
    """It ended the session: "'utf-8' codec can't decode byte 0xe9" with status 2 (a UTF-8 locale), or a
    TypeError traceback from the tokenizer (the C locale)."""
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nhi\n"), encoding="utf-8", errors=errors)
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["chat", tiny_checkpoint, "--max-new-tokens", "4", "--steps", "1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "blockdiff: error: the message is not UTF-8 text: the byte 0xe9 at character 3 is not UTF-8\n"
    assert sum(bool(CLOSING.match(x)) for x in out.splitlines()) == 1  # the next line was answered


@pytest.mark.parametrize("flags, flag", [(["--system", "be brief"], "--system"), (["--chat"], "--chat")])
def test_prompt_ids_with_chat_mode_flags_are_refused(tiny_checkpoint, monkeypatch, capsys, flags, flag):
    """--prompt-ids are sent as given: --system (and --chat) were accepted and silently dropped."""
    import blockdiff.cli

    monkeypatch.setattr(blockdiff.cli, "load_llm", lambda args: pytest.fail("loaded the model first"))
    assert main(["run", tiny_checkpoint, "--prompt-ids", "2,40,41", *flags, *ARGS]) == 2
    assert capsys.readouterr().err == (f"blockdiff: error: {flag} needs a text prompt: --prompt-ids are sent as "
                                       "given, without the chat template\n")
