"""The Sudoku model as a text model: puzzles in, solutions out, through every door a chat model has.

A checkpoint whose vocabulary is the Sudoku cell vocabulary (``format.tokenizer_json``: the bundled model, and
every model ``blockdiff train`` makes for the task) loads its tokenizer as a :class:`SudokuTokenizer`:

- ``encode(text)``: an 81-character puzzle (digits, ``.`` or ``0`` for blanks; spaces, newlines and the
  ``| - +`` of a drawn grid are ignored) becomes the model's cell prompt ``<bos> r1c1=5 ... <solve>``; the
  cell-token text form still encodes as-is; anything else is a ``ValueError`` saying what the model reads
  (before this, an 81-digit string became one ``<unk>`` and the model answered junk);
- ``decode(ids)``: cell tokens read as their digit (``.`` for a blank), so a reply is the 81-digit solution;
- the chat template (``chat_template.jinja`` in the checkpoint, else :data:`CHAT_TEMPLATE`) renders the last
  user message the same way, so ``/v1/chat/completions``, ``blockdiff chat`` / ``run`` and ``llm.chat`` work;
- ``task_params(prompt_ids, params)`` (called by the engine for every request) fixes the givens with
  ``canvas_template`` and allows only digit tokens, as the model was trained and as ``solver.py`` does;
- structured output is refused with one line: the reply is always 81 digits.
"""

from __future__ import annotations

import dataclasses
import os
import re

from ..sampling.fields import ParamError
from ..tokenizer import Tokenizer
from . import format as fmt

SEPARATORS = re.compile(r"[\s|+\-]")
PUZZLE_HELP = ("an 81-character puzzle: digits, with '.' or '0' for blanks, row by row (spaces, newlines and "
               "the | - + of a drawn grid are ignored)")
STRUCTURED_REFUSAL = ("structured output is not available for the Sudoku model: its reply is always the 81-digit "
                      "solution (send the puzzle without response_format / structured_outputs)")

# The bundled checkpoint's own template; models trained for the task (no chat_template.jinja) use it too.
TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "sudoku",
                             "chat_template.jinja")


def default_chat_template() -> str:
    with open(TEMPLATE_PATH, encoding="utf-8") as f:
        return f.read()


def is_sudoku_vocabulary(tok) -> bool:
    """True for the Sudoku cell vocabulary (a ``tokenizers.Tokenizer``)."""
    return (tok.get_vocab_size(with_added_tokens=True) == fmt.VOCAB_SIZE
            and tok.token_to_id("<solve>") == fmt.SOLVE and tok.token_to_id("r9c9=9") == fmt.VOCAB_SIZE - 1)


def puzzle_text(text: str) -> str | None:
    """The 81 puzzle characters of ``text`` (separators dropped, '0' kept as '0'), or None if it is not one."""
    s = SEPARATORS.sub("", text)
    if len(s) == 81 and all(c in "0123456789." for c in s):
        return s
    return None


def parse(text: str) -> list[int]:
    """A puzzle string -> grid, or a ValueError that says what the model reads."""
    s = SEPARATORS.sub("", text)
    bad = next((c for c in s if c not in "0123456789."), None)
    if bad is not None:
        raise ValueError(f"the Sudoku model reads {PUZZLE_HELP}; got the character {bad!r}")
    if len(s) != 81:
        raise ValueError(f"the Sudoku model reads {PUZZLE_HELP}; got {len(s)} characters")
    return [0 if c in ".0" else int(c) for c in s]


def prompt_grid(prompt_ids: list[int]) -> list[int] | None:
    """The puzzle of a cell prompt (<bos>, the 81 cells in order, <solve>), or None for any other prompt."""
    if len(prompt_ids) != fmt.PROMPT_LENGTH or prompt_ids[0] != fmt.BOS or prompt_ids[-1] != fmt.SOLVE:
        return None
    grid = []
    for cell, tok in enumerate(prompt_ids[1:-1]):
        cv = fmt.token_cell_value(int(tok))
        if cv is None or cv[0] != cell:
            return None
        grid.append(cv[1])
    return grid


