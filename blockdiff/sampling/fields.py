"""The sampling fields of a request, declared once: types, bounds and descriptions as pydantic ``Field``s.

``SamplingFields`` is the one source of truth for what a sampling field may hold. ``SamplingParams.validate``
(the Python API) checks its values with it and raises ``ParamError`` (a ``ValueError`` that carries the field's
name in ``.param``); the server's request models (``blockdiff/server/protocol.py``) inherit the same fields, so
``/openapi.json`` documents exactly these bounds. Rules between fields (t_max > t_min, what cannot be combined)
live in ``SamplingParams.validate`` and reach HTTP clients as a 400 naming the field, through ``ParamError.param``.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

MAX_LOGPROBS = 20  # top alternatives per output token
MAX_STOP = 16  # stop strings per request
# The smallest temperature a canvas may start from (t_max after the ``temperature`` factor). The coldest step
# runs at >= t_max / max_denoising_steps >= 1e-10, where soft-capped logits (|l| <= ~30) / t stay finite in fp32;
# 1e-45 or 1e-300 round to 0 in fp32 and turn the distribution into NaN (all-<pad> output).
MIN_TEMPERATURE = 1e-6
# The largest t_min / t_max: far past any useful temperature (soft-capped logits / 1e6 are uniform to ~3e-5), and
# x2 (the largest ``temperature`` factor) still finite in fp32. Beyond fp32's 3.4e38 the step temperature is
# infinity: the distribution turns exactly uniform (every argmax the <pad> id 0) or, where inf * 0 meets it in
# the schedule, NaN (a 500).
MAX_TEMPERATURE = 1e6
# The smallest repetition_penalty: positive logits are divided by it before tempering (by >= 1e-10), so a
# penalty that rounds to 0 in fp32 (5e-324) or is tiny (1e-30) overflows the logits to infinity (a 500). At 0.01,
# soft-capped logits (|l| <= ~30) stay below 3e13 after both divisions.
MIN_REPETITION_PENALTY = 0.01
# ``temperature`` is 0 (greedy) or a factor in [MIN_TEMPERATURE_FACTOR, MAX_TEMPERATURE_FACTOR] on t_max / t_min.
MIN_TEMPERATURE_FACTOR = 0.01
MAX_TEMPERATURE_FACTOR = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_CACHE_SALT_CHARS = 1024
# Levels of arrays and objects in a request body, and in JSON text a field holds (``json_text``): deeper JSON
# overflows the recursion of the parser or of what walks the value after it (a template, a schema compiler).
MAX_JSON_DEPTH = 64


class ParamError(ValueError):
    """A ``ValueError`` about one request field: ``param`` names it (the server answers a 400 with that param)."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class SubfieldError(ValueError):
    """A field validator's error about something inside the field: ``subpath`` (``"[1].image_url.url"``) is added
    to the field's path in the error's ``param``, so the param names what the message names."""

    def __init__(self, message: str, subpath: str):
        super().__init__(message)
        self.subpath = subpath


def _integral(v):
    # JSON has one number type: 16.0 is the integer 16, 16.5 is not an integer.
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# An integer field (16.0 is accepted as 16 by ``IntegralFloats``; a validator on the type itself would hide the
# field's bounds from the JSON Schema).
Int = int


class IntegralFloats(BaseModel):
    """Base of the request models: a float with no fraction sent for a top-level integer field is that integer."""

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data):
        if isinstance(data, dict):
            ints = _int_fields(cls)
            if any(k in ints and isinstance(v, float) for k, v in data.items()):
                data = {k: _integral(v) if k in ints else v for k, v in data.items()}
        return data


_INT_FIELDS: dict[type, frozenset] = {}


def _int_fields(cls) -> frozenset:
    if cls not in _INT_FIELDS:
        _INT_FIELDS[cls] = frozenset(name for name, f in cls.model_fields.items()
                                     if f.annotation is int or int in get_args(f.annotation))
    return _INT_FIELDS[cls]
Num = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]
StopText = Annotated[str, Field(min_length=1)]


def _temperature(v: float) -> float:
    if v != 0 and not MIN_TEMPERATURE_FACTOR <= v <= MAX_TEMPERATURE_FACTOR:
        raise invalid(f"'temperature' must be 0 (greedy) or in [{MIN_TEMPERATURE_FACTOR}, {MAX_TEMPERATURE_FACTOR}]"
                      f" (a factor on the t_max -> t_min schedule), got {v!r}", "temperature")
    return v


def _stop(v):
    if v is not None and not isinstance(v, (str, list)):
        raise invalid(f"'stop' must be a string or an array of strings, got {json_type(v)}", "stop")
    if isinstance(v, list) and len(v) > MAX_STOP:
        raise invalid(f"'stop' holds {len(v)} strings; at most {MAX_STOP}", "stop")
    return [v] if isinstance(v, str) else v


