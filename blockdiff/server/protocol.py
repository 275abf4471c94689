"""The OpenAI wire format at the edge, as pydantic models: request bodies -> (prompt, ``SamplingParams``).

One place for validation, error wording and ``/openapi.json``: every field is typed (strict: no "16" for 16). The
sampling fields are not declared here: the request models inherit ``SamplingFields`` (and ``OutputFields``) from
``blockdiff/sampling/fields.py``, the same declarations ``SamplingParams`` validates with, so the Python API, the
server and the document agree. Rules between fields run once, in ``SamplingParams.validate``; its ``ParamError``
names the field, which ``engine_error`` maps onto the request's own name (``max_new_tokens`` -> ``max_tokens``,
``structured_outputs`` -> ``response_format``). ``errors.from_validation`` turns pydantic errors into OpenAI's
error shape with ``param``. Unknown fields are ignored, as OpenAI-compatible servers do.

To add a request field: a sampling knob the engine needs goes on ``SamplingFields`` (and ``SamplingParams``); a
wire-only field goes on ``SamplingRequest`` (both endpoints) or on the endpoint's model (``ChatCompletionRequest``
for chat-only fields such as tools and tool_choice), with a type and a ``Field(description=...)``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, create_model, field_validator,
                      model_validator)

from ..sampling.fields import (MAX_LOGPROBS, Int, IntegralFloats, OutputFields, ParamError, SamplingFields,
                               SubfieldError)
from ..sampling.params import SamplingParams
from ..structured.spec import MAX_CHOICES, MAX_SPEC_CHARS
from ..tools.render import ToolError, ToolPlan, template_kwargs_problem
from ..tools.syntax import NAME as TOOL_NAME
from .errors import APIError, bad, invalid, json_type  # noqa: F401  (re-exported for older imports)
from .structured import GUIDED_FIELDS, structured_outputs as constraint_from

# What tools/render.py's check_tools takes, for the document (the check itself stays there, with its wording):
# an OpenAI function tool whose name is letters, digits, '_', '.' and '-'.
TOOL_NAME_PATTERN = "^" + TOOL_NAME.pattern + "$"
TOOL_ITEM = {"type": "object", "required": ["function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": TOOL_NAME_PATTERN}, "description": {"type": ["string", "null"]},
        "parameters": {"type": ["object", "null"]}}}}}

_SPEC_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_SPEC_CHARS}  # a pattern, grammar or schema text
_CHOICES = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_CHOICES}

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 16  # choices per request (each is a request in the engine)


def _neutral(name: str, v, neutral, why: str):
    """Fields OpenAI clients may send that this server cannot honour: accept only their neutral value."""
    if v is None or v == neutral or (isinstance(neutral, (list, dict)) and not v):
        return v
    raise invalid(f"'{name}'={v!r} is not supported: {why}", name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = Field(False, description="send a last chunk with 'usage' (and 'choices': [])")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str | None = Field(None, description="accepted for compatibility; not used")
    description: str | None = Field(None, description="accepted for compatibility; not used")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON Schema the output must be "
                                           "valid for (unset: any JSON object)")
    strict: bool | None = Field(None, description="always enforced: changes nothing")


class ResponseFormat(BaseModel):
    # The schema says what structured.py enforces: type json_schema needs its json_schema object.
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"anyOf": [
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}}]})
    type: Literal["text", "json_object", "json_schema"] = Field(description="text: no constraint; json_object: any "
                                                                "JSON object; json_schema: JSON valid for the schema")
    json_schema: JsonSchemaFormat | None = Field(None, description="with type json_schema")

    def as_dict(self) -> dict:
        d = {"type": self.type}
        if self.json_schema is not None:
            d["json_schema"] = self.json_schema.model_dump(by_alias=True, exclude_none=True)
        return d


class SamplingRequest(SamplingFields):
    """Fields shared by /v1/completions and /v1/chat/completions: the sampling fields of ``SamplingFields`` (the
    same declarations ``SamplingParams`` validates with; diffusion knobs at the top level, the openai client sends
    them with ``extra_body=``) and the wire-only fields below."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(description="the served model id (see /v1/models)")
    # OpenAI's spec lets a client send null for these (some do): null means the default
    n: Int | None = Field(1, ge=1, le=MAX_N, description="independent choices (canvases) for the prompt; choice "
                          "i>0 uses a seed derived from 'seed'")
    stream: bool | None = Field(False, description="send Server-Sent Events, one chunk per committed canvas")
    stream_options: StreamOptions | None = Field(None, description="with stream: true (ignored without)")
    user: str | None = Field(None, description="accepted for compatibility; not used")
    metadata: dict[str, str] | None = Field(None, description="accepted for compatibility; not used")
    # Structured output (blockdiff/server/structured.py maps these onto SamplingParams.structured_outputs).
    response_format: ResponseFormat | None = Field(None, description="the output is JSON (valid for the schema)")
    # vLLM's older names for structured_outputs' keys, which clients written for vLLM still send: honoured, since
    # ignoring one (as an unknown field) would return unconstrained text to a client that asked for a constraint.
    # (the document says what structured_outputs' keys take, as for that field: spec.normalize checks them)
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's older name for "
                                                     "structured_outputs.json (a JSON Schema)",
                                                     json_schema_extra={"anyOf": [{"type": "object"}, _SPEC_TEXT,
                                                                                  {"type": "null"}]})
    guided_regex: str | None = Field(None, description="vLLM's older name for structured_outputs.regex",
                                     json_schema_extra={"anyOf": [_SPEC_TEXT, {"type": "null"}]})
    guided_choice: list[str] | None = Field(None, description="vLLM's older name for structured_outputs.choice",
                                            json_schema_extra={"anyOf": [_CHOICES, {"type": "null"}]})
    guided_grammar: str | None = Field(None, description="vLLM's older name for structured_outputs.grammar",
                                       json_schema_extra={"anyOf": [_SPEC_TEXT, {"type": "null"}]})

    @field_validator("n", "stream", "echo", mode="before", check_fields=False)
    @classmethod
    def _null_is_the_default(cls, v, info):
        return cls.model_fields[info.field_name].default if v is None else v

    # ------------------------------------------------------------------ to the engine
    @property
    def max_tokens_name(self) -> str:
        return "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def requested_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None (off) or the number of top alternatives per token."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def to_params(self) -> SamplingParams:
        """``max_new_tokens`` holds the requested max tokens (None = as many as fit, capped by the defaults)."""
        kw = {name: getattr(self, name) for name in SamplingFields.model_fields if name != "max_tokens"}
        # response_format / structured_outputs, compiled here: a bad schema is a 400 naming the field.
        kw["structured_outputs"] = constraint_from({
            "response_format": None if self.response_format is None else self.response_format.as_dict(),
            "structured_outputs": self.structured_outputs,
            **{name: getattr(self, name) for name in GUIDED_FIELDS}})
        kw["stream_drafts"] = self.stream_drafts and self.stream  # harmless without a stream: ignored
        kw["suffix"] = getattr(self, "suffix", None)
        kw["logprobs"] = self.requested_logprobs
        try:
            return SamplingParams(max_new_tokens=self.requested_max_tokens, **kw)
        except ValueError as e:
            raise engine_error(e, self.max_tokens_name, self.field_names) from None

    @property
    def field_names(self) -> dict[str, str]:
        """SamplingParams field -> the request field the client sent it as."""
        names = {"max_new_tokens": self.max_tokens_name, "max_tokens": self.max_tokens_name}
        if self.response_format is not None and self.response_format.type != "text":  # "text": no constraint
            names["structured_outputs"] = "response_format"
        for name in GUIDED_FIELDS:
            if getattr(self, name) is not None:
                names["structured_outputs"] = name
        return names