class SudokuTokenizer(Tokenizer):
    structured_output_refusal = STRUCTURED_REFUSAL
    lays_canvas_template = True  # every puzzle's givens (task_params): /openapi.json leaves out what that excludes
    answer_length = fmt.CANVAS_LENGTH  # the engine's hook: a whole 81-digit answer finishes with "stop"

    def __init__(self, tokenizer, config=None, chat_template=None, extra_eos_ids=None):
        super().__init__(tokenizer, config, chat_template or default_chat_template(), extra_eos_ids)
        if self.bos_token is None:  # the Sudoku tokenizer.json carries no tokenizer_config.json
            self.bos_token, self.bos_token_id = "<bos>", fmt.BOS
        if self.eos_token is None:
            self.eos_token = "<eos>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        if puzzle_text(text) is not None:
            return fmt.encode_prompt(parse(text))
        ids = super().encode(text, add_special_tokens)
        if fmt.UNK in ids and "<unk>" not in text:  # not the cell-token text form either
            parse(text)  # raises with what the model reads
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for t in ids:
            cv = fmt.token_cell_value(int(t))
            if cv is not None:
                out.append(str(cv[1]) if cv[1] else ".")
            elif not skip_special_tokens:
                out.append(fmt.SPECIALS[int(t)] if 0 <= int(t) < fmt.CELL_BASE else "")
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        """A cell token is its digit (or "."), a special its name: what ``decode`` writes for it."""
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        return fmt.token_cell_value(int(token_id)) is None

    def decode_stream(self, skip_special_tokens: bool = True) -> "_CellStream":
        """Incremental detokenizing in the same words as ``decode`` (one token is one cell: nothing to hold back)."""
        return _CellStream(self, skip_special_tokens)

    def example_prompt(self, length: int, seed: int) -> list[int]:
        """A puzzle (30-45 clues, drawn from ``seed``): the only prompt this model reads; its length is fixed."""
        import random

        from .puzzles import generate
        return fmt.encode_prompt(generate(random.Random(seed), 30, 45)[0])

    def task_params(self, prompt_ids: list[int], params):
        """The engine's hook: a puzzle prompt gets its givens fixed and digits-only cells (unless the request
        already set ``canvas_template`` / ``allowed_token_ids``, as ``solver.py`` does)."""
        if params.structured_outputs is not None:
            raise ValueError(STRUCTURED_REFUSAL)
        if params.rng == "reference" and params.canvas_template is None:  # else the refusal names fields not sent
            raise ParamError("'rng': the Sudoku model fixes the puzzle's givens with a canvas_template and draws "
                             "digits only, which the reference sampler (rng='reference') cannot; use rng='default'",
                             "rng")
        grid = prompt_grid(list(prompt_ids))
        if grid is None:
            if params.canvas_template is not None:  # the caller knows what it is doing
                return params
            raise ValueError(f"the Sudoku model takes {PUZZLE_HELP}; this prompt is not one")
        from .puzzles import is_consistent

        if not is_consistent(grid):
            raise ValueError("the puzzle's givens conflict: a digit repeats in a row, column or box")
        infill = "text_template" if params.text_template is not None else "suffix" if params.suffix is not None \
            else None
        if infill is not None and params.canvas_template is None:  # else "do not give both" named a field not sent
            raise ParamError(f"{infill} cannot be used with the Sudoku model: it lays the puzzle's givens on the "
                             "canvas itself and answers with the 81 digits", infill)
        changes = {}
        if params.canvas_template is None:
            changes["canvas_template"] = fmt.canvas_template(grid)
        if params.allowed_token_ids is None:
            changes["allowed_token_ids"] = fmt.DIGIT_TOKEN_IDS
        if params.max_new_tokens is None or params.max_new_tokens > fmt.CANVAS_LENGTH:
            changes["max_new_tokens"] = fmt.CANVAS_LENGTH  # the answer is the 81 digits: never a second canvas
        return dataclasses.replace(params, **changes) if changes else params

    def display(self, text: str) -> str:
        """A reply as the terminal shows it: the 9x9 grid, then the 81 digits."""
        from .puzzles import pretty

        if len(text) != 81:
            return text
        return pretty([0 if c == "." else int(c) for c in text]) + "\n" + text


class _CellStream:
    """``Tokenizer.decode_stream``'s interface over ``SudokuTokenizer.decode``."""

    def __init__(self, tokenizer: SudokuTokenizer, skip_special_tokens: bool):
        self._tok, self._skip = tokenizer, skip_special_tokens

    def step(self, token_ids: list[int]) -> str | None:
        return self._tok.decode(token_ids, self._skip) or None
