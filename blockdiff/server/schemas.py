"""Response bodies as pydantic models: they document ``/openapi.json`` (the handlers build plain dicts of the same
shape for speed; the schemathesis test checks the two agree)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the request field at fault ('messages[0].role'), or null when the "
                              "error is not about one (auth, routes, capacity)")
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose keys/values came from the prefix cache")


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = Field(description="completion tokens that were the model's thinking (its channel's "
                                  "markers included); 0 unless the request turned thinking on")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = Field(None, description="chat completions only")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = Field(description="one entry per output token (see docs/serving.md)")
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = Field(description="stop | length | abort")
    token_ids: list[int] | None = Field(None, description="a model without a tokenizer: the output's token ids "
                                        "(its text is empty)")
    metrics: dict[str, Any] | None = Field(None, description="per choice when n > 1")


class Completion(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    metrics: dict[str, Any] = Field(description="blockdiff: denoise_steps, canvases, tokens_per_forward, seconds, "
                                    "time_to_first_block (of choice 0)")


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object in a string")


class ToolCallOut(BaseModel):
    id: str
    type: str = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = Field(description="null when the answer is only tool calls")
    reasoning_content: str | None = Field(None, description="the model's thinking (with chat_template_kwargs "
                                          "enable_thinking), present when it thought")
    tool_calls: list[ToolCallOut] | None = Field(None, description="present when the model called tools")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = Field(description="stop | length | abort | tool_calls | invalid_tool_call (calls "
                                      "that did not parse, returned as content)")
    metrics: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    metrics: dict[str, Any]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    max_model_len: int
    canvas_length: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class Tokenized(BaseModel):
    count: int = Field(description="the number of tokens")
    max_model_len: int = Field(description="positions a request may use (prompt + output)")
    tokens: list[int]
    token_strs: list[str] | None = Field(None, description="each token's text, with return_token_strs")


class Detokenized(BaseModel):
    prompt: str = Field(description="the tokens' text")


class Version(BaseModel):
    version: str


class Health(BaseModel):
    status: str


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 415, 429, 500, 503)}
SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "description": "one Server-Sent Event: 'data: {chunk JSON}' (a chunk, a draft chunk, or an error object), the "
                   "last one 'data: [DONE]'",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}}}}}

RESPONSES = {"application/json": {"schema": {"type": "object", "required": ["id", "object", "output", "status"],
                                             "description": "a response object (object: response)"}},
             "text/event-stream": {"schema": {
                 "type": "object", "required": ["data"],
                 "description": "one typed Server-Sent Event: 'event: response.output_text.delta' and its "
                                "'data: {...}' with a sequence_number; the last is response.completed, "
                                "response.incomplete or response.failed (no [DONE])",
                 "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}
