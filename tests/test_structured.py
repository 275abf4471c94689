"""Structured output through the Python API on a random-weight model with a byte-level BPE tokenizer.

The checkpoint has a canvas of 8 positions, so most outputs span several canvases. Every request of the schema
suite runs in one ``LLM.generate`` call (one engine pass, batched); seed 2 runs with 2 denoising steps per canvas
so the settle-time repair path does most of the work there. Whatever the weights, an output that finishes with
"stop" must parse and validate (checked with ``jsonschema``), and for these bounded schemas every request must
finish with "stop".
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from blockdiff import LLM
from blockdiff.sampling.params import SamplingParams
from blockdiff.structured import GrammarCompiler, normalize
from fixtures import EOS_ID, TURN_END_ID, make_checkpoint
from structured_schemas import SCHEMAS

CANVAS = 8
END_IDS = (EOS_ID, TURN_END_ID, 50)  # the fixture's generation_config eos_token_id
SEEDS = (0, 1, 2)
MAX_TOKENS = 256
REGEX = r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"
CHOICES = ["positive", "negative", "neutral", "it is complicated"]
LARK = 'start: expr\nexpr: NUM | "(" expr "+" expr ")"\nNUM: /[0-9]/'
GBNF = 'root ::= answer " " [a-z] [a-z]?\nanswer ::= "yes" | "no"'


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("structured_ckpt"), canvas_length=CANVAS)
    # Deterministic mode: "alone or batched" below is a bit-identity claim.
    return LLM(path, dtype=torch.float32, max_num_seqs=256, deterministic=True)


def _params(seed: int, spec: dict, **kw) -> SamplingParams:
    steps = 2 if seed == 2 else None  # the step cap settles most of each canvas by repair
    return SamplingParams(seed=seed, max_new_tokens=MAX_TOKENS, max_denoising_steps=steps,
                          structured_outputs=spec, **kw)


OTHER = {
    "regex": {"regex": REGEX},
    "choice": {"choice": CHOICES},
    "lark": {"grammar": LARK},
    "gbnf": {"grammar": GBNF},
    "json_object": {"json_object": True},
    "json_object_ws": {"json_object": True, "allow_whitespace": True},
}


@pytest.fixture(scope="module")
def runs(llm):
    """{(name, seed): RequestOutput} for every schema and every other constraint, from one generate call."""
    keys, params = [], []
    for name, schema in SCHEMAS.items():
        for seed in SEEDS:
            keys.append((name, seed))
            params.append(_params(seed, {"json": schema}))
    for name, spec in OTHER.items():
        for seed in SEEDS:
            keys.append((name, seed))
            params.append(_params(seed, spec))
    outs = llm.generate(["Answer:"] * len(params), params)
    return dict(zip(keys, outs))


def test_there_are_at_least_30_schemas():
    assert len(SCHEMAS) >= 30


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_bounded_schema_stops_with_valid_json(runs, name):
    for seed in SEEDS:
        out = runs[name, seed]
        assert out.finish_reason == "stop", (seed, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMAS[name])
        assert len(out.token_ids) < 200
        assert out.token_ids[-1] == EOS_ID or len(out.token_ids) % CANVAS == 0  # EOS, or the canvas ended it


def test_a_stopped_constrained_output_ends_with_one_end_token_never_two(llm):
    # The grammar matcher takes the model's own EOS; the constraint used to append a second one after it, which
    # showed as a literal "<eos>" in chat content with tools and one token too many in completion_tokens.
    outs = llm.generate(["Answer:"] * 8, [SamplingParams(seed=s, max_new_tokens=64, structured_outputs={
        "regex": "[a-c]{2,5}"}) for s in range(8)])
    for out in outs:
        assert out.finish_reason == "stop" and re.fullmatch("[a-c]{2,5}", out.text), out.text
        ends = [t for t in out.token_ids if t in END_IDS]
        assert ends == [out.token_ids[-1]], out.token_ids  # one end token, the last


def test_outputs_span_several_canvases(runs):
    canvases = [o.metrics.canvases for o in runs.values()]
    assert max(canvases) >= 4 and sum(c >= 2 for c in canvases) > len(canvases) // 2


def test_regex_output_matches_the_whole_pattern(runs):
    for seed in SEEDS:
        out = runs["regex", seed]
        assert out.finish_reason == "stop" and re.fullmatch(REGEX, out.text), out.text


def test_choice_output_is_exactly_one_choice(runs):
    for seed in SEEDS:
        out = runs["choice", seed]
        assert out.finish_reason == "stop" and out.text in CHOICES


def _eval_lark(text: str) -> bool:
    while not re.fullmatch(r"[0-9]", text):
        reduced = re.sub(r"\([0-9]\+[0-9]\)", "0", text)
        if reduced == text:
            return False
        text = reduced
    return True


def test_lark_grammar_output_is_a_sentence(runs):
    for seed in SEEDS:
        out = runs["lark", seed]
        assert out.finish_reason == "stop" and _eval_lark(out.text), out.text


def test_gbnf_grammar_output_is_a_sentence(runs):
    for seed in SEEDS:
        out = runs["gbnf", seed]
        assert out.finish_reason == "stop" and re.fullmatch(r"(yes|no) [a-z][a-z]?", out.text), out.text


@pytest.mark.parametrize("name", ["json_object", "json_object_ws"])
def test_any_json_object_is_an_object_when_it_stops(runs, name):
    for seed in SEEDS:
        out = runs[name, seed]
        assert out.finish_reason in ("stop", "length")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:
            assert len(out.token_ids) == MAX_TOKENS


def test_compact_json_has_no_free_whitespace(runs):
    for name in SCHEMAS:
        for seed in SEEDS:
            outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', runs[name, seed].text)
            assert not re.search(r"\s", outside_strings), runs[name, seed].text


def test_length_when_max_tokens_runs_out_first(llm):
    schema = SCHEMAS["nested_address"]
    out = llm.generate("x", SamplingParams(seed=0, max_new_tokens=5, structured_outputs={"json": schema}))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_stop_strings_never_cut_a_constrained_output(llm):
    schema = {"type": "object", "properties": {"k": {"const": "a STOP b"}}, "required": ["k"],
              "additionalProperties": False}
    out = llm.generate("x", SamplingParams(seed=1, max_new_tokens=64, stop=["STOP"],
                                           structured_outputs={"json": schema}))[0]
    assert out.finish_reason == "stop" and json.loads(out.text) == {"k": "a STOP b"}


def test_properties_come_in_the_order_the_schema_declares_them(llm):
    # OpenAI's structured outputs write keys in the schema's order (a "reasoning" field before the "answer" it
    # leads to); the compiled grammar used to take them sorted by name. The same properties in another order are
    # another schema, in the same batch.
    def schema(names):
        return {"type": "object", "properties": {k: {"type": "integer", "minimum": 0, "maximum": 9} for k in names},
                "required": list(names), "additionalProperties": False}
    orders = [("zeta", "alpha", "mid"), ("mid", "zeta", "alpha"), ("alpha", "mid", "zeta")]
    outs = llm.generate(["x"] * len(orders), [SamplingParams(seed=0, max_new_tokens=64, structured_outputs={
        "json": schema(names)}) for names in orders])
    for names, out in zip(orders, outs):
        assert out.finish_reason == "stop", out.text
        assert list(json.loads(out.text)) == list(names), out.text


def test_seeded_constrained_output_is_the_same_alone_or_batched(llm, runs):
    name = "array_of_objects"
    alone = llm.generate("Answer:", _params(1, {"json": SCHEMAS[name]}))[0]
    assert alone.token_ids == runs[name, 1].token_ids


@pytest.mark.parametrize("name", ["flat_person", "array_of_objects", "mixed_everything"])
def test_argmax_like_cuts_give_one_deterministic_valid_output(llm, name):
    """top_k = 1, min_p = 1, a tiny top_p and temperature 0 all take each accepted position's (masked) argmax:
    with one seed they give the same output, run after run, alone or batched, and it validates."""
    spec = {"json": SCHEMAS[name]}
    for seed in (0, 1):
        kws = [{"top_k": 1}, {"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}, {"temperature": 0},
               {"top_k": 1, "top_p": 0.9}]
        outs = llm.generate(["Answer:"] * len(kws), [_params(seed, spec, **kw) for kw in kws])
        alone = llm.generate("Answer:", _params(seed, spec, top_k=1))[0]
        assert len({tuple(o.token_ids) for o in outs + [alone]}) == 1, [o.text for o in outs]
        assert outs[0].finish_reason == "stop", outs[0].text
        jsonschema.validate(json.loads(outs[0].text), SCHEMAS[name])


def test_truncated_constrained_outputs_stop_and_validate(llm):
    jobs = [(name, seed, kw) for name in ("flat_person", "nested_address", "enum_mixed", "anyof_objects")
            for seed in SEEDS for kw in ({"top_p": 0.9}, {"top_k": 5}, {"min_p": 0.1}, {"top_p": 0.9, "top_k": 5})]
    outs = llm.generate(["Answer:"] * len(jobs), [_params(seed, {"json": SCHEMAS[name]}, **kw)
                                                  for name, seed, kw in jobs])
    for (name, seed, kw), out in zip(jobs, outs):
        assert out.finish_reason == "stop", (name, seed, kw, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMAS[name])


def test_unconstrained_rows_run_beside_constrained_ones(llm):
    plain = SamplingParams(seed=3, max_new_tokens=16)
    alone = llm.generate("Hi", plain)[0]
    mixed = llm.generate(["Hi", "Hi"], [plain, _params(0, {"choice": CHOICES})])
    assert mixed[0].token_ids == alone.token_ids and mixed[1].text in CHOICES


# ---------------------------------------------------------------------------------------------- the canvas rule
def _constraint(llm, spec):
    comp = GrammarCompiler(llm.tokenizer, llm.model.vocab_size, [EOS_ID])
    return comp.constraint(normalize(spec), [EOS_ID], CANVAS)


def _peaked(llm, ids: list[int]) -> torch.Tensor:
    """Logits [C, V] putting nearly all mass on ids[i] at position i."""
    V = llm.model.vocab_size
    logits = torch.zeros(len(ids), V)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = 40.0
    return logits


def _run_step(c, logits, bound=100.0, seed=0):
    c.generator.manual_seed(seed)
    return c.step(logits, step=0, max_steps=4, t_min=0.4, t_max=0.8, entropy_bound=bound)


def test_one_step_freezes_a_whole_valid_canvas(llm):
    c = _constraint(llm, {"regex": "[a-z]{8,20}"})
    ids = llm.tokenizer.encode("abcdefghijklmnop")[:CANVAS]
    assert len(ids) == CANVAS
    res = _run_step(c, _peaked(llm, ids))
    assert c.frozen == ids and res.canvas.tolist() == ids and c.masks == 1  # parallel: one mask, 8 tokens


def test_a_token_that_breaks_the_grammar_is_never_frozen(llm):
    c = _constraint(llm, {"regex": "[a-z]+"})
    ids = llm.tokenizer.encode("abc")
    bad = llm.tokenizer.encode("7")
    canvas = (ids + bad + ids)[:CANVAS]
    canvas += [ids[0]] * (CANVAS - len(canvas))
    res = _run_step(c, _peaked(llm, canvas))
    n = len(ids)
    assert c.frozen == ids  # the run stops before the digit and nothing after it is frozen
    assert not res.accepted[n] and res.canvas[n].item() != bad[0]  # renoised (the draw cannot repeat it here)


def test_first_undecided_position_is_sampled_from_its_masked_distribution(llm):
    c = _constraint(llm, {"choice": ["yes", "no"]})
    digit = llm.tokenizer.encode("7")[0]
    for seed in range(5):
        c.matcher.reset()
        c.start_canvas()
        res = _run_step(c, _peaked(llm, [digit] * CANVAS), bound=0.0, seed=seed)
        first = llm.tokenizer.decode([res.canvas[0].item()])
        assert first and ("yes".startswith(first) or "no".startswith(first))


def _two_letters(llm) -> tuple[torch.Tensor, int, int]:
    """Logits [C, V] for a "[a-z]+" constraint: at every position "a" (2.0) is a little more likely than "b"
    (1.9), "7" (10.0, which the grammar forbids) is the most likely token and everything else is negligible."""
    a, b, digit = (llm.tokenizer.encode(x)[0] for x in ("a", "b", "7"))
    logits = torch.full((CANVAS, llm.model.vocab_size), -30.0)
    logits[:, a], logits[:, b], logits[:, digit] = 2.0, 1.9, 10.0
    return logits, a, b


def _first_token(llm, seed: int, bound: float = 0.0, **cut) -> tuple[int, object]:
    c = _constraint(llm, {"regex": "[a-z]+"})
    logits, _, _ = _two_letters(llm)
    c.generator.manual_seed(seed)
    res = c.step(logits, step=0, max_steps=4, t_min=0.4, t_max=0.8, entropy_bound=bound, **cut)
    return res.canvas[0].item(), res


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_p": 0.5}, {"min_p": 0.95}, {"greedy": True}],
                         ids=["top_k", "top_p", "min_p", "greedy"])
def test_truncation_cuts_the_masked_distribution_of_the_constrained_step(llm, cut):
    """At t = 0.8, p(a) = 0.53 and p(b) = 0.47 after the grammar mask (the forbidden "7" is gone): top_k = 1,
    top_p = 0.5, min_p = 0.95 (p(b) / p(a) = 0.88) and temperature 0 keep only "a", which is never the empty
    set even though "7" is the most likely token before the mask. Entropy, acceptance and the returned
    probabilities are the whole masked distribution's, as in the default sampler."""
    _, a, b = _two_letters(llm)
    plain = {seed: _first_token(llm, seed) for seed in range(12)}
    drew_b = [seed for seed, (tok, _) in plain.items() if tok == b]
    assert drew_b and {tok for tok, _ in plain.values()} == {a, b}  # uncut, the fixed generators draw both
    for seed, (tok0, res0) in plain.items():
        tok, res = _first_token(llm, seed, **cut)
        assert tok == a, (seed, cut)
        assert torch.equal(res.entropy, res0.entropy) and torch.equal(res.probs, res0.probs)
        assert torch.equal(res.accepted, res0.accepted)