class CompletionRequest(SamplingRequest, OutputFields):
    prompt: Any = Field(description="a string, an array of token ids, or a one-element array of either",
                        json_schema_extra={"anyOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                             "maxItems": 1},
                            {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                                        "minItems": 1}, "minItems": 1, "maxItems": 1}]})
    echo: bool | None = Field(False, description="return the prompt text before the completion")
    best_of: Int | None = Field(None, description="only 1", json_schema_extra={"enum": [1, None]})
    tools: list[Any] | None = Field(None, description="only [] here: tools are served on /v1/chat/completions",
                                    json_schema_extra={"maxItems": 0})

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, p):
        if p is None:
            raise invalid("'prompt' is required", "prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise invalid("'prompt' must not be empty", "prompt")
            return p
        if isinstance(p, list):
            if not p:
                raise invalid("'prompt' must not be empty", "prompt")
            if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
                return p
            if all(isinstance(x, (str, list)) for x in p):
                raise invalid(f"'prompt' holds {len(p)} prompts; this server takes one prompt per request", "prompt")
            k, x = next((k, x) for k, x in enumerate(p) if not isinstance(x, int) or isinstance(x, bool))
            raise invalid(f"'prompt[{k}]' must be a token id (an integer), got {json_type(x)}", f"prompt[{k}]")
        raise invalid(f"'prompt' must be a string or an array of token ids, got {json_type(p)}", "prompt")

    @model_validator(mode="after")
    def _completion_rules(self):
        if self.logprobs is not None and self.echo:
            raise invalid("'logprobs' with 'echo' is not supported: log-probabilities cover the generated tokens "
                          "only", "logprobs")
        _neutral("best_of", self.best_of, 1, "only one candidate per request (use 'n' for several choices)")
        _neutral("tools", self.tools, [], "tool calling is served on /v1/chat/completions (a completion has no chat "
                 "template to declare tools in)")
        return self

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # "detail" is accepted and has no effect
    url: str = Field(description="a data:image/...;base64 URL (or a local file under --allowed-local-media-path)")


class ImageUrlPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImageUrlPart, Field(discriminator="type")]


