"""OpenAI ``response_format`` and blockdiff's ``structured_outputs`` request field -> ``SamplingParams``'
``structured_outputs`` (validated and compiled here, so a bad schema is a 400 naming the field).

    {"type": "text"}                                              no constraint
    {"type": "json_object"}                                       any JSON object
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}   JSON valid for the schema (always
                                                                  enforced: "strict" changes nothing)
    "structured_outputs": {"json" | "json_object" | "regex" | "choice" | "grammar": ..., "allow_whitespace"}
    "guided_json" | "guided_regex" | "guided_choice" | "guided_grammar": ...   vLLM's older names for those keys
"""

from __future__ import annotations

from ..structured.spec import compile_spec, normalize
from .errors import bad


def _json_type(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _from_response_format(rf) -> dict | None:
    if not isinstance(rf, dict):
        raise bad(f"'response_format' must be an object with a 'type', got {_json_type(rf)}", "response_format")
    t = rf.get("type")
    if t == "text":
        return None
    if t == "json_object":
        return {"json_object": True}
    if t == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad("'response_format.json_schema' must be an object with 'name' and 'schema'",
                      "response_format.json_schema")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise bad("'response_format.json_schema.name' must be a string", "response_format.json_schema.name")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad("'response_format.json_schema.strict' must be a boolean",
                      "response_format.json_schema.strict")
        schema = js.get("schema")
        if schema is None:
            return {"json_object": True}  # OpenAI: no schema given, any JSON object
        if not isinstance(schema, dict):
            raise bad(f"'response_format.json_schema.schema' must be a JSON Schema object, got "
                      f"{_json_type(schema)}", "response_format.json_schema.schema")
        return {"json": schema}
    raise bad(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {t!r}",
              "response_format.type")


# vLLM's older request fields -> the structured_outputs key each one is.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


def structured_outputs(body: dict) -> dict | None:
    """The request's constraint (normalized, compiled once here) or None. Raises ``APIError`` 400."""
    given = []  # (field, spec) per constraint field the request sent
    if body.get("response_format") is not None:
        spec = _from_response_format(body["response_format"])
        if spec is not None:
            given.append(("response_format", spec))
    if body.get("structured_outputs") is not None:
        given.append(("structured_outputs", body["structured_outputs"]))
    given += [(field, {key: body[field]}) for field, key in GUIDED_FIELDS.items() if body.get(field) is not None]
    if not given:
        return None
    if len(given) > 1:
        names = [f"'{field}'" for field, _ in given]
        raise bad(f"send either {' or '.join(names)}, not both" if len(names) == 2 else
                  f"send only one of {', '.join(names)}", given[-1][0])
    param, spec = given[0]
    try:
        spec = normalize(spec)
        compile_spec(spec)
    except ValueError as e:
        msg = str(e)
        if param == "response_format":  # name the field the client sent
            msg = msg.replace("structured_outputs.json:", "response_format.json_schema.schema:")
        elif param in GUIDED_FIELDS:
            msg = msg.replace(f"structured_outputs.{GUIDED_FIELDS[param]}", param)
        raise bad(msg, param) from None
    return spec