def test_constrained_step_cut_applies_to_every_accepted_position(llm):
    """Beyond the masked position the cut applies too: with a bound that accepts the whole canvas and "7" made
    negligible after position 0, top_k = 1 draws "a" at every position, and the run is frozen whole (uncut, some
    seed draws a "b" somewhere)."""
    logits, a, b = _two_letters(llm)
    logits[1:, llm.tokenizer.encode("7")[0]] = -30.0
    drawn = set()
    for seed in range(4):
        for cut in ({}, {"top_k": 1}):
            c = _constraint(llm, {"regex": "[a-z]+"})
            c.generator.manual_seed(seed)
            res = c.step(logits.clone(), step=0, max_steps=4, t_min=0.4, t_max=0.8, entropy_bound=1e9, **cut)
            assert bool(res.accepted.all())
            if cut:
                assert res.canvas.tolist() == c.frozen == [a] * CANVAS
            else:
                drawn |= set(res.canvas.tolist())
    assert b in drawn


def test_settling_repairs_an_invalid_draft_into_a_valid_canvas(llm):
    c = _constraint(llm, {"json": SCHEMAS["flat_person"]})
    junk = llm.tokenizer.encode("!!!!!!!!")[:CANVAS]
    tokens = c.complete(junk + [junk[0]] * (CANVAS - len(junk)))
    assert len(tokens) == CANVAS and c.matcher.is_error() is False
    text = llm.tokenizer.decode(tokens)
    assert text.startswith("{") and "!" not in text[:2]


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    ("not a dict", "must be an object"),
    ({}, "exactly one of"),
    ({"json": {"type": "object"}, "regex": "a"}, "exactly one of"),
    ({"xml": "<a/>"}, "unknown key"),
    ({"json": [1, 2]}, "must be a JSON Schema object"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": {"type": "foo"}}, "Invalid type: foo"),
    ({"json": {"type": "string", "format": "weird"}}, "Unknown format: weird"),
    ({"json": {"type": "string", "pattern": "(("}}, "unclosed group"),
    ({"json": {"type": "integer", "minimum": "x"}}, "minimum"),
    ({"json": {"$ref": "#/$defs/missing"}}, "missing"),
    ({"json": {"type": "array", "uniqueItems": True}}, "Unimplemented keys"),
    ({"json_object": 1}, "must be true"),
    ({"regex": "(("}, "regular expression is invalid"),
    ({"regex": "(a|b"}, "regex parse error: unclosed group"),  # the regex parser's own words, on the one line
    ({"regex": ""}, "non-empty string"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", 3]}, "non-empty list"),
    ({"grammar": "start: undefined_rule"}, "grammar is invalid"),
    ({"grammar": 'root ::= ( "a"'}, "GBNF"),
    ({"regex": "a+", "allow_whitespace": True}, "allow_whitespace applies"),
    ({"json_object": True, "allow_whitespace": "yes"}, "must be a boolean"),
]


@pytest.mark.parametrize("spec,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_structured_outputs_raise_value_error_naming_the_problem(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        SamplingParams(structured_outputs=spec)
    assert "structured_outputs" in str(e.value)
    assert "\n" not in str(e.value)  # one line: no caret drawings of the pattern or the grammar


@pytest.mark.parametrize("extra,message", [
    ({"ignore_eos": True}, "ignore_eos"), ({"canvas_template": [-1, 5]}, "canvas_template"),
    ({"allowed_token_ids": [5]}, "allowed_token_ids"), ({"rng": "reference"}, "rng='default'")])
def test_structured_outputs_refuse_conflicting_fields(extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(structured_outputs={"regex": "a"}, **extra)


def test_a_model_without_tokenizer_refuses_structured_outputs(llm):
    bare = LLM.from_model(llm.model, tokenizer=None)
    with pytest.raises(ValueError, match="needs the checkpoint's tokenizer"):
        bare.generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(structured_outputs={"regex": "a"}))


def test_structured_benchmark_reports_the_per_step_overhead(tiny_checkpoint):
    from blockdiff.bench.structured import format_structured, run_structured_benchmark

    rep = run_structured_benchmark(tiny_checkpoint, steps=2, repeats=1, prompt_len=8, dtype="float32",
                                   log=lambda m: None)
    row = rep["per_step"]["json (in a string)"]
    assert row["steps"] == 2 and row["masks"] >= 2 and row["mask_ms_per_step"] > 0
    assert rep["per_step"]["unconstrained"]["overhead"] == 0
    assert rep["end_to_end"]["json (record schema)"]["tokens"] > 0
    assert "overhead" in format_structured(rep)
