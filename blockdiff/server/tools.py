"""Tools and thinking at the HTTP edge: a chat request's ``ToolPlan`` -> the template's messages and variables and
the constraint of its calls (errors as 400s naming the field); the answer's message and streaming deltas come from
``blockdiff.tools.output``."""

from __future__ import annotations

from ..sampling.params import SamplingParams
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
    """``params`` with the calls' grammar (required / named / auto, when the tokenizer has the markers)."""
    try:
        return plan.constrain(params, tokenizer)
    except ToolError as e:
        raise bad(str(e), e.param) from None
