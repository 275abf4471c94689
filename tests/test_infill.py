"""Infilling through text: ``text_template`` with holes and ``suffix`` (Python API and /v1/completions)."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from blockdiff import LLM
from blockdiff.engine.engine import Engine
from blockdiff.sampling.params import SamplingParams
from blockdiff.server import build_app
from blockdiff.structured.infill import plan_suffix, plan_template
from fixtures import EOS_ID
from test_server import LiveServer

C = 16  # the tiny checkpoint's canvas


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype=torch.float32)


def test_hole_lengths_explicit_then_shared_equally(llm):
    tok = llm.tokenizer
    a, b = tok.encode("A:"), tok.encode(";B:")
    plan = plan_template(tok, "A:<|hole:3|>;B:<|hole|><|hole|>", C)
    free = C - len(a) - len(b) - 3
    assert plan.holes[0] == (len(a), len(a) + 3)
    sizes = [e - s for s, e in plan.holes[1:]]
    assert sizes == [free - free // 2, free // 2] and sum(sizes) == free
    assert len(plan.template) == C and plan.template[:len(a)] == a
    assert all(plan.template[i] == -1 for s, e in plan.holes for i in range(s, e))


@pytest.mark.parametrize("text,message", [
    ("no holes here", "has no hole"),
    ("x<|hole:0|>", "at least 1 token"),
    ("<|hole:20|>", "canvas holds 16"),
    ("a" * 40 + "<|hole|>", "canvas holds 16"),
    # a mistyped hole is refused, not laid on the canvas as fixed text beside the real ones
    ("<|hole|> <|hole: 2|>", "'<|hole: 2|>' is not a hole"),
    ("<|hole:x|>", "'<|hole:x|>' is not a hole"),
    ("<|hole:-1|><|hole|>", "'<|hole:-1|>' is not a hole"),
    ("<|HOLE|>", "'<|HOLE|>' is not a hole"),
])
def test_bad_templates_raise(llm, text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_template(llm.tokenizer, text, C)


def test_hole_output_ends_at_eos_and_fixed_text_is_kept(llm):
    plan = plan_template(llm.tokenizer, "x<|hole:4|>y", C)
    x, y = llm.tokenizer.encode("x"), llm.tokenizer.encode("y")
    canvas = x + [7, EOS_ID, 8, 9] + y + [5] * (C - len(x) - len(y) - 4)
    assert plan.output(canvas, {EOS_ID}) == x + [7] + y


def test_text_template_fills_the_holes_and_keeps_the_text(llm):
    tpl = "N:<|hole:3|>\nC:<|hole|>."
    outs = llm.generate(["Fill in:"] * 3, [SamplingParams(seed=s, text_template=tpl) for s in range(3)])
    for o in outs:
        assert o.finish_reason == "stop" and o.metrics.canvases == 1
        assert re.fullmatch(r"N:.*\nC:.*\.", o.text, re.S), o.text
        assert len(o.token_ids) <= C


def test_suffix_fills_the_middle_only(llm):
    p = SamplingParams(seed=1, suffix=" is the answer.", max_new_tokens=6)
    o = llm.generate("The question:", p)[0]
    assert o.metrics.canvases == 1
    assert 1 <= len(o.token_ids) <= 6 and EOS_ID not in o.token_ids
    assert o.finish_reason == ("length" if len(o.token_ids) == 6 else "stop")  # max_new_tokens sized the middle
    assert plan_suffix(llm.tokenizer, " is the answer.", 6, C).holes == [(0, 6)]


def test_suffix_and_template_refuse_other_canvas_fields():
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(suffix="a", text_template="<|hole|>")
    with pytest.raises(ValueError, match="canvas_template"):
        SamplingParams(suffix="a", canvas_template=[-1])
    with pytest.raises(ValueError, match="suffix"):
        SamplingParams(suffix="a", structured_outputs={"regex": "a"})


def test_server_suffix_equals_offline_and_a_too_long_suffix_is_400(llm):
    srv = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), "m"))
    try:
        r = srv.client().completions.create(model="m", prompt="def add(a, b):", suffix="\nok",
                                            max_tokens=8, seed=4)
        off = llm.generate("def add(a, b):", SamplingParams(seed=4, suffix="\nok",
                                                            max_new_tokens=8))[0]
        assert r.choices[0].text == off.text and r.choices[0].finish_reason == off.finish_reason
        bad = httpx.post(srv.url + "/v1/completions", timeout=30, json={
            "model": "m", "prompt": "x", "suffix": "a" * 40})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "suffix"
    finally:
        srv.close()


@pytest.mark.parametrize("infill", [dict(suffix=" is the answer.", max_new_tokens=6),
                                    dict(text_template="N:<|hole:3|>\nC:<|hole|>.")])
def test_truncation_cuts_the_draws_at_the_holes(llm, infill):
    """top_k / top_p / min_p with infilling (was refused): a cut that keeps only the most likely token draws every
    hole position as temperature 0 does, for each seed; the fixed text stays; a partial cut changes the draws."""
    def gen(seed, **kw):
        return llm.generate("The question:", SamplingParams(seed=seed, **kw, **infill))[0]
    for seed in (1, 2):
        greedy = gen(seed, temperature=0)
        for cut in (dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-9)):
            out = gen(seed, **cut)
            assert out.token_ids == greedy.token_ids, (seed, cut)
            assert out.finish_reason == greedy.finish_reason
        if "text_template" in infill:
            assert re.fullmatch(r"N:.*\nC:.*\.", greedy.text, re.S), greedy.text
    plain = [gen(s).token_ids for s in range(4)]
    assert any(gen(s, top_k=1).token_ids != p for s, p in enumerate(plain))  # the cut is applied, not ignored


def test_server_suffix_with_top_p_equals_offline(llm):
    srv = LiveServer(build_app(Engine(llm.model, llm.defaults, llm.tokenizer), "m"))
    try:
        r = srv.client().completions.create(model="m", prompt="def add(a, b):", suffix="\nok",
                                            max_tokens=8, seed=4, top_p=0.3, extra_body={"top_k": 5})
        off = llm.generate("def add(a, b):", SamplingParams(seed=4, suffix="\nok", max_new_tokens=8,
                                                            top_p=0.3, top_k=5))[0]
        assert r.choices[0].text == off.text and r.choices[0].finish_reason == off.finish_reason
    finally:
        srv.close()
