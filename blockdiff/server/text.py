"""Committed token ids -> text deltas for one request.

The engine cuts ``output_ids`` at the token that completes a stop string; the text must end *before* the stop
string (as ``LLM.generate`` does). While streaming, a tail that may still become a stop string or a multi-byte
character is held back until the next canvas decides it, so the streamed deltas add up to exactly the
non-streamed text.

Ids are detokenized incrementally with tokenizers' ``DecodeStream`` (``Tokenizer.decode_stream``): one step per
canvas for its new ids, instead of decoding the whole output again on every canvas. Only an incomplete trailing
character waits: a canvas that ends inside a multi-byte character hands out everything before it at once (its
last ids are stepped one at a time), the character itself comes with the canvas that completes it. What the decode
stream still holds at the end (bytes no later id completed) comes from one full decode in ``finish``, so the text
equals ``tokenizer.decode(ids)`` exactly.
Byte soup that decodes differently once more bytes arrive (invalid UTF-8 from byte-fallback tokens) makes
``DecodeStream`` raise; that request then decodes its whole output on every canvas, as blockdiff did before.
"""

from __future__ import annotations

EXACT_TAIL = 64  # tails up to this long are matched exactly against a stop string's prefixes, longer ones bounded


class TextStream:
    def __init__(self, tokenizer, stops: list[str] | None = None, eos_ids: set[int] | frozenset = frozenset()):
        self.tok = tokenizer
        self.stops = list(stops or [])
        self.eos_ids = set(eos_ids)
        self.ids: list[int] = []  # the output's text ids (the id that ended it, EOS or a stop id, left out)
        self.text = ""  # what the decode stream has produced so far
        self._decoder = None if tokenizer is None else tokenizer.decode_stream()
        self._redecode = False  # the decode stream gave up: decode all ids on every push
        self.sent = 0  # characters of the text already handed out
        self.stopped = False

    def _add(self, ids: list[int]) -> None:
        cut = next((k for k, i in enumerate(ids) if i in self.eos_ids), len(ids))
        ids = list(ids[:cut])  # the EOS (or a stop token id) ends the output; it is not text
        self.ids.extend(ids)
        if self._decoder is not None and ids:
            try:
                piece = self._decoder.step(ids)
            except Exception:  # tokenizers: "Invalid prefix encountered while decoding stream"
                self._decoder, self._redecode = None, True
                return
            if piece:
                self.text += piece

    def push(self, ids: list[int], final: bool = False) -> str:
        """Add committed ids; return the text that is now certain. ``final``: no more ids will come."""
        if self.stopped:
            return ""
        self._add(ids)
        if self.tok is not None and (final or self._redecode):
            # Final: bytes no later id completed are still inside the decode stream; the full decode has them.
            self.text = self.tok.decode(self.ids)
            if not final:
                self.text = self.text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its other bytes
        text = self.text
        end = len(text)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            end, final = min(hits), True
            self.stopped = True
        if not final:
            for s in self.stops:  # the longest tail that is a proper prefix of a stop string
                window = min(len(s) - 1, end)
                if window > EXACT_TAIL:
                    # Trying every length costs the square of the stop string's length per canvas, on the event
                    # loop every stream shares: hold back from the first character of the window that can begin
                    # it instead (every such tail starts there or later).
                    at = text.find(s[0], len(text) - window)
                    if at >= 0:
                        end = min(end, at)
                    continue
                for k in range(window, 0, -1):
                    if text.endswith(s[:k]):
                        end = min(end, len(text) - k)
                        break
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def finish(self) -> str:
        return self.push([], final=True)
