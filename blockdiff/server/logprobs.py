"""OpenAI's ``logprobs`` objects from the engine's per-token entries ``(logprob, [(id, logprob), ...])``.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal"}``.
Completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``.

A token's ``bytes`` are its raw bytes (``Tokenizer.token_bytes``: a byte-fallback ``<0xE2>`` is one byte), so the
joined ``bytes`` of the content tokens are the content's UTF-8, a character split over two tokens included. A
token's name (chat ``token``, a completions ``top_logprobs`` key) is its text when its bytes are whole UTF-8, else
``bytes:\\xe2\\x80`` (OpenAI's spelling of a partial character), so different byte tokens never share a name; a
special token is named by its vocabulary piece (``<eos>``). Completions ``tokens`` are the text each token adds in
context (vLLM's incremental detokenizing): "" for a token that ends inside a character, the whole character for
the one that completes it, so ``"".join(tokens)`` is the text and ``text_offset`` indexes into it. A special token
adds nothing to the text (decode leaves it out): it keeps its name and sits at the offset where it occurred.
A probability that underflowed to 0 is reported as -9999.0 (JSON has no -inf), as OpenAI does.
"""

from __future__ import annotations

import codecs
import math

FLOOR = -9999.0


def _lp(x: float) -> float:
    return x if math.isfinite(x) else FLOOR


def token_bytes(tok, i: int) -> bytes:
    if tok is None:
        return f"<{i}>".encode()
    return tok.token_bytes(i)


def token_name(tok, i: int) -> str:
    """The token's text alone, or ``bytes:\\xNN...`` when its bytes are not whole UTF-8."""
    if tok is None:
        return f"<{i}>"
    if tok.is_special(i):
        return tok.id_to_token(i) or ""
    b = tok.token_bytes(i)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def chat_logprobs(tok, ids: list[int], entries: list) -> dict:
    content = []
    for i, (lp, top) in zip(ids, entries):
        content.append({"token": token_name(tok, i), "logprob": _lp(lp), "bytes": list(token_bytes(tok, i)),
                        "top_logprobs": [{"token": token_name(tok, j), "logprob": _lp(x),
                                          "bytes": list(token_bytes(tok, j))} for j, x in top]})
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """One choice's completions logprobs, block by block (a character may be split across canvases): the UTF-8
    decoder state and the text offset carry over from one ``block`` to the next. Tokens that leave a character
    incomplete at a block's end are held back, as the streamed text holds the character back, until a later
    block completes it or ``flush`` ends the output: so the blocks' entries join to the whole output's, whose last
    token takes the U+FFFD of a character the output never completed."""

    def __init__(self, tok, offset: int = 0):
        self.tok = tok
        self.offset = offset
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._held: tuple[list, list] = ([], [])  # ids and entries of an incomplete trailing character

    def block(self, ids: list[int], entries: list, final: bool = False) -> dict:
        """``final``: no more tokens follow, so bytes still waiting for the rest of a character are written as
        U+FFFD into the last token (as the text's full decode writes them)."""
        ids, entries = self._held[0] + list(ids), self._held[1] + list(entries)
        self._held = ([], [])
        tokens, token_lps, tops, offsets = [], [], [], []
        last_text = None  # index of the last token that is text
        whole, whole_offset = 0, self.offset  # tokens (and the offset) up to the last complete character
        for k, (i, (lp, top)) in enumerate(zip(ids, entries)):
            if self.tok is not None and self.tok.is_special(i):
                t = token_name(self.tok, i)  # named, but not part of the text
                step = 0
            else:
                t = self._utf8.decode(token_bytes(self.tok, i))
                step, last_text = len(t), k
            tokens.append(t)
            offsets.append(self.offset)
            self.offset += step
            token_lps.append(_lp(lp))
            d = {}
            for j, x in top:  # most likely first
                name = token_name(self.tok, j)
                d[name if name not in d else f"token_id:{j}"] = _lp(x)  # two tokens of one text stay two entries
            tops.append(d)
            if not self._utf8.getstate()[0]:
                whole, whole_offset = k + 1, self.offset
        if final and last_text is not None:
            rest = self._utf8.decode(b"", final=True)
            tokens[last_text] += rest
            self.offset += len(rest)
        elif not final and whole < len(ids):  # decoded again with the block that completes the character
            self._held = (ids[whole:], entries[whole:])
            self._utf8.reset()
            self.offset = whole_offset
            del tokens[whole:], token_lps[whole:], tops[whole:], offsets[whole:]
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def flush(self) -> dict | None:
        """The end of the output: the entries still held back (None if none)."""
        return self.block([], [], final=True) if self._held[0] else None


def completion_logprobs(tok, ids: list[int], entries: list, offset: int = 0) -> dict:
    """A whole output's completions logprobs."""
    return CompletionLogprobs(tok, offset).block(ids, entries, final=True)
