"""The OpenAI wire format at the edge, as pydantic models: request bodies -> (prompt, ``SamplingParams``).

One place for validation, error wording and ``/openapi.json``: every field is typed here (strict: no "16" for
16), bounds and cross-field rules are validators whose messages name the field (``errors.from_validation`` turns
them into OpenAI's error shape with ``param``). Unknown fields are ignored, as OpenAI-compatible servers do.

To add a request field: declare it on ``SamplingRequest`` (both endpoints) or on the endpoint's model, with a
type and a ``Field(description=...)``; map it onto ``SamplingParams`` in ``to_params`` if the engine needs it.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..sampling.params import MAX_LOGPROBS, SamplingParams
from ..tools.render import ToolError, ToolPlan
from .errors import APIError, bad, invalid, json_type  # noqa: F401  (re-exported for older imports)
from .structured import structured_outputs as constraint_from

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 16  # choices per request (each is a request in the engine)


def _integral(v):
    # JSON has one number type: 16.0 is the integer 16 (as before), 16.5 is not an integer.
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_integral)]
Num = Annotated[float, Field(allow_inf_nan=False)]

TEMPERATURE_WHY = ("diffusion sampling anneals its temperature from t_max to t_min per denoising step; leave "
                   "temperature unset (or 1) and send 't_min' / 't_max' instead")
TRUNCATION_REF = ("'{}' needs rng='default': rng='reference' reproduces the reference sampler, which has no "
                  "top_p, top_k or min_p")


def _neutral(name: str, v, neutral, why: str):
    """Fields OpenAI clients may send that diffusion sampling cannot honour: accept only their neutral value."""
    if v is None or v == neutral or (isinstance(neutral, (list, dict)) and not v):
        return v
    raise invalid(f"'{name}'={v!r} is not supported: {why}", name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = Field(False, description="send a last chunk with 'usage' (and 'choices': [])")


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (diffusion knobs at the top level; the openai
    client sends them with ``extra_body=``)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(description="the served model id (see /v1/models)")
    max_tokens: Int | None = Field(None, ge=1, description="output tokens at most (unset: the checkpoint's "
                                   "max_new_tokens, capped to what fits the context)")
    n: Int = Field(1, ge=1, le=MAX_N, description="independent choices (canvases) for the prompt; choice i>0 "
                   "uses a seed derived from 'seed'")
    seed: Int | None = Field(None, ge=0, le=2 ** 63 - 1, description="makes the output reproducible")
    stop: str | list[str] | None = Field(None, description="up to 16 strings; the text ends before the first")
    stream: bool = Field(False, description="send Server-Sent Events, one chunk per committed canvas")
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    user: str | None = Field(None, description="accepted for compatibility; not used")
    metadata: dict[str, str] | None = Field(None, description="accepted for compatibility; not used")
    # Fields of the OpenAI API that diffusion sampling accepts only at their neutral value.
    # (json_schema_extra: the document says which values are accepted, so generated clients stay within them)
    temperature: Num | None = Field(None, description="only 1 (or unset): see t_min / t_max",
                                    json_schema_extra={"enum": [1, None]})
    presence_penalty: Num | None = Field(None, description="only 0: penalties are not implemented",
                                         json_schema_extra={"enum": [0, None]})
    frequency_penalty: Num | None = Field(None, description="only 0: penalties are not implemented",
                                          json_schema_extra={"enum": [0, None]})
    logit_bias: dict[str, Any] | None = Field(None, description="only {}: not implemented",
                                              json_schema_extra={"maxProperties": 0})
    # Structured output (blockdiff/server/structured.py maps these onto SamplingParams.structured_outputs).
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
        '{"name", "schema", "strict"}}: the output is JSON (valid for the schema)', json_schema_extra={
            "properties": {"type": {"enum": ["text", "json_object", "json_schema"]},
                           "json_schema": {"type": "object", "properties": {
                               "name": {"type": "string"}, "schema": {"type": "object"},
                               "strict": {"type": ["boolean", "null"]}}}},
            "required": ["type"]})
    structured_outputs: dict[str, Any] | None = Field(
        None, description="exactly one of json (a JSON Schema), json_object (true), regex, choice (strings), "
        "grammar (Lark or GBNF); optional allow_whitespace (json only)", json_schema_extra={
            "properties": {"json": {"type": "object"}, "json_object": {"enum": [True]}, "regex": {"type": "string"},
                           "choice": {"type": "array", "items": {"type": "string"}},
                           "grammar": {"type": "string"}, "allow_whitespace": {"type": "boolean"}}})
    text_template: str | None = Field(None, description="text with <|hole|> or <|hole:N|> holes laid on the first "
                                      "canvas; the output is the filled template")
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
    t_min: Num | None = Field(None, ge=0, description="temperature at the last denoising step")
    t_max: Num | None = Field(None, ge=0, description="temperature at the first denoising step")
    rng: Literal["default", "reference"] = Field("default", description="'reference': draw random numbers "
                                                 "exactly as the transformers reference does")
    ignore_eos: bool = Field(False, description="keep generating after an EOS token")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="token ids that end the "
                                                                     "output")
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="canvas tokens are drawn only from these ids")
    canvas_template: list[Annotated[int, Field(ge=-1)]] | None = Field(
        None, description="token ids for the first canvas, -1 where the model is free")
    stream_drafts: bool = Field(False, description="with stream: true, also send the argmax canvas after every "
                                "denoising step")
    fast: bool | None = Field(None, description="approximate fast mode: reuse the keys/values of settled canvas "
                              "positions across denoising steps (null: the server's default, see serve --fast)")

    # ------------------------------------------------------------------ field rules
    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise invalid("'stop' must be a string or an array of strings", "stop")
        if any(s == "" for s in v):
            raise invalid("'stop' strings must not be empty", "stop")
        if len(v) > 16:
            raise invalid(f"'stop' holds {len(v)} strings; at most 16", "stop")
        return v or None

    @model_validator(mode="after")
    def _rules(self):
        _neutral("temperature", self.temperature, 1, TEMPERATURE_WHY)
        for name in ("presence_penalty", "frequency_penalty"):
            _neutral(name, getattr(self, name), 0, "penalties are not implemented")
        _neutral("logit_bias", self.logit_bias, {}, "logit_bias is not implemented")
        if not self.stream:
            for name in ("stream_options", "stream_drafts"):
                if getattr(self, name) not in (None, False):
                    raise invalid(f"'{name}' is only allowed when 'stream' is true", name)
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise invalid(f"'t_max' must be greater than 't_min' (got t_max={self.t_max}, t_min={self.t_min})",
                          "t_max")
        if self.rng == "reference":
            for name, off in (("top_p", 1), ("top_k", 0), ("min_p", 0)):
                v = getattr(self, name)
                if v is not None and v != off and not (name == "top_k" and v == -1):
                    raise invalid(TRUNCATION_REF.format(name), name)
        if self.rng == "reference" and (self.canvas_template is not None or self.allowed_token_ids is not None):
            raise invalid("rng='reference' reproduces the reference sampler, which has no canvas_template or "
                          "allowed_token_ids; use rng='default' with them", "rng")
        return self

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
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_params(self) -> SamplingParams:
        """``max_new_tokens`` holds the requested max tokens (None = as many as fit, capped by the defaults)."""
        kw = {name: getattr(self, name) for name in (
            "seed", "stop", "rng", "stop_token_ids", "ignore_eos", "allowed_token_ids", "canvas_template",
            "stream_drafts", "max_denoising_steps", "stability_threshold", "entropy_bound", "t_min", "t_max",
            "confidence_threshold", "text_template", "top_p", "min_p", "fast")}
        # response_format / structured_outputs, compiled here: a bad schema is a 400 naming the field.
        kw["structured_outputs"] = constraint_from({"response_format": self.response_format,
                                                    "structured_outputs": self.structured_outputs})
        kw["suffix"] = getattr(self, "suffix", None) or None
        kw["top_k"] = self.top_k if self.top_k not in (-1, 0) else None
        kw["logprobs"] = self.requested_logprobs
        try:
            return SamplingParams(max_new_tokens=self.requested_max_tokens, **kw)
        except ValueError as e:
            raise engine_error(e, self.max_tokens_name) from None


class CompletionRequest(SamplingRequest):
    prompt: Any = Field(description="a string, an array of token ids, or a one-element array of either",
                        json_schema_extra={"anyOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                             "maxItems": 1},
                            {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                                        "minItems": 1}, "minItems": 1, "maxItems": 1}]})
    echo: bool = Field(False, description="return the prompt text before the completion")
    suffix: str | None = Field(None, description="fill in the middle: text that follows the completion; the "
                               "output is the middle (one canvas)")
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="return each output token's "
                                 "log-probability and this many most likely alternatives (see docs/serving.md)")
    best_of: Int | None = Field(None, description="only 1", json_schema_extra={"enum": [1, None]})

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
        raise invalid(f"'prompt' must be a string or an array of token ids, got {json_type(p)}", "prompt")

    @model_validator(mode="after")
    def _completion_rules(self):
        if self.logprobs is not None and self.echo:
            raise invalid("'logprobs' with 'echo' is not supported: log-probabilities cover the generated tokens "
                          "only", "logprobs")
        _neutral("best_of", self.best_of, 1, "only one candidate per request (use 'n' for several choices)")
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


def _check_part(part, where: str) -> None:
    """A text part or an image_url part; the error names the part and says what it must be."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return
    if kind == "image_url":
        v = part.get("image_url")
        if isinstance(v, dict) and isinstance(v.get("url"), str) and v["url"]:
            return
        raise ValueError(f"'{where}.image_url.url' must be a string (a data:image/...;base64 URL)")
    got = kind if kind is not None else json_type(part)
    raise ValueError(f"'{where}' must be a text part ({{\"type\": \"text\", \"text\": ...}}) or an image_url part "
                     f"({{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}), got {got!r}")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_call_id...: passed to the template
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="who wrote the message")
    content: str | list[ContentPart] | None = Field(None, description="a string or an array of text and image_url "
                                                    "parts; may be null on an assistant message with tool_calls")

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
                _check_part(part, f"{{path}}[{j}]")
            return v
        if not isinstance(v, str):
            raise ValueError(f"{{name}} must be a string or an array of content parts, got {json_type(v)}")
        return v

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and (self.model_extra or {}).get("tool_calls")):
            raise ValueError("'content' is required (it may be null only on an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def template_content(self) -> str | list[dict]:
        """The text, or (with images) the parts: text parts and {"type": "image_url", "image_url": {"url"}}."""
        if self.content is None:
            return None
        if isinstance(self.content, str) or all(isinstance(p, TextPart) for p in self.content):
            return self.text()
        return [{"type": "text", "text": p.text} if isinstance(p, TextPart)
                else {"type": "image_url", "image_url": {"url": p.image_url.url}} for p in self.content]


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
                                     "likely alternatives per token")
    # Tool calling (blockdiff/tools; docs/serving.md "Tools and thinking").
    tools: list[dict[str, Any]] | None = Field(None, description="functions the model may call: [{'type': "
                                               "'function', 'function': {'name', 'description', 'parameters'}}]")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="'none', 'auto' (default with tools), 'required', or {'type': 'function', 'function': "
        "{'name'}}; required and named calls are generated under a grammar of the tools' schemas",
        json_schema_extra={"anyOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]})
    parallel_tool_calls: bool | None = Field(None, description="allow several calls in one answer (default true)")
    _plan: ToolPlan | None = PrivateAttr(None)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v):
        if v is None:
            raise invalid("'messages' is required", "messages")
        if not isinstance(v, list):
            raise invalid(f"'messages' must be an array of message objects, got {json_type(v)}", "messages")
        for i, m in enumerate(v):
            if not isinstance(m, dict):
                raise invalid(f"'messages[{i}]' must be an object with 'role' and 'content', got {json_type(m)}",
                              f"messages[{i}]")
        return v

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v):
        if v is None:
            return v
        agp = v.get("add_generation_prompt")
        if agp is not None and not isinstance(agp, bool):
            raise ValueError(f"{{name}}.add_generation_prompt must be a boolean, got {json_type(agp)}")
        reserved = sorted(set(v) & {"messages", "bos_token", "eos_token", "pad_token"})
        if reserved:
            raise ValueError(f"{{name}} must not set {', '.join(repr(k) for k in reserved)}: the server fills "
                             "them in")
        return v

    @model_validator(mode="after")
    def _chat_rules(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
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


# ---------------------------------------------------------------------------------------------- engine errors
PARAM_NAMES = ("max_new_tokens", "max_denoising_steps", "stability_threshold", "seed", "entropy_bound",
               "top_p", "top_k", "min_p", "logprobs", "confidence_threshold", "t_min", "t_max", "rng",
               "stop_token_ids", "allowed_token_ids", "canvas_template", "stop", "structured_outputs", "text_template", "suffix")


def engine_error(e: ValueError, max_name: str = "max_tokens") -> APIError:
    """A ``SamplingParams`` / engine ``ValueError`` as a 400 naming the request field (messages start with it)."""
    msg = str(e)
    first = msg.split(" ", 1)[0].strip("'")
    param = first if first in PARAM_NAMES else None
    if param == "max_new_tokens":
        param = max_name
    if param is not None:
        msg = f"'{param}'" + msg[len(msg.split(' ', 1)[0]):]
    elif msg.startswith("prompt"):
        param = "prompt"
    return bad(msg.replace("max_new_tokens", max_name), param)


def check_context(prompt_len: int, params: SamplingParams, default_max: int, canvas: int, context: int,
                  max_name: str = "max_tokens", prompt_name: str = "prompt") -> SamplingParams:
    """Fill ``max_new_tokens`` (unset: the default, capped to what fits) and check prompt + output fit the
    context, naming the request's own fields (the engine counts output in whole canvases)."""
    def needed(n: int) -> int:
        return prompt_len + -(-n // canvas) * canvas

    if needed(1) > context:
        raise bad(f"the prompt is too long: {prompt_len} tokens, and one canvas of {canvas} more must fit in the "
                  f"model's context of {context} tokens", prompt_name, "context_length_exceeded")
    n = params.max_new_tokens
    if n is None:
        params.max_new_tokens = min(default_max, (context - prompt_len) // canvas * canvas)
    elif needed(n) > context:
        raise bad(f"'{max_name}' is too large: {n} tokens (in canvases of {canvas}) after a {prompt_len}-token "
                  f"prompt need {needed(n)} positions; the model's context is {context} tokens", max_name,
                  "context_length_exceeded")
    return params


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens the prefix cache supplied."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of an ``n`` > 1 request: choice 0 uses ``seed`` itself (so n=1 and choice 0
    agree); the others a 63-bit mix of (seed, index), so neighbouring seeds do not share choices."""
    if seed is None or index == 0:
        return seed
    x = (seed + index * 0x9E3779B97F4A7C15) & (2 ** 64 - 1)  # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2 ** 64 - 1)
    return (x ^ (x >> 31)) >> 1

