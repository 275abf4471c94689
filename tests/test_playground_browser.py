"""The playground in a real browser: headless Chromium (Debian's ``chromium`` package; CI installs it) driven by
playwright from PyPI, pointed at the system browser (no browser download).

- the bundled Sudoku model solves the page's puzzle: the board ends solved and verified, the canvas view was
  redrawn at several denoising steps and the board's cells show drafts while it runs;
- a tiny chat checkpoint behind an API key: the page asks for the key, streams the reply (several growing
  updates) and the reply equals ``llm.chat`` for the same seed; a request the server refuses shows its message.

``BLOCKDIFF_SCREENSHOTS=DIR`` saves the two pages as PNGs (docs/playground-*.png were made this way).
Skipped only when chromium or playwright is missing on this machine; CI installs both.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from blockdiff import LLM, SamplingParams
from blockdiff.engine.engine import Engine
from blockdiff.server import build_app
from blockdiff.sudoku.puzzles import is_valid_solution, parse_puzzle
from blockdiff.sudoku.solver import BUNDLED_MODEL
from fixtures import make_checkpoint
from test_server import LiveServer

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
if os.environ.get("BLOCKDIFF_REQUIRE_BROWSER"):  # CI (.ci/run) installs both: a missing one is a failure there
    assert CHROMIUM is not None, "BLOCKDIFF_REQUIRE_BROWSER is set but there is no chromium"
    from playwright import sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium)")

KEY = "playground-key"
PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
SHOTS = os.environ.get("BLOCKDIFF_SCREENSHOTS")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, errors  # no uncaught JavaScript error on the page


@pytest.fixture(scope="module")
def sudoku_server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    srv = LiveServer(build_app(LLM(BUNDLED_MODEL, dtype=torch.float32), "sudoku"))
    yield srv
    srv.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("playground_ckpt"),
                           generation_config={"max_denoising_steps": 4, "max_new_tokens": 48})
    return LLM(path, dtype=torch.float32, deterministic=True)


@pytest.fixture(scope="module")
def chat_server(chat_llm):
    srv = LiveServer(build_app(Engine(chat_llm.model, chat_llm.defaults, chat_llm.tokenizer), "tiny-dg",
                               api_key=KEY))
    yield srv
    srv.close()


def test_page_solves_a_sudoku_live_and_verifies_it(page, sudoku_server):
    page.goto(sudoku_server.url + "/")
    page.wait_for_function("document.querySelector('[data-testid=model-name]').textContent.startsWith('sudoku')")
    board = page.get_by_test_id("sudoku-board")
    assert board.locator("[data-testid=cell]").count() == 81
    # record the board's blank cells at every draft: the board is drawn while the model works, not only at the end
    page.evaluate("""() => {
        window.boardFrames = [];
        new MutationObserver(() => window.boardFrames.push(
            [...document.querySelectorAll('[data-testid=cell]')].map(c => c.textContent).join('|')))
          .observe(document.querySelector('[data-testid=sudoku-board]'), {subtree: true, childList: true,
                                                                          characterData: true});
    }""")
    page.get_by_test_id("sudoku-input").fill(PUZZLE)
    page.get_by_test_id("setting-seed").fill("0")
    page.get_by_test_id("sudoku-solve").click()
    status = page.get_by_test_id("sudoku-status")
    page.wait_for_function("['solved', 'failed', 'error'].includes("
                           "document.querySelector('[data-testid=sudoku-status]').dataset.state)", timeout=60_000)
    assert status.get_attribute("data-state") == "solved", status.text_content()
    assert "verified" in status.text_content()
    cells = board.locator("[data-testid=cell]").all_text_contents()
    assert is_valid_solution(parse_puzzle(PUZZLE), parse_puzzle("".join(cells)))
    assert board.locator(".given").count() == sum(c != "." for c in PUZZLE)
    updates = int(page.get_by_test_id("canvas-view").get_attribute("data-updates"))
    steps = int(page.get_by_test_id("stat-steps").text_content())
    assert updates == steps >= 3  # one canvas-view redraw per denoising step
    assert page.get_by_test_id("canvas-view").locator(".tok").count() == 81
    frames = set(page.evaluate("window.boardFrames"))
    assert len(frames) >= 3  # the board changed at several steps before it settled
    assert float(page.get_by_test_id("stat-tpf").text_content()) > 1  # a diffusion model: > 1 token per forward
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, "playground-sudoku.png"), full_page=True)


def test_page_asks_for_the_key_and_streams_a_chat_reply(page, chat_server, chat_llm):
    page.goto(chat_server.url + "/")
    key_form = page.get_by_test_id("api-key-form")
    key_form.wait_for(state="visible")
    page.get_by_test_id("api-key-input").fill(KEY)
    page.get_by_test_id("api-key-save").click()
    page.wait_for_function("document.querySelector('[data-testid=model-name]').textContent.startsWith('tiny-dg')")
    key_form.wait_for(state="hidden")
    assert page.evaluate("sessionStorage.getItem('blockdiff-api-key')") == KEY

    # a request the server refuses: its message is shown, the page keeps working
    page.get_by_test_id("setting-steps").fill("0")
    page.get_by_test_id("chat-input").fill("Tell me a story.")
    page.get_by_test_id("chat-send").click()
    error = page.get_by_test_id("error")
    error.wait_for(state="visible")
    assert "max_denoising_steps" in error.text_content()
    assert page.get_by_test_id("chat-output").locator(".msg").count() == 0

    page.get_by_test_id("setting-steps").fill("4")
    page.get_by_test_id("setting-seed").fill("3")
    page.get_by_test_id("setting-max-tokens").fill("48")
    page.evaluate("""() => {
        window.replyFrames = [];
        new MutationObserver(() => {
            const m = document.querySelector('[data-testid=chat-output] .msg.assistant');
            if (m) window.replyFrames.push(m.firstChild ? m.firstChild.textContent : '');
        }).observe(document.querySelector('[data-testid=chat-output]'), {subtree: true, childList: true,
                                                                         characterData: true});
    }""")
    page.get_by_test_id("chat-input").fill("Tell me a story.")
    page.get_by_test_id("chat-send").click()
    reply = page.get_by_test_id("chat-output").locator(".msg.assistant")
    reply.locator(".meta").wait_for(timeout=60_000)  # the closing line appears when the stream ends
    assert error.is_hidden()
    text = reply.evaluate("m => m.firstChild.textContent")
    want = chat_llm.chat([{"role": "user", "content": "Tell me a story."}],
                         SamplingParams(seed=3, max_denoising_steps=4, max_new_tokens=48))[0].text
    assert text == want and text
    grown = [f for f in dict.fromkeys(page.evaluate("window.replyFrames")) if f]
    assert len(grown) >= 2 and all(want.startswith(f) for f in grown)  # streamed: the reply grew canvas by canvas
    assert int(page.get_by_test_id("canvas-view").get_attribute("data-updates")) >= 3
    assert page.get_by_test_id("chat-output").locator(".msg.user").count() == 1
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, "playground-chat.png"), full_page=True)
