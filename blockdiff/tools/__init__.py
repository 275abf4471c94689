"""Tool calling and thinking in Gemma 4's chat format (see docs/serving.md, "Tools and thinking").

- ``syntax``: the format's markers and its value syntax (``{key:<|"|>text<|"|>,n:3}``): write and read values.
- ``parser``: model output (text with special tokens kept) -> content, reasoning and tool calls; streaming deltas.
- ``grammar``: tools' JSON Schemas -> a Lark grammar in the same format, so constrained calls always parse.
- ``render``: OpenAI tools / messages -> what the chat template receives; request-level validation.
"""

from .parser import ParsedOutput, ToolCall, parse_output
from .syntax import Markers

__all__ = ["Markers", "ParsedOutput", "ToolCall", "parse_output"]
