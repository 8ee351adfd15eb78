"""Liveness and reachability: EMS `/api/health`, PUMP `/api/v1/health` and `/api/v1/health/databases`."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .responses import json_response

STARTED = time.monotonic()


async def database_check(request: Request) -> dict[str, Any]:
    services = request.state.services
    started = time.perf_counter()
    try:
        async with asyncio.timeout(2):
            async with services.pool.connection() as conn:
                level = (await (await conn.execute("SELECT level FROM schema_info")).fetchone() or ("?",))[0]
    except Exception as exc:
        return {"status": "down", "error": f"{type(exc).__name__}: {exc}".strip()}
    return {"status": "up", "level": level, "latencyMs": round((time.perf_counter() - started) * 1000, 2)}


def broker_check(request: Request) -> dict[str, Any]:
    link = request.state.services.mqtt
    return {"status": "up" if link.connected else "down", "protocol": "5" if link.v5 else "3.1.1"}


async def health(request: Request) -> Response:
    db = await database_check(request)
    mqtt = broker_check(request)
    ok = db["status"] == "up" and mqtt["status"] == "up"
    return json_response(
        {
            "status": "ok" if ok else "degraded",
            "timestamp": datetime.now(UTC).isoformat(),
            "uptime": round(time.monotonic() - STARTED, 3),
            "database": db,
            "mqtt": mqtt,
            "services": {"database": db["status"], "mqtt": mqtt["status"]},
        }
    )


async def databases(request: Request) -> Response:
    db = await database_check(request)
    mqtt = broker_check(request)
    body = {
        "status": "ok" if db["status"] == "up" else "error",
        "postgres": db,
        "timescaledb": db,
        "mqtt": mqtt,
        "timestamp": datetime.now(UTC).isoformat(),
    }
    return json_response(body, 200 if db["status"] == "up" else 503)


routes = [
    Route("/api/health", health),
    Route("/api/v1/health", health),
    Route("/api/v1/health/databases", databases),
]
