"""JSON Schemas for the structured-output tests: every one bounded (strings, arrays and integers bounded, no
additional properties), as OpenAI's strict mode encourages, so even random weights must reach a complete value.

Each covers some of: nested objects, arrays with min/max items, enums, const, integers with bounds, strings with
maxLength and pattern, anyOf, $defs/$ref, optional properties, nullable fields.
"""

S = {"type": "string", "maxLength": 6}
I = {"type": "integer", "minimum": -50, "maximum": 50}


def obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS = {
    "flat_person": obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "nested_address": obj({"name": S, "address": obj({"city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
    "deep_nesting": obj({"a": obj({"b": obj({"c": obj({"d": I})})})}),
    "array_min_max": obj({"xs": {"type": "array", "items": I, "minItems": 2, "maxItems": 4}}),
    "array_exact": obj({"xs": {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3}}),
    "array_of_objects": obj({"people": {"type": "array", "items": obj({"n": S, "k": I}), "minItems": 1,
                                        "maxItems": 2}}),
    "enum_strings": obj({"color": {"enum": ["red", "green", "blue"]}}),
    "enum_mixed": obj({"v": {"enum": [1, "two", None, True, 3.5]}}),
    "const_value": obj({"version": {"const": "v1"}, "n": I}),
    "const_object": obj({"kind": {"const": {"a": 1, "b": [True, None]}}}),
    "integer_bounds": obj({"small": {"type": "integer", "minimum": 3, "maximum": 7},
                           "neg": {"type": "integer", "minimum": -9, "maximum": -1},
                           "excl": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
    "string_maxlength": obj({"s": {"type": "string", "maxLength": 3}, "t": {"type": "string", "minLength": 2,
                                                                              "maxLength": 4}}),
    "string_pattern": obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),
    "pattern_alternatives": obj({"unit": {"type": "string", "pattern": "^(kg|lb|g)$"}, "q": I}),
    "anyof_scalar": obj({"v": {"anyOf": [I, {"type": "boolean"}, {"type": "string", "maxLength": 3}]}}),
    "anyof_objects": obj({"shape": {"anyOf": [obj({"circle": {"type": "integer", "minimum": 1, "maximum": 9}}),
                                              obj({"square": {"type": "integer", "minimum": 1, "maximum": 9}})]}}),
    "defs_ref": {"$defs": {"pt": obj({"x": I, "y": I})}, **obj({"a": {"$ref": "#/$defs/pt"},
                                                                "b": {"$ref": "#/$defs/pt"}})},
    "defs_nested_ref": {"$defs": {"name": {"type": "string", "maxLength": 4},
                                  "person": obj({"first": {"$ref": "#/$defs/name"}, "last": {"$ref": "#/$defs/name"}})},
                        **obj({"owner": {"$ref": "#/$defs/person"}})},
    "optional_props": obj({"id": I, "note": S, "flag": {"type": "boolean"}}, required=["id"]),
    "all_optional": obj({"p": {"type": "boolean"}, "q": {"type": "null"}}, required=[]),
    "nullable_type_list": obj({"maybe": {"type": ["string", "null"], "maxLength": 4}}),
    "nullable_anyof": obj({"maybe": {"anyOf": [I, {"type": "null"}]}}),
    "booleans_and_null": obj({"t": {"type": "boolean"}, "n": {"type": "null"}}),
    "top_level_array": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3},
    "top_level_enum": {"enum": ["alpha", "beta", "gamma"]},
    "top_level_integer": {"type": "integer", "minimum": 100, "maximum": 999},
    "top_level_string": {"type": "string", "maxLength": 5, "pattern": "^[a-z]*$"},
    "number_bounds": obj({"x": {"type": "number", "minimum": 0, "maximum": 1}}),
    "array_of_arrays": obj({"grid": {"type": "array", "minItems": 1, "maxItems": 2,
                                     "items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9},
                                               "minItems": 1, "maxItems": 2}}}),
    "enum_in_array_nullable": obj({"tags": {"type": ["array", "null"], "items": {"enum": ["a", "b"]},
                                            "maxItems": 2}}),
    "tool_call": obj({"name": {"enum": ["get_weather", "get_time"]},
                      "arguments": obj({"city": S, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                       required=["city"])}),
    "mixed_everything": {"$defs": {"tag": {"enum": ["new", "old"]}},
                         **obj({"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"},
                                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2},
                                "score": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5},
                                                    {"type": "null"}]},
                                "meta": obj({"k": {"const": 1}, "v": {"type": ["boolean", "null"]}},
                                            required=["k"])},
                               required=["id", "tags", "meta"])},
}
