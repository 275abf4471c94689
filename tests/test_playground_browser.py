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
import time

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


def _with_key(page, server) -> None:
    """Open the page with the key already in the tab's sessionStorage, connected to the model."""
    page.add_init_script(f"sessionStorage.setItem('blockdiff-api-key', {KEY!r})")
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('[data-testid=model-name]').textContent.startsWith('tiny-dg')")


def _wait_until(pred, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_page_loads_without_console_errors(page, chat_server):
    """Not even the browser's own /favicon.ico request may fail: a console error on every load hides real ones."""
    console = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.goto(chat_server.url + "/")
    page.get_by_test_id("api-key-form").wait_for(state="visible")
    page.wait_for_load_state("networkidle")
    assert console == []


def test_stop_and_escape_end_a_reply_and_the_server_aborts_it(page, chat_server):
    _with_key(page, chat_server)
    counters = chat_server.engine.counters
    assert page.get_by_test_id("chat-stop").is_disabled()  # nothing to stop yet
    page.get_by_test_id("setting-steps").fill("200")  # a reply that would run for minutes
    page.get_by_test_id("setting-max-tokens").fill("1000")
    aborted = counters.finished.get("abort", 0)
    for n, stop in enumerate((lambda: page.get_by_test_id("chat-stop").click(),
                              lambda: page.keyboard.press("Escape")), start=1):
        page.get_by_test_id("chat-input").fill("Tell me a long story.")
        page.get_by_test_id("chat-send").click()
        page.wait_for_function("Number(document.querySelector('[data-testid=canvas-view]').dataset.updates) >= 2")
        assert page.get_by_test_id("chat-send").is_disabled() and page.get_by_test_id("chat-stop").is_enabled()
        stop()
        page.locator(".msg.assistant .meta").nth(n - 1).wait_for()
        assert page.locator(".msg.assistant .meta").nth(n - 1).text_content().startswith("stopped")
        assert page.get_by_test_id("error").is_hidden()  # stopping is not an error
        assert page.get_by_test_id("chat-send").is_enabled() and page.get_by_test_id("chat-stop").is_disabled()
        # the closed connection aborted the request in the engine: it holds no slot any more
        _wait_until(lambda: counters.finished.get("abort", 0) == aborted + n and chat_server.engine.num_running == 0,
                    "the stopped request was not aborted in the engine")
    assert page.locator(".msg.user").count() == 2  # the stopped turns stay in the conversation


def _send_with_canned_reply(page, message: str, events: str) -> None:
    """Send ``message`` from the chat box while the page's chat endpoint answers with the server-sent ``events``
    (the route stays until ``page.unroute``)."""
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=events))
    page.get_by_test_id("chat-input").fill(message)
    page.get_by_test_id("chat-send").click()


def test_a_stream_cut_before_done_is_shown_as_an_error(page, chat_server):
    """A reply whose connection drops mid-stream is not presented as a complete answer."""
    _with_key(page, chat_server)
    cut = ('data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
           'data: {"choices":[{"index":0,"delta":{"content":"half an ans"}}]}\n\n')
    _send_with_canned_reply(page, "Hello", cut)
    error = page.get_by_test_id("error")
    error.wait_for(state="visible")
    assert "closed before the reply was complete" in error.text_content()
    assert page.get_by_test_id("chat-output").locator(".msg").count() == 0  # the turn was taken back
    assert page.get_by_test_id("chat-input").input_value() == "Hello"


def test_keyboard_enter_while_composing_and_unreadable_numbers_send_nothing(page, chat_server):
    _with_key(page, chat_server)
    sent = []
    page.on("request", lambda r: sent.append(r.url) if r.url.endswith("/chat/completions") else None)
    chat = page.get_by_test_id("chat-input")
    chat.fill("日本")
    # Enter that picks an input method's candidate (keyCode 229 / isComposing) is not "send"
    chat.evaluate("el => el.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', isComposing: true, "
                  "bubbles: true, cancelable: true}))")
    page.get_by_test_id("sudoku-input").evaluate(
        "el => el.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', isComposing: true, bubbles: true}))")
    # a number field the browser cannot read ("1e" has the value "") is reported, not silently left out
    page.get_by_test_id("setting-temperature").press_sequentially("1e")
    chat.press("Enter")
    error = page.get_by_test_id("error")
    error.wait_for(state="visible")
    assert "temperature" in error.text_content()
    assert page.get_by_test_id("sudoku-status").get_attribute("data-state") == "idle"
    assert page.get_by_test_id("chat-output").locator(".msg").count() == 0 and sent == []
    assert chat.input_value() == "日本"


