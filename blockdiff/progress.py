"""What a long step shows while it runs, and where the ``blockdiff`` logger writes.

- ``progress(description, total)``: a rich progress bar on stderr for loading, quantizing, converting, training
  and evaluating (downloads show huggingface_hub's own bars). It draws only when stderr is a terminal and output is
  not quiet (``--quiet``); otherwise it costs nothing and prints nothing, so logs and pipes stay clean.
- ``configure(level, quiet)``: what every ``blockdiff`` command calls first. The level comes from ``--log-level``,
  else ``$BLOCKDIFF_LOG_LEVEL``, else ``info`` (``warning`` with ``--quiet``). On a terminal log records go through
  rich (above any progress bar), elsewhere as plain lines on stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

LEVELS = ("critical", "error", "warning", "info", "debug")
ENV_LOG_LEVEL = "BLOCKDIFF_LOG_LEVEL"

_state = {"quiet": False, "console": None}


def console():
    """The stderr console every bar and log record shares (rich resolves ``sys.stderr`` at each write)."""
    if _state["console"] is None:
        from rich.console import Console
        _state["console"] = Console(stderr=True)
    return _state["console"]


def set_console(c) -> None:
    """Use another rich Console (tests: one that writes to a buffer and counts as a terminal); None: stderr."""
    _state["console"] = c


def is_quiet() -> bool:
    return _state["quiet"]


def enabled() -> bool:
    return not _state["quiet"] and console().is_terminal


def resolve_level(level: str | None, quiet: bool = False) -> str:
    """``--log-level`` > ``--quiet`` (warning) > ``$BLOCKDIFF_LOG_LEVEL`` > info; a bad name is a ValueError.
    The flags typed on the command line win over the environment."""
    source = "--log-level"
    if level is None and quiet:
        return "warning"
    if level is None and os.environ.get(ENV_LOG_LEVEL):
        level, source = os.environ[ENV_LOG_LEVEL], f"${ENV_LOG_LEVEL}"
    if level is None:
        return "warning" if quiet else "info"
    if level.lower() not in LEVELS:
        raise ValueError(f"{source} must be one of {', '.join(LEVELS)}, got {level!r}")
    return level.lower()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a redirect or a test's capture never goes stale)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure(level: str | None = None, quiet: bool = False) -> str:
    """Set the ``blockdiff`` logger's level and its one handler; returns the level used."""
    name = resolve_level(level, quiet)
    _state["quiet"] = quiet
    logger = logging.getLogger("blockdiff")
    logger.setLevel(name.upper())
    for h in [h for h in logger.handlers if getattr(h, "_blockdiff", False)]:
        logger.removeHandler(h)  # configured again (another command in the same process): one handler only
    if console().is_terminal:
        from rich.logging import RichHandler
        handler = RichHandler(console=console(), show_path=False, log_time_format="[%X]")
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler._blockdiff = True
    logger.addHandler(handler)
    if quiet or not console().is_terminal:
        try:  # huggingface_hub's download bars follow the same rule
            from huggingface_hub.utils import disable_progress_bars
            disable_progress_bars()
        except ImportError:
            pass
    return name


class _Bar:
    def __init__(self, progress=None, task=None):
        self._p, self._t = progress, task

    def advance(self, n: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._t, n)

    def update(self, **kw) -> None:
        """``completed=``, ``total=``, ``description=``."""
        if self._p is not None:
            self._p.update(self._t, **kw)


@contextmanager
def progress(description: str, total: float | None = None, completed: float = 0, show: bool = True):
    """``with progress("loading", total=n) as bar: ... bar.advance()``; a no-op unless ``enabled()`` and ``show``
    (False where the caller draws its own live view: two live displays on one terminal garble each other)."""
    if not (show and enabled()):
        yield _Bar()
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    # Printed lines go above the bar only when stdout is the terminal too (never into a redirected stdout's place).
    with Progress(*columns, console=console(), transient=True, redirect_stdout=sys.stdout.isatty()) as p:
        yield _Bar(p, p.add_task(description, total=total, completed=completed))
