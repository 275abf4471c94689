"""Infilling through text: a template with holes, or a prompt + suffix, laid out on the first canvas.

``text_template``: text with holes written ``<|hole|>`` (length chosen for you) or ``<|hole:N|>`` (N tokens).
The text between holes is tokenized piece by piece and fixed on the canvas; the holes are free positions.
Hole lengths: explicit ones take N positions; the canvas positions left after the fixed text and the explicit
holes are shared equally by the holes without a length (the first ones get one more when it does not divide).
A hole is an upper bound: the model may end it early with an EOS token, and what follows the EOS inside that hole
is dropped. The whole template must fit in one canvas. The output is the filled template and the request ends
with that canvas (finish_reason "stop"). A template fills a fixed number of positions, so an explicit
``max_new_tokens`` below that number is an error naming it (``check_budget``), not a silent cap.

``suffix`` (OpenAI's fill-in-the-middle): the prompt is the prefix, the suffix is fixed at the end of the first
canvas and the positions before it form one hole of ``min(max_new_tokens, canvas_length - len(suffix))``
tokens. The output is the middle only (cut at an EOS the model placed in it); the request ends with that canvas,
finish_reason "length" when ``max_new_tokens`` set the middle's size and the model filled all of it (no EOS: the
budget cut it), else "stop".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HOLE = re.compile(r"<\|hole(?::(\d+))?\|>")
MALFORMED_HOLE = re.compile(r"<\|\s*hole\b[^>\n]{0,20}>?", re.IGNORECASE)  # what is left of "<|hole" after HOLE


@dataclass
class InfillPlan:
    template: list[int]  # the first canvas's canvas_template: token ids, -1 in holes
    holes: list[tuple[int, int]]  # [start, end) canvas positions of each hole
    keep_fixed: bool  # the output holds the fixed text too (templates) or only the holes (suffix)
    budget_bound: bool = False  # max_new_tokens set the hole's size (suffix): a hole filled to its end is "length"

    def output(self, canvas: list[int], eos: set[int]) -> list[int]:
        """The output tokens of the filled canvas: fixed text and each hole up to its first EOS."""
        out, pos = [], 0
        for start, end in self.holes:
            if self.keep_fixed:
                out.extend(canvas[pos:start])
            for t in canvas[start:end]:
                if t in eos:
                    break
                out.append(t)
            pos = end
        if self.keep_fixed:
            out.extend(canvas[pos:len(self.template)])
        return out

    def finish_reason(self, canvas: list[int], eos: set[int]) -> str:
        """"length" when the budget sized the hole and no hole ended at an EOS (the model was cut off), else
        "stop"."""
        cut = self.budget_bound and not any(t in eos for start, end in self.holes for t in canvas[start:end])
        return "length" if cut else "stop"

    def check_budget(self, max_new_tokens: int | None, field: str = "text_template") -> None:
        """An explicit ``max_new_tokens`` smaller than the template's positions: a ``ValueError`` naming both (a
        template fills its whole layout; cutting it would drop its fixed text)."""
        if max_new_tokens is not None and max_new_tokens < len(self.template):
            raise ValueError(f"max_new_tokens is {max_new_tokens} but the {field} fills {len(self.template)} "
                             f"positions (its fixed text and holes): give max_new_tokens >= {len(self.template)} "
                             "or leave it unset")


def plan_template(tokenizer, text: str, canvas_length: int) -> InfillPlan:
    if tokenizer is None:
        raise ValueError("text_template needs the checkpoint's tokenizer; this model has none")
    pieces, sizes, pos = [], [], 0
    for m in HOLE.finditer(text):
        pieces.append(text[pos:m.start()])
        n = None if m.group(1) is None else int(m.group(1))
        if n is not None and n < 1:
            raise ValueError(f"text_template: a hole must be at least 1 token long, got <|hole:{n}|>")
        sizes.append(n)
        pos = m.end()
    pieces.append(text[pos:])
    for p in pieces:  # a mistyped hole would otherwise be laid on the canvas as fixed text, silently
        bad = MALFORMED_HOLE.search(p)
        if bad:
            raise ValueError(f"text_template: {bad.group(0)!r} is not a hole: write <|hole|> or <|hole:N|> "
                             "(N a whole number >= 1)")
    if not sizes:
        raise ValueError("text_template has no hole: write <|hole|> or <|hole:N|> where the model should write")
    fixed = [tokenizer.encode(p) if p else [] for p in pieces]
    used = sum(len(f) for f in fixed) + sum(n for n in sizes if n is not None)
    auto = [i for i, n in enumerate(sizes) if n is None]
    free = canvas_length - used
    if free < len(auto) or (not auto and free < 0):
        raise ValueError(f"text_template needs {used + len(auto)} or more positions (fixed text and holes) but "
                         f"the canvas holds {canvas_length}")
    for k, i in enumerate(auto):
        sizes[i] = free // len(auto) + (1 if k < free % len(auto) else 0)
    template, holes = list(fixed[0]), []
    for n, f in zip(sizes, fixed[1:]):
        holes.append((len(template), len(template) + n))
        template += [-1] * n + f
    return InfillPlan(template, holes, keep_fixed=True)


def plan_suffix(tokenizer, suffix: str, max_new_tokens: int, canvas_length: int) -> InfillPlan:
    if tokenizer is None:
        raise ValueError("suffix needs the checkpoint's tokenizer; this model has none")
    ids = tokenizer.encode(suffix)
    m = min(max_new_tokens, canvas_length - len(ids))
    if m < 1:
        raise ValueError(f"suffix is {len(ids)} tokens; with the middle it must fit in one canvas of "
                         f"{canvas_length}")
    template = [-1] * m + ids
    return InfillPlan(template, [(0, m)], keep_fixed=False, budget_bound=m == max_new_tokens)
