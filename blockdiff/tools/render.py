"""OpenAI tool requests -> what the chat template and the engine get: validation (``ToolError`` names the request
field), the ``ToolPlan`` of a request, and the messages as chat templates expect them.

Templates receive ``tools`` (the OpenAI tool objects), assistant ``tool_calls`` with ``arguments`` as an object
(parsed from the JSON string, as vLLM passes them), and ``tool`` messages with the ``name`` of the function whose
result they carry (looked up from ``tool_call_id`` when the client did not send it).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from ..sampling.fields import ParamError, json_text, json_type
from .grammar import answer_rule, thought_then_answer, tool_call_grammar
from .syntax import MARKERS, NAME, Markers

TOOL_CHOICES = ("none", "auto", "required")


class ToolError(ValueError):
    """A bad tools request: ``param`` is the field path, the message starts with it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"'{param}' {message}")
        self.param = param


TEMPLATE_RESERVED = ("messages", "bos_token", "eos_token", "pad_token")  # what the renderer itself fills in


def template_kwargs_problem(v) -> str | None:
    """What is wrong with a request's ``chat_template_kwargs`` (None: nothing), as a sentence starting with
    ``{name}`` for the caller to fill in: an object of template variables, ``add_generation_prompt`` a boolean,
    no ``tools`` (they go in the request's own field, which validates them and builds the call grammar) and none
    of the variables the renderer fills in itself."""
    if not isinstance(v, dict):
        return f"{{name}} must be an object of template variables, got {json_type(v)}"
    bad = next((k for k in v if not isinstance(k, str)), None)
    if bad is not None:
        return f"{{name}} keys must be strings (template variable names), got {json_type(bad)}"
    agp = v.get("add_generation_prompt")
    if agp is not None and not isinstance(agp, bool):
        return f"{{name}}.add_generation_prompt must be a boolean, got {json_type(agp)}"
    if "tools" in v:  # through the template alone they would skip validation, the grammar and call parsing
        return "{name} must not set 'tools': send them in the request's 'tools' field"
    reserved = sorted(set(v) & set(TEMPLATE_RESERVED))
    if reserved:
        return f"{{name}} must not set {', '.join(repr(k) for k in reserved)}: they are filled in for you"
    return None


def check_tools(tools) -> list[dict]:
    """OpenAI ``tools`` -> [{"name", "description", "parameters"}] (the function objects), validated."""
    if not isinstance(tools, list):
        raise ToolError("tools", "must be an array of tool objects")
    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise ToolError(f"{where}.type", "must be 'function' (the only tool type)")
        f = t.get("function")
        if not isinstance(f, dict):
            raise ToolError(f"{where}.function", "must be an object with 'name' and 'parameters'")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name", f"must be a name of letters, digits, '_', '.' or '-', "
                            f"got {name!r}")
        if name in seen:
            raise ToolError(f"{where}.function.name", f"{name!r} is declared twice")
        seen.add(name)
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters", "must be a JSON Schema object")
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"{where}.function.description", "must be a string")
        out.append({"name": name, "description": desc, "parameters": params,
                    "where": f"{where}.function.parameters"})
    return out


