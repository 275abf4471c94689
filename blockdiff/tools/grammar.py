"""Tools' JSON Schemas -> a Lark grammar (llguidance) for calls in Gemma 4's syntax, so a constrained call
always parses and its arguments validate against its tool's schema.

The arguments are not JSON (keys are bare, strings sit between ``<|"|>`` tokens), so llguidance's own JSON
Schema compiler cannot be embedded with ``%json``: this module writes the grammar for the subset of JSON Schema
that a grammar can enforce exactly, and refuses (``ValueError`` naming the schema path) what it cannot:

- ``type`` (one or a list), ``enum``, ``const``, ``anyOf`` / ``oneOf`` (as alternatives, each joined with the
  keywords beside it: ``required`` and ``properties`` add up, the rest must agree), ``allOf`` with one
  member, ``$ref`` to ``#/$defs/...`` or ``#/definitions/...`` (recursion allowed);
- objects: ``properties`` in their declared order, ``required`` ones always, the others optional; without
  ``properties``, any keys (values per ``additionalProperties`` when it is a schema);
- arrays: ``items``, ``minItems``, ``maxItems``; strings: ``minLength``, ``maxLength``, ``pattern``;
- integers and numbers: ``minimum`` / ``maximum`` (exclusive too) and ``multipleOf``, through llguidance's own JSON
  Schema compiler (``%json``: a number is written the same in both syntaxes). ``uniqueItems``, ``not``, ``if``,
  ``patternProperties``... are refused. ``format`` is an annotation (as in the jsonschema package's default), and
  so is OpenAPI's ``discriminator``.

Special tokens are written by id (``<[52]>``): the markers' ids come from the checkpoint's tokenizer.
"""

from __future__ import annotations

import json
import math
import re

from .syntax import dumps

# Numbers are bounded in length: a weak model cannot write digits forever, every JSON number of this size fits.
INT = r"-?(0|[1-9][0-9]{0,15})"
# Exponents of at most two digits: every such number is a finite double (1e999 would be Infinity, not JSON).
LARGEST = 2 ** 53 - 1  # a bound a double holds exactly (llguidance reads bounds as doubles)
NUM = INT + r"(\.[0-9]{1,15})?([eE][+-]?[0-9]{1,2})?"
ANNOTATIONS = {"description", "title", "default", "examples", "format", "$schema", "$id", "$comment",
               "deprecated", "readOnly", "writeOnly", "additionalProperties", "strict", "nullable",
               "contentMediaType", "contentEncoding", "$defs", "definitions",
               "discriminator"}  # OpenAPI's (pydantic writes it on tagged unions): the oneOf alternatives enforce it
NUMERIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
HANDLED = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "required", "items",
           "minItems", "maxItems", "minLength", "maxLength", "pattern", *NUMERIC}


def _repeat(lo: int, hi: int | None) -> str:
    """The regex repetition of a length range."""
    return "*" if (not lo and hi is None) else f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"


def _lit(s: str) -> str:
    return json.dumps(s)


