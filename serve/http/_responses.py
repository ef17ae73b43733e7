"""HTTP responses, and the one place that maps Kestrel's exceptions to HTTP status codes.

    ModelNotFoundError                      404
    InvalidInputError, ImageDecodeError     400
    ModelLoadError (model not ready)        503
    ResourceExhaustedError (queue full)     503 with Retry-After: 1 (added by the handler)
    DeadlineExceededError                   504
    HttpError (route, method, body size...) its own status (404, 405, 411, 413, 415)
    anything else                           500  (logged with its traceback)

Error bodies are {"error": "<what was received, what was expected>"}, the shape tritonclient reads.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from ..errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ResourceExhaustedError,
)

_STATUS = [  # most specific first
    (ModelNotFoundError, HTTPStatus.NOT_FOUND),
    (InvalidInputError, HTTPStatus.BAD_REQUEST),
    (ResourceExhaustedError, HTTPStatus.SERVICE_UNAVAILABLE),
    (DeadlineExceededError, HTTPStatus.GATEWAY_TIMEOUT),
    (ModelLoadError, HTTPStatus.SERVICE_UNAVAILABLE),
]


def status_for(exc: BaseException) -> HTTPStatus:
    """The HTTP status for an exception (500 for anything unexpected)."""
    if isinstance(exc, HttpError):
        return exc.status
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR


class HttpError(Exception):
    """An error that is about HTTP itself (route, method, body size, content type)."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes = b"", content_type: str = "application/json",
                 headers: dict[str, str] | None = None):
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers or {}


def json_response(obj, status: int = HTTPStatus.OK, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json", headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)
