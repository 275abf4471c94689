"""Tools and thinking at the HTTP edge: a chat request's ``ToolPlan`` -> the template's messages and variables and
the constraint of its calls; the answer's message and streaming deltas come from ``blockdiff.tools.output``."""

from __future__ import annotations

from ..sampling.params import SamplingParams
from ..structured.spec import compile_spec, normalize
from ..tools.render import ToolError, ToolPlan, template_messages
from .errors import bad


def chat_inputs(messages: list[dict], kwargs: dict, plan: ToolPlan) -> tuple[list[dict], dict]:
    """-> (messages, template variables) with the tools declared and tool calls / results in template form."""
    try:
        messages = template_messages(messages)
    except ToolError as e:
        raise bad(str(e), e.param) from None
    tools = plan.template_tools()
    if tools is not None:
        kwargs = {**kwargs, "tools": tools}
    return messages, kwargs


def constrain(params: SamplingParams, plan: ToolPlan, tokenizer) -> SamplingParams:
    """Put the calls' grammar on ``params`` (required / named / auto with markers in the tokenizer)."""
    try:
        grammar = plan.grammar(tokenizer)
    except ToolError as e:
        raise bad(str(e), e.param) from None
    if grammar is None:
        return params
    if params.structured_outputs is not None:
        raise bad("'response_format' / 'structured_outputs' cannot be combined with tool calls (tool_choice "
                  f"{plan.mode!r}); send tool_choice 'none' to constrain the text instead", "tool_choice")
    try:
        spec = normalize({"grammar": grammar})
        compile_spec(spec)
    except ValueError as e:  # a schema the grammar engine refuses (a bad pattern...)
        raise bad(f"'tools': the tools' schemas cannot be compiled to a grammar: {e}", "tools") from None
    params.structured_outputs = spec
    return params