def _check_part(part, j: int) -> None:
    """Part ``j`` of a message's content: a text part or an image_url part; the error names the part (its message
    and its param: ``messages[0].content[1].image_url.url``) and says what it must be."""
    where = f"{{path}}[{j}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return
    if kind == "image_url":
        v = part.get("image_url")
        if not isinstance(v, dict):
            raise SubfieldError(f"'{where}.image_url' must be an object {{\"url\": \"data:image/...;base64,...\"}}, "
                                f"got {json_type(v)}", f"[{j}].image_url")
        url = v.get("url")
        if isinstance(url, str) and url:
            return
        raise SubfieldError(f"'{where}.image_url.url' must be a non-empty string (a data:image/...;base64 URL), got "
                            + ("an empty string" if url == "" else "nothing" if "url" not in v else json_type(url)),
                            f"[{j}].image_url.url")
    got = kind if kind is not None else json_type(part)
    raise SubfieldError(f"'{where}' must be a text part ({{\"type\": \"text\", \"text\": ...}}) or an image_url "
                        f"part ({{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}), got {got!r}", f"[{j}]")


class ChatMessage(BaseModel):
    # name, tool_call_id...: passed to the template. The schema says what _check_messages enforces: content is
    # required (not null) except on an assistant message.
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"anyOf": [
        {"properties": {"role": {"const": "assistant"}}},
        {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}]})
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="who wrote the message")
    content: str | list[ContentPart] | None = Field(None, description="a string or an array of text and image_url "
                                                    "parts; required except on an assistant message, where null "
                                                    "or absent is empty (none beside its tool_calls)")

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v):
        if isinstance(v, str) and v not in CHAT_ROLES:
            raise ValueError(f"{{name}} is '{v}', which is not a known role (one of {', '.join(CHAT_ROLES)})")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        if v is None:  # allowed beside tool_calls (checked with the role below)
            return v
        if isinstance(v, list):
            for j, part in enumerate(v):
                _check_part(part, j)
            return v
        if not isinstance(v, str):
            raise ValueError(f"{{name}} must be a string or an array of content parts, got {json_type(v)}")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def template_content(self) -> str | list[dict]:
        """The text, or (with images) the parts: text parts and {"type": "image_url", "image_url": {"url"}}."""
        if self.content is None:  # null (or absent): none beside tool_calls, else an empty message
            return None if (self.model_extra or {}).get("tool_calls") else ""
        if isinstance(self.content, str) or all(isinstance(p, TextPart) for p in self.content):
            return self.text()
        return [{"type": "text", "text": p.text} if isinstance(p, TextPart)
                else {"type": "image_url", "image_url": {"url": p.image_url.url}} for p in self.content]


