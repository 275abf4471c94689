"""The OpenAI-compatible HTTP server: ``build_app`` (FastAPI) and the ``blockdiff serve`` command."""

from .app import build_app

__all__ = ["build_app"]