def check_tool_choice(choice, names: list[str]) -> tuple[str, str | None]:
    """-> (mode, the named function or None). Mode "none" | "auto" | "required"."""
    if choice is None:
        return ("auto" if names else "none"), None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise ToolError("tool_choice", f"must be 'none', 'auto', 'required' or {{'type': 'function', "
                            f"'function': {{'name': ...}}}}, got {choice!r}")
        if choice != "none" and not names:
            raise ToolError("tool_choice", f"is {choice!r} but no 'tools' were given")
        return choice, None
    if isinstance(choice, dict) and choice.get("type", "function") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ToolError("tool_choice.function.name", "must be a string")
        if name not in names:
            raise ToolError("tool_choice.function.name", f"{name!r} is not one of the tools ({', '.join(names) or 'none given'})")
        return "required", name
    raise ToolError("tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                    "{'name': ...}}")


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages for the chat template: tool-call arguments as objects, tool results named. ``ToolError`` for a
    malformed ``tool_calls`` entry."""
    out, names_by_id = [], {}
    for i, m in enumerate(messages):
        m = dict(m)
        calls = m.get("tool_calls")
        if calls is not None:
            if m.get("role") != "assistant":
                raise ToolError(f"messages[{i}].tool_calls", "is only allowed on assistant messages")
            if not isinstance(calls, list):
                raise ToolError(f"messages[{i}].tool_calls", "must be an array")
            fixed = []
            for j, c in enumerate(calls):
                where = f"messages[{i}].tool_calls[{j}]"
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ToolError(f"{where}.function", "must be an object with 'name' and 'arguments'")
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        args = json_text(args) if args.strip() else {}
                    except ValueError as e:
                        raise ToolError(f"{where}.function.arguments", str(e)) from None
                if not isinstance(args, dict):
                    raise ToolError(f"{where}.function.arguments", "must be a JSON object")
                c = copy.deepcopy(c)
                c["function"] = {**fn, "arguments": args}
                if isinstance(c.get("id"), str):
                    names_by_id[c["id"]] = fn["name"]
                fixed.append(c)
            m["tool_calls"] = fixed
        if m.get("role") == "tool" and not m.get("name"):
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):  # an id to look up, never a 500
                raise ToolError(f"messages[{i}].tool_call_id", f"must be a string, got {json_type(call_id)}")
            name = names_by_id.get(call_id)
            if name is None:  # the template would name the result "unknown": which call it answers is lost
                raise ToolError(f"messages[{i}].tool_call_id",
                                "is required (or 'name'): a tool message answers a call of an earlier assistant "
                                "message" if call_id is None else
                                f"is {call_id!r}, which matches no tool call of an earlier assistant message")
            m["name"] = name
        if m.get("content") is None and m.get("tool_calls"):  # OpenAI: null content beside tool calls
            m["content"] = ""
        out.append(m)
    return out


@dataclass
class ToolPlan:
    """What a chat request asks of tools and thinking."""

    tools: list[dict] = field(default_factory=list)  # check_tools output
    mode: str = "none"  # "none" | "auto" | "required"
    named: str | None = None
    parallel: bool = True
    thinking: bool = False
    markers: Markers = MARKERS

    @classmethod
    def from_request(cls, tools=None, tool_choice=None, parallel_tool_calls=None,
                     chat_template_kwargs: dict | None = None) -> "ToolPlan":
        checked = check_tools(tools) if tools else []
        names = [t["name"] for t in checked]
        mode, named = check_tool_choice(tool_choice, names)
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise ToolError("parallel_tool_calls", "must be a boolean")
        thinking = bool((chat_template_kwargs or {}).get("enable_thinking"))
        return cls(checked, mode, named, True if parallel_tool_calls is None else parallel_tool_calls, thinking)

    @property
    def active(self) -> bool:
        """Whether the output goes through the tool / reasoning parser (else it is plain text as before)."""
        return bool(self.tools) or self.thinking

    @property
    def names(self) -> list[str]:
        return [self.named] if self.named else [t["name"] for t in self.tools]

    @property
    def parse_calls(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    def template_tools(self) -> list[dict] | None:
        """The OpenAI tool objects the template declares (all of them, whatever tool_choice says)."""
        if not self.tools:
            return None
        return [{"type": "function", "function": {k: v for k, v in t.items() if k != "where" and v is not None}}
                for t in self.tools]

    def grammar(self, tokenizer, answer: dict | None = None) -> str | None:
        """The Lark grammar of the output when calls are constrained (tool_choice required / named / auto), or
        None: no tools, "none", or a tokenizer without the format's markers (its calls are parsed as written).
        ``answer``: the request's ``structured_outputs`` spec, the form of a text answer beside calls ("auto").
        With thinking on and no calls to constrain, a JSON / choice ``answer`` may follow one thinking channel (the
        template asked the model to think first; the constraint holds on the answer, as vLLM's reasoning parsers
        do it)."""
        if not self.parse_calls:
            ids = self.markers.ids(tokenizer) if self.thinking and answer is not None else None
            try:
                return None if ids is None else thought_then_answer(ids, answer_rule(answer))
            except ValueError:  # a regex / grammar answer: constrained from the first token, without thinking
                return None
        ids = self.markers.ids(tokenizer)
        if ids is None:
            return None
        tools = [t for t in self.tools if t["name"] in self.names]
        parallel = self.parallel and self.named is None  # a named function is called once, as in OpenAI's API
        if answer is not None:
            if self.mode != "auto":
                raise ToolError("tool_choice", f"is {self.mode!r}, which constrains the output to tool calls: it "
                                "cannot be combined with response_format / structured_outputs (use tool_choice "
                                "'auto' or 'none')")
            try:
                answer = answer_rule(answer)
            except ValueError as e:
                raise ToolError("structured_outputs", f"with tools (tool_choice 'auto'): {e}; tool_choice 'none' "
                                "takes any constraint") from None
        try:
            return tool_call_grammar(tools, ids, self.mode, parallel, self.thinking, answer)
        except ValueError as e:  # "PATH: message" or "PATH.key must ...": the path is the first word
            param, _, msg = str(e).partition(" ")
            raise ToolError(param.rstrip(":"), msg) from None

    def constrain(self, params, tokenizer):
        """``params`` (a ``SamplingParams``) with the calls' grammar as its ``structured_outputs`` (a copy), or
        ``params`` itself when nothing is constrained. ``ToolError`` names the field at fault."""
        grammar = self.grammar(tokenizer, params.structured_outputs)
        if grammar is None:
            return params
        from ..structured.spec import compile_spec, normalize

        try:
            spec = normalize({"grammar": grammar})
            compile_spec(spec)
        except ValueError as e:  # a schema piece the grammar engine refuses (a bad pattern...)
            raise ToolError("tools", f"cannot be compiled to a grammar: {e}") from None
        try:
            return dataclasses.replace(params, structured_outputs=spec)
        except ParamError as e:  # a knob the grammar's sampler cannot honour (logprobs, penalties, ignore_eos...)
            msg = str(e).replace("structured_outputs", "a grammar")
            param = e.param
            if param == "structured_outputs":  # the knob is the other field the message names
                param = next((f for f in ("canvas_template", "allowed_token_ids", "text_template", "suffix",
                                          "ignore_eos") if f in msg), "tools")
            raise ToolError(param, f"cannot be combined with tool calls (with tool_choice {self.mode!r} they are "
                            f"generated under a grammar): {msg}; tool_choice 'none' takes it") from None
