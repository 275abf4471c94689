"""The call grammar built from tools' JSON Schemas (blockdiff/tools/grammar.py), checked without a model:
random walks through the grammar (any token its mask allows) always end in calls that parse and whose
arguments validate; hand-written calls are accepted or refused as the schema says; what cannot be enforced is
refused naming the schema path."""

from __future__ import annotations

import json
import random

import jsonschema
import llguidance
import pytest

from blockdiff.tokenizer import Tokenizer
from blockdiff.tools.grammar import tool_call_grammar
from blockdiff.tools.parser import parse_output
from blockdiff.tools.syntax import MARKERS, dumps
from fixtures import write_tokenizer
from structured_schemas import SCHEMAS
from tool_fixtures import GEMMA4_TOOLS_TEMPLATE, TOOL_TOKENS

CALL_SCHEMAS = {k: v for k, v in SCHEMAS.items() if v.get("type") == "object"}
EOS = [1, 106, 50]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tool_tok")
    write_tokenizer(d, 512, chat_template=GEMMA4_TOOLS_TEMPLATE, extra_specials=TOOL_TOKENS)
    t = Tokenizer.from_dir(str(d))
    t.lltok = llguidance.LLTokenizer(t.to_json(), n_vocab=512, eos_token=EOS)
    return t


def matcher(tok, tools, mode="required", parallel=True, thinking=False):
    g = tool_call_grammar(tools, MARKERS.ids(tok), mode, parallel, thinking)
    m = llguidance.LLMatcher(tok.lltok, llguidance.LLMatcher.grammar_from_lark(g), log_level=1)
    assert not m.is_error(), m.get_error()
    return m


