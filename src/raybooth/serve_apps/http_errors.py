"""Errors as HTTP answers: always JSON `{"error": {"code", "message", "field"}}`.

A client's mistake is a 4xx that names the field and says what to do; the server's own trouble
is a 5xx that says whether retrying can help. Tracebacks stay in the logs.
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
    body: dict[str, Any] = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


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
