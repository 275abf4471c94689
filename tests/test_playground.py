"""The playground's routes without a browser: the page and its assets are served from the package (offline: no
outside URL), /playground/config says whether a key is needed, /playground/puzzle hands out unique puzzles, and
the draft events the page draws carry per-position entropy and tokens."""

import json
import os
import re

import httpx
import pytest
import torch

from blockdiff import LLM
from blockdiff.server import build_app
from blockdiff.server.playground import STATIC
from blockdiff.sudoku.puzzles import count_solutions, parse_puzzle
from blockdiff.sudoku.solver import BUNDLED_MODEL
from test_server import LiveServer

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
TEST_IDS = ["chat-input", "chat-send", "chat-output", "canvas-view", "sudoku-input", "sudoku-solve", "sudoku-board",
            "sudoku-status"]


@pytest.fixture(scope="module")
def servers():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = LLM(BUNDLED_MODEL, dtype=torch.float32)
    open_srv, keyed = LiveServer(build_app(llm, "sudoku")), LiveServer(build_app(llm.engine, "sudoku", api_key="k"))
    yield open_srv, keyed
    open_srv.close()
    keyed.close()
    torch.set_num_threads(threads)


def test_page_and_assets_are_served_without_a_key_and_carry_the_test_ids(servers):
    _, keyed = servers
    page = httpx.get(keyed.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for tid in TEST_IDS:
        assert f'data-testid="{tid}"' in page.text, tid
    js = httpx.get(keyed.url + "/playground/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert 'setAttribute("data-testid", "cell")' in js.text  # the board's 81 cells are made by the script
    assert httpx.get(keyed.url + "/playground/style.css").headers["content-type"].startswith("text/css")
    assert httpx.get(keyed.url + "/playground/nope.js").status_code == 404
    assert httpx.get(keyed.url + "/playground/config").json() == {"api_key_required": True, "sudoku": True}
    assert httpx.get(keyed.url + "/v1/models").status_code == 401  # the API itself still needs the key


def test_the_page_loads_nothing_from_outside():
    for name in os.listdir(STATIC):
        with open(os.path.join(STATIC, name), encoding="utf-8") as f:
            text = f.read()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", text), name


def test_puzzle_route_hands_out_unique_puzzles(servers):
    srv, _ = servers
    seen = set()
    for _ in range(3):
        p = httpx.get(srv.url + "/playground/puzzle").json()["puzzle"]
        grid = parse_puzzle(p)
        assert count_solutions(grid) == 1 and 40 <= sum(v != 0 for v in grid) <= 49
        seen.add(p)
    assert len(seen) == 3


def test_drafts_carry_entropy_and_per_position_tokens(servers):
    srv, _ = servers
    body = {"model": "sudoku", "messages": [{"role": "user", "content": PUZZLE}], "stream": True,
            "stream_drafts": True, "seed": 0}
    drafts, text = [], ""
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "draft" in d:
                drafts.append(d["draft"])
            elif d["choices"] and d["choices"][0]["delta"].get("content"):
                text += d["choices"][0]["delta"]["content"]
    assert len(drafts) >= 2
    for d in drafts:
        assert len(d["entropy"]) == len(d["tokens"]) == len(d["token_ids"]) == 81
        assert all(h >= 0 for h in d["entropy"])
        assert "".join(d["tokens"]) == d["text"]  # the Sudoku model: one digit per position
        givens = [i for i, c in enumerate(PUZZLE) if c != "."]
        assert all(d["tokens"][i] == PUZZLE[i] for i in givens)
    assert sum(drafts[-1]["entropy"]) < sum(drafts[0]["entropy"])  # the canvas grows more certain as it settles
    assert drafts[-1]["text"] == text