def _structured_outputs_schema(schema: dict) -> None:
    """What ``blockdiff.structured.spec.normalize`` accepts, for /openapi.json: exactly one constraint key, no
    other keys (imported here, when the document is built: the sampling fields load without the grammar code)."""
    from ..structured.spec import CONSTRAINT_KEYS, MAX_CHOICES, MAX_SPEC_CHARS
    text = {"type": "string", "minLength": 1, "maxLength": MAX_SPEC_CHARS}
    unset = {"enum": [None, False]}  # normalize counts a key holding null or false as not given
    schema["anyOf"] = [{"type": "object", "additionalProperties": False, "properties": {
        "json": {"anyOf": [{"type": "object"}, text, unset]}, "json_object": {"enum": [True, False, None]},
        "regex": {"anyOf": [text, unset]}, "grammar": {"anyOf": [text, unset]},
        "choice": {"anyOf": [{"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                              "maxItems": MAX_CHOICES}, unset]},
        "allow_whitespace": {"type": ["boolean", "null"]}},
        "oneOf": [{"required": [k], "properties": {k: {"not": unset}}} for k in CONSTRAINT_KEYS]}, {"type": "null"}]


def _text_template_schema(schema: dict) -> None:
    """A template holds at least one hole (``blockdiff.structured.infill.HOLE``; a JSON Schema pattern matches
    anywhere in the string)."""
    from ..structured.infill import HOLE
    schema["anyOf"] = [{"type": "string", "minLength": 1, "pattern": HOLE.pattern}, {"type": "null"}]


class SamplingFields(IntegralFloats):
    """Fields shared by ``SamplingParams`` and both HTTP endpoints (strict: no "16" for 16; unknown keys are
    ignored, as OpenAI-compatible servers do). To add one: declare it here with its bounds and description, and as
    a dataclass field of ``SamplingParams``; cross-field rules go to ``SamplingParams.validate``."""

    model_config = ConfigDict(extra="ignore", strict=True)

    max_tokens: Int | None = Field(None, ge=1, le=1_000_000, description="output tokens at most (unset: the "
                                   "checkpoint's max_new_tokens, capped to what fits the context)")
    seed: Int | None = Field(None, ge=0, le=2 ** 63 - 1, description="makes the output reproducible")
    stop: Annotated[list[StopText] | StopText | None, BeforeValidator(_stop)] = Field(
        None, description=f"a string or up to {MAX_STOP} strings; the text ends before the first",
        json_schema_extra={"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}, {
            "type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}]})
    # OpenAI's sampling knobs, mapped onto the canvas sampler (docs/serving.md "Sampling").
    temperature: Annotated[Num, AfterValidator(_temperature)] | None = Field(
        None, description="0: greedy (each accepted position takes its most likely token; seeded with 0 when no "
        f"seed is given, so deterministic); otherwise a factor in [{MIN_TEMPERATURE_FACTOR}, "
        f"{MAX_TEMPERATURE_FACTOR}] on the checkpoint's t_max -> t_min schedule (1 or unset: unchanged)",
        json_schema_extra={"anyOf": [{"const": 0}, {"type": "number", "minimum": MIN_TEMPERATURE_FACTOR,
                                                    "maximum": MAX_TEMPERATURE_FACTOR}, {"type": "null"}]})
    presence_penalty: Num | None = Field(None, ge=-2, le=2, description="subtracted from the logit of every token "
                                         "already in the output (committed canvases)")
    frequency_penalty: Num | None = Field(None, ge=-2, le=2, description="subtracted from a token's logit once per "
                                          "occurrence in the output (committed canvases)")
    repetition_penalty: Num | None = Field(None, ge=MIN_REPETITION_PENALTY, le=10, description="tokens of the "
                                           "prompt or the output: positive logits divided by it, negative ones "
                                           "multiplied (1: off)")
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS, allow_inf_nan=False)]] | None = \
        Field(None, description="token id (as a string) -> a bias in [-100, 100] added to its logits at every "
              "denoising step", json_schema_extra={"anyOf": [  # keys: token ids only (beside the field's anyOf,
                  # "additionalProperties": false alone forbade every key: the document allowed only {})
                  {"type": "object", "additionalProperties": False, "patternProperties": {"^[0-9]{1,9}$": {
                      "type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS}}},
                  {"type": "null"}]})
    # Truncation of the tempered distribution a token is drawn from (see docs/serving.md "Sampling").
    top_p: Num | None = Field(None, gt=0, le=1, description="draw from the smallest most-likely-first set of tokens "
                              "holding this much probability (1 or unset: no cut)")
    top_k: Int | None = Field(None, ge=-1, le=2 ** 31 - 1, description="draw from the k most likely tokens "
                              "(unset, 0 or -1: no cut)")
    min_p: Num | None = Field(None, ge=0, le=1, description="draw only tokens with p >= min_p * the largest p "
                              "(0 or unset: no cut)")
    # blockdiff's diffusion knobs (unset: the checkpoint's generation_config.json).
    max_denoising_steps: Int | None = Field(None, ge=1, le=10_000, description="denoising steps per canvas at most")
    stability_threshold: Int | None = Field(None, ge=0, le=10_000,
                                            description="adaptive stop: argmax unchanged this many steps")
    entropy_bound: Num | None = Field(None, gt=0, description="per-step acceptance budget (summed entropy)")
    confidence_threshold: Num | None = Field(None, gt=0, description="adaptive stop: mean entropy below this")
    t_min: Num | None = Field(None, ge=0, le=MAX_TEMPERATURE, description="temperature at the last denoising step "
                              "(below t_max)")
    t_max: Num | None = Field(None, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="temperature at the first "
                              f"denoising step (in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}]: outside it the tempered "
                              "logits overflow)")
    rng: Literal["default", "reference"] = Field("default", description="'reference': draw random numbers "
                                                 "exactly as the transformers reference does")
    ignore_eos: bool = Field(False, description="keep generating after an EOS token")
    stop_token_ids: list[TokenId] | None = Field(None, description="token ids that end the output")
    allowed_token_ids: list[TokenId] | None = Field(None, min_length=1, description="canvas tokens are drawn only "
                                                    "from these ids")
    canvas_template: list[Annotated[int, Field(ge=-1)]] | None = Field(
        None, description="token ids for the first canvas, -1 where the model is free")
    text_template: str | None = Field(None, min_length=1, description="text with <|hole|> or <|hole:N|> holes laid "
                                      "on the first canvas; the output is the filled template",
                                      json_schema_extra=lambda s: _text_template_schema(s))
    structured_outputs: dict[str, Any] | None = Field(
        None, description="exactly one of json (a JSON Schema, or its JSON text), json_object (true), regex, choice "
        "(strings), grammar (Lark or GBNF); optional allow_whitespace (json only)",
        json_schema_extra=lambda s: _structured_outputs_schema(s))
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS, description="prefix-cache "
                                   "blocks are shared only between requests with the same salt (see docs/serving.md)")
    stream_drafts: bool = Field(False, description="with stream: true, also send the argmax canvas after every "
                                "denoising step (ignored without stream)")
    fast: bool | None = Field(None, description="approximate fast mode: reuse the keys/values of settled canvas "
                              "positions across denoising steps (null: the server's default, see serve --fast)")


class OutputFields(IntegralFloats):
    """Fields ``SamplingParams`` and /v1/completions share (chat spells logprobs differently, and has no suffix)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    suffix: str | None = Field(None, min_length=1, description="fill in the middle: text that follows the "
                               "completion; the output is the middle (one canvas)")
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="return each output token's "
                                 "log-probability and this many most likely alternatives (see docs/serving.md)")


class ParamsFields(SamplingFields, OutputFields):
    """What ``SamplingParams.validate`` checks: the shared fields plus the Python API's own name for max_tokens."""

    max_new_tokens: Int | None = Field(None, ge=1, le=1_000_000)


# ---------------------------------------------------------------------------------------------- error wording
def invalid(message: str, param: str) -> PydanticCustomError:
    """Raised inside a validator: a complete message for ``param`` (kept verbatim by ``describe``)."""
    return PydanticCustomError("blockdiff", "{message}", {"message": message, "param": param})


class _NotJSON(Exception):
    """What Python's json reads but JSON is not (as the request body refuses it, ``server/body.py``): NaN and
    Infinity, a number beyond a double (1e400, read as inf), a key given twice in one object. Let through, a tool
    call's arguments reached the prompt as ``{a:nan,b:inf}``."""


def _not_json(literal: str):
    raise _NotJSON(f"{literal} is not a JSON number")


def _finite(literal: str) -> float:
    f = float(literal)
    if f != f or f in (float("inf"), float("-inf")):
        raise _NotJSON(f"{literal[:40]} is beyond a double (at most about 1.8e308)")
    return f


def twice_given(pairs: list) -> str | None:
    """The first key a JSON object's ``(key, value)`` pairs give twice (json's object_pairs_hook), or None."""
    seen = set()
    return next((k for k, _ in pairs if k in seen or seen.add(k)), None)


def _once(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _NotJSON(f"the key {twice_given(pairs)!r} is given twice in one object")
    return out


def json_text(text: str):
    """The value of JSON text a field holds (a tool call's ``arguments``, a schema sent as a string), read within the
    limits of a request body: at most ``MAX_JSON_DEPTH`` levels of arrays and objects, integers Python can read. A
    ``ValueError`` whose message completes "<field> ..." otherwise."""
    too_deep = f"nests too deeply: at most {MAX_JSON_DEPTH} levels of arrays and objects"
    try:
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite, object_pairs_hook=_once)
    except RecursionError:
        raise ValueError(too_deep) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON: {e}") from None
    except _NotJSON as e:
        raise ValueError(f"is not valid JSON: {e}") from None
    except ValueError:  # an integer literal past Python's int-string limit
        raise ValueError(f"holds an integer of more than {sys.get_int_max_str_digits()} digits") from None
    stack = [(value, 1)]
    while stack:  # iterative: a deep value must not recurse here either
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(too_deep)
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return value


def json_type(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


# pydantic's names for union members and wrappers in an error's loc: not part of the user's field path.
_TAGS = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|(function|lax|json|is|tagged|union|"
                   r"constrained|nullable|default)[-\w]*\[.*\]|[-\w]+\[.*\])$")


def param_path(loc) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TAGS.match(str(part)):
            out += ("." if out else "") + str(part)
    return out or None


_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "a boolean", "bool_parsing": "a boolean", "string_type": "a string", "list_type": "an array",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
}


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def describe(err: dict) -> tuple[str, str | None]:
    """One pydantic error -> (message naming the field, the field's path)."""
    ctx = err.get("ctx") or {}
    if err["type"] == "blockdiff":
        return ctx["message"], ctx.get("param")
    loc = tuple(err["loc"])
    is_key = len(loc) >= 2 and loc[-1] == "[key]"  # a dict key is at fault: the param is the dict
    param = param_path(loc[:-2] if is_key else loc)
    name = f"'{param}' key" if is_key else f"'{param}'" if param else "the request body"
    v = err.get("input")
    t = err["type"]
    if t == "missing":
        return f"{name} is required", param
    if t == "value_error":  # field validators write the whole sentence
        sub = getattr(ctx.get("error"), "subpath", None)
        return (str(ctx.get("error", err["msg"])).replace("{name}", name).replace("{path}", param or ""),
                param + sub if param and sub else param)
    if t in _WORDS:
        got = _short(v) if t == "finite_number" else json_type(v)
        return f"{name} must be {_WORDS[t]}, got {got}", param
    if t in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[t]
        bound = next(iter(ctx.values()))
        return f"{name} must be {op} {bound}, got {_short(v)}", param
    if t in ("too_short", "too_long", "string_too_short", "string_too_long"):
        short = t.endswith("too_short")
        limit = ctx.get("min_length" if short else "max_length")
        if short and limit == 1:
            return f"{name} must not be empty", param
        unit = "characters" if t.startswith("string") else "items"
        return f"{name} must hold {'at least' if short else 'at most'} {limit} {unit}", param
    if t == "string_pattern_mismatch":
        return f"{name} must match {ctx.get('pattern')}, got {_short(v)}", param
    if t == "tag":  # a union member chosen by a tag (``Discriminator(custom_error_type="tag")``): says what it must be
        return f"{name} {err['msg']}", param
    if t == "literal_error":
        return f"{name} must be one of {ctx.get('expected')}, got {_short(v)}", param
    if t == "recursion_loop":
        return "the request body nests too deeply", param
    msg = re.sub(r"^Value error, ", "", err["msg"])
    return f"{name}: {msg[:1].lower() + msg[1:]}", param


def first_error(e: ValidationError, deepest: bool = False) -> tuple[str, str | None]:
    """The first error of a failed validation (one problem at a time, as OpenAI reports them). ``deepest``: for
    nested unions (a string or a list of tagged items), the error of the member that got furthest, a wrong
    ``type`` first."""
    errs = e.errors(include_url=False)
    # A union that fails every member reports each; the member-specific ones say the least.
    own = [x for x in errs if x["type"] in ("blockdiff", "value_error", "missing", "tag")]
    if deepest:
        def depth(x):
            loc = [p for p in x["loc"] if isinstance(p, int) or not _TAGS.match(str(p))]
            return (bool(loc) and loc[-1] == "type", x in own, len(loc))
        return describe(max(errs, key=depth))
    return describe((own or errs)[0])


def check_fields(model: type[BaseModel], values: dict) -> BaseModel:
    """``values`` validated by ``model``; a ``ParamError`` naming the first field at fault otherwise."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ParamError(*first_error(e)) from None
