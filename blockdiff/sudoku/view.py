"""``SudokuView``: the live canvas of one puzzle drawn as a 9x9 grid (rich), fed with the engine's events.

Givens are bold blue; a blank cell shows the current draft digit - green when it was accepted this step,
plain when its draft did not change since the last step, dim while it is still changing. Only formats.
"""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from ..live import ACCEPTED, CHANGING, CanvasView
from . import format as fmt

_STYLE = {ACCEPTED: "bold black on green", CHANGING: "dim", "settled": "", "given": "bold blue"}


def _digits(ids: list[int]) -> str:
    return "".join(str(v) if v else "?" for v in fmt.decode_canvas(ids)[:len(ids)])


class SudokuView:
    def __init__(self, puzzle: list[int], max_steps: int | None = None, request_index: int = 0,
                 title: str | None = None):
        self.puzzle = puzzle
        self.canvas_view = CanvasView(decode=_digits, max_steps=max_steps, request_index=request_index)
        self.title = title
        self.final: list[int] | None = None

    def update(self, event) -> None:
        if event.kind == "block" and getattr(event, "request_index", 0) == self.canvas_view.request_index:
            self.final = fmt.decode_canvas(event.token_ids)
        self.canvas_view.update(event)

    __call__ = update

    def grid_cells(self) -> list[tuple[str, str]]:
        """81 (character, style key) pairs for the current picture."""
        cells = self.canvas_view.cells()
        out = []
        for i in range(81):
            if self.puzzle[i]:
                out.append((str(self.puzzle[i]), "given"))
            elif self.final is not None:
                out.append((str(self.final[i]) if self.final[i] else "?", "settled"))
            elif cells:
                out.append(cells[i])
            else:
                out.append(("·", CHANGING))
        return out

    def render(self) -> Group:
        body = Text()
        cells = self.grid_cells()
        for r in range(9):
            if r in (3, 6):
                body.append("------+-------+------\n")
            for c in range(9):
                if c in (3, 6):
                    body.append("| ")
                ch, state = cells[r * 9 + c]
                body.append(ch, style=_STYLE.get(state, ""))
                body.append(" " if c < 8 else "\n")
        cv = self.canvas_view
        n_given = sum(1 for v in self.puzzle if v)
        status = (f"step {cv.step}/{cv.max_steps or '?'} · {sum(cv.accepted)} accepted this step"
                  if self.final is None else f"done in {cv.total_steps} denoising steps")
        head = [Text(self.title, style="bold")] if self.title else []
        return Group(*head, body, Text(f"{n_given} givens · {status}", style="cyan"))

    def __rich__(self) -> Group:
        return self.render()

    def plain(self) -> str:
        return self.render().renderables[-2].plain
