"""Errors as HTTP answers: always JSON `{"error": {"message", "type", "param", "code", "field"}}`.

The shape is the OpenAI API's (its clients raise an exception carrying `message`, `type`,
`param` and `code`), plus raybooth's `field` (the same as `param`). A client's mistake is a 4xx
that names the field and says what to do; the server's own trouble is a 5xx that says whether
retrying can help (503 carries Retry-After, which OpenAI clients honour when they retry).
Tracebacks stay in the logs.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from raybooth.platform.errors import ImageError, ModelError, UserError


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.field, self.headers)


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {
        "message": message, "type": error_type(status), "param": field, "code": code, "field": field,
    }}
    return JSONResponse(body, status_code=status, headers=headers)


def error_type(status: int) -> str:
    """The OpenAI API's `error.type` for a status."""
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def from_user_error(exc: UserError) -> ApiError:
    """Map a UserError raised by shared code (schedulers, images, models) onto a 4xx."""
    if isinstance(exc, ModelError):
        return ApiError(404, "model_not_found", exc.message, exc.field or "model")
    if isinstance(exc, ImageError):
        too_big = "over the limit" in exc.message
        return ApiError(413 if too_big else 400, "image_too_large" if too_big else "invalid_image",
                        exc.message, exc.field)
    return ApiError(400, "invalid_request", exc.message, exc.field)


STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}
