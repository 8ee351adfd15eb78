"""JSON in and out: orjson, ISO-8601 times with offsets, paging, bodies validated by the shared models."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from bridge.telemetry import MAX_DEPTH, explain, too_deep

M = TypeVar("M", bound=BaseModel)
MAX_BODY = 1024 * 1024
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(data: Any) -> bytes:
    # naive datetimes never reach here (timestamptz columns); UTC_Z keeps "+00:00" explicit
    try:
        return orjson.dumps(data, default=_default, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError as exc:
        # jsonb keeps 1e20 as a number that reads back as the int 10**20, past what orjson writes
        if "64-bit" not in str(exc):
            raise
        return orjson.dumps(_wide_ints_as_floats(data), default=_default, option=orjson.OPT_NON_STR_KEYS)


def _wide_ints_as_floats(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        try:
            return float(value)
        except OverflowError:
            return str(value)
    if isinstance(value, dict):
        return {k: _wide_ints_as_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_wide_ints_as_floats(v) for v in value]
    return value


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(data), status_code=status, media_type="application/json", headers=headers)


def iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.isoformat()


async def read_json(request: Request) -> Any:
    from .errors import ApiError, Invalid

    body = await request.body()
    if len(body) > MAX_BODY:
        raise ApiError(413, f"body of {len(body)} bytes exceeds {MAX_BODY}")
    if not body:
        raise ApiError(400, "empty body: a JSON object is expected")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from exc
    if too_deep(body, data):
        raise Invalid(
            f"body nests deeper than {MAX_DEPTH} levels",
            details=[{"field": "(body)", "message": f"nests deeper than {MAX_DEPTH} levels"}],
        )
    if b"\\u0000" in body:  # the only way JSON can carry a NUL, which PostgreSQL text and jsonb refuse
        refuse_nul(data)
    return data


def refuse_nul(data: Any) -> None:
    """422 naming every string (or key) that holds a NUL character."""
    from .errors import Invalid

    found: list[dict[str, str]] = []
    todo: list[tuple[Any, str]] = [(data, "")]
    while todo and len(found) < 100:
        value, path = todo.pop()
        if isinstance(value, str) and "\x00" in value:
            found.append({"field": path or "(body)", "message": "NUL (\\u0000) cannot be stored"})
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if "\x00" in key:
                    found.append({"field": where, "message": "NUL (\\u0000) cannot be stored in a key"})
                todo.append((item, where))
        elif isinstance(value, list):
            todo.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value))
    if found:
        raise Invalid("the body holds NUL characters", details=found)


def validate(model: type[M], data: Any) -> M:
    """Validate with the bridge's models; 422 lists every field error."""
    from .errors import Invalid

    if not isinstance(data, dict):
        raise Invalid("body must be a JSON object", details=[{"field": "(body)", "message": "not an object"}])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Invalid("invalid body", details=explain(exc)) from exc


def _api_error(status: int, message: str) -> Exception:
    from .errors import ApiError

    return ApiError(status, message)


def paging(request: Request) -> tuple[int, int]:
    """`limit` (default 100, at most 1000) and `offset` from the query string; 400 when malformed."""
    from .errors import ApiError

    try:
        limit = int(request.query_params.get("limit", DEFAULT_LIMIT))
        offset = int(request.query_params.get("offset", 0))
    except ValueError as exc:
        raise ApiError(400, "limit and offset must be integers") from exc
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise ApiError(400, f"limit must be 1..{MAX_LIMIT} and offset >= 0")
    return limit, offset


def page(items: list[Any], limit: int, offset: int, total: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"items": items, "limit": limit, "offset": offset}
    if total is not None:
        out["total"] = total
    return out


def query_time(request: Request, name: str, default: datetime | None) -> datetime | None:
    """`?name=` as ISO-8601 (naive means the site's zone) or epoch milliseconds; 400 when malformed."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        if raw.lstrip("-").isdigit():
            return datetime.fromtimestamp(int(raw) / 1000, UTC)
        ts = datetime.fromisoformat(raw.replace(" ", "+") if raw.count(" ") == 1 and "T" in raw else raw)
    except (ValueError, OverflowError, OSError) as exc:
        raise _api_error(400, f"{name}: expected ISO-8601 or epoch milliseconds, got {raw!r}") from exc
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=request.state.services.settings.core.site_timezone)
    return ts