def test_an_unreachable_server_is_named_as_such(page, chat_server):
    _with_key(page, chat_server)
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.get_by_test_id("chat-input").fill("Hello")
    page.get_by_test_id("chat-send").click()
    error = page.get_by_test_id("error")
    error.wait_for(state="visible")
    assert "cannot reach the server" in error.text_content()  # not the browser's bare "Failed to fetch"
    assert page.get_by_test_id("chat-send").is_enabled()


def test_solve_on_a_chat_model_says_it_is_not_the_sudoku_model(page, chat_server):
    _with_key(page, chat_server)
    page.get_by_test_id("setting-steps").fill("1")
    page.get_by_test_id("setting-max-tokens").fill("16")
    page.get_by_test_id("sudoku-solve").click()
    page.wait_for_function("document.querySelector('[data-testid=sudoku-status]').dataset.state === 'failed'")
    status = page.get_by_test_id("sudoku-status").text_content()
    assert "not the Sudoku model" in status and "another seed" not in status  # no seed will help


def test_stop_ends_a_solve_and_puts_the_puzzle_back(page, chat_server):
    _with_key(page, chat_server)  # a chat model: its "solve" runs as long as the settings allow
    page.get_by_test_id("setting-steps").fill("200")
    page.get_by_test_id("setting-max-tokens").fill("400")
    page.get_by_test_id("sudoku-input").fill(PUZZLE)
    page.get_by_test_id("sudoku-solve").click()
    page.wait_for_function("Number(document.querySelector('[data-testid=canvas-view]').dataset.updates) >= 2")
    page.get_by_test_id("sudoku-stop").click()
    page.wait_for_function("document.querySelector('[data-testid=sudoku-status]').dataset.state === 'stopped'")
    cells = page.get_by_test_id("sudoku-board").locator("[data-testid=cell]").all_text_contents()
    assert "".join(c or "." for c in cells) == PUZZLE  # the drafts were no answer: the puzzle is back
    assert page.get_by_test_id("sudoku-solve").is_enabled() and page.get_by_test_id("sudoku-stop").is_disabled()
    assert page.get_by_test_id("error").is_hidden()


def test_a_reply_cut_at_max_tokens_says_so(page, chat_server):
    """finish_reason "length" is shown (a JSON-schema answer may then be unfinished); "stop" adds nothing."""
    _with_key(page, chat_server)
    for reason in ("length", "stop"):
        events = ['{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
                  '{"choices":[{"index":0,"delta":{"content":"{\\"city\\": \\"Par"}}]}',
                  '{"choices":[{"index":0,"delta":{},"finish_reason":"%s"}]}' % reason,
                  '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":16,"total_tokens":21}}', "[DONE]"]
        body = "".join(f"data: {e}\n\n" for e in events)
        _send_with_canned_reply(page, "Where?", body)
        meta = page.locator(".msg.assistant .meta").last
        page.wait_for_function(f"document.querySelectorAll('.msg.assistant .meta').length === "
                               f"{1 if reason == 'length' else 2}")
        assert ("cut at max tokens" in meta.text_content()) == (reason == "length")
        page.unroute("**/v1/chat/completions")


def test_events_with_crlf_line_ends_and_no_space_after_data_are_read(page, chat_server):
    """Server-sent events may end lines with \\r\\n (a proxy that rewrites them) and omit the space after 'data:'."""
    _with_key(page, chat_server)
    events = ['{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
              '{"choices":[{"index":0,"delta":{"content":"through a proxy"}}]}',
              '{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}', "[DONE]"]
    body = "".join(f"data:{e}\r\n\r\n" for e in events)
    _send_with_canned_reply(page, "Hello", body)
    page.locator(".msg.assistant .meta").first.wait_for()
    assert "through a proxy" in page.locator(".msg.assistant").first.text_content()
    assert page.get_by_test_id("error").is_hidden()


def test_a_refused_key_is_called_refused(page, chat_server):
    page.add_init_script("sessionStorage.setItem('blockdiff-api-key', 'not-the-key')")
    page.goto(chat_server.url + "/")
    page.get_by_test_id("api-key-form").wait_for(state="visible")
    error = page.get_by_test_id("error")
    error.wait_for(state="visible")
    assert "refused this API key" in error.text_content()


