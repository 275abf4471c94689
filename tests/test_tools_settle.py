"""Settling a constrained canvas survives a grammar mask that over-approximates: llguidance lets a lexeme that
allows any text pass tokens with bytes that are never valid UTF-8 (seen at the 262k vocabulary with tool-call
string arguments), and then refuses to consume them. The settle pass takes the most likely token the matcher
really accepts instead of failing the request."""

from __future__ import annotations

import torch

from blockdiff.structured.canvas import CanvasConstraint


class _Matcher:
    """Accepts anything but token 7 (which its mask nevertheless allows)."""

    def __init__(self):
        self.taken = []

    def try_consume_tokens(self, tokens):
        n = 0
        for t in tokens:
            if t == 7:
                break
            n += 1
        self.taken += tokens[:n]
        return n

    def is_error(self):
        return False

    def is_accepting(self):
        return False

    def is_stopped(self):
        return False


class _Constraint(CanvasConstraint):
    def allowed(self):
        return torch.ones(self.vocab_size, dtype=torch.bool)  # over-approximate: 7 included


def test_settling_skips_a_token_the_mask_allowed_but_the_matcher_refuses():
    c = _Constraint(_Matcher(), [1], vocab_size=16, canvas_length=4, seed=0)
    probs = torch.full((4, 16), 0.01)
    probs[:, 7] = 0.5  # the refused token is the most likely everywhere
    probs[:, 9] = 0.3
    c._probs = probs
    assert c.complete([7, 7, 7, 7]) == [9, 9, 9, 9]
