"""The bundled Sudoku model talks: an 81-character puzzle through chat (template), raw text, the server, the CLI
and ``blockdiff.sudoku.solve`` becomes its cell prompt with the givens fixed, the reply is the 81-digit solution,
and everything else is refused with a line that says what the model reads."""

import httpx
import pytest
import torch

from blockdiff import LLM, SamplingParams
from blockdiff.cli import main
from blockdiff.sudoku import format as fmt
from blockdiff.sudoku import solve, solve_many
from blockdiff.sudoku.puzzles import is_valid_solution, parse_puzzle, pretty
from blockdiff.sudoku.solver import BUNDLED_MODEL, solve_diffusion
from blockdiff.sudoku.talk import SudokuTokenizer, prompt_grid
from blockdiff.server import build_app
from test_server import LiveServer

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


@pytest.fixture(scope="module")
def llm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM(BUNDLED_MODEL, dtype=torch.float32)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(llm):
    srv = LiveServer(build_app(llm, "sudoku"))
    yield srv
    srv.close()


def test_bundled_tokenizer_turns_a_puzzle_into_the_cell_prompt_in_every_spelling(llm):
    tok = llm.tokenizer
    assert isinstance(tok, SudokuTokenizer)
    want = fmt.encode_prompt(parse_puzzle(PUZZLE))
    zeros = PUZZLE.replace(".", "0")
    drawn = pretty(parse_puzzle(PUZZLE))  # the grid as `blockdiff run` prints it: spaces, | and ------+---
    for text in (PUZZLE, zeros, drawn):
        assert tok.encode(text) == want
        assert tok.encode_chat([{"role": "user", "content": text}]) == want  # the chat template agrees
    assert prompt_grid(want) == parse_puzzle(PUZZLE)
    assert tok.encode(fmt.text_of(want)) == want  # the cell-token text form still encodes as-is
    assert tok.decode(fmt.encode_canvas(parse_puzzle(SOLUTION))) == SOLUTION


def test_chat_and_raw_text_solve_like_the_solver_with_the_givens_fixed(llm):
    chat = llm.chat([{"role": "user", "content": PUZZLE}], SamplingParams(seed=0))[0]
    raw = llm.generate([PUZZLE], SamplingParams(seed=0))[0]
    ref = solve_diffusion(llm, [parse_puzzle(PUZZLE)], seed=0)[0]
    assert chat.token_ids == raw.token_ids
    assert chat.text == raw.text == "".join(map(str, ref.grid))  # same draws: the same template and digit mask
    assert is_valid_solution(parse_puzzle(PUZZLE), parse_puzzle(chat.text))
    # multi-turn: the last user message is the puzzle (the model has no memory)
    turns = [{"role": "user", "content": "1" * 81}, {"role": "assistant", "content": "x"},
             {"role": "user", "content": PUZZLE}]
    assert llm.chat(turns, SamplingParams(seed=0))[0].text == chat.text


@pytest.mark.parametrize("text, words", [("Why is the sky blue?", "'W'"), (PUZZLE[:80], "80 characters"),
                                         (PUZZLE[:80] + "x", "'x'")])
def test_non_puzzle_input_is_refused_with_what_the_model_reads(llm, text, words):
    for call in (lambda: llm.chat([{"role": "user", "content": text}]), lambda: llm.generate([text])):
        with pytest.raises(ValueError, match="81-character puzzle") as e:
            call()
        assert words in str(e.value)


def test_conflicting_givens_other_prompts_and_structured_output_are_refused_in_one_line(llm):
    with pytest.raises(ValueError, match="givens conflict"):
        llm.generate(["55" + PUZZLE[2:]])
    with pytest.raises(ValueError, match="not one"):
        llm.generate(prompt_token_ids=[[fmt.BOS, fmt.SOLVE]])
    for so in ({"json_object": True}, {"regex": "[0-9]{81}"}):
        with pytest.raises(ValueError) as e:
            llm.generate([PUZZLE], SamplingParams(structured_outputs=so))
        msg = str(e.value)
        assert "structured output is not available for the Sudoku model" in msg and "\n" not in msg
        assert "decoder type" not in msg


