"""Committed token ids -> text deltas for one request.

The engine cuts ``output_ids`` at the token that completes a stop string; the text must end *before* the stop
string (as ``LLM.generate`` does). While streaming, a tail that may still become a stop string or a multi-byte
character is held back until the next canvas decides it, so the streamed deltas add up to exactly the
non-streamed text.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str] | None = None, eos_ids: set[int] | frozenset = frozenset()):
        self.tok = tokenizer
        self.stops = list(stops or [])
        self.eos_ids = set(eos_ids)
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.stopped = False

    def _text(self) -> str:
        if self.tok is None:
            return ""
        ids = self.ids
        if ids and ids[-1] in self.eos_ids:  # the EOS (or a stop token id) ends the output; it is not text
            ids = ids[:-1]
        return self.tok.decode(ids)

    def push(self, ids: list[int], final: bool = False) -> str:
        """Add committed ids; return the text that is now certain. ``final``: no more ids will come."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self._text()
        end = len(text)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            end, final = min(hits), True
            self.stopped = True
        if not final:
            stripped = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its other bytes
            end = len(stripped)
            for s in self.stops:  # the longest tail that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if stripped.endswith(s[:k]):
                        end = min(end, len(stripped) - k)
                        break
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def finish(self) -> str:
        return self.push([], final=True)
