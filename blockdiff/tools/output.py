"""One chat output's token ids -> OpenAI message pieces (content, reasoning_content, tool_calls) and the deltas
that stream them; the HTTP server and ``LLM.chat`` both use it, so streamed and whole answers agree by
construction.

The text is decoded with the special tokens kept (the parser needs the markers), whatever the request says about
special tokens; the id that ended the output (an EOS or a stop token id) is not text.
"""

from __future__ import annotations

from .parser import OutputStream, ParsedOutput, hold_back
from .render import ToolPlan

# the markers the output parser reads (calls, their strings, the thinking channel); the prompt-side ones (tool
# declarations, responses) are not an answer's text
PARSED_MARKERS = ("call_open", "call_close", "string", "channel_open", "channel_close")
INVALID_TOOL_CALL = "invalid_tool_call"  # finish_reason of an output whose calls did not parse (sent as content)


class ChatText:
    def __init__(self, tokenizer, plan: ToolPlan, end_ids=(), stops: list[str] | None = None):
        self.tok = tokenizer
        self.plan = plan
        self.end_ids = set(end_ids)
        self.stops = list(stops or [])
        self.ids: list[int] = []
        self.stream = OutputStream(plan.markers, plan.names if plan.parse_calls else None, plan.parse_calls)
        # Special tokens other than the format's markers (<pad>, <eos>, <|turn>...) are not text: dropped, as a plain
        # request's decode drops them; the markers stay for the parser.
        is_special = getattr(tokenizer, "is_special", None)
        markers = {tokenizer.token_to_id(getattr(plan.markers, name)) for name in PARSED_MARKERS} \
            if hasattr(tokenizer, "token_to_id") else set()
        self._drop = (lambda i: is_special(i) and i not in markers) if is_special is not None else None

    def text(self) -> str:
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.end_ids else self.ids
        if self._drop is not None:
            ids = [i for i in ids if not self._drop(i)]
        text = self.tok.decode(ids, skip_special_tokens=False)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        return text if cut < 0 else text[:cut]

    def push(self, ids: list[int]) -> list[dict]:
        """Committed ids -> deltas that are now certain."""
        self.ids.extend(ids)
        return self.stream.push(hold_back(self.text(), self.stops))  # a tail that may become a stop string waits

    def finish(self, engine_reason: str | None) -> tuple[list[dict], ParsedOutput, str | None]:
        """-> (last deltas, the parsed output, the finish_reason to report)."""
        deltas, parsed = self.stream.finish(self.text())
        reason = engine_reason
        if parsed.tool_calls:
            reason = "tool_calls"
        elif engine_reason != "length" and (parsed.error is not None or self.plan.mode == "required"):
            # calls that did not parse, or none where tool_choice asked for one (a checkpoint without the
            # format's tokens is not constrained): the text is the content, and the reason says so
            reason = INVALID_TOOL_CALL
        return deltas, parsed, reason


def reasoning_tokens(tokenizer, plan: ToolPlan | None, ids) -> int:
    """How many of an output's ids are its thinking: each thinking channel from its opening marker through its
    closing one (to the end when the budget cut it), as OpenAI's ``reasoning_tokens`` counts them; 0 when the
    request did not turn thinking on (the output is then not parsed for it)."""
    if plan is None or not plan.thinking or tokenizer is None or not hasattr(tokenizer, "token_to_id"):
        return 0
    open_id = tokenizer.token_to_id(plan.markers.channel_open)
    close_id = tokenizer.token_to_id(plan.markers.channel_close)
    n, inside = 0, False
    for t in ids:
        inside = inside or t == open_id
        n += inside
        inside = inside and t != close_id
    return n


def message(parsed: ParsedOutput) -> dict:
    """The assistant message of a parsed output (content null when it is only calls)."""
    m = {"role": "assistant",
         "content": parsed.content if (parsed.content or not parsed.tool_calls) else None}
    if parsed.reasoning is not None:
        m["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        m["tool_calls"] = [c.openai() for c in parsed.tool_calls]
    return m
