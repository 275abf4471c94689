"""argparse ``type=`` callables that refuse out-of-range numbers while parsing, before any model loads or any
work starts: ``--batch-size 0`` ends as ``error: argument --batch-size: must be >= 1, got 0`` (exit 2)."""

from __future__ import annotations

import argparse


def at_least(low, kind=int):
    """A ``type=`` for numbers >= ``low`` (``kind`` int or float)."""
    def parse(text: str):
        value = _number(text, kind)
        if not value >= low:  # not `value < low`: NaN compares false with everything and would pass
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own "invalid int value" message
    return parse


def above(low: float):
    """A ``type=`` for floats > ``low``."""
    def parse(text: str):
        value = _number(text, float)
        if not value > low:
            raise argparse.ArgumentTypeError(f"must be > {low}, got {text}")
        return value
    parse.__name__ = "float"
    return parse


def fraction(text: str) -> float:
    """A ``type=`` for a probability in [0, 1]."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None