def _check_messages(v: list) -> list:
    """Each message an object; content present unless it is an assistant's (OpenAI: only an assistant message may
    leave content out, null beside its tool_calls); ``ChatMessage``'s schema states the same rule."""
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise invalid(f"'messages[{i}]' must be an object with 'role' and 'content', got {json_type(m)}",
                          f"messages[{i}]")
        if m.get("content") is None and m.get("role") in CHAT_ROLES and m["role"] != "assistant":
            raise invalid(f"'messages[{i}].content' is required (a {m['role']} message needs content; only an "
                          "assistant message may leave it null)", f"messages[{i}].content")
    return v


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation, rendered with the "
                                        "checkpoint's chat template")
    max_completion_tokens: Int | None = Field(None, ge=1, description="wins over max_tokens")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extra variables for the chat template; 'add_generation_prompt' (default true) is "
        "honoured")
    logprobs: bool | None = Field(None, description="return each output token's log-probability (see "
                                  "docs/serving.md)")
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: this many most "
                                     "likely alternatives per token (ignored without logprobs)")
    # Tool calling (blockdiff/tools; docs/serving.md "Tools and thinking").
    tools: list[dict[str, Any]] | None = Field(None, description="functions the model may call: [{'type': "
                                               "'function', 'function': {'name', 'description', 'parameters'}}]",
                                               json_schema_extra={"items": TOOL_ITEM})
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="'none', 'auto' (default with tools), 'required', or {'type': 'function', 'function': "
        "{'name'}}; required and named calls are generated under a grammar of the tools' schemas",
        json_schema_extra={"anyOf": [{"enum": ["none", "auto", "required"]}, {
            "type": "object", "required": ["function"], "properties": {
                "type": {"const": "function"},
                "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}},
            {"type": "null"}]})
    parallel_tool_calls: bool | None = Field(None, description="allow several calls in one answer (default true)")
    # OpenAI's deprecated function calling: refused by name rather than ignored as unknown fields (the client would
    # get text where it asked for a call).
    functions: list[Any] | None = Field(None, description="deprecated by OpenAI: only [] here (send 'tools')",
                                        json_schema_extra={"maxItems": 0})
    function_call: Any = Field(None, description="deprecated by OpenAI: only 'none' here (send 'tool_choice')",
                               json_schema_extra={"enum": ["none", None]})
    suffix: Any = Field(None, description="only null here: fill-in-the-middle is served on /v1/completions",
                        json_schema_extra={"enum": [None]})
    _plan: ToolPlan | None = PrivateAttr(None)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v):
        if v is None:
            raise invalid("'messages' is required", "messages")
        if not isinstance(v, list):
            raise invalid(f"'messages' must be an array of message objects, got {json_type(v)}", "messages")
        return _check_messages(v)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v):
        why = None if v is None else template_kwargs_problem(v)
        if why is not None:
            raise ValueError(why)
        return v

    @model_validator(mode="after")
    def _chat_rules(self):
        why = ("OpenAI's deprecated function calling is not served: send 'tools' ([{'type': 'function', 'function': "
               "{...}}]) and 'tool_choice'")
        _neutral("functions", self.functions, [], why)
        _neutral("function_call", self.function_call, "none", why)
        _neutral("suffix", self.suffix, None, "fill-in-the-middle is served on /v1/completions (the prompt is the "
                 "prefix there); a chat answer has no suffix")
        try:
            self._plan = ToolPlan.from_request(self.tools, self.tool_choice, self.parallel_tool_calls,
                                               self.chat_template_kwargs)
        except ToolError as e:
            raise invalid(str(e), e.param) from None
        return self

    @property
    def tool_plan(self) -> ToolPlan:
        return self._plan if self._plan is not None else ToolPlan()

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_tokens_name(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def add_generation_prompt(self) -> bool:
        v = (self.chat_template_kwargs or {}).get("add_generation_prompt")
        return True if v is None else v

    def template_messages(self) -> list[dict]:
        """[{"role", "content": str (or text/image_url parts), extra keys...}] for the chat template."""
        out = []
        for m in self.messages:
            d = {k: v for k, v in (m.model_extra or {}).items()}
            d.update(role=m.role, content=m.template_content())
            out.append(d)
        return out

    def template_kwargs(self) -> dict:
        return {k: v for k, v in (self.chat_template_kwargs or {}).items() if k != "add_generation_prompt"}


# ---------------------------------------------------------------------------------------------- /tokenize
class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class InputTextPart(_Item):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(_Item):
    type: Literal["refusal"]
    refusal: str


class InputImagePart(_Item):
    type: Literal["input_image"]
    image_url: str = Field(min_length=1, description="a data: URL (a file:// URL or path with "
                           "--allowed-local-media-path)")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted; no effect")


def _tagged(kind: str, default: str | None = None):
    """A union member chosen by its "type" (``kind[type]`` tags, which error paths leave out)."""
    def tag(v):
        t = (v.get("type") if isinstance(v, dict) else getattr(v, "type", None)) or default  # null: the default
        return f"{kind}[{t}]" if isinstance(t, str) else None
    return tag


ContentPart = Annotated[
    Annotated[InputTextPart, Tag("part[input_text]")] | Annotated[InputTextPart, Tag("part[output_text]")]
    | Annotated[RefusalPart, Tag("part[refusal]")] | Annotated[InputImagePart, Tag("part[input_image]")],
    Discriminator(_tagged("part"), custom_error_type="tag",
                  custom_error_message="must be an input_text, output_text, refusal or input_image part "
                                       "(its 'type')")]


class InputMessage(_Item):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = Field(description="the call's arguments, a JSON object as text")


class OutputTextPart(_Item):
    type: Literal["input_text"] = Field(description="a tool's output is text (joined, as the chat tool message's)")
    text: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[OutputTextPart]


class ReasoningItem(_Item):
    type: Literal["reasoning"] = Field(description="an earlier turn's reasoning, sent back: skipped")


class FunctionTool(_Item):
    type: Literal["function"]
    name: str = Field(json_schema_extra={"pattern": TOOL_NAME_PATTERN})  # checked on the chat path (tools/render.py)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema (as tools on chat completions)")
    strict: bool | None = Field(None, description="always enforced")


class TextFormat(_Item):
    # The schema says what responses.py enforces: type json_schema needs its name and schema (OpenAI's rule).
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {"required": ["name", "schema"],
         "properties": {"name": {"type": "string"}, "schema": {"type": "object"}}}]})
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="with type json_schema")
    strict: bool | None = None


