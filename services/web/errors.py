"""The one mapping of askmesh's failures (gRPC statuses) to OpenAI's error responses.

OpenAI's clients pick their exception by HTTP status (the `openai` SDK: 400 BadRequestError,
401 AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 429 RateLimitError, 5xx
InternalServerError) and show `error.message`; the body is OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc

from askmesh.runtime.errors import AskmeshError


@dataclass(frozen=True)
class HttpStatus:
    status: int
    type: str  # OpenAI's error type


_BY_CODE: dict[grpc.StatusCode, HttpStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpStatus(400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: HttpStatus(400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpStatus(400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: HttpStatus(401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: HttpStatus(403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: HttpStatus(404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: HttpStatus(409, "invalid_request_error"),
    grpc.StatusCode.ABORTED: HttpStatus(409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpStatus(429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: HttpStatus(499, "request_cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: HttpStatus(501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: HttpStatus(503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpStatus(504, "timeout"),
}
_SERVER_ERROR = HttpStatus(500, "server_error")


def http_status(code: grpc.StatusCode) -> HttpStatus:
    return _BY_CODE.get(code, _SERVER_ERROR)


def error_field(message: str) -> str | None:
    """The field a message names first (askmesh's messages start `field: problem`)."""
    head, separator, _ = message.partition(": ")
    if separator and head and " " not in head and len(head) <= 80:
        return head
    return None


def error_body(error: AskmeshError, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for `error`: its message, type, the field it names and a code
    (`code`, else the gRPC status's name in lower case)."""
    return {
        "error": {
            "message": error.message,
            "type": http_status(error.code).type,
            "param": error_field(error.message),
            "code": code or error.code.name.lower(),
        }
    }


def retry_headers(error: AskmeshError) -> dict[str, str]:
    """`Retry-After` (whole seconds, at least 1) where askmesh said when to ask again."""
    if error.retry_after_s is None:
        return {}
    return {"Retry-After": str(max(math.ceil(error.retry_after_s), 1))}