def walk(tok, m, rng: random.Random, limit: int = 600) -> list[int]:
    """Random tokens the grammar allows, ending where it may end (or must)."""
    import torch
    ids = []
    bits = torch.zeros((512 + 31) // 32, dtype=torch.int32)
    for _ in range(limit):
        if m.is_stopped() or (m.is_accepting() and rng.random() < 0.3):
            return ids
        m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
        allowed = [i for i in range(512) if (int(bits[i // 32]) >> (i % 32)) & 1 and i not in EOS]
        t = rng.choice(allowed)
        assert m.consume_token(t), m.get_error()
        ids.append(t)
    raise AssertionError("the walk did not end")


@pytest.mark.parametrize("name", list(CALL_SCHEMAS))
def test_every_sentence_of_the_grammar_is_a_valid_call(tok, name):
    schema = CALL_SCHEMAS[name]
    rng = random.Random(name)
    for _ in range(3):
        m = matcher(tok, [{"name": name, "parameters": schema}], parallel=False)
        text = tok.decode(walk(tok, m, rng), skip_special_tokens=False)
        p = parse_output(text, tool_names=[name])
        assert p.error is None and len(p.tool_calls) == 1, (text, p.error)
        jsonschema.validate(p.tool_calls[0].arguments, schema)


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "n": {"type": "integer", "minimum": 0},
                                            "xs": {"type": "array", "items": {"type": "integer", "minimum": -3,
                                                                             "maximum": 3},
                                                   "minItems": 2, "maxItems": 4},
                                            "o": {"type": "object"}, "opt": {"type": "boolean"}},
           "required": ["city", "xs"]}
TOOLS = [{"name": "get_weather", "parameters": WEATHER}, {"name": "noargs", "parameters": {}}]


def consumes(tok, m, text: str) -> bool:
    ids = tok.encode(text)
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


@pytest.mark.parametrize("args, ok", [
    ({"city": "Pa{r},is", "xs": [1, -2]}, True),
    ({"city": "", "n": 12, "xs": [1, 2, 3], "o": {"a": [1, {"b": "x"}], "c": None}, "opt": True}, True),
    ({"city": "x", "xs": [1]}, False),            # minItems
    ({"xs": [1, 2]}, False),                      # required city
    ({"city": "x", "xs": [1, 5]}, False),         # item maximum
    ({"city": "x" * 11, "xs": [1, 2]}, False),    # maxLength
    ({"city": "x", "xs": [1, 2], "extra": 1}, False),  # undeclared key
    ({"xs": [1, 2], "city": "x"}, False),         # keys in declared order only
    ({"city": "x", "n": -1, "xs": [1, 2]}, False),  # minimum 0
])
def test_hand_written_calls_are_accepted_exactly_when_valid(tok, args, ok):
    for mode, thinking, prefix in (("required", False, ""), ("auto", True, "<|channel>thought\nhm<channel|>ok ")):
        m = matcher(tok, TOOLS, mode, True, thinking)
        text = prefix + f"<|tool_call>call:get_weather{dumps(args)}<tool_call|><|tool_call>call:noargs{{}}<tool_call|>"
        assert consumes(tok, m, text) == ok


def test_auto_allows_plain_text_and_required_does_not(tok):
    assert consumes(tok, matcher(tok, TOOLS, "auto"), "Just an answer {with braces}.")
    assert not consumes(tok, matcher(tok, TOOLS, "required"), "Just an answer.")


def test_required_with_thinking_must_think_first(tok):
    call = "<|tool_call>call:noargs{}<tool_call|>"
    assert not consumes(tok, matcher(tok, TOOLS, "required", thinking=True), call)
    assert consumes(tok, matcher(tok, TOOLS, "required", thinking=True), "<|channel>thought\nok<channel|>" + call)


def test_one_call_unless_parallel(tok):
    two = "<|tool_call>call:noargs{}<tool_call|>" * 2
    assert consumes(tok, matcher(tok, TOOLS, parallel=True), two)
    assert not consumes(tok, matcher(tok, TOOLS, parallel=False), two)


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "properties": {"x": {"type": "number", "minimum": 3, "exclusiveMaximum": 3}}}, "properties.x"),
    ({"type": "object", "properties": {"x": {"type": "integer", "minimum": 5.5, "maximum": 5.9}}}, "properties.x"),
    ({"type": "object", "properties": {"x": {"type": "integer", "multipleOf": 0}}}, "properties.x.multipleOf"),
    ({"type": "object", "properties": {"x": {"type": "number", "minimum": "1"}}}, "properties.x.minimum"),
    ({"type": "object", "properties": {"x": {"type": "string", "minLength": 5, "maxLength": 2}}}, "properties.x"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "required"),
    ({"type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}, "properties.xs"),
    ({"type": "object", "properties": {"x": {"not": {"type": "string"}}}}, "properties.x"),
    ({"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}}, "properties.x.$ref"),
    ({"type": "object", "properties": {"bad key": {"type": "string"}}}, "properties"),
    ({"type": "array"}, ""),
])
def test_what_cannot_be_enforced_is_refused_naming_the_path(tok, schema, where):
    with pytest.raises(ValueError) as e:
        tool_call_grammar([{"name": "f", "parameters": schema}], MARKERS.ids(tok), "required")
    assert str(e.value).startswith("tools[0].function.parameters" + ("." + where if where else "")), str(e.value)


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "number", "minimum": 0.5, "maximum": 3}, [0.5, 1.25, 3], [0.25, 3.5, -1]),
    ({"type": "number", "exclusiveMinimum": 0}, [0.001, 12], [0, -2]),
    ({"type": "integer", "minimum": 18}, [18, 120, 2 ** 53 - 1], [17, 18.5, -18]),
    ({"type": "integer", "maximum": -2}, [-2, -300], [-1, 0, 5]),
    ({"type": "integer", "minimum": 0, "maximum": 10 ** 6}, [0, 999999, 10 ** 6], [10 ** 6 + 1, -1]),
    ({"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}, [0, 35, 100], [3, 105]),
])
def test_number_bounds_are_enforced_exactly(tok, schema, good, bad):
    # Tools commonly bound numbers (a price >= 0, an age >= 18): enforced, not refused.
    params = {"type": "object", "properties": {"x": schema}, "required": ["x"], "additionalProperties": False}
    for x in good + bad:
        m = matcher(tok, [{"name": "f", "parameters": params}])
        assert consumes(tok, m, f"<|tool_call>call:f{{x:{json.dumps(x)}}}<tool_call|>") == (x in good), x
        assert (x in good) == jsonschema.Draft202012Validator(params).is_valid({"x": x}), x
    rng = random.Random(0)
    for _ in range(3):  # and random sentences of the grammar validate
        m = matcher(tok, [{"name": "f", "parameters": params}], parallel=False)
        p = parse_output(tok.decode(walk(tok, m, rng), skip_special_tokens=False), tool_names=["f"])
        assert p.error is None
        jsonschema.validate(p.tool_calls[0].arguments, params)


def test_auto_with_a_json_answer_is_that_answer_or_calls(tok):
    from blockdiff.tools.grammar import answer_rule
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}

    def m(spec, thinking=False):
        g = tool_call_grammar(TOOLS, MARKERS.ids(tok), "auto", True, thinking, answer_rule(spec))
        return llguidance.LLMatcher(tok.lltok, llguidance.LLMatcher.grammar_from_lark(g), log_level=1)
    call = "<|tool_call>call:noargs{}<tool_call|>"
    for text, ok in (('{"n":3}', True), (call, True), ('{"n":"x"}', False), ('{ "n":3}', False),
                     ("plain text", False), ('{"n":3}' + call, False)):
        assert consumes(tok, m({"json": schema}), text) == ok, text
    assert consumes(tok, m({"json": schema}, thinking=True), '<|channel>thought\nhm<channel|>{"n":3}')
    assert consumes(tok, m({"json": schema, "allow_whitespace": True}), '{ "n": 3 }')
    assert consumes(tok, m({"json_object": True}), '{"a":[1]}') and not consumes(tok, m({"json_object": True}), "[]")
    assert consumes(tok, m({"choice": ["yes", "no"]}), "no") and not consumes(tok, m({"choice": ["yes"]}), "n")
    with pytest.raises(ValueError, match="only a JSON answer"):
        answer_rule({"regex": "a+"})