class TextOptions(_Item):
    format: TextFormat | None = None


class Reasoning(_Item):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        None, description="any effort but none / minimal turns the model's thinking on")
    summary: str | None = Field(None, description="accepted; the reasoning itself is returned")


InputItem = Annotated[
    Annotated[InputMessage, Tag("item[message]")] | Annotated[FunctionCallItem, Tag("item[function_call]")]
    | Annotated[FunctionCallOutputItem, Tag("item[function_call_output]")]
    | Annotated[ReasoningItem, Tag("item[reasoning]")],
    Discriminator(_tagged("item", "message"), custom_error_type="tag",
                  custom_error_message="must be a message, or a function_call, function_call_output or "
                                       "reasoning item (its 'type')")]


# blockdiff's sampling fields on /v1/responses: those of SamplingFields, as chat takes them (max_tokens is
# max_output_tokens there; temperature and top_p are OpenAI's own Responses fields, declared below).
RESPONSES_SAMPLING = tuple(n for n in SamplingFields.model_fields
                           if n not in ("max_tokens", "temperature", "top_p", "stream_drafts"))
_ResponsesSampling = create_model("ResponsesSampling", __base__=IntegralFloats,
                                  **{n: (SamplingFields.model_fields[n].annotation, SamplingFields.model_fields[n])
                                     for n in RESPONSES_SAMPLING})


