"""The API's error hierarchy and its one JSON shape: `{"error": {"code", "message", "details"?}}`."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .responses import json_response

CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "error")
        self.message = message
        self.details = details


class NotFound(ApiError):
    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(404, message, details=details)


class Conflict(ApiError):
    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(409, message, details=details)


class Unavailable(ApiError):
    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(503, message, details=details)


class Invalid(ApiError):
    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(422, message, details=details)


def error_body(status: int, message: str, code: str | None = None, details: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code or CODES.get(status, "error"), "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err}


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return json_response(error_body(exc.status, exc.message, exc.code, exc.details), exc.status)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)


async def data_error(request: Request, exc: Exception) -> Response:
    # a value PostgreSQL cannot take (a NUL in a path id, say) came with the request: its fault, not ours
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return json_response(error_body(400, f"a value in the request cannot be used: {first}"), 400)


async def unavailable(request: Request, exc: Exception) -> Response:
    # the pool found no database (down, restarting): say so, and let the client retry
    return json_response(
        error_body(503, f"the database is unavailable: {type(exc).__name__}"), 503, headers={"Retry-After": "5"}
    )


async def server_error(request: Request, exc: Exception) -> Response:
    return json_response(error_body(500, "internal error"), 500)


HANDLERS = {
    ApiError: api_error,
    HTTPException: http_error,
    psycopg.DataError: data_error,
    psycopg.OperationalError: unavailable,
    PoolTimeout: unavailable,
    Exception: server_error,
}