class _Builder:
    def __init__(self, ids: dict[str, int], root_schemas: dict):
        self.q = f"<[{ids['string']}]>"
        self.rules: dict[str, str] = {}
        self.roots = root_schemas  # tool name -> its parameters schema (for $ref)
        self.n = 0
        self._refs: dict[tuple[str, str], str] = {}

    def rule(self, body: str, hint: str = "r") -> str:
        self.n += 1
        name = f"{re.sub(r'[^a-z0-9_]', '_', hint.lower())[:24]}_{self.n}"
        self.rules[name] = body
        return name

    # ------------------------------------------------------------------ values
    def value(self, schema, path: str, root: str) -> str:
        """-> a rule name for the values ``schema`` allows."""
        if schema is True or schema == {}:
            return self.any_value()
        if not isinstance(schema, dict):
            raise ValueError(f"{path}: a schema must be an object, got {type(schema).__name__}")
        unknown = sorted(set(schema) - HANDLED - ANNOTATIONS)
        if unknown:
            raise ValueError(f"{path}: {', '.join(unknown)} cannot be enforced on tool-call arguments (supported: "
                             "type, enum, const, anyOf, oneOf, $ref, properties, required, items, minItems, maxItems,"
                             " minLength, maxLength, pattern, (exclusive) minimum/maximum, multipleOf)")
        if "$ref" in schema:
            return self.ref(schema["$ref"], path, root)
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise ValueError(f"{path}.allOf: only a single-member allOf can be enforced")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            if set(rest) - ANNOTATIONS:
                raise ValueError(f"{path}.allOf: allOf beside other keywords cannot be enforced")
            return self.value(parts[0], f"{path}.allOf[0]", root)
        if "const" in schema:
            return self.rule(self.literal(schema["const"], f"{path}.const"), "const")
        if "enum" in schema:
            vals = schema["enum"]
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"{path}.enum must be a non-empty array")
            return self.rule(" | ".join(self.literal(v, f"{path}.enum") for v in vals), "enum")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = schema[key]
                if not isinstance(alts, list) or not alts:
                    raise ValueError(f"{path}.{key} must be a non-empty array")
                base = {k: v for k, v in schema.items() if k != key}
                names = [self.value(self.merge(base, a, f"{path}.{key}[{i}]"), f"{path}.{key}[{i}]", root)
                         for i, a in enumerate(alts)]
                return self.rule(" | ".join(names), key)
        t = schema.get("type")
        if t is None:
            t = self.guess_type(schema)
        types = t if isinstance(t, list) else [t]
        if not types:
            raise ValueError(f"{path}.type must not be empty")
        alts = [self.typed(x, schema, path, root) for x in types]
        return alts[0] if len(alts) == 1 else self.rule(" | ".join(alts), "types")

    @staticmethod
    def merge(base: dict, alt, path: str):
        """One anyOf / oneOf alternative with the keywords beside it (a value must satisfy both): ``required`` and
        ``properties`` join, the rest must agree. ``ValueError`` where the two cannot be enforced as one schema."""
        if alt is True:
            return base
        if not set(base) - ANNOTATIONS and "additionalProperties" not in base:
            return alt
        if not isinstance(alt, dict):
            raise ValueError(f"{path}: a schema must be an object, got {type(alt).__name__}")
        out = dict(base)
        for k, v in alt.items():
            if k == "required" and isinstance(v, list) and isinstance(base.get(k), list):
                out[k] = list(dict.fromkeys(base[k] + v))
            elif k == "properties" and isinstance(v, dict) and isinstance(base.get(k), dict):
                for name in set(v) & set(base[k]):
                    if v[name] != base[k][name]:
                        raise ValueError(f"{path}.properties.{name}: declared beside and inside the alternative "
                                         "with different schemas: cannot be enforced on tool-call arguments")
                out[k] = {**base[k], **v}
            elif k in base and base[k] != v and k not in ANNOTATIONS - {"additionalProperties"}:
                raise ValueError(f"{path}: {k} differs beside and inside the alternative: cannot be enforced on "
                                 "tool-call arguments")
            else:
                out[k] = v
        # additionalProperties on one side holds the other side's properties to its own list (or its schema)
        for a, b in ((base, alt), (alt, base)):
            extra = set(b.get("properties") or {}) - set(a.get("properties") or {})
            if a.get("additionalProperties", True) is not True and extra:
                raise ValueError(f"{path}: {sorted(extra)} are declared on one side of the alternative but the "
                                 "other side's additionalProperties does not allow them: cannot be enforced on "
                                 "tool-call arguments")
        if False in (base.get("additionalProperties"), alt.get("additionalProperties")):
            out["additionalProperties"] = False
        return out

    @staticmethod
    def guess_type(schema: dict):
        if "properties" in schema or "required" in schema:
            return "object"
        if "items" in schema or "minItems" in schema or "maxItems" in schema:
            return "array"
        if {"minLength", "maxLength", "pattern"} & set(schema):
            return "string"
        if set(NUMERIC) & set(schema):
            return "number"
        return None

    def typed(self, t, schema: dict, path: str, root: str) -> str:
        if t is None:
            return self.any_value()
        if t == "string":
            return self.string(schema, path)
        if t in ("integer", "number"):
            return self.number(t, schema, path)
        if t == "boolean":
            return self.rule('"true" | "false"', "bool")
        if t == "null":
            return self.rule('"null"', "null")
        if t == "array":
            return self.array(schema, path, root)
        if t == "object":
            return self.obj(schema, path, root)
        raise ValueError(f"{path}.type: unknown type {t!r}")

    def literal(self, v, path: str) -> str:
        """A JSON value written exactly, in Gemma's syntax (strings around their delimiter tokens)."""
        if isinstance(v, str):
            return f"{self.q} {_lit(v)} {self.q}" if v else f"{self.q} {self.q}"
        if isinstance(v, list):
            return '"[" ' + ' "," '.join(f"({self.literal(x, path)})" for x in v) + ' "]"'
        if isinstance(v, dict):
            items = [f'{_lit(str(k) + ":")} ({self.literal(x, path)})' for k, x in v.items()]
            return '"{" ' + ' "," '.join(items) + ' "}"'
        try:
            return _lit(dumps(v))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def string(self, schema: dict, path: str) -> str:
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        for k, v in (("minLength", lo), ("maxLength", hi)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{path}.{k} must be a non-negative integer")
        if hi is not None and hi < lo:
            raise ValueError(f"{path}: maxLength is below minLength")
        if "pattern" in schema:
            pat = schema["pattern"]
            if not isinstance(pat, str):
                raise ValueError(f"{path}.pattern must be a string")
            # A full match of the pattern also satisfies JSON Schema's search semantics.
            core = pat[1:] if pat.startswith("^") else pat
            core = core[:-1] if core.endswith("$") and not core.endswith("\\$") else core
            if "/" in core:
                core = core.replace("/", "\\/")
            body = f"/{core}/"
            if lo or hi is not None:  # both: llguidance intersects the two lexemes (a terminal with "&")
                self.n += 1
                name = f"STR_{self.n}"
                self.rules[name] = f"{body} & /(.|\\n){_repeat(lo, hi)}/"
                body = name
        else:
            body = f"/(.|\\n){_repeat(lo, hi)}/"
        return self.rule(f"{self.q} {body} {self.q}", "str")

    def number(self, t: str, schema: dict, path: str) -> str:
        """An integer or number. Bounds and ``multipleOf`` go to llguidance's own JSON Schema compiler (``%json``):
        a number is written the same in Gemma's syntax as in compact JSON, so its rule fits here exactly."""
        numeric = {k: schema[k] for k in NUMERIC if k in schema}
        for k, v in numeric.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                raise ValueError(f"{path}.{k} must be a number")
        if numeric.get("multipleOf", 1) <= 0:
            raise ValueError(f"{path}.multipleOf must be greater than 0")
        if not numeric:  # bounded in length: a weak model cannot write digits forever
            return self.rule(f"/{INT if t == 'integer' else NUM}/", "int" if t == "integer" else "number")
        lo = [v for k, v in numeric.items() if k in ("minimum", "exclusiveMinimum")]
        hi = [v for k, v in numeric.items() if k in ("maximum", "exclusiveMaximum")]
        if lo and hi and (max(lo) > min(hi) or (max(lo) == min(hi) and ("exclusiveMinimum" in numeric or
                                                                        "exclusiveMaximum" in numeric))):
            raise ValueError(f"{path}: no {t} satisfies the bounds")
        if t == "integer" and lo and hi:
            a = max([math.ceil(v) for k, v in numeric.items() if k == "minimum"] +
                    [math.floor(v) + 1 for k, v in numeric.items() if k == "exclusiveMinimum"])
            b = min([math.floor(v) for k, v in numeric.items() if k == "maximum"] +
                    [math.ceil(v) - 1 for k, v in numeric.items() if k == "exclusiveMaximum"])
            if b < a:
                raise ValueError(f"{path}: no integer satisfies the bounds")
        # The open side capped (as INT caps unbounded numbers): a weak model cannot write digits forever.
        limit = {"minimum": -LARGEST, "maximum": LARGEST}
        if "minimum" in numeric or "exclusiveMinimum" in numeric:
            del limit["minimum"]
        if "maximum" in numeric or "exclusiveMaximum" in numeric:
            del limit["maximum"]
        return self.rule("%json " + json.dumps({"type": t, **limit, **numeric}), t)

    def array(self, schema: dict, path: str, root: str) -> str:
        item = self.value(schema.get("items", {}), f"{path}.items", root)
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        for k, v in (("minItems", lo), ("maxItems", hi)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{path}.{k} must be a non-negative integer")
        if hi is not None and hi < lo:
            raise ValueError(f"{path}: maxItems is below minItems")
        if hi == 0:
            return self.rule('"[" "]"', "arr")
        more = f'("," {item})' + ("*" if hi is None else f"{{{max(lo - 1, 0)},{hi - 1}}}")
        if lo > 1:
            more = f'("," {item})' + ("{" + str(lo - 1) + ",}" if hi is None else f"{{{lo - 1},{hi - 1}}}")
        inner = f"{item} {more}"
        return self.rule(f'"[" ({inner})? "]"' if lo == 0 else f'"[" {inner} "]"', "arr")

    def obj(self, schema: dict, path: str, root: str) -> str:
        props = schema.get("properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"{path}.required must be an array of strings")
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise ValueError(f"{path}.properties must be an object")
        props = dict(props)
        undeclared = [r for r in required if r not in props]
        if undeclared and schema.get("additionalProperties", True) is False:
            raise ValueError(f"{path}.required: {undeclared} are required but additionalProperties is false and "
                             "they are not in properties (no object satisfies it)")
        for r in undeclared:  # required but undeclared: any value
            props[r] = {}
        if not props:
            extra = schema.get("additionalProperties", True)
            if extra is False:
                return self.rule('"{" "}"', "obj")
            return self.any_object(self.value(extra if isinstance(extra, dict) else {}, f"{path}.additionalProperties",
                                              root))
        pairs = []
        for k, s in props.items():
            if not re.fullmatch(r"[^\s:{}\[\],<>]+", k):
                raise ValueError(f"{path}.properties: the key {k!r} cannot be written bare in a Gemma tool call")
            pairs.append((_lit(k + ":") + " " + self.value(s, f"{path}.properties.{k}", root), k in required))
        # tail(i, first): the properties from i on, after nothing (first) or after a property (comma first).
        memo: dict[tuple[int, bool], str] = {}

        def tail(i: int, first: bool) -> str:
            if i == len(pairs):
                return ""
            if (i, first) in memo:
                return memo[(i, first)]
            kv, req = pairs[i]
            sep = "" if first else '"," '
            rest = tail(i + 1, False)
            take = f"{sep}{kv} {rest}".strip()
            if req:
                body = take
            else:
                skip = tail(i + 1, first)
                body = f"({take})" + (f" | {skip}" if skip else " | ")
                if not skip:
                    body = f"({take})?"
            name = self.rule(body, "props")
            memo[(i, first)] = name
            return name

        return self.rule(f'"{{" {tail(0, True)} "}}"', "obj")

    def ref(self, ref, path: str, root: str) -> str:
        m = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        if not m:
            raise ValueError(f"{path}.$ref: only '#/$defs/NAME' or '#/definitions/NAME' can be followed, got {ref!r}")
        key = (root, ref)
        if key in self._refs:
            return self._refs[key]
        target = (self.roots[root].get(m.group(1)) or {}).get(m.group(2))
        if target is None:
            raise ValueError(f"{path}.$ref: {ref} is not defined")
        name = self.rule("", "ref")  # placeholder first: a recursive schema refers back to it
        self._refs[key] = name
        self.rules[name] = self.value(target, f"{path}.$ref", root)
        return name

    # ------------------------------------------------------------------ any value
    def any_value(self) -> str:
        if "any_value" not in self.rules:
            self.rules["any_value"] = "any_string | any_number | \"true\" | \"false\" | \"null\" | any_obj | any_arr"
            self.rules["any_string"] = f"{self.q} /(.|\\n)*/ {self.q}"
            self.rules["any_number"] = f"/{NUM}/"
            self.rules["any_obj"] = '"{" (any_kv ("," any_kv)*)? "}"'
            self.rules["any_kv"] = r'/[A-Za-z_][A-Za-z0-9_]*/ ":" any_value'
            self.rules["any_arr"] = '"[" (any_value ("," any_value)*)? "]"'
        return "any_value"

    def any_object(self, value_rule: str) -> str:
        kv = self.rule(r'/[A-Za-z_][A-Za-z0-9_]*/ ":" ' + value_rule, "kv")
        return self.rule(f'"{{" ({kv} ("," {kv})*)? "}}"', "obj")


def answer_rule(spec: dict) -> str:
    """The Lark body of an answer in the form a ``structured_outputs`` spec asks (json / json_object / choice),
    for "auto" beside calls. ``ValueError`` for the kinds that cannot be embedded (regex, grammar)."""
    if "json" in spec or "json_object" in spec:
        schema = spec["json"] if "json" in spec else {"type": "object"}
        guidance = {**schema.get("x-guidance", {}), "whitespace_flexible": bool(spec.get("allow_whitespace"))}
        return "%json " + json.dumps({**schema, "x-guidance": guidance})
    if "choice" in spec:
        return " | ".join(_lit(c) for c in spec["choice"])
    raise ValueError("only a JSON answer (response_format json_schema / json_object, structured_outputs json / "
                     "json_object / choice) can be combined with tool calls")


def _think(ids: dict[str, int]) -> str:
    return f"<[{ids['channel_open']}]> \"thought\\n\" THOUGHT <[{ids['channel_close']}]>"


def thought_then_answer(ids: dict[str, int], answer: str) -> str:
    """The Lark grammar of an optional thinking channel, then an answer (a rule body from ``answer_rule``)."""
    return f"start: think? answer\nthink: {_think(ids)}\nTHOUGHT: /(.|\\n)*/\nanswer: {answer}\n"


def tool_call_grammar(tools: list[dict], ids: dict[str, int], mode: str, parallel: bool = True,
                      thinking: bool = False, answer: str | None = None) -> str:
    """The Lark grammar of a constrained output.

    ``tools``: [{"name", "parameters"}]; ``ids``: marker name -> token id (``Markers.ids``); ``mode``: "required"
    (one or more calls, ``parallel``) or "auto" (free text, then optionally calls; with ``answer``, a Lark rule
    body from ``answer_rule``: either that answer or calls). With ``thinking`` the output may open with one
    thinking channel (required: must, since the template asked the model to think).
    Raises ``ValueError`` naming ``tools[i].function.parameters...`` for a schema it cannot enforce.
    """
    if mode not in ("required", "auto"):
        raise ValueError(f"mode must be 'required' or 'auto', got {mode!r}")
    b = _Builder(ids, {t["name"]: t.get("parameters") or {} for t in tools})
    calls = []
    for i, t in enumerate(tools):
        params = t.get("parameters")
        if params is None:  # OpenAI: "omitting parameters defines a function with an empty parameter list"
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        elif params == {}:  # the empty schema: any arguments
            params = {"type": "object", "properties": {}}
        where = t.get("where", f"tools[{i}].function.parameters")
        if isinstance(params, dict) and params.get("type", "object") != "object":
            raise ValueError(f"{where}: a tool's parameters must be an object schema")
        args = b.value(params, where, t["name"])
        calls.append(f'"call:" {_lit(t["name"])} {args}')
    b.rules["call"] = f"<[{ids['call_open']}]> ({' | '.join(calls)}) <[{ids['call_close']}]>"
    b.rules["calls"] = "call+" if parallel else "call"
    think = _think(ids)
    if mode == "required":
        start = ("think " if thinking else "") + "calls"
    else:
        start = ("think? " if thinking else "") + ("TEXT calls?" if answer is None else "(answer | calls)")
    lines = [f"start: {start}", "TEXT: /(.|\\n)*/", "THOUGHT: /(.|\\n)*/"]
    if answer is not None:
        lines.append(f"answer: {answer}")
    if thinking:
        lines.append(f"think: {think}")
    lines += [f"{k}: {v}" for k, v in b.rules.items()]
    return "\n".join(lines) + "\n"
