"""OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` and the translation of pydantic
validation errors into it (the wording lives with the fields, ``blockdiff/sampling/fields.py``: ``'field' must
be ..., got ...``, ``param`` = the field's path, ``messages[0].role``)."""

from __future__ import annotations

from pydantic import ValidationError

from ..sampling.fields import describe as message_for  # noqa: F401  (re-exported)
from ..sampling.fields import first_error, invalid, json_type, param_path  # noqa: F401  (re-exported)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def from_validation(e: ValidationError) -> APIError:
    """The first error of a failed validation as a 400 (OpenAI reports one problem at a time)."""
    return bad(*first_error(e))
