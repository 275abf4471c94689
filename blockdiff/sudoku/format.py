"""The Sudoku prompt/canvas format and its tokenizer.

Every cell token names its cell *and* its content: ``r3c7=5`` is "row 3, column 7 holds a 5", ``r3c7=.``
is "row 3, column 7 is blank". Why: DiffusionGemma has no absolute position embedding and only 1-D RoPE,
so with plain digit tokens a canvas cell must first work out which row, column and box it sits in before
it can check a single constraint (in an earlier experiment a plain layout stayed at chance on CPU). With cell-tagged
tokens the row/column/box of every token is in its embedding, so "attend to my row, column and box" is a
plain content match. A second effect: uniform-state noise draws from the whole vocabulary, so a noised
cell almost always holds a token of *another* cell (810 cell tokens, 10 of them this cell's) and is
recognisably noise, while a clean cell never is.

Sequence (prompt then canvas; canvas_length 81)::

    prompt  = <bos> r1c1=? r1c2=? ... r9c9=? <solve>       83 tokens, '?' = digit or '.'
    canvas  = r1c1=d r1c2=d ... r9c9=d                     81 tokens, the solution, row-major

Ids: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>, 5 <solve>, 6 <grid> (unused), 7 <unused7>,
then ``CELL_BASE + 10 * cell + v`` for cell 0..80 (row-major) and v 0..9 (0 = blank) - 818 tokens.
The text form is the token strings joined by spaces (``tokenizer.json``: WordLevel on whitespace).
At inference the givens are fixed with ``canvas_template`` and ``allowed_token_ids`` = the digit tokens.
"""

from __future__ import annotations

import json
import os

PAD, EOS, BOS, UNK, MASK, SOLVE = 0, 1, 2, 3, 4, 5
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<solve>", "<grid>", "<unused7>"]
CELL_BASE = len(SPECIALS)
VOCAB_SIZE = CELL_BASE + 81 * 10
PROMPT_LENGTH = 83
CANVAS_LENGTH = 81


def cell_token(cell: int, value: int) -> int:
    """Token id of ``cell`` (0..80, row-major) holding ``value`` (0 = blank, 1..9)."""
    if not 0 <= cell < 81 or not 0 <= value <= 9:
        raise ValueError(f"no token for cell {cell} value {value}")
    return CELL_BASE + 10 * cell + value


def token_cell_value(tok: int) -> tuple[int, int] | None:
    """(cell, value) of a cell token, None for a special token."""
    if CELL_BASE <= tok < VOCAB_SIZE:
        return divmod(tok - CELL_BASE, 10)
    return None


def token_string(tok: int) -> str:
    cv = token_cell_value(tok)
    if cv is None:
        return SPECIALS[tok]
    cell, v = cv
    return f"r{cell // 9 + 1}c{cell % 9 + 1}={v if v else '.'}"


DIGIT_TOKEN_IDS = [cell_token(c, v) for c in range(81) for v in range(1, 10)]


def encode_prompt(puzzle: list[int]) -> list[int]:
    """Grid (0 = blank) -> the 83 prompt ids."""
    return [BOS] + [cell_token(i, v) for i, v in enumerate(puzzle)] + [SOLVE]


def encode_canvas(solution: list[int]) -> list[int]:
    """Complete grid -> the 81 canvas ids."""
    if any(v == 0 for v in solution):
        raise ValueError("a canvas holds a complete grid (no blanks)")
    return [cell_token(i, v) for i, v in enumerate(solution)]


def canvas_template(puzzle: list[int]) -> list[int]:
    """Givens as fixed canvas tokens, -1 where the model must fill in (SamplingParams.canvas_template)."""
    return [cell_token(i, v) if v else -1 for i, v in enumerate(puzzle)]


def decode_canvas(ids: list[int]) -> list[int]:
    """Canvas ids -> grid. The digit of a cell token is read whatever cell it names (a token of another cell
    still says which digit the model meant); specials and blanks read as 0."""
    grid = []
    for tok in list(ids)[:81]:
        cv = token_cell_value(int(tok))
        grid.append(0 if cv is None else cv[1])
    return grid + [0] * (81 - len(grid))


def text_of(ids: list[int]) -> str:
    return " ".join(token_string(int(t)) for t in ids)


def tokenizer_json() -> dict:
    """The ``tokenizer.json`` contents (tokenizers library format): WordLevel over whitespace-split tokens."""
    vocab = {token_string(i): i for i in range(VOCAB_SIZE)}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in enumerate(SPECIALS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def write_tokenizer(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    with open(path, "w") as f:
        json.dump(tokenizer_json(), f, indent=1)
    return path


def generation_config(max_denoising_steps: int = 48) -> dict:
    """generation_config.json of a Sudoku checkpoint: one 81-cell canvas, no EOS inside it."""
    return {
        "max_new_tokens": CANVAS_LENGTH,
        "max_denoising_steps": max_denoising_steps,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        "t_max": 0.8,
        "t_min": 0.4,
        "stability_threshold": 1,
        "confidence_threshold": 0.005,
        "eos_token_id": [EOS],
        "pad_token_id": PAD,
        "bos_token_id": BOS,
    }
