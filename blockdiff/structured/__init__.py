"""Structured output on the canvas: JSON Schema, regex, choice and grammar constraints (llguidance), and text
templates with holes for infilling. See docs/structured-output.md."""

from .canvas import CanvasConstraint, GrammarCompiler
from .spec import compile_spec, normalize

__all__ = ["CanvasConstraint", "GrammarCompiler", "compile_spec", "normalize"]
