"""``CanvasView``: a terminal view of one request's canvas as it denoises (rich).

Feed it the engine's events (``view.update(event)``, or pass ``view`` itself as ``on_event``); it keeps the
committed text and the current draft and renders them with the step counter:

- positions *accepted* this step are highlighted (they keep their sampled token into the next step);
- positions whose draft token did not change since the previous step are plain (settled);
- positions still changing are dim.

The view only formats: it never runs the model. ``cells()`` exposes the per-position (text, state) pairs so
other layouts (the Sudoku grid) can reuse the bookkeeping and draw their own picture.
"""

from __future__ import annotations

from typing import Callable

from rich.console import Group
from rich.text import Text

ACCEPTED, SETTLED, CHANGING = "accepted", "settled", "changing"
STYLES = {ACCEPTED: "bold black on green", SETTLED: "", CHANGING: "dim"}
COMMITTED_STYLE = ""
TAIL_CHARS = 1500  # committed text shown above the canvas: the tail only, so the view fits a terminal


def _printable(s: str) -> str:
    # Random canvas tokens can hold control characters that would wreck the terminal layout.
    return "".join(c if c.isprintable() or c == "\n" else "·" for c in s)


class CanvasView:
    def __init__(self, decode: Callable[[list[int]], str] | None = None, max_steps: int | None = None,
                 request_index: int = 0, title: str | None = None):
        """decode: token ids -> text (e.g. ``tokenizer.decode``); None shows raw ids. Events of other requests
        than ``request_index`` are ignored."""
        self.decode = decode
        self.max_steps = max_steps
        self.request_index = request_index
        self.title = title
        self.committed: list[int] = []
        self.canvas: list[int] | None = None  # the latest draft (argmax canvas)
        self.accepted: list[bool] = []
        self.changed: list[bool] = []
        self.step = 0
        self.canvases = 0  # finished canvases
        self.total_steps = 0
        self.finish_reason: str | None = None

    # ------------------------------------------------------------------ events
    def update(self, event) -> None:
        if getattr(event, "request_index", self.request_index) != self.request_index:
            return
        if event.kind == "draft":
            ids = list(event.token_ids)
            prev = self.canvas
            self.changed = [prev is None or i >= len(prev) or prev[i] != t for i, t in enumerate(ids)]
            self.canvas = ids
            self.accepted = list(event.accepted) if event.accepted is not None else [False] * len(ids)
            self.step = event.step
            self.total_steps += 1
        elif event.kind == "block":
            self.committed.extend(event.token_ids)
            self.canvases += 1
            self.step = 0
            self.canvas, self.accepted, self.changed = None, [], []
        elif event.kind == "done":
            self.finish_reason = event.finish_reason
            self.canvas, self.accepted, self.changed = None, [], []

    __call__ = update  # a view is itself an on_event callback

    # ------------------------------------------------------------------ rendering
    def token_text(self, token_id: int) -> str:
        if self.decode is None:
            return f"{token_id} "
        return _printable(self.decode([token_id]))

    def committed_text(self) -> str:
        if self.decode is None:
            return " ".join(map(str, self.committed)) + (" " if self.committed else "")
        return _printable(self.decode(self.committed))

    def cells(self) -> list[tuple[str, str]]:
        """The current canvas as (text, state) per position; state is ACCEPTED, SETTLED or CHANGING."""
        if self.canvas is None:
            return []
        out = []
        for i, t in enumerate(self.canvas):
            acc = i < len(self.accepted) and self.accepted[i]
            state = ACCEPTED if acc else (CHANGING if i < len(self.changed) and self.changed[i] else SETTLED)
            out.append((self.token_text(t), state))
        return out

    def status(self) -> str:
        if self.finish_reason is not None:
            return (f"done ({self.finish_reason}) · {len(self.committed)} tokens · {self.canvases} "
                    f"{'canvas' if self.canvases == 1 else 'canvases'} · "
                    f"{self.total_steps} denoising steps")
        of = f"/{self.max_steps}" if self.max_steps else ""
        n_acc = sum(self.accepted)
        return (f"canvas {self.canvases + 1} · step {self.step}{of} · {n_acc} accepted · "
                f"{len(self.committed)} tokens committed")

    def render(self) -> Group:
        body = Text()
        committed = self.committed_text()
        if len(committed) > TAIL_CHARS:
            committed = "…" + committed[-TAIL_CHARS:]
        body.append(committed, style=COMMITTED_STYLE)
        for text, state in self.cells():
            body.append(text, style=STYLES[state])
        head = [Text(self.title, style="bold")] if self.title else []
        return Group(*head, body, Text(self.status(), style="cyan"))

    def __rich__(self) -> Group:
        return self.render()

    def plain(self) -> str:
        """The rendered text without styles (for logs and tests)."""
        return "\n".join(([self.title] if self.title else []) +
                         [self.committed_text() + "".join(t for t, _ in self.cells()), self.status()])