def test_server_chat_and_completions_answer_with_the_solution(server):
    client = server.client()
    r = client.chat.completions.create(model="sudoku", messages=[{"role": "user", "content": PUZZLE}], seed=0)
    text = r.choices[0].message.content
    assert len(text) == 81 and is_valid_solution(parse_puzzle(PUZZLE), parse_puzzle(text))
    c = client.completions.create(model="sudoku", prompt=PUZZLE, seed=0)
    assert c.choices[0].text == text
    # a whole answer is complete ("stop", not "length"), whatever budget an ordinary client sends
    assert r.choices[0].finish_reason == c.choices[0].finish_reason == "stop"
    for budget in (82, 256, 1024):
        big = client.chat.completions.create(model="sudoku", messages=[{"role": "user", "content": PUZZLE}], seed=0,
                                             max_tokens=budget)
        assert (big.choices[0].message.content, big.choices[0].finish_reason) == (text, "stop")
        assert big.usage.completion_tokens == 81
    short = client.completions.create(model="sudoku", prompt=PUZZLE, seed=0, max_tokens=9)
    assert (short.choices[0].text, short.choices[0].finish_reason) == (text[:9], "length")


@pytest.mark.parametrize("path, body, words", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}, "81-character puzzle"),
    ("/v1/completions", {"prompt": "hello"}, "81-character puzzle"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PUZZLE}],
                              "response_format": {"type": "json_object"}}, "structured output is not available"),
    ("/tokenize", {"prompt": "hello"}, "81-character puzzle"),
    ("/tokenize", {"prompt": "hello", "add_special_tokens": False}, "81-character puzzle"),
])
def test_server_refuses_what_the_sudoku_model_cannot_answer_with_a_400(server, path, body, words):
    r = httpx.post(server.url + path, json={"model": "sudoku", **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_solve_api_returns_a_verified_answer(llm):
    a = solve(PUZZLE, llm=llm)
    assert a.solution == SOLUTION and a.solved and str(a) == SOLUTION and a.denoise_steps >= 1
    assert a.puzzle == PUZZLE
    many = solve_many([PUZZLE, PUZZLE.replace(".", "0")], llm=llm)
    assert [x.solution for x in many] == [SOLUTION, SOLUTION]
    with pytest.raises(ValueError, match="81-character puzzle.*got 3 characters"):
        solve("123")
    with pytest.raises(ValueError, match="puzzle 1: .*conflict"):
        solve_many([PUZZLE, "55" + PUZZLE[2:]], llm=llm)


def test_run_and_chat_commands_print_the_grid_and_the_digits(capsys, monkeypatch):
    import io

    assert main(["run", BUNDLED_MODEL, PUZZLE, "--seed", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "5 3 4 | 6 7 8 | 9 1 2" in out and SOLUTION in out
    monkeypatch.setattr("sys.stdin", io.StringIO(f"hello\n{PUZZLE}\n"))
    assert main(["chat", BUNDLED_MODEL, "--seed", "0", "--threads", "1"]) == 0
    cap = capsys.readouterr()
    assert "81-character puzzle" in cap.err  # the bad line is refused, the session goes on
    assert SOLUTION in cap.out
    assert main(["run", BUNDLED_MODEL, "hello"]) == 2
    assert "81-character puzzle" in capsys.readouterr().err


def test_a_trained_sudoku_checkpoint_without_a_template_file_talks_too(tmp_path):
    from blockdiff.tokenizer import Tokenizer

    fmt.write_tokenizer(str(tmp_path))  # what `blockdiff train` writes for the task: tokenizer.json only
    tok = Tokenizer.from_dir(str(tmp_path))
    assert isinstance(tok, SudokuTokenizer)
    with open(f"{BUNDLED_MODEL}/chat_template.jinja") as f:
        assert tok.chat_template == f.read()
    assert tok.encode_chat([{"role": "user", "content": PUZZLE}]) == fmt.encode_prompt(parse_puzzle(PUZZLE))


@pytest.mark.parametrize("field,value", [("text_template", "<|hole|>"), ("suffix", "1")])
def test_infilling_on_a_puzzle_is_refused_naming_only_the_field_sent(server, field, value):
    """The model lays the givens as its own canvas_template: a text_template or suffix was refused with "builds the
    canvas_template itself; do not give both", about a field the client never sent."""
    r = httpx.post(server.url + "/v1/completions", json={"model": "sudoku", "prompt": PUZZLE, field: value}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and "Sudoku model" in err["message"], err
    assert "canvas_template" not in err["message"] and "both" not in err["message"], err
