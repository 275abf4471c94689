"""``structured_outputs``: what a request asks its output to look like, validated and compiled to a grammar.

A spec is a dict with exactly one constraint key and optional options::

    {"json": <JSON Schema dict or its JSON text>}      the output is one JSON value valid for the schema
    {"json_object": True}                              the output is any JSON object
    {"regex": "<pattern>"}                             the whole output matches the regular expression
    {"choice": ["yes", "no", ...]}                     the output is exactly one of the strings
    {"grammar": "<Lark or GBNF grammar>"}              the output is a sentence of the context-free grammar
    "allow_whitespace": bool (json / json_object only) free whitespace between JSON tokens (default False:
                                                       compact JSON, so a model cannot wander in whitespace)

``compile_spec(spec)`` returns the llguidance grammar text (no tokenizer needed) or raises ``ValueError`` naming
the key and the problem; ``LLMatcher`` later binds it to the checkpoint's tokenizer. The engine is llguidance
(see docs/structured-output.md for why).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
import json

from ..sampling.fields import json_text

CONSTRAINT_KEYS = ("json", "json_object", "regex", "choice", "grammar")
OPTION_KEYS = ("allow_whitespace",)
MAX_CHOICES = 1024
MAX_SPEC_CHARS = 1 << 20


def _llg():
    import llguidance
    return llguidance


def normalize(spec) -> dict:
    """Check the shape of a ``structured_outputs`` value; returns a canonical copy (schema as a dict)."""
    if not isinstance(spec, dict):
        raise ValueError(f"structured_outputs must be an object with one of {list(CONSTRAINT_KEYS)}, "
                         f"got {type(spec).__name__}")
    unknown = [k for k in spec if k not in CONSTRAINT_KEYS + OPTION_KEYS]
    if unknown:
        raise ValueError(f"structured_outputs has unknown key(s) {unknown}; use one of {list(CONSTRAINT_KEYS)} "
                         f"(options: {list(OPTION_KEYS)})")
    keys = [k for k in CONSTRAINT_KEYS if k in spec and spec[k] is not None and spec[k] is not False]
    if len(keys) != 1:
        raise ValueError(f"structured_outputs must set exactly one of {list(CONSTRAINT_KEYS)}, got "
                         f"{keys or 'none'}")
    key = keys[0]
    value = spec[key]
    out: dict = {}
    ws = spec.get("allow_whitespace", False)
    if ws is None:
        ws = False
    if not isinstance(ws, bool):
        raise ValueError(f"structured_outputs.allow_whitespace must be a boolean, got {type(ws).__name__}")
    if ws and key not in ("json", "json_object"):
        raise ValueError(f"structured_outputs.allow_whitespace applies to json and json_object, not {key}")
    if key == "json":
        if isinstance(value, str):
            if len(value) > MAX_SPEC_CHARS:
                raise ValueError(f"structured_outputs.json is longer than {MAX_SPEC_CHARS} characters")
            try:
                value = json_text(value)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs.json must be a JSON Schema object, got {type(value).__name__}")
        out["json"] = value
    elif key == "json_object":
        if value is not True:
            raise ValueError(f"structured_outputs.json_object must be true, got {value!r}")
        out["json_object"] = True
    elif key in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"structured_outputs.{key} must be a non-empty string")
        if len(value) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{key} is longer than {MAX_SPEC_CHARS} characters")
        out[key] = value
    else:  # choice
        if not isinstance(value, (list, tuple)) or not value or \
                not all(isinstance(c, str) and c for c in value):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if len(value) > MAX_CHOICES:
            raise ValueError(f"structured_outputs.choice holds {len(value)} strings; at most {MAX_CHOICES}")
        out["choice"] = list(value)
    if ws:
        out["allow_whitespace"] = True
    return out


def kind(spec: dict) -> str:
    return next(k for k in CONSTRAINT_KEYS if k in spec)


# The prefix-cache salt of the request being prepared (``Server._prepare`` sets it, with its tenant's): compiled
# grammars are cached per salt, so how fast a schema is compiled (cached or not) never tells one tenant whether
# another sent it.
SALT: ContextVar[str | None] = ContextVar("blockdiff_structured_salt", default=None)


@contextmanager
def compiling_for(salt: str | None):
    """Grammars compiled in this block are cached under ``salt`` (a request's prefix-cache salt)."""
    token = SALT.set(salt)
    try:
        yield
    finally:
        SALT.reset(token)


def compile_spec(spec: dict) -> str:
    """Normalized spec -> llguidance grammar text. Raises ``ValueError`` naming what is wrong."""
    return _compile(json.dumps([SALT.get(), spec]))  # keys in their order: a schema's properties are written in it


@functools.lru_cache(maxsize=256)
def _compile(key: str) -> str:
    llg = _llg()
    spec = json.loads(key)[1]
    k = kind(spec)
    where = f"structured_outputs.{k}"
    try:
        if k in ("json", "json_object"):
            schema = spec["json"] if k == "json" else {"type": "object"}
            # Compact by default: no whitespace between tokens (a random or weak model could otherwise emit
            # whitespace forever); "allow_whitespace" restores JSON's free whitespace.
            opts = {"whitespace_flexible": bool(spec.get("allow_whitespace"))}
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=opts)
        elif k == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(spec["regex"])
        elif k == "choice":
            lark = "start: " + " | ".join(json.dumps(c) for c in spec["choice"])
            grammar = llg.LLMatcher.grammar_from_lark(lark)
        else:
            grammar = llg.grammar_from("grammar", spec["grammar"])  # Lark, or GBNF converted to Lark
    except Exception as e:  # ValueError mostly; anything the converter raises is still the input's fault
        raise ValueError(f"{where}: {_one_line(str(e))}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, None)
    if is_error:
        msg = _one_line(messages[0]) if messages else "invalid"
        what = {"json": "the JSON Schema is not supported", "json_object": "invalid",
                "regex": "the regular expression is invalid", "choice": "invalid choices",
                "grammar": "the grammar is invalid"}[k]
        raise ValueError(f"{where}: {what}: {msg}")
    return grammar


def _one_line(msg: str) -> str:
    """llguidance's message on one line (errors are one line, docs/serving.md): its first line, then the regex
    parser's ``error:`` lines, without the caret drawings of the pattern and the grammar."""
    lines = [line.strip() for line in msg.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid"
    errors = [line[len("error:"):].strip() for line in lines[1:] if line.startswith("error:")]
    return " ".join([lines[0]] + errors)[:300]
