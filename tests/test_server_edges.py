"""Edges a black-box review of the server found: streaming text around a canvas that ends mid-character, a busy
port found before the model loads, ``text_template`` with a small ``max_tokens``, ``suffix`` cut by its budget,
chat messages without content, and errors that name ``--max-model-len`` when it sets the context.

One tiny checkpoint (canvas 16), two live servers over it: the model's own context and ``max_model_len`` 40.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import torch

from blockdiff import LLM
from blockdiff.engine.engine import Engine
from blockdiff.sampling.params import SamplingParams
from blockdiff.server import build_app
from blockdiff.structured.infill import plan_suffix
from fixtures import EOS_ID
from test_server import LiveServer

C = 16  # the tiny checkpoint's canvas
MODEL = "m"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def srv(llm):
    s = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL))
    yield s
    s.close()


@pytest.fixture(scope="module")
def short(llm):
    s = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, max_model_len=40))
    yield s
    s.close()


def post(server, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=60)


def sse_texts(server, body: dict) -> tuple[list[str], str | None]:
    """The text of each streamed completion chunk (in order) and the finish_reason."""
    texts, reason = [], None
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": MODEL, "stream": True, **body},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["text"]:
                texts.append(choice["text"])
            reason = choice["finish_reason"] or reason
    return texts, reason


# ---------------------------------------------------------------------------------------------- 1. streaming
def test_a_first_canvas_ending_mid_character_streams_the_text_before_it_at_once(srv, llm):
    """The first canvas is fixed (canvas_template) to end two bytes into a 4-byte emoji: its first chunk carries
    all the text before the emoji (before the fix: nothing, the whole canvas waited for the next one), and the
    chunks add up to the non-streamed text."""
    tok = llm.tokenizer
    emoji = tok.encode("\U0001F642", add_special_tokens=False)
    assert len(emoji) >= 2  # the byte-level fixture splits it
    filler = tok.encode("Hello there, all words here and more", add_special_tokens=False)[:C - 1]
    canvas = filler + emoji[:1]
    assert len(canvas) == C and tok.decode(canvas).endswith("\ufffd")
    before = tok.decode(filler)
    body = {"prompt": "Say hi", "max_tokens": 2 * C, "seed": 3, "ignore_eos": True, "canvas_template": canvas,
            "max_denoising_steps": 2}
    texts, reason = sse_texts(srv, body)
    full = post(srv, body).json()["choices"][0]
    assert texts[0] == before
    assert "".join(texts) == full["text"] and reason == full["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------------- 2. busy port
def test_serve_refuses_a_busy_port_before_loading_the_model(tmp_path, capsys):
    """A port another socket listens on: exit 2 with one line naming host:port; the checkpoint path is never
    read (the check runs before the model loads) and nothing claims to be serving."""
    from blockdiff.cli import main as cli_main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = cli_main(["serve", str(tmp_path / "never-read"), "--host", "127.0.0.1", "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err and "in use" in err, err
    assert "serving" not in out


# ---------------------------------------------------------------------------------------------- 3. text_template
def test_text_template_refuses_a_max_tokens_below_its_length(srv, llm):
    tpl = "Name: <|hole|>!"  # an auto-sized hole: the template fills the whole canvas
    r = post(srv, {"prompt": "hi", "seed": 1, "text_template": tpl, "max_tokens": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and f">= {C}" in err["message"] and "max_new_tokens" not in err["message"]
    for extra in ({"max_tokens": C}, {}):  # enough, or unset: the filled template
        ok = post(srv, {"prompt": "hi", "seed": 1, "text_template": tpl, **extra})
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["text"].startswith("Name: ")
    with pytest.raises(ValueError, match=f"max_new_tokens >= {C}"):
        llm.generate("hi", SamplingParams(seed=1, text_template=tpl, max_new_tokens=1))


# ---------------------------------------------------------------------------------------------- 4. suffix
def test_suffix_finish_reason_is_length_when_the_budget_cut_the_middle(llm):
    tok = llm.tokenizer
    sized = plan_suffix(tok, " end", 2, C)  # max_tokens 2 sizes the middle
    roomy = plan_suffix(tok, " end", 64, C)  # the canvas sizes it
    filled = [7] * C
    assert sized.finish_reason(filled, {EOS_ID}) == "length"
    assert sized.finish_reason([7, EOS_ID] + [7] * (C - 2), {EOS_ID}) == "stop"  # the model ended it
    assert roomy.finish_reason(filled, {EOS_ID}) == "stop"


def test_server_suffix_with_a_small_max_tokens_reports_length_when_cut(srv):
    reasons = []
    for seed in range(4):
        r = post(srv, {"prompt": "def add(a, b):", "suffix": "\nok", "max_tokens": 2, "seed": seed}).json()
        n, reason = r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]
        assert reason == ("length" if n == 2 else "stop"), r  # fewer: the model ended the middle with an EOS
        reasons.append(reason)
    assert "length" in reasons


# ---------------------------------------------------------------------------------------------- 5. content
@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "system", "content": None}])
def test_a_message_without_content_is_400_unless_it_is_an_assistants(srv, message):
    r = post(srv, {"messages": [message], "max_tokens": 8}, "/v1/chat/completions")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content" and err["message"].startswith("'messages[0].content' is required")
    t = post(srv, {"messages": [message]}, "/tokenize")
    assert t.status_code == 400 and t.json()["error"]["param"] == "messages[0].content"


# ---------------------------------------------------------------------------------------------- 6. max-model-len
def test_context_errors_name_the_servers_limit_when_max_model_len_sets_it(srv, short):
    words = "this server's context of 40 tokens (--max-model-len)"
    too_long = post(short, {"prompt": list(range(10, 40)), "max_tokens": 16})
    assert too_long.status_code == 400 and words in too_long.json()["error"]["message"], too_long.text
    assert "model's" not in too_long.json()["error"]["message"]
    too_many = post(short, {"prompt": "hi", "max_tokens": 48})
    assert too_many.status_code == 400 and words in too_many.json()["error"]["message"], too_many.text
    own = post(srv, {"prompt": "hi", "max_tokens": 4096})  # no --max-model-len: the model's own context
    assert own.status_code == 400 and "the model's context of 2048 tokens" in own.json()["error"]["message"]


def test_max_model_len_beyond_the_models_context_is_refused_not_capped(tmp_path, capsys):
    """--max-model-len over the model's context used to be capped silently (the start-up line showed the smaller
    value): the operator asked for a context the model does not have, so it is one clear error."""
    from blockdiff.bench.checkpoints import write_random_checkpoint
    from blockdiff.cli import main as cli_main
    write_random_checkpoint(str(tmp_path), "tiny")
    llm = LLM(str(tmp_path), dtype=torch.float32, device="cpu")
    ctx = llm.model.text.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_model_len {ctx + 1} is more than the model's context of {ctx}"):
        build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL, max_model_len=ctx + 1)
    assert build_app(Engine(llm.model, llm.defaults, llm.tokenizer), MODEL,
                     max_model_len=ctx).state.server.context == ctx  # the model's own context is allowed
    assert cli_main(["serve", str(tmp_path), "--max-model-len", str(ctx + 1)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the load's own log line: one error line
    assert last.startswith(f"blockdiff: error: --max-model-len {ctx + 1} is more than the model's context of {ctx} "
                           "positions"), last


def test_a_model_without_a_tokenizer_answers_with_its_token_ids(tmp_path):
    """A checkpoint without tokenizer.json (one `blockdiff train --task copy` or `jsonl` wrote) takes its prompt
    as ids, but answered with an empty text and nothing else: the output was lost. Its completions now carry
    `token_ids`, streamed block by block, equal to what LLM.generate returns."""
    import openai
    from fixtures import make_checkpoint
    path = make_checkpoint(tmp_path / "ckpt", canvas_length=8, with_tokenizer=False,
                           generation_config={"max_denoising_steps": 4})
    llm = LLM(path, dtype=torch.float32, deterministic=True)
    prompt = [2, 40, 41, 42, 43]
    want = llm.generate(prompt_token_ids=[prompt],
                        sampling_params=SamplingParams(max_new_tokens=20, seed=3, ignore_eos=True))[0].token_ids
    assert len(want) == 20
    s = LiveServer(build_app(llm, MODEL))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        body = dict(model=MODEL, prompt=prompt, max_tokens=20, seed=3, extra_body={"ignore_eos": True})
        r = client.completions.create(**body)
        assert r.choices[0].text == "" and r.choices[0].model_extra["token_ids"] == want
        streamed = [c.choices[0].model_extra.get("token_ids") or [] for c in client.completions.create(
            **body, stream=True) if c.choices]
        assert sum(streamed, []) == want and len([ids for ids in streamed if ids]) == 3  # canvases of 8, 8, 4
    finally:
        s.close()
