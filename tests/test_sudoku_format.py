"""The Sudoku prompt/canvas format and its tokenizer."""

import json
import random

from tokenizers import Tokenizer as HFTokenizer

from blockdiff.sudoku import format as fmt
from blockdiff.sudoku.puzzles import generate
from blockdiff.tokenizer import Tokenizer


def _pair(seed=0):
    return generate(random.Random(seed), 40, 50, unique=False)


def test_prompt_and_canvas_shapes_and_round_trip():
    puzzle, solution = _pair()
    prompt, canvas = fmt.encode_prompt(puzzle), fmt.encode_canvas(solution)
    assert len(prompt) == fmt.PROMPT_LENGTH and prompt[0] == fmt.BOS and prompt[-1] == fmt.SOLVE
    assert len(canvas) == fmt.CANVAS_LENGTH
    assert fmt.decode_canvas(canvas) == solution
    assert fmt.decode_canvas(prompt[1:-1]) == puzzle
    assert max(prompt + canvas) < fmt.VOCAB_SIZE


def test_canvas_template_fixes_exactly_the_givens():
    puzzle, solution = _pair(1)
    t = fmt.canvas_template(puzzle)
    canvas = fmt.encode_canvas(solution)
    for i, v in enumerate(puzzle):
        assert (t[i] == canvas[i]) if v else (t[i] == -1)


def test_every_cell_token_names_its_cell_and_digit():
    ids = set()
    for cell in range(81):
        for v in range(10):
            tok = fmt.cell_token(cell, v)
            assert fmt.token_cell_value(tok) == (cell, v)
            ids.add(tok)
    assert len(ids) == 810 and fmt.VOCAB_SIZE == fmt.CELL_BASE + 810
    assert sorted(fmt.DIGIT_TOKEN_IDS) == sorted(fmt.cell_token(c, v) for c in range(81) for v in range(1, 10))
    assert fmt.token_string(fmt.cell_token(20, 5)) == "r3c3=5" and fmt.token_string(fmt.cell_token(80, 0)) == "r9c9=."


def test_tokenizer_json_encodes_and_decodes_the_text_form(tmp_path):
    puzzle, solution = _pair(2)
    ids = fmt.encode_prompt(puzzle) + fmt.encode_canvas(solution)
    tok = HFTokenizer.from_str(json.dumps(fmt.tokenizer_json()))
    assert tok.get_vocab_size() == fmt.VOCAB_SIZE
    assert tok.encode(fmt.text_of(ids), add_special_tokens=False).ids == ids
    fmt.write_tokenizer(str(tmp_path))
    ours = Tokenizer.from_dir(str(tmp_path))
    assert ours.encode(fmt.text_of(ids)) == ids
    # the Sudoku tokenizer reads cell tokens as their digits (blockdiff/sudoku/talk.py): a reply is the 81-digit grid
    assert ours.decode(fmt.encode_canvas(solution)) == "".join(map(str, solution))