def _non_empty_list(schema: dict) -> None:
    """The document's word for what responses.py refuses with its own message (an empty input list): minItems 1
    on the list branch (a min_length on the field would refuse it first, in pydantic's words)."""
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "array":
            branch["minItems"] = 1


class ResponsesRequest(_ResponsesSampling):
    """``POST /v1/responses`` (OpenAI's Responses API). Validated here, then run as the chat request it means
    (``responses.py``), whose validation covers the sampling fields: blockdiff's own (``seed``,
    ``max_denoising_steps``, ...) may be sent beside these, as on chat completions; other fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    model: str = Field(description="the served model id (see /v1/models)")
    input: str | list[InputItem] = Field(description="a user message, or input items: messages, and the "
                                         "function_call / function_call_output items of earlier turns",
                                         json_schema_extra=_non_empty_list)
    instructions: str | None = Field(None, description="a system message before the input")
    max_output_tokens: Int | None = Field(None, ge=1, description="the most tokens to write (reasoning included)")
    temperature: float | None = SamplingFields.model_fields["temperature"]
    top_p: float | None = SamplingFields.model_fields["top_p"]
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="logprobs of the most likely "
                                     "tokens at each output position")
    tools: list[FunctionTool] | None = Field(None, description="function tools")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description="none, auto, required, or {type: function, name}",
        json_schema_extra={"anyOf": [{"enum": ["none", "auto", "required", None]}, {
            "type": "object", "required": ["type", "name"],
            "properties": {"type": {"enum": ["function"]}, "name": {"type": "string"}}}]})
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    reasoning: Reasoning | None = None
    stream: bool | None = Field(None, description="typed Server-Sent Events, response.created ... "
                                "response.completed")
    stream_drafts: Literal[False] | None = Field(None, description="not supported here (the Responses events carry "
                                                 "no drafts): stream drafts from chat or completions")
    store: bool | None = Field(None, description="accepted; nothing is stored (the response says false)")
    include: list[str] | None = Field(None, description="message.output_text.logprobs: the output tokens' logprobs; "
                                      "the rest are accepted and change nothing")
    metadata: dict[str, str] | None = Field(None, description="echoed in the response")
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = Field(None, description="accepted; requests are routed by their prefix anyway")
    service_tier: str | None = None
    truncation: Literal["disabled"] | None = Field(None, description="a prompt longer than the context is refused")
    background: Literal[False] | None = Field(None, description="responses are answered while the request is open")
    previous_response_id: None = Field(None, description="not supported: nothing is stored; send the "
                                       "conversation in input")
    conversation: None = Field(None, description="not supported: nothing is stored")


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text ``prompt`` or chat ``messages``. Messages become the prompt
    /v1/chat/completions would run (``chat_request``: the same request model, the same rendering), with the
    ``tools`` and ``chat_template_kwargs`` a chat request would send."""

    # The schema says what _one_input enforces: exactly one of prompt / messages (null counts as absent).
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})
    model: str | None = Field(None, description="the served model id (optional)")
    prompt: str | None = Field(None, description="text to tokenize (give prompt or messages)")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="a conversation, rendered as "
                                               "/v1/chat/completions renders it (tool calls, tool results, images)")
    tools: list[dict[str, Any]] | None = Field(None, description="messages: the tools a chat request would "
                                               "declare (the template writes them into the prompt)")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="messages: extra variables for the chat "
                                                        "template, as in /v1/chat/completions (its "
                                                        "'add_generation_prompt' wins over the field below)")
    add_special_tokens: bool = Field(True, description="prompt: start with the BOS token, as /v1/completions does")
    add_generation_prompt: bool = Field(True, description="messages: end with the assistant turn's opening")
    return_token_strs: bool = Field(False, description="also return each token's vocabulary piece")

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v):
        return _check_messages(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise invalid("'prompt': give exactly one of 'prompt' or 'messages'", "prompt")
        return self

    def chat_request(self, body: dict, model: str) -> "ChatCompletionRequest":
        """The chat request whose prompt these messages are (validated as /v1/chat/completions validates it)."""
        kwargs = {"add_generation_prompt": self.add_generation_prompt, **(body.get("chat_template_kwargs") or {})}
        chat = {"model": model, "messages": body["messages"], "chat_template_kwargs": kwargs}
        if body.get("tools") is not None:
            chat["tools"] = body["tools"]
        return ChatCompletionRequest.model_validate(chat)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = Field(None, description="the served model id (optional)")
    tokens: list[Annotated[int, Field(ge=0)]] = Field(description="token ids")


# ---------------------------------------------------------------------------------------------- engine errors
def engine_error(e: ValueError, max_name: str = "max_tokens", names: dict | None = None) -> APIError:
    """A ``SamplingParams`` / engine ``ValueError`` as a 400 naming the request field: a ``ParamError`` carries
    the field (``names`` maps SamplingParams' names onto the request's); any other is about the prompt."""
    names = {"max_new_tokens": max_name, "max_tokens": max_name, **(names or {})}
    msg = str(e)
    if isinstance(e, ParamError):
        param = e.param
        root = (param or "").split(".", 1)[0].split("[", 1)[0]
        if root in names:
            param = names[root] + (param or "")[len(root):]
        for old, new in names.items():
            if old != new:
                msg = msg.replace(old, new)
        if param and not msg.startswith(f"'{param}'"):  # the server's wording: "'field' must ..."
            bare = msg.startswith(param) and msg[len(param):len(param) + 1] in (" ", ":")
            msg = f"'{param}'" + msg[len(param):] if bare else f"'{param}': {msg}"
        return bad(msg, param)
    return bad(msg.replace("max_new_tokens", max_name), "prompt" if "prompt" in msg else None)


def context_words(context: int, server_limit: bool = False) -> str:
    """How errors name the context a request must fit: the model's own, or the server's --max-model-len."""
    if server_limit:
        return f"this server's context of {context} tokens (--max-model-len)"
    return f"the model's context of {context} tokens"


def check_context(prompt_len: int, params: SamplingParams, default_max: int, canvas: int, context: int,
                  max_name: str = "max_tokens", prompt_name: str = "prompt",
                  server_limit: bool = False) -> SamplingParams:
    """Fill ``max_new_tokens`` (unset: the default, capped to what fits) and check prompt + output fit the
    context, naming the request's own fields (the engine counts output in whole canvases). ``server_limit``: the
    context is the server's ``--max-model-len``, not the model's, and the errors say so."""
    def needed(n: int) -> int:
        return prompt_len + -(-n // canvas) * canvas

    words = context_words(context, server_limit)
    if needed(1) > context:
        raise bad(f"the prompt is too long: {prompt_len} tokens, and one canvas of {canvas} more must fit in "
                  f"{words}", prompt_name, "context_length_exceeded")
    n = params.max_new_tokens
    if n is None:
        params.max_new_tokens = min(default_max, (context - prompt_len) // canvas * canvas)
        if params.text_template is not None:  # a template fills one canvas, whatever the default budget
            params.max_new_tokens = canvas
    elif needed(n) > context:
        raise bad(f"'{max_name}' is too large: {n} tokens (in canvases of {canvas}) after a {prompt_len}-token "
                  f"prompt need {needed(n)} positions, more than {words}", max_name, "context_length_exceeded")
    return params


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: int | None = None) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens the prefix cache supplied;
    ``reasoning_tokens`` (chat): how many of the completion tokens were the model's thinking."""
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens,
         "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if reasoning_tokens is not None:
        u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return u


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of an ``n`` > 1 request: choice 0 uses ``seed`` itself (so n=1 and choice 0
    agree); the others a 63-bit mix of (seed, index), so neighbouring seeds do not share choices."""
    if seed is None or index == 0:
        return seed
    x = (seed + index * 0x9E3779B97F4A7C15) & (2 ** 64 - 1)  # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2 ** 64 - 1)
    return (x ^ (x >> 31)) >> 1