CROSS_ORIGIN_FETCH = """async ([url, body]) => {
    try {
        const r = await fetch(url + '/v1/chat/completions', {method: 'POST', body: JSON.stringify(body),
            headers: {'Content-Type': 'application/json', 'Authorization': 'Bearer k',
                      'X-Stainless-Lang': 'js'}});  // what the openai JS client sends beside them
        return {status: r.status, body: await r.json()};
    } catch (e) { return {error: String(e)}; }
}"""


def test_a_page_of_an_allowed_origin_calls_the_api_and_others_cannot(page, chat_server, sudoku_server):
    """CORS (--allowed-origins): a page served from another origin may call the API only when its origin is
    listed; the preflight admits the openai JS client's extra headers and the bearer key."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    api = LiveServer(build_app(LLM(BUNDLED_MODEL, dtype=torch.float32), "sudoku", api_key="k",
                               allowed_origins=[chat_server.url]))
    try:
        page.goto(chat_server.url + "/")  # any page of the other origin
        body = {"model": "sudoku", "messages": [{"role": "user", "content": PUZZLE}], "seed": 0}
        got = page.evaluate(CROSS_ORIGIN_FETCH, [api.url, body])
        assert got.get("status") == 200, got
        answer = got["body"]["choices"][0]["message"]["content"]
        assert is_valid_solution(parse_puzzle(PUZZLE), parse_puzzle(answer))
        refused = page.evaluate(CROSS_ORIGIN_FETCH, [sudoku_server.url, body])  # lists no origin
        assert "error" in refused and "Failed to fetch" in refused["error"], refused
    finally:
        api.close()
        torch.set_num_threads(threads)


def test_a_server_unreachable_before_the_model_is_known_is_named_as_such(page, chat_server):
    """/v1/models cannot be reached (the server went away after serving the page): the page says so, and a Send
    that has to connect first says so too, instead of failing silently with an uncaught 'Failed to fetch'."""
    page.add_init_script(f"sessionStorage.setItem('blockdiff-api-key', {KEY!r})")
    page.route("**/v1/models", lambda route: route.abort("connectionrefused"))
    page.goto(chat_server.url + "/")
    error = page.get_by_test_id("error")
    error.wait_for(state="visible")
    assert "cannot reach the server" in error.text_content()
    page.get_by_test_id("chat-input").fill("Hello")
    page.get_by_test_id("chat-send").click()
    page.wait_for_function("document.querySelector('[data-testid=error]').textContent.includes('cannot reach')"
                           " && !document.querySelector('[data-testid=error]').hidden")
    page.get_by_test_id("sudoku-solve").click()
    page.wait_for_function("document.querySelector('[data-testid=sudoku-status]').dataset.state === 'error'")
    assert "cannot reach the server" in page.get_by_test_id("sudoku-status").text_content()
    assert page.get_by_test_id("chat-send").is_enabled()


def test_a_long_reply_stays_in_view_while_it_streams(page, chat_server):
    """The chat box scrolls: a reply longer than the box keeps its newest text in view as it grows (unless the
    reader scrolled up), and so does its closing line."""
    _with_key(page, chat_server)
    lines = "".join(f"line {i} of a long reply\\n" for i in range(60))
    events = ['{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'] + \
        [f'{{"choices":[{{"index":0,"delta":{{"content":"{lines}"}}}}]}}'] * 2 + \
        ['{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}', "[DONE]"]
    _send_with_canned_reply(page, "Hello", "".join(f"data: {e}\n\n" for e in events))
    page.locator(".msg.assistant .meta").first.wait_for()
    out = page.get_by_test_id("chat-output")
    top, height, client = out.evaluate("o => [o.scrollTop, o.scrollHeight, o.clientHeight]")
    assert height > 2 * client  # the reply is much longer than the box
    assert top + client >= height - 2  # its end is in view


def test_a_key_a_browser_cannot_send_is_named_not_blamed_on_the_server(page, chat_server):
    """A header carries Latin-1 only: a key typed with other characters cannot be sent at all. The page says so,
    instead of 'cannot reach the server' (the browser's TypeError) or nothing."""
    page.goto(chat_server.url + "/")
    page.get_by_test_id("api-key-form").wait_for(state="visible")
    page.get_by_test_id("api-key-input").fill("clé-№1")
    page.get_by_test_id("api-key-save").click()
    page.wait_for_function("document.querySelector('[data-testid=error]').textContent.includes('API key holds')")
    assert "cannot reach" not in page.get_by_test_id("error").text_content()
    assert page.get_by_test_id("api-key-form").is_visible()
