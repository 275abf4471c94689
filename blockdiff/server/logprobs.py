"""OpenAI's ``logprobs`` objects from the engine's per-token entries ``(logprob, [(id, logprob), ...])``.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal"}``.
Completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``.
A token's text is the tokenizer's decoding of it alone, special tokens included; ``bytes`` its UTF-8 bytes.
A probability that underflowed to 0 is reported as -9999.0 (JSON has no -inf), as OpenAI does.
"""

from __future__ import annotations

import math

FLOOR = -9999.0


def _lp(x: float) -> float:
    return x if math.isfinite(x) else FLOOR


def _text(tok, i: int) -> str:
    if tok is None:
        return f"<{i}>"
    return tok.decode([i], skip_special_tokens=False)


def chat_logprobs(tok, ids: list[int], entries: list) -> dict:
    content = []
    for i, (lp, top) in zip(ids, entries):
        t = _text(tok, i)
        content.append({"token": t, "logprob": _lp(lp), "bytes": list(t.encode("utf-8")),
                        "top_logprobs": [{"token": (a := _text(tok, j)), "logprob": _lp(x),
                                          "bytes": list(a.encode("utf-8"))} for j, x in top]})
    return {"content": content, "refusal": None}


def completion_logprobs(tok, ids: list[int], entries: list, offset: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for i, (lp, top) in zip(ids, entries):
        t = _text(tok, i)
        tokens.append(t)
        token_lps.append(_lp(lp))
        d = {}
        for j, x in top:  # most likely first; a dict keeps the first of equal texts
            d.setdefault(_text(tok, j), _lp(x))
        tops.append(d)
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
