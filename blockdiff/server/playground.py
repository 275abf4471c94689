"""The playground: a page at ``/`` that talks to this server's own OpenAI API and draws the canvas as it settles.

Plain HTML, CSS and JavaScript in ``static/`` (package data): no CDN, no build step, works offline. The page
reads ``/playground/config`` (no key needed: it only says whether one is), then calls ``/v1/models`` and
``/v1/chat/completions`` with ``stream_drafts`` like any client, sending the key the user typed (kept in the
tab's sessionStorage). ``/playground/puzzle`` hands out a fresh unique Sudoku puzzle for the board.
"""

from __future__ import annotations

import os
import random

from fastapi import FastAPI
from fastapi.responses import FileResponse

from .errors import APIError

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


def add_playground(app: FastAPI, api_key_required: bool, sudoku: bool) -> None:
    """Routes of the page; ``sudoku``: the served model is a Sudoku model (the page opens on its board)."""

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/playground/config", include_in_schema=False)
    async def config():
        return {"api_key_required": api_key_required, "sudoku": sudoku}

    @app.get("/playground/puzzle", include_in_schema=False)
    def puzzle():  # plain def: FastAPI runs it in a worker thread, off the event loop (the search takes ms)
        # Unique puzzles with 40-49 givens: the band the bundled model solves almost always (docs/sudoku.md).
        return {"puzzle": new_puzzle(random.Random(), 40, 49)}

    @app.get("/playground/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:
            raise APIError(404, f"no route /playground/{name}", code="not_found")
        return FileResponse(os.path.join(STATIC, name), media_type=ASSETS[name])


def new_puzzle(rng: random.Random, min_clues: int, max_clues: int) -> str:
    """A puzzle with exactly one solution, in the 81-character text form ('.' for blanks)."""
    from ..sudoku.puzzles import format_grid, generate

    return format_grid(generate(rng, min_clues, max_clues, unique=True)[0])