def test_thinking_with_a_json_answer_may_think_first(tok):
    # enable_thinking asks the model to open a thinking channel: a response_format must not forbid it.
    from blockdiff.sampling.params import SamplingParams
    from blockdiff.tools.render import ToolPlan
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    for tools, choice in ((None, None), ([{"type": "function", "function": {"name": "f"}}], "none")):
        plan = ToolPlan.from_request(tools, choice, None, {"enable_thinking": True})
        params = plan.constrain(SamplingParams(structured_outputs={"json": schema}), tok)
        m = llguidance.LLMatcher(tok.lltok, llguidance.LLMatcher.grammar_from_lark(params.structured_outputs[
            "grammar"]), log_level=1)
        assert consumes(tok, m.deep_copy(), '<|channel>thought\nso {n:1}?<channel|>{"n":3}')
        assert consumes(tok, m.deep_copy(), '{"n":3}')
        assert not consumes(tok, m.deep_copy(), '<|channel>thought\nhm<channel|>{"n":"x"}')
        assert not consumes(tok, m.deep_copy(), 'text{"n":3}')
    # without thinking the spec is left as it is
    plain = ToolPlan.from_request(None, None, None, {}).constrain(SamplingParams(structured_outputs={"json": schema}),
                                                                  tok)
    assert plain.structured_outputs == {"json": schema}


def test_pattern_with_length_bounds_is_enforced(tok):
    # pydantic writes both for constr(pattern=..., max_length=...): the string must satisfy each.
    params = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-z]+[0-9]$", "minLength": 2,
                                                     "maxLength": 4}}, "required": ["s"]}
    for s, ok in (("ab1", True), ("a1", True), ("abc1", True), ("abcd1", False), ("1", False), ("ab", False)):
        m = matcher(tok, [{"name": "f", "parameters": params}])
        assert consumes(tok, m, f"<|tool_call>call:f{dumps({'s': s})}<tool_call|>") == ok, s
        assert jsonschema.Draft202012Validator(params).is_valid({"s": s}) == ok, s


def test_a_bound_on_one_side_caps_the_other(tok):
    # at 2**53 - 1 in magnitude (unbounded numbers: 16 digits), so a weak model cannot write digits for ever.
    params = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 18}}}
    for x, ok in ((2 ** 53 - 1, True), (10 ** 16, False)):
        m = matcher(tok, [{"name": "f", "parameters": params}])
        assert consumes(tok, m, f"<|tool_call>call:f{{x:{x}}}<tool_call|>") == ok, x


def test_numbers_stay_finite(tok):
    # 1e999 parses to inf, which json.dumps writes as Infinity: not JSON. The grammar stops at two exponent digits.
    params = {"type": "object", "properties": {"x": {"type": "number"}, "y": {}}}
    for x, ok in (("1e99", True), ("-1.5E-99", True), ("1e999", False)):
        for key in ("x", "y"):
            m = matcher(tok, [{"name": "f", "parameters": params}])
            assert consumes(tok, m, f"<|tool_call>call:f{{{key}:{x}}}<tool_call|>") == ok, (key, x)


def test_a_tool_without_parameters_takes_no_arguments(tok):
    # OpenAI: omitting parameters defines a function with an empty parameter list.
    assert consumes(tok, matcher(tok, [{"name": "ping"}]), "<|tool_call>call:ping{}<tool_call|>")
    assert not consumes(tok, matcher(tok, [{"name": "ping"}]), "<|tool_call>call:ping{a:1}<tool_call|>")
    assert consumes(tok, matcher(tok, [{"name": "ping", "parameters": {}}]), "<|tool_call>call:ping{a:1}<tool_call|>")


def test_recursive_refs_are_followed(tok):
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v"],
        "additionalProperties": False}}, "type": "object", "properties": {"root": {"$ref": "#/$defs/node"}},
        "required": ["root"], "additionalProperties": False}
    m = matcher(tok, [{"name": "t", "parameters": tree}])
    args = {"root": {"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": [{"v": 4}]}]}}
    assert consumes(tok, m, f"<|tool_call>call:t{dumps(args)}<tool_call|>")
    jsonschema.validate(args, tree)
    assert json.loads(json.dumps(args)) == args


