"""One request's failure stays its own (docs/serving.md, "When one request fails").

Whatever fails for one request inside a tick (its prompt's encode or image, its constraint, its sampler row, its
stop check, its non-finite logits) ends that request with ``finish_reason="error"`` and a one-line message; the
tick goes on for the others. Messages never carry a library's internal state (a grammar parser's dump can hold
another part of the schema, or pages of text): one line, bounded.
"""

from __future__ import annotations

import logging

from .model_state import ModelState, Phase

log = logging.getLogger("blockdiff.engine")

MAX_MESSAGE = 300


class RequestFault(Exception):
    """Raised inside a tick when the request's own input is the cause (its constraint at run time): it still ends
    that request alone, and the server answers it as a client error (400, not retried), not a 500."""


def one_line(e: BaseException | str) -> str:
    """``Type: first line of the message``, at most ``MAX_MESSAGE`` characters."""
    if isinstance(e, str):
        text = e
    else:
        first = (str(e).strip().splitlines() or [""])[0].strip()
        text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    text = text.replace("<non-verbose/>", "").strip()
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def fail_request(state: ModelState, what: str, e: BaseException | str | None = None) -> None:
    """End ``state`` alone with ``finish_reason="error"``: "``what``: ``e``" (its cache is freed, its consumer gets a
    ``done`` event carrying the message)."""
    msg = what if e is None else f"{what}: {one_line(e)}"
    if isinstance(e, BaseException):
        log.warning("request %s failed alone: %s", state.request_id, msg, exc_info=e)
    else:
        log.warning("request %s failed alone: %s", state.request_id, msg)
    state.error_by_input = isinstance(e, RequestFault)
    try:
        state.finish("error", error=msg)
    except Exception:  # its consumer raised on the done event: the request is over all the same
        log.exception("request %s: its done event raised", state.request_id)
        state.phase, state.finish_reason, state.error = Phase.FINISHED, "error", msg


def guarded(state: ModelState, what: str, fn, *args):
    """``fn(*args)``, or None after failing ``state`` alone if it raises."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure of this request's own work ends this request only
        fail_request(state, what, e)
        return None


NON_FINITE = ("the model's logits for this request were not finite (NaN or infinity) at denoising step {step}: "
              "its sampling settings (e.g. a temperature that rounds to 0) or the checkpoint's weights overflow")