# anyOf / oneOf beside other keywords: each alternative holds together with them (a variant's required property,
# its own properties, under the object's common required ones).
VARIANTS = {
    "required_variants": {"type": "object", "properties": {"kind": {"enum": ["a", "b"]},
                                                           "x": {"type": "integer", "minimum": 0, "maximum": 5},
                                                           "y": {"type": "boolean"}},
                          "required": ["kind"], "anyOf": [{"required": ["x"]}, {"required": ["y"]}],
                          "additionalProperties": False},
    "property_variants": {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}}, "required": ["kind"],
                          "oneOf": [{"properties": {"x": {"type": "integer", "minimum": 0, "maximum": 5}},
                                     "required": ["x"]},
                                    {"properties": {"y": {"type": "boolean"}}, "required": ["y"]}]},
    "true_alternative": {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"],
                         "additionalProperties": False, "anyOf": [True]},
}


def calls_satisfy(tok, schema: dict, rng: random.Random, walks: int = 6) -> None:
    """Random walks of the call grammar of one tool ``f`` with ``schema``: each parses to one call whose arguments
    the jsonschema package accepts."""
    for _ in range(walks):
        m = matcher(tok, [{"name": "f", "parameters": schema}], parallel=False)
        p = parse_output(tok.decode(walk(tok, m, rng), skip_special_tokens=False), tool_names=["f"])
        assert p.error is None and len(p.tool_calls) == 1
        jsonschema.validate(p.tool_calls[0].arguments, schema)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_alternatives_keep_the_keywords_beside_them(tok, name):
    schema = VARIANTS[name]
    calls_satisfy(tok, schema, random.Random(name))
    m = matcher(tok, [{"name": "f", "parameters": schema}])
    assert not consumes(tok, m, "<|tool_call>call:f{x:1}<tool_call|>")  # "kind" is required whatever the variant


@pytest.mark.parametrize("schema", [
    # the variant declares a property the object's additionalProperties: false forbids (no value has it)
    {"type": "object", "properties": {"k": {"type": "boolean"}}, "additionalProperties": False,
     "anyOf": [{"properties": {"x": {"type": "integer"}}, "required": ["x"]}]},
    # a property declared on both sides with different schemas (both would have to hold)
    {"type": "object", "properties": {"x": {"type": "integer"}},
     "anyOf": [{"properties": {"x": {"type": "integer", "minimum": 3}}}]},
])
def test_alternatives_that_cannot_be_joined_are_refused(tok, schema):
    with pytest.raises(ValueError) as e:
        tool_call_grammar([{"name": "f", "parameters": schema}], MARKERS.ids(tok), "required")
    assert str(e.value).startswith("tools[0].function.parameters.anyOf[0]"), str(e.value)


def test_a_pydantic_tagged_union_is_enforced(tok):
    # pydantic writes OpenAPI's "discriminator" beside the oneOf of a tagged union (Field(discriminator="kind")):
    # an annotation, the alternatives enforce it. It was refused as a keyword that cannot be enforced (a 400).
    def pet(kind, prop, schema):
        return {"type": "object", "title": kind.title(), "required": ["kind", prop],
                "properties": {"kind": {"const": kind, "type": "string"}, prop: schema}}
    schema = {"type": "object", "required": ["pet"],
              "$defs": {"Cat": pet("cat", "lives", {"type": "integer", "minimum": 0, "maximum": 9}),
                        "Dog": pet("dog", "good", {"type": "boolean"})},
              "properties": {"pet": {"discriminator": {"propertyName": "kind",
                                                       "mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"}},
                                     "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}], "title": "Pet"}}}
    calls_satisfy(tok, schema, random.Random(0))
    m = matcher(tok, [{"name": "f", "parameters": schema}])
    assert not consumes(tok, m, "<|tool_call>call:f{pet:{kind:<|\"|>cat<|\"|>,good:true}}<tool_call|>")


def test_a_tool_name_may_start_with_a_digit(tok):
    # OpenAI takes function names of letters, digits, "_" and "-" in any order ("2fa_verify"); they were a 400.
    from blockdiff.tools.render import ToolPlan
    params = {"type": "object", "properties": {"code": {"type": "string", "pattern": "[0-9]{6}"}}, "required": ["code"]}
    plan = ToolPlan.from_request([{"type": "function", "function": {"name": "2fa_verify", "parameters": params}}],
                                 "required")
    m = matcher(tok, plan.tools, parallel=False)
    p = parse_output(tok.decode(walk(tok, m, random.Random(0)), skip_special_tokens=False), tool_names=plan.names)
    assert p.error is None and [c.name for c in p.tool_calls] == ["2fa_verify"]
    jsonschema.validate(p.tool_calls[0].arguments, params)
